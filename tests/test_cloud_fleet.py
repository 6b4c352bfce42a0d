"""A cloud for a fleet (issue 16): one student per worker, a robot is its adapter state (part 1); several workers
share one store, claiming rounds with expiring leases (part 2, SQLite).

The reference for "results must not change" is one trainer per robot, i.e. one student per robot as the cloud ran
before; the shared student must publish the same bytes for the same interleaved rounds.
"""

import contextlib
import dataclasses
import gc
import threading
import time
import weakref

import pytest
import torch

from cdcca import wire
from cdcca.akd import AKDConfig, source_anchors
from cdcca.data.digits_shift import load_domain
from cdcca.envelope import Signer, generate_key
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.models.mllm import MLLM
from cdcca.uts import pack_tokens
from cloud_trainer.service import CloudConfig, CloudTrainer
from tests.test_cloud_trainer import RecordingLink

# (robot, uploads of its round): r1, r2, r1, r2 interleaved, different samples per robot and round
SCHEDULE = [("r1", slice(0, 4)), ("r2", slice(8, 12)), ("r1", slice(4, 8)), ("r2", slice(0, 4))]


@pytest.fixture(scope="module")
def uploads(pretrained_test_pair):
    """12 printed-domain UtsTokens (4 images x 3 tasks), half of each image's tokens kept."""
    student = load_mllm(pretrained_test_pair / "student")
    samples = load_domain("printed", "stream", limit=4)
    with torch.inference_mode():
        tokens = student.visual_tokens(student.preprocess([s.load_image() for s in samples]))  # (B, N, D)
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[1::2] = True
    variance = torch.linspace(0, 1, tokens.shape[1])
    return [pack_tokens(tokens[i], keep, variance, robot_id="r1", sample_id=s.sample_id, adapter_version=0,
                        prompt=s.prompt, student_answer="?", sample_entropy=1.0)
            for i, s in enumerate(samples)]  # fmt: skip


@pytest.fixture(scope="module")
def fleet(pretrained_test_pair, tmp_path_factory):
    """What every trainer here shares: the checkpoints, a signing key, the teacher and its anchor set."""
    teacher = load_mllm(pretrained_test_pair / "teacher")
    private, _ = generate_key(tmp_path_factory.mktemp("keys"), "cloud-fleet")
    return {"checkpoints": pretrained_test_pair, "signer": Signer.load(private), "teacher": teacher,
            "anchors": source_anchors(teacher, images=4)}  # fmt: skip


def make_trainer(fleet, state_dir, adapter_cache=4, make_student=None, **settings):
    config = CloudConfig(state_dir=state_dir, round_size=4, max_round_samples=4, codec="fp16", round_retry_s=0.0,
                         adapter_cache=adapter_cache,  # anchors replayed and checked; every round keeps its steps
                         akd=AKDConfig(steps=3, batch_size=4, anchor_batch=4, forget_tolerance=1.0),
                         **settings)  # fmt: skip
    checkpoints = fleet["checkpoints"]
    make = make_student or (lambda: load_adaptable_student(checkpoints))
    return CloudTrainer(fleet["teacher"], make, fleet["signer"], config, anchors=fleet["anchors"])


def upload(trainer, robot_id, msgs):
    for msg in msgs:
        assert trainer.receive_tokens(robot_id, dataclasses.replace(msg, robot_id=robot_id))


def published(trainer, robot_id):
    """The robot's latest WeightDelta, as the cloud committed and sent it."""
    return wire.decode(wire.WEIGHT_DELTA, trainer.robots[robot_id].latest_delta)


def same_delta(a, b) -> bool:
    """Same version, codec and payload bytes (what the robot decodes); stamps and signatures may differ."""
    what = lambda m: (m.robot_id, m.version, m.base_version, m.keyframe, m.codec, m.num_params,  # noqa: E731
                      bytes(m.sha256), bytes(m.payload))  # fmt: skip
    return what(a) == what(b)


@pytest.fixture(scope="module")
def reference(fleet, uploads, tmp_path_factory):
    """The schedule on one trainer per robot (one student each): robot -> its deltas and final adapter state."""
    trainers = {robot_id: make_trainer(fleet, tmp_path_factory.mktemp(f"alone-{robot_id}"))
                for robot_id in ("r1", "r2")}  # fmt: skip
    deltas = {"r1": [], "r2": []}
    for robot_id, chosen in SCHEDULE:
        upload(trainers[robot_id], robot_id, uploads[chosen])
        assert [(r["robot_id"], r["kept_step"]) for r in trainers[robot_id].step()] == [(robot_id, 3)]  # it trained
        deltas[robot_id].append(published(trainers[robot_id], robot_id))
    return {robot_id: (deltas[robot_id], trainers[robot_id].adapter_state(robot_id)) for robot_id in deltas}


@pytest.mark.parametrize("adapter_cache", [0, 1, 4], ids=["from-store", "evicting", "in-memory"])
def test_one_shared_student_publishes_the_bytes_of_one_student_per_robot(adapter_cache, fleet, uploads, reference,
                                                                          tmp_path):  # fmt: skip
    # Prepare
    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=adapter_cache)
    deltas = {"r1": [], "r2": []}
    # Execute: r1, r2, r1, r2 on the one student
    for robot_id, chosen in SCHEDULE:
        upload(trainer, robot_id, uploads[chosen])
        assert [r["robot_id"] for r in trainer.step()] == [robot_id]
        deltas[robot_id].append(published(trainer, robot_id))
    # Assert: every delta bit-identical (payload bytes, hence decoded tensors), and so is the state each robot ends in
    for robot_id, (expected, state) in reference.items():
        assert [(d.version, d.keyframe) for d in deltas[robot_id]] == [(1, True), (2, True)]
        assert all(same_delta(got, want) for got, want in zip(deltas[robot_id], expected, strict=True)), robot_id
        mine = trainer.adapter_state(robot_id)
        assert mine.rounds == state.rounds == 2
        assert mine.tensors.keys() == state.tensors.keys() and mine.optimizer.keys() == state.optimizer.keys()
        assert all(torch.equal(mine.tensors[k], state.tensors[k]) for k in state.tensors)
        assert all(torch.equal(mine.optimizer[k], state.optimizer[k]) for k in state.optimizer)
    assert len(trainer.shared.cached()) == min(adapter_cache, 1)  # r1 waits in memory unless the cache is off
    r1, r2 = reference["r1"], reference["r2"]  # the robots and their rounds did differ
    assert len({bytes(d.payload) for d in r1[0] + r2[0]}) == 4
    assert any(not torch.equal(r1[1].tensors[k], r2[1].tensors[k]) for k in r1[1].tensors)


def test_a_failed_round_leaves_no_trace_in_the_shared_student(fleet, uploads, reference, tmp_path, monkeypatch):
    # Prepare: r1's second round trains, then fails before its commit (after r2's state went to memory)
    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=4)
    for robot_id, chosen in SCHEDULE[:2]:
        upload(trainer, robot_id, uploads[chosen])
        trainer.step()
    real_round, calls = trainer.distiller.run_round, []

    def trains_then_fails(samples):
        report = real_round(samples)  # the shared student's weights and moments moved
        calls.append(trainer.shared.active)
        if len(calls) == 1:
            raise RuntimeError("the worker lost its scratch disk")
        return report

    monkeypatch.setattr(trainer.distiller, "run_round", trains_then_fails)
    upload(trainer, "r1", uploads[SCHEDULE[2][1]])
    # Execute: the failing pass, then the retry
    assert trainer.step() == [] and trainer.counters.round_failures == 1
    [result] = trainer.step()
    # Assert: the retry starts from r1's committed state and publishes what one student per robot published
    assert calls == ["r1", "r1"] and result["version"] == 2
    assert same_delta(published(trainer, "r1"), reference["r1"][0][1])


def test_memory_holds_one_student_whatever_the_number_of_robots(fleet, uploads, tmp_path):
    # Prepare: count the students built and the MLLMs alive
    gc.collect()
    alive_before = sum(isinstance(o, MLLM) for o in gc.get_objects())
    built = []

    def make_student():
        student = load_adaptable_student(fleet["checkpoints"])
        built.append(weakref.ref(student))
        return student

    trainer = make_trainer(fleet, tmp_path / "cloud", adapter_cache=2, make_student=make_student)
    # Execute: six robots, one round each
    robots = [f"robot-{i}" for i in range(6)]
    for robot_id in robots:
        upload(trainer, robot_id, uploads[:4])
    results = trainer.step()
    gc.collect()
    # Assert: six versions from one student; the teacher is the fleet's, so one MLLM more than before
    assert [(r["robot_id"], r["version"]) for r in results] == [(r, 1) for r in robots]
    assert len(built) == 1 and built[0]() is trainer.student
    assert sum(isinstance(o, MLLM) for o in gc.get_objects()) - alive_before == 1
    # adapter states in memory: the cache's two and the one in the student; the rest are in the store only
    assert trainer.shared.cached() == robots[-3:-1] and trainer.shared.active == robots[-1]
    assert all(trainer.store.load_adapter_state(r)[0] == 1 for r in robots)


def test_an_adapter_cache_below_zero_is_refused():
    with pytest.raises(ValueError, match="adapter_cache"):
        CloudConfig(adapter_cache=-1)


# ------------------------------------------------------------------- part 2: several workers share one store
def make_worker(fleet, state_dir, worker_id, lease_s=60.0, **settings):
    return make_trainer(fleet, state_dir, worker_id=worker_id, lease_s=lease_s, **settings)


def test_workers_claim_the_oldest_pending_sample_first_and_skip_live_leases(fleet, uploads, tmp_path):
    # Prepare: a quiet robot's one old sample (flushed after 10 s), then a chatty robot's full round, then a third
    trainer = make_trainer(fleet, tmp_path / "cloud")
    store = trainer.store
    upload(trainer, "quiet", uploads[:1])
    upload(trainer, "chatty", uploads[:8])
    upload(trainer, "late", uploads[:4])
    now = max(received for _, received in store.pending_summary().values()) + 11.0  # the quiet sample is due
    # Execute
    claims = [store.claim(worker, 60.0, 4, flush_after_s=10.0, now=now) for worker in ("a", "b", "c", "d")]
    again = store.claim("d", 60.0, 4, flush_after_s=10.0, now=now + 61.0)  # every lease has expired
    skipped = store.claim("d", 60.0, 4, flush_after_s=10.0, skip=frozenset({"quiet"}), now=now + 122.0)
    # Assert: fair order (oldest pending sample, not most samples), one worker per robot while leased
    assert claims == ["quiet", "chatty", "late", None]
    assert again == "quiet" and skipped == "chatty"
    assert store.leases()["late"] == ("c", now + 60.0)
    store.release("late", "someone-else")  # only its holder releases a lease
    assert "late" in store.leases()
    store.release("late", "c")
    assert "late" not in store.leases()


@pytest.mark.parametrize("reported", [False, True], ids=["silent-robot", "robot-reports-v1-meanwhile"])
def test_a_worker_that_dies_mid_round_loses_nothing_and_the_robot_gets_one_version(fleet, uploads, tmp_path,
                                                                                   monkeypatch, reported):  # fmt: skip
    # Prepare: worker a claims r1's round and stalls in it past its lease; worker b serves the same store.
    # reported: the robot applies b's v1 and its status reaches a (every worker hears every robot) while a still
    # trains, which reloads a's chain to v1: a's round must still be dropped, not committed as v2
    state = tmp_path / "cloud"
    stalled, rescuer = make_worker(fleet, state, "a"), make_worker(fleet, state, "b")
    upload(stalled, "r1", uploads[:4])
    real_round, live, rescued = stalled.distiller.run_round, [], []

    def stalls(samples):
        live.append(rescuer.step())  # a's lease is live: b leaves r1 alone
        # a hangs past its lease (a dead worker's lease expires the same way); set in the store, not slept out, so
        # that a loaded machine's slow claim cannot outlast a short lease before this point
        assert stalled.store.renew("r1", "a", 0.0, now=time.time() - 1.0)
        rescued.extend(rescuer.step())  # b claims the expired lease and runs the round
        if reported:
            stalled.receive_status("r1", status("r1", 1))
        return real_round(samples)  # a wakes up and tries to commit the same round

    monkeypatch.setattr(stalled.distiller, "run_round", stalls)
    monkeypatch.setattr(stalled, "_lease_renewal", lambda robot_id: contextlib.nullcontext())  # as if it were dead
    # Execute
    [late] = stalled.step()
    # Assert: b's round counts, a's is dropped whole; the samples were used once, by version 1
    assert live == [[]] and [(r["robot_id"], r["version"]) for r in rescued] == [("r1", 1)]
    assert (late["event"], late["version"]) == ("superseded", None) and stalled.counters.rounds_superseded == 1
    record = stalled.store.load_robot("r1")
    assert record.latest == 1 and sorted(record.deltas) == [1] and stalled.store.pending_counts() == {}
    assert stalled.store.leases() == {}
    # only b resends v1; a knows v1 (from the store), so the robot's status is not taken for a forgery
    assert (stalled.robots["r1"].owned, rescuer.robots["r1"].owned) == (False, True)
    stalled.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.APPLIED))
    assert not stalled.resend_if_behind("r1") and stalled.counters.statuses_ignored == {}


def test_workers_taking_turns_on_one_robot_publish_what_one_worker_would(fleet, uploads, tmp_path):
    # Prepare: one worker alone, and two workers on one store where b holds r1's state of round 1 in memory
    alone = make_trainer(fleet, tmp_path / "alone")
    a, b = make_worker(fleet, tmp_path / "shared", "a"), make_worker(fleet, tmp_path / "shared", "b")
    expected, got = [], []
    # Execute: r1's rounds on b, a, b
    for version, (worker, chosen) in enumerate([(b, slice(0, 4)), (a, slice(4, 8)), (b, slice(8, 12))], start=1):
        upload(alone, "r1", uploads[chosen])
        alone.step()
        expected.append(published(alone, "r1"))
        upload(worker, "r1", uploads[chosen])
        assert [r["version"] for r in worker.step()] == [version]
        got.append(published(worker, "r1"))
    # Assert: b's third round started from a's second, not from what b remembered
    assert all(same_delta(mine, theirs) for mine, theirs in zip(got, expected, strict=True))
    assert b.counters.rounds_superseded == 0


def test_two_workers_serving_one_store_give_each_robot_exactly_one_version(fleet, uploads, tmp_path):
    # Prepare: four robots' rounds due in one store, two workers serving it in parallel
    state = tmp_path / "cloud"
    workers = [make_worker(fleet, state, name) for name in ("a", "b")]
    robots = [f"robot-{i}" for i in range(4)]
    for robot_id in robots:
        upload(workers[0], robot_id, uploads[:4])
    stop = threading.Event()
    threads = [threading.Thread(target=w.serve, args=(stop,), daemon=True) for w in workers]
    # Execute
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while workers[0].store.pending_counts() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(30)
    # Assert: every robot at version 1, each round run once, no lease left behind
    assert {r: workers[0].store.latest(r) for r in robots} == {r: 1 for r in robots}
    assert sum(w.counters.rounds for w in workers) == 4 and sum(w.counters.rounds_superseded for w in workers) == 0
    assert workers[0].store.leases() == {}


def test_worker_settings_are_checked():
    with pytest.raises(ValueError, match="worker_id"):
        CloudConfig(worker_id=" ")
    with pytest.raises(ValueError, match="lease_s"):
        CloudConfig(lease_s=0)


# ------------------------------------------------------------- part 4: leases renewed, resends by any worker
class SteppedClock:
    """``time`` for the cloud service, whose ``monotonic()`` moves only when the test says: its resend, grace and
    come-back waits are a few tenths of a second, which a loaded machine's slow step could outlast in real time."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(time, name)  # time(), time_ns(), sleep(), ... as they are


@pytest.fixture()
def clock(monkeypatch) -> SteppedClock:
    import cloud_trainer.service as service

    stepped = SteppedClock()
    monkeypatch.setattr(service, "time", stepped)
    return stepped


def publish_v1_and_go(fleet, state, signer, uploads) -> None:
    """Worker ``a`` trains and commits r1's v1 in ``state``, then is gone (a crash leaves the same store behind)."""
    a = make_worker(fleet, state, "a")
    a.signer = signer
    upload(a, "r1", uploads[:4])
    assert [r["version"] for r in a.step()] == [1]
    a.close()


def status(robot_id, version):
    return wire.new(wire.ADAPTER_STATUS, robot_id=robot_id, version=version, state=wire.APPLIED)


@pytest.fixture()
def robot_keys(tmp_path):
    """A cloud signing key of its own and a robot trust store holding it."""
    from cdcca.envelope import TrustStore

    private, public = generate_key(tmp_path / "keys", "fleet-test")
    trust = TrustStore()
    trust.add("fleet-test", public.read_text())
    return Signer.load(private), trust


def test_a_worker_renews_its_lease_while_a_long_round_runs(fleet, uploads, tmp_path, monkeypatch):
    # Prepare: worker a's lease is 1.5 s and its round lasts until the lease was renewed five times (2.5 s unless the
    # machine is loaded: a round of fixed length could end before them); worker b polls the store all the while
    state = tmp_path / "cloud"
    a, b = make_worker(fleet, state, "a", lease_s=1.5), make_worker(fleet, state, "b")
    upload(a, "r1", uploads[:4])
    real_round, polls = a.distiller.run_round, []

    def long_round(samples):
        until = time.monotonic() + 60.0
        while time.monotonic() < until and (a.counters.lease_renewals < 5 or len(polls) <= 10):
            polls.append(b.step())  # b would claim r1 here if a's lease had expired
            if polls[-1]:
                break
            time.sleep(0.05)
        return real_round(samples)

    monkeypatch.setattr(a.distiller, "run_round", long_round)
    # Execute
    [result] = a.step()
    # Assert: b never took the round, a committed it once, its lease was renewed (every 0.5 s) and released
    assert len(polls) > 10 and all(p == [] for p in polls)
    assert (result["event"], result["version"]) == ("round", 1)
    assert a.counters.lease_renewals >= 5 and b.counters.rounds == 0 and a.counters.rounds_superseded == 0
    assert a.store.latest("r1") == 1 and a.store.leases() == {}


def test_a_robot_behind_gets_the_update_from_another_worker_when_its_publisher_is_gone(fleet, uploads, tmp_path,
                                                                                       robot_keys, clock):  # fmt: skip
    # Prepare: worker a commits r1's v1 and is gone; worker b never trained r1, and the robot says it runs v0
    from cdcca.edge.adapter_state import verify_delta
    from cdcca.models.trainable import trainable_parameters

    signer, trust = robot_keys
    state = tmp_path / "cloud"
    publish_v1_and_go(fleet, state, signer, uploads)
    b = make_worker(fleet, state, "b", resend_after_s=0.1)
    b.signer = signer
    b.link = link = RecordingLink()
    # Execute: the robot's heartbeats; b resends only after the publisher's grace (2 x resend_after_s)
    b.receive_status("r1", status("r1", 0))
    early = b.step()
    sent_early = list(link.deltas)
    clock.advance(0.25)
    b.receive_status("r1", status("r1", 0))
    b.step()
    # Assert: one resend, of the store's v1, which the robot verifies and applies
    assert early == [] and sent_early == [], (early, [(r, m.version) for r, m in sent_early])
    assert [(robot_id, msg.version) for robot_id, msg in link.deltas] == [("r1", 1)]
    assert b.counters.foreign_resends == 1 and b.counters.statuses_ignored == {}
    student = load_adaptable_student(fleet["checkpoints"])
    base = {k: v.detach().numpy() for k, v in trainable_parameters(student).items()}
    applied = verify_delta(link.deltas[0][1], trust=trust, robot_id="r1", version=0, newest_version=0, base=base,
                           current=base, base_fingerprint=b.base_fingerprint)  # fmt: skip
    assert applied.keys() == base.keys()


def test_a_delta_on_a_version_read_back_from_the_store_keeps_the_robots_layout(fleet, uploads, tmp_path, robot_keys):
    # Prepare: a robot that applied v1 from one cloud process; the cloud restarts and reads v1 back from its store
    from cdcca.edge.adapter_state import verify_delta
    from cdcca.models.trainable import trainable_parameters

    signer, trust = robot_keys
    student = load_adaptable_student(fleet["checkpoints"])
    base = {k: v.detach().numpy() for k, v in trainable_parameters(student).items()}
    first = make_trainer(fleet, tmp_path / "cloud")
    first.signer = signer
    upload(first, "r1", uploads[:4])
    first.step()
    held = verify_delta(published(first, "r1"), trust=trust, robot_id="r1", version=0, newest_version=0, base=base,
                        current=base)  # fmt: skip
    first.receive_status("r1", status("r1", 1))
    first.close()
    again = make_trainer(fleet, tmp_path / "cloud")
    again.signer = signer
    # Execute: the next round, an incremental delta against the v1 the store held
    upload(again, "r1", uploads[4:8])
    again.step()
    delta = published(again, "r1")
    # Assert: the robot accepts it (its decoder checks the layout against its own trainable set's order)
    assert (delta.version, delta.base_version, delta.keyframe) == (2, 1, False)
    applied = verify_delta(delta, trust=trust, robot_id="r1", version=1, newest_version=1, base=base, current=held)
    assert list(applied) == list(base)


def test_a_robot_that_comes_back_after_a_give_up_gets_a_keyframe_from_a_worker_that_did_not_publish(
        fleet, uploads, tmp_path, robot_keys, clock):  # fmt: skip
    # Prepare: worker a commits r1's v1 and is gone; worker b resends it once (max_resends=1), gives up, and the
    # robot, still on v0, is heard again only later
    signer, _ = robot_keys
    state = tmp_path / "cloud"
    publish_v1_and_go(fleet, state, signer, uploads)
    b = make_worker(fleet, state, "b", resend_after_s=0.05, max_resends=1, comeback_after_s=0.1)
    b.signer, b.link = signer, (link := RecordingLink())
    b.receive_status("r1", status("r1", 0))
    for _ in range(3):  # the publisher's grace, b's one resend, then its give-up
        clock.advance(0.12)
        b.step()
    resent, gave_up = [m.version for _, m in link.deltas], b.counters.give_ups
    # Execute: the robot is heard within the non-publisher's doubled wait, then after it
    b.receive_status("r1", status("r1", 0))
    b.step()
    early = len(link.deltas)
    clock.advance(0.25)  # past 2 x comeback_after_s from the give-up
    b.receive_status("r1", status("r1", 0))
    b.step()
    # Assert: one resend, a give-up, nothing on the early come-back, then v1 again as a keyframe
    assert resent == [1] and gave_up == 1 and early == 1
    assert [(m.version, m.keyframe) for _, m in link.deltas[1:]] == [(1, True)]
    assert b.counters.comeback_resends == 1


def test_statuses_a_robot_writes_cannot_grow_the_workers_state(fleet, tmp_path):
    """A robot writes its statuses' reasons and versions: thousands of distinct reasons stay a few counted kinds
    (each a metric series), and a version no worker published for an unknown robot id makes no robot state."""
    worker = make_worker(fleet, tmp_path / "cloud", "w1")
    for i in range(300):
        reason = f"x{i}: made up" if i % 2 else "bad signature: forged"
        worker.receive_status("r1", wire.new(wire.ADAPTER_STATUS, robot_id="r1", version=0, state=wire.REJECTED,
                                             reason=reason))  # fmt: skip
    for i in range(100):
        worker.receive_status(f"ghost{i}", status(f"ghost{i}", 7))
    assert worker.counters.update_rejections == {"other": 150, "signature": 150}
    assert worker.robots == {} and worker.counters.statuses_ignored == {"version": 100}
