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


def test_a_queue_reopened_with_a_smaller_capacity_keeps_its_most_uncertain_samples(tmp_path):
    path = tmp_path / "q.sqlite"
    queue = UplinkQueue(path, capacity=10)
    for i in range(10):
        queue.put(f"s{i}", i / 10, b"x")
    queue.close()
    smaller = UplinkQueue(path, capacity=3)  # trimmed when opened, not one sample per later put
    assert smaller.ids() == ["s9", "s8", "s7"] and smaller.stats().dropped == 7
    assert smaller.put("new", 0.95, b"x") == "s7" and len(smaller) == 3


def test_samples_that_could_not_be_published_are_due_again_at_once_and_not_counted_as_sent(tmp_path):
    queue = UplinkQueue(tmp_path / "q.sqlite")
    for name, entropy in (("a", 0.9), ("b", 0.5), ("c", 0.1)):
        queue.put(name, entropy, name.encode())
    assert [s for s, _ in queue.due(resend_after_s=5, now=100.0)] == ["a", "b", "c"]
    queue.unsend(["b", "c"])  # the link went down after a was published
    assert queue.stats().sent == 1
    assert [s for s, _ in queue.due(resend_after_s=5, now=100.5)] == ["b", "c"]  # not after resend_after_s
    assert queue.ack(["b", "c"]) == 2
    assert [s for s, _ in queue.due(resend_after_s=5, now=106.0)] == ["a"]
    queue.unsend(["a"])  # a resend that failed goes back to its first send's time: due again too
    assert [s for s, _ in queue.due(resend_after_s=5, now=106.5)] == ["a"]
    stats = queue.stats()
    assert (stats.sent, stats.resent) == (3, 1)


def test_a_wall_clock_that_steps_back_does_not_stall_resends(tmp_path):
    queue = UplinkQueue(tmp_path / "q.sqlite")
    queue.put("s", 0.5, b"s")
    assert queue.due(resend_after_s=10, now=5000.0) == [("s", b"s")]
    assert queue.due(resend_after_s=10, now=1411.0) == [("s", b"s")]  # an hour back: sent "in the future" is due
    assert queue.due(resend_after_s=10, now=1412.0) == []  # and in flight again from then on


def test_capacity_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        UplinkQueue(tmp_path / "q.sqlite", capacity=0)


@pytest.mark.parametrize("entropy", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entropy_is_stored_as_the_most_uncertain_and_counted(tmp_path, entropy):
    # Prepare: a full queue of finite samples (issue 15 D3: SQLite turned NaN into NULL and INSERT OR IGNORE lost it)
    queue = UplinkQueue(tmp_path / "q.sqlite", capacity=2)
    queue.put("low", 0.1, b"L")
    queue.put("high", 0.9, b"H")
    # Execute
    dropped = queue.put("broken", entropy, b"B")
    # Assert: held, first in line, and the least uncertain finite one made room
    assert dropped == "low"
    assert queue.ids() == ["broken", "high"]
    assert queue.due(resend_after_s=5, now=0.0)[0] == ("broken", b"B")
    stats = queue.stats()
    assert (stats.queued, stats.enqueued, stats.nonfinite_entropy, stats.dropped) == (2, 3, 1, 1)
    queue.close()
    assert UplinkQueue(tmp_path / "q.sqlite").stats().nonfinite_entropy == 1  # the counter is durable


@pytest.mark.parametrize(("sample_id", "payload"), [("s", b""), ("", b"x")])
def test_an_empty_payload_or_id_is_refused_counted_and_returned(tmp_path, sample_id, payload):
    queue = UplinkQueue(tmp_path / "q.sqlite")
    assert queue.put(sample_id, 0.5, payload) == sample_id
    stats = queue.stats()
    assert (stats.queued, stats.enqueued, stats.refused) == (0, 0, 1)


def test_a_duplicate_id_keeps_the_queued_sample_and_is_counted(tmp_path):
    queue = UplinkQueue(tmp_path / "q.sqlite")
    queue.put("s", 0.5, b"first")
    assert queue.put("s", 0.7, b"second") is None
    assert queue.due(resend_after_s=5, now=0.0) == [("s", b"first")]
    assert (queue.stats().enqueued, queue.stats().duplicates) == (1, 1)


def test_a_huge_ack_costs_the_queue_lock_only_what_the_queue_holds(tmp_path):
    # Prepare: 10 queued samples; an ~8 MiB ack naming 3 of them among 300 000 ids (issue 15 D6: one DELETE per
    # id under the lock held the answering thread ~2 s)
    queue = UplinkQueue(tmp_path / "q.sqlite")
    for i in range(10):
        queue.put(f"r1-{i}", 0.1 * i, b"x")
    ack = [f"r1-1764400000000000000-{n:09d}" for n in range(300_000)] + ["r1-2", "r1-5", "r1-7"]
    assert sum(map(len, ack)) > 8 * 2**20
    deletes = []
    queue._db.set_trace_callback(lambda sql: deletes.append(sql) if sql.startswith("DELETE") else None)
    # Execute
    removed = queue.ack(ack)
    # Assert: the 3 are gone, counted, and SQLite ran no more DELETEs than the queue held
    assert removed == 3 and sorted(queue.ids()) == sorted(f"r1-{i}" for i in (0, 1, 3, 4, 6, 8, 9))
    assert queue.stats().acked == 3
    assert len(deletes) <= 10
    assert queue.ack(["r1-2", "r1-0", "r1-0"]) == 1 and queue.ack([]) == 0  # repeated and duplicate ids
