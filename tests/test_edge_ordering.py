"""The robot's runtime under concurrent threads: statuses in the order the adapter changed, the health check's level
made of the good version's answers only, a failed answer's version, a closed uplink queue, a loop that outlived stop().

A backend without a model (versions, swap, rollback, an entropy per version) makes each interleaving reproducible:
threads are held at the exact point with events."""

import logging
import math
import threading
import time

import numpy as np
import pytest

import cdcca.edge.runtime as runtime_module
from cdcca import wire
from cdcca.edge.adapter_state import APPLIED, REJECTED, ROLLED_BACK, adapter_status, rollback_reason
from cdcca.edge.backend import BackendAnswer, EdgeBackend
from cdcca.edge.health import HealthCheck, HealthConfig
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime

IMAGE = np.zeros((4, 4, 3), np.uint8)


class Keep:
    def keep_samples(self, entropy, prompts=None):
        return np.zeros(len(entropy), bool)  # nothing goes up: these tests are about the adapter


class VersionsBackend(EdgeBackend):
    """Answers "ok" at the entropy set for the running version; ``after_receive`` runs once a delta is swapped in."""

    name = "versions"

    def __init__(self, entropy: dict[int, float]):
        self.entropy, self.running, self.previous = entropy, 0, None
        self.after_receive = self.during_answer = None
        self._lock = threading.Lock()

    def token_sampler(self, config):
        return Keep()

    @property
    def version(self):
        return self.running

    def answer(self, images, prompts):
        version = self.running  # read once, as the real backends do
        if self.during_answer is not None:
            self.during_answer(version)
        value = self.entropy.get(version, 1.0)
        return BackendAnswer(["ok"] * len(prompts), np.full(len(prompts), value, np.float32),
                             np.zeros((len(prompts), 2, 2), np.float32), version)  # fmt: skip

    def receive(self, msg):
        with self._lock:
            if int(msg.version) <= self.running:
                return adapter_status("r1", int(msg.version), REJECTED, "not newer")
            self.previous, self.running = self.running, int(msg.version)
        if self.after_receive is not None:
            self.after_receive()
        return adapter_status("r1", self.running, APPLIED, "")

    def rollback(self, reason="on request", only_version=None):
        with self._lock:
            if only_version is not None and only_version != self.running:
                return None
            if self.previous is None:
                return adapter_status("r1", self.running, REJECTED, "no previous adapter to roll back to")
            left, self.running, self.previous = self.running, self.previous, None
            return adapter_status("r1", self.running, ROLLED_BACK, rollback_reason(left, reason))


class Port:
    def __init__(self):
        self.statuses, self.block = [], None

    def publish(self, topic, data):
        if self.block is not None and topic == "adapter_status":
            self.block.wait(10)
        if topic == "adapter_status":
            msg = wire.decode(wire.ADAPTER_STATUS, data)
            self.statuses.append((int(msg.version), int(msg.state), msg.reason))


def delta(version, base):
    return wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=version, base_version=base)


@pytest.fixture()
def robot(tmp_path):
    """A runtime on v1 (marked good), whose v2 answers NaN (rolled back at its first answer)."""
    backend, port = VersionsBackend({1: 1.0, 2: math.nan}), Port()
    runtime = EdgeRuntime(backend, None, EdgeConfig(state_dir=tmp_path, health=HealthConfig(answers=4)), port)
    runtime.apply(delta(1, 0))
    runtime.ask([IMAGE] * 4, ["q?"] * 4)
    port.statuses.clear()
    yield runtime, backend, port
    runtime.close()


def in_thread(target, *args):
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def test_a_rollback_during_a_swap_is_reported_after_the_swaps_applied(robot):
    runtime, backend, port = robot
    swapped, go = threading.Event(), threading.Event()
    start = runtime.health.start
    runtime.health.start = lambda version: (start(version), swapped.set(), go.wait(10))
    # Act: v2 is swapped in and on probation; the link thread is held before it reports APPLIED; an answer on v2
    # (NaN) triggers the rollback
    link = in_thread(runtime.apply, delta(2, 1))
    assert swapped.wait(10)
    asker = in_thread(runtime.ask, [IMAGE], ["q?"])
    time.sleep(0.3)  # time enough for the answering thread to reach the rollback
    go.set()
    link.join(10), asker.join(10)
    # Assert: the cloud hears APPLIED v2, then ROLLED_BACK to v1, as it happened (the reverse left it on v2)
    assert [(v, state) for v, state, _ in port.statuses] == [(2, APPLIED), (1, ROLLED_BACK)]
    assert backend.version == 1


def test_a_heartbeat_made_before_a_rollback_goes_out_before_it(robot):
    runtime, backend, port = robot
    runtime.apply(delta(2, 1))
    port.statuses.clear()
    built, go = threading.Event(), threading.Event()
    make = runtime.heartbeat
    runtime.heartbeat = lambda: (built.set(), go.wait(10), make())[2]
    # Act: the link thread makes a heartbeat of v2 and is held; an answer on v2 rolls back
    link = in_thread(runtime.publish_status)
    assert built.wait(10)
    asker = in_thread(runtime.ask, [IMAGE], ["q?"])
    time.sleep(0.3)
    go.set()
    link.join(10), asker.join(10)
    # Assert: the heartbeat of v2 first, the rollback last: the cloud's last word is v1
    assert [(v, state) for v, state, _ in port.statuses] == [(2, APPLIED), (1, ROLLED_BACK)]


def test_the_level_a_new_version_is_held_to_is_the_good_versions_own():
    check = HealthCheck(HealthConfig(answers=2, entropy_ratio=2.0, entropy_margin=0.0))
    check.observe(1, ["a"] * 4, [1.0] * 4)  # v1 runs: it is the good version
    check.observe(2, ["a"] * 4, [3.0] * 4)  # v2 answered after its swap, before its probation started: not v1's level
    check.start(2)
    assert check.observe(2, ["a", "a"], [2.5, 2.5]) is not None  # above 2 x 1.0 (2 x 1.5 with the v2 answers mixed in)
    # a straggler of the rolled-back v2 does not join v1's level, which is as before v2's swap
    check.observe(2, ["a"] * 8, [9.0] * 8)
    check.start(3)
    assert check.observe(3, ["a", "a"], [2.5, 2.5]) is not None


def test_a_failed_answer_carries_the_version_it_ran_on(robot, caplog):
    runtime, backend, _ = robot

    def swap_then_fail(version):
        backend.during_answer = None
        runtime.apply(delta(3, 1))  # a swap while the answer runs
        raise RuntimeError("the model failed")

    backend.during_answer = swap_then_fail
    [answer] = runtime.ask([IMAGE], ["q?"])
    assert (answer.answer, answer.adapter_version, backend.version) == ("", 1, 3)


def test_a_closed_uplink_queue_refuses_with_its_own_error(robot):
    from cdcca.edge.uplink import UplinkWriteError

    runtime, _, _ = robot
    queue = runtime.uplink
    queue.put("r1-a", 2.0, b"payload")
    runtime.close()
    with pytest.raises(UplinkWriteError, match="closed"):
        queue.put("r1-x", 1.0, b"payload")
    with pytest.raises(UplinkWriteError, match="closed"):
        queue.ack(["r1-a"])
    # a loop or a diagnostics timer that outlived the stop reads the queue as it was closed; nothing is due
    assert queue.due(0.0) == [] and queue.ids() == ["r1-a"] and len(queue) == 1
    assert (queue.stats().queued, queue.stats().enqueued) == (1, 1)
    assert queue.put("", 1.0, b"payload") == ""  # refused as before, without touching the closed file
    queue.unsend(["r1-a"])


def test_a_loop_that_outlived_stop_ends_once_unblocked_instead_of_running_on_after_a_restart(robot, monkeypatch,
                                                                                              caplog):  # fmt: skip
    runtime, _, port = robot
    monkeypatch.setattr(runtime_module, "STOP_WAIT_S", 0.2)
    port.block = threading.Event()  # the link loop's next heartbeat blocks (a congested link)
    runtime.start()
    time.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="cdcca"):
        runtime.stop()
    assert "did not stop within" in caplog.text
    runtime.start()  # (a ROS deactivate then activate)
    port.block.set()
    time.sleep(0.5)
    loops = [t.name for t in threading.enumerate() if t.name.startswith("edge-")]
    assert sorted(loops) == ["edge-answer-r1", "edge-link-r1"]  # the old link loop ended
    runtime.stop()


def test_a_late_answer_of_a_version_rolled_back_never_becomes_the_good_version(tmp_path):
    # A robot restarted on its persisted v5 gets v6 from the latched topic before it answered anything; v6 fails
    backend = VersionsBackend({5: 1.0, 6: math.nan, 7: 10.0})
    backend.running = 5
    runtime = EdgeRuntime(backend, None, EdgeConfig(state_dir=tmp_path, health=HealthConfig(answers=4)), Port())
    try:
        runtime.apply(delta(6, 5))
        runtime.ask([IMAGE], ["q?"])  # NaN: rolled back to v5
        assert backend.version == 5 and runtime.health.good == 5
        runtime._check_health(6, ["late"], [1.0])  # a v6 answer still in flight (a ROS Ask) arrives now
        runtime.ask([IMAGE] * 4, ["q?"] * 4)
        # Assert: v5 stays good, its answers make the level, and a v7 at ten times that level is rolled back
        assert runtime.health.good == 5
        runtime.apply(delta(7, 5))
        runtime.ask([IMAGE] * 4, ["q?"] * 4)
        assert backend.version == 5 and runtime.counters.health_rollbacks == 2
    finally:
        runtime.close()


def test_a_version_rolled_back_to_that_was_never_marked_good_goes_on_probation(robot):
    runtime, backend, port = robot
    backend.entropy = {1: 1.0, 2: math.nan, 3: math.nan}
    runtime.apply(delta(2, 1))
    runtime.apply(delta(3, 2))  # v2 replaced before it answered
    runtime.ask([IMAGE], ["q?"])  # v3 fails: back to v2, which was never checked
    assert (backend.version, runtime.health.probation) == (2, 2)
    runtime.ask([IMAGE], ["q?"])  # v2 fails too: nothing left to roll back to, and the cloud hears it
    assert port.statuses[-1][1:] == (REJECTED, "no previous adapter to roll back to")
