"""The cloud trainer in process: durable buffer, rounds, commit atomicity, restart, resend and keyframes."""

import json
import sqlite3

import numpy as np
import pytest
import torch

from cdcca import wire
from cdcca.akd import AKDConfig, DistillSample
from cdcca.data.digits_shift import load_domain
from cdcca.edge.adapter_slot import AdapterSlot
from cdcca.envelope import Signer, TrustStore, generate_key, trust_key, verify_ack
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.models.trainable import trainable_parameters
from cdcca.uts import pack_tokens
from cdcca.wire.topics import LINK_TOPICS
from cloud_trainer.adapter_states import state_tensors
from cloud_trainer.service import CloudConfig, CloudTrainer, whole_uploads


def r1_uploads(checkpoints, images: int, count: int | None = None) -> list:
    """UtsTokens messages of robot r1 for the first ``count`` printed-domain samples of ``images`` stream images
    (three prompts each; every other token kept), as the cloud receives them."""
    student = load_mllm(checkpoints / "student")
    samples = load_domain("printed", "stream", limit=images)[:count]
    with torch.inference_mode():
        tokens = student.visual_tokens(student.preprocess([s.load_image() for s in samples]))
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[::2] = True
    return [pack_tokens(tokens[i], keep, torch.rand(tokens.shape[1]), robot_id="r1", sample_id=s.sample_id,
                        adapter_version=0, prompt=s.prompt, student_answer="?", sample_entropy=1.0)
            for i, s in enumerate(samples)]  # fmt: skip


def behind_after_two_rounds(trainer, uploads) -> None:
    """Robot r1 applied v1; v2 (incremental on v1) is published; the robot then reports v0 (it restarted from
    scratch): v2 can reach it only as a keyframe."""
    for batch in (uploads[:4], uploads[4:8]):
        for msg in batch:
            trainer.receive_tokens("r1", msg)
        trainer.step()
        trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=1, state=0))
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=0))


@pytest.fixture(scope="module")
def uploads(pretrained_test_pair):
    """UtsTokens messages of robot r1 for 12 printed-domain samples (half the tokens kept)."""
    return r1_uploads(pretrained_test_pair, images=4)


@pytest.fixture()
def keys(tmp_path):
    private, public = generate_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    return Signer.load(private), TrustStore.load(tmp_path / "trust")


def make_trainer(checkpoints, signer, state_dir, round_size=8):
    config = CloudConfig(state_dir=state_dir, round_size=round_size, max_round_samples=64, codec="fp16",
                         resend_after_s=0.0, akd=AKDConfig(steps=3, batch_size=4))  # fmt: skip
    return CloudTrainer(load_mllm(checkpoints / "teacher"), lambda: load_adaptable_student(checkpoints), signer, config)


def test_samples_are_stored_once_and_inconsistent_ones_rejected(pretrained_test_pair, uploads, keys, tmp_path):
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    assert all(trainer.receive_tokens("r1", msg) for msg in uploads[:5])
    assert trainer.receive_tokens("r1", uploads[0])  # a resend: acknowledged again, stored once
    broken = wire.decode(wire.UTS_TOKENS, wire.encode(uploads[6]))
    broken.token_indices = broken.token_indices[::-1].copy()  # not ascending
    assert not trainer.receive_tokens("r1", broken)
    assert (trainer.counters.received, trainer.counters.duplicates, trainer.counters.rejected) == (5, 1, 1)
    assert trainer.store.count("r1") == 5
    assert trainer.step() == []  # 5 pending < round_size 8: no round yet


class RecordingLink:
    """What the cloud publishes, by (robot_id, topic); subscriptions are not needed here."""

    def __init__(self):
        self.published = []

    def subscribe(self, robot_id, topic, handler):
        pass

    def publish(self, robot_id, topic, msg):
        return self.publish_bytes(robot_id, topic, wire.encode(msg))

    def publish_bytes(self, robot_id, topic, data):
        self.published.append((robot_id, topic, wire.decode(LINK_TOPICS[topic], data)))
        return len(data)

    @property
    def deltas(self):
        """The published ``WeightDelta`` messages, as (robot_id, message)."""
        return [(robot_id, msg) for robot_id, topic, msg in self.published if topic == "weight_delta"]


def test_acks_are_signed_with_the_delta_key_and_their_sequence_grows_across_a_restart(pretrained_test_pair, uploads,
                                                                                      keys, tmp_path):  # fmt: skip
    """Issue 15 D6: a robot deletes only what an ack signed by the cloud names, and only if the ack is newer."""
    # Prepare
    signer, trust = keys
    config = CloudConfig(state_dir=tmp_path / "cloud", round_size=64, codec="fp16")
    make = lambda link: CloudTrainer(load_mllm(pretrained_test_pair / "teacher"),  # noqa: E731
                                     lambda: load_adaptable_student(pretrained_test_pair), signer, config, link)
    first_link, second_link = RecordingLink(), RecordingLink()

    # Execute: three samples (one resent) to one cloud process, then one to its successor on the same state
    trainer = make(first_link)
    for msg in (uploads[0], uploads[1], uploads[0]):
        trainer.receive_tokens("r1", msg)
    trainer.close()
    restarted = make(second_link)
    restarted.receive_tokens("r1", uploads[2])
    restarted.close()

    # Assert: every ack verifies under the robot's trust store, names its sample, and is newer than the one before
    acks = [msg for _, topic, msg in first_link.published + second_link.published if topic == "uts_ack"]
    assert [list(a.sample_ids) for a in acks] == [[u.sample_id] for u in (uploads[0], uploads[1], uploads[0],
                                                                          uploads[2])]  # fmt: skip
    assert [verify_ack(a, trust=trust, robot_id="r1")[1] for a in acks] == [list(a.sample_ids) for a in acks]
    sequences = [int(a.sequence) for a in acks]
    assert sequences == sorted(set(sequences)) and all(a.key_id == "cloud-test" for a in acks)


def test_a_round_publishes_a_delta_the_robot_applies_and_survives_restart(pretrained_test_pair, uploads, keys,
                                                                           tmp_path):  # fmt: skip
    signer, trust = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud")
    for msg in uploads[:8]:
        trainer.receive_tokens("r1", msg)
    [result] = trainer.step()
    assert (result["version"], result["samples"], result["keyframe"]) == (1, 8, True)
    assert trainer.store.pending_counts() == {}
    record = trainer.store.load_robot("r1")
    delta = wire.decode(wire.WEIGHT_DELTA, record.deltas[1])

    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    status = robot.receive(delta)
    assert status.state == 0 and robot.version == 1
    cloud_params = trainable_parameters(trainer.student)  # the one student, holding r1's state after its round
    robot_params = trainable_parameters(robot._models[robot._active])
    assert all(torch.allclose(cloud_params[k], robot_params[k], atol=1e-2) for k in cloud_params)  # fp16 codec
    assert any(not torch.equal(robot.base[k], robot.current[k]) for k in robot.base)

    # a new process on the same state continues the chain where it stopped
    trainer.receive_status("r1", status)
    trainer.close()
    restarted = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud")
    chain = restarted.robots["r1"].chain
    assert (chain.latest, chain.applied) == (1, 1)
    restored = restarted.adapter_state("r1")  # read from the store: the restarted worker has not run a round yet
    assert restarted.shared.active is None and restored.rounds == 1
    assert all(torch.equal(restored.tensors[f"student.{k}"], cloud_params[k]) for k in cloud_params)
    for msg in uploads[4:]:
        restarted.receive_tokens("r1", msg)
    assert restarted.counters.duplicates == 4 and restarted.counters.received == 4
    for msg in uploads[:4]:  # nothing to add: round 2 needs fresh samples
        restarted.receive_tokens("r1", msg)
    assert restarted.store.pending_counts() == {"r1": 4}


def test_a_crash_inside_a_round_loses_nothing(pretrained_test_pair, uploads, keys, tmp_path, monkeypatch):
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    for msg in uploads[:8]:
        trainer.receive_tokens("r1", msg)

    def crash(samples):
        raise KeyboardInterrupt("killed mid-round")

    monkeypatch.setattr(trainer.distiller, "run_round", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.step()
    trainer.close()
    assert make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud").store.pending_counts() == {"r1": 8}
    restarted = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    [result] = restarted.step()
    assert result["version"] == 1 and result["samples"] == 8


def test_a_robot_behind_gets_the_delta_again_or_a_keyframe(pretrained_test_pair, uploads, keys, tmp_path):
    signer, trust = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    sent = []
    trainer._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    heartbeat = wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=0, reason="heartbeat")
    trainer.receive_status("r1", heartbeat)  # still on v0: the v1 delta was lost
    assert trainer.resend_if_behind("r1")
    assert [(m.version, m.keyframe) for m in sent] == [(1, True), (1, True)]

    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=1, state=0))
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    assert (sent[-1].version, sent[-1].keyframe, sent[-1].base_version) == (2, False, 1)  # incremental
    trainer.receive_status("r1", heartbeat)  # the robot restarted from scratch: v0, and v2 is based on v1
    assert trainer.resend_if_behind("r1")
    assert (sent[-1].version, sent[-1].keyframe) == (2, True)
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    assert robot.receive(sent[-1]).state == 0 and robot.version == 2
    assert trainer.counters.keyframes == 1


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "restarted-between"])
def test_after_a_keyframe_the_next_round_goes_against_the_base_so_the_robot_holds_what_the_cloud_records(
        pretrained_test_pair, uploads, keys, tmp_path, restart):  # fmt: skip
    # Arrange: v1 applied, v2 (incremental on v1) lost, the robot restarted on v0: v2 goes again as a keyframe
    signer, trust = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    sent = []
    capture = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))  # noqa: E731
    trainer._send = capture
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    trainer.receive_status("r1", robot.receive(sent[-1]))
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    assert (sent[-1].version, sent[-1].base_version) == (2, 1)  # lost
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=0))
    assert trainer.resend_if_behind("r1") and trainer.resend_if_behind("r1")
    first, again = sent[-2:]
    assert (first.version, first.keyframe) == (2, True) and wire.encode(again) == wire.encode(first)  # one keyframe
    assert trainer.counters.keyframes == 1
    assert robot.receive(first).state == 0
    if restart:
        trainer.close()
        trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
        trainer._send = capture
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=2, state=0))
    # Act: the next round
    for msg in uploads[8:12]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    # Assert: it goes against the base (the cloud cannot know which v2 the robot took), and once applied the robot
    # holds exactly what the chain records as the base of the round after it
    assert (sent[-1].version, sent[-1].keyframe, sent[-1].base_version) == (3, True, 0)
    assert robot.receive(sent[-1]).state == 0
    recorded = trainer.robots["r1"].chain.published[3]
    assert all(torch.equal(robot.current[k], recorded[k]) for k in recorded)


def test_a_status_of_no_state_or_an_unpublished_version_is_ignored_and_counted(pretrained_test_pair, uploads, keys,
                                                                               tmp_path):  # fmt: skip
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    trainer._send = lambda robot_id, robot, data: None
    status = lambda version, state: wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=version, state=state)  # noqa: E731
    trainer.receive_status("r1", status(3, wire.APPLIED))  # before any round: r1 can only run v0
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    trainer.receive_status("r1", status(1, wire.APPLIED))
    trainer.receive_status("r1", status(0, 7))  # no such state: once taken for APPLIED v0, a resend followed
    trainer.receive_status("r1", status(2, wire.ROLLED_BACK))  # v2 was never published
    assert trainer.counters.statuses_ignored == {"version": 2, "state": 1}
    assert trainer.robots["r1"].reported == 1 and trainer.stats()["declined"] == {}
    assert not trainer.resend_if_behind("r1")


def test_each_robot_has_its_own_adapter_state_and_chain_on_one_student(pretrained_test_pair, uploads, keys,
                                                                       tmp_path):  # fmt: skip
    import dataclasses

    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
        trainer.receive_tokens("r2", dataclasses.replace(msg, robot_id="r2"))
    results = trainer.step()
    assert [(r["robot_id"], r["version"]) for r in results] == [("r1", 1), ("r2", 1)]
    for msg in uploads[4:8]:
        trainer.receive_tokens("r2", dataclasses.replace(msg, robot_id="r2"))
    assert [(r["robot_id"], r["version"]) for r in trainer.step()] == [("r2", 2)]
    r1, r2 = trainer.adapter_state("r1"), trainer.adapter_state("r2")
    assert (r1.rounds, r2.rounds) == (1, 2) and trainer.shared.active == "r2"
    assert any(not torch.equal(r1.tensors[k], r2.tensors[k]) for k in r1.tensors)
    assert (trainer.robots["r1"].chain.latest, trainer.robots["r2"].chain.latest) == (1, 2)
    assert trainer.store.count("r1") == 4 and trainer.store.count("r2") == 8


def test_a_restarted_cloud_runs_the_round_an_uninterrupted_one_would(pretrained_test_pair, uploads, keys, tmp_path):
    """AdamW's moments are committed with each round, so a restart between rounds changes nothing."""

    def second_round(state_dir, restart=None):
        trainer = make_trainer(pretrained_test_pair, keys[0], state_dir, round_size=4)
        for msg in uploads[:4]:
            trainer.receive_tokens("r1", msg)
        assert [r["version"] for r in trainer.step()] == [1]
        if restart is not None:
            trainer.close()
            restart(state_dir)
            trainer = make_trainer(pretrained_test_pair, keys[0], state_dir, round_size=4)
        for msg in uploads[4:8]:
            trainer.receive_tokens("r1", msg)
        assert [r["version"] for r in trainer.step()] == [2]
        distiller = trainer._activate("r1")
        return state_tensors(distiller), distiller.optimizer_state()

    def forget_optimizer(state_dir):  # what a store written before this change holds
        with sqlite3.connect(state_dir / "cloud.sqlite") as db:
            db.execute("UPDATE robots SET optimizer = NULL")

    straight, moments = second_round(tmp_path / "straight")
    restarted, restarted_moments = second_round(tmp_path / "restarted", restart=lambda _: None)
    assert moments and set(restarted_moments) == set(moments)
    assert all(torch.equal(restarted_moments[k], moments[k]) for k in moments)
    assert all(torch.equal(restarted[k], straight[k]) for k in straight)  # bit-identical weights after round 2
    forgot, _ = second_round(tmp_path / "forgot", restart=forget_optimizer)
    assert any(not torch.equal(forgot[k], straight[k]) for k in straight)  # the moments mattered


def test_optimizer_state_for_other_parameters_is_refused(pretrained_test_pair, keys, tmp_path):
    distiller = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")._activate("r1")
    with pytest.raises(ValueError, match="does not name"):
        distiller.load_optimizer_state({"9999.exp_avg": torch.zeros(1)})
    with pytest.raises(ValueError, match="not shaped"):
        distiller.load_optimizer_state({"0.exp_avg": torch.zeros(3, 3, 3), "0.exp_avg_sq": torch.zeros(3, 3, 3),
                                        "0.step": torch.tensor(1.0)})  # fmt: skip
    with pytest.raises(ValueError, match="not AdamW's"):
        distiller.load_optimizer_state({"0.step": torch.tensor(1.0)})


def test_a_store_from_before_the_optimizer_column_opens_and_loads(tmp_path):
    from cloud_trainer.store import CloudStore, to_bytes

    with sqlite3.connect(tmp_path / "old.sqlite") as db:  # the robots table as it was first written
        db.execute("CREATE TABLE robots (robot_id TEXT PRIMARY KEY, latest INTEGER NOT NULL, "
                   "applied INTEGER NOT NULL, student BLOB)")  # fmt: skip
        db.execute("INSERT INTO robots VALUES ('r1', 2, 1, ?)", (to_bytes({"student.w": torch.ones(2)}),))
    store = CloudStore(tmp_path / "old.sqlite")
    record = store.load_robot("r1")
    assert (record.latest, record.applied, record.optimizer) == (2, 1, None)
    assert torch.equal(record.student["student.w"], torch.ones(2))
    store.commit_round("r1", 3, [], record.student, {"w": torch.ones(2)}, b"delta", 1, {"0.step": torch.tensor(3.0)})
    assert store.load_robot("r1").optimizer["0.step"].item() == 3.0
    assert store.load_robot("r1").declined == {}  # no declined table before: created on open
    assert store.record_declined("r1", 3, "rolled back from v3: health check")
    assert not store.record_declined("r1", 3, "again")  # recorded once, the first reason kept
    assert store.load_robot("r1").declined == {3: "rolled back from v3: health check"}


# ------------------------------------------------------------------------- issue 15: D1, Build 1
def _copy(msg, **changes):
    """A received copy of ``msg`` with fields changed (CDR round trip, so arrays are as a link delivers them)."""
    copy = wire.decode(wire.UTS_TOKENS, wire.encode(msg))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


def _wider(msg, width):
    """``msg`` as a robot with a wider vision encoder would send it: consistent, but not for these models."""
    tokens = torch.randn(int(msg.num_tokens), width)
    keep = torch.zeros(int(msg.num_tokens), dtype=torch.bool)
    keep[::2] = True
    return pack_tokens(tokens, keep, torch.rand(int(msg.num_tokens)), robot_id="r1", sample_id="wide",
                       adapter_version=0, prompt=msg.prompt, student_answer="?", sample_entropy=1.0)  # fmt: skip


def _frame(msg, *more):
    """``msg`` carrying ``more`` (sample_id, prompt) pairs about its frame as well, as a robot groups them."""
    return _copy(msg, more_sample_ids=[m[0] for m in more], more_prompts=[m[1] for m in more],
                 more_student_answers=["?"] * len(more), more_sample_entropies=np.ones(len(more), np.float32))


@pytest.mark.parametrize(("label", "make", "reason"), [
    ("a frame's second prompt beyond the LM's positions", lambda m: _frame(m, ("x/long", "is it " * 200)),
     "prompt_too_long"),
    ("more_* arrays that are not aligned", lambda m: _copy(_frame(m, ("x/a", "p")), more_prompts=[]),
     "inconsistent"),
    ("one sample id twice in a frame", lambda m: _frame(m, (m.sample_id, "which digit?")), "sample_id"),
    ("20 more tokens than the encoder's grid", lambda m: _copy(m, sample_id="grid", num_tokens=m.num_tokens + 20),
     "token_grid"),
    ("a 65535 x 65535 grid in ~140 bytes", lambda m: _copy(m, sample_id="huge", num_tokens=65535, token_dim=65535,
     token_indices=np.zeros(0, np.uint16), token_variance=np.zeros(0, np.float32), scales=np.zeros(0, np.float32),
     token_data=np.zeros(0, np.uint8)), "token_grid"),
    ("tokens of another width", lambda m: _wider(m, 24), "token_dim"),
    ("a prompt beyond the LM's positions", lambda m: _copy(m, sample_id="long", prompt="is it " * 200),
     "prompt_too_long"),
    ("a megabyte student_answer", lambda m: _copy(m, sample_id="chatty", student_answer="a" * (1 << 20)),
     "oversized"),
    ("no sample_id", lambda m: _copy(m, sample_id=""), "sample_id"),
])  # fmt: skip
def test_samples_the_models_cannot_take_are_rejected_before_the_ack(label, make, reason, pretrained_test_pair,
                                                                     uploads, keys, tmp_path):  # fmt: skip
    # Prepare
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    bad = make(uploads[0])
    # Execute
    accepted = trainer.receive_tokens("r1", bad, wire.encode(bad))
    # Assert: not stored, not acked, counted under its reason
    assert not accepted, label
    assert trainer.store.count() == 0
    assert (trainer.counters.acked, trainer.counters.rejected) == (0, 1)
    assert trainer.stats()["rejected_reasons"] == {reason: 1}


def test_a_frame_with_three_prompts_is_one_upload_acked_once_and_three_samples(pretrained_test_pair, uploads, keys,
                                                                            tmp_path):  # fmt: skip
    # Prepare: uploads 0-2 are the three prompts about one image; the robot sends them as one message
    link = RecordingLink()
    config = CloudConfig(state_dir=tmp_path / "cloud", round_size=2, codec="fp16", akd=AKDConfig(steps=2, batch_size=4))
    trainer = CloudTrainer(load_mllm(pretrained_test_pair / "teacher"),
                           lambda: load_adaptable_student(pretrained_test_pair), keys[0], config, link)  # fmt: skip
    frame = _frame(uploads[0], *((u.sample_id, u.prompt) for u in uploads[1:3]))
    # Execute
    assert trainer.receive_tokens("r1", frame, wire.encode(frame))
    assert trainer.receive_tokens("r1", uploads[3])
    [result] = trainer.step()
    # Assert: stored and acknowledged as one upload each; the round trained on all four prompts and used both
    acks = [list(msg.sample_ids) for _, topic, msg in link.published if topic == "uts_ack"]
    assert acks == [[uploads[0].sample_id], [uploads[3].sample_id]]
    assert trainer.store.count("r1") == 2 and trainer.counters.received == 2
    assert (result["version"], result["samples"]) == (1, 4)
    assert result["sample_ids"] == [u.sample_id for u in uploads[:4]]
    assert trainer.store.pending_counts() == {}


def test_a_round_takes_whole_uploads_up_to_its_sample_limit():
    def upload(name, prompts):
        return [DistillSample(f"{name}/{i}", torch.zeros(2, 1), torch.ones(2), "p", name) for i in range(prompts)]

    samples = upload("a", 3) + upload("b", 2) + upload("c", 1)
    assert [s.sample_id for s in whole_uploads(samples, 5)] == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    assert [s.sample_id for s in whole_uploads(samples, 4)] == ["a/0", "a/1", "a/2"]  # b would split
    assert [s.sample_id for s in whole_uploads(samples, 1)] == ["a/0", "a/1", "a/2"]  # at least one upload
    assert whole_uploads(samples, 100) == samples


def test_a_frame_that_poisons_the_round_is_quarantined_whole(pretrained_test_pair, uploads, keys, tmp_path):
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=3)
    for msg in uploads[3:5]:
        assert trainer.receive_tokens("r1", msg)
    blowup = _frame(_copy(uploads[0], scales=np.full(len(uploads[0].scales), 1e30, np.float32)),
                    *((u.sample_id, u.prompt) for u in uploads[1:3]))  # fmt: skip
    assert trainer.receive_tokens("r1", blowup)
    [result] = trainer.step()
    assert (result["version"], result["samples"]) == (1, 2)
    assert list(result["quarantined"]) == [blowup.sample_id]  # its three prompts share the tokens: one entry
    assert trainer.store.quarantined("r1")["r1"].keys() == {blowup.sample_id}
    assert trainer.store.pending_counts() == {}


def test_sample_limits_come_from_the_models(pretrained_test_pair, keys, tmp_path):
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    teacher, student = trainer.teacher, trainer.student
    limits = trainer.admission.limits
    vision = teacher.blip2.config.vision_config
    assert limits.num_tokens == (vision.image_size // vision.patch_size) ** 2 + 1
    assert limits.token_dim == vision.hidden_size
    room = [m.blip2.config.text_config.max_position_embeddings - m.num_query_tokens for m in (teacher, student)]
    assert 0 < limits.max_prompt_tokens < min(room)


def test_one_bad_upload_after_three_good_ones_does_not_stop_the_cloud(pretrained_test_pair, uploads, keys,
                                                                      tmp_path):  # fmt: skip
    """Issue 15's D1 repro: 3 valid samples with round_size=4, then a copy with num_tokens += 20, then step()."""
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    for msg in uploads[:3]:
        assert trainer.receive_tokens("r1", msg)
    assert not trainer.receive_tokens("r1", _copy(uploads[3], num_tokens=uploads[3].num_tokens + 20))
    assert trainer.step() == []  # still 3 pending: no round, and no exception
    assert trainer.receive_tokens("r1", uploads[3])
    assert [r["version"] for r in trainer.step()] == [1]


def test_a_poison_sample_in_an_old_store_is_quarantined_and_the_rest_trained(pretrained_test_pair, uploads, keys,
                                                                            tmp_path):  # fmt: skip
    # Prepare: a store written before the admission checks holds one sample the models cannot take
    state = tmp_path / "cloud"
    trainer = make_trainer(pretrained_test_pair, keys[0], state, round_size=4)
    for msg in uploads[:3]:
        trainer.receive_tokens("r1", msg)
    poison = _copy(uploads[3], num_tokens=uploads[3].num_tokens + 20)
    trainer.store.add_sample("r1", poison.sample_id, wire.encode(poison))
    # Execute
    [result] = trainer.step()
    # Assert: quarantined (stored, counted, logged, in stats) and the round ran on the other three
    assert (result["version"], result["samples"]) == (1, 3)
    assert list(result["quarantined"]) == [poison.sample_id]
    assert result["quarantined"][poison.sample_id].startswith("token_grid")
    assert trainer.store.quarantined("r1")["r1"].keys() == {poison.sample_id}
    assert trainer.store.count("r1") == 4 and trainer.store.pending_counts() == {}
    assert trainer.stats()["quarantine"] == {"r1": 1} and trainer.counters.quarantined == 1
    logged = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert logged[-1]["quarantined"] == result["quarantined"]
    # a restart does not meet it again, and a resend of it is acknowledged without being pending again
    trainer.close()
    restarted = make_trainer(pretrained_test_pair, keys[0], state, round_size=1)
    assert restarted.step() == [] and restarted.store.pending_counts() == {}


def test_a_sample_that_poisons_the_round_is_quarantined_and_the_round_goes_on(pretrained_test_pair, uploads, keys,
                                                                              tmp_path):  # fmt: skip
    # Prepare: consistent, right grid, finite values -- but so large that the Q-Former's attention overflows
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    for msg in uploads[:3]:
        assert trainer.receive_tokens("r1", msg)
    blowup = _copy(uploads[3], scales=np.full(len(uploads[3].scales), 1e30, np.float32))
    assert trainer.receive_tokens("r1", blowup)  # admitted: nothing about its sizes is wrong
    # Execute
    [result] = trainer.step()
    # Assert
    assert (result["version"], result["samples"]) == (1, 3)
    assert list(result["quarantined"]) == [blowup.sample_id]
    assert result["quarantined"][blowup.sample_id].startswith("round: ")
    assert trainer.counters.round_failures == 1 and trainer.counters.quarantined == 1
    params = trainer.adapter_state("r1").tensors
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


def test_one_robots_failing_rounds_stop_neither_other_robots_nor_serve(pretrained_test_pair, uploads, keys,
                                                                       tmp_path, monkeypatch):  # fmt: skip
    import dataclasses
    import threading
    import time

    # Prepare: r1's rounds fail for a reason no sample explains (injected); r2 is healthy
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    trainer.config.round_retry_s = 60.0
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    healthy_round = trainer.distiller.run_round

    def broken_round(samples):  # the one distiller serves both robots: only r1's rounds fail
        if trainer.shared.active == "r1":
            raise RuntimeError("disk of the r1 worker is gone")
        return healthy_round(samples)

    monkeypatch.setattr(trainer.distiller, "run_round", broken_round)
    # Execute: serve in a thread while r2 uploads
    stop = threading.Event()
    server = threading.Thread(target=trainer.serve, args=(stop,), daemon=True)
    server.start()
    for msg in uploads[:4]:
        trainer.receive_tokens("r2", dataclasses.replace(msg, robot_id="r2"))
    deadline = time.monotonic() + 60
    while trainer.stats()["versions"].get("r2", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = server.is_alive()
    stop.set()
    server.join(10)
    # Assert
    stats = trainer.stats()
    assert alive and stats["versions"]["r2"] == 1 and stats["versions"]["r1"] == 0
    assert stats["round_failures"] == 1  # held for round_retry_s: not retried in a tight loop
    assert "r1" in stats["on_hold"] and trainer.store.pending_counts() == {"r1": 4}  # nothing lost


def test_a_store_from_before_quarantine_opens_and_quarantines(tmp_path):
    from cloud_trainer.store import CloudStore

    with sqlite3.connect(tmp_path / "old.sqlite") as db:  # the samples table as it was first written
        db.execute("CREATE TABLE samples (robot_id TEXT NOT NULL, sample_id TEXT NOT NULL, received REAL NOT NULL, "
                   "payload BLOB NOT NULL, version INTEGER, PRIMARY KEY (robot_id, sample_id))")  # fmt: skip
        db.executemany("INSERT INTO samples VALUES ('r1', ?, ?, x'00', NULL)", [("a", 1.0), ("b", 2.0)])
    store = CloudStore(tmp_path / "old.sqlite")
    assert [sample_id for sample_id, _ in store.pending("r1")] == ["a", "b"]
    store.quarantine("r1", "a", "token_grid: 30 tokens")
    assert [sample_id for sample_id, _ in store.pending("r1")] == ["b"]
    assert store.quarantined() == {"r1": {"a": "token_grid: 30 tokens"}} and store.pending_counts() == {"r1": 1}


def test_a_prompt_of_exactly_the_longest_admitted_length_trains(pretrained_test_pair, uploads, keys, tmp_path):
    """The prompt bound is tight where it matters: the longest prompt admitted still fits every forward."""
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    limit = trainer.admission.limits.max_prompt_tokens
    prompt = "is the digit"
    while len(trainer.teacher.prompt_ids([prompt + " odd"])[0]) <= limit:
        prompt += " odd"
    assert len(trainer.teacher.prompt_ids([prompt])[0]) == limit
    longest = _copy(uploads[0], sample_id="longest", prompt=prompt)
    too_long = _copy(uploads[0], sample_id="too-long", prompt=prompt + " odd odd")
    assert trainer.receive_tokens("r1", longest) and not trainer.receive_tokens("r1", too_long)
    for msg in uploads[1:4]:
        trainer.receive_tokens("r1", msg)
    [result] = trainer.step()
    assert (result["version"], result["samples"], result["quarantined"]) == (1, 4, {})


def test_a_cloud_on_the_subspace_codec_sends_its_rounds_in_their_subspace(pretrained_test_pair, uploads, keys,
                                                                           tmp_path):  # fmt: skip
    signer, trust = keys
    config = CloudConfig(state_dir=tmp_path / "cloud", round_size=4, max_round_samples=64, codec="subspace",
                         resend_after_s=0.0, akd=AKDConfig(steps=3, batch_size=4))  # fmt: skip
    assert (config.akd.subspace_fold, config.akd.steps) == (8, 6)
    assert config.akd.lambda_anchor_query == pytest.approx(AKDConfig().lambda_anchor_query * 0.3)  # a lighter anchor
    trainer = CloudTrainer(load_mllm(pretrained_test_pair / "teacher"),
                           lambda: load_adaptable_student(pretrained_test_pair), signer, config)  # fmt: skip
    sent = []
    trainer._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    for batch in (uploads[:4], uploads[4:8]):
        for msg in batch:
            trainer.receive_tokens("r1", msg)
        trainer.step()
        status = robot.receive(sent[-1])
        assert status.state == 0 and sent[-1].codec == "subspace"
        trainer.receive_status("r1", status)
        cloud = trainable_parameters(trainer.student)  # the cloud continues from what the robot holds
        held = trainable_parameters(robot._models[robot._active])
        assert all(torch.allclose(cloud[k], held[k], atol=1e-6) for k in cloud)
    assert {(m.version, m.base_version, m.keyframe) for m in sent} == {(1, 0, True), (2, 1, False)}
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=0, reason="heartbeat"))
    assert trainer.resend_if_behind("r1")
    assert (sent[-1].codec, sent[-1].keyframe) == ("ecdq", True)  # two rounds' change: no one round's subspace


def test_a_delta_stored_before_a_key_rotation_is_resent_under_the_new_key(pretrained_test_pair, uploads, tmp_path):
    # Arrange: v1 and v2 signed by cloud-1; v2 resent as a keyframe and stored; the cloud restarts with cloud-2 and
    # the robot trusts only cloud-2 (cloud-1 revoked)
    old_key, _ = generate_key(tmp_path / "k1", "cloud-1")
    new_key, new_public = generate_key(tmp_path / "k2", "cloud-2")
    trust_key(new_public, tmp_path / "trust")
    trainer = make_trainer(pretrained_test_pair, Signer.load(old_key), tmp_path / "cloud", round_size=4)
    sent = []
    capture = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))  # noqa: E731
    trainer._send = capture
    behind_after_two_rounds(trainer, uploads)
    assert trainer.resend_if_behind("r1") and (sent[-1].keyframe, sent[-1].key_id) == (True, "cloud-1")
    trainer.close()
    trainer = make_trainer(pretrained_test_pair, Signer.load(new_key), tmp_path / "cloud", round_size=4)
    trainer._send = capture
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=0))
    # Act: a resend, and a come-back after a give-up
    assert trainer.resend_if_behind("r1")
    robot = trainer.robots["r1"]
    robot.gave_up, robot.comeback_due = 0.0, True
    assert trainer.resend_after_comeback("r1")
    # Assert: the stored keyframe's payload, signed by cloud-2, which the robot applies
    first, again = sent[-2:]
    for msg in (first, again):
        assert (msg.version, msg.keyframe, msg.key_id) == (2, True, "cloud-2")
        assert bytes(msg.payload) == bytes(sent[-3].payload)
    slot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", TrustStore.load(tmp_path / "trust"))
    assert slot.receive(first).state == 0 and slot.version == 2
    assert trainer.counters.keyframes == 0  # no new keyframe was made
