"""DWC payloads decoded and applied with numpy on the robot: no torch, no bitsandbytes (issue 19, "a robot
without torch").

Decoding is :mod:`cdcca.dwc_format`'s, the one reader of the format that ``cdcca.dwc``'s torch decode uses as
well, so both hold the same bits (``tests/test_np_delta.py``); this module adds Eq. 8 (θ = θ_base + Δ) on numpy
arrays. :func:`decode` takes the codec the envelope announces and the receiver's trainable set, and raises
:class:`CodecError` (the same class as ``cdcca.dwc.CodecError``) for anything malformed. A new codec adds its
decoder with :func:`register`; :data:`DECODERS` lists those this robot reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cdcca.dwc_format import (
    DECODERS,
    FORMAT,
    MAX_CONTAINER_BYTES,
    MAX_DELTA_RATIO,
    MAX_ELEMENTS,
    NF4_BLOCKSIZES,
    NF4_LEVELS,
    VERSION,
    CodecError,
    Entry,
    NumpyDecoder,
    container_limit,
    decode,
    layout_fingerprint,
    payload_codec,
    register,
    take,
)

__all__ = ["DECODERS", "FORMAT", "MAX_DELTA_RATIO", "NF4_LEVELS", "VERSION", "CodecError", "Entry", "NumpyDecoder",
           "apply", "container_limit", "decode", "layout_fingerprint", "payload_codec", "register", "take"]  # fmt: skip
# the limits under the names cdcca.dwc gives them (tests/test_np_delta.py checks both modules agree)
_MAX_ELEMENTS, _MAX_CONTAINER_BYTES, _NF4_BLOCKSIZES = MAX_ELEMENTS, MAX_CONTAINER_BYTES, NF4_BLOCKSIZES


def apply(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
          max_ratio: float | None = MAX_DELTA_RATIO) -> dict[str, np.ndarray]:  # fmt: skip
    """Eq. 8: θ = θ_base + Δ as new arrays in ``base``'s dtype, computed in float32 (as ``cdcca.dwc.apply_delta``).

    ValueError (nothing returned) if the names or shapes differ, a value becomes NaN/Inf, or any |Δ| exceeds
    ``max_ratio`` times the largest |θ_base| of the whole set (at least 1.0); ``None`` disables that bound.
    """
    only = sorted(set(base) ^ set(delta))
    if only:
        raise ValueError(f"apply: tensor {only[0]!r} is in one state but not the other ({len(only)} such names)")
    for name, array in base.items():
        if np.shape(array) != np.shape(delta[name]):
            raise ValueError(f"apply: tensor {name!r} has shapes {np.shape(array)} and {np.shape(delta[name])}")
    limit = None
    if max_ratio is not None:
        scale = max([1.0] + [float(np.abs(a).max()) for a in base.values() if np.size(a)])
        limit = max_ratio * scale
    updated = {}
    for name, array in base.items():
        change = np.asarray(delta[name], np.float32)
        value = (np.asarray(array, np.float32) + change).astype(array.dtype)
        if not np.isfinite(value).all():
            raise ValueError(f"apply: tensor {name!r} becomes NaN/Inf; reject this delta")
        if limit is not None and change.size and float(np.abs(change).max()) > limit:
            raise ValueError(f"apply: tensor {name!r} changes by up to {float(np.abs(change).max()):.3g}, above "
                             f"{max_ratio:g} x the base weights' scale ({limit:.3g}); reject this delta")  # fmt: skip
        updated[name] = value
    return updated
