"""Downlink envelope and robot slot: signatures, every rejection path, keyframes, rollback, restart, swaps."""

import os
import stat
import threading

import numpy as np
import pytest
import torch

from cdcca import wire
from cdcca.dwc import get_codec
from cdcca.edge.adapter_slot import APPLIED, REJECTED, ROLLED_BACK, AdapterSlot
from cdcca.envelope import KeyStoreError, Signer, TrustStore, VersionChain, generate_key, seal, trust_key
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import get_preset
from cdcca.models.trainable import add_lora, trainable_parameters


@pytest.fixture()
def keys(tmp_path):
    private, public = generate_key(tmp_path / "cloud", "cloud-1")
    store = tmp_path / "trust"
    trust_key(public, store)
    return Signer.load(private), TrustStore.load(store)


@pytest.fixture()
def student(pair):
    _, student = pair
    return add_lora(student)


def _updated(params: dict, seed: int = 0, scale: float = 0.05) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in params.items()}


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in trainable_parameters(model).items()}


def _same(model, params) -> bool:
    live = trainable_parameters(model)
    return all(torch.equal(live[k], params[k]) for k in params)


def test_generate_key_is_private_and_never_overwritten(tmp_path):
    private, public = generate_key(tmp_path, "cloud-1")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert len(bytes.fromhex(public.read_text().strip())) == 32
    with pytest.raises(KeyStoreError, match="exists"):
        generate_key(tmp_path, "cloud-1")
    with pytest.raises(KeyStoreError, match="key id"):
        generate_key(tmp_path, "../evil")
    bad = tmp_path / "bad.pub"
    bad.write_text("zz")
    with pytest.raises(KeyStoreError, match="32 bytes of hex"):
        trust_key(bad, tmp_path / "store")


def test_valid_delta_is_applied_and_changes_answers(student, keys, few_samples):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    target = _updated(slot.base)
    msg = chain.make_delta(target, "fp16", signer)
    assert msg.keyframe and msg.version == 1 and msg.base_version == 0

    status = slot.receive(wire.decode(wire.WEIGHT_DELTA, wire.encode(msg)))

    assert (status.state, status.version, slot.version) == (APPLIED, 1, 1)
    with slot.model() as active:
        live = trainable_parameters(active)
        assert all(torch.allclose(live[k], target[k], atol=1e-3) for k in target)


def _tamper_signature(msg, signer):
    msg.signature[0] ^= 0xFF
    return msg


def _resign(msg, signer, **changes):
    payload = bytes(msg.payload) if "payload" not in changes else changes.pop("payload")
    fields = dict(robot_id=msg.robot_id, version=msg.version, base_version=msg.base_version, keyframe=msg.keyframe,
                  codec=msg.codec, num_params=msg.num_params, signer=signer)  # fmt: skip
    fields.update(changes)
    return seal(payload, **fields)


REJECTIONS = {
    "bad signature": (_tamper_signature, "bad signature"),
    "field altered after signing": (lambda m, s: setattr(m, "version", 9) or m, "bad signature"),
    "unknown key": (lambda m, s: _resign(m, Signer("stranger", s.private_key)), "unknown signing key"),
    "hash mismatch": (lambda m, s: _with_wrong_hash(m, s), "SHA-256"),
    "wrong robot": (lambda m, s: _resign(m, s, robot_id="r2"), "addressed to robot 'r2'"),
    "wrong base": (lambda m, s: _resign(m, s, keyframe=False, base_version=7), "based on version 7"),
    "keyframe not on base": (lambda m, s: _resign(m, s, base_version=3), "keyframe must be based on version 0"),
    "unknown codec": (lambda m, s: _resign(m, s, codec="zip"), "cannot decode 'zip'"),
    "truncated payload": (lambda m, s: _resign(m, s, payload=bytes(m.payload)[: len(m.payload) // 2]), "cannot decode"),
    "wrong shape": (lambda m, s: _resign(m, s, payload=_payload_with(m, shape_change=True)), "do not match|shape"),
    "nan": (lambda m, s: _resign(m, s, payload=_payload_with(m, nan=True)), "NaN|not finite|cannot decode"),
    "num_params": (lambda m, s: _resign(m, s, num_params=1), "num_params"),
}


def _with_wrong_hash(msg, signer):
    fresh = _resign(msg, signer)
    fresh.sha256 = np.zeros(32, np.uint8)
    fresh.signature = np.zeros(0, np.uint8)
    from cdcca.envelope import _signed_bytes

    fresh.signature = np.frombuffer(signer.sign(_signed_bytes(fresh)), np.uint8).copy()
    return fresh


def _payload_with(msg, shape_change=False, nan=False) -> bytes:
    codec = get_codec("fp16")
    delta = codec.decode(bytes(msg.payload))
    if shape_change:
        name = next(iter(delta))
        delta[name] = torch.zeros(*delta[name].shape, 2)
        return codec.encode(delta)
    # the codec refuses to encode NaN, so forge the container a malicious cloud could send
    from safetensors.numpy import load, save

    from cdcca.dwc import _read_metadata, _unwrap

    container = _unwrap(codec.encode(delta))
    streams = load(container)
    first = sorted(streams)[0]
    streams[first] = streams[first].copy()
    streams[first][0] = np.nan
    return save(streams, metadata=_read_metadata(container))


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_every_rejection_leaves_the_model_exactly_as_it_was(case, student, keys):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    before = _snapshot(student)
    good = VersionChain("r1", slot.base).make_delta(_updated(slot.base), "fp16", signer)
    tamper, reason = REJECTIONS[case]

    status = slot.receive(tamper(good, signer))

    assert status.state == REJECTED
    import re

    assert re.search(reason, status.reason), status.reason
    assert slot.version == 0 and slot.counters.rejected == 1
    for model in slot._models:
        assert _same(model, before)


def test_replay_and_out_of_order_versions_are_rejected(student, keys):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    first = chain.make_delta(_updated(slot.base, 1), "fp16", signer)
    assert slot.receive(first).state == APPLIED
    chain.record_applied(1)
    second = chain.make_delta(_updated(slot.base, 2), "fp16", signer)
    assert not second.keyframe and second.base_version == 1
    assert slot.receive(first).state == REJECTED  # replay
    assert "not newer" in slot.receive(first).reason
    assert slot.receive(second).state == APPLIED and slot.version == 2


def test_a_robot_that_missed_versions_gets_a_keyframe(student, keys):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    chain.make_delta(_updated(slot.base, 1), "fp16", signer)  # v1 lost on the way
    target = _updated(slot.base, 2)
    v2 = chain.make_delta(target, "fp16", signer)  # robot still reports version 0
    assert v2.keyframe and v2.base_version == 0
    assert slot.receive(v2).state == APPLIED and slot.version == 2
    assert all(torch.allclose(slot.current[k], target[k], atol=1e-3) for k in target)


def test_rollback_returns_to_the_previous_adapter_and_blocks_its_replay(student, keys):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    slot.receive(chain.make_delta(_updated(slot.base, 1), "fp16", signer))
    chain.record_applied(1)
    v1_params = {k: v.clone() for k, v in slot.current.items()}
    v2 = chain.make_delta(_updated(slot.base, 2), "fp16", signer)
    slot.receive(v2)

    status = slot.rollback()

    assert (status.state, status.version, slot.version) == (ROLLED_BACK, 1, 1)
    with slot.model() as active:
        assert _same(active, v1_params)
    assert slot.receive(v2).state == REJECTED  # v2 again is a replay, even though the robot runs v1
    assert slot.rollback().state == REJECTED  # one level only


def test_restart_resumes_at_the_last_good_version(pair, keys, tmp_path, monkeypatch):
    signer, trust = keys
    _, student = pair
    add_lora(student)
    slot = AdapterSlot(student, "r1", trust, state_dir=tmp_path / "state")
    chain = VersionChain("r1", slot.base)
    slot.receive(chain.make_delta(_updated(slot.base, 1), "fp16", signer))
    chain.record_applied(1)
    v1 = {k: v.clone() for k, v in slot.current.items()}

    def crash(*args):  # power lost after writing the new file but before the rename
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        slot.receive(chain.make_delta(_updated(slot.base, 2), "fp16", signer))
    monkeypatch.undo()
    assert (tmp_path / "state" / "adapter.safetensors.partial").exists()

    _, fresh = build_pair(get_preset("test"), student.tokenizer, seed=0)  # the same robot, rebooted
    add_lora(fresh)
    assert all(torch.equal(fresh_base, slot.base[k]) for k, fresh_base in _snapshot(fresh).items())
    restarted = AdapterSlot(fresh, "r1", trust, state_dir=tmp_path / "state")

    assert restarted.version == 1
    assert not (tmp_path / "state" / "adapter.safetensors.partial").exists()
    with restarted.model() as active:
        assert _same(active, v1)


def test_corrupt_state_falls_back_to_the_base_adapter(student, keys, tmp_path):
    _, trust = keys
    (tmp_path / "adapter.safetensors").write_bytes(b"garbage")
    slot = AdapterSlot(student, "r1", trust, state_dir=tmp_path)
    assert slot.version == 0 and slot.counters.restore_failures == 1


def test_answers_continue_while_deltas_swap_in(student, keys, few_samples):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    stop, answers, failures = threading.Event(), [], []

    def answer_loop():
        while not stop.is_set():
            try:
                with slot.model() as model:
                    answers.append(model.generate([few_samples[0].prompt], images=[few_samples[0].image]).texts[0])
            except Exception as err:  # noqa: BLE001 - the test counts any failure
                failures.append(err)

    thread = threading.Thread(target=answer_loop)
    thread.start()
    for version in range(1, 7):
        assert slot.receive(chain.make_delta(_updated(slot.base, version), "fp16", signer)).state == APPLIED
        chain.record_applied(version)
    stop.set()
    thread.join(timeout=30)

    assert failures == [] and len(answers) > 0
    assert slot.version == 6 and slot.counters.applied == 6
    assert slot.counters.last_swap_us < 10_000


# ------------------------------------------------------------------------------ issue 15: D7, Build 2 and 6
def _signed_claiming(msg, signer, claim) -> object:
    """``msg`` re-signed by the trusted key with a forged fp16 payload: the real layout, except that the first
    tensor claims ``claim`` zero values (no data), and num_params to match."""
    import json

    from safetensors.numpy import save

    from cdcca.dwc import _read_metadata, _unwrap

    metadata = _read_metadata(_unwrap(bytes(msg.payload)))
    header = json.loads(metadata["cdcca-dwc"])
    header["layout"] = [[name, shape, "zero"] for name, shape, _ in header["layout"]]
    header["layout"][0][1] = [claim]
    payload = save({}, metadata={"cdcca-dwc": json.dumps(header)})
    total = sum(int(np.prod(shape)) for _, shape, _ in header["layout"])
    return _resign(msg, signer, payload=payload, num_params=total)


def test_a_signed_delta_is_bounded_by_the_robots_trainable_set_before_it_allocates(student, keys):
    import tracemalloc

    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    before = _snapshot(student)
    good = VersionChain("r1", slot.base).make_delta(_updated(slot.base), "fp16", signer)
    forged = _signed_claiming(good, signer, 16 << 20)  # 64 MiB of float32 zeros from a payload of a few KiB
    assert len(forged.payload) < 64 << 10
    tracemalloc.start()
    try:
        status = slot.receive(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status.state == REJECTED and "does not match this robot's trainable set" in status.reason
    assert peak < 8 << 20  # the robot's own decode would need 64 MiB
    assert slot.version == 0 and all(_same(model, before) for model in slot._models)


def test_a_consistent_forgery_of_other_shapes_is_refused_by_name_and_shape(student, keys):
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    good = VersionChain("r1", slot.base).make_delta(_updated(slot.base), "fp16", signer)
    first = next(iter(slot.base))
    forged = _signed_claiming(good, signer, slot.base[first].numel())  # right total, first tensor flattened
    status = slot.receive(forged)
    assert status.state == REJECTED and f"tensor {first!r}: payload shape" in status.reason


def test_a_signed_delta_of_absurd_but_finite_values_is_refused(student, keys):
    # issue 15 D8's delta: correctly signed, finite (1e38 fits float32), and every answer would be empty
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    before = _snapshot(student)
    absurd = {name: torch.full_like(tensor, 1e38) for name, tensor in slot.base.items()}
    payload = get_codec("nf4").encode(absurd)
    msg = seal(payload, robot_id="r1", version=1, base_version=0, keyframe=True, codec="nf4",
               num_params=sum(t.numel() for t in absurd.values()), signer=signer)  # fmt: skip
    status = slot.receive(msg)
    assert status.state == REJECTED and "above 10 x the base weights' scale" in status.reason
    assert slot.version == 0 and all(_same(model, before) for model in slot._models)
