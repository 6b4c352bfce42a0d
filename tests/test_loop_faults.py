"""Faults on loopback, bounded in time: a killed cloud, a cut link, a restarted robot, malformed bytes everywhere.

The robot runs in this process; the cloud runs in this process or (for the kill) as ``python -m cloud_trainer``.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cdcca import wire
from cdcca.akd import AKDConfig
from cdcca.data.digits_shift import load_domain
from cdcca.edge.app import build_runtime
from cdcca.edge.runtime import EdgeConfig
from cdcca.envelope import Signer, generate_key, trust_key
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.transport import Link, LinkConfig
from cdcca.uts import UTSConfig
from cloud_trainer.service import CloudConfig, CloudTrainer
from cloud_trainer.store import CloudStore
from tests.test_transport import free_port, wait_until

ALL_SAMPLES = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)


@pytest.fixture()
def setup(tmp_path, pretrained_test_pair):
    private, public = generate_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    samples = load_domain("noisy_rotated", "stream", limit=6)
    return {
        "checkpoints": pretrained_test_pair, "key": private, "trust": tmp_path / "trust", "tmp": tmp_path,
        "endpoint": f"tcp/127.0.0.1:{free_port()}",
        "images": [s.load_image() for s in samples], "prompts": [s.prompt for s in samples],
        "ids": [s.sample_id for s in samples],
    }  # fmt: skip


class Cloud:
    """An in-process cloud trainer serving on its own Zenoh session (stop() = the cloud goes away)."""

    def __init__(self, setup, round_size=6):
        self.link = Link(LinkConfig.loopback(True, setup["endpoint"]))
        config = CloudConfig(state_dir=setup["tmp"] / "cloud", round_size=round_size, codec="nf4-zstd",
                             akd=AKDConfig(steps=3, batch_size=4))  # fmt: skip
        checkpoints = setup["checkpoints"]
        self.trainer = CloudTrainer(load_mllm(checkpoints / "teacher"), lambda: load_adaptable_student(checkpoints),
                                    Signer.load(setup["key"]), config, self.link)  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.trainer.serve, args=(self._stop,), daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)
        self.trainer.close()
        self.link.close()


def robot(setup, capacity=1024, resend_after_s=0.5):
    link = Link(LinkConfig.loopback(False, setup["endpoint"]))
    config = EdgeConfig(state_dir=setup["tmp"] / "edge", queue_capacity=capacity, resend_after_s=resend_after_s,
                        heartbeat_every_s=0.2, uts=ALL_SAMPLES)  # fmt: skip
    return build_runtime(setup["checkpoints"], config, setup["trust"], link).start(), link


def close_robot(runtime, link):
    runtime.close()
    link.close()


def test_cut_link_robot_keeps_answering_queues_within_bound_and_resumes(setup):
    cloud = Cloud(setup, round_size=4)
    runtime, link = robot(setup, capacity=4)
    try:
        assert wait_until(lambda: link.peers() >= 1)
        cloud.stop()  # the link is cut: nobody listens on the cloud's endpoint
        time.sleep(0.5)
        answers = runtime.ask(setup["images"], setup["prompts"], setup["ids"])
        assert len(answers) == 18 and all(a.answer for a in answers)  # answering does not need the cloud
        stats = runtime.stats()
        # 6 frames of 3 prompts, one upload each: bounded, the least uncertain dropped
        assert (stats["uplink_queued"], stats["uplink_dropped"]) == (4, 2)
        queued = set(runtime.uplink.ids())
        cloud = Cloud(setup, round_size=4)  # the link is back
        assert wait_until(lambda: runtime.backend.version == 1, timeout=60)
        assert len(runtime.uplink) == 0
        assert cloud.trainer.store.sample_ids("r1") == queued  # every queued sample arrived
    finally:
        close_robot(runtime, link)
        cloud.stop()


def test_restarted_robot_comes_back_on_its_last_version(setup):
    cloud = Cloud(setup)
    runtime, link = robot(setup)
    try:
        runtime.ask(setup["images"], setup["prompts"], setup["ids"])
        assert wait_until(lambda: runtime.backend.version == 1, timeout=60)
        close_robot(runtime, link)
        runtime, link = robot(setup)  # same state directory
        assert runtime.backend.version == 1
        assert runtime.ask(setup["images"][:1], setup["prompts"][:1])[0].adapter_version == 1
        assert wait_until(lambda: cloud.trainer.robots["r1"].reported == 1)  # its heartbeat says so
        assert cloud.trainer.counters.resends == 0
    finally:
        close_robot(runtime, link)
        cloud.stop()


def test_malformed_bytes_on_every_subscribed_key_are_counted_and_nothing_crashes(setup):
    cloud = Cloud(setup)
    runtime, link = robot(setup)
    attacker = Link(LinkConfig.loopback(False, setup["endpoint"]))
    try:
        topics = ("uts_tokens", "adapter_status", "weight_delta", "uts_ack")
        assert wait_until(lambda: all(attacker.matched("r1", topic) for topic in topics))  # the cloud's and robot's
        for topic in topics:
            for junk in (b"", b"\x00\x01\x00\x00", os.urandom(64), b"\x00\x01\x00\x00" + os.urandom(300)):
                attacker.publish_bytes("r1", topic, junk)
        forged = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=9, codec="fp16", key_id="cloud-test",
                          signature=np.zeros(64, np.uint8), payload=np.zeros(8, np.uint8))  # fmt: skip
        attacker.publish("r1", "weight_delta", forged)  # well-formed CDR, bad signature
        assert wait_until(lambda: all(cloud.link.rejected[t] == 4 for t in topics[:2])
                          and all(link.rejected[t] == 4 for t in topics[2:]))  # fmt: skip
        assert wait_until(lambda: runtime.backend.slot.counters.rejected == 1)
        assert runtime.backend.version == 0
        runtime.ask(setup["images"], setup["prompts"], setup["ids"])  # and the loop still works
        assert wait_until(lambda: runtime.backend.version == 1, timeout=60)
    finally:
        attacker.close()
        close_robot(runtime, link)
        cloud.stop()


def test_cloud_killed_mid_round_loses_no_acknowledged_sample(setup):
    def start_cloud(steps):
        argv = [sys.executable, "-m", "cloud_trainer", "--checkpoints", str(setup["checkpoints"]), "--state",
                str(setup["tmp"] / "cloud"), "--key", str(setup["key"]), "--endpoint", setup["endpoint"],
                "--round-size", "6", "--steps", str(steps), "--threads", "1"]  # fmt: skip
        log = open(setup["tmp"] / f"cloud-{steps}.log", "w")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), setup["tmp"] / f"cloud-{steps}.log"

    def wait_for(path, text, timeout=60):
        return wait_until(lambda: text in path.read_text(), timeout)

    process, log_path = start_cloud(steps=100000)  # a round that would take hours
    runtime, link = robot(setup)
    try:
        assert wait_for(log_path, "cloud trainer serving")
        runtime.ask(setup["images"], setup["prompts"], setup["ids"])
        assert wait_for(log_path, "round v1 on 18 samples started"), log_path.read_text()[-2000:]  # 6 frames x 3
        # one upload per frame; the cloud acknowledges a sample after committing it, and may log the round's start
        # before the last acknowledgement reached the robot
        all_acked = lambda: runtime.stats()["uplink_acked"] == 6 and len(runtime.uplink) == 0  # noqa: E731
        assert wait_until(all_acked, 30), runtime.stats()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        store = CloudStore(setup["tmp"] / "cloud" / "cloud.sqlite")
        assert store.sample_ids("r1") == set(setup["ids"][::3])  # everything acknowledged was on disk
        assert store.pending_counts() == {"r1": 6}  # and the killed round used none of it
        store.close()
        process, log_path = start_cloud(steps=3)
        assert wait_until(lambda: runtime.backend.version == 1, timeout=90), log_path.read_text()[-2000:]
    finally:
        close_robot(runtime, link)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0  # a clean shutdown on Ctrl-C
