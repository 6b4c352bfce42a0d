"""DWC payloads decoded with numpy on the robot: no torch, no bitsandbytes (issue 19, "a robot without torch").

Reads the container :mod:`cdcca.dwc` writes (safetensors bytes, never pickle, optionally in one zstd frame; one
metadata key ``cdcca-dwc`` with ``codec``, ``version``, ``params`` and ``layout``) and applies Eq. 8 (θ = θ_base
+ Δ) on numpy arrays. The checks of untrusted bytes are those of ``Codec.decode``: every stream against the
layout, sizes checked before anything is inflated or allocated, a strict decode against the receiver's trainable
set, NaN/Inf refused; anything malformed raises :class:`CodecError` and nothing else.

Decoders live in a registry (:data:`DECODERS`, codec name -> :class:`NumpyDecoder`) that a codec adds itself to
with :func:`register`. The decoded values are bit-identical to ``cdcca.dwc``'s (``tests/test_np_delta.py``):

- ``fp16``: float16 streams widened to float32.
- ``nf4`` / ``nf4-zstd``: value = NF4[code] · absmax(block), two codes per byte, high nibble first, as
  ``bitsandbytes.functional.quantize_4bit`` stores them. The 16 NF4 levels are the quantiles of N(0, 1) of
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023, App. E), as bitsandbytes'
  ``get_4bit_type("nf4")`` lists them (float32).
- ``sparse-sign`` / ``sparse-sign-ref``: sent signs times one scale per group (``cdcca.dwc.SparseSignCodec``).
- ``ecsq``: an entropy-coded uniform scalar quantizer (``cdcca.dwc.ECSQCodec``).

The decoders repeat ``cdcca.dwc``'s stream layouts, which that module owns; the tests decode every codec both ways
and compare bits, so a change there that is not made here fails them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import zstandard
from safetensors.numpy import load as load_safetensors

from cdcca.errors import CdccaError

FORMAT = "cdcca-dwc"  # the metadata key and format version cdcca.dwc writes (a test pins them to its own)
VERSION = 1
MAX_DELTA_RATIO = 10.0  # as cdcca.dwc: apply refuses |Δ| above this many times the base's largest |θ| (>= 1.0)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_ELEMENTS = 1 << 28
_MAX_CONTAINER_BYTES = 1 << 31
_NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024)
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip


class CodecError(CdccaError, ValueError):
    """A payload that cannot be decoded (truncated, corrupt, another codec's, inconsistent, NaN/Inf) or a codec
    without a numpy decoder. A robot rejects such a delta, keeps its adapter and reports it."""


class Entry(NamedTuple):
    """One tensor of a payload's layout."""

    index: int  # position in the layout
    name: str
    shape: tuple[int, ...]
    kind: str  # "zero" (no data) or one of the codec's kinds
    numel: int


@dataclass(frozen=True)
class NumpyDecoder:
    """A codec's numpy decoder.

    Args:
        kinds: layout kinds the codec writes besides ``zero``.
        decode_streams: (non-zero entries, streams, params) -> flat float32 values by layout index.
    """

    kinds: tuple[str, ...]
    decode_streams: Callable[[list[Entry], dict[str, np.ndarray], dict[str, Any]], dict[int, np.ndarray]]


DECODERS: dict[str, NumpyDecoder] = {}


def register(name: str, kinds: tuple[str, ...]):
    """Decorator: ``decode_streams`` becomes the numpy decoder of codec ``name``."""

    def add(decode_streams):
        DECODERS[name] = NumpyDecoder(kinds, decode_streams)
        return decode_streams

    return add


# ------------------------------------------------------------------------------------------------ container
def _unwrap(payload: bytes, limit: int) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"a payload is bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if payload[:4] != _ZSTD_MAGIC:
        if len(payload) > limit:
            raise CodecError(f"payload of {len(payload)} bytes; the receiver's trainable set needs at most {limit}")
        return payload
    size = zstandard.frame_content_size(payload)
    if not 0 <= size <= limit:
        raise CodecError(f"zstd frame declares {size} bytes (unknown or above the receiver's limit of {limit})")
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)


def container_limit(reference: Mapping[str, Any]) -> int:
    """The most bytes a container of the trainable set ``reference`` (name -> shape) can need (as cdcca.dwc)."""
    return 65536 + sum(8 * math.prod(shape) + 512 + 8 * len(name) for name, shape in reference.items())


def layout_fingerprint(shapes: Mapping[str, Any]) -> str:
    """SHA-256 of the ordered (name, shape) list: what a by-reference payload sends instead of the names."""
    listing = [[name, [int(d) for d in shape]] for name, shape in shapes.items()]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def _header(container: bytes) -> dict:
    header_size = int.from_bytes(container[:8], "little") if len(container) >= 8 else -1
    if not 0 < header_size <= len(container) - 8:
        raise CodecError(f"not a safetensors container ({len(container)} bytes, header size {header_size})")
    metadata = json.loads(container[8 : 8 + header_size]).get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(FORMAT), str):
        raise CodecError(f"safetensors metadata has no {FORMAT!r} key; this is not a DWC payload")
    header = json.loads(metadata[FORMAT])
    if not isinstance(header, dict):
        raise CodecError(f"the {FORMAT!r} metadata is not a JSON object")
    if header.get("version") != VERSION or type(header["version"]) is not int:
        raise CodecError(f"payload is {FORMAT} version {header.get('version')!r}; this decoder reads {VERSION}")
    return header


def _parse_layout(raw: Any, kinds: tuple[str, ...]) -> list[Entry]:
    if not isinstance(raw, list):
        raise CodecError("the header's 'layout' is missing or not a list")
    entries: list[Entry] = []
    names: set[str] = set()
    total = 0
    for index, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3):
            raise CodecError(f"layout entry {index} is not [name, shape, kind]")
        name, shape, kind = item
        if not isinstance(name, str) or name in names:
            raise CodecError(f"layout entry {index} has a missing or repeated name {name!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)):
            raise CodecError(f"tensor {name!r} has an invalid shape {shape!r}")
        if kind != "zero" and kind not in kinds:
            raise CodecError(f"tensor {name!r} has kind {kind!r}; expected 'zero' or one of {kinds}")
        entries.append(Entry(index, name, tuple(shape), kind, math.prod(shape)))
        names.add(name)
        total += entries[-1].numel
        if total > _MAX_ELEMENTS:
            raise CodecError(f"layout claims more than {_MAX_ELEMENTS} values")
    return entries


def _check_reference(entries: list[Entry], reference: Mapping[str, Any]) -> None:
    names = {entry.name for entry in entries}
    missing, extra = [n for n in reference if n not in names], sorted(names - set(reference))
    if missing or extra:
        raise CodecError(f"payload tensors do not match the receiver's trainable set: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})")  # fmt: skip
    for entry in entries:
        expected = tuple(int(d) for d in reference[entry.name])
        if entry.shape != expected:
            raise CodecError(f"tensor {entry.name!r}: payload shape {list(entry.shape)}, the receiver's is "
                             f"{list(expected)}")  # fmt: skip


def take(streams: dict[str, np.ndarray], key: str, dtype: type, size: int | None) -> np.ndarray:
    """Stream ``key``, checked to be 1-D of ``dtype`` and (if given) ``size`` elements (for decoders)."""
    stream = streams.get(key)
    if stream is None or stream.dtype != dtype or stream.ndim != 1 or (size is not None and stream.size != size):
        found = None if stream is None else f"{stream.dtype}{list(stream.shape)}"
        raise CodecError(f"stream {key!r} should be {np.dtype(dtype)}[{size}], found {found}")
    return stream


def payload_codec(payload: bytes) -> str:
    """The codec name a payload's header declares (CodecError if it is not a DWC payload)."""
    try:
        codec = _header(_unwrap(payload, _MAX_CONTAINER_BYTES)).get("codec")
    except CodecError:
        raise
    except Exception as error:
        raise CodecError(f"malformed payload ({type(error).__name__}: {error})") from error
    if not isinstance(codec, str):
        raise CodecError("the header names no codec")
    return codec


def decode(payload: bytes, codec: str, reference: Mapping[str, Any] | None = None,
           strict: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """The delta in ``payload`` as float32 arrays (original names, order and shapes); CodecError if malformed.

    ``codec`` is the name the envelope announces; the payload's header must say the same. ``reference`` and
    ``strict`` as ``cdcca.dwc.Codec.decode``: the receiver's trainable set (name -> shape), which a strict decode
    must match exactly and whose :func:`container_limit` bounds inflation.
    """
    if codec not in DECODERS:
        raise CodecError(f"codec {codec!r} has no numpy decoder on this robot; it decodes {', '.join(DECODERS)}")
    if strict and reference is None:
        raise CodecError("a strict decode needs the receiver's trainable set as reference")
    try:
        return _decode(payload, codec, reference, strict)
    except CodecError:
        raise
    except Exception as error:  # trust boundary: whatever garbage triggers, callers see one error type
        raise CodecError(f"malformed {codec!r} payload ({type(error).__name__}: {error})") from error


def _decode(payload: bytes, codec: str, reference: Mapping[str, Any] | None, strict: bool) -> dict[str, np.ndarray]:
    decoder = DECODERS[codec]
    container = _unwrap(payload, container_limit(reference) if strict else _MAX_CONTAINER_BYTES)
    header = _header(container)
    if header.get("codec") != codec:
        raise CodecError(f"payload was encoded by codec {header.get('codec')!r}, not {codec!r}")
    layout = header.get("layout")
    if isinstance(layout, dict):  # by reference: the receiver supplies names and shapes
        if reference is None:
            raise CodecError("payload carries its layout by fingerprint; decode needs the receiver's layout")
        kinds = layout.get("kinds")
        if layout.get("sha256") != layout_fingerprint(reference):
            raise CodecError("layout fingerprint does not match the receiver's trainable set")
        if not isinstance(kinds, list) or len(kinds) != len(reference):
            raise CodecError("layout 'kinds' must list one kind per tensor of the reference")
        layout = [[name, [int(d) for d in shape], kind] for (name, shape), kind in zip(reference.items(), kinds)]
    entries = _parse_layout(layout, decoder.kinds)
    if strict:
        _check_reference(entries, reference)
    params = header.get("params")
    if not isinstance(params, dict):
        raise CodecError("the header's 'params' is not an object")
    streams = load_safetensors(container)
    decoded = decoder.decode_streams([e for e in entries if e.kind != "zero"], streams, params)
    delta = {}
    for entry in entries:
        values = decoded[entry.index] if entry.kind != "zero" else np.zeros(entry.numel, np.float32)
        if values.size != entry.numel:
            raise CodecError(f"tensor {entry.name!r}: {values.size} values for shape {list(entry.shape)}")
        if not np.isfinite(values).all():
            raise CodecError(f"tensor {entry.name!r} decodes to NaN/Inf")
        delta[entry.name] = np.array(values, np.float32).reshape(entry.shape)
    return delta


# ------------------------------------------------------------------------------------------------- Eq. 8
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


# ------------------------------------------------------------------------------------------------- codecs
@register("fp16", kinds=("fp16",))
def _fp16(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Stream ``"<i>"``: float16 (numel,) per non-zero tensor i."""
    return {e.index: take(streams, str(e.index), np.float16, e.numel).astype(np.float32) for e in entries}


def _nf4(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Streams ``"<i>.codes"`` uint8 (ceil(numel/2),) and ``"<i>.absmax"`` float32 (ceil(padded/blocksize),); a
    tensor is padded with one zero to even length before quantizing. Param ``blocksize``."""
    blocksize = params.get("blocksize")
    if type(blocksize) is not int or blocksize not in _NF4_BLOCKSIZES:
        raise CodecError(f"nf4 blocksize {blocksize!r} is not one of {_NF4_BLOCKSIZES}")
    decoded = {}
    for entry in entries:
        padded = entry.numel + entry.numel % 2
        codes = take(streams, f"{entry.index}.codes", np.uint8, padded // 2)
        absmax = take(streams, f"{entry.index}.absmax", np.float32, -(-padded // blocksize))
        if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
            raise CodecError(f"tensor {entry.name!r} has a negative or non-finite absmax")
        nibbles = np.stack([codes >> 4, codes & 0x0F], axis=1).reshape(-1)  # (padded,), high nibble first
        scale = np.repeat(absmax, blocksize)[:padded]  # (padded,)
        decoded[entry.index] = (NF4_LEVELS[nibbles] * scale)[: entry.numel]
    return decoded


register("nf4", kinds=("nf4",))(_nf4)
register("nf4-zstd", kinds=("nf4",))(_nf4)


def _group_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, int]:
    """(groups, group length) of a tensor: the whole tensor, or its rows along the last axis."""
    numel = math.prod(shape)
    if granularity == "tensor" or len(shape) < 2 or shape[-1] == 0:
        return 1, numel
    return numel // shape[-1], shape[-1]


def _sparse_sign(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Over the ``sign`` tensors in layout order: ``"mask"`` (packed bits, 1 per sent entry), ``"signs"`` (packed
    bits, 1 = negative, per sent entry), ``"scales"`` (float32, one per group with a sent entry); value = sign ·
    scale of its group (ComPEFT sparsity with BitDelta's scale). Param ``granularity`` (``tensor`` or ``row``)."""
    granularity = params.get("granularity")
    if granularity not in ("tensor", "row"):
        raise CodecError(f"sparse-sign granularity {granularity!r} is not 'tensor' or 'row'")
    total = sum(entry.numel for entry in entries)
    mask = np.unpackbits(take(streams, "mask", np.uint8, -(-total // 8)), count=total).astype(bool)
    sent = int(mask.sum())
    negative = np.unpackbits(take(streams, "signs", np.uint8, -(-sent // 8)), count=sent).astype(bool)
    scales = take(streams, "scales", np.float32, None)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("sparse-sign scales must be finite and >= 0")
    signed = np.zeros(total, np.float32)
    signed[mask] = np.where(negative, -1.0, 1.0)
    decoded, offset, used = {}, 0, 0
    for entry in entries:
        shape = _group_shape(entry.shape, granularity)  # (G, L)
        nonempty = mask[offset : offset + entry.numel].reshape(shape).any(axis=1)  # (G,)
        group_scale = np.zeros(shape[0], np.float32)
        count = int(nonempty.sum())
        if used + count > scales.size:
            raise CodecError(f"stream 'scales' has {scales.size} values; tensor {entry.name!r} needs more")
        group_scale[nonempty] = scales[used : used + count]
        decoded[entry.index] = (signed[offset : offset + entry.numel].reshape(shape) * group_scale[:, None]).ravel()
        offset, used = offset + entry.numel, used + count
    if used != scales.size:
        raise CodecError(f"stream 'scales' has {scales.size} values, the mask calls for {used}")
    return decoded


register("sparse-sign", kinds=("sign",))(_sparse_sign)
register("sparse-sign-ref", kinds=("sign",))(_sparse_sign)


_ECSQ_MAX_SYMBOL = 127


def _inflate(streams: dict[str, np.ndarray], key: str, size: int) -> np.ndarray:
    """Stream ``key``: one zstd frame that must inflate to exactly ``size`` bytes (checked before inflating)."""
    frame = take(streams, key, np.uint8, None).tobytes()
    if zstandard.frame_content_size(frame) != size:
        raise CodecError(f"stream {key!r} should inflate to {size} bytes")
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(frame, max_output_size=size), np.uint8)


@register("ecsq", kinds=("ecsq",))
def _ecsq(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Entropy-coded uniform scalar quantizer (``cdcca.dwc.ECSQCodec``): symbols s, reconstructed as
    sign(s) · (|s| − θ) · q per tensor. Zstd-framed streams ``"magnitudes"`` (min(|s|, 3), four per byte),
    ``"signs"`` (packed bits, 1 = negative, per non-zero s), ``"extra"`` (|s| − 3 where |s| >= 3); plain
    ``"steps"`` (float32 q per tensor) and ``"offsets"`` (uint8, θ = offset / 510). Param ``step``."""
    step = params.get("step")
    if type(step) is not float or not 0.0 < step < 64.0:
        raise CodecError(f"ecsq step {step!r} is not a number in (0, 64)")
    total = sum(entry.numel for entry in entries)
    steps = take(streams, "steps", np.float32, len(entries))
    offsets = take(streams, "offsets", np.uint8, len(entries))
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        raise CodecError("ecsq steps must be finite and > 0")
    quads = _inflate(streams, "magnitudes", -(-total // 4))
    magnitude = ((quads[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)[:total]  # (P,)
    nonzero = magnitude != 0
    sent = int(nonzero.sum())
    negative = np.unpackbits(_inflate(streams, "signs", -(-sent // 8)), count=sent).astype(bool)
    top = magnitude == 3
    extra = _inflate(streams, "extra", int(top.sum()))
    if (extra > _ECSQ_MAX_SYMBOL - 3).any():
        raise CodecError(f"stream 'extra' exceeds the largest symbol {_ECSQ_MAX_SYMBOL}")
    values = magnitude.astype(np.float32)  # (P,)
    values[top] += extra
    sizes = [entry.numel for entry in entries]
    shrink = np.repeat(offsets.astype(np.float32) / 510, sizes)  # (P,)
    values[nonzero] = np.where(negative, -1.0, 1.0) * (values[nonzero] - shrink[nonzero])
    values *= np.repeat(steps, sizes)  # (P,)
    bounds = np.cumsum([0, *sizes])
    return {entry.index: values[bounds[i] : bounds[i + 1]] for i, entry in enumerate(entries)}
