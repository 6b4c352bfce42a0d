"""The robot's durable uplink queue: bounded by dropping the least uncertain, resend until acked, survives restart."""

import pytest

from cdcca.edge.uplink import UplinkQueue


def test_full_queue_drops_the_least_uncertain_sample_including_the_newcomer(tmp_path):
    queue = UplinkQueue(tmp_path / "q.sqlite", capacity=3)
    assert queue.put("a", 0.9, b"A") is None
    assert queue.put("b", 0.2, b"B") is None
    assert queue.put("c", 0.5, b"C") is None
    assert queue.put("d", 0.7, b"D") == "b"  # b was the least uncertain
    assert queue.put("e", 0.1, b"E") == "e"  # the newcomer itself is the least uncertain
    assert queue.ids() == ["a", "d", "c"]
    stats = queue.stats()
    assert (stats.queued, stats.enqueued, stats.dropped) == (3, 5, 2)
    assert queue.put("a", 0.9, b"A") is None and len(queue) == 3  # a duplicate id is not a new sample


def test_samples_are_resent_until_acknowledged(tmp_path):
    queue = UplinkQueue(tmp_path / "q.sqlite")
    for name, entropy in (("low", 0.1), ("high", 0.8)):
        queue.put(name, entropy, name.encode())
    assert queue.due(resend_after_s=5, now=100.0) == [("high", b"high"), ("low", b"low")]  # most uncertain first
    assert queue.due(resend_after_s=5, now=102.0) == []  # in flight, not yet due again
    assert queue.ack(["high", "unknown"]) == 1
    assert queue.due(resend_after_s=5, now=106.0) == [("low", b"low")]
    stats = queue.stats()
    assert (stats.sent, stats.resent, stats.acked, stats.queued) == (2, 1, 1, 1)


def test_queue_and_counters_survive_a_restart(tmp_path):
    path = tmp_path / "state" / "q.sqlite"
    queue = UplinkQueue(path, capacity=2)
    for i, entropy in enumerate((0.3, 0.6, 0.9)):
        queue.put(f"s{i}", entropy, bytes([i]) * 10)
    queue.close()
    reopened = UplinkQueue(path, capacity=2)
    assert reopened.ids() == ["s2", "s1"]
    assert reopened.due(1.0, now=0.0) == [("s2", bytes([2]) * 10), ("s1", bytes([1]) * 10)]
    assert reopened.stats().dropped == 1


def test_capacity_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        UplinkQueue(tmp_path / "q.sqlite", capacity=0)
