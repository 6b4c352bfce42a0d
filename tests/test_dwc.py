"""DWC (paper Sec. 3.4, Eq. 7-8): round trips, error bounds, sizes, and hostile payloads for every codec."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cdcca.data.digits_shift import load_domain
from cdcca.dwc import (
    CODECS,
    CodecError,
    DeltaStats,
    ECDQCodec,
    ECDQConfig,
    ECSQCodec,
    ECSQConfig,
    NF4Codec,
    NF4Config,
    SparseSignCodec,
    SparseSignConfig,
    SubspaceCodec,
    SubspaceConfig,
    apply_delta,
    bits_per_param,
    compute_delta,
    get_codec,
    measure,
)
from cdcca.dwc_format import CONTAINER_DICTIONARY
from cdcca.errors import CdccaError
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import get_preset
from cdcca.models.trainable import LoraSettings, add_lora, freeze_all_but_trainable

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


EMBEDDED = [name for name in CODECS if not CODECS[name].layout_by_reference]


def _reference(codec, delta):
    """The receiver's layout (name -> shape), which by-reference payloads need to decode."""
    return {name: tuple(t.shape) for name, t in delta.items()} if codec.layout_by_reference else None


# ------------------------------------------------------------------------------------------------- fixtures
@dataclass
class Round:
    """One adaptation round of the ``test`` preset student: its trainable set before and after, and Δ."""

    student: object
    params: dict[str, torch.nn.Parameter]
    base: dict[str, torch.Tensor]
    updated: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    samples: list

    def loss_with(self, weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
            images, prompts = [s.image for s in self.samples], [s.prompt for s in self.samples]
            return float(self.student.loss(images, prompts, [s.target for s in self.samples]))


@pytest.fixture(scope="module")
def trained(tokenizer) -> Round:
    """8 AdamW steps on printed-digit samples, as a cloud round would take (LoRA B starts at zero), on the rank-8
    adapters the bounds below were measured on (the default until stop 32)."""
    torch.manual_seed(0)
    _, student = build_pair(get_preset("test"), tokenizer, seed=0)
    add_lora(student, LoraSettings(rank=8, alpha=16))
    params = freeze_all_but_trainable(student)
    base = {name: param.detach().clone() for name, param in params.items()}
    samples = load_domain("printed", "stream", limit=8)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0)
    student.train()
    for step in range(8):
        batch = [samples[(4 * step + i) % len(samples)] for i in range(4)]
        loss = student.loss([s.image for s in batch], [s.prompt for s in batch], [s.target for s in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
    updated = {name: param.detach().clone() for name, param in params.items()}
    return Round(student, params, base, updated, compute_delta(updated, base), samples[:8])


@pytest.fixture(scope="module")
def adapter_delta() -> dict[str, torch.Tensor]:
    """A seeded Δ with the layout of a real adapter (OPT-125m-sized LM, 12 layers, LoRA r=8 on q/v, biases,
    norms, 32 query tokens: 439 296 values in 169 tensors) and a realistic mix: LoRA B grown from zero with
    per-row scales, small LoRA A changes, Laplace-distributed bias/norm changes, key biases exactly untouched
    (softmax makes their gradient zero) and negligible changes in the first layers' fc1 biases."""
    rng = np.random.default_rng(0)
    hidden, rank = 768, 8
    delta = {"query_tokens": rng.laplace(0, 1e-3, (1, 32, hidden))}
    for layer in range(12):
        prefix = f"language_model.model.decoder.layers.{layer}."
        for proj in ("q_proj", "v_proj"):
            delta[f"{prefix}self_attn.{proj}.lora_A.default.weight"] = rng.normal(0, 1e-4, (rank, hidden))
            row_scale = np.exp(rng.normal(0, 1, (hidden, 1)))
            delta[f"{prefix}self_attn.{proj}.lora_B.default.weight"] = rng.normal(0, 1e-3, (hidden, rank)) * row_scale
        for bias in ("q_proj", "v_proj", "out_proj"):
            delta[f"{prefix}self_attn.{bias}.bias"] = rng.laplace(0, 2e-4, hidden)
        delta[f"{prefix}self_attn.k_proj.bias"] = np.zeros(hidden)
        delta[f"{prefix}fc1.bias"] = rng.laplace(0, 2e-4 if layer >= 4 else 1e-8, 4 * hidden)
        delta[f"{prefix}fc2.bias"] = rng.laplace(0, 2e-4, hidden)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            delta[f"{prefix}{norm}.weight"] = rng.laplace(0, 5e-4, hidden)
            delta[f"{prefix}{norm}.bias"] = rng.laplace(0, 5e-4, hidden)
    return {name: torch.from_numpy(np.asarray(values, np.float32)) for name, values in delta.items()}


def _unpack(payload: bytes) -> tuple[dict, dict[str, np.ndarray], bool]:
    """(DWC header, streams, was zstd-wrapped) of a payload, read independently of cdcca.dwc."""
    compressed = payload[:4] == ZSTD_MAGIC
    unzstd = zstandard.ZstdDecompressor(dict_data=CONTAINER_DICTIONARY)
    container = unzstd.decompress(payload) if compressed else payload
    header_size = int.from_bytes(container[:8], "little")
    metadata = json.loads(container[8 : 8 + header_size])["__metadata__"]
    assert list(metadata) == ["cdcca-dwc"]
    return json.loads(metadata["cdcca-dwc"]), load_safetensors(container), compressed


def _repack(payload: bytes, edit) -> bytes:
    """``payload`` after ``edit(header, streams)`` changed it in place, in the same framing."""
    header, streams, compressed = _unpack(payload)
    streams = {key: value.copy() for key, value in streams.items()}
    edit(header, streams)
    container = save_safetensors(streams, metadata={"cdcca-dwc": json.dumps(header)})
    return zstandard.ZstdCompressor().compress(container) if compressed else container


def _flat(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1) for tensor in delta.values()])  # (P,)


# ------------------------------------------------------------------------------------------ Eq. 7 and Eq. 8
def test_apply_delta_inverts_compute_delta_without_touching_base(trained):
    base_before = {name: tensor.clone() for name, tensor in trained.base.items()}

    restored = apply_delta(trained.base, trained.delta)

    assert list(restored) == list(trained.updated)
    for name, tensor in restored.items():
        torch.testing.assert_close(tensor, trained.updated[name], rtol=0, atol=1e-7)
        assert tensor.data_ptr() != trained.base[name].data_ptr()
        assert torch.equal(trained.base[name], base_before[name])
    assert all(not d.any() for d in compute_delta(trained.base, trained.base).values())


@pytest.mark.parametrize(
    "updated, base, message",
    [
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(1)}, "'b'"),
        ({"a": torch.zeros(2), "c": torch.zeros(1)}, {"a": torch.zeros(2)}, "'c'"),
        ({"a": torch.zeros(3)}, {"a": torch.zeros(2)}, r"'a' has shapes \(2,\) and \(3,\)"),
        ({"a": torch.zeros(2, dtype=torch.float16)}, {"a": torch.zeros(2)}, "'a' has dtypes torch.float16"),
    ],
)
def test_compute_delta_rejects_mismatched_states(updated, base, message):
    with pytest.raises(ValueError, match=message):
        compute_delta(updated, base)


def test_apply_delta_rejects_mismatch_and_overflow():
    base = {"w": torch.ones(2, dtype=torch.float16)}

    with pytest.raises(ValueError, match="'w' has shapes"):
        apply_delta(base, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="'w' becomes NaN/Inf"):
        apply_delta(base, {"w": torch.tensor([0.0, 1e5])})  # finite in float32, inf in float16
    assert apply_delta(base, {"w": torch.tensor([0.5, -1.0])})["w"].tolist() == [1.5, 0.0]


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_round_trip_keeps_names_order_shapes_and_float32(codec_name, trained):
    codec = get_codec(codec_name)

    payload = codec.encode(trained.delta)
    decoded = codec.decode(payload, _reference(codec, trained.delta))

    assert list(decoded) == list(trained.delta)
    assert [tuple(t.shape) for t in decoded.values()] == [tuple(t.shape) for t in trained.delta.values()]
    assert {t.dtype for t in decoded.values()} == {torch.float32}
    assert codec.encode(trained.delta) == payload  # deterministic bytes, so the envelope's SHA-256 is stable
    header, _, compressed = _unpack(payload)
    layout = header["layout"]["kinds"] if codec.layout_by_reference else header["layout"]
    assert (header["codec"], header["version"], len(layout)) == (codec_name, 1, len(trained.delta))
    assert compressed == (codec_name in ("nf4-zstd", "sparse-sign", "sparse-sign-ref", "ecsq", "ecdq", "subspace"))


# Bound on ‖decode(encode(Δ)) − Δ‖₂ / ‖Δ‖₂ for the trained round and the adapter-sized delta. Measured:
# fp16 1.9e-4 / 2.1e-4, nf4 0.094 / 0.114, sparse-sign 0.68 / 0.65 (a sign per sent value, under 1 bit each).
ERROR_BOUNDS = [("fp16", 1e-3, 1e-3), ("nf4", 0.11, 0.13), ("nf4-zstd", 0.11, 0.13), ("sparse-sign", 0.72, 0.70)]


@pytest.mark.parametrize("codec_name, trained_bound, adapter_bound", ERROR_BOUNDS)
def test_relative_error_is_bounded(codec_name, trained_bound, adapter_bound, trained, adapter_delta):
    on_trained = measure(get_codec(codec_name), trained.delta)
    on_adapter = measure(get_codec(codec_name), adapter_delta)

    assert on_trained.relative_error < trained_bound
    assert on_adapter.relative_error < adapter_bound


def test_fp16_error_is_half_an_ulp(trained, adapter_delta):
    for delta in (trained.delta, adapter_delta):
        original = _flat(delta)
        decoded = _flat(CODECS["fp16"].decode(CODECS["fp16"].encode(delta)))

        bound = original.abs() * 2.0**-11 + 2.0**-25  # half a float16 ulp (normal range) or of its subnormal step
        assert bool(((decoded - original).abs() <= bound).all())


@pytest.mark.parametrize("codec_name", ["nf4", "nf4-zstd"])
def test_nf4_error_within_half_the_widest_codebook_gap_times_block_absmax(codec_name, trained, adapter_delta):
    import bitsandbytes.functional as bnb_functional

    codebook = bnb_functional.get_4bit_type("nf4", device="cpu")  # (16,) NormalFloat levels in [-1, 1]
    half_gap = float(torch.diff(codebook).max()) / 2  # nearest-level rounding is off by at most this
    assert half_gap == pytest.approx(0.15190, abs=1e-4)  # the gap between -1 and -0.6962
    for delta in (trained.delta, adapter_delta):
        decoded = CODECS[codec_name].decode(CODECS[codec_name].encode(delta))
        for name, original in delta.items():
            pad = (-original.numel()) % 64
            blocks = torch.nn.functional.pad(original.reshape(-1), (0, pad)).reshape(-1, 64)  # (B, 64)
            errors = torch.nn.functional.pad((decoded[name] - original).reshape(-1), (0, pad)).reshape(-1, 64)
            bound = blocks.abs().amax(dim=1, keepdim=True) * half_gap * (1 + 1e-6)  # (B, 1)
            assert bool((errors.abs() <= bound).all()), name


# Bits per value of the adapter-sized delta, whole payload (container, layout and data). Measured:
# fp16 16.12, nf4 5.07, nf4-zstd 4.05, sparse-sign 0.85 (the layout's names alone cost 0.01 after zstd).
SIZE_BOUNDS = [("fp16", 16.0, 16.2), ("nf4", 4.5, 5.2), ("nf4-zstd", 3.5, 4.3), ("sparse-sign", 0.5, 1.0)]


@pytest.mark.parametrize("codec_name, low, high", SIZE_BOUNDS)
def test_bits_per_param_on_adapter_sized_delta(codec_name, low, high, adapter_delta):
    stats = measure(get_codec(codec_name), adapter_delta)

    assert isinstance(stats, DeltaStats)
    assert stats.num_params == 439_296
    assert low <= stats.bits_per_param <= high
    assert stats.bits_per_param == pytest.approx(8 * stats.payload_bytes / 439_296)


# Share of the round's loss improvement that survives the codec, (L_base − L_decoded) / (L_base − L_updated).
# Measured: fp16 1.000, nf4 1.003, sparse-sign 0.77 since the Q-Former adapters joined the trainable set (0.87
# before; the same 0.8-bit budget now spreads over more tensors), > 0.9 without budget pressure. On the rank-16
# adapters (the default since stop 32) the same round keeps fp16's and nf4's improvement but only 0.22 of it through
# sparse-sign: one more reason that codec is not the default (``bench/downlink.md``).
RETENTION_BOUNDS = [("fp16", 0.99), ("nf4", 0.95), ("nf4-zstd", 0.95), ("sparse-sign", 0.7)]


@pytest.mark.parametrize("codec_name, minimum", RETENTION_BOUNDS)
def test_decoded_delta_keeps_the_rounds_loss_improvement(codec_name, minimum, trained):
    codec = get_codec(codec_name)
    loss_base, loss_updated = trained.loss_with(trained.base), trained.loss_with(trained.updated)

    loss_decoded = trained.loss_with(apply_delta(trained.base, codec.decode(codec.encode(trained.delta))))

    assert loss_updated < loss_base - 0.05
    assert (loss_base - loss_decoded) / (loss_base - loss_updated) > minimum


def test_sparse_sign_without_budget_pressure_keeps_most_of_the_improvement(trained):
    codec = SparseSignCodec(SparseSignConfig(bits_per_value=64.0))
    loss_base, loss_updated = trained.loss_with(trained.base), trained.loss_with(trained.updated)

    loss_decoded = trained.loss_with(apply_delta(trained.base, codec.decode(codec.encode(trained.delta))))

    assert (loss_base - loss_decoded) / (loss_base - loss_updated) > 0.9


def test_sparse_sign_budget_trades_size_for_error(trained):
    budgets = (0.5, 0.8, 64.0)

    stats = [measure(SparseSignCodec(SparseSignConfig(bits_per_value=b)), trained.delta) for b in budgets]

    # measured: 2.34 / 2.78 / 4.11 bits per value (1.9 of them the layout) at errors 0.85 / 0.68 / 0.28
    assert stats[0].payload_bytes < stats[1].payload_bytes < stats[2].payload_bytes
    assert stats[0].relative_error > stats[1].relative_error > stats[2].relative_error
    assert stats[2].relative_error < 0.3


# --------------------------------------------------------------------------------------- pinned payload bytes
def _pinned_delta() -> dict[str, torch.Tensor]:
    """A fixed delta (numpy's PCG64, stable across versions): odd lengths, a zero tensor, a zero row, one
    heavy column, so every codec takes its padding, zero and allocation paths."""
    rng = np.random.default_rng(20261129)
    shapes = {"a": (7,), "b": (3, 5), "c": (64,), "d": (65,), "e": (2, 3, 11), "zero": (4, 4), "g": (129, 3)}
    delta = {name: (0.02 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    delta["zero"][:] = 0.0
    delta["b"][1] = 0.0
    delta["g"][:, 0] *= 40.0
    return {name: torch.from_numpy(values) for name, values in delta.items()}


# SHA-256 of each codec's payload of _pinned_delta(). The committed downlink results (bench/downlink.md) and any
# envelope already signed depend on these bytes: a change here is a wire-format change, not a refactor. (They
# also pin the venv's zstd and bitsandbytes; a new release of either that changes them is a finding too.) Stop 29
# changed every zstd-wrapped codec's bytes on purpose: the container frame is compressed against
# CONTAINER_DICTIONARY (frames written without it decode unchanged: test_frames_without_the_dictionary_decode).
PINNED_PAYLOADS = [
    ("fp16", CODECS["fp16"], None, "56b56d03f6d69a2eac32f475ea419ccd7a847fdef1bc1f4cea76f2baeff79dd4"),
    ("nf4", CODECS["nf4"], None, "e76e99900a71833959576ea1285910821b97af17fe6b0c671ae39d7316fa52f7"),
    ("nf4-zstd", CODECS["nf4-zstd"], None, "bb2f16a612c10b14d84fe5bcfde8d3cd6c0351fdf04fbd73dbbda62aa4eca6c1"),
    ("sparse-sign", CODECS["sparse-sign"], None, "a483e9bb9bf14b024e01122035425864333837352182cdd6a494380e35993a74"),
    ("sparse-sign-ref", CODECS["sparse-sign-ref"], None,
     "61b78f8e2de926093bf97f25c1458953561b314318d6807dfbb881aa68a765b9"),
    ("ecsq", CODECS["ecsq"], None, "8c18b3c38eb887e8bb6d98524c355bb9dee87d51ca563635eab5563a5e23c7c7"),
    ("nf4/32", NF4Codec(NF4Config(blocksize=32)), None,
     "2b3b0f662765bee969aab7b188e478eea67c23727ba140e26d1c7cbc306766f1"),
    ("sparse-sign/row", SparseSignCodec(SparseSignConfig(granularity="row")), None,
     "ff414f4ae92084055feab4d7bfc9e7e593517de4d71d84ae9630a6c986af42de"),
    ("sparse-sign/0.3+importance", SparseSignCodec(SparseSignConfig(bits_per_value=0.3)), {"g": 1e-4},
     "6bf9afba62fd76b3b50ae2f5e2f1a8def8b4a457108a099c1df40f4187ebd2a1"),
    ("ecsq/3.0", ECSQCodec(ECSQConfig(step=3.0)), None,
     "99febd8ec494c5b0cc2aeaf8cd9a0ca5d794cb20a5770211ef2e5b340c107088"),
    ("ecdq/2.0", ECDQCodec(ECDQConfig(step=2.0)), None,
     "9431542f04cb9f431933ee16a6f9c43b71716a2a0a7e86d30599447cf7c6a5bc"),
    ("ecdq/4.0/seed7", ECDQCodec(ECDQConfig(step=4.0, seed=7)), None,
     "c183e41ce00e676ce630796726408df631d1e5f38a46cb58608fd51a3cac9c81"),
    ("subspace/8", SubspaceCodec(SubspaceConfig(fold=8, basis_seed=3, step=0.5)), None,
     "e2d04910400d5ed45d9b2e6cbecf6e069225e94f778785e3db84eaa9ed263c10"),
    ("subspace/4+importance", SubspaceCodec(SubspaceConfig(fold=4, basis_seed=3, step=0.3)), {"g": 9.0},
     "c9e320b5735c91b911e31266ff43eda65ca4bbd9a0d09551ad74f64896cbdc60"),
    ("subspace/zstd", SubspaceCodec(SubspaceConfig(fold=8, basis_seed=3, step=0.5, coder="zstd")), None,
     "144795319df3922499ce9cd5794e4e9230771b6322ebd255dbd6507df748aa4f"),
]  # fmt: skip


@pytest.mark.parametrize("label, codec, importance, sha256", PINNED_PAYLOADS, ids=[p[0] for p in PINNED_PAYLOADS])
def test_payload_bytes_are_pinned(label, codec, importance, sha256):
    delta = _pinned_delta()
    weights = None if importance is None else {name: importance.get(name, 1.0) for name in delta}

    payload = codec.encode(delta, weights)

    assert hashlib.sha256(payload).hexdigest() == sha256, label
    reference = {name: tuple(t.shape) for name, t in delta.items()}
    decoded = codec.decode(payload, reference, strict=True)
    assert [tuple(t.shape) for t in decoded.values()] == list(reference.values()) and not decoded["zero"].any()


# ---------------------------------------------------------------------------------- sparse-sign, by hand
def test_sparse_sign_sends_top_entries_with_l2_optimal_scale_and_drops_negligible_tensors():
    delta = {
        "w": torch.tensor([[3.0, -1.0, 0.5, -4.0]]),
        "negligible": torch.tensor([1e-4, -1e-4]),
        "untouched": torch.zeros(3),
    }
    codec = SparseSignCodec(SparseSignConfig(bits_per_value=7.0))  # 42 bits for 6 changed values

    payload = codec.encode(delta)
    decoded = codec.decode(payload)

    # w: (Σ top-k |Δ|)²/k is 16, 24.5, 21.3, 18.1 for k = 1..4, so 4 and 3 go with scale (4 + 3) / 2 (38 bits);
    # "negligible" would remove 2e-8 of squared error for 34 more bits, over the budget, so it is dropped
    assert decoded["w"].tolist() == [[3.5, 0.0, 0.0, -3.5]]
    assert decoded["negligible"].tolist() == [0.0, 0.0]
    assert decoded["untouched"].tolist() == [0.0, 0.0, 0.0]
    header, streams, _ = _unpack(payload)
    assert header["layout"] == [["w", [1, 4], "sign"], ["negligible", [2], "zero"], ["untouched", [3], "zero"]]
    assert header["params"] == {"granularity": "tensor"}
    assert streams["scales"].tolist() == [3.5]
    assert np.unpackbits(streams["mask"])[:4].tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    "granularity, expected",
    [("row", [[1.0, 1.0], [10.0, -10.0]]), ("tensor", [[0.0, 0.0], [10.0, -10.0]])],
)
def test_sparse_sign_granularity(granularity, expected):
    delta = {"w": torch.tensor([[1.0, 1.0], [10.0, -10.0]])}
    codec = SparseSignCodec(SparseSignConfig(bits_per_value=64.0, granularity=granularity))

    decoded = CODECS["sparse-sign"].decode(codec.encode(delta))  # params travel in the payload

    # one scale per row is exact; one per tensor keeps k=2 (gain 200 beats 147 for k=3 and 121 for k=4)
    assert decoded["w"].tolist() == expected


def test_nf4_blocksize_travels_in_the_payload():
    delta = {"w": torch.linspace(-1, 1, 300)}

    payload = NF4Codec(NF4Config(blocksize=128)).encode(delta)

    _, streams, _ = _unpack(payload)
    assert streams["0.absmax"].shape == (3,) and streams["0.codes"].shape == (150,)
    assert float((CODECS["nf4"].decode(payload)["w"] - delta["w"]).abs().max()) <= 0.1519 * 1.0 + 1e-6


# -------------------------------------------------------------------------------------------- zero deltas
@pytest.mark.parametrize(
    "codec_name, max_bits", [("fp16", 0.3), ("nf4", 0.3), ("nf4-zstd", 0.02), ("sparse-sign", 0.02)]
)
def test_zero_delta_is_only_its_layout(codec_name, max_bits, adapter_delta):
    zero = {name: torch.zeros_like(tensor) for name, tensor in adapter_delta.items()}
    codec = get_codec(codec_name)

    payload = codec.encode(zero)

    assert bits_per_param(payload, zero) < max_bits  # vs 16.02 for fp16 of the real delta
    _, streams, _ = _unpack(payload)
    assert sum(stream.nbytes for stream in streams.values()) == 0
    assert all(not tensor.any() for tensor in codec.decode(payload).values())


# ------------------------------------------------------------------------------------------ hostile bytes
@pytest.mark.parametrize("codec_name", list(CODECS))
@pytest.mark.parametrize("keep", [0.0, 0.001, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_payload_raises_codec_error(codec_name, keep, trained):
    payload = get_codec(codec_name).encode(trained.delta)

    with pytest.raises(CodecError):
        get_codec(codec_name).decode(payload[: int(len(payload) * keep)])


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_random_bytes_and_non_bytes_raise_codec_error(codec_name):
    rng = np.random.default_rng(1)
    codec = get_codec(codec_name)

    for size in (1, 8, 64, 4096):
        with pytest.raises(CodecError):
            codec.decode(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(CodecError):
        codec.decode(ZSTD_MAGIC + rng.integers(0, 256, 60, dtype=np.uint8).tobytes())
    with pytest.raises(CodecError, match="payload is bytes"):
        codec.decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("encoder, decoder", [("fp16", "nf4"), ("nf4", "nf4-zstd"), ("nf4-zstd", "sparse-sign")])
def test_another_codecs_payload_raises_codec_error(encoder, decoder, trained):
    payload = get_codec(encoder).encode(trained.delta)

    with pytest.raises(CodecError, match=f"encoded by codec '{encoder}', not '{decoder}'"):
        get_codec(decoder).decode(payload)


def _double_first_shape(header, streams):
    first = next(entry for entry in header["layout"] if entry[2] != "zero")
    first[1] = [2 * first[1][0]] + first[1][1:]


def _nan_in_first_float_stream(header, streams):
    key = sorted(key for key, value in streams.items() if value.dtype.kind == "f")[0]
    streams[key][0] = np.nan


def _set(key, value):
    def edit(header, streams):
        header[key] = value

    return edit


EDITS = [
    ("shape doubled", _double_first_shape),
    ("NaN value", _nan_in_first_float_stream),
    ("layout not a list", _set("layout", {"a": 1})),
    ("unknown kind", _set("layout", [["w", [2], "gzip"]])),
    ("negative dim", _set("layout", [["w", [-2], "zero"]])),
    ("float dim", _set("layout", [["w", [2.0], "zero"]])),
    ("repeated name", _set("layout", [["w", [2], "zero"], ["w", [2], "zero"]])),
    ("huge zero tensor", _set("layout", [["w", [100000, 100000], "zero"]])),
    ("version 2", _set("version", 2)),
    ("version as text", _set("version", "1")),
    ("params not an object", _set("params", [])),
]


@pytest.mark.parametrize("codec_name", EMBEDDED)
@pytest.mark.parametrize("label, edit", EDITS, ids=[label for label, _ in EDITS])
def test_inconsistent_payload_raises_codec_error(codec_name, label, edit, trained):
    codec = get_codec(codec_name)
    tampered = _repack(codec.encode(trained.delta), edit)

    with pytest.raises(CodecError):
        codec.decode(tampered)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codec_name=st.sampled_from(list(CODECS)), garbage=st.binary(max_size=300))
def test_fuzz_garbage_raises_codec_error(codec_name, garbage):
    with pytest.raises(CodecError):
        get_codec(codec_name).decode(garbage)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codec_name=st.sampled_from(list(CODECS)), data=st.data())
def test_fuzz_mutated_payload_decodes_cleanly_or_raises_codec_error(codec_name, data, trained):
    payload = bytearray(get_codec(codec_name).encode(trained.delta))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))

    try:
        decoded = get_codec(codec_name).decode(bytes(payload))
    except CodecError:
        return
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in decoded.values())


@settings(max_examples=60, deadline=None)
@given(
    codec_name=st.sampled_from(list(CODECS)),
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=4),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_any_delta_round_trips_with_bounded_error(codec_name, shapes, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = {f"t{i}": torch.randn(shape, generator=generator) * scale for i, shape in enumerate(shapes)}

    codec = get_codec(codec_name)
    decoded = codec.decode(codec.encode(delta), _reference(codec, delta))

    assert {n: t.shape for n, t in decoded.items()} == {n: t.shape for n, t in delta.items()}
    original, error = _flat(delta), _flat(decoded) - _flat(delta)  # (P,)
    if codec_name == "fp16":
        assert bool((error.abs() <= original.abs() * 2.0**-11 + 2.0**-25).all())
    elif codec_name.startswith("nf4"):
        assert bool((error.abs() <= 0.1520 * original.abs().max()).all()) if original.numel() else True
    elif codec_name == "ecdq":  # |error| <= q/2 with q = step · RMS per tensor: ‖error‖ <= step/2 · ‖Δ‖
        assert float(error.norm()) <= float(original.norm()) * max(1.0, codec.config.step / 2) * (1 + 1e-5)
    else:
        assert float(error.norm()) <= float(original.norm()) * (1 + 1e-5)  # never worse than sending nothing


# -------------------------------------------------------------------------------------- registry, configs
def test_registry_names_and_unknown_codec_error():
    assert list(CODECS) == ["fp16", "nf4", "nf4-zstd", "sparse-sign", "sparse-sign-ref", "ecsq", "ecdq", "subspace"]
    assert all(get_codec(name).name == name for name in CODECS)

    with pytest.raises(CodecError, match="unknown codec 'zip'; choose one of: fp16, nf4, nf4-zstd, sparse-sign, sp"):
        get_codec("zip")
    assert issubclass(CodecError, CdccaError)


@pytest.mark.parametrize(
    "config, kwargs, field",
    [
        (SparseSignConfig, {"bits_per_value": 0.0}, "bits_per_value"),
        (SparseSignConfig, {"bits_per_value": math.nan}, "bits_per_value"),
        (SparseSignConfig, {"bits_per_value": math.inf}, "bits_per_value"),
        (SparseSignConfig, {"granularity": "column"}, "granularity"),
        (SparseSignConfig, {"zstd_level": 0}, "zstd_level"),
        (NF4Config, {"blocksize": 100}, "blocksize"),
        (NF4Config, {"zstd_level": 23}, "zstd_level"),
    ],
)
def test_config_validation_names_the_field(config, kwargs, field):
    with pytest.raises(ValueError, match=f"{config.__name__}.{field}"):
        config(**kwargs)


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_encode_rejects_non_finite_and_non_float_tensors(codec_name):
    codec = get_codec(codec_name)

    with pytest.raises(CodecError, match="'bad' contains NaN/Inf"):
        codec.encode({"good": torch.ones(2), "bad": torch.tensor([1.0, math.inf])})
    with pytest.raises(CodecError, match="'ids' must map a str to a floating-point tensor"):
        codec.encode({"ids": torch.arange(3)})


def test_fp16_refuses_values_beyond_its_range():
    with pytest.raises(CodecError, match="'big' exceeds the float16 range"):
        CODECS["fp16"].encode({"big": torch.tensor([7e4])})


def test_bits_per_param_counts_the_whole_payload():
    assert bits_per_param(b"x" * 100, {"a": torch.zeros(500), "b": torch.zeros(300)}) == 1.0
    with pytest.raises(ValueError, match="no values"):
        bits_per_param(b"x", {"a": torch.zeros(0)})


def test_by_reference_layout_needs_the_matching_receiver_layout(trained):
    codec = get_codec("sparse-sign-ref")
    payload = codec.encode(trained.delta)
    reference = {name: tuple(t.shape) for name, t in trained.delta.items()}
    assert len(payload) < len(get_codec("sparse-sign").encode(trained.delta))  # names are not sent

    with pytest.raises(CodecError, match="needs the receiver's layout"):
        codec.decode(payload)
    renamed = {f"x.{name}": shape for name, shape in reference.items()}
    with pytest.raises(CodecError, match="fingerprint does not match"):
        codec.decode(payload, renamed)
    assert list(codec.decode(payload, reference)) == list(reference)


def test_importance_moves_bits_to_the_sensitive_tensor():
    generator = torch.Generator().manual_seed(0)
    delta = {"sensitive": torch.randn(64, generator=generator), "bulk": torch.randn(4096, generator=generator)}
    codec = SparseSignCodec(SparseSignConfig(bits_per_value=0.3))
    plain = codec.decode(codec.encode(delta))
    weighted = codec.decode(codec.encode(delta, importance={"sensitive": 1000.0, "bulk": 1.0}))

    def error(decoded, name):
        return float((decoded[name] - delta[name]).norm() / delta[name].norm())

    assert error(weighted, "sensitive") < error(plain, "sensitive")
    assert error(weighted, "sensitive") < 0.7  # the sensitive tensor is sent densely
    with pytest.raises(CodecError, match="importance must give"):
        codec.encode(delta, importance={"sensitive": 1.0})


# ------------------------------------------------------------------------------ issue 15: D7, Build 2 and 6
def _peak_traced_bytes(call) -> tuple[object, int]:
    """(result or the exception raised, peak bytes traced while ``call`` ran: Python and numpy buffers)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = call()
        except Exception as error:  # the caller asserts which one
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _claiming(codec_name: str, shapes: dict[str, list[int]]) -> bytes:
    """A well-formed payload whose layout claims ``shapes``, every tensor as kind ``zero`` (no data at all)."""
    header = {"codec": codec_name, "version": 1, "params": get_codec(codec_name)._params(),
              "layout": [[name, shape, "zero"] for name, shape in shapes.items()]}  # fmt: skip
    container = save_safetensors({}, metadata={"cdcca-dwc": json.dumps(header)})
    return zstandard.ZstdCompressor().compress(container) if get_codec(codec_name).zstd_level else container


REFERENCE = {"q.weight": (8, 4), "q.bias": (8,)}


@pytest.mark.parametrize(("label", "shapes", "match"), [
    ("a 64 MiB zero tensor under a known name", {"q.weight": [4096, 4096], "q.bias": [8]}, "payload shape"),
    ("an extra 64 MiB tensor", {**{k: list(v) for k, v in REFERENCE.items()}, "evil": [4096, 4096]}, "unexpected"),
    ("a missing tensor", {"q.weight": [8, 4]}, "missing"),
])  # fmt: skip
def test_strict_decode_is_bounded_by_the_receivers_trainable_set(label, shapes, match):
    for codec_name in ("fp16", "nf4-zstd"):
        payload = _claiming(codec_name, shapes)
        assert len(payload) < 1024
        error, peak = _peak_traced_bytes(lambda: get_codec(codec_name).decode(payload, REFERENCE, strict=True))
        assert isinstance(error, CodecError) and re.search(match, str(error)), label
        assert peak < 1 << 20, f"{label}: {peak} bytes traced before the rejection"


def test_strict_decode_refuses_a_zstd_frame_beyond_what_the_reference_needs_before_inflating():
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))  # 64 MiB of zeros
    assert len(bomb) < 64 << 10
    codec = get_codec("nf4-zstd")
    error, peak = _peak_traced_bytes(lambda: codec.decode(bomb, REFERENCE, strict=True))
    assert isinstance(error, CodecError) and "above the receiver's limit" in str(error)
    assert peak < 1 << 20
    with pytest.raises(CodecError, match="needs the receiver's trainable set"):
        codec.decode(bomb, strict=True)


def test_strict_decode_of_a_matching_payload_is_unchanged(trained):
    reference = {name: tuple(t.shape) for name, t in trained.delta.items()}
    for codec_name in CODECS:
        payload = get_codec(codec_name).encode(trained.delta)
        strict = get_codec(codec_name).decode(payload, reference, strict=True)
        loose = get_codec(codec_name).decode(payload, reference)
        assert list(strict) == list(reference) and all(torch.equal(strict[k], loose[k]) for k in loose)


def test_apply_delta_bounds_the_change_relative_to_the_base_weights():
    base = {"w": torch.tensor([0.5, -3.0]), "lora_B": torch.zeros(2)}
    # the scale is the base's largest |θ| (3.0): up to 10 x 3.0 may change, zero-initialised tensors included
    assert apply_delta(base, {"w": torch.zeros(2), "lora_B": torch.tensor([29.0, -29.0])})["lora_B"].tolist() == [
        29.0, -29.0]  # fmt: skip
    with pytest.raises(ValueError, match=r"'lora_B' changes by up to 1e\+38, above 10 x the base weights' scale \(30"):
        apply_delta(base, {"w": torch.zeros(2), "lora_B": torch.tensor([1e38, 0.0])})
    with pytest.raises(ValueError, match="'w' changes by up to 31"):
        apply_delta(base, {"w": torch.tensor([31.0, 0.0]), "lora_B": torch.zeros(2)})
    small = {"w": torch.zeros(2)}  # a base below 1.0 still allows changes of 10 x 1.0
    assert apply_delta(small, {"w": torch.tensor([9.5, 0.0])})["w"][0] == 9.5
    assert apply_delta(base, {"w": torch.zeros(2), "lora_B": torch.tensor([1e38, 0.0])}, max_ratio=None)[
        "lora_B"][0] == 1e38  # fmt: skip


@pytest.mark.parametrize("label", ["nf4-zstd", "sparse-sign-ref", "ecdq", "subspace"])
def test_frames_without_the_dictionary_decode(label):
    codec, delta = CODECS[label], _pinned_delta()
    reference = {name: tuple(t.shape) for name, t in delta.items()}
    payload = codec.encode(delta)
    container = zstandard.ZstdDecompressor(dict_data=CONTAINER_DICTIONARY).decompress(payload)
    before = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(container)  # as before stop 29

    old, new = codec.decode(before, reference, strict=True), codec.decode(payload, reference, strict=True)

    assert len(payload) < len(before) - 60  # the dictionary spells the header's keys
    for name in delta:
        assert torch.equal(old[name], new[name]), name
