"""A short fingerprint of the base student a weight delta is meant for.

A delta is Δ = θ_updated − θ_base over the trainable set (Eq. 7); it only means something on top of the frozen
weights it was trained against. Two students can have the same trainable set (names and shapes) yet different
frozen weights -- another checkpoint, another preset, a re-pretrained student -- and DWC's checks on names,
shapes and ``num_params`` would let such a delta through. The fingerprint closes that gap: SHA-256 (FIPS 180-4,
via :mod:`hashlib`) over

* the trainable set's names, shapes and dtypes (not its values: they are what the adapter versions change), and
* every frozen parameter's name, shape, dtype and bytes,

in name order, each item length-prefixed so no two inputs share a byte stream. Its first
:data:`FINGERPRINT_CHARS` hex characters travel in ``WeightDelta.base_fingerprint``; a robot whose own
fingerprint differs rejects the delta (:func:`cdcca.envelope.open_envelope`).

No torch import: anything with ``.numpy()`` (a CPU torch tensor), a numpy array, or a torch tensor of a dtype
numpy lacks (bfloat16: hashed as its raw bytes) works. The frozen weights never change while a process runs,
so :func:`student_fingerprint` hashes a model once and caches the result for as long as the model lives.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

FINGERPRINT_CHARS = 16  # 64 bits of SHA-256: a mismatch between two students, not a security boundary
_CONTEXT = b"cdcca base student fingerprint v1\n"  # domain separation, and a version for a future layout
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dtype_name(tensor: Any) -> str:
    """``float32`` for a numpy ``float32`` and for ``torch.float32`` alike, so both hash the same."""
    return str(getattr(tensor, "dtype", "")).removeprefix("torch.")


def _raw_bytes(tensor: Any) -> np.ndarray:
    """The tensor's values as contiguous little-endian bytes (a uint8 view where possible, no copy)."""
    if hasattr(tensor, "detach"):  # torch: view as bytes inside torch, which also covers bfloat16 / float8
        import torch  # only reached with a torch tensor in hand, so torch is already imported

        return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    array = np.ascontiguousarray(tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor))
    return array.reshape(-1).view(np.uint8)


def _text(hasher: Any, value: str) -> None:
    raw = value.encode("utf-8", "surrogatepass")
    hasher.update(struct.pack("<Q", len(raw)))
    hasher.update(raw)


def _describe(hasher: Any, name: str, tensor: Any) -> None:
    shape = tuple(int(n) for n in getattr(tensor, "shape", ()))
    _text(hasher, name)
    _text(hasher, _dtype_name(tensor))
    hasher.update(struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))


def weights_fingerprint(trainable: Mapping[str, Any], frozen: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """The fingerprint (:data:`FINGERPRINT_CHARS` hex characters) of a student given as two name -> tensor maps:
    its trainable set (names, shapes, dtypes) and its frozen weights (also their bytes)."""
    hasher = hashlib.sha256(_CONTEXT)
    hasher.update(struct.pack("<Q", len(trainable)))
    for name in sorted(trainable):
        _describe(hasher, name, trainable[name])
    frozen = dict(frozen)
    hasher.update(struct.pack("<Q", len(frozen)))
    for name in sorted(frozen):
        tensor = frozen[name]
        _describe(hasher, name, tensor)
        data = _raw_bytes(tensor)
        hasher.update(struct.pack("<Q", data.nbytes))
        hasher.update(data)
    return hasher.hexdigest()[:FINGERPRINT_CHARS]


def student_fingerprint(student: Any) -> str:
    """The fingerprint of a student :class:`~cdcca.models.mllm.MLLM` with LoRA injected (as
    :func:`cdcca.models.checkpoint.load_adaptable_student` builds it on the robot and in the cloud): its trainable
    set (:func:`cdcca.models.trainable.trainable_parameters`) and every other parameter of ``student.blip2``.

    Hashed once per model object and cached (a multi-GB student takes seconds to hash; its frozen weights do not
    change). The cloud passes it to :func:`cdcca.envelope.seal` (or ``VersionChain(base_fingerprint=...)``);
    the robot's :class:`~cdcca.edge.adapter_slot.AdapterSlot` compares it with each delta's."""
    try:
        return _CACHE[student]
    except (KeyError, TypeError):
        pass
    from cdcca.models.trainable import trainable_parameters

    trainable = trainable_parameters(student)
    frozen = ((name, p) for name, p in student.blip2.named_parameters() if name not in trainable)
    result = weights_fingerprint(trainable, frozen)
    try:
        _CACHE[student] = result
    except TypeError:  # not weak-referenceable: just not cached
        pass
    return result
