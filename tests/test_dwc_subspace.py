"""The codec-aware ``subspace`` codec: an exactly orthonormal seeded basis both ends rebuild, lossless but for the
coefficients' quantizer on a delta trained in it, a projection otherwise; AKD rounds that train in it; the version
chain that sends it only for the round that trained in it; hostile headers rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca import wire
from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.data.digits_shift import load_domain
from cdcca.dwc import (
    SUBSPACE_FALLBACK,
    CodecError,
    SubspaceCodec,
    SubspaceConfig,
    _log_step_codes,
    bits_per_param,
    get_codec,
)
from cdcca.dwc_format import SubspaceBasis, log_steps, subspace_chunks
from cdcca.edge import np_delta
from cdcca.envelope import VersionChain
from cdcca.models.trainable import add_lora, trainable_parameters
from tests.test_dwc_ecsq import _container, _rebuild, _reference  # the ecsq tests' container helpers

SHAPES = {"lora_A": (8, 96), "lora_B": (96, 8), "fc1.bias": (384,), "odd": (1000,), "gate": (1,)}


def _in_subspace(codec: SubspaceCodec, shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    """A delta that is B z for random coefficients z, per tensor at its own scale."""
    basis = codec.basis(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(seed)
    return {name: torch.from_numpy((basis.expand(i, rng.standard_normal(basis.dims(i))) * 0.01 * (i + 1))
                                   .astype(np.float32).reshape(shape))
            for i, (name, shape) in enumerate(shapes.items())}  # fmt: skip


def _sylvester(m: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


# ------------------------------------------------------------------------------------------------ the basis
def test_chunks_are_powers_of_two_that_add_up():
    assert subspace_chunks(1000, 1024) == (512, 256, 128, 64, 32, 8)
    assert subspace_chunks(4096, 1024) == (1024,) * 4
    assert subspace_chunks(1, 1024) == (1,) and subspace_chunks(0, 1024) == ()


def test_basis_is_a_signed_column_subset_of_the_hadamard_matrix_and_orthonormal():
    basis = SubspaceBasis((96, 1000), fold=4, chunk=64, seed=3)
    signs, columns = basis._tensor(1)[0]  # noqa: SLF001 - the first chunk's draws: 64 values, 16 directions
    explicit = signs[:, None] * _sylvester(64)[:, columns] / 8.0  # B of that chunk, (64, 16)
    x = np.zeros(1000)
    x[:64] = np.random.default_rng(0).standard_normal(64)
    np.testing.assert_allclose(basis.coefficients(1, x)[:16], explicit.T @ x[:64], atol=1e-12)
    np.testing.assert_allclose(explicit.T @ explicit, np.eye(16), atol=1e-12)
    assert np.unique(columns).size == 16
    for index, numel in enumerate(basis.numels):
        z = np.random.default_rng(index).standard_normal(basis.dims(index))
        assert basis.dims(index) == sum(-(-m // 4) for m in subspace_chunks(numel, 64))
        np.testing.assert_allclose(basis.coefficients(index, basis.expand(index, z)), z, atol=1e-12)  # BᵀB = I


def test_the_basis_and_both_transforms_are_pinned_bit_for_bit():
    """A cloud and a robot of different releases must build the same basis from a seed and get the same bits from
    it: the draws, Bz and Bᵀx of a fixed layout hash to what every release since stop 29 computes (a faster
    implementation must keep them)."""
    import hashlib

    def digest(arrays) -> str:
        return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]

    numels = (0, 3, 64, 1000, 4096, 5000, 17, 1, 2567)
    basis = SubspaceBasis(numels, fold=8, chunk=1024, seed=5)
    draws = [a.astype(np.float64) for i in range(len(numels)) for chunk in basis._tensor(i) for a in chunk]  # noqa: SLF001
    assert digest(draws) == "49b07c6a4cbcbf4a"
    expanded = basis.expand_many({i: np.sin(np.arange(basis.dims(i)) + i) for i in range(len(numels))})
    assert digest(expanded[i] for i in range(len(numels))) == "8f9661204b73da00"
    projected = basis.coefficients_many({i: np.cos(np.arange(n) * 0.37 + i) for i, n in enumerate(numels)})
    assert digest(projected[i] for i in range(len(numels))) == "257e437a933c69ce"
    assert [basis.expand(i, np.sin(np.arange(basis.dims(i)) + i)).tobytes() for i in range(len(numels))] == [
        expanded[i].tobytes() for i in range(len(numels))]  # one tensor at a time: the same bits as in a batch


def test_the_columns_are_the_k_smallest_keys_with_ties_going_to_the_earlier_position():
    """:meth:`SubspaceBasis._draws` selects by a partition; it must pick what a stable sort of the keys puts first,
    ties included (16-bit keys tie often in a chunk of 1024)."""
    rng = np.random.default_rng(0)
    for m, fold in ((1024, 8), (64, 4), (8, 8), (4, 1)):
        raw = rng.integers(0, 2**64, size=(5, m - (-m // 4)), dtype=np.uint64)
        keys = raw[:, m:].view(np.uint16)[:, :m]
        keys[:] = keys % 3  # three distinct keys: nearly every key ties
        k = -(-m // fold)
        signs, columns = SubspaceBasis((m,), fold, 1024, 0)._draws(m, list(raw))  # noqa: SLF001
        expected = np.sort(np.argsort(raw[:, m:].view(np.uint16)[:, :m], axis=1, kind="stable")[:, :k], axis=1)
        np.testing.assert_array_equal(columns, expected)
        np.testing.assert_array_equal(signs, np.where(raw[:, :m] & np.uint64(1), -1.0, 1.0))


def test_projection_is_idempotent_keeps_a_fold_th_of_the_energy_and_depends_on_the_seed_and_position():
    basis = SubspaceBasis((4096, 4096), fold=8, chunk=1024, seed=11)
    x = np.random.default_rng(0).standard_normal(4096)
    projected = basis.expand(0, basis.coefficients(0, x))
    np.testing.assert_allclose(basis.expand(0, basis.coefficients(0, projected)), projected, atol=1e-12)
    assert float(projected @ projected / (x @ x)) == pytest.approx(1 / 8, abs=0.03)
    np.testing.assert_allclose(float(projected @ (x - projected)), 0.0, atol=1e-9)  # orthogonal projection
    same = SubspaceBasis((4096, 4096), fold=8, chunk=1024, seed=11)
    np.testing.assert_array_equal(same.coefficients(0, x), basis.coefficients(0, x))  # rebuilt from the seed
    assert not np.allclose(SubspaceBasis((4096,), 8, 1024, 12).coefficients(0, x), basis.coefficients(0, x))
    assert not np.allclose(basis.coefficients(1, x), basis.coefficients(0, x))  # each position its own draws
    alone = SubspaceBasis((0, 4096), fold=8, chunk=1024, seed=11)  # tensor 0 unchanged (absent from a payload)
    np.testing.assert_array_equal(alone.coefficients(1, x), basis.coefficients(1, x))
    backwards = SubspaceBasis((4096, 4096), fold=8, chunk=1024, seed=11)
    np.testing.assert_array_equal(backwards.coefficients(1, x), basis.coefficients(1, x))  # later tensor first
    np.testing.assert_array_equal(backwards.coefficients(0, x), basis.coefficients(0, x))  # then the stream rewinds


# ------------------------------------------------------------------------------------------------ the codec
def test_a_delta_trained_in_the_subspace_round_trips_to_the_quantizer_noise_at_under_half_a_bit():
    codec = get_codec("subspace").for_round(7)
    shapes = {f"t{i}": (8, 1024) for i in range(5)}  # 40 k values: the header is a small share
    delta = _in_subspace(codec, shapes)

    payload = codec.encode(delta)
    decoded = codec.decode(payload, _reference(delta), strict=True)

    for name, original in delta.items():
        relative = float((decoded[name] - original).norm() / original.norm())
        assert relative < 0.2, name  # dithered steps of 0.5 RMS of the coefficients: noise 0.5/√12 = 0.14 of them
    assert bits_per_param(payload, delta) < 0.5  # 1/8 of the values at about 3.5 bits each
    assert _container(payload)[0]["params"]["basis_seed"] == 7
    robot = np_delta.decode(payload, "subspace", _reference(delta), strict=True)  # the torch-free robot's decode
    for name in delta:
        np.testing.assert_array_equal(robot[name], decoded[name].numpy())


def test_a_delta_outside_the_subspace_decodes_to_its_projection():
    codec = SubspaceCodec(SubspaceConfig(fold=4, step=0.05, basis_seed=2))
    delta = {"w": torch.randn(2048, generator=torch.Generator().manual_seed(0))}
    basis = codec.basis([2048])
    projection = basis.expand(0, basis.coefficients(0, delta["w"].double().numpy()))

    decoded = codec.decode(codec.encode(delta), _reference(delta))["w"].double().numpy()

    assert np.linalg.norm(decoded - projection) / np.linalg.norm(projection) < 0.03
    assert np.linalg.norm(decoded) ** 2 / float(delta["w"].double().pow(2).sum()) == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("params, match", [
    ({"fold": 0}, "fold"), ({"fold": 1.5}, "fold"), ({"chunk": 1000}, "chunk"), ({"chunk": 0}, "chunk"),
    ({"basis_seed": -1}, "basis_seed"), ({"basis_seed": "7"}, "basis_seed"), ({"step": 0.0}, "step"),
    ({"coder": "lzma"}, "coder"), ({"step_base": 5000}, "step_base"), ({"step_base": 1.0}, "step_base"),
    ({"tables": 1}, "tables"), ({"step_base": 990}, "step_base"),
])  # fmt: skip
def test_hostile_header_params_are_codec_errors(params, match):
    codec = get_codec("subspace")
    delta = _in_subspace(codec)
    header, streams = _container(codec.encode(delta))
    header["params"].update(params)
    forged = _rebuild(header, streams)
    with pytest.raises(CodecError, match=match):
        codec.decode(forged, _reference(delta), strict=True)
    with pytest.raises(CodecError, match=match):
        np_delta.decode(forged, "subspace", _reference(delta), strict=True)


@pytest.mark.parametrize("stream, forge, match", [
    ("scales", lambda a: np.full_like(a, 64), "scale classes"),
    ("scales", lambda a: a[:-1], "scales"),
    ("steps", lambda a: a.astype(np.uint16), "steps"),
    ("symbols", lambda a: a[:-1], "subspace symbols"),
    ("symbols", lambda a: np.concatenate([a, a[:1]]), "subspace symbols"),
])  # fmt: skip
def test_forged_rans_streams_are_codec_errors(stream, forge, match):
    codec = get_codec("subspace")
    delta = _in_subspace(codec)
    header, streams = _container(codec.encode(delta))
    streams[stream] = forge(streams[stream])
    forged = _rebuild(header, streams)
    with pytest.raises(CodecError, match=match):
        codec.decode(forged, _reference(delta), strict=True)
    with pytest.raises(CodecError, match=match):
        np_delta.decode(forged, "subspace", _reference(delta), strict=True)


def test_the_rans_coder_sends_what_the_zstd_coder_does_in_fewer_bytes():
    shapes = {f"bias{i}": (128,) for i in range(40)} | {"lora_A": (8, 512)}  # small tensors: 16 coefficients each
    rans = SubspaceCodec(SubspaceConfig(fold=8, basis_seed=5))
    zstd = SubspaceCodec(SubspaceConfig(fold=8, basis_seed=5, coder="zstd"))
    delta = _in_subspace(rans, shapes)

    new, old = rans.encode(delta), zstd.encode(delta)

    assert len(new) < len(old)
    assert _container(new)[1]["symbols"].size < 0.93 * _container(old)[1]["symbols"].size
    assert _container(new)[0]["params"]["coder"] == "rans" and "coder" not in _container(old)[0]["params"]
    for payload in (new, old):  # payloads of the zstd coder (every one before stop 29) still decode
        decoded = rans.decode(payload, _reference(delta), strict=True)
        robot = np_delta.decode(payload, "subspace", _reference(delta), strict=True)
        for name, original in delta.items():
            assert float((decoded[name] - original).norm() / original.norm()) < 0.2, name
            np.testing.assert_array_equal(robot[name], decoded[name].numpy())


def test_one_byte_steps_keep_every_symbol_in_range_and_coarsen_only_the_negligible():
    targets = np.array([1.03, 5.0, 2.0**-40, 0.7])
    floors = np.array([1.03, 1.0, 2.0**-40, 0.75])  # the first and last must not be undercut by rounding

    codes, base = _log_step_codes(targets, floors)
    steps = log_steps(codes, base)

    assert (steps >= floors).all()
    assert np.all(np.abs(np.log2(steps[[0, 1]] / targets[[0, 1]])) <= 1 / 8)
    assert codes[2] == 0 and steps[2] > targets[2]  # 42 octaves below the largest: raised to the lowest code
    assert steps[3] == pytest.approx(0.75, rel=0.09)


def test_config_is_checked():
    with pytest.raises(CodecError, match="chunk"):
        SubspaceConfig(chunk=1000)
    with pytest.raises(ValueError, match="step"):
        SubspaceConfig(step=0.0)
    with pytest.raises(ValueError, match="coder"):
        SubspaceConfig(coder="lzma")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("forced", [None, 123])
def test_a_subspace_round_changes_the_trainable_set_only_inside_its_basis(pair, forced):
    teacher, student = pair
    add_lora(student)
    config = AKDConfig(steps=6, batch_size=4, lr=5e-3, subspace_fold=8, subspace_chunk=256,
                       subspace_seed=forced)
    distiller = Distiller(teacher, student, config)
    assert list(distiller.trainable) == list(trainable_parameters(student))  # the order the codec lays out
    before = {n: p.detach().clone() for n, p in distiller.trainable.items()}
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))

    report = distiller.run_round(samples)

    assert report.subspace_seed is not None and forced in (None, report.subspace_seed)
    basis = SubspaceBasis(tuple(p.numel() for p in before.values()), 8, 256, report.subspace_seed)
    moved = 0
    for index, (name, param) in enumerate(distiller.trainable.items()):
        change = (param.detach() - before[name]).reshape(-1).double().numpy()
        inside = basis.expand(index, basis.coefficients(index, change))
        np.testing.assert_allclose(change, inside, atol=1e-6)
        moved += bool(np.abs(change).max() > 1e-6)
    assert moved > 10  # the round did train
    assert distiller.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * np.sqrt(8))  # √fold, trainable set
    assert distiller.optimizer.param_groups[1]["lr"] == pytest.approx(5e-3)  # ϕ and ψ as configured
    second = distiller.run_round(samples)
    assert (second.subspace_seed != report.subspace_seed) == (forced is None)  # a fresh basis each round


def test_subspace_settings_are_checked():
    assert AKDConfig().subspace_fold == 0
    with pytest.raises(ValueError, match="subspace"):
        AKDConfig(subspace_chunk=100)


# ------------------------------------------------------------------------------------------------ the chain
def test_the_chain_sends_the_subspace_codec_only_for_the_round_that_trained_in_it(keys):
    signer = keys[0]
    codec = get_codec("subspace").for_round(5)
    base = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    chain = VersionChain("r1", base)
    first = chain.make_delta({n: base[n] + d for n, d in _in_subspace(codec).items()}, codec, signer, round_start=0)
    assert first.codec == "subspace" and first.keyframe  # against the base, where the round started
    second = chain.make_delta({n: chain.published[1][n] + d for n, d in _in_subspace(codec, seed=1).items()}, codec,
                              signer, round_start=1)  # fmt: skip
    assert second.codec == SUBSPACE_FALLBACK  # the robot has not applied v1: the change spans two rounds
    chain.record_applied(2)
    third = chain.make_delta({n: chain.published[2][n] + d for n, d in _in_subspace(codec, seed=2).items()}, codec,
                             signer, round_start=2)  # fmt: skip
    assert third.codec == "subspace" and int(third.base_version) == 2
    assert wire.decode(wire.WEIGHT_DELTA, wire.encode(third)).codec == "subspace"
    assert chain.keyframe("subspace", signer).codec == SUBSPACE_FALLBACK  # every round so far: no one subspace
    chain.record_applied(3)
    fourth = chain.make_delta({n: base[n] + d for n, d in _in_subspace(codec, seed=3).items()}, codec, signer,
                              round_start=3)  # fmt: skip
    assert (fourth.codec, fourth.keyframe) == (SUBSPACE_FALLBACK, True)  # after a keyframe: against the base


def test_a_cloud_on_the_subspace_codec_trains_its_rounds_in_it():
    from cloud_trainer.service import CloudConfig

    config = CloudConfig(codec="subspace", akd=AKDConfig(steps=30))
    assert (config.akd.subspace_fold, config.akd.subspace_chunk, config.akd.steps) == (8, 1024, 60)
    assert config.akd.average_last == 20  # ends on the mean of its last third (SWA)
    assert config.akd.lr == AKDConfig().lr
    assert CloudConfig(codec="ecsq", akd=AKDConfig(steps=30)).akd.subspace_fold == 0
    assert CloudConfig(codec="ecsq", akd=AKDConfig(steps=30)).akd.average_last == 0
    with pytest.raises(ValueError, match="subspace"):
        CloudConfig(codec="subspace", akd=AKDConfig(subspace_fold=4))
