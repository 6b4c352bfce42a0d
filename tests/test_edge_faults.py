"""Everyday faults on the robot are logged, counted and skipped; answers keep coming (issue 17, §3).

A full disk is SQLite's own where it can be: ``PRAGMA max_page_count`` caps the uplink database, so SQLite itself
answers a write that needs a new page with SQLITE_FULL ("database or disk is full") and rolls the transaction back,
as on a full file system. The runtime's samples are too small to need a new page, so there the connection is
wrapped to fail the uplink INSERT the way SQLite does (roll back, then raise SQLITE_FULL). Broken images are real
files: a JPEG cut in half, a PNG with garbage after its header.
"""

import io
import logging
import sqlite3
import time

import numpy as np
import pytest
from PIL import Image

from cdcca.edge.app import ReplaySettings, build_runtime, replay
from cdcca.edge.runtime import EdgeConfig
from cdcca.edge.uplink import UplinkQueue, UplinkWriteError
from cdcca.envelope import generate_key, trust_key
from cdcca.uts import UTSConfig

ALL_SAMPLES = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)  # every answer goes to the uplink


def fill_disk(queue: UplinkQueue) -> None:
    """From now on the queue's database cannot grow: a write that needs another page is SQLITE_FULL."""
    (pages,) = queue._db.execute("PRAGMA page_count").fetchone()
    queue._db.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(queue: UplinkQueue) -> None:
    queue._db.execute("PRAGMA max_page_count = 1073741823")


class FullDisk:
    """The queue's SQLite connection on a full disk: storing a sample fails as SQLite fails on SQLITE_FULL (the
    transaction is rolled back by SQLite, then the error is raised); everything else is the real connection."""

    def __init__(self, db: sqlite3.Connection, failing: tuple[str, ...] = ("INSERT OR IGNORE INTO UPLINK",)) -> None:
        self.db, self.failing = db, failing

    def _fail_if_full(self, sql: str) -> None:
        if sql.lstrip().upper().startswith(self.failing):
            self.db.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args):
        self._fail_if_full(sql)
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, *args):
        self._fail_if_full(sql)
        return self.db.executemany(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_full_disk_drops_the_sample_with_the_real_cause_and_keeps_the_queue(tmp_path):
    # Prepare: two samples stored, then the disk fills up
    queue = UplinkQueue(tmp_path / "uplink.sqlite")
    queue.put("kept-1", 1.0, b"x" * 3000)
    queue.put("kept-2", 2.0, b"y" * 3000)
    fill_disk(queue)

    # Execute
    with pytest.raises(UplinkWriteError) as caught:
        queue.put("lost", 3.0, b"z" * 20000)

    # Assert
    message = str(caught.value)
    assert caught.value.disk_full and "disk full" in message and "lost" in message
    assert "cannot rollback" not in message and "no transaction is active" not in message
    assert not queue._db.in_transaction
    assert queue.ids() == ["kept-2", "kept-1"]
    assert queue.stats().write_failures == 1 and queue.stats().enqueued == 2
    free_disk(queue)  # room again: the queue works as before
    assert queue.put("later", 4.0, b"w" * 20000) is None and len(queue) == 3


@pytest.fixture()
def robot(tmp_path, pretrained_test_pair):
    _, public = generate_key(tmp_path / "keys", "cloud-1")
    trust_key(public, tmp_path / "trust")
    config = EdgeConfig(state_dir=tmp_path / "edge", uts=ALL_SAMPLES, batch_size=2)
    runtime = build_runtime(pretrained_test_pair, config, tmp_path / "trust")
    yield runtime
    runtime.close()


def test_answers_continue_on_a_full_disk_and_the_log_says_so(robot, caplog):
    # Prepare
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), np.uint8) for _ in range(6)]
    robot.ask(images[:2], ["what digit?"] * 2)
    queued_before = robot.uplink.ids()
    robot.uplink._db = FullDisk(robot.uplink._db)

    # Execute
    with caplog.at_level(logging.WARNING):
        answers = robot.ask(images[2:], ["what digit?"] * 4)

    # Assert
    assert len(answers) == 4 and all(a.answer for a in answers)
    assert robot.counters.answers == 6 and robot.counters.faults == {"uplink_disk_full": 4}
    assert robot.uplink.ids() == queued_before and len(queued_before) == 2  # nothing stored before is lost
    logged = [r.getMessage() for r in caplog.records if "uplink_disk_full" in r.getMessage()]
    assert len(logged) == 3  # the 1st, 2nd and 4th: a disk that stays full does not flood the log
    assert all("disk full" in m and "answers continue" in m for m in logged)
    assert not any("cannot rollback" in r.getMessage() for r in caplog.records)
    assert robot.stats()["uplink_write_failures"] == 4


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_truncated_jpeg_in_a_folder_is_skipped_and_counted(robot, tmp_path, caplog):
    # Prepare: good, truncated JPEG, corrupt PNG, good
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = _jpeg(rng.integers(0, 255, (32, 32, 3), np.uint8))
    (folder / "a.jpg").write_bytes(good)
    (folder / "b.jpg").write_bytes(good[: len(good) // 2])
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, np.uint8)))
    (folder / "d.jpg").write_bytes(_jpeg(rng.integers(0, 255, (32, 32, 3), np.uint8)))
    settings = ReplaySettings(f"dir:{folder}", ("what digit?",), batch_size=2, linger_s=0.0)

    # Execute
    import threading

    with caplog.at_level(logging.WARNING):
        report = replay(robot, settings, threading.Event())

    # Assert
    assert report["queries"] == 2 and report["answers"] == 2
    assert report["faults"] == {"bad_image": 2}
    named = [r.getMessage() for r in caplog.records if "bad_image" in r.getMessage()]
    assert any("b.jpg" in m for m in named) and any("c.png" in m for m in named)


def test_bag_messages_that_do_not_decode_are_runtime_faults(robot, tmp_path):
    from rosbags.rosbag2 import StoragePlugin

    from tests.test_edge_encodings import JAZZY, START_NS, _case, _image, record

    good = bytes(JAZZY.serialize_cdr(_image("rgb8", START_NS, *_case("rgb8")[:2]), "sensor_msgs/msg/Image"))
    bag = record(tmp_path / "bag", "rgb8", frames=4, storage=StoragePlugin.MCAP, raw=good[:40], bad=(1, 2))
    settings = ReplaySettings(f"bag:{bag}", ("what digit?",), batch_size=2, speed=0.0, linger_s=0.0)

    import threading

    report = replay(robot, settings, threading.Event())

    assert report["answers"] == 2 and report["faults"] == {"bag_message": 2}


class ListPort:
    topics = frozenset({"uts_tokens", "answer", "adapter_status"})

    def __init__(self):
        self.sent = []

    def publish(self, topic: str, data: bytes) -> None:
        self.sent.append(topic)


def test_a_full_disk_while_sending_keeps_the_samples_and_does_not_flood(robot):
    # Prepare: two samples of two frames queued, then marking them as sent fails (the WAL cannot grow)
    robot.ask([np.zeros((32, 32, 3), np.uint8) for _ in range(2)], ["what digit?"] * 2)
    port = ListPort()
    robot.connect(port)
    robot.uplink._db = FullDisk(robot.uplink._db, failing=("UPDATE UPLINK SET SENT_AT",))

    # Execute
    sent = [robot.pump() for _ in range(3)]

    # Assert: nothing goes out unmarked (it would go out again at every pump), nothing is lost
    assert sent == [0, 0, 0] and "uts_tokens" not in port.sent
    assert robot.counters.faults == {"uplink_disk_full": 3} and len(robot.uplink) == 2
    robot.uplink._db = robot.uplink._db.db  # room again
    assert robot.pump() == 2 and port.sent.count("uts_tokens") == 2


class FlakyPort(ListPort):
    """A link that refuses to publish while ``down`` (a closed session raises)."""

    down = True

    def publish(self, topic: str, data: bytes) -> None:
        if self.down:
            raise ConnectionError("session closed")
        super().publish(topic, data)


def test_uploads_the_link_refused_go_out_at_the_next_pump_and_count_as_sent_only_then(robot):
    # Prepare: two uploads of two frames queued; the link is down
    robot.ask([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)], ["what digit?"] * 2)
    port = FlakyPort()
    robot.connect(port)

    # Execute + Assert: nothing went out and nothing counts as sent; the pumps right after wait (no retry storm)
    assert robot.pump() == 0 and robot.counters.publish_errors == 1 and robot.uplink.stats().sent == 0
    assert [robot.pump() for _ in range(5)] == [0] * 5 and robot.counters.publish_errors == 1
    time.sleep(0.6)  # the first wait is 0.5 s; then it doubles while the link refuses
    assert robot.pump() == 0 and robot.counters.publish_errors == 2
    port.down = False
    time.sleep(1.1)
    assert robot.pump() == 2 and port.sent.count("uts_tokens") == 2  # not resend_after_s (10 s) later
    assert robot.uplink.stats().sent == 2 and robot.pump() == 0
