"""Authenticated acks (issue 15 D6, Build 5): only the cloud can make a robot delete queued samples.

A ``UtsAck`` deletes only when a key of the robot's trust store (not revoked) signed its robot id, sequence and
ids, and its sequence is newer than that of every ack the robot accepted before, also across a restart (the
sequence is persisted in the uplink queue's SQLite file). Everything else deletes nothing and is counted by
reason. Real keys, a real SQLite queue, the runtime behind a recording port.
"""

import numpy as np
import pytest

from cdcca import wire
from cdcca.edge.diagnostics import WARN, EdgeDiagnostics
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.edge.uplink import StaleAck, UplinkQueue
from cdcca.envelope import (
    AckRejected,
    Signer,
    TrustStore,
    ack_signed_bytes,
    generate_key,
    sign_ack,
    trust_key,
    verify_ack,
)
from tests.test_edge_port import NEVER_UPLOAD, FakeBackend, RecordingPort
from tests.test_edge_port import student as student  # noqa: F401  (the module-scoped fixture)

IDS = ["r1-0", "r1-1", "r1-2"]


@pytest.fixture()
def keys(tmp_path):
    """The cloud's key and its successor (both trusted by the robot), and mallory's key (trusted by nobody)."""
    signers = {}
    for key_id in ("cloud-1", "cloud-2", "mallory"):
        private, public = generate_key(tmp_path / "keys", key_id)
        signers[key_id] = Signer.load(private)
        if key_id != "mallory":
            trust_key(public, tmp_path / "trust")
    return signers, tmp_path / "trust"


def robot(student, keys, state_dir):
    config = EdgeConfig(state_dir=state_dir, uts=NEVER_UPLOAD)
    runtime = EdgeRuntime(FakeBackend(), student, config, RecordingPort(), trust=TrustStore.load(keys[1]))
    for i, sample_id in enumerate(IDS):
        runtime.uplink.put(sample_id, 1.0 + i, f"payload-{i}".encode())
    return runtime


def forged(signers):
    """(reason, ack) for every ack that must delete nothing; sequences are far above the good one's."""
    cloud, mallory = signers["cloud-1"], signers["mallory"]
    unsigned = wire.new(wire.UTS_ACK, robot_id="r1", sample_ids=IDS, sequence=10**12)
    claims_cloud = sign_ack(mallory, "r1", IDS, 10**12)
    claims_cloud.key_id = "cloud-1"  # mallory's signature under the cloud's key id
    altered = sign_ack(cloud, "r1", IDS[:1], 10**12)
    altered.sample_ids = IDS  # a signed ack of one id, stretched to all three
    bumped = sign_ack(cloud, "r1", IDS, 10**12)
    bumped.sequence = 10**12 + 1  # the signature covers the sequence
    readdressed = sign_ack(cloud, "r2", IDS, 10**12)
    readdressed.robot_id = "r1"  # the signature covers the robot id
    no_key = sign_ack(cloud, "r1", IDS, 10**12)
    no_key.key_id = ""
    short = sign_ack(cloud, "r1", IDS, 10**12)
    short.signature = short.signature[:32].copy()
    zero = sign_ack(cloud, "r1", IDS, 1)
    zero.sequence = 0
    return [("unsigned", unsigned), ("unknown_key", sign_ack(mallory, "r1", IDS, 10**12)),
            ("bad_signature", claims_cloud), ("bad_signature", altered), ("bad_signature", bumped),
            ("bad_signature", readdressed), ("unknown_key", no_key), ("malformed", short),
            ("malformed", zero)]  # fmt: skip


def test_a_correctly_signed_ack_deletes_what_it_names(student, keys, tmp_path):
    # Prepare
    signers, _ = keys
    runtime = robot(student, keys, tmp_path / "edge")
    try:
        # Execute: as CDR bytes, as the link delivers it
        named = runtime.on_ack(wire.encode(sign_ack(signers["cloud-1"], "r1", IDS[:2], 1_000, 7)))

        # Assert
        assert named == 2 and runtime.uplink.ids() == ["r1-2"]
        stats = runtime.stats()
        assert (stats["acks_accepted"], stats["acks_rejected"], stats["uplink_acked"]) == (1, 0, 2)
        assert stats["uplink_ack_sequence"] == 1_000
    finally:
        runtime.close()


def test_unsigned_forged_foreign_and_malformed_acks_delete_nothing_and_are_counted(student, keys, tmp_path):
    # Prepare
    signers, _ = keys
    runtime = robot(student, keys, tmp_path / "edge")
    diagnostics = EdgeDiagnostics(runtime)
    cases = forged(signers)
    try:
        # Execute
        named = [runtime.on_ack(wire.encode(ack)) for _, ack in cases]
        foreign = runtime.on_ack(wire.encode(sign_ack(signers["cloud-1"], "r2", IDS, 10**12)))

        # Assert: nothing deleted, every ack counted under its reason, the sequence untouched
        assert named == [0] * len(cases) and foreign == 0
        assert runtime.uplink.ids() == ["r1-2", "r1-1", "r1-0"]
        expected = {}
        for reason, _ in cases:
            expected[reason] = expected.get(reason, 0) + 1
        assert runtime.counters.acks_rejected_reasons == expected
        assert runtime.counters.acks_rejected == len(cases) and runtime.counters.acks_foreign == 1
        assert runtime.counters.acks_accepted == 0 and runtime.uplink.stats().ack_sequence == 0
        report = diagnostics.report()
        assert report.level == WARN and "UtsAck was refused" in report.message
        assert report.values["rejected_acks"] == str(len(cases))
        # ... and the cloud's real ack still deletes afterwards (no sequence was burnt by a forgery)
        assert runtime.on_ack(sign_ack(signers["cloud-1"], "r1", IDS, 5)) == 3 and len(runtime.uplink) == 0
    finally:
        runtime.close()


def test_an_ack_signed_by_a_revoked_key_deletes_nothing(student, keys, tmp_path):
    # Prepare: the robot trusts cloud-1 and cloud-2; cloud-1 is revoked (cdcca keys revoke), the store re-read
    signers, trust_dir = keys
    runtime = robot(student, keys, tmp_path / "edge")
    try:
        assert runtime.on_ack(sign_ack(signers["cloud-1"], "r1", IDS[:1], 10)) == 1
        TrustStore.load(trust_dir).revoke("cloud-1")

        # Execute
        revoked = runtime.on_ack(sign_ack(signers["cloud-1"], "r1", IDS[1:], 20))
        successor = runtime.on_ack(sign_ack(signers["cloud-2"], "r1", IDS[1:2], 30))

        # Assert
        assert revoked == 0 and runtime.counters.acks_rejected_reasons == {"revoked_key": 1}
        assert successor == 1 and runtime.uplink.ids() == ["r1-2"]
        assert runtime.uplink.stats().ack_sequence == 30
    finally:
        runtime.close()


def test_a_replayed_ack_deletes_nothing_also_after_a_restart(student, keys, tmp_path):
    # Prepare: the cloud acks r1-0 (sequence 100) and r1-1 (200); an attacker recorded both
    signers, _ = keys
    cloud = signers["cloud-1"]
    first, second = wire.encode(sign_ack(cloud, "r1", ["r1-0"], 100)), wire.encode(sign_ack(cloud, "r1", ["r1-1"], 200))
    runtime = robot(student, keys, tmp_path / "edge")
    assert runtime.on_ack(first) == 1 and runtime.on_ack(second) == 1
    # the robot queues the same ids again (a sample id the cloud has not stored this time)
    runtime.uplink.put("r1-0", 1.0, b"again-0")
    runtime.uplink.put("r1-1", 1.0, b"again-1")
    try:
        # Execute: the same ack again, and an older one
        replays = [runtime.on_ack(second), runtime.on_ack(first)]
        assert replays == [0, 0] and sorted(runtime.uplink.ids()) == ["r1-0", "r1-1", "r1-2"]
    finally:
        runtime.close()

    # Execute: the robot restarts on the same state directory; the replays come again
    runtime = robot(student, keys, tmp_path / "edge")
    try:
        after_restart = [runtime.on_ack(first), runtime.on_ack(second)]

        # Assert: nothing deleted, counted as replays; a newer ack from the cloud still deletes
        assert after_restart == [0, 0] and sorted(runtime.uplink.ids()) == ["r1-0", "r1-1", "r1-2"]
        assert runtime.counters.acks_rejected_reasons == {"replayed": 2}
        assert runtime.uplink.stats().ack_sequence == 200
        assert runtime.on_ack(sign_ack(cloud, "r1", ["r1-0", "r1-1"], 201)) == 2
        assert runtime.uplink.ids() == ["r1-2"]
    finally:
        runtime.close()


def test_the_queue_takes_the_sequence_in_the_transaction_that_deletes(tmp_path):
    queue = UplinkQueue(tmp_path / "uplink.sqlite")
    for i in range(3):
        queue.put(f"s{i}", 1.0, b"x")
    assert queue.ack(["s0"], sequence=5) == 1
    with pytest.raises(StaleAck, match="5 was accepted before"):
        queue.ack(["s1"], sequence=5)
    assert sorted(queue.ids()) == ["s1", "s2"] and queue.stats().ack_sequence == 5
    assert queue.ack([], sequence=6) == 0 and queue.stats().ack_sequence == 6
    queue.close()
    reopened = UplinkQueue(tmp_path / "uplink.sqlite")
    with pytest.raises(StaleAck):
        reopened.ack(["s1", "s2"], sequence=6)
    assert reopened.stats().ack_sequence == 6 and len(reopened) == 2
    reopened.close()


def test_the_signed_bytes_are_unambiguous_and_verify_names_the_reason(keys):
    signers, trust_dir = keys
    # moving a character between the robot id and an id, or splitting an id, changes the bytes
    assert ack_signed_bytes("r1", 1, ["ab"]) != ack_signed_bytes("r1a", 1, ["b"])
    assert ack_signed_bytes("r1", 1, ["ab"]) != ack_signed_bytes("r1", 1, ["a", "b"])
    assert ack_signed_bytes("r1", 1, ["a"]) != ack_signed_bytes("r1", 2, ["a"])
    ack = sign_ack(signers["cloud-2"], "r1", ["a", "ü"], 3)
    assert verify_ack(ack, trust=TrustStore.load(trust_dir), robot_id="r1") == (3, ["a", "ü"])
    assert len(bytes(np.asarray(ack.signature, np.uint8))) == 64 and ack.key_id == "cloud-2"
    with pytest.raises(AckRejected) as err:
        verify_ack(ack, trust=None, robot_id="r1")
    assert err.value.reason == "unknown_key"
    with pytest.raises(ValueError, match="sequence"):
        sign_ack(signers["cloud-2"], "r1", ["a"], 0)


def test_acks_of_two_workers_that_cross_are_taken_and_each_is_taken_once(tmp_path):
    """Two cloud workers ack one robot, each numbering from its own clock: an ack below the newest is taken if it
    is new and within the window; a replay of any taken ack, and one older than the window, are refused."""
    from cdcca.edge.uplink import ACK_WINDOW

    queue = UplinkQueue(tmp_path / "uplink.sqlite")
    for i in range(4):
        queue.put(f"s{i}", 1.0, b"x")
    newest = 10 * ACK_WINDOW
    assert queue.ack(["s0"], sequence=newest) == 1  # worker a
    assert queue.ack(["s1"], sequence=newest - 5) == 1  # worker b, whose ack left first but arrived second
    for replay in (newest, newest - 5):
        with pytest.raises(StaleAck, match="was accepted before"):
            queue.ack(["s2"], sequence=replay)
    with pytest.raises(StaleAck, match="more than 60 s older than"):
        queue.ack(["s2"], sequence=newest - ACK_WINDOW)
    assert sorted(queue.ids()) == ["s2", "s3"] and queue.stats().ack_sequence == newest
    queue.close()
    reopened = UplinkQueue(tmp_path / "uplink.sqlite")  # the window survives a restart
    with pytest.raises(StaleAck, match="was accepted before"):
        reopened.ack(["s2"], sequence=newest - 5)
    assert reopened.ack(["s2"], sequence=newest + ACK_WINDOW + 1) == 1  # far newer: the window moves past both
    assert reopened._db.execute("SELECT COUNT(*) FROM ack_seen").fetchone() == (1,)  # what fell out is pruned
    assert reopened.ack(["s3"], sequence=newest + 2) == 1  # just inside the moved window, and new
    reopened.close()
