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


@pytest.mark.parametrize("took", ["keyframe", "incremental delta"])
def test_after_a_resent_keyframe_the_robot_holds_exactly_what_the_chain_records_again(student, keys, took):
    # Arrange: v1 applied; v2 (incremental) reaches the robot or not; the cloud resends v2 as a keyframe (ecdq, lossy)
    signer, trust = keys
    slot = AdapterSlot(student, "r1", trust)
    chain = VersionChain("r1", slot.base)
    assert slot.receive(chain.make_delta(_updated(slot.base, 1), "ecdq", signer)).state == APPLIED
    chain.record_applied(1)
    incremental = chain.make_delta(_updated(slot.base, 2), "ecdq", signer)
    recorded_v2 = dict(chain.published[2])
    keyframe = chain.keyframe("ecdq", signer)
    order = [keyframe, incremental] if took == "keyframe" else [incremental, keyframe]
    assert [slot.receive(m).state for m in order] == [APPLIED, REJECTED] and slot.version == 2  # the other: not newer
    chain.record_applied(2)
    gap = max(float((slot.current[k] - recorded_v2[k]).abs().max()) for k in recorded_v2)
    assert (gap > 1e-3) == (took == "keyframe")  # the keyframe's own quantization error: the two messages differ
    with pytest.raises(ValueError, match="sent as a keyframe already"):
        chain.keyframe("ecdq", signer)  # the one sent is sent again
    # Act: three more rounds, each applied
    sent = []
    for seed in (3, 4, 5):
        sent.append(chain.make_delta(_updated(slot.base, seed), "ecdq", signer))
        assert slot.receive(sent[-1]).state == APPLIED
        chain.record_applied(chain.latest)
        # Assert: from the first delta after the keyframe on, the robot holds what the cloud records, bit for bit
        # (before the fix, the keyframe's quantization error stayed: 0.04 per element here)
        assert all(torch.equal(slot.current[k], chain.published[chain.latest][k]) for k in slot.current)
    assert [(m.keyframe, m.base_version) for m in sent] == [(True, 0), (False, 3), (False, 4)]


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

    rename = os.replace

    def crash(source, target):  # power lost after writing the new file but before its rename (the previous
        if str(target).endswith("adapter.safetensors"):  # adapter's own file, written first, got through)
            raise OSError("simulated crash")
        return rename(source, target)

    monkeypatch.setattr(os, "replace", crash)
    status = slot.receive(chain.make_delta(_updated(slot.base, 2), "fp16", signer))
    monkeypatch.undo()
    assert (status.state, slot.version) == (REJECTED, 1) and "simulated crash" in status.reason
    assert (tmp_path / "state" / "adapter.safetensors.partial").exists()
    (tmp_path / "state" / ".tmpX1y2Z3").write_bytes(b"half")  # what safetensors >= 0.8 leaves when killed mid-write
    (tmp_path / "state" / ".tmp-notes").write_text("kept")  # not its pattern: not ours to delete

    _, fresh = build_pair(get_preset("test"), student.tokenizer, seed=0)  # the same robot, rebooted
    add_lora(fresh)
    assert all(torch.equal(fresh_base, slot.base[k]) for k, fresh_base in _snapshot(fresh).items())
    restarted = AdapterSlot(fresh, "r1", trust, state_dir=tmp_path / "state")

    assert restarted.version == 1
    assert not (tmp_path / "state" / "adapter.safetensors.partial").exists()
    assert not (tmp_path / "state" / ".tmpX1y2Z3").exists() and (tmp_path / "state" / ".tmp-notes").exists()
    with restarted.model() as active:
        assert _same(active, v1)
    # the previous adapter's file now holds v1 (written for v2's swap): v1's own previous, the base, is restored
    assert restarted.previous[0] == 0 and restarted.rollback().version == 0


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


# --------------------------------------------------------------------- issue 15: Build 7 (keys, rotation)
def _keys_cli(*argv, tmp_path, capsys=None) -> tuple[int, dict | None]:
    """Run ``cdcca keys ...`` in process; (exit code, its JSON report or None)."""
    import json

    from cdcca.cli import main

    report = tmp_path / "keys-report.json"
    report.unlink(missing_ok=True)
    code = main(["keys", *map(str, argv), "--json", str(report)])
    return code, json.loads(report.read_text()) if report.is_file() else None


def _fingerprint_of(public_file) -> str:
    import hashlib

    return hashlib.sha256(bytes.fromhex(public_file.read_text().strip())).hexdigest()


def test_keys_list_shows_fingerprints_and_trust_never_silently_replaces_a_key(tmp_path, capsys):
    # Prepare: two different keys that both want the id cloud-1
    private, public = generate_key(tmp_path / "cloud", "cloud-1")
    _, impostor = generate_key(tmp_path / "elsewhere", "cloud-1")
    store = tmp_path / "trust"
    assert _keys_cli("trust", public, "--store", store, tmp_path=tmp_path)[0] == 0
    # Execute / Assert: the same key again is fine, a different one under the same id is refused
    assert _keys_cli("trust", public, "--store", store, tmp_path=tmp_path)[0] == 0
    code, _ = _keys_cli("trust", impostor, "--store", store, tmp_path=tmp_path)
    assert code == 2 and "a different key is already trusted as 'cloud-1'" in capsys.readouterr().err
    assert (store / "cloud-1.pub").read_text() == public.read_text()
    code, listing = _keys_cli("list", "--store", store, tmp_path=tmp_path)
    assert code == 0 and listing["fingerprints"] == {"cloud-1": _fingerprint_of(public)}
    assert _fingerprint_of(public) in capsys.readouterr().out


def _two_trusted_signers(tmp_path):
    """Signers cloud-1 and cloud-2 (keys under tmp/cloud), both trusted in the store tmp/trust."""
    signers = {}
    for key_id in ("cloud-1", "cloud-2"):
        private, public = generate_key(tmp_path / "cloud", key_id)
        trust_key(public, tmp_path / "trust")
        signers[key_id] = Signer.load(private)
    return signers


def test_one_key_under_two_ids_in_an_old_store_is_revoked_by_either_id(student, tmp_path, capsys):
    # Prepare: a store an older release let hold cloud-1's key also as alias (`keys trust` now refuses that), and
    # cloud-2; a robot running on it
    store, signers = tmp_path / "trust", _two_trusted_signers(tmp_path)
    (tmp_path / "alias.pub").write_text((store / "cloud-1.pub").read_text())
    with pytest.raises(KeyStoreError, match="already trusted as 'cloud-1'"):
        trust_key(tmp_path / "alias.pub", store)
    (store / "alias.pub").write_text((store / "cloud-1.pub").read_text())  # what the older release did
    slot = AdapterSlot(student, "r1", TrustStore.load(store))
    chain = VersionChain("r1", slot.base)
    # Execute: revoke the alias with the CLI while the robot runs
    code, _ = _keys_cli("revoke", "alias", "--store", store, tmp_path=tmp_path)
    # Assert: the key is revoked under both ids, at once on the running robot and after a restart
    assert code == 0
    status = slot.receive(chain.make_delta(_updated(slot.base, 1), "fp16", signers["cloud-1"]))
    assert status.state == REJECTED and status.reason == "signing key 'cloud-1' is revoked (as 'alias')"
    assert set(TrustStore.load(store).keys) == {"cloud-2"}
    # the guard that keeps one key counts keys, not ids: with cloud-2 gone, cloud-1 under two ids is the last
    lone = tmp_path / "lone"
    trust_key(tmp_path / "cloud" / "cloud-1.pub", lone)
    (lone / "alias.pub").write_text((lone / "cloud-1.pub").read_text())
    code, _ = _keys_cli("revoke", "alias", "--store", lone, tmp_path=tmp_path)
    assert code == 2 and "only trusted key" in capsys.readouterr().err


def test_a_revoked_key_is_rejected_by_a_running_robot_and_stays_revoked(student, tmp_path, capsys):
    # Prepare: a robot that trusts two keys
    store, signers = tmp_path / "trust", _two_trusted_signers(tmp_path)
    slot = AdapterSlot(student, "r1", TrustStore.load(store))
    chain = VersionChain("r1", slot.base)
    assert slot.receive(chain.make_delta(_updated(slot.base, 1), "fp16", signers["cloud-1"])).state == APPLIED
    # Execute: revoke cloud-1 with the CLI while the robot runs
    code, report = _keys_cli("revoke", "cloud-1", "--store", store, tmp_path=tmp_path)
    # Assert: its next delta is rejected, cloud-2's applies; it cannot be trusted again; the last key stays
    assert code == 0 and report["fingerprint"] == _fingerprint_of(tmp_path / "cloud" / "cloud-1.pub")
    chain.record_applied(1)
    status = slot.receive(chain.make_delta(_updated(slot.base, 2), "fp16", signers["cloud-1"]))
    assert status.state == REJECTED and status.reason == "signing key 'cloud-1' is revoked"
    assert slot.receive(chain.make_delta(_updated(slot.base, 3), "fp16", signers["cloud-2"])).state == APPLIED
    assert slot.version == 3
    with pytest.raises(KeyStoreError, match="revoked"):
        trust_key(tmp_path / "cloud" / "cloud-1.pub", store)
    renamed = tmp_path / "cloud-1-again.pub"
    renamed.write_text((tmp_path / "cloud" / "cloud-1.pub").read_text())
    with pytest.raises(KeyStoreError, match="revoked"):  # the same key under a new name
        trust_key(renamed, store)
    (store / renamed.name).write_text(renamed.read_text())  # copied in by hand: still not trusted
    assert set(TrustStore.load(store).keys) == {"cloud-2"}
    code, _ = _keys_cli("revoke", "cloud-2", "--store", store, tmp_path=tmp_path)
    assert code == 2 and "only trusted key" in capsys.readouterr().err


def test_a_new_cloud_key_takes_over_through_a_statement_signed_by_the_old_one(student, tmp_path, capsys):
    # Prepare: robots trust cloud-1 only; the cloud makes cloud-2 and endorses it with cloud-1
    store = tmp_path / "trust"
    old_private, old_public = generate_key(tmp_path / "cloud", "cloud-1")
    new_private, new_public = generate_key(tmp_path / "cloud", "cloud-2")
    trust_key(old_public, store)
    slot = AdapterSlot(student, "r1", TrustStore.load(store))
    chain = VersionChain("r1", slot.base)
    new_signer = Signer.load(new_private)
    assert "unknown signing key" in slot.receive(chain.make_delta(_updated(slot.base), "fp16", new_signer)).reason
    statement = tmp_path / "cloud-2.trust.json"
    code, _ = _keys_cli("endorse", new_public, "--key", old_private, "--out", statement, tmp_path=tmp_path)
    assert code == 0
    # a forged statement (another key under the endorsed id) and one by a stranger are refused
    from cdcca.envelope import KeyStatement

    genuine = KeyStatement.from_json(statement.read_text())
    _, other = generate_key(tmp_path / "attacker", "attacker")
    forged = tmp_path / "forged.json"
    forged.write_text(genuine.__class__(**{**genuine.__dict__, "public_key": other.read_text().strip()}).to_json())
    assert _keys_cli("accept", forged, "--store", store, tmp_path=tmp_path)[0] == 2
    stranger = KeyStatement.sign(Signer.load(tmp_path / "attacker" / "attacker.key"), "trust", "attacker",
                                 other.read_text())  # fmt: skip
    with pytest.raises(KeyStoreError, match="not signed by a trusted key"):
        TrustStore.load(store).accept(stranger)
    # Execute: the robot accepts the genuine statement (no re-flash, no restart)
    code, report = _keys_cli("accept", statement, "--store", store, tmp_path=tmp_path)
    # Assert: deltas signed by the new key apply on the running robot; then the old key can be retired
    assert code == 0 and report == {"accepted": "trust", "key_id": "cloud-2", "signer": "cloud-1",
                                    "store": str(store)}  # fmt: skip
    chain = VersionChain("r1", slot.base)
    assert slot.receive(chain.make_delta(_updated(slot.base, 5), "fp16", new_signer)).state == APPLIED
    retire = KeyStatement.sign(new_signer, "revoke", "cloud-1")
    TrustStore.load(store).accept(retire)
    assert TrustStore.load(store).revoked == {"cloud-1": _fingerprint_of(old_public)}
    assert set(TrustStore.load(store).fingerprints()) == {"cloud-2"}


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "not json", '["a list"]', "{}"])
def test_a_key_statement_that_is_not_one_is_a_key_store_error(text):
    """A statement may travel over any channel (``cdcca keys accept FILE``): nesting deep enough to exhaust the
    parser's recursion is refused like any other malformed text."""
    from cdcca.envelope import KeyStatement

    with pytest.raises(KeyStoreError, match="not a key statement"):
        KeyStatement.from_json(text)


def test_a_key_trusted_from_a_file_of_another_suffix_is_stored_as_a_pub_and_listed(tmp_path, capsys):
    _, public = generate_key(tmp_path / "cloud", "cloud-3")
    mailed = tmp_path / "cloud-3.txt"  # as it arrived by mail
    mailed.write_text(public.read_text())
    assert _keys_cli("trust", mailed, "--store", tmp_path / "trust", tmp_path=tmp_path)[0] == 0
    code, listing = _keys_cli("list", "--store", tmp_path / "trust", tmp_path=tmp_path)
    assert code == 0 and listing["fingerprints"] == {"cloud-3": _fingerprint_of(public)}
    assert TrustStore.load(tmp_path / "trust").keys.keys() == {"cloud-3"}


def test_a_trust_store_that_cannot_be_read_is_an_error_not_an_empty_store(tmp_path, monkeypatch):
    """Root reads any folder, so the permission a robot's user lacks is taken away at os.access."""
    _, public = generate_key(tmp_path / "cloud", "cloud-1")
    trust_key(public, tmp_path / "trust")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path / "trust")
                        else real_access(path, mode))  # fmt: skip
    with pytest.raises(KeyStoreError, match="cannot be read; check its permissions"):
        TrustStore.load(tmp_path / "trust")
