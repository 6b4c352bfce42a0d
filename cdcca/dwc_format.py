"""The DWC payload format and its decoding, in numpy alone (paper Sec. 3.4, Eq. 8): what the cloud writes
(:mod:`cdcca.dwc`, which encodes with torch and bitsandbytes) and what every receiver reads, the torch decode
and the torch-free robot (:mod:`cdcca.edge.np_delta`, issue 19) alike. One reader, so the two cannot drift.

Container: safetensors bytes (never pickle; the format of huggingface/safetensors' README: an 8-byte
little-endian header size, a JSON header, the raw data) of flat 1-D streams, optionally in one zstd frame (RFC
8878) that declares its content size, compressed against :data:`CONTAINER_DICTIONARY` (a raw-content
dictionary of what DWC headers spell out; decoding always loads it, and frames written without it decode the
same). The string metadata has one key, ``cdcca-dwc``, whose JSON value holds
``codec``, ``version``, ``params`` (the knobs the decoder needs) and ``layout``: either ``[[name, shape, kind],
...]`` in the delta's order, or by reference ``{"sha256": layout_fingerprint, "kinds": [...]}`` for a receiver
that knows its trainable set. Kind ``zero`` marks a tensor decoded as zeros from no data. (One key, because
safetensors writes several in random order and equal deltas should give equal bytes.)

Decoding is a trust boundary: malformed bytes raise :class:`CodecError` and nothing else. Every stream is checked
against the layout; a self-consistent forgery is what the envelope's SHA-256 and signature catch. A receiver
passes its own trainable set (``decode(payload, codec, reference, strict=True)``): the payload must then carry
exactly those names and shapes, and may inflate to no more than :func:`container_limit` of them, both checked
before anything is inflated or allocated (the fixed caps below only bound a decode without a reference).

Each codec's numpy decoder registers itself in :data:`DECODERS` (:func:`register`) and documents its streams.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import zstandard
from safetensors.numpy import load as load_safetensors

from cdcca import entropy
from cdcca.errors import CdccaError

FORMAT = "cdcca-dwc"  # the metadata key
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_ELEMENTS = 1 << 28  # refuse payloads that claim more than 256 M values (1 GiB as float32)
MAX_CONTAINER_BYTES = 1 << 31  # refuse zstd frames that claim to inflate beyond 2 GiB
MAX_DELTA_RATIO = 10.0  # Eq. 8 refuses |Δ| above this many times the base's largest |θ| (at least 1.0)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024)  # bitsandbytes' CPU kernel is exact up to 1024
# The 16 NF4 levels, quantiles of N(0, 1) (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs",
# NeurIPS 2023, App. E) as bitsandbytes' get_4bit_type("nf4") lists them in float32.
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip
ECSQ_MAX_SYMBOL = 127  # largest |symbol| of the ecsq and ecdq codecs
ECDQ_CONTEXTS = 2  # ecdq codes its symbols in this many classes of |dither|


# What every DWC header spells out (safetensors' keys, this format's, each codec's params and stream names, the
# trainable sets' name fragments), as a raw-content zstd dictionary (RFC 8878 Sec. 5): a small payload's header
# then costs its values, not its keys (about 220 of a 2.4 kB subspace payload on the tiny student). Part of the
# wire format: frames written with it decode only with these exact bytes, so it is never edited, only replaced
# by a new format version.
_DICTIONARY_TEXT = "".join([
    '{"__metadata__":{"cdcca-dwc":"{\\"codec\\":\\"fp16\\",\\"version\\":1,\\"params\\":{\\"blocksize\\":64,',
    '\\"granularity\\":\\"tensor\\"},\\"layout\\":[[\\"query_tokens\\",[1,32,64],\\"nf4\\"],[\\"',
    'language_model.model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight\\",[8,64],\\"sign\\"],[\\"',
    'language_model.model.decoder.layers.1.self_attn.v_proj.lora_B.default.weight\\",[64,8],\\"zero\\"],[\\"',
    'qformer.encoder.layer.0.attention.attention.query.bias\\",[64],\\"fp16\\"],[\\"',
    'qformer.encoder.layer.0.attention.output.dense.bias\\",[64],\\"fp16\\"],[\\"',
    'language_model.model.decoder.layers.1.self_attn_layer_norm.weight\\",[64],\\"fp16\\"]]}"},',
    '"0.absmax":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"0.codes":{"dtype":"U8","shape":[128],',
    '"data_offsets":[16,144]},"0":{"dtype":"F16","shape":[256],"data_offsets":[0,512]},"mask":{"dtype":"U8",',
    '"shape":[32],"data_offsets":[4,36]},"signs":{"dtype":"U8","shape":[5],"data_offsets":[36,41]},',
    '"magnitudes":{"dtype":"U8","shape":[81],"data_offsets":[35,116]},"offsets":{"dtype":"U8","shape":[2],',
    '"data_offsets":[116,118]},"c0":{"dtype":"U8","shape":[43],"data_offsets":[4,47]},"c1":{"dtype":"U8",',
    '"shape":[48],"data_offsets":[47,95]},"extra":{"dtype":"U8","shape":[32],"data_offsets":[95,127]},',
    '{"__metadata__":{"cdcca-dwc":"{\\"codec\\":\\"ecdq\\",\\"version\\":1,\\"params\\":{\\"step\\":1.0,',
    '\\"seed\\":0},\\"layout\\":{\\"sha256\\":\\"0123456789abcdef\\",\\"kinds\\":[\\"ecsq\\",\\"ecdq\\",',
    '\\"sign\\",\\"zero\\"]}}"},"scales":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"steps":{"dtype":"U16",',
    '"shape":[2],"data_offsets":[0,4]},',
    '{"__metadata__":{"cdcca-dwc":"{\\"codec\\":\\"subspace\\",\\"version\\":1,\\"params\\":{\\"fold\\":8,',
    '\\"chunk\\":1024,\\"basis_seed\\":0,\\"step\\":0.5,\\"seed\\":0,\\"coder\\":\\"rans\\",',
    '\\"step_base\\":-32,\\"tables\\":0},\\"layout\\":{\\"sha256\\":\\"0\\",\\"kinds\\":[',
    '\\"subspace\\",' * 32, '\\"subspace\\"]}}"},"scales":{"dtype":"U8","shape":[82],"data_offsets":[0,82]},',
    '"steps":{"dtype":"U8","shape":[82],"data_offsets":[82,164]},"symbols":{"dtype":"U8","shape":[1848],',
    '"data_offsets":[164,2012]}}',
])
CONTAINER_DICTIONARY = zstandard.ZstdCompressionDict(_DICTIONARY_TEXT.encode(),
                                                     dict_type=zstandard.DICT_TYPE_RAWCONTENT)  # fmt: skip


class CodecError(CdccaError, ValueError):
    """A delta cannot be encoded, or a payload cannot be decoded (truncated, corrupt, another codec's, shapes
    inconsistent with the data, NaN/Inf, a codec without a decoder here). A robot rejects such a delta, keeps its
    adapter and reports it."""


class Entry(NamedTuple):
    """One tensor of a payload's layout."""

    index: int  # position in the layout
    name: str
    shape: tuple[int, ...]
    kind: str  # "zero" (no data) or one of the codec's kinds
    numel: int


StreamDecoder = Callable[[list[Entry], dict[str, np.ndarray], dict[str, Any]], dict[int, np.ndarray]]


@dataclass(frozen=True)
class NumpyDecoder:
    """A codec's numpy decoder.

    Args:
        kinds: layout kinds the codec writes besides ``zero``.
        decode_streams: (non-zero entries, streams, params) -> flat float32 values by layout index.
    """

    kinds: tuple[str, ...]
    decode_streams: StreamDecoder


DECODERS: dict[str, NumpyDecoder] = {}


def register(name: str, kinds: tuple[str, ...]) -> Callable[[StreamDecoder], StreamDecoder]:
    """Decorator: ``decode_streams`` becomes the numpy decoder of codec ``name``."""

    def add(decode_streams: StreamDecoder) -> StreamDecoder:
        DECODERS[name] = NumpyDecoder(kinds, decode_streams)
        return decode_streams

    return add


# ------------------------------------------------------------------------------------------------ container
def unwrap(payload: bytes, limit: int = MAX_CONTAINER_BYTES) -> bytes:
    """The safetensors bytes inside ``payload``, inflating its zstd frame if it has one; CodecError beyond
    ``limit`` bytes (checked on the frame's declared size, before inflating)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"a payload is bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if payload[:4] != ZSTD_MAGIC:
        if len(payload) > limit:
            raise CodecError(f"payload of {len(payload)} bytes; the receiver's trainable set needs at most {limit}")
        return payload
    size = zstandard.frame_content_size(payload)
    if not 0 <= size <= limit:
        raise CodecError(f"zstd frame declares {size} bytes (unknown or above the receiver's limit of {limit})")
    return zstandard.ZstdDecompressor(dict_data=CONTAINER_DICTIONARY).decompress(payload, max_output_size=size)


def container_limit(reference: Mapping[str, Any]) -> int:
    """The most bytes a DWC container of the trainable set ``reference`` (name -> shape) can need: 8 per value
    (every codec sends fewer), room for each name in the header and the layout, and a fixed allowance."""
    return 65536 + sum(8 * math.prod(shape) + 512 + 8 * len(name) for name, shape in reference.items())


def layout_fingerprint(shapes: Mapping[str, Any]) -> str:
    """SHA-256 of the ordered (name, shape) list: what a by-reference payload sends instead of the names."""
    listing = [[name, [int(d) for d in shape]] for name, shape in shapes.items()]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def read_metadata(container: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (safetensors' own loader does not return it)."""
    header_size = int.from_bytes(container[:8], "little") if len(container) >= 8 else -1
    if not 0 < header_size <= len(container) - 8:
        raise CodecError(f"not a safetensors container ({len(container)} bytes, header size {header_size})")
    metadata = json.loads(container[8 : 8 + header_size]).get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(FORMAT), str):
        raise CodecError(f"safetensors metadata has no {FORMAT!r} key; this is not a DWC payload")
    return metadata


def read_header(container: bytes) -> dict[str, Any]:
    """The DWC header (``codec``, ``version``, ``params``, ``layout``) of a container of this :data:`VERSION`."""
    header = json.loads(read_metadata(container)[FORMAT])
    if not isinstance(header, dict):
        raise CodecError(f"the {FORMAT!r} metadata is not a JSON object")
    if header.get("version") != VERSION or type(header["version"]) is not int:
        raise CodecError(f"payload is {FORMAT} version {header.get('version')!r}; this decoder reads {VERSION}")
    return header


def parse_layout(raw: Any, kinds: tuple[str, ...]) -> list[Entry]:
    """The entries of an embedded layout, each checked (name, shape, kind), at most :data:`MAX_ELEMENTS` values."""
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
        if total > MAX_ELEMENTS:
            raise CodecError(f"layout claims more than {MAX_ELEMENTS} values")
    return entries


def _resolve_layout(layout: Any, reference: Mapping[str, Any] | None) -> Any:
    """An embedded layout as is; a by-reference one rebuilt from the receiver's trainable set it fingerprints."""
    if not isinstance(layout, dict):
        return layout
    if reference is None:
        raise CodecError("payload carries its layout by fingerprint; decode needs the receiver's layout")
    kinds = layout.get("kinds")
    if layout.get("sha256") != layout_fingerprint(reference):
        raise CodecError("layout fingerprint does not match the receiver's trainable set")
    if not isinstance(kinds, list) or len(kinds) != len(reference):
        raise CodecError("layout 'kinds' must list one kind per tensor of the reference")
    return [[name, [int(d) for d in shape], kind] for (name, shape), kind in zip(reference.items(), kinds)]


def check_reference(entries: list[Entry], reference: Mapping[str, Any]) -> None:
    """A payload decoded strictly carries exactly the receiver's tensors, in names and shapes."""
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


def inflate(streams: dict[str, np.ndarray], key: str, size: int) -> np.ndarray:
    """Stream ``key``: one zstd frame that must inflate to exactly ``size`` bytes (checked before inflating)."""
    frame = take(streams, key, np.uint8, None).tobytes()
    if zstandard.frame_content_size(frame) != size:
        raise CodecError(f"stream {key!r} should inflate to {size} bytes")
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(frame, max_output_size=size), np.uint8)


# ------------------------------------------------------------------------------------------------- decode
def payload_codec(payload: bytes) -> str:
    """The codec name a payload's header declares (CodecError if it is not a DWC payload)."""
    try:
        codec = read_header(unwrap(payload)).get("codec")
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

    ``codec`` is the name the sender announces; the payload's header must say the same. ``reference`` (name ->
    shape, in order: the receiver's trainable set) is required for payloads that carry their layout by
    fingerprint. With ``strict`` the payload must carry exactly the reference's names and shapes and fit its
    :func:`container_limit`, both checked before anything is inflated or allocated.
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
    container = unwrap(payload, container_limit(reference) if strict else MAX_CONTAINER_BYTES)
    header = read_header(container)
    if header.get("codec") != codec:
        raise CodecError(f"payload was encoded by codec {header.get('codec')!r}, not {codec!r}")
    entries = parse_layout(_resolve_layout(header.get("layout"), reference), decoder.kinds)
    if strict:
        check_reference(entries, reference)
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


# ------------------------------------------------------------------------------------------------- codecs
@register("fp16", kinds=("fp16",))
def _fp16(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Stream ``"<i>"``: float16 (numel,) per non-zero tensor i, widened to float32."""
    return {e.index: take(streams, str(e.index), np.float16, e.numel).astype(np.float32) for e in entries}


def _nf4(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Streams ``"<i>.codes"`` uint8 (ceil(numel/2),), two codes per byte, high nibble first, as
    ``bitsandbytes.functional.quantize_4bit`` stores them, and ``"<i>.absmax"`` float32 (ceil(padded/blocksize),);
    a tensor is padded with one zero to even length before quantizing. value = NF4[code] · absmax(block) in
    float32, bit-identical to bitsandbytes' ``dequantize_4bit`` (``tests/test_np_delta.py``). Param ``blocksize``."""
    blocksize = params.get("blocksize")
    if type(blocksize) is not int or blocksize not in NF4_BLOCKSIZES:
        raise CodecError(f"nf4 blocksize {blocksize!r} is not one of {NF4_BLOCKSIZES}")
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


def group_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, int]:
    """(groups, group length) of a tensor for sparse-sign: the whole tensor, or its rows along the last axis."""
    numel = math.prod(shape)
    if granularity == "tensor" or len(shape) < 2 or shape[-1] == 0:
        return 1, numel
    return numel // shape[-1], shape[-1]


def _sparse_sign(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Over the ``sign`` tensors in layout order: ``"mask"`` (uint8, numpy ``packbits``, 1 per sent entry),
    ``"signs"`` (uint8 packed bits, 1 = negative, per sent entry), ``"scales"`` (float32, one per group with a sent
    entry); value = sign · scale of its group (ComPEFT sparsity with BitDelta's scale). Param ``granularity``
    (``tensor`` or ``row``, see :func:`group_shape`)."""
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
        shape = group_shape(entry.shape, granularity)  # (G, L)
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


@register("ecsq", kinds=("ecsq",))
def _ecsq(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Symbols s of a uniform scalar quantizer, value = sign(s) · (|s| − θ) · q per tensor. Over the ``ecsq``
    tensors in layout order, each a zstd frame of uint8: ``"magnitudes"`` (min(|s|, 3), four per byte, lowest bits
    first), ``"signs"`` (numpy ``packbits``, 1 = negative, per non-zero s), ``"extra"`` (|s| − 3 where |s| >= 3);
    plain: ``"steps"`` (float32 q per tensor) and ``"offsets"`` (uint8 per tensor, θ = offset / 510). Param
    ``step``."""
    step = params.get("step")
    if type(step) is not float or not 0.0 < step < 64.0:
        raise CodecError(f"ecsq step {step!r} is not a number in (0, 64)")
    total = sum(entry.numel for entry in entries)
    steps = take(streams, "steps", np.float32, len(entries))
    offsets = take(streams, "offsets", np.uint8, len(entries))
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        raise CodecError("ecsq steps must be finite and > 0")
    quads = inflate(streams, "magnitudes", -(-total // 4))
    magnitude = ((quads[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)[:total]  # (P,)
    nonzero = magnitude != 0
    sent = int(nonzero.sum())
    negative = np.unpackbits(inflate(streams, "signs", -(-sent // 8)), count=sent).astype(bool)
    top = magnitude == 3
    extra = inflate(streams, "extra", int(top.sum()))
    if (extra > ECSQ_MAX_SYMBOL - 3).any():
        raise CodecError(f"stream 'extra' exceeds the largest symbol {ECSQ_MAX_SYMBOL}")
    values = magnitude.astype(np.float32)  # (P,)
    values[top] += extra
    sizes = [entry.numel for entry in entries]
    shrink = np.repeat(offsets.astype(np.float32) / 510, sizes)  # (P,)
    values[nonzero] = np.where(negative, -1.0, 1.0) * (values[nonzero] - shrink[nonzero])
    values *= np.repeat(steps, sizes)  # (P,)
    bounds = np.cumsum([0, *sizes])
    return {entry.index: values[bounds[i] : bounds[i + 1]] for i, entry in enumerate(entries)}


def bfloat16_steps(streams: dict[str, np.ndarray], count: int, codec: str) -> np.ndarray:
    """Stream ``"steps"``: ``count`` uint16, each the high 16 bits of a float32 step (bfloat16) -> float32 steps,
    checked finite and > 0 (the dithered codecs')."""
    steps = (take(streams, "steps", np.uint16, count).astype(np.uint32) << 16).view(np.float32)
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        raise CodecError(f"{codec} steps must be finite and > 0")
    return steps


def ecdq_dither(total: int, seed: int) -> np.ndarray:
    """The ecdq codec's subtractive dither, float64 (total,) uniform in [-1/2, 1/2), shared by both ends.

    Drawn from the PCG64 bit generator's raw 64-bit outputs (stable across numpy versions, unlike
    ``Generator.random``'s conversions): u = (raw >> 11) · 2^-53 − 1/2, exact in float64.
    """
    raw = np.random.PCG64(seed).random_raw(total) if total else np.zeros(0, np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5


def ecdq_contexts(dither: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value: the sign flip (+1 where u >= 0, else −1) and the context, |u| in :data:`ECDQ_CONTEXTS` classes.

    Given the dither, a symbol s = round(x/q + u) leans towards sign(u), the more so the larger |u|: coding
    t = s · flip in the class of |u| moves the rate from H(s) towards H(s | u), which the decoder can exploit.
    Two classes measured best with zstd's Huffman stage on the tiny student (1, 3, 4, 8 cost 1-7 % more).
    """
    flip = np.where(dither >= 0, 1, -1).astype(np.int8)
    context = np.minimum((2 * np.abs(dither) * ECDQ_CONTEXTS).astype(np.int64), ECDQ_CONTEXTS - 1)
    return flip, context


@register("ecdq", kinds=("ecdq",))
def _ecdq(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """Subtractively dithered uniform quantizer: value = (s − u) · q per tensor, u = :func:`ecdq_dither` over the
    ``ecdq`` tensors in layout order. Symbols t = s · flip (:func:`ecdq_contexts`), sorted (stably) by context;
    per context c a zstd frame ``"c<c>"`` of uint8, four 2-bit codes per byte, lowest bits first (0: t = 0, 1:
    t = 1, 2: t = −1, 3: escape); ``"extra"``, a zstd frame of int8, t for each escape (|t| in 2..127) in that
    order; plain ``"steps"``, uint16 per tensor, q = the float32 whose high 16 bits they are (bfloat16). Params
    ``step`` (the encoder's, in RMS units) and ``seed``."""
    step, seed = params.get("step"), params.get("seed")
    if type(step) is not float or not 0.0 < step < 64.0:
        raise CodecError(f"ecdq step {step!r} is not a number in (0, 64)")
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise CodecError(f"ecdq seed {seed!r} is not an int in [0, 2^63)")
    total = sum(entry.numel for entry in entries)
    steps = bfloat16_steps(streams, len(entries), "ecdq")
    dither = ecdq_dither(total, seed)  # (P,)
    flip, context = ecdq_contexts(dither)
    counts = np.bincount(context, minlength=ECDQ_CONTEXTS)
    codes = np.concatenate([
        ((inflate(streams, f"c{c}", -(-int(n) // 4))[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)[:n]
        for c, n in enumerate(counts)
    ])  # (P,) in context order  # fmt: skip
    escape = codes == 3
    extra = inflate(streams, "extra", int(escape.sum())).view(np.int8)
    if (np.abs(extra.astype(np.int16)) < 2).any() or (extra == -128).any():
        raise CodecError(f"stream 'extra' must hold symbols with 2 <= |t| <= {ECSQ_MAX_SYMBOL}")
    symbols = np.array([0, 1, -1, 0], np.int16)[codes]
    symbols[escape] = extra
    ordered = np.empty(total, np.int16)
    ordered[np.argsort(context, kind="stable")] = symbols
    sizes = [entry.numel for entry in entries]
    values = ((ordered * flip - dither) * np.repeat(steps.astype(np.float64), sizes)).astype(np.float32)  # (P,)
    bounds = np.cumsum([0, *sizes])
    return {entry.index: values[bounds[i] : bounds[i + 1]] for i, entry in enumerate(entries)}


# ------------------------------------------------------------------------------------------------- subspace
@lru_cache(maxsize=4096)  # a pure function of two ints, asked for every tensor of every delta and round step
def subspace_chunks(numel: int, chunk: int) -> tuple[int, ...]:
    """The power-of-two chunks, at most ``chunk`` long, a tensor of ``numel`` values splits into, largest first
    (1000 at 1024 -> 512, 256, 128, 64, 32, 8): each gets an exactly orthonormal Hadamard basis."""
    sizes, left = [], numel
    while left:
        size = min(chunk, 1 << (left.bit_length() - 1))
        sizes.append(size)
        left -= size
    return tuple(sizes)


def _hadamard(x: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh-Hadamard transform of each row of ``x`` (rows, m), m a power of two, on a float64 copy:
    sums and differences only, level h = 1, 2, 4, ... in turn, so every platform computes the same bits. The levels
    below 16 run on a transposed copy, where each butterfly is a contiguous run instead of a stride of a few
    values; every level writes into a second buffer instead of saving a copy of one half (2x faster, the same
    bits)."""
    x = np.array(x, np.float64)
    rows, m = x.shape
    small = min(m, 16)
    if small > 1:  # levels h < small act on the rows of the (small, rows · m / small) transpose
        t = np.ascontiguousarray(x.reshape(-1, small).T)
        spare, h = np.empty_like(t), 1
        while h < small:
            a, b = t.reshape(small // (2 * h), 2, h, -1), spare.reshape(small // (2 * h), 2, h, -1)
            np.add(a[:, 0], a[:, 1], out=b[:, 0])
            np.subtract(a[:, 0], a[:, 1], out=b[:, 1])
            t, spare, h = spare, t, 2 * h
        x = np.ascontiguousarray(t.T).reshape(rows, m)
    spare, h = np.empty_like(x), small
    while h < m:
        a, b = x.reshape(rows, m // (2 * h), 2, h), spare.reshape(rows, m // (2 * h), 2, h)
        np.add(a[:, :, 0], a[:, :, 1], out=b[:, :, 0])
        np.subtract(a[:, :, 0], a[:, :, 1], out=b[:, :, 1])
        x, spare, h = spare, x, 2 * h
    return x


@dataclass(frozen=True)
class SubspaceBasis:
    """A seeded random subspace of a trainable set, the ``subspace`` codec's and a codec-aware round's.

    Each tensor (layout position i, ``numel`` values) splits into power-of-two chunks (:func:`subspace_chunks`);
    a chunk of m values gets k = ceil(m / ``fold``) orthonormal directions, the columns S of a randomly signed
    Hadamard matrix, B = diag(d) · H[:, S] / √m: a subsampled randomized Hadamard transform (Ailon and Chazelle,
    "The fast Johnson-Lindenstrauss transform", STOC 2006; the Fastfood projection Li et al. use to train in a
    random subspace, "Measuring the intrinsic dimension of objective landscapes", ICLR 2018). The signs d and the
    subset S come from one PCG64 stream seeded by ``seed``, tensor i's part starting at 2^48·i (raw outputs only,
    stable across numpy versions), so both ends build the same basis from the seed and the layout, and a tensor's
    basis does not depend on the others.

    :meth:`coefficients` is z = Bᵀx and :meth:`expand` is Bz, both O(m log m) per chunk; since BᵀB = I,
    ``coefficients(expand(z)) == z`` (to float64 rounding) and ``expand(coefficients(x))`` is the orthogonal
    projection of x onto the subspace.
    """

    numels: tuple[int, ...]
    fold: int
    chunk: int
    seed: int
    _drawn: dict = field(default_factory=dict, compare=False, repr=False)  # index -> _tensor's draws

    def __post_init__(self) -> None:
        if self.fold < 1 or self.chunk < 1 or self.chunk & (self.chunk - 1):
            raise CodecError(f"subspace fold must be >= 1 and chunk a power of two, got {self.fold}, {self.chunk}")
        if not 0 <= self.seed < 2**63:
            raise CodecError(f"subspace seed {self.seed!r} is not an int in [0, 2^63)")

    def dims(self, index: int) -> int:
        """Coefficients of tensor ``index``."""
        return sum(-(-m // self.fold) for m in subspace_chunks(self.numels[index], self.chunk))

    def _raw(self, index: int) -> np.ndarray:
        """Tensor ``index``'s raw draws (uint64): one PCG64 stream seeded by ``seed``, tensor i's draws starting 2^48
        raw outputs in (``advance``, O(log) and stable); per chunk of m values, m outputs whose low bits are its
        signs, then ⌈m/4⌉ outputs whose 16-bit quarters are its m keys (:meth:`_tensor`)."""
        if index in self._drawn:
            return self._drawn[index]
        generator, position = self._drawn.get("stream", (None, 0))
        start = index << 48
        if generator is None or start < position:
            generator, position = np.random.PCG64(np.random.SeedSequence(self.seed)), 0
        generator.advance(start - position)
        raw = generator.random_raw(sum(m - (-m // 4) for m in subspace_chunks(self.numels[index], self.chunk)))
        self._drawn["stream"] = (generator, start + raw.size)
        self._drawn[index] = raw
        return raw

    def _chunks(self, index: int) -> list[tuple[int, int]]:
        """(m, offset of the chunk's draws in :meth:`_raw`) of each chunk of tensor ``index``."""
        out, at = [], 0
        for m in subspace_chunks(self.numels[index], self.chunk):
            out.append((m, at))
            at += m - (-m // 4)
        return out

    def _draws(self, m: int, raws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(signs (R, m), columns (R, k)) of R chunks of m values from their draws (each m + ⌈m/4⌉ raw outputs): a
        sign is -1.0 where its output's low bit is set, else 1.0; the k = ⌈m/fold⌉ columns are the positions of the
        k smallest keys (ties by position), in increasing order."""
        raw = np.stack(raws)  # (R, m + ⌈m/4⌉)
        signs = 1.0 - 2.0 * (raw[:, :m] & np.uint64(1))
        keys = np.ascontiguousarray(raw[:, m:]).view(np.uint16)[:, :m]
        # key · 2^32 + position orders as (key, position), so its k smallest are those a stable sort of the keys puts
        # first: a partition finds them in O(m) instead of sorting all m
        k = -(-m // self.fold)
        ranked = (keys.astype(np.uint64) << np.uint64(32)) | np.arange(m, dtype=np.uint64)
        smallest = np.partition(ranked, k - 1, axis=1)[:, :k] if k < m else ranked
        columns = np.sort((smallest & np.uint64(0xFFFFFFFF)).astype(np.int64), axis=1)
        return signs, columns

    def _tensor(self, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(signs (m,), columns (k,)) of each chunk of tensor ``index`` (:meth:`_draws`)."""
        raw = self._raw(index)
        out = []
        for m, at in self._chunks(index):
            signs, columns = self._draws(m, [raw[at : at + m - (-m // 4)]])
            out.append((signs[0], columns[0]))
        return out

    def coefficients(self, index: int, values: np.ndarray) -> np.ndarray:
        """z = Bᵀx of tensor ``index``'s flat values (float64 (dims,))."""
        return self.coefficients_many({index: values})[index]

    def expand(self, index: int, z: np.ndarray) -> np.ndarray:
        """x = Bz of tensor ``index`` (float64 (numel,)) from its ``dims(index)`` coefficients."""
        return self.expand_many({index: z})[index]

    def _plan(self, indices) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]], list[tuple]]:
        """How the tensors ``indices`` (sorted) lie in one concatenated vector of values and one of coefficients,
        index -> (start, size) each, and per chunk size m, (signs (R, m), the positions (R, k) of each chunk's
        coefficients in the coefficient vector, its columns (R, k), the positions (R, m) of its values in the value
        vector): each size's R chunks transform as one batch, gathered and scattered by index arrays (kept per set
        of tensors: a subspace round projects the same set at every step)."""
        key = ("plan", tuple(indices))
        if key in self._drawn:
            return self._drawn[key]
        values, coefficients, groups = {}, {}, {}
        value, coefficient = 0, 0
        for index in key[1]:
            values[index], coefficients[index] = (value, self.numels[index]), (coefficient, self.dims(index))
            drawn = self._raw(index)
            for m, at in self._chunks(index):
                groups.setdefault(m, []).append((value, coefficient, drawn[at : at + m - (-m // 4)]))
                value, coefficient = value + m, coefficient - (-m // self.fold)
        batches = []
        for m, chunks in groups.items():
            signs, columns = self._draws(m, [chunk for _, _, chunk in chunks])
            batches.append((signs, np.array([c for _, c, _ in chunks])[:, None] + np.arange(columns.shape[1]), columns,
                            np.array([v for v, _, _ in chunks])[:, None] + np.arange(m)))  # fmt: skip
        self._drawn[key] = plan = (values, coefficients, batches)
        return plan

    def coefficients_many(self, values: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """:meth:`coefficients` of several tensors (index -> flat values), each chunk size's chunks in one batch."""
        flat = {index: np.asarray(v, np.float64).reshape(-1) for index, v in values.items()}
        for index, v in flat.items():
            if v.size != self.numels[index]:
                raise CodecError(f"tensor {index}: {v.size} values, expected {self.numels[index]}")
        spans, dims, batches = self._plan(sorted(flat))
        x = np.concatenate([flat[index] for index in spans]) if spans else np.zeros(0)
        z = np.empty(sum(size for _, size in dims.values()))
        for signs, at, columns, source in batches:
            spectrum = _hadamard(x[source] * signs) / math.sqrt(signs.shape[1])
            z[at] = np.take_along_axis(spectrum, columns, axis=1)
        return {index: z[start : start + size] for index, (start, size) in dims.items()}

    def expand_many(self, coefficients: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """:meth:`expand` of several tensors (index -> coefficients), each chunk size's chunks in one batch."""
        flat = {index: np.asarray(z, np.float64).reshape(-1) for index, z in coefficients.items()}
        for index, z in flat.items():
            if z.size != self.dims(index):
                raise CodecError(f"tensor {index}: {z.size} subspace coefficients, expected {self.dims(index)}")
        spans, dims, batches = self._plan(sorted(flat))
        z = np.concatenate([flat[index] for index in dims]) if dims else np.zeros(0)
        x = np.empty(sum(size for _, size in spans.values()))
        for signs, at, columns, target in batches:
            spread = np.zeros(signs.shape)
            np.put_along_axis(spread, columns, z[at], axis=1)
            x[target] = _hadamard(spread) / math.sqrt(signs.shape[1]) * signs
        return {index: x[start : start + size] for index, (start, size) in spans.items()}


def subspace_params(params: dict[str, Any]) -> tuple[int, int, int]:
    """(fold, chunk, basis seed) of a ``subspace`` header's params, checked."""
    fold, chunk, seed = params.get("fold"), params.get("chunk"), params.get("basis_seed")
    if type(fold) is not int or not 1 <= fold <= 1 << 16:
        raise CodecError(f"subspace fold {fold!r} is not an int in [1, 65536]")
    if type(chunk) is not int or not 1 <= chunk <= 1 << 20 or chunk & (chunk - 1):
        raise CodecError(f"subspace chunk {chunk!r} is not a power of two in [1, 2^20]")
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise CodecError(f"subspace basis_seed {seed!r} is not an int in [0, 2^63)")
    return fold, chunk, seed


# The subspace codec's step per tensor as one byte, q = STEP_MANTISSAS[e % 8] · 2^(step_base + e // 8): an eighth of an
# octave apart (each q within 4.4 % of the encoder's target), decoded with exact operations only.
STEP_MANTISSAS = (1.0, 1.0905077326652577, 1.189207115002721, 1.2968395546510096, 1.4142135623730951,
                  1.5422108254079407, 1.681792830507429, 1.8340080864093424)  # 2^(r/8), as literals  # fmt: skip
SUBSPACE_CODERS = ("zstd", "rans")


def log_steps(codes: np.ndarray, base: int) -> np.ndarray:
    """Steps (float64) of one-byte step codes ``codes`` (uint8) over exponent ``base`` (:data:`STEP_MANTISSAS`)."""
    exponents = base + (codes.astype(np.int64) >> 3)
    return np.ldexp(np.array(STEP_MANTISSAS)[codes & 7], exponents)


@register("subspace", kinds=("subspace",))
def _subspace(entries: list[Entry], streams: dict[str, np.ndarray], params: dict[str, Any]) -> dict[int, np.ndarray]:
    """A delta trained in a seeded random subspace (:class:`SubspaceBasis`): each ``subspace`` tensor's
    coefficients z, subtractively dithered and uniformly quantized, z = (s − u) · q, u = :func:`ecdq_dither` over
    the coefficients in layout order. Each tensor decodes as Bz. Params ``fold``, ``chunk`` and ``basis_seed``
    rebuild B from the layout (a tensor's basis depends on its layout position, not on which others changed);
    ``step`` (the encoder's, in RMS units), ``seed`` and ``coder``:

    - ``rans`` (the default since stop 29): stream ``"symbols"``, uint8 rANS bytes of the symbols s
      (:func:`cdcca.entropy.decode`), each under a Gaussian of its tensor's scale given its dither u; ``"steps"``,
      uint8 per tensor, q by :func:`log_steps` over param ``step_base``; ``"scales"``, uint8 per tensor, the
      scale class of RMS(z)/q (:func:`cdcca.entropy.class_scale`). Param ``tables``: CRC-32 of the Gaussian
      tables the sender used, which the receiver's must match.
    - ``zstd`` (or no ``coder``, payloads before stop 29): ``"symbols"``, one zstd frame of int8 s; ``"steps"``,
      uint16 per tensor, q = the float32 whose high 16 bits they are (bfloat16).
    """
    fold, chunk, basis_seed = subspace_params(params)
    step, seed, coder = params.get("step"), params.get("seed"), params.get("coder", "zstd")
    if type(step) is not float or not 0.0 < step < 64.0:
        raise CodecError(f"subspace step {step!r} is not a number in (0, 64)")
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise CodecError(f"subspace seed {seed!r} is not an int in [0, 2^63)")
    if coder not in SUBSPACE_CODERS:
        raise CodecError(f"subspace coder {coder!r} is not one of {SUBSPACE_CODERS}")
    numels = [0] * (max((entry.index for entry in entries), default=-1) + 1)
    for entry in entries:
        numels[entry.index] = entry.numel
    basis = SubspaceBasis(tuple(numels), fold, chunk, basis_seed)
    dims = [basis.dims(entry.index) for entry in entries]
    dither = ecdq_dither(sum(dims), seed)
    if coder == "zstd":
        steps = bfloat16_steps(streams, len(entries), "subspace").astype(np.float64)
        symbols = inflate(streams, "symbols", sum(dims)).view(np.int8)
        if (symbols == -128).any():
            raise CodecError(f"stream 'symbols' must hold symbols with |s| <= {ECSQ_MAX_SYMBOL}")
    else:
        base, checksum = params.get("step_base"), params.get("tables")
        if type(base) is not int or not -1100 <= base <= 64:  # steps below 2^96: a value overflows no float32
            raise CodecError(f"subspace step_base {base!r} is not an int in [-1100, 64]")
        steps = log_steps(take(streams, "steps", np.uint8, len(entries)), base)
        if not (np.isfinite(steps).all() and (steps > 0).all()):
            raise CodecError("subspace steps must be finite and > 0")
        classes = take(streams, "scales", np.uint8, len(entries))
        if (classes >= entropy.SCALE_CLASSES).any():
            raise CodecError(f"subspace scale classes must be < {entropy.SCALE_CLASSES}")
        scales, bins, model = np.repeat(classes, dims), entropy.dither_bin(dither), entropy.GaussianModel()
        if model.checksum(scales, bins) != checksum:
            raise CodecError("this receiver's Gaussian tables differ from the sender's (param 'tables'); the "
                             "platforms' erfc disagree, so the payload cannot be decoded here")  # fmt: skip
        try:
            symbols = entropy.decode(take(streams, "symbols", np.uint8, None).tobytes(), scales, bins, model)
        except entropy.EntropyError as error:
            raise CodecError(f"subspace symbols: {error}") from error
    z = (symbols - dither) * np.repeat(steps, dims)  # (K,)
    bounds = np.cumsum([0, *dims])
    values = basis.expand_many({entry.index: z[bounds[i] : bounds[i + 1]] for i, entry in enumerate(entries)})
    return {index: array.astype(np.float32) for index, array in values.items()}
