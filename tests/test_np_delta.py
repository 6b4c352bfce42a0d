"""Numpy DWC decoding (cdcca.edge.np_delta): bit-identical to cdcca.dwc's torch/bitsandbytes decode, the same
rejections of corrupt bytes, Eq. 8 as cdcca.dwc.apply_delta, and no torch import."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from cdcca import dwc
from cdcca.edge import np_delta

SHAPES = {"a": (7,), "b": (3, 5), "c": (64,), "d": (65,), "e": (2, 3, 11), "zero": (4, 4), "f": (1,), "g": (129, 3)}
CODECS = {
    "fp16": dwc.Fp16Codec(),
    "nf4": dwc.NF4Codec(),
    "nf4-zstd": dwc.NF4Codec(dwc.NF4Config(zstd_level=19)),
    "nf4/32": dwc.NF4Codec(dwc.NF4Config(blocksize=32)),
    "nf4-zstd/1024": dwc.NF4Codec(dwc.NF4Config(blocksize=1024, zstd_level=3)),
    "sparse-sign": dwc.SparseSignCodec(),
    "sparse-sign-ref/row": dwc.SparseSignCodec(dwc.SparseSignConfig(granularity="row", layout_by_reference=True)),
    "ecsq": dwc.ECSQCodec(),
    "ecsq/coarse": dwc.ECSQCodec(dwc.ECSQConfig(step=3.0)),
    "ecdq": dwc.ECDQCodec(),
    "ecdq/coarse": dwc.ECDQCodec(dwc.ECDQConfig(step=4.0, seed=3)),
    "subspace": dwc.SubspaceCodec(dwc.SubspaceConfig(fold=4, basis_seed=9)),
    "subspace/zstd": dwc.SubspaceCodec(dwc.SubspaceConfig(fold=2, basis_seed=9, step=0.3, coder="zstd")),
}


def _delta(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    delta = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    delta["zero"].zero_()
    delta["b"][1] = 0.0  # a zero row inside a changed tensor
    return delta


def _bits(array) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


@pytest.mark.parametrize("label", list(CODECS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_decode_is_bit_identical_to_the_torch_decode(label, seed):
    # Prepare
    codec = CODECS[label]
    delta = _delta(seed)
    payload = codec.encode(delta)
    reference = {name: tuple(t.shape) for name, t in delta.items()}
    # Execute
    expected = codec.decode(payload, reference, strict=True)
    got = np_delta.decode(payload, codec.name, reference, strict=True)
    # Assert
    assert list(got) == list(expected)
    for name in delta:
        assert got[name].dtype == np.float32 and got[name].shape == tuple(expected[name].shape)
        assert np.array_equal(_bits(got[name]), _bits(expected[name].numpy())), name
    assert not got["zero"].any()
    flat_got, flat_delta = (np.concatenate([np.ravel(d[n]) for n in SHAPES]) for d in (got, delta))
    assert np.corrcoef(flat_got, flat_delta)[0, 1] > 0.4  # and it is the delta, not noise


@pytest.mark.parametrize("label", ["fp16", "nf4", "nf4-zstd"])
def test_apply_matches_the_torch_apply_bit_for_bit(label):
    codec = CODECS[label]
    delta = _delta(5)
    base = {name: torch.randn(shape, generator=torch.Generator().manual_seed(9)) for name, shape in SHAPES.items()}
    payload = codec.encode(delta)

    expected = dwc.apply_delta(base, codec.decode(payload))
    got = np_delta.apply({k: v.numpy() for k, v in base.items()}, np_delta.decode(payload, codec.name))

    assert all(np.array_equal(_bits(got[n]), _bits(expected[n].numpy())) for n in SHAPES)


@pytest.mark.parametrize("blocksize", [32, 64, 1024])
@pytest.mark.parametrize("numel", [1, 63, 4099])
def test_nf4_decode_is_bit_identical_to_bitsandbytes_dequantize(blocksize, numel):
    """The cloud records θ_base + decode(payload) as what the robot holds; if the numpy NF4 decode and
    bitsandbytes' dequantize_4bit differed in any bit, that record would drift from the robot round after round."""
    import bitsandbytes.functional as bnb

    # Prepare: every code, and block scales from 0 through subnormals to near the float32 maximum
    rng = np.random.default_rng(numel * blocksize)
    padded = numel + numel % 2
    codes = rng.integers(0, 256, padded // 2, dtype=np.uint8)
    blocks = -(-padded // blocksize)
    absmax = (rng.random(blocks) * 10.0 ** rng.integers(-44, 38, blocks)).astype(np.float32)
    absmax[0] = 0.0
    header = {"codec": "nf4", "version": 1, "params": {"blocksize": blocksize}, "layout": [["w", [numel], "nf4"]]}
    payload = save_safetensors({"0.codes": codes, "0.absmax": absmax}, metadata={"cdcca-dwc": json.dumps(header)})
    state = bnb.QuantState(absmax=torch.from_numpy(absmax.copy()), shape=torch.Size([padded]),
                           code=bnb.get_4bit_type("nf4", device="cpu"), blocksize=blocksize, quant_type="nf4",
                           dtype=torch.float32)  # fmt: skip
    # Execute
    expected = bnb.dequantize_4bit(torch.from_numpy(codes.copy()).reshape(-1, 1), state, quant_type="nf4")
    got = np_delta.decode(payload, "nf4")["w"]
    # Assert
    assert np.array_equal(_bits(got), _bits(expected.reshape(-1)[:numel].numpy()))
    assert (got != 0).any() or numel <= blocksize


def test_apply_refuses_what_the_torch_apply_refuses():
    base = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="above 10 x"):
        np_delta.apply(base, {"w": np.full((2, 2), 1e6, np.float32)})
    with pytest.raises(ValueError, match="NaN/Inf"):
        np_delta.apply(base, {"w": np.full((2, 2), np.inf, np.float32)}, max_ratio=None)
    with pytest.raises(ValueError, match="shapes"):
        np_delta.apply(base, {"w": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="one state but not the other"):
        np_delta.apply(base, {"v": np.zeros((2, 2), np.float32)})


def _torch_outcome(codec, payload, reference):
    try:
        return {k: v.numpy() for k, v in codec.decode(payload, reference, strict=True).items()}
    except dwc.CodecError:
        return "rejected"


def _numpy_outcome(codec, payload, reference):
    try:
        return np_delta.decode(payload, codec.name, reference, strict=True)
    except np_delta.CodecError:
        return "rejected"


@pytest.mark.parametrize("label", ["fp16", "nf4", "nf4-zstd", "sparse-sign", "sparse-sign-ref/row", "ecsq", "ecdq",
                                   "subspace"])  # fmt: skip
def test_corrupt_and_truncated_payloads_get_the_same_verdict(label):
    # Prepare: truncations, single-byte flips across the whole payload, and junk
    codec = CODECS[label]
    delta = _delta(3)
    reference = {name: tuple(t.shape) for name, t in delta.items()}
    payload = codec.encode(delta)
    rng = np.random.default_rng(0)
    broken = [payload[:n] for n in (0, 3, 8, 40, len(payload) // 2, len(payload) - 1)]
    for position in rng.choice(len(payload), 60, replace=False):
        flipped = bytearray(payload)
        flipped[position] ^= 1 << int(rng.integers(8))
        broken.append(bytes(flipped))
    broken += [b"\x28\xb5\x2f\xfd" + bytes(20), rng.bytes(300), payload + b"tail"]
    rejected = 0
    for candidate in broken:
        # Execute
        expected, got = _torch_outcome(codec, candidate, reference), _numpy_outcome(codec, candidate, reference)
        # Assert: both reject, or both decode to the same bits
        if isinstance(expected, str):
            assert got == "rejected"
            rejected += 1
        else:
            assert not isinstance(got, str) and all(np.array_equal(_bits(got[n]), _bits(expected[n])) for n in SHAPES)
    assert rejected >= 8


def test_wrong_codec_unknown_codec_and_foreign_shapes_are_rejected():
    delta = _delta(4)
    payload = CODECS["nf4"].encode(delta)
    reference = {name: tuple(t.shape) for name, t in delta.items()}

    with pytest.raises(np_delta.CodecError, match="encoded by codec 'nf4', not 'fp16'"):
        np_delta.decode(payload, "fp16")
    with pytest.raises(np_delta.CodecError, match="no numpy decoder"):
        np_delta.decode(payload, "no-such-codec")
    with pytest.raises(np_delta.CodecError, match="receiver's is"):
        np_delta.decode(payload, "nf4", {**reference, "b": (5, 3)}, strict=True)
    with pytest.raises(np_delta.CodecError, match="missing"):
        np_delta.decode(payload, "nf4", {**reference, "extra": (2,)}, strict=True)
    with pytest.raises(np_delta.CodecError, match="a payload is bytes"):
        np_delta.decode("text", "nf4")
    assert np_delta.payload_codec(payload) == "nf4"


def test_registry_and_constants_follow_cdcca_dwc():
    import bitsandbytes.functional as bnb

    assert set(np_delta.DECODERS) == set(dwc.CODECS)  # every codec the cloud can send (a new one: add its decoder)
    constants = ("FORMAT", "VERSION", "MAX_DELTA_RATIO", "_MAX_ELEMENTS", "_MAX_CONTAINER_BYTES", "_NF4_BLOCKSIZES")
    assert [getattr(np_delta, c) for c in constants] == [getattr(dwc, c) for c in constants]
    assert np.array_equal(np_delta.NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu").numpy())


def test_one_codec_error_class_for_the_cloud_and_the_robot():
    from cdcca import dwc_format
    from cdcca.errors import CdccaError

    payload = CODECS["ecsq"].encode(_delta(6))

    assert dwc.CodecError is np_delta.CodecError is dwc_format.CodecError
    assert issubclass(dwc.CodecError, CdccaError) and issubclass(dwc.CodecError, ValueError)
    with pytest.raises(np_delta.CodecError, match="carries its layout by fingerprint"):
        CODECS["ecsq"].decode(payload)  # raised through cdcca.dwc, caught as the robot's class
    with pytest.raises(dwc.CodecError, match="no numpy decoder"):
        np_delta.decode(payload, "no-such-codec")


def test_the_module_imports_no_torch():
    """Loaded by path: ``cdcca.edge``'s package __init__ still imports the torch runtime (see issue 19)."""
    path = Path(np_delta.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('np_delta', {str(path)!r})\n"
        "module = sys.modules['np_delta'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert {'fp16', 'nf4', 'nf4-zstd', 'sparse-sign'} <= set(module.DECODERS)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
