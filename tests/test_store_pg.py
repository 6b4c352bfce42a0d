"""The cloud store on PostgreSQL (issue 16 part 3): the behaviours of the SQLite store, on both backends, against a
real server (tests/pg_server.py); claims under concurrency; the SQLite -> PostgreSQL migration; and two workers
sharing a PostgreSQL store while one of them dies mid-round.
"""

import contextlib
import dataclasses
import sqlite3
import threading
import time

import pytest
import torch

from cloud_trainer.store import SCHEMA_VERSION, CloudStore, NewerSchema, StaleRound, open_store, to_bytes
from tests.pg_server import pg_server, pg_url  # noqa: F401  (the fixtures)
from tests.test_cloud_fleet import fleet, uploads  # noqa: F401  (the fixtures)

BACKENDS = ["sqlite", "postgresql"]


def open_backend(backend, tmp_path, request):
    """A fresh store of ``backend`` (a new SQLite file, or a new database on the session's server)."""
    if backend == "sqlite":
        return CloudStore(tmp_path / "cloud.sqlite")
    return open_store(request.getfixturevalue("pg_url"))


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    opened = open_backend(request.param, tmp_path, request)
    yield opened
    opened.close()


def commit(store, robot_id, version, sample_ids=(), seed=0, base_version=0):
    """A round's commit with small tensors that differ per version."""
    store.commit_round(robot_id, version, list(sample_ids), {"student.w": torch.full((3,), float(version + seed))},
                       {"w": torch.arange(4.0) * version}, f"delta-{version}".encode(), 0,
                       {"0.exp_avg": torch.ones(2) * version}, base_version=base_version)  # fmt: skip


def test_open_store_picks_the_backend_by_url(store):
    assert type(store).__name__ == ("PgStore" if getattr(store, "url", None) else "CloudStore")
    assert store.schema_version() == SCHEMA_VERSION


def test_samples_are_stored_once_pending_oldest_first_and_bytes_kept(store):
    # Execute
    added = [store.add_sample("r1", sid, bytes([i, 0, 255])) for i, sid in enumerate(["a", "b", "c"])]
    again = store.add_sample("r1", "a", b"other")
    store.add_sample("r2", "a", b"\x00")
    # Assert
    assert added == [True, True, True] and again is False
    assert store.pending("r1") == [("a", b"\x00\x00\xff"), ("b", b"\x01\x00\xff"), ("c", b"\x02\x00\xff")]
    assert [sid for sid, _ in store.pending("r1", limit=2)] == ["a", "b"]
    assert store.count() == 4 and store.count("r1") == 3 and store.sample_ids("r1") == {"a", "b", "c"}
    assert store.pending_counts() == {"r1": 3, "r2": 1}
    count, oldest = store.pending_summary()["r1"]
    assert count == 3 and abs(oldest - time.time()) < 60


def test_a_quarantined_sample_is_kept_but_never_pending_or_replayed(store):
    for sid in ("a", "b", "c"):
        store.add_sample("r1", sid, b"x")
    commit(store, "r1", 1, ["a", "b"])
    # Execute
    store.quarantine("r1", "b", "token_grid: 30 tokens")
    store.quarantine("r1", "c", "")
    # Assert
    assert store.pending("r1") == [] and [sid for sid, _ in store.used("r1", 10)] == ["a"]
    assert store.quarantined() == {"r1": {"b": "token_grid: 30 tokens", "c": "unknown"}}
    assert store.quarantined("r2") == {} and store.quarantine_counts() == {"r1": 2} and store.count("r1") == 3


def test_a_round_commits_whole_and_a_stale_one_not_at_all(store):
    for sid in ("a", "b", "c"):
        store.add_sample("r1", sid, b"x")
    # Execute
    commit(store, "r1", 1, ["a", "b"])
    with pytest.raises(StaleRound, match="v1 in the store, not v0"):
        commit(store, "r1", 1, ["c"], seed=7)  # another worker's first round came first
    with pytest.raises(StaleRound):
        commit(store, "r1", 3, ["c"])  # a round that skipped one
    with pytest.raises(StaleRound, match="used by a round another worker committed"):
        commit(store, "r1", 2, ["c", "a"])  # the next version, but on a sample v1 already trained on
    many = [f"m{i}" for i in range(1200)]  # more ids than one statement may carry on old SQLite builds (999)
    with pytest.raises(StaleRound, match="1 of the round's samples"):
        commit(store, "r1", 2, [*many, "b"])
    record = store.load_robot("r1")
    # Assert: v1 as committed; the stale commits left nothing (c still pending, no v3)
    assert (record.latest, record.applied, sorted(record.deltas)) == (1, 0, [1])
    assert torch.equal(record.student["student.w"], torch.full((3,), 1.0))
    assert torch.equal(record.published[1]["w"], torch.arange(4.0)) and record.deltas[1] == b"delta-1"
    assert torch.equal(record.optimizer["0.exp_avg"], torch.ones(2))
    assert [sid for sid, _ in store.pending("r1")] == ["c"] and [sid for sid, _ in store.used("r1", 5)] == ["b", "a"]
    chain_only = store.load_robot("r1", adapter=False)
    assert chain_only.student is None and chain_only.optimizer is None and sorted(chain_only.published) == [1]
    latest, student, optimizer = store.load_adapter_state("r1")
    assert latest == 1 and torch.equal(student["student.w"], record.student["student.w"]) and optimizer
    assert store.load_robot("nobody") is None and store.load_adapter_state("nobody") is None
    assert store.latest("r1") == 1 and store.latest("nobody") == 0 and store.robots() == ["r1"]


def test_applied_versions_prune_what_the_robot_can_no_longer_be_based_on(store):
    for version in (1, 2, 3):
        commit(store, "r1", version)
    # Execute / Assert
    store.record_applied("r1", 2)
    assert (store.load_robot("r1").applied, sorted(store.load_robot("r1").published)) == (2, [2, 3])
    store.record_applied("r1", 9)  # a version beyond the latest never prunes the latest
    assert sorted(store.load_robot("r1").deltas) == [3]


def test_a_keyframe_makes_its_version_unknown_and_a_round_incremental_on_it_stale(store):
    commit(store, "r1", 1)
    commit(store, "r1", 2, base_version=1)
    # Execute: another worker resends v2 as a keyframe
    assert store.record_keyframe("r1", 2, b"keyframe-2")
    assert not store.record_keyframe("r1", 1, b"keyframe-1")  # v1 is not the latest: nothing changes
    # Assert: v2's delta is the keyframe and what the robot holds at v2 unknown; a round on it is stale
    record = store.load_robot("r1")
    assert record.deltas == {1: b"delta-1", 2: b"keyframe-2"} and record.published[2] == {}
    assert torch.equal(record.published[1]["w"], torch.arange(4.0))
    with pytest.raises(StaleRound, match="v2, the base of the round's delta, was resent as a keyframe"):
        commit(store, "r1", 3, base_version=2)
    commit(store, "r1", 3, base_version=1)  # on a version still known, or on the base: committed
    assert store.latest("r1") == 3 and store.load_robot("r1").deltas[3] == b"delta-3"


def test_a_declined_version_is_recorded_once(store):
    commit(store, "r1", 1)
    assert store.record_declined("r1", 1, "rolled back from v1: health check")
    assert not store.record_declined("r1", 1, "again")
    assert store.load_robot("r1").declined == {1: "rolled back from v1: health check"}


def test_claims_take_the_oldest_pending_sample_first_and_respect_live_leases(store):
    # Prepare: a quiet robot's one old sample (due after 10 s), a chatty robot's two rounds, a third robot's round
    store.add_sample("quiet", "q0", b"x")
    for i in range(8):
        store.add_sample("chatty", f"c{i}", b"x")
    for i in range(4):
        store.add_sample("late", f"l{i}", b"x")
    store.add_sample("short", "s0", b"x")  # one sample, not yet due
    now = max(oldest for _, oldest in store.pending_summary().values()) + 11.0
    # Execute
    claims = [store.claim(worker, 60.0, 4, flush_after_s=10.0, now=now) for worker in ("a", "b", "c", "d", "e")]
    not_flushed = store.claim("e", 60.0, 4, now=now)
    mine_again = store.claim("b", 60.0, 4, now=now, skip=frozenset({"quiet"}))  # b holds chatty: it may re-claim it
    again = store.claim("d", 60.0, 4, flush_after_s=10.0, now=now + 61.0)  # every lease has expired
    skipped = store.claim("d", 60.0, 4, flush_after_s=10.0, skip=frozenset({"quiet"}), now=now + 122.0)
    # Assert: fair order (oldest pending sample, not most samples), one worker per robot while its lease lives
    assert claims == ["quiet", "chatty", "late", "short", None]
    assert not_flushed is None and mine_again == "chatty"
    assert again == "quiet" and skipped == "chatty"
    assert store.leases()["late"] == ("c", now + 60.0)
    assert store.renew("late", "c", 30.0, now=now + 1.0) and store.leases()["late"] == ("c", now + 31.0)
    assert not store.renew("late", "someone-else", 30.0, now=now + 1.0)
    store.release("late", "someone-else")  # only its holder releases a lease
    assert "late" in store.leases()
    store.release("late", "c")
    assert "late" not in store.leases()


def test_a_committed_round_is_no_longer_claimable(store):
    for i in range(4):
        store.add_sample("r1", f"s{i}", b"x")
    assert store.claim("a", 0.01, 4) == "r1"
    commit(store, "r1", 1, [f"s{i}" for i in range(4)])
    store.release("r1", "a")
    assert store.claim("b", 60.0, 4, flush_after_s=0.0) is None and store.leases() == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_claiming_at_once_never_get_the_same_robot(backend, tmp_path, request):
    # Prepare: 12 robots with a due round; 4 workers, each with its own connection, start together
    first = open_backend(backend, tmp_path, request)
    robots = [f"robot-{i:02d}" for i in range(12)]
    for robot_id in robots:
        for i in range(2):
            first.add_sample(robot_id, f"s{i}", b"x")
    spec = first.url if backend == "postgresql" else tmp_path / "cloud.sqlite"
    workers = [open_store(spec) for _ in range(4)]
    start, claimed, errors = threading.Barrier(len(workers)), {}, []

    def work(name, store):
        try:
            start.wait()
            mine = claimed.setdefault(name, [])
            while (robot_id := store.claim(name, 60.0, 2, skip=frozenset(mine))) is not None:
                mine.append(robot_id)  # skipped from now on: a worker may re-claim its own lease (a renewal)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"w{i}", s)) for i, s in enumerate(workers)]
    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Assert: every robot claimed exactly once, each lease by the worker that got it
    together = [robot_id for mine in claimed.values() for robot_id in mine]
    assert errors == [] and sorted(together) == robots
    assert {r: w for r, (w, _) in first.leases().items()} == {r: w for w, mine in claimed.items() for r in mine}
    for store in [first, *workers]:
        store.close()


def test_a_claim_skips_a_robot_another_worker_is_claiming_this_moment(pg_url):  # noqa: F811
    import psycopg

    # Prepare: r1's round is the oldest; another worker's claim transaction holds r1's queue row locked
    store = open_store(pg_url)
    for robot_id in ("r1", "r2"):
        for i in range(2):
            store.add_sample(robot_id, f"s{i}", b"x")
    with psycopg.connect(pg_url) as other:
        other.execute("SELECT 1 FROM queue WHERE robot_id = 'r1' FOR UPDATE")
        # Execute
        started = time.monotonic()
        during = store.claim("b", 60.0, 2)
        waited = time.monotonic() - started
        other.rollback()  # that worker found nothing to do: r1 is free again
    after = store.claim("c", 60.0, 2, skip=frozenset({"r2"}))
    # Assert: skipped, not waited for (SKIP LOCKED); then claimable
    assert during == "r2" and waited < 2.0 and after == "r1"
    assert {r: w for r, (w, _) in store.leases().items()} == {"r1": "c", "r2": "b"}
    store.close()


def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(pg_url):  # noqa: F811
    import psycopg

    from cloud_trainer.store import STORE_ERRORS

    store = open_store(pg_url)
    store.add_sample("r1", "s0", b"x")
    with psycopg.connect(pg_url, autocommit=True) as admin:  # the server drops the store's connection (a restart)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                      "AND datname = current_database()")  # fmt: skip
    with pytest.raises(STORE_ERRORS):  # what the service counts as a store fault, not a bug
        store.add_sample("r1", "s1", b"x")
    assert store.add_sample("r1", "s1", b"x") and store.count("r1") == 2
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_committing_one_robots_round_at_once_publish_one_version(backend, tmp_path, request):
    # Prepare: two workers, each with its own connection, finish r1's round at the same time (its first, then its
    # second); worker 0 dawdles inside its commit, after it read the robot's version, while worker 1 commits
    first = open_backend(backend, tmp_path, request)
    spec = first.url if backend == "postgresql" else tmp_path / "cloud.sqlite"
    workers = [open_store(spec) for _ in range(2)]
    first.add_sample("r1", "s1", b"x")
    first.add_sample("r1", "s2", b"x")
    real_lock = workers[0]._lock_robot

    locked = threading.Event()  # worker 0 holds the robot's row

    def dawdles(db, robot_id, applied):
        latest = real_lock(db, robot_id, applied)
        locked.set()
        time.sleep(0.3)
        return latest

    workers[0]._lock_robot = dawdles

    def race(version):
        outcomes = []

        def finish(seed):
            try:
                commit(workers[seed], "r1", version, [f"s{version}"], seed=seed)
                outcomes.append(("committed", seed))
            except StaleRound:
                outcomes.append(("stale", seed))

        threads = [threading.Thread(target=finish, args=(seed,)) for seed in (0, 1)]
        locked.clear()
        threads[0].start()
        assert locked.wait(30)  # worker 1 starts once worker 0 has the lock, however loaded the machine is
        threads[1].start()
        for thread in threads:
            thread.join(30)
        return outcomes

    for version in (1, 2):
        # Execute
        outcomes = race(version)
        # Assert: worker 0's commit counts, worker 1's waited for it and was refused whole (in either order of the two
        # threads' reports: once the lock is released, which one appends first is the scheduler's choice)
        assert sorted(outcomes) == [("committed", 0), ("stale", 1)], version
        record = first.load_robot("r1")
        assert record.latest == version and sorted(record.deltas) == list(range(1, version + 1))
        assert torch.equal(record.student["student.w"], torch.full((3,), float(version)))
    for store in [first, *workers]:
        store.close()


def test_one_store_serves_several_threads(store):
    # Prepare: two threads store samples (as the link's callback does) while this one claims (as the round loop does)
    def add(prefix):
        for i in range(40):
            store.add_sample("r1", f"{prefix}{i}", b"x")

    threads = [threading.Thread(target=add, args=(p,)) for p in "ab"]
    # Execute
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        store.claim("w", 60.0, 100, flush_after_s=0.0)
        store.pending_summary()
    for thread in threads:
        thread.join(30)
    # Assert
    assert store.count("r1") == 80 and store.pending_counts() == {"r1": 80}
    assert store.claim("w", 60.0, 80) == "r1" and store.leases()["r1"][0] == "w"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_of_a_newer_schema_is_refused(backend, tmp_path, request):
    store = open_backend(backend, tmp_path, request)
    with store._transaction() as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    spec = store.url if backend == "postgresql" else tmp_path / "cloud.sqlite"
    store.close()
    with pytest.raises(NewerSchema, match="upgrade cdcca"):
        open_store(spec)


def test_an_old_sqlite_store_gets_the_schema_version(tmp_path):
    with sqlite3.connect(tmp_path / "old.sqlite") as db:  # written before schema_version (and quarantine) existed
        db.execute("CREATE TABLE samples (robot_id TEXT NOT NULL, sample_id TEXT NOT NULL, received REAL NOT NULL, "
                   "payload BLOB NOT NULL, version INTEGER, PRIMARY KEY (robot_id, sample_id))")  # fmt: skip
    store = CloudStore(tmp_path / "old.sqlite")
    assert store.schema_version() == SCHEMA_VERSION


# ------------------------------------------------------------------------------------------ migration
def old_sqlite_state(path):
    """A SQLite state as the first cloud wrote it (no optimizer, quarantined, leases or declined), then used by
    today's store: pending, used and quarantined samples, two robots' chains, a declined version and a lease."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE robots (robot_id TEXT PRIMARY KEY, latest INTEGER NOT NULL, "
                   "applied INTEGER NOT NULL, student BLOB)")  # fmt: skip
        db.execute("CREATE TABLE samples (robot_id TEXT NOT NULL, sample_id TEXT NOT NULL, received REAL NOT NULL, "
                   "payload BLOB NOT NULL, version INTEGER, PRIMARY KEY (robot_id, sample_id))")  # fmt: skip
        db.execute("INSERT INTO robots VALUES ('old', 0, 0, ?)", (to_bytes({"student.w": torch.ones(2)}),))
        db.execute("INSERT INTO samples VALUES ('old', 'o1', 1.5, x'00ff', NULL)")
    store = CloudStore(path)
    for robot_id in ("r1", "r2"):
        for i in range(5):
            store.add_sample(robot_id, f"s{i}", bytes([i]) * 100)
    commit(store, "r1", 1, ["s0", "s1"])
    commit(store, "r1", 2, ["s2"], seed=3)
    commit(store, "r2", 1, ["s0"])
    store.quarantine("r2", "s4", "token_grid: 30 tokens")
    store.record_declined("r1", 2, "rolled back from v2: health check")
    store.record_applied("r2", 1)
    store.claim("gone-worker", 600.0, 1)
    return store


def assert_same_state(a, b):
    assert a.robots() == b.robots() and a.pending_summary() == b.pending_summary()
    assert a.quarantined() == b.quarantined() and a.count() == b.count()
    for robot_id in a.robots() + ["old"]:
        assert a.pending(robot_id) == b.pending(robot_id) and a.used(robot_id, 100) == b.used(robot_id, 100)
        ra, rb = a.load_robot(robot_id), b.load_robot(robot_id)
        assert (ra.latest, ra.applied, ra.deltas, ra.declined) == (rb.latest, rb.applied, rb.deltas, rb.declined)
        for mine, theirs in [(ra.student, rb.student), (ra.optimizer, rb.optimizer)] + \
                [(ra.published[v], rb.published[v]) for v in ra.published]:  # fmt: skip
            if mine is None or theirs is None:
                assert mine is None and theirs is None
            else:
                assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_sqlite_state_migrates_into_postgresql_whole(tmp_path, pg_url):  # noqa: F811
    from cloud_trainer.migrate import TargetNotEmpty, migrate_sqlite

    source = old_sqlite_state(tmp_path / "cloud.sqlite")
    # Execute
    counts = migrate_sqlite(tmp_path / "cloud.sqlite", pg_url)
    target = open_store(pg_url)
    # Assert: the same rows and bit-equal tensors; no lease; the migrated rounds are claimable and committable
    assert counts == {"samples": 11, "robots": 3, "published": 3, "declined": 1}
    assert_same_state(source, target)
    assert target.leases() == {} and source.leases() != {}
    claims = [target.claim("w", 60.0, 2), target.claim("w", 60.0, 2, skip=frozenset({"r1"}))]
    claims.append(target.claim("w", 60.0, 2, flush_after_s=0.0, skip=frozenset({"r1", "r2"})))
    assert claims == ["r1", "r2", "old"]  # oldest pending sample first; old's one sample only once flushed
    commit(target, "r1", 3, ["s3", "s4"])
    assert target.latest("r1") == 3 and target.pending("r1") == []
    # a second migration into the same database: refused, nothing changed; --replace copies afresh
    with pytest.raises(TargetNotEmpty, match="already holds"):
        migrate_sqlite(tmp_path / "cloud.sqlite", pg_url)
    assert target.latest("r1") == 3
    assert migrate_sqlite(tmp_path / "cloud.sqlite", pg_url, replace=True) == counts
    assert_same_state(source, target) and target.leases() == {}
    source.close()
    target.close()


def test_the_migrate_command_prints_counts_and_refuses_a_full_target(tmp_path, pg_url, capsys):  # noqa: F811
    from cloud_trainer.migrate import main

    old_sqlite_state(tmp_path / "cloud.sqlite").close()
    assert main([str(tmp_path / "cloud.sqlite"), pg_url]) == 0
    assert "11 samples, 3 robots, 3 published, 1 declined" in capsys.readouterr().out
    assert main([str(tmp_path / "cloud.sqlite"), pg_url]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.sqlite"), pg_url]) == 2


# --------------------------------------------------------------------- two workers on one PostgreSQL store
def make_pg_worker(fleet, state_dir, url, worker_id, lease_s=60.0):  # noqa: F811
    """A fleet test worker (tests/test_cloud_fleet.py's settings: tiny fast rounds) on the PostgreSQL store."""
    from cdcca.akd import AKDConfig
    from cdcca.models.checkpoint import load_adaptable_student
    from cloud_trainer.service import CloudConfig, CloudTrainer

    config = CloudConfig(state_dir=state_dir, store=url, worker_id=worker_id, lease_s=lease_s, round_size=4,
                         max_round_samples=4, codec="fp16", round_retry_s=0.0,
                         akd=AKDConfig(steps=3, batch_size=4, anchor_batch=4, forget_tolerance=1.0))  # fmt: skip
    return CloudTrainer(fleet["teacher"], lambda: load_adaptable_student(fleet["checkpoints"]), fleet["signer"],
                        config, anchors=fleet["anchors"])  # fmt: skip


def test_a_worker_that_dies_mid_round_on_postgresql_loses_nothing(fleet, uploads, pg_url, tmp_path,  # noqa: F811
                                                                  monkeypatch):  # fmt: skip
    # Prepare: worker a claims r1's round with a short lease and hangs in it (no lease renewal: a dead worker);
    # worker b, on another machine as far as the store knows (own state dir, own connection), serves the same store
    stalled = make_pg_worker(fleet, tmp_path / "a", pg_url, "a", lease_s=1.0)
    rescuer = make_pg_worker(fleet, tmp_path / "b", pg_url, "b")
    monkeypatch.setattr(stalled, "_lease_renewal", lambda robot_id: contextlib.nullcontext(), raising=False)
    acked = [stalled.receive_tokens("r1", dataclasses.replace(msg, robot_id="r1")) for msg in uploads[:4]]
    real_round, rescued = stalled.distiller.run_round, []

    def stalls(samples):
        if not rescued:
            assert rescuer.step() == []  # a's lease on r1 is live: b leaves r1 alone
            time.sleep(1.1)  # a hangs past its lease; meanwhile r2's round fills up at b
            acked.extend(rescuer.receive_tokens("r2", dataclasses.replace(msg, robot_id="r2")) for msg in uploads[4:8])
            rescued.extend(rescuer.step())  # b claims r1's expired lease (the oldest sample) and r2's round
        return real_round(samples)  # a wakes up and tries to commit r1's round

    monkeypatch.setattr(stalled.distiller, "run_round", stalls)
    # Execute
    late = stalled.step()
    # Assert: b's round of r1 counts, a's is dropped whole; every acknowledged sample was used, once, by v1
    assert len(acked) == 8 and all(acked)
    assert [(r["robot_id"], r["version"]) for r in rescued] == [("r1", 1), ("r2", 1)]
    assert [(r["event"], r["version"]) for r in late] == [("superseded", None)]
    assert stalled.counters.rounds_superseded == 1 and rescuer.counters.rounds_superseded == 0
    store = stalled.store
    assert type(store).__name__ == "PgStore"
    for robot_id, sent in [("r1", uploads[:4]), ("r2", uploads[4:8])]:
        record = store.load_robot(robot_id)
        assert record.latest == 1 and sorted(record.deltas) == [1], robot_id
        assert store.sample_ids(robot_id) == {m.sample_id for m in sent}
        assert {sid for sid, _ in store.used(robot_id, 10)} == {m.sample_id for m in sent}
    assert store.pending_counts() == {} and store.leases() == {}
    stalled.close()
    rescuer.close()


def test_the_test_server_is_skipped_with_the_reason_when_postgresql_is_not_installed(tmp_path, monkeypatch):
    import tests.pg_server as pg

    monkeypatch.setattr(pg, "find_binaries", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="binaries not found .* install Debian's postgresql package"):
        pg.start_server(tmp_path)


def test_a_sqlite_store_opening_waits_out_a_lock_sqlite_reports_without_its_busy_handler(tmp_path, monkeypatch):
    """SQLite may answer "database is locked" at once, without waiting in its busy handler (as two torchrun ranks
    opening one store met it on ``PRAGMA journal_mode=WAL``): opening retries until ``OPEN_WAIT_S``, then raises."""
    from cloud_trainer import store as store_module

    real_connect, refusals = sqlite3.connect, {"left": 3}

    class Contended:  # a connection whose WAL switch meets another process's lock the first times
        def __init__(self, db):
            self._db = db

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and refusals["left"]:
                refusals["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)

    monkeypatch.setattr(store_module.sqlite3, "connect", lambda *a, **k: Contended(real_connect(*a, **k)))
    opened = CloudStore(tmp_path / "cloud.sqlite")
    assert refusals["left"] == 0 and opened.schema_version() == SCHEMA_VERSION
    assert opened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    monkeypatch.setattr(store_module, "OPEN_WAIT_S", 0.2)  # a lock that stays: an error once the wait is over
    refusals["left"] = 10**6
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        CloudStore(tmp_path / "other.sqlite")
    assert 0.2 <= time.monotonic() - started < 5.0


def test_a_server_that_cannot_be_reached_is_one_clear_error_without_the_password():
    from cdcca.errors import CdccaError

    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg")
    with pytest.raises(CdccaError, match=r"cannot reach the --store postgresql://cdcca:\*\*\*@127\.0\.0\.1:1/cdcca: "
                                         r".*check the host, port") as caught:  # fmt: skip
        open_store("postgresql://cdcca:secret@127.0.0.1:1/cdcca")
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)  # the CLI's one line, exit 2
    with pytest.raises(CdccaError, match=r"postgresql://u@127\.0\.0\.1:1/db\?sslmode=disable&password=\*\*\*: "):
        open_store("postgresql://u@127.0.0.1:1/db?sslmode=disable&password=hunter2")  # libpq takes it as a parameter
