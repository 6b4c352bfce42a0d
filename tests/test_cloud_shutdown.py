"""Stopping the cloud (issue 17, Errors): within 2 s of Ctrl-C even mid-round, the round abandoned before its
commit (its samples stay pending, one line says so), and a second Ctrl-C exits at once.

The cloud runs as ``python -m cloud_trainer`` with a round that would take hours; the test uploads over a real
Zenoh link on loopback and signals the process.
"""

import signal
import subprocess
import sys
import time

import pytest

from cdcca.envelope import generate_key
from cdcca.transport import Link, LinkConfig
from cloud_trainer.store import CloudStore
from tests.test_cloud_trainer import r1_uploads
from tests.test_transport import wait_until

ROUND = 4


def private_endpoint(tmp_path) -> str:
    """A Unix socket in the test's folder: unlike a loopback TCP port just freed, no robot of another test still
    retries it, so only this test's uploads reach the cloud."""
    return f"unixsock-stream/{tmp_path / 'cloud.sock'}"
STOP_S = 2.0  # issue 17: the cloud stops within 2 s of Ctrl-C
EXIT_SLACK_S = 10.0  # then the interpreter unloads torch and transformers: 1.5 s idle here, more on a busy machine


@pytest.fixture(scope="module")
def uploads(pretrained_test_pair):
    """``ROUND`` UtsTokens of robot r1 (every other token kept)."""
    return r1_uploads(pretrained_test_pair, images=ROUND, count=ROUND)  # three prompts per image: the first ROUND


def start_mid_round(pretrained_test_pair, uploads, tmp_path):
    """A cloud process whose first round (``ROUND`` samples, 100000 AKD steps) is running; (process, log path,
    the uploading link)."""
    key, _ = generate_key(tmp_path / "keys", "cloud-test")
    endpoint = private_endpoint(tmp_path)
    log_path = tmp_path / "cloud.log"
    argv = [sys.executable, "-u", "-m", "cloud_trainer", "--checkpoints", str(pretrained_test_pair), "--state",
            str(tmp_path / "cloud"), "--key", str(key), "--endpoint", endpoint, "--round-size", str(ROUND),
            "--steps", "100000", "--threads", "1"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    robot = None
    try:
        assert wait_until(lambda: "cloud trainer serving" in log_path.read_text(), 90), log_path.read_text()[-2000:]
        robot = Link(LinkConfig(connect=[endpoint]))
        acks = []
        robot.subscribe("r1", "uts_ack", lambda robot_id, msg, data: acks.extend(msg.sample_ids))
        assert wait_until(lambda: robot.peers() >= 1)
        for msg in uploads:
            robot.publish("r1", "uts_tokens", msg)
        assert wait_until(lambda: f"round v1 on {ROUND} samples started" in log_path.read_text(), 60), \
            log_path.read_text()[-2000:]  # fmt: skip
        assert wait_until(lambda: len(set(acks)) == ROUND)  # every sample is on disk (acknowledged)
        time.sleep(1.0)  # inside the AKD steps
    except BaseException:
        process.kill()
        if robot is not None:
            robot.close()
        raise
    return process, log_path, robot


def test_ctrl_c_mid_round_stops_within_2_s_and_the_samples_stay_pending(pretrained_test_pair, uploads, tmp_path):
    # Prepare
    process, log_path, robot = start_mid_round(pretrained_test_pair, uploads, tmp_path)
    try:
        # Execute: the service has stopped when its stats table is out (stdout unbuffered)
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        stopped = wait_until(lambda: "rounds_abandoned" in log_path.read_text(), timeout=30)
        took = time.monotonic() - signalled
        code = process.wait(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        robot.close()
        if process.poll() is None:
            process.kill()
    # Assert
    text = log_path.read_text()
    assert code == 0, text[-2000:]
    assert stopped and took < STOP_S, f"stopped {took:.1f} s after SIGINT"
    assert exited < STOP_S + EXIT_SLACK_S
    lines = [line for line in text.splitlines() if "abandoned," in line]
    assert len(lines) == 1 and f"stopping: round for r1 abandoned, its {ROUND} samples stay pending" in lines[0]
    assert "Traceback" not in text
    store = CloudStore(tmp_path / "cloud" / "cloud.sqlite")
    try:
        assert store.pending_counts() == {"r1": ROUND}  # nothing committed: the next start runs the round again
        assert store.robots() == []  # and no version was published
    finally:
        store.close()


def test_a_second_ctrl_c_exits_at_once(pretrained_test_pair, uploads, tmp_path):
    # Prepare
    process, log_path, robot = start_mid_round(pretrained_test_pair, uploads, tmp_path)
    try:
        # Execute: both signals arrive together (held while the process is stopped; two kinds, since Linux merges
        # a pending signal with its repeat), as a person pressing Ctrl-C twice while it stops
        process.send_signal(signal.SIGSTOP)
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        process.send_signal(signal.SIGCONT)
        code = process.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        robot.close()
        if process.poll() is None:
            process.kill()
    # Assert
    text = log_path.read_text()
    assert took < STOP_S, text[-2000:]
    assert code == 130 and "interrupted again: exiting now" in text, text[-2000:]
    assert "rounds_abandoned" not in text  # it did not wait for the orderly end (the stats table)
    store = CloudStore(tmp_path / "cloud" / "cloud.sqlite")
    try:
        assert store.pending_counts() == {"r1": ROUND}
    finally:
        store.close()


def test_a_stop_during_a_slow_commit_reports_what_the_store_holds_not_an_abandoned_round(pretrained_test_pair, keys,
                                                                                        tmp_path, caplog):  # fmt: skip
    """The commit holds the chain lock (a store busy for seconds); a stop cannot abandon that round, which may still
    commit whole: the report must not say its samples stay pending when the store holds its version."""
    import logging
    import threading

    import torch

    from cloud_trainer.app import _report_abandoned
    from tests.test_cloud_trainer import make_trainer

    trainer = make_trainer(pretrained_test_pair, keys[0], tmp_path / "cloud")
    trainer.current_round = {"robot_id": "r1", "version": 1, "samples": 4}
    committing, release = threading.Event(), threading.Event()

    def slow_commit():
        with trainer._chain_lock:  # noqa: SLF001 - what _train_and_commit holds around the store's transaction
            committing.set()
            release.wait(10)

    thread = threading.Thread(target=slow_commit)
    thread.start()
    committing.wait(5)
    abandoned = trainer.abandon_round()  # waits 1 s for the lock, then reports the round as committing
    assert abandoned == {"robot_id": "r1", "version": 1, "samples": 4, "committing": True}
    with caplog.at_level(logging.INFO, logger="cloud_trainer.app"):
        with trainer.store._transaction():  # noqa: SLF001 - the commit holds the store too: the report must not wait
            started = time.monotonic()
            _report_abandoned(trainer, abandoned, running=True)
            assert time.monotonic() - started < 1.0 and "still committing" in caplog.text
        release.set()
        thread.join()
        _report_abandoned(trainer, abandoned, running=False)  # nothing committed: pending
        assert "was not committed, its 4 samples stay pending" in caplog.text
        tensor = {"w": torch.zeros(2)}
        trainer.store.commit_round("r1", 1, [], tensor, tensor, b"delta", 0)
        _report_abandoned(trainer, abandoned, running=False)
        assert "was committing and is committed" in caplog.text
    trainer.current_round = None
    assert trainer.abandon_round() is None
    trainer.close()
