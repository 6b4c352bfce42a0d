"""The ``ecsq`` codec: error bound per value, rate near the symbols' entropy, no names on the wire, and hostile
payloads rejected with CodecError against the robot's own layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cdcca.dwc import CODECS, CodecError, ECSQCodec, ECSQConfig, bits_per_param, layout_fingerprint
from cdcca.dwc_format import CONTAINER_DICTIONARY


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA-like tensors with different scales, a heavy-tailed bias and an untouched key bias."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q.lora_A": torch.randn(8, 96, generator=generator) * 0.05,
        "layers.0.q.lora_B": torch.randn(96, 8, generator=generator) * 0.03,
        "layers.0.fc1.bias": torch.distributions.Laplace(0.0, 0.02).sample((384,)),
        "layers.0.k.bias": torch.zeros(96),
        "query_tokens": torch.randn(1, 8, 128, generator=generator) * 0.01,
    }


def _reference(delta):
    return {name: tuple(t.shape) for name, t in delta.items()}


def _container(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    container = zstandard.ZstdDecompressor(dict_data=CONTAINER_DICTIONARY).decompress(payload)
    size = int.from_bytes(container[:8], "little")
    return json.loads(json.loads(container[8 : 8 + size])["__metadata__"]["cdcca-dwc"]), load_safetensors(container)


def _rebuild(header: dict, streams: dict[str, np.ndarray]) -> bytes:
    container = save_safetensors(streams, metadata={"cdcca-dwc": json.dumps(header)})
    return zstandard.ZstdCompressor().compress(container)


@pytest.mark.parametrize("step", [0.5, 1.5, 3.0])
def test_error_is_at_most_one_step_per_value(step):
    torch.manual_seed(0)
    delta = _delta()
    codec = ECSQCodec(ECSQConfig(step=step))

    decoded = codec.decode(codec.encode(delta), _reference(delta), strict=True)

    for name, original in delta.items():
        rms, peak = float(original.pow(2).mean().sqrt()), float(original.abs().max())
        quantum = max(step * rms, peak / 127)
        assert float((decoded[name] - original).abs().max()) <= quantum * (1 + 1e-5), name
    assert not decoded["layers.0.k.bias"].any()


def test_symbol_range_widens_the_step_for_outliers():
    delta = {"w": torch.cat([torch.full((999,), 1e-3), torch.tensor([10.0])])}  # one value 10^4 x the rest

    decoded = CODECS["ecsq"].decode(CODECS["ecsq"].encode(delta), _reference(delta))

    assert float(decoded["w"][-1]) == pytest.approx(10.0, rel=0.01)  # no clipping at 127 steps
    assert float((decoded["w"] - delta["w"]).abs().max()) <= 10.0 / 127 * (1 + 1e-5)


def test_rate_is_near_the_entropy_of_the_symbols_and_falls_with_the_step():
    generator = torch.Generator().manual_seed(3)
    delta = {f"t{i}": torch.randn(4096, generator=generator) for i in range(8)}  # 32768 Gaussian values
    sizes = {}
    for step in (1.0, 1.5, 2.0):
        symbols = np.rint(torch.cat(list(delta.values())).numpy() / step)  # RMS is 1, no outlier beyond 127
        _, counts = np.unique(symbols, return_counts=True)
        entropy = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())

        sizes[step] = bits_per_param(ECSQCodec(ECSQConfig(step=step)).encode(delta), delta)

        assert entropy < sizes[step] < entropy * 1.12 + 0.02  # measured 1.05-1.11: zstd Huffman tables, container
    assert sizes[1.0] > sizes[1.5] > sizes[2.0]


def test_no_names_travel_and_the_robot_rebuilds_its_layout():
    delta = _delta()
    payload = CODECS["ecsq"].encode(delta)
    header, _ = _container(payload)

    container = zstandard.ZstdDecompressor(dict_data=CONTAINER_DICTIONARY).decompress(payload)
    assert not any(name.encode() in container for name in delta)
    assert header["layout"]["sha256"] == layout_fingerprint(_reference(delta))
    assert header["layout"]["kinds"] == ["ecsq", "ecsq", "ecsq", "zero", "ecsq"]
    decoded = CODECS["ecsq"].decode(payload, _reference(delta), strict=True)
    assert list(decoded) == list(delta)


@pytest.mark.parametrize("label, edit", [
    ("renamed tensor", lambda ref: {("other" if n == "query_tokens" else n): s for n, s in ref.items()}),
    ("reordered", lambda ref: dict(reversed(list(ref.items())))),
    ("reshaped", lambda ref: {**ref, "layers.0.fc1.bias": (383,)}),
    ("one tensor more", lambda ref: {**ref, "extra.bias": (4,)}),
])  # fmt: skip
def test_a_robot_with_another_layout_rejects_the_payload(label, edit):
    delta = _delta()
    payload = CODECS["ecsq"].encode(delta)

    with pytest.raises(CodecError, match="fingerprint"):
        CODECS["ecsq"].decode(payload, edit(_reference(delta)), strict=True)
    with pytest.raises(CodecError, match="needs the receiver's layout"):
        CODECS["ecsq"].decode(payload)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_payload_raises_codec_error(keep):
    delta = _delta()
    payload = CODECS["ecsq"].encode(delta)

    with pytest.raises(CodecError):
        CODECS["ecsq"].decode(payload[: int(len(payload) * keep)], _reference(delta), strict=True)


def _replace(key, make):
    def edit(header, streams):
        streams[key] = make(streams[key])

    return edit


def _frame(data):
    raw = data if isinstance(data, bytes) else np.asarray(data, np.uint8).tobytes()
    return np.frombuffer(zstandard.ZstdCompressor().compress(raw), np.uint8)


EDITS = [
    ("negative step", _replace("steps", lambda s: -s)),
    ("NaN step", _replace("steps", lambda s: np.full_like(s, np.nan))),
    ("steps missing one", _replace("steps", lambda s: s[:-1])),
    ("magnitudes one byte short", _replace("magnitudes", lambda f: _frame(
        zstandard.ZstdDecompressor().decompress(f.tobytes())[:-1]))),
    ("magnitudes not zstd", _replace("magnitudes", lambda f: np.zeros(40, np.uint8))),
    ("signs one byte long", _replace("signs", lambda f: _frame(
        zstandard.ZstdDecompressor().decompress(f.tobytes()) + b"\0"))),
    ("extra beyond 127", _replace("extra", lambda f: _frame(np.full(
        zstandard.frame_content_size(f.tobytes()), 200)))),
    ("offsets as float", _replace("offsets", lambda o: o.astype(np.float32))),
    ("step as text", lambda header, streams: header["params"].update(step="1.5")),
    ("step zero", lambda header, streams: header["params"].update(step=0.0)),
]  # fmt: skip


@pytest.mark.parametrize("label, edit", EDITS, ids=[label for label, _ in EDITS])
def test_corrupt_streams_raise_codec_error(label, edit):
    delta = {"a": torch.randn(64, 8) * 0.1, "b": torch.randn(500) * 0.05 + torch.tensor(0.0)}
    delta["b"][0] = 3.0  # at least one symbol of magnitude >= 3, so "extra" is not empty
    header, streams = _container(CODECS["ecsq"].encode(delta))
    streams = {key: value.copy() for key, value in streams.items()}

    edit(header, streams)

    with pytest.raises(CodecError):
        CODECS["ecsq"].decode(_rebuild(header, streams), _reference(delta), strict=True)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ECSQConfig.step"):
        ECSQConfig(step=0.0)
    with pytest.raises(ValueError, match="ECSQConfig.zstd_level"):
        ECSQConfig(zstd_level=0)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_signed_ecsq_delta_applies_on_the_robot_as_the_chain_expects(kind, exported, keys, tmp_path):
    from cdcca.edge.adapter_slot import APPLIED, AdapterSlot
    from cdcca.edge.backend import TorchBackend
    from cdcca.edge.onnx_backend import OnnxBackend
    from cdcca.envelope import VersionChain
    from cdcca.models.trainable import trainable_parameters

    # Prepare: the robot's backend and the cloud's chain over the same base; a perturbed target
    signer, trust = keys
    student, export = exported
    if kind == "torch":
        backend = TorchBackend(AdapterSlot(student, "r1", trust, state_dir=tmp_path))
        base = backend.slot.base
    else:
        backend = OnnxBackend(export, "r1", trust, state_dir=tmp_path, threads=1)
        base = backend.base
    generator = torch.Generator().manual_seed(5)
    target = {name: value + 0.02 * torch.randn(value.shape, generator=generator) for name, value in base.items()}
    chain = VersionChain("r1", base)

    # Execute
    status = backend.receive(chain.make_delta(target, "ecsq", signer))

    # Assert: applied, and the robot holds exactly what the chain recorded (error feedback stays exact)
    assert status.state == APPLIED
    if kind == "torch":
        with backend.slot.model() as model:
            held = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    else:
        held = {k: v.clone() for k, v in backend._active.params.items()}
    for name, value in held.items():
        assert torch.allclose(value, chain.published[1][name], atol=1e-6), name
        change = target[name] - base[name]
        quantum = max(0.75 * float(change.pow(2).mean().sqrt()), float(change.abs().max()) / 127)
        assert float((value - target[name]).abs().max()) <= quantum * 1.01 + 1e-6, name
