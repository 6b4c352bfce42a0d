"""Resends after rejections (issue 17, Trust and updates): the give-up is a WARNING naming the robot, the version
and the robot's last reason, and a robot that comes back afterwards gets the version again, once per come-back."""

import logging

import pytest

from cdcca import wire
from cdcca.edge.adapter_slot import AdapterSlot
from cdcca.envelope import TrustStore, generate_key
from cdcca.models.checkpoint import load_adaptable_student
from tests.test_cloud_trainer import make_trainer
from tests.test_cloud_trainer import uploads as uploads  # noqa: F401  (the fixture)


@pytest.fixture()
def rejected_five_times(pretrained_test_pair, uploads, keys, tmp_path, caplog):
    """A cloud that published v1 to r1 and resent it 5 times; r1 trusts another key and rejected every one.
    Returns (trainer, the deltas sent, r1's statuses)."""
    signer, _ = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    trainer.config.comeback_after_s = 0.0
    sent = []
    trainer._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    _, other = generate_key(tmp_path / "other", "someone-else")
    wrong = TrustStore()
    wrong.add("someone-else", other.read_text())
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", wrong)
    statuses = []
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    caplog.set_level(logging.INFO)
    trainer.step()
    trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED))
    for _ in range(12):  # resend_after_s is 0: every pass resends until the cloud gives up
        while sent:
            statuses.append(robot.receive(sent.pop(0)))
            trainer.receive_status("r1", statuses[-1])
        trainer.step()
    return trainer, sent, statuses


def test_the_give_up_is_a_warning_with_robot_version_and_reason(rejected_five_times, caplog):
    # Prepare / Execute: the fixture
    trainer, sent, statuses = rejected_five_times
    # Assert
    assert len(statuses) == 6 and all(s.state == wire.REJECTED for s in statuses)  # first send + 5 resends
    assert trainer.counters.resends == 5 and trainer.counters.give_ups == 1 and sent == []
    records = caplog.get_records("setup")  # the fixture ran the loop
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING and "giving up" in r.getMessage()]
    assert len(lines) == 1
    assert "robot r1" in lines[0] and "v1" in lines[0] and statuses[-1].reason in lines[0]
    assert trainer.counters.update_rejections  # counted by reason kind
    assert trainer.robots["r1"].last_reject_reason == statuses[-1].reason


@pytest.mark.parametrize("message", ["status", "upload"])
def test_a_robot_that_comes_back_with_a_fixed_trust_store_gets_the_version(message, rejected_five_times,
                                                                          pretrained_test_pair, uploads,
                                                                          keys):  # fmt: skip
    # Prepare: r1 restarts with a trust store that trusts the cloud
    trainer, sent, _ = rejected_five_times
    robot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", keys[1])
    # Execute: its first message, a heartbeat or an upload, is a come-back
    if message == "status":
        trainer.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED,
                                              reason="heartbeat"))  # fmt: skip
    else:
        assert trainer.receive_tokens("r1", uploads[4])
    trainer.step()
    # Assert
    assert [(m.version, m.keyframe) for m in sent] == [(1, True)]
    status = robot.receive(sent.pop())
    assert status.state == wire.APPLIED and robot.version == 1
    trainer.receive_status("r1", status)
    assert trainer.robots["r1"].reported == 1 and trainer.counters.comeback_resends == 1
    trainer.step()
    assert sent == []  # up to date: nothing more


def test_come_backs_are_bounded_by_a_doubling_wait(rejected_five_times):
    # Prepare: come-backs need 30 s after the give-up, then 60 s after that one
    trainer, sent, _ = rejected_five_times
    trainer.config.comeback_after_s = 30.0
    robot = trainer.robots["r1"]
    heartbeat = wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED, reason="heartbeat")
    # Execute / Assert: heartbeats right after the give-up are no come-back
    for _ in range(3):
        trainer.receive_status("r1", heartbeat)
        trainer.step()
    assert sent == []
    robot.gave_up -= 31.0  # 31 s later
    trainer.receive_status("r1", heartbeat)
    trainer.step()
    assert len(sent) == 1 and robot.comebacks == 1
    robot.gave_up -= 31.0  # 31 s after that come-back: less than the doubled wait
    trainer.receive_status("r1", heartbeat)
    trainer.step()
    assert len(sent) == 1
    robot.gave_up -= 30.0  # 61 s
    trainer.receive_status("r1", heartbeat)
    trainer.step()
    assert len(sent) == 2 and robot.comebacks == 2
