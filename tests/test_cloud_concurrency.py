"""The cloud trainer while the link's threads deliver statuses during a round, its undo and its resends:
each interleaving is held at its point with events (found by a review, each reproduced before the fix)."""

import sqlite3
import threading

import pytest

from cdcca import wire
from cdcca.edge.adapter_state import rollback_reason
from cloud_trainer.service import RoundAbandoned
from tests.test_cloud_fleet import fleet as fleet  # noqa: F401  (the fixture)
from tests.test_cloud_trainer import RecordingLink, make_trainer
from tests.test_cloud_trainer import uploads as uploads  # noqa: F401  (the fixture)


def status(version, state=wire.APPLIED, reason=""):
    return wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=version, state=state, reason=reason)


def trainer_on_v1(checkpoints, signer, state_dir, uploads):
    trainer = make_trainer(checkpoints, signer, state_dir, round_size=4)
    trainer.link = RecordingLink()
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    trainer.receive_status("r1", status(1))
    return trainer


def deltas(trainer):
    return [(m.version, m.keyframe) for _, topic, m in trainer.link.published if topic == "weight_delta"]


def test_a_rollback_that_arrives_while_a_failed_round_is_undone_is_kept(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: v1 applied; the next round fails to commit (full disk) and is undone
    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)
    robot = trainer.robots["r1"]

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    trainer._train_and_commit = full
    undoing, go = threading.Event(), threading.Event()
    load = trainer.store.load_robot

    def held(robot_id, adapter=True):  # the undo has read the last commit: the link thread delivers a rollback now
        record = load(robot_id, adapter)
        if threading.current_thread() is threading.main_thread() and not go.is_set():
            undoing.set()
            go.wait(10)
        return record

    trainer.store.load_robot = held

    def link_thread():
        undoing.wait(10)
        trainer.receive_status("r1", status(0, wire.ROLLED_BACK, rollback_reason(1, "health check failed")))
        go.set()

    thread = threading.Thread(target=link_thread)
    thread.start()
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    thread.join(10)
    trainer.store.load_robot = load
    # Assert: one robot object throughout; the rollback is in memory and in the store, and v1 is never sent again
    assert trainer.robots["r1"] is robot and robot.reported == 0 and 1 in robot.declined
    assert robot.chain.applied == 0  # the next delta goes against what the robot runs, not against v1
    assert 1 in trainer.store.load_robot("r1", adapter=False).declined
    trainer.link.published.clear()
    trainer.receive_status("r1", status(0))
    assert not trainer.resend_if_behind("r1") and deltas(trainer) == []


def test_a_failed_round_keeps_the_give_up_and_the_robots_last_rejection(pretrained_test_pair, uploads, keys, tmp_path):
    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)
    trainer.config.max_resends = 1
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    trainer.step()  # v2, which the robot refuses
    trainer.receive_status("r1", status(1, wire.REJECTED, "signature: unknown key"))
    trainer.resend_if_behind("r1")
    trainer.resend_if_behind("r1")  # one resend, then the give-up
    robot = trainer.robots["r1"]
    assert trainer.counters.give_ups == 1 and robot.gave_up is not None
    # Act: a round fails and is undone
    trainer._undo("r1", robot.chain.latest)
    trainer.resend_if_behind("r1")
    # Assert: still given up once, with the robot's reason
    assert trainer.counters.give_ups == 1 and robot.gave_up is not None
    assert robot.rejections == 1 and robot.last_reject_reason == "signature: unknown key"


def test_a_come_back_does_not_mark_a_robot_that_caught_up_meanwhile_as_given_up(pretrained_test_pair, uploads, keys,
                                                                                tmp_path):  # fmt: skip
    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)
    trainer.config.max_resends, trainer.config.comeback_after_s = 1, 0.0
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    trainer.step()  # v2; the robot stays on v1
    trainer.resend_if_behind("r1")
    trainer.resend_if_behind("r1")  # the give-up
    trainer.seen("r1")  # it comes back
    keyframe = trainer._keyframe

    def caught_up_meanwhile(robot_id, robot):
        msg = keyframe(robot_id, robot)
        thread = threading.Thread(target=trainer.receive_status, args=("r1", status(2)))
        thread.start()
        thread.join(10)
        return msg

    trainer._keyframe = caught_up_meanwhile
    trainer.step()
    robot = trainer.robots["r1"]
    assert robot.reported == 2 and robot.gave_up is None


def test_a_stop_while_the_samples_of_a_failed_round_are_probed_counts_as_abandoned(pretrained_test_pair, uploads,
                                                                                    keys, tmp_path):  # fmt: skip
    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)

    def fails(*args, **kwargs):
        raise RuntimeError("a round that fails")

    def stopped(*args, **kwargs):
        raise RoundAbandoned("r1")

    trainer._train_and_commit, trainer._probe = fails, stopped
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    with pytest.raises(RoundAbandoned):
        trainer.run_round("r1")
    assert trainer.counters.rounds_abandoned == 1 and trainer.store.pending_counts() == {"r1": 4}


def test_a_rollback_after_an_abandoned_round_is_recorded(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: v1 applied; the next round is abandoned (the service is stopping)
    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)

    def stopping(*args, **kwargs):
        raise RoundAbandoned("r1")

    trainer._train_and_commit = stopping
    for msg in uploads[4:8]:
        trainer.receive_tokens("r1", msg)
    with pytest.raises(RoundAbandoned):
        trainer.run_round("r1")
    # Act: the robot rolls back from v1 before the service closes
    trainer.receive_status("r1", status(0, wire.ROLLED_BACK, rollback_reason(1, "health check failed")))
    # Assert: recorded (it used to find no robot and be ignored, and a restarted cloud sent v1 again)
    assert trainer.counters.rollbacks == 1 and trainer.counters.statuses_ignored == {}
    assert 1 in trainer.store.load_robot("r1", adapter=False).declined


def test_a_round_another_worker_committed_first_leaves_the_version_to_that_worker(fleet, uploads, tmp_path):
    from tests.test_cloud_fleet import make_trainer as make_worker
    from tests.test_cloud_fleet import upload

    # Prepare: worker a publishes v1, which the robot does not apply, and gives up; worker b then commits v2
    store = tmp_path / "shared.sqlite"
    a = make_worker(fleet, tmp_path / "a", store=store, worker_id="a", resend_after_s=0.5, max_resends=1)
    b = make_worker(fleet, tmp_path / "b", store=store, worker_id="b", resend_after_s=0.5)
    a.link, b.link = RecordingLink(), RecordingLink()
    upload(a, "r1", uploads[0:4])
    assert [r["version"] for r in a.step()] == [1]
    a.receive_status("r1", status(0))
    robot = a.robots["r1"]
    for _ in range(2):
        robot.last_sent = float("-inf")  # due now
        a.resend_if_behind("r1")
    assert robot.gave_up is not None
    upload(b, "r1", uploads[4:8])
    assert [r["version"] for r in b.step()] == [2]
    # Act: a's round of v2 (claimed before b's commit) is refused by the store
    upload(a, "r1", uploads[8:12])
    assert a.run_round("r1")["event"] == "superseded"
    # Assert: v2 is b's: a resends it only as a backup, with no give-up state of its own v1
    assert (robot.chain.latest, robot.owned, robot.resends, robot.gave_up, robot.comebacks) == (2, False, 0, None, 0)
    a.link.published.clear()
    robot.last_sent -= 0.6  # past b's wait, not a's (twice as long)
    assert not a.resend_if_behind("r1")


def test_counters_the_link_threads_bump_together_lose_no_count(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: four link threads each refuse uploads, ignore statuses and hear rejections, switching threads as
    # often as they can
    import sys

    trainer = trainer_on_v1(pretrained_test_pair, keys[0], tmp_path / "cloud", uploads)
    forged = status(99)  # a version this cloud never published: ignored
    refused = status(1, wire.REJECTED, "signature: unknown key")  # counted for the robot and by reason
    per_thread, threads = 300, 4
    interval = sys.getswitchinterval()

    def link_thread():
        for _ in range(per_thread):
            assert not trainer.receive_tokens("r1", None)  # no message at all: refused as malformed
            trainer.receive_status("r1", forged)
            trainer.receive_status("r1", refused)

    # Execute
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=link_thread) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)

    # Assert: every refusal and every ignored status is counted, in the totals and by reason
    stats = trainer.stats()
    assert stats["rejected"] == per_thread * threads
    assert sum(stats["rejected_reasons"].values()) == per_thread * threads
    assert stats["statuses_ignored"] == {"version": per_thread * threads}
    assert stats["update_rejections"] == {"signature": per_thread * threads}
    assert trainer.robots["r1"].rejections == per_thread * threads
    trainer.close()
