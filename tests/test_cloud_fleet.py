"""A cloud for a fleet (issue 16, part 1): one student per worker, a robot is its adapter state.

The reference for "results must not change" is one trainer per robot, i.e. one student per robot as the cloud ran
before; the shared student must publish the same bytes for the same interleaved rounds.
"""

import dataclasses
import gc
import weakref

import pytest
import torch

from cdcca import wire
from cdcca.akd import AKDConfig, source_anchors
from cdcca.data.digits_shift import load_domain
from cdcca.envelope import Signer, generate_key
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.models.mllm import MLLM
from cdcca.uts import pack_tokens
from cloud_trainer.service import CloudConfig, CloudTrainer

# (robot, uploads of its round): r1, r2, r1, r2 interleaved, different samples per robot and round
SCHEDULE = [("r1", slice(0, 4)), ("r2", slice(8, 12)), ("r1", slice(4, 8)), ("r2", slice(0, 4))]


@pytest.fixture(scope="module")
def uploads(pretrained_test_pair):
    """12 printed-domain UtsTokens (4 images x 3 tasks), half of each image's tokens kept."""
    student = load_mllm(pretrained_test_pair / "student")
    samples = load_domain("printed", "stream", limit=4)
    with torch.inference_mode():
        tokens = student.visual_tokens(student.preprocess([s.load_image() for s in samples]))  # (B, N, D)
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[1::2] = True
    variance = torch.linspace(0, 1, tokens.shape[1])
    return [pack_tokens(tokens[i], keep, variance, robot_id="r1", sample_id=s.sample_id, adapter_version=0,
                        prompt=s.prompt, student_answer="?", sample_entropy=1.0)
            for i, s in enumerate(samples)]  # fmt: skip


@pytest.fixture(scope="module")
def fleet(pretrained_test_pair, tmp_path_factory):
    """What every trainer here shares: the checkpoints, a signing key, the teacher and its anchor set."""
    teacher = load_mllm(pretrained_test_pair / "teacher")
    private, _ = generate_key(tmp_path_factory.mktemp("keys"), "cloud-fleet")
    return {"checkpoints": pretrained_test_pair, "signer": Signer.load(private), "teacher": teacher,
            "anchors": source_anchors(teacher, images=4)}  # fmt: skip


def make_trainer(fleet, state_dir, adapter_cache=4, make_student=None):
    config = CloudConfig(state_dir=state_dir, round_size=4, max_round_samples=4, codec="fp16", round_retry_s=0.0,
                         adapter_cache=adapter_cache,  # anchors replayed and checked; every round keeps its steps
                         akd=AKDConfig(steps=3, batch_size=4, anchor_batch=4, forget_tolerance=1.0))  # fmt: skip
    checkpoints = fleet["checkpoints"]
    make = make_student or (lambda: load_adaptable_student(checkpoints))
    return CloudTrainer(fleet["teacher"], make, fleet["signer"], config, anchors=fleet["anchors"])


def upload(trainer, robot_id, msgs):
    for msg in msgs:
        assert trainer.receive_tokens(robot_id, dataclasses.replace(msg, robot_id=robot_id))


def published(trainer, robot_id):
    """The robot's latest WeightDelta, as the cloud committed and sent it."""
    return wire.decode(wire.WEIGHT_DELTA, trainer.robots[robot_id].latest_delta)


def same_delta(a, b) -> bool:
    """Same version, codec and payload bytes (what the robot decodes); stamps and signatures may differ."""
    what = lambda m: (m.robot_id, m.version, m.base_version, m.keyframe, m.codec, m.num_params,  # noqa: E731
                      bytes(m.sha256), bytes(m.payload))  # fmt: skip
    return what(a) == what(b)


@pytest.fixture(scope="module")
def reference(fleet, uploads, tmp_path_factory):
    """The schedule on one trainer per robot (one student each): robot -> its deltas and final adapter state."""
    trainers = {robot_id: make_trainer(fleet, tmp_path_factory.mktemp(f"alone-{robot_id}"))
                for robot_id in ("r1", "r2")}  # fmt: skip
    deltas = {"r1": [], "r2": []}
    for robot_id, chosen in SCHEDULE:
        upload(trainers[robot_id], robot_id, uploads[chosen])
        assert [(r["robot_id"], r["kept_step"]) for r in trainers[robot_id].step()] == [(robot_id, 3)]  # it trained
        deltas[robot_id].append(published(trainers[robot_id], robot_id))
    return {robot_id: (deltas[robot_id], trainers[robot_id].adapter_state(robot_id)) for robot_id in deltas}


@pytest.mark.parametrize("adapter_cache", [0, 1, 4], ids=["from-store", "evicting", "in-memory"])
def test_one_shared_student_publishes_the_bytes_of_one_student_per_robot(adapter_cache, fleet, uploads, reference,
                                                                          tmp_path):  # fmt: skip
    # Prepare
    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=adapter_cache)
    deltas = {"r1": [], "r2": []}
    # Execute: r1, r2, r1, r2 on the one student
    for robot_id, chosen in SCHEDULE:
        upload(trainer, robot_id, uploads[chosen])
        assert [r["robot_id"] for r in trainer.step()] == [robot_id]
        deltas[robot_id].append(published(trainer, robot_id))
    # Assert: every delta bit-identical (payload bytes, hence decoded tensors), and so is the state each robot ends in
    for robot_id, (expected, state) in reference.items():
        assert [(d.version, d.keyframe) for d in deltas[robot_id]] == [(1, True), (2, True)]
        assert all(same_delta(got, want) for got, want in zip(deltas[robot_id], expected, strict=True)), robot_id
        mine = trainer.adapter_state(robot_id)
        assert mine.rounds == state.rounds == 2
        assert mine.tensors.keys() == state.tensors.keys() and mine.optimizer.keys() == state.optimizer.keys()
        assert all(torch.equal(mine.tensors[k], state.tensors[k]) for k in state.tensors)
        assert all(torch.equal(mine.optimizer[k], state.optimizer[k]) for k in state.optimizer)
    assert len(trainer.shared.cached()) == min(adapter_cache, 1)  # r1 waits in memory unless the cache is off
    r1, r2 = reference["r1"], reference["r2"]  # the robots and their rounds did differ
    assert len({bytes(d.payload) for d in r1[0] + r2[0]}) == 4
    assert any(not torch.equal(r1[1].tensors[k], r2[1].tensors[k]) for k in r1[1].tensors)


def test_a_failed_round_leaves_no_trace_in_the_shared_student(fleet, uploads, reference, tmp_path, monkeypatch):
    # Prepare: r1's second round trains, then fails before its commit (after r2's state went to memory)
    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=4)
    for robot_id, chosen in SCHEDULE[:2]:
        upload(trainer, robot_id, uploads[chosen])
        trainer.step()
    real_round, calls = trainer.distiller.run_round, []

    def trains_then_fails(samples):
        report = real_round(samples)  # the shared student's weights and moments moved
        calls.append(trainer.shared.active)
        if len(calls) == 1:
            raise RuntimeError("the worker lost its scratch disk")
        return report

    monkeypatch.setattr(trainer.distiller, "run_round", trains_then_fails)
    upload(trainer, "r1", uploads[SCHEDULE[2][1]])
    # Execute: the failing pass, then the retry
    assert trainer.step() == [] and trainer.counters.round_failures == 1
    [result] = trainer.step()
    # Assert: the retry starts from r1's committed state and publishes what one student per robot published
    assert calls == ["r1", "r1"] and result["version"] == 2
    assert same_delta(published(trainer, "r1"), reference["r1"][0][1])


def test_memory_holds_one_student_whatever_the_number_of_robots(fleet, uploads, tmp_path):
    # Prepare: count the students built and the MLLMs alive
    gc.collect()
    alive_before = sum(isinstance(o, MLLM) for o in gc.get_objects())
    built = []

    def make_student():
        student = load_adaptable_student(fleet["checkpoints"])
        built.append(weakref.ref(student))
        return student

    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=2, make_student=make_student)
    # Execute: six robots, one round each
    robots = [f"robot-{i}" for i in range(6)]
    for robot_id in robots:
        upload(trainer, robot_id, uploads[:4])
    results = trainer.step()
    gc.collect()
    # Assert: six versions from one student; the teacher is the fleet's, so one MLLM more than before
    assert [(r["robot_id"], r["version"]) for r in results] == [(r, 1) for r in robots]
    assert len(built) == 1 and built[0]() is trainer.student
    assert sum(isinstance(o, MLLM) for o in gc.get_objects()) - alive_before == 1
    # adapter states in memory: the cache's two and the one in the student; the rest are in the store only
    assert trainer.shared.cached() == robots[-3:-1] and trainer.shared.active == robots[-1]
    assert all(trainer.store.load_adapter_state(r)[0] == 1 for r in robots)


def test_an_adapter_cache_below_zero_is_refused():
    with pytest.raises(ValueError, match="adapter_cache"):
        CloudConfig(adapter_cache=-1)
