"""A full cloud disk (issue 17: 232 tracebacks in 20 s): one WARNING per cause per 30 s, counted, nothing
acknowledged that is not stored, and the loop goes on when space is back.

The full disk is simulated at the SQLite connection: every write raises the ``OperationalError`` SQLite raises
for ``SQLITE_FULL`` ("database or disk is full"); everything else is the real store.
"""

import errno
import logging
import sqlite3
import time

from cloud_trainer.faults import DISK_FULL, FaultLog, fault_cause
from tests.test_cloud_trainer import RecordingLink, behind_after_two_rounds, make_trainer
from tests.test_cloud_trainer import uploads as uploads  # noqa: F401  (the fixture)


class FullDisk:
    """The store's SQLite connection on a full disk: every write fails as SQLite fails it (``SQLITE_FULL``,
    "database or disk is full"); reads, transactions and rollbacks go to the real connection."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def executemany(self, sql, *args):
        raise sqlite3.OperationalError("database or disk is full")

    def __getattr__(self, name):
        return getattr(self.db, name)


def fill_disk(trainer) -> None:
    trainer.store._db = FullDisk(trainer.store._db)


def free_disk(trainer) -> None:
    trainer.store._db = trainer.store._db.db


def warnings_about(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_a_full_disk_is_one_warning_counted_and_no_ack(pretrained_test_pair, uploads, keys, tmp_path, caplog):
    # Prepare
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=64)
    trainer.link = RecordingLink()
    assert trainer.receive_tokens("r1", uploads[0])
    fill_disk(trainer)
    # Execute: every other sample, resent 5 times as a robot without acks would
    caplog.set_level(logging.INFO)
    results = [trainer.receive_tokens("r1", msg) for _ in range(5) for msg in uploads[1:]]
    # Assert
    assert not any(results)
    acked = [sid for _, topic, msg in trainer.link.published if topic == "uts_ack" for sid in msg.sample_ids]
    assert acked == [uploads[0].sample_id]  # only what is on disk was acknowledged
    assert trainer.counters.store_faults == {DISK_FULL: 5 * (len(uploads) - 1)}
    full = warnings_about(caplog, "disk full")
    assert len(full) == 1 and "storing a sample from r1" in full[0].getMessage() and full[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info]  # no traceback at all
    assert trainer.counters.rejected == 0  # the samples are fine: not counted as bad input

    # space is back: the robot's resends are stored and acknowledged
    free_disk(trainer)
    assert all(trainer.receive_tokens("r1", msg) for msg in uploads[1:])
    assert trainer.store.count("r1") == len(uploads)


def test_a_round_whose_commit_hits_a_full_disk_keeps_its_samples_pending(pretrained_test_pair, uploads, keys,
                                                                         tmp_path, caplog):  # fmt: skip
    # Prepare
    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud", round_size=4)
    trainer._send = lambda robot_id, robot, data: None
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    fill_disk(trainer)
    caplog.set_level(logging.INFO)
    # Execute
    first = trainer.step()
    # Assert
    assert first == [] and trainer.store.pending_counts() == {"r1": 4}
    assert trainer.store.load_robot("r1") is None  # nothing of the round was committed
    assert trainer.counters.store_faults == {DISK_FULL: 1} and trainer.counters.quarantined == 0
    assert len(warnings_about(caplog, "disk full")) == 1
    assert not [r for r in caplog.records if r.exc_info]
    # space is back and the hold is over: the round runs on the same samples
    free_disk(trainer)
    trainer._hold.clear()
    [result] = trainer.step()
    assert result["version"] == 1 and result["samples"] == 4


def test_the_fault_log_says_each_cause_once_per_period_with_the_count():
    # Prepare
    now = [0.0]
    logger = logging.getLogger("tests.fault_log")
    seen = []
    logger.addHandler(handler := logging.Handler())
    handler.emit = lambda record: seen.append(record.getMessage())
    faults = FaultLog(logger, every_s=30.0, clock=lambda: now[0])
    full = OSError(errno.ENOSPC, "No space left on device")
    # Execute
    lines = [faults.record(fault_cause(full), "storing a sample", full) for _ in range(10)]
    now[0] = 31.0
    lines.append(faults.record(fault_cause(full), "storing a sample", full))
    # Assert
    assert lines == [True] + [False] * 9 + [True]
    assert faults.counts == {DISK_FULL: 11}
    assert len(seen) == 2 and "(10 times in the last 30 s)" in seen[1]
    assert fault_cause(ValueError("a bug")) is None  # not the disk's: surfaces as it is
    logger.removeHandler(handler)


def test_a_really_full_database_keeps_its_cause_and_the_store_stays_usable(tmp_path):
    """No fake connection: SQLite's own SQLITE_FULL (``max_page_count`` caps the file as a full disk would) inside a
    round's commit. SQLite may roll the transaction back by itself; the store must report the full disk, not a
    failed ROLLBACK, and serve the next transaction."""
    import torch

    from cloud_trainer.store import CloudStore

    store = CloudStore(tmp_path / "cloud.sqlite")
    store.add_sample("r1", "a", b"x" * 100)
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    big = {"w": torch.zeros(200_000)}
    try:
        store.commit_round("r1", 1, ["a"], big, big, b"d" * 1000, 0)
        raise AssertionError("a commit larger than the room left was stored")
    except sqlite3.OperationalError as err:
        assert "full" in str(err) and fault_cause(err) == DISK_FULL
    assert not store._db.in_transaction and store.latest("r1") == 0 and store.pending_counts() == {"r1": 1}
    store._db.execute("PRAGMA max_page_count = 1073741823")  # room again
    store.commit_round("r1", 1, ["a"], big, big, b"d" * 1000, 0)
    assert store.latest("r1") == 1 and store.pending_counts() == {}
    store.close()


def test_a_keyframe_the_store_cannot_record_is_not_sent_and_tried_again_after_the_wait(
        pretrained_test_pair, uploads, keys, tmp_path, caplog):  # fmt: skip
    # Prepare: v1 applied, v2 (incremental on v1) published, the robot restarted on v0: it needs v2 as a keyframe
    from cdcca import wire

    signer, _ = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    trainer.config.resend_after_s = 3600.0
    trainer.link = RecordingLink()
    behind_after_two_rounds(trainer, uploads)
    robot = trainer.robots["r1"]
    robot.last_sent = float("-inf")  # due now (0.0 is not on a host up for under resend_after_s)
    fill_disk(trainer)
    # Execute: a pass with a full disk, then twenty more
    deltas = lambda: [m for _, topic, m in trainer.link.published if topic == "weight_delta"]  # noqa: E731
    before = len(deltas())
    for _ in range(21):
        trainer.step()
    # Assert: nothing sent (the store could not record the keyframe), one fault, no error per pass, v2 still known
    assert len(deltas()) == before and trainer.counters.keyframes == 0 and trainer.counters.failures == 0
    assert sum(trainer.counters.store_faults.values()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert robot.chain.published[2] and wire.decode(wire.WEIGHT_DELTA, robot.latest_delta).keyframe is False
    # ... and with room again, after the wait, it goes out and is recorded
    free_disk(trainer)
    robot.last_sent = float("-inf")
    trainer.step()
    [keyframe] = deltas()[before:]
    assert (keyframe.version, keyframe.keyframe) == (2, True) and robot.chain.published[2] == {}
    assert trainer.store.load_robot("r1").published[2] == {}


def test_a_come_back_the_store_cannot_record_waits_like_any_come_back(pretrained_test_pair, uploads, keys, tmp_path):
    # Prepare: the robot is behind (it needs v2 as a keyframe), the cloud gave up, the disk is full
    signer, _ = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    trainer.config.resend_after_s = trainer.config.comeback_after_s = 3600.0
    trainer.link = RecordingLink()
    behind_after_two_rounds(trainer, uploads)
    robot = trainer.robots["r1"]
    robot.last_sent, robot.gave_up, robot.comeback_due = time.monotonic(), time.monotonic() - 7200, True
    fill_disk(trainer)
    # Execute: five passes, each after a heartbeat
    for _ in range(5):
        trainer.step()
        trainer.seen("r1")
    # Assert: one try, one fault; the next come-back waits comeback_after_s from it
    assert sum(trainer.counters.store_faults.values()) == 1 and trainer.counters.comeback_resends == 0
    assert not robot.comeback_due and time.monotonic() - robot.gave_up < 60
