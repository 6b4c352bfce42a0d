"""DWC: dynamic weight compression of what the cloud sends a robot after each round (paper Sec. 3.4).

The cloud computes Δ = θ_updated − θ_base over the trainable set (Eq. 7) and encodes it with a codec; the robot
applies θ = θ_base + decode(payload) (Eq. 8). Codecs, by name (:data:`CODECS`):

- ``fp16``: every changed tensor as float16, the reference (16 bits/param).
- ``nf4``: the paper's choice, 4-bit NormalFloat with one float32 absmax per block (Dettmers et al., "QLoRA:
  Efficient Finetuning of Quantized LLMs", NeurIPS 2023), through ``bitsandbytes`` (4.5 bits/param at 64).
- ``nf4-zstd``: ``nf4`` entropy-coded with zstd (gains where blocks are mostly zero).
- ``sparse-sign``: beyond the paper. Of each tensor (or row) only its largest |Δ| are sent (Yadav et al.,
  "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization",
  2023), as signs times one L2-optimal scale, the mean |Δ| of the sent entries (Liu et al., "BitDelta: Your
  Fine-Tune May Only Be Worth One Bit", 2024); how many per group is a rate-distortion choice under a bit
  budget, negligible groups get none, and zstd entropy-codes the result. Under 1 bit/param on adapter deltas.

Payload: safetensors bytes (never pickle) of flat 1-D streams. Its string metadata has one key, ``cdcca-dwc``,
whose JSON value holds ``codec``, ``version``, ``params`` (the knobs the decoder needs) and ``layout``, a list
``[[name, shape, kind], ...]`` in the delta's order; kind ``zero`` marks a tensor decoded as zeros from no data.
(One key, because safetensors writes several in random order and equal deltas should give equal bytes.)
Entropy-coded codecs wrap those bytes in one zstd frame. Each codec class documents its streams.

Decoding is a trust boundary: malformed bytes raise :class:`CodecError` and nothing else. It checks every
stream against the layout; a self-consistent forgery is what the envelope's SHA-256 and signature catch. A
receiver passes its own trainable set (``decode(payload, reference, strict=True)``): the payload must then carry
exactly those names and shapes, and may inflate to no more than they can need, both checked before anything is
inflated or allocated (the fixed caps below only bound a decode without a reference).

Applying a delta (Eq. 8) bounds its magnitude relative to the base weights (:data:`MAX_DELTA_RATIO`): a signed
delta of finite but absurd values (1e38) is refused instead of silencing the model.

Error feedback comes free with the version chain: compute the next Δ against what the robot actually holds
(θ_base + decode(payload)), not the cloud's unquantized copy, and one round's residual flows into the next.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import zstandard
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cdcca.errors import CdccaError

FORMAT = "cdcca-dwc"
VERSION = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_ELEMENTS = 1 << 28  # refuse payloads that claim more than 256 M values (1 GiB as float32)
_MAX_CONTAINER_BYTES = 1 << 31  # refuse zstd frames that claim to inflate beyond 2 GiB
_NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024)  # bitsandbytes' CPU kernel is exact up to 1024
MAX_DELTA_RATIO = 10.0  # apply_delta refuses |Δ| above this many times the base's largest |θ| (at least 1.0)


class CodecError(CdccaError, ValueError):
    """A delta cannot be encoded, or a payload cannot be decoded (truncated, corrupt, another codec's, shapes
    inconsistent with the data, NaN/Inf). A robot rejects such a delta, keeps its adapter and reports it."""


class _Entry(NamedTuple):
    index: int  # position in the layout
    name: str
    shape: tuple[int, ...]
    kind: str
    numel: int


# ---------------------------------------------------------------------------------------------- Eq. 7 and 8
def _check_matching(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor], what: str) -> None:
    only = sorted(set(left) ^ set(right))
    if only:
        raise ValueError(f"{what}: tensor {only[0]!r} is in one state but not the other ({len(only)} such names)")
    for name, tensor in left.items():
        if tensor.shape != right[name].shape:
            raise ValueError(f"{what}: tensor {name!r} has shapes {tuple(tensor.shape)} and {tuple(right[name].shape)}")


def compute_delta(updated: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eq. 7: Δ = θ_updated − θ_base per tensor (float32 on CPU, in ``base``'s order)."""
    _check_matching(base, updated, "compute_delta")
    for name, tensor in base.items():
        if tensor.dtype != updated[name].dtype:
            raise ValueError(f"compute_delta: tensor {name!r} has dtypes {updated[name].dtype} and {tensor.dtype}")
    return {
        name: updated[name].detach().to("cpu", torch.float32) - tensor.detach().to("cpu", torch.float32)
        for name, tensor in base.items()
    }


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                max_ratio: float | None = MAX_DELTA_RATIO) -> dict[str, torch.Tensor]:  # fmt: skip
    """Eq. 8: θ = θ_base + Δ as new tensors in ``base``'s dtype and device (``base`` is left untouched).

    ValueError (nothing returned) if a value becomes NaN/Inf, or if any |Δ| exceeds ``max_ratio`` times the
    largest |θ_base| of the whole set (at least 1.0, so zero-initialised adapters can still move); ``None``
    disables the magnitude bound.
    """
    _check_matching(base, delta, "apply_delta")
    limit = None
    if max_ratio is not None:
        scale = max([1.0] + [float(t.detach().abs().max()) for t in base.values() if t.numel()])
        limit = max_ratio * scale
    updated = {}
    for name, tensor in base.items():
        change = delta[name].detach().to(tensor.device, torch.float32)
        value = (tensor.detach().float() + change).to(tensor.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"apply_delta: tensor {name!r} becomes NaN/Inf; reject this delta")
        if limit is not None and change.numel() and float(change.abs().max()) > limit:
            raise ValueError(f"apply_delta: tensor {name!r} changes by up to {float(change.abs().max()):.3g}, above "
                             f"{max_ratio:g} x the base weights' scale ({limit:.3g}); reject this delta")  # fmt: skip
        updated[name] = value
    return updated


# ------------------------------------------------------------------------------------------------ container
def _unwrap(payload: bytes, limit: int = _MAX_CONTAINER_BYTES) -> bytes:
    """The safetensors bytes inside ``payload``, inflating its zstd frame if it has one; CodecError beyond
    ``limit`` bytes (checked on the frame's declared size, before inflating)."""
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
    """The most bytes a DWC container of the trainable set ``reference`` (name -> shape) can need: 8 per value
    (every codec sends fewer), room for each name in the header and the layout, and a fixed allowance."""
    return 65536 + sum(8 * math.prod(shape) + 512 + 8 * len(name) for name, shape in reference.items())


def _check_reference(entries: list[_Entry], reference: Mapping[str, Any]) -> None:
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


def _read_metadata(container: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (safetensors' own loader does not return it)."""
    header_size = int.from_bytes(container[:8], "little") if len(container) >= 8 else -1
    if not 0 < header_size <= len(container) - 8:
        raise CodecError(f"not a safetensors container ({len(container)} bytes, header size {header_size})")
    metadata = json.loads(container[8 : 8 + header_size]).get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(FORMAT), str):
        raise CodecError(f"safetensors metadata has no {FORMAT!r} key; this is not a DWC payload")
    return metadata


def _parse_layout(raw: Any, kinds: tuple[str, ...]) -> list[_Entry]:
    if not isinstance(raw, list):
        raise CodecError("the header's 'layout' is missing or not a list")
    entries: list[_Entry] = []
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
        entries.append(_Entry(index, name, tuple(shape), kind, math.prod(shape)))
        names.add(name)
        total += entries[-1].numel
        if total > _MAX_ELEMENTS:
            raise CodecError(f"layout claims more than {_MAX_ELEMENTS} values")
    return entries


def _take(streams: dict[str, np.ndarray], key: str, dtype: type, size: int | None) -> np.ndarray:
    """Stream ``key``, checked to be 1-D of ``dtype`` and (if given) ``size`` elements."""
    stream = streams.get(key)
    if stream is None or stream.dtype != dtype or stream.ndim != 1 or (size is not None and stream.size != size):
        found = None if stream is None else f"{stream.dtype}{list(stream.shape)}"
        raise CodecError(f"stream {key!r} should be {np.dtype(dtype)}[{size}], found {found}")
    return stream


def gradient_importance(params: Mapping[str, torch.nn.Parameter], losses: Iterable[torch.Tensor]) -> dict[str, float]:
    """Per-tensor mean squared gradient over ``losses`` (a diagonal Fisher estimate), for ``Codec.encode``.

    The cloud computes it at the updated parameters on the round's own data: the sensitivity of the loss to
    each tensor, which is what compression error should be measured in.
    """
    totals = {name: 0.0 for name in params}
    count = 0
    for loss in losses:
        for param in params.values():
            param.grad = None
        loss.backward()
        for name, param in params.items():
            if param.grad is not None:
                totals[name] += float(param.grad.detach().pow(2).mean())
        count += 1
    if count == 0:
        raise ValueError("gradient_importance needs at least one loss")
    return {name: total / count for name, total in totals.items()}


def layout_fingerprint(shapes: Mapping[str, Any]) -> str:
    """SHA-256 of the ordered (name, shape) list: what a by-reference payload sends instead of the names."""
    listing = [[name, [int(d) for d in shape]] for name, shape in shapes.items()]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


class Codec(ABC):
    """Turns a delta (name -> tensor) into payload bytes and back; decoded tensors are float32 on CPU.

    Subclasses say what they do to the changed tensors (``_encode_streams``) and back (``_decode_streams``);
    the container, the layout, all-zero tensors and the checks of untrusted bytes live here.
    """

    name: str
    kinds: tuple[str, ...] = ()  # layout kinds this codec writes besides "zero"
    zstd_level: int | None = None  # entropy-code the payload at this zstd level
    layout_by_reference: bool = False  # send a fingerprint of the names and shapes instead of the names

    def encode(self, delta: Mapping[str, torch.Tensor], importance: Mapping[str, float] | None = None) -> bytes:
        """The payload of ``delta``; CodecError (naming the tensor) if a tensor is not finite floats.

        ``importance`` (name -> weight, e.g. the mean squared gradient: a diagonal Fisher estimate) lets a
        codec that allocates bits spend them where errors cost the most; codecs without allocation ignore it.
        """
        names, arrays = [], []
        for name, tensor in delta.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise CodecError(f"delta entry {name!r} must map a str to a floating-point tensor")
            array = tensor.detach().to("cpu", torch.float32).numpy()
            if not np.isfinite(array).all():
                raise CodecError(f"delta tensor {name!r} contains NaN/Inf; refusing to encode it")
            names.append(name)
            arrays.append(array)
        changed = {index: array for index, array in enumerate(arrays) if array.any()}
        weights = None
        if importance is not None:
            missing = [name for name in names if name not in importance]
            if missing or not all(math.isfinite(importance[n]) and importance[n] >= 0 for n in names):
                raise CodecError(f"importance must give a finite weight >= 0 for every tensor; missing {missing[:3]}")
            mean = sum(importance[n] for n in names) / max(1, len(names)) or 1.0
            weights = {i: importance[n] / mean for i, n in enumerate(names)}
        kinds, streams = self._encode_streams(changed, names, weights)
        layout: Any = [
            [name, list(array.shape), kinds.get(i, "zero")] for i, (name, array) in enumerate(zip(names, arrays))
        ]
        if self.layout_by_reference:
            layout = {"sha256": layout_fingerprint({n: a.shape for n, a in zip(names, arrays)}),
                      "kinds": [entry[2] for entry in layout]}  # fmt: skip
        header = {"codec": self.name, "version": VERSION, "params": self._params(), "layout": layout}
        container = save_safetensors(streams, metadata={FORMAT: json.dumps(header, separators=(",", ":"))})
        if self.zstd_level is None:
            return container
        return zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True).compress(container)

    def decode(self, payload: bytes, reference: Mapping[str, Any] | None = None,
               strict: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """The delta in ``payload`` (float32, original names, order and shapes); CodecError if malformed.

        ``reference`` (name -> shape, in order: the receiver's trainable set) is required for payloads that
        carry their layout by fingerprint, and must match that fingerprint. With ``strict`` the payload must
        carry exactly the reference's names and shapes and fit :func:`container_limit` of it, both checked
        before anything is inflated or allocated: what a receiver decoding untrusted bytes passes.
        """
        if strict and reference is None:
            raise CodecError("a strict decode needs the receiver's trainable set as reference")
        try:
            return self._decode(payload, reference, strict)
        except CodecError:
            raise
        except Exception as error:  # trust boundary: whatever garbage triggers, callers see one error type
            raise CodecError(f"malformed {self.name!r} payload ({type(error).__name__}: {error})") from error

    def _decode(self, payload: bytes, reference: Mapping[str, Any] | None, strict: bool) -> dict[str, torch.Tensor]:
        container = _unwrap(payload, container_limit(reference) if strict else _MAX_CONTAINER_BYTES)
        header = json.loads(_read_metadata(container)[FORMAT])
        if not isinstance(header, dict):
            raise CodecError(f"the {FORMAT!r} metadata is not a JSON object")
        if header.get("version") != VERSION or type(header["version"]) is not int:
            raise CodecError(f"payload is {FORMAT} version {header.get('version')!r}; this decoder reads {VERSION}")
        if header.get("codec") != self.name:
            raise CodecError(f"payload was encoded by codec {header.get('codec')!r}, not {self.name!r}")
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
        entries = _parse_layout(layout, self.kinds)
        if strict:
            _check_reference(entries, reference)
        params = header.get("params")
        if not isinstance(params, dict):
            raise CodecError("the header's 'params' is not an object")
        streams = load_safetensors(container)
        decoded = self._decode_streams([e for e in entries if e.kind != "zero"], streams, params)
        delta = {}
        for entry in entries:
            values = decoded[entry.index] if entry.kind != "zero" else np.zeros(entry.numel, np.float32)
            if values.size != entry.numel:
                raise CodecError(f"tensor {entry.name!r}: {values.size} values for shape {list(entry.shape)}")
            if not np.isfinite(values).all():
                raise CodecError(f"tensor {entry.name!r} decodes to NaN/Inf")
            delta[entry.name] = torch.from_numpy(np.array(values, np.float32).reshape(entry.shape))
        return delta

    def _params(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _encode_streams(
        self, changed: dict[int, np.ndarray], names: list[str], weights: dict[int, float] | None = None
    ) -> tuple[dict[int, str], dict[str, np.ndarray]]:
        """Layout kinds of the changed tensors (by layout index; absent = dropped) and the streams to store."""

    @abstractmethod
    def _decode_streams(
        self, entries: list[_Entry], streams: dict[str, np.ndarray], params: dict[str, Any]
    ) -> dict[int, np.ndarray]:
        """Flat float32 values of each non-zero entry, by layout index."""


# ----------------------------------------------------------------------------------------------------- fp16
class Fp16Codec(Codec):
    """Reference codec. Streams: ``"<i>"``, float16 (numel,), for each non-zero tensor i of the layout."""

    name = "fp16"
    kinds = ("fp16",)

    def _encode_streams(self, changed, names, weights=None) -> tuple[dict[int, str], dict[str, np.ndarray]]:
        for index, array in changed.items():
            if np.abs(array).max() > np.finfo(np.float16).max:
                raise CodecError(f"delta tensor {names[index]!r} exceeds the float16 range; use a scaled codec (nf4)")
        return {i: "fp16" for i in changed}, {str(i): a.reshape(-1).astype(np.float16) for i, a in changed.items()}

    def _decode_streams(self, entries, streams, params) -> dict[int, np.ndarray]:
        return {e.index: _take(streams, str(e.index), np.float16, e.numel).astype(np.float32) for e in entries}


# ------------------------------------------------------------------------------------------------------ nf4
@dataclass(frozen=True)
class NF4Config:
    """Knobs of the NF4 codec.

    Args:
        blocksize: values sharing one absmax (QLoRA uses 64); one of 32, 64, 128, 256, 512, 1024.
        zstd_level: zstd level (1-22) to entropy-code the payload with (codec ``nf4-zstd``); None sends it raw.
    """

    blocksize: int = 64
    zstd_level: int | None = None

    def __post_init__(self) -> None:
        if self.blocksize not in _NF4_BLOCKSIZES:
            raise ValueError(f"NF4Config.blocksize must be one of {_NF4_BLOCKSIZES}, got {self.blocksize}")
        if self.zstd_level is not None and not 1 <= self.zstd_level <= 22:
            raise ValueError(f"NF4Config.zstd_level must be None or in 1..22, got {self.zstd_level}")


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        raise CodecError("the nf4 codecs need bitsandbytes: pip install 'bitsandbytes>=0.50'") from error
    return bnb_functional


class NF4Codec(Codec):
    """The paper's codec, NF4 (QLoRA) via ``bitsandbytes.functional.quantize_4bit``/``dequantize_4bit``.

    Each changed tensor is flattened, padded with one zero to even length, and quantized blockwise: value ≈
    absmax(block) · NF4[code]. Streams for tensor i: ``"<i>.codes"``, uint8 (ceil(numel/2),), two 4-bit codes
    per byte, high nibble first; ``"<i>.absmax"``, float32 (ceil(numel/blocksize),). Params: ``blocksize``.
    """

    kinds = ("nf4",)

    def __init__(self, config: NF4Config = NF4Config()) -> None:
        self.config = config
        self.name = "nf4" if config.zstd_level is None else "nf4-zstd"
        self.zstd_level = config.zstd_level

    def _params(self) -> dict[str, Any]:
        return {"blocksize": self.config.blocksize}

    def _encode_streams(self, changed, names, weights=None) -> tuple[dict[int, str], dict[str, np.ndarray]]:
        bnb = _bitsandbytes()
        streams = {}
        for index, array in changed.items():
            flat = np.pad(array.reshape(-1), (0, array.size % 2))  # even length keeps bnb on its native CPU kernel
            codes, state = bnb.quantize_4bit(torch.from_numpy(flat), blocksize=self.config.blocksize, quant_type="nf4")
            streams[f"{index}.codes"] = codes.reshape(-1).numpy()
            streams[f"{index}.absmax"] = state.absmax.float().numpy()
        return {i: "nf4" for i in changed}, streams

    def _decode_streams(self, entries, streams, params) -> dict[int, np.ndarray]:
        blocksize = params.get("blocksize")
        if type(blocksize) is not int or blocksize not in _NF4_BLOCKSIZES:
            raise CodecError(f"nf4 blocksize {blocksize!r} is not one of {_NF4_BLOCKSIZES}")
        bnb = _bitsandbytes()
        codebook = bnb.get_4bit_type("nf4", device="cpu")  # (16,)
        decoded = {}
        for entry in entries:
            padded = entry.numel + entry.numel % 2
            codes = _take(streams, f"{entry.index}.codes", np.uint8, padded // 2)
            absmax = _take(streams, f"{entry.index}.absmax", np.float32, -(-padded // blocksize))
            if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
                raise CodecError(f"tensor {entry.name!r} has a negative or non-finite absmax")
            state = bnb.QuantState(
                absmax=torch.from_numpy(absmax.copy()),
                shape=torch.Size([padded]),
                code=codebook,
                blocksize=blocksize,
                quant_type="nf4",
                dtype=torch.float32,
            )
            values = bnb.dequantize_4bit(torch.from_numpy(codes.copy()).reshape(-1, 1), state, quant_type="nf4")
            decoded[entry.index] = values.reshape(-1)[: entry.numel].numpy()
        return decoded


# ---------------------------------------------------------------------------------------------- sparse-sign
@dataclass(frozen=True)
class SparseSignConfig:
    """Knobs of the sparse-sign codec.

    Args:
        bits_per_value: budget of modelled data bits (mask entropy + signs + 32 per scale) per changed value,
            > 0; the container and the layout come on top. A budget above what the error-optimal choice
            needs is not spent.
        granularity: a group is a whole tensor (``tensor``: one scale each, as BitDelta) or one row along the
            last axis (``row``: finer scales, 32 bits per row).
        zstd_level: zstd level (1-22) of the entropy coding.
        layout_by_reference: send a SHA-256 of the names and shapes instead of them (codec ``sparse-sign-ref``);
            the receiver passes its trainable set to ``decode``.
    """

    bits_per_value: float = 0.8
    granularity: Literal["tensor", "row"] = "tensor"
    zstd_level: int = 19
    layout_by_reference: bool = False

    def __post_init__(self) -> None:
        if not self.bits_per_value > 0.0 or math.isinf(self.bits_per_value):
            raise ValueError(f"SparseSignConfig.bits_per_value must be a finite number > 0, got {self.bits_per_value}")
        if self.granularity not in ("tensor", "row"):
            raise ValueError(f"SparseSignConfig.granularity must be 'tensor' or 'row', got {self.granularity!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"SparseSignConfig.zstd_level must be in 1..22, got {self.zstd_level}")


def _group_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, int]:
    """(groups, group length) of a tensor: the whole tensor, or its rows along the last axis."""
    numel = math.prod(shape)
    if granularity == "tensor" or len(shape) < 2 or shape[-1] == 0:
        return 1, numel
    return numel // shape[-1], shape[-1]


class _Groups(NamedTuple):
    """A changed tensor cut into groups, with what sending the k largest |Δ| of a group removes and costs."""

    index: int  # position in the layout
    values: np.ndarray  # (G, L)
    order: np.ndarray  # (G, L) positions in each group, largest |Δ| first
    reduction: np.ndarray  # (G, L+1) squared error removed by sending k = 0..L entries: (Σ top-k |Δ|)² / k
    bits: np.ndarray  # (L+1,) modelled cost of sending k entries: L·H(k/L) mask + k signs + 32 scale; 0 for k=0


def _rate_distortion(index: int, array: np.ndarray, granularity: str) -> _Groups:
    values = array.reshape(_group_shape(array.shape, granularity))  # (G, L)
    length = values.shape[1]
    magnitude = np.abs(values)
    order = np.argsort(-magnitude, axis=1, kind="stable")  # (G, L)
    top_sums = np.cumsum(np.take_along_axis(magnitude, order, axis=1), axis=1, dtype=np.float64)  # (G, L)
    k = np.arange(1, length + 1)
    p = k / length
    mask_entropy = -(p * np.log2(p) + (1 - p) * np.log2(np.where(p < 1, 1 - p, 1)))  # (L,) bits per mask bit
    reduction = np.pad(top_sums**2 / k, ((0, 0), (1, 0)))  # (G, L+1)
    return _Groups(index, values, order, reduction, np.pad(length * mask_entropy + k + 32, (1, 0)))


def _allocate(groups: list[_Groups], budget: float) -> list[np.ndarray]:
    """k per group, (G,) per tensor, maximising Σ reduction − λ·bits for the smallest λ >= 0 that fits ``budget``."""

    def choose(lam: float) -> list[np.ndarray]:
        return [np.argmax(g.reduction - lam * g.bits, axis=1) for g in groups]

    def cost(ks: list[np.ndarray]) -> float:
        return sum(float(g.bits[k].sum()) for g, k in zip(groups, ks))

    if cost(ks := choose(0.0)) <= budget:
        return ks
    low, high = 0.0, max(float(g.reduction.max()) for g in groups) / 32  # at `high` every k >= 1 (> 32 bits) loses
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if cost(choose(middle)) <= budget else (middle, high)
    return choose(high)


class SparseSignCodec(Codec):
    """Beyond the paper: sparse signs with one L2-optimal scale per group (ComPEFT + BitDelta), then zstd.

    Sending the k largest |Δ| of a group of length L as sign · s, with s their mean |Δ| (the L2-optimal scale),
    removes (Σ_top-k |Δ|)² / k of the group's squared error and costs about L·H(k/L) + k + 32 bits (mask
    entropy, signs, scale). Each group takes the k (0 = not sent) that maximises reduction − λ·bits, with λ
    bisected so the total fits ``bits_per_value``: flat (Adam-like) groups go dense, heavy-tailed ones sparse,
    negligible ones are dropped. Streams, over the ``sign`` tensors in layout order: ``"mask"``, uint8 packed
    bits (numpy ``packbits``), 1 per sent entry; ``"signs"``, uint8 packed bits, 1 = negative, per sent entry;
    ``"scales"``, float32, one per group with a sent entry. Params: ``granularity``.

    With per-tensor ``importance`` (a diagonal Fisher estimate) the removed error is weighted by it, so bits
    go where the loss is sensitive: on the tiny student the Q-Former query tokens (7% of the trainable set)
    alone hold most of the accuracy a uniform allocation loses. ``sparse-sign-ref`` also sends the layout as a
    fingerprint (the robot knows its trainable set): on small adapters the names cost more than the values.
    """

    kinds = ("sign",)

    def __init__(self, config: SparseSignConfig = SparseSignConfig()) -> None:
        self.config = config
        self.zstd_level = config.zstd_level
        self.layout_by_reference = config.layout_by_reference
        self.name = "sparse-sign-ref" if config.layout_by_reference else "sparse-sign"

    def _params(self) -> dict[str, Any]:
        return {"granularity": self.config.granularity}

    def _encode_streams(self, changed, names, weights=None) -> tuple[dict[int, str], dict[str, np.ndarray]]:
        groups = [_rate_distortion(index, array, self.config.granularity) for index, array in changed.items()]
        if weights is not None:  # distortion measured in loss, not in parameter space
            groups = [g._replace(reduction=g.reduction * weights[g.index]) for g in groups]
        ks = _allocate(groups, self.config.bits_per_value * sum(array.size for array in changed.values()))
        kinds, masks, negatives, scales = {}, [], [], []
        for group, k in zip(groups, ks):  # k: (G,)
            if not k.any():
                continue  # dropped: decoded as zero
            sent = np.zeros(group.values.shape, bool)  # (G, L)
            np.put_along_axis(sent, group.order, np.arange(group.values.shape[1]) < k[:, None], axis=1)
            magnitude_sums = (np.abs(group.values) * sent).sum(axis=1, dtype=np.float64)  # (G,)
            scales.append(magnitude_sums[k > 0] / k[k > 0])  # mean |Δ| of the sent entries: the L2-optimal scale
            masks.append(sent.reshape(-1))
            negatives.append(group.values[sent] < 0)
            kinds[group.index] = "sign"
        streams = {
            "mask": np.packbits(np.concatenate(masks)) if masks else np.zeros(0, np.uint8),
            "signs": np.packbits(np.concatenate(negatives)) if negatives else np.zeros(0, np.uint8),
            "scales": np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32),
        }
        return kinds, streams

    def _decode_streams(self, entries, streams, params) -> dict[int, np.ndarray]:
        granularity = params.get("granularity")
        if granularity not in ("tensor", "row"):
            raise CodecError(f"sparse-sign granularity {granularity!r} is not 'tensor' or 'row'")
        total = sum(entry.numel for entry in entries)
        mask = np.unpackbits(_take(streams, "mask", np.uint8, -(-total // 8)), count=total).astype(bool)
        sent = int(mask.sum())
        negative = np.unpackbits(_take(streams, "signs", np.uint8, -(-sent // 8)), count=sent).astype(bool)
        scales = _take(streams, "scales", np.float32, None)
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


# ------------------------------------------------------------------------------------------------------ ecsq
@dataclass(frozen=True)
class ECSQConfig:
    """Knobs of the entropy-coded scalar quantizer (codec ``ecsq``).

    Args:
        step: quantizer step in units of each tensor's RMS change, > 0; the rate falls as it grows. Measured on
            the tiny student's rounds on three domains (``bench/downlink.md``): 0.5 -> 3.2 bits per parameter,
            0.75 -> 2.7, 1.0 -> 2.3, 1.5 -> 1.75; the accuracy loss pooled over the domains stays within 0.5 points
            up to 0.75 and exceeds it from 1.0 on (1.5: 1.06, worst domain 2.2).
        zstd_level: zstd level (1-22) of the entropy coding.
    """

    step: float = 0.75
    zstd_level: int = 19

    def __post_init__(self) -> None:
        if not 0.0 < self.step < 64.0:
            raise ValueError(f"ECSQConfig.step must be in (0, 64), got {self.step}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"ECSQConfig.zstd_level must be in 1..22, got {self.zstd_level}")


_ECSQ_MAX_SYMBOL = 127  # largest |symbol|; a tensor's step widens so that max |Δ| / step fits
_ECSQ_STREAMS = ("magnitudes", "signs", "extra")  # each one zstd frame inside the container


def _zstd_frame(array: np.ndarray, level: int) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(array.tobytes()),
                         np.uint8)  # fmt: skip


def _inflate(streams: dict[str, np.ndarray], key: str, size: int) -> np.ndarray:
    """Stream ``key``: one zstd frame that must inflate to exactly ``size`` bytes (checked before inflating)."""
    frame = _take(streams, key, np.uint8, None).tobytes()
    if zstandard.frame_content_size(frame) != size:
        raise CodecError(f"stream {key!r} should inflate to {size} bytes")
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(frame, max_output_size=size), np.uint8)


class ECSQCodec(Codec):
    """Beyond the paper: a uniform scalar quantizer per tensor, its symbols entropy-coded, no names on the wire.

    Each changed tensor gets one step q = ``step`` · RMS(Δ) (widened so that max |Δ| / q <= 127) and symbols
    s = round(Δ / q), reconstructed as sign(s) · (|s| − θ) · q with one offset θ ∈ [0, 0.5] per tensor, the
    least-squares fit of the sent values (the reconstruction offset of H.264's deadzone quantizer; Sullivan,
    "Efficient scalar quantization of exponential and Laplacian random variables", IEEE Trans. IT 1996). A
    uniform quantizer followed by an entropy coder is within 0.255 bit of the rate-distortion bound at high
    rate (Gish and Pierce, "Asymptotically efficient quantizing", IEEE Trans. IT 1968); it is how DeepCABAC
    (Wiedemann et al., IEEE JSTSP 2020) codes network weights. Every value keeps its own coarse share of the
    change, unlike top-k sparsification, whose dropped small entries move the function coherently (measured in
    ``bench/downlink.md``).

    The entropy coder is zstd's Huffman stage over symbols packed so that it lands within about 10 % of the symbols'
    order-0 entropy: min(|s|, 3) four to a byte, one sign bit per non-zero symbol, |s| − 3 for the rest.
    Error bound: |decode − Δ| <= q per value. The layout always travels by fingerprint (the robot rebuilds names,
    order and shapes from its own trainable set). Streams, over the ``ecsq`` tensors in layout order, each a zstd
    frame of uint8: ``"magnitudes"`` (2 bits per value), ``"signs"`` (numpy ``packbits``, 1 = negative, per
    non-zero value), ``"extra"`` (|s| − 3 per value with |s| >= 3); plain: ``"steps"``, float32 q per tensor,
    ``"offsets"``, uint8 per tensor, θ = offset / 510. Params: ``step``.
    """

    name = "ecsq"
    kinds = ("ecsq",)
    layout_by_reference = True

    def __init__(self, config: ECSQConfig = ECSQConfig()) -> None:
        self.config = config
        self.zstd_level = config.zstd_level

    def _params(self) -> dict[str, Any]:
        return {"step": float(self.config.step)}

    def _encode_streams(self, changed, names, weights=None) -> tuple[dict[int, str], dict[str, np.ndarray]]:
        kinds, symbols, steps, offsets = {}, [], [], []
        for index, array in changed.items():
            flat = array.reshape(-1).astype(np.float64)
            rms, peak = float(np.sqrt(np.mean(flat**2))), float(np.abs(flat).max())
            step = float(np.float32(max(self.config.step * rms, peak / _ECSQ_MAX_SYMBOL)))
            coded = np.clip(np.rint(flat / step), -_ECSQ_MAX_SYMBOL, _ECSQ_MAX_SYMBOL)  # (numel,)
            sent = coded != 0
            if not sent.any():
                continue  # every value below half a step: decoded as zero
            shrink = float(np.clip(np.mean(np.abs(coded[sent]) - np.abs(flat[sent]) / step), 0.0, 0.5))
            kinds[index] = "ecsq"
            symbols.append(coded.astype(np.int8))
            steps.append(step)
            offsets.append(round(510 * shrink))
        coded = np.concatenate(symbols) if symbols else np.zeros(0, np.int8)
        magnitude = np.abs(coded).astype(np.uint8)
        quads = np.pad(np.minimum(magnitude, 3), (0, (-magnitude.size) % 4)).reshape(-1, 4)  # (ceil(P/4), 4)
        level = self.config.zstd_level
        streams = {
            "magnitudes": _zstd_frame((quads @ np.array([1, 4, 16, 64])).astype(np.uint8), level),
            "signs": _zstd_frame(np.packbits(coded[coded != 0] < 0), level),
            "extra": _zstd_frame(magnitude[magnitude >= 3] - 3, level),
            "steps": np.array(steps, np.float32),
            "offsets": np.array(offsets, np.uint8),
        }
        return kinds, streams

    def _decode_streams(self, entries, streams, params) -> dict[int, np.ndarray]:
        step = params.get("step")
        if type(step) is not float or not 0.0 < step < 64.0:
            raise CodecError(f"ecsq step {step!r} is not a number in (0, 64)")
        total = sum(entry.numel for entry in entries)
        steps = _take(streams, "steps", np.float32, len(entries))
        offsets = _take(streams, "offsets", np.uint8, len(entries))
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
        shrink = np.repeat(offsets.astype(np.float32) / 510, [entry.numel for entry in entries])  # (P,)
        values[nonzero] = np.where(negative, -1.0, 1.0) * (values[nonzero] - shrink[nonzero])
        quantum = np.repeat(steps, [entry.numel for entry in entries])  # (P,)
        values *= quantum
        decoded, begin = {}, 0
        for entry in entries:
            decoded[entry.index] = values[begin : begin + entry.numel]
            begin += entry.numel
        return decoded


# ----------------------------------------------------------------------------------------- registry, stats
CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Fp16Codec(),
        NF4Codec(),
        NF4Codec(NF4Config(zstd_level=19)),
        SparseSignCodec(),
        SparseSignCodec(SparseSignConfig(bits_per_value=0.75, layout_by_reference=True)),
        ECSQCodec(),
    )
}


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``."""
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}")
    return CODECS[name]


def bits_per_param(payload: bytes, delta: Mapping[str, torch.Tensor]) -> float:
    """Payload size in bits (everything: container, layout, data) per value of the trainable set."""
    params = sum(tensor.numel() for tensor in delta.values())
    if params == 0:
        raise ValueError("bits_per_param: the delta has no values")
    return 8 * len(payload) / params


@dataclass(frozen=True)
class DeltaStats:
    """What one codec does to one delta.

    Args:
        codec: codec name.
        num_params: values in the delta.
        payload_bytes: size of the encoded payload.
        bits_per_param: 8 · payload_bytes / num_params.
        relative_error: ‖decode(encode(Δ)) − Δ‖₂ / ‖Δ‖₂ over the whole delta (0 for a zero delta).
        max_abs_error: largest |decode(encode(Δ)) − Δ| of any value.
    """

    codec: str
    num_params: int
    payload_bytes: int
    bits_per_param: float
    relative_error: float
    max_abs_error: float


def measure(codec: Codec, delta: Mapping[str, torch.Tensor]) -> DeltaStats:
    """Encode and decode ``delta`` once; size and reconstruction error."""
    payload = codec.encode(delta)
    bits = bits_per_param(payload, delta)  # ValueError for a delta without values
    decoded = codec.decode(payload)
    original = torch.cat([tensor.detach().float().reshape(-1).cpu() for tensor in delta.values()])  # (P,)
    restored = torch.cat([decoded[name].reshape(-1) for name in delta])  # (P,)
    norm = float(original.norm())
    error = restored - original
    return DeltaStats(
        codec=codec.name,
        num_params=original.numel(),
        payload_bytes=len(payload),
        bits_per_param=bits,
        relative_error=float(error.norm()) / norm if norm > 0 else float(error.norm()),
        max_abs_error=float(error.abs().max()) if error.numel() else 0.0,
    )
