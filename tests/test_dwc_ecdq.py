"""The ``ecdq`` codec (entropy-coded subtractively dithered quantization): uniform error bounded by half a step,
unbiased whatever the step, rate below the plain quantizer's at the same error, the dither reproducible on the
robot, and hostile payloads rejected with CodecError against the robot's own layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard

from cdcca.dwc import CODECS, CodecError, ECDQCodec, ECDQConfig, ECSQCodec, ECSQConfig, bits_per_param
from cdcca.dwc_format import ecdq_contexts, ecdq_dither
from cdcca.edge import np_delta
from tests.test_dwc_ecsq import _container, _rebuild, _reference  # the ecsq tests' container helpers


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA-like tensors with different scales, a heavy-tailed bias, an untouched key bias, a single value."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q.lora_A": torch.randn(8, 96, generator=generator) * 0.05,
        "layers.0.q.lora_B": torch.randn(96, 8, generator=generator) * 0.03,
        "layers.0.fc1.bias": torch.distributions.Laplace(0.0, 0.02).sample((384,)),
        "layers.0.k.bias": torch.zeros(96),
        "query_tokens": torch.randn(1, 8, 128, generator=generator) * 0.01,
        "gate": torch.tensor([0.3]),
    }


def _quantum(tensor: torch.Tensor, step: float) -> float:
    rms, peak = float(tensor.pow(2).mean().sqrt()), float(tensor.abs().max())
    return max(step * rms, peak / 126)


@pytest.mark.parametrize("step", [0.5, 2.0, 4.0])
def test_error_is_at_most_half_a_step_per_value_and_zero_tensors_stay_zero(step):
    torch.manual_seed(0)
    delta = _delta()
    codec = ECDQCodec(ECDQConfig(step=step))

    decoded = codec.decode(codec.encode(delta), _reference(delta), strict=True)

    for name, original in delta.items():
        if original.any():
            assert float((decoded[name] - original).abs().max()) <= _quantum(original, step) / 2 * (1 + 1e-6), name
    assert not decoded["layers.0.k.bias"].any()


def test_error_is_unbiased_and_uniform_even_where_the_step_dwarfs_the_values():
    generator = torch.Generator().manual_seed(1)
    delta = {"w": torch.randn(200_000, generator=generator)}  # RMS 1, step 4: a plain quantizer zeroes 95 %
    codec = ECDQCodec(ECDQConfig(step=4.0))

    error = (codec.decode(codec.encode(delta), _reference(delta))["w"] - delta["w"]).double()

    assert abs(float(error.mean())) < 0.02  # uniform on ±2: standard error of the mean 0.0026
    assert float(error.var()) == pytest.approx(16 / 12, rel=0.02)  # step² / 12
    regression = float((error * delta["w"]).mean() / delta["w"].double().pow(2).mean())
    assert abs(regression) < 0.02  # independent of Δ: no shrinkage
    plain = ECSQCodec(ECSQConfig(step=4.0)).decode(ECSQCodec(ECSQConfig(step=4.0)).encode(delta), _reference(delta))
    plain_regression = float(((plain["w"] - delta["w"]) * delta["w"]).mean())
    assert plain_regression < -0.5  # the undithered quantizer shrinks Δ (most values round to zero)


def test_rate_falls_with_the_step_and_beats_the_plain_quantizer_at_equal_noise():
    torch.manual_seed(3)
    delta = {f"t{i}": torch.distributions.Laplace(0.0, 1.0).sample((4096,)) for i in range(8)}  # RMS √2
    rates = [bits_per_param(ECDQCodec(ECDQConfig(step=s)).encode(delta), delta) for s in (1.0, 2.0, 3.0, 4.0)]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.95  # measured 2.24 / 1.43 / 1.06 / 0.86
    # Laplacian values at step 3: the ideal coder given the dither would spend I(X; X + U) < H(round(X/q + u))
    symbols = np.rint(torch.cat(list(delta.values())).numpy() / (3 * np.sqrt(2)) + ecdq_dither(32768, 0))
    _, counts = np.unique(symbols, return_counts=True)
    unconditional = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    assert rates[2] < unconditional  # coding given the dither's class beats coding the symbols alone


def test_dither_is_reproducible_uniform_and_independent_of_numpys_generator_methods():
    first, again = ecdq_dither(100_000, 7), ecdq_dither(100_000, 7)
    raw = np.random.PCG64(7).random_raw(3)

    assert np.array_equal(first, again) and not np.array_equal(first, ecdq_dither(100_000, 8))
    assert first.dtype == np.float64 and float(first.min()) >= -0.5 and float(first.max()) < 0.5
    assert abs(float(first.mean())) < 0.005 and float(first.var()) == pytest.approx(1 / 12, rel=0.02)
    assert first[:3].tolist() == [float(r >> 11) * 2.0**-53 - 0.5 for r in raw.tolist()]
    assert ecdq_dither(0, 7).shape == (0,)
    flip, context = ecdq_contexts(np.array([-0.5, -0.2, 0.0, 0.1, 0.3, 0.4999]))
    assert flip.tolist() == [-1, -1, 1, 1, 1, 1] and context.tolist() == [1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("step", [1.0, 3.0])
def test_robot_numpy_decode_is_bit_identical_and_payload_deterministic(seed, step):
    delta = _delta(seed)
    codec = ECDQCodec(ECDQConfig(step=step, seed=seed))
    payload = codec.encode(delta)

    expected = codec.decode(payload, _reference(delta), strict=True)
    got = np_delta.decode(payload, "ecdq", _reference(delta), strict=True)

    assert codec.encode(delta) == payload  # the envelope's SHA-256 is stable
    for name in delta:
        assert np.array_equal(got[name].view(np.uint32), expected[name].numpy().view(np.uint32)), name
    header, streams = _container(payload)
    assert header["params"] == {"step": step, "seed": seed} and "sha256" in header["layout"]
    assert not any(name in json.dumps(header) for name in delta)  # no names on the wire
    assert streams["steps"].dtype == np.uint16 and set(streams) == {"c0", "c1", "extra", "steps"}


def test_other_dither_seed_gives_other_bytes_but_the_same_error_bound():
    delta = _delta(4)
    payloads = [ECDQCodec(ECDQConfig(step=2.0, seed=s)).encode(delta) for s in (0, 1)]

    assert payloads[0] != payloads[1]
    decoded = CODECS["ecdq"].decode(payloads[1], _reference(delta))  # the seed travels in the header
    for name, original in delta.items():
        if original.any():
            assert float((decoded[name] - original).abs().max()) <= _quantum(original, 2.0) / 2 * (1 + 1e-6)


def test_outliers_widen_the_step_instead_of_clipping():
    delta = {"w": torch.cat([torch.full((999,), 1e-3), torch.tensor([10.0])])}

    codec = ECDQCodec(ECDQConfig(step=0.2))  # 0.2 · RMS (0.063) would need symbols up to 158 > 127

    decoded = codec.decode(codec.encode(delta), _reference(delta))

    assert float(decoded["w"][-1]) == pytest.approx(10.0, abs=10.0 / 126 / 2 * 1.001)


def _edit(edit) -> bytes:
    header, streams = _container(CODECS["ecdq"].encode(_delta(5)))
    streams = {key: value.copy() for key, value in streams.items()}
    edit(header, streams)
    return _rebuild(header, streams)


def _frame(values: np.ndarray) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdCompressor(write_content_size=True).compress(values.tobytes()), np.uint8)


HOSTILE = [
    ("seed missing", lambda h, s: h["params"].pop("seed"), "seed"),
    ("seed negative", lambda h, s: h["params"].update(seed=-1), "seed"),
    ("seed a float", lambda h, s: h["params"].update(seed=1.0), "seed"),
    ("step zero", lambda h, s: h["params"].update(step=0.0), "step"),
    ("steps short", lambda h, s: s.update(steps=s["steps"][:-1]), "steps"),
    ("steps float32", lambda h, s: s.update(steps=s["steps"].astype(np.float32)), "steps"),
    ("step infinite", lambda h, s: s["steps"].__setitem__(0, 0x7F80), "finite"),
    ("step zero value", lambda h, s: s["steps"].__setitem__(0, 0), "finite"),
    ("context short", lambda h, s: s.update(c0=_frame(np.zeros(3, np.uint8))), "c0"),
    ("context missing", lambda h, s: s.pop("c1"), "c1"),
    ("extra longer than the escapes", lambda h, s: s.update(extra=_frame(np.full(9, 5, np.int8))), "extra"),
]


@pytest.mark.parametrize("label, edit, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_payloads_raise_codec_error_on_both_decoders(label, edit, message):
    delta = _delta(5)
    payload = _edit(edit)

    with pytest.raises(CodecError, match=message):
        CODECS["ecdq"].decode(payload, _reference(delta), strict=True)
    with pytest.raises(np_delta.CodecError):
        np_delta.decode(payload, "ecdq", _reference(delta), strict=True)


def test_escapes_that_should_be_plain_codes_are_rejected():
    delta = {"w": torch.tensor([0.0, 0.0, 0.0, 5.0])}  # one outlier: with step 0.1 its symbol escapes
    payload = ECDQCodec(ECDQConfig(step=0.1)).encode(delta)
    header, streams = _container(payload)
    assert zstandard.ZstdDecompressor().decompress(streams["extra"].tobytes())  # one escape was sent

    streams["extra"] = _frame(np.array([1], np.int8))
    with pytest.raises(CodecError, match="extra"):
        CODECS["ecdq"].decode(_rebuild(header, streams), _reference(delta), strict=True)
