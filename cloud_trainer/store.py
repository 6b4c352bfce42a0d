"""The cloud's durable state: received samples, and per robot its chain and adapter state.

A received ``UtsTokens`` counts as received (and is acknowledged) only once its row is committed; a duplicate
(same robot_id, sample_id) is ignored. A finished round is one transaction: the robot's new cloud-student
parameters, the version it publishes, what the robot will hold after decoding (the base of the next
incremental delta), the signed ``WeightDelta`` bytes, and the round's samples marked as used. A crash
anywhere before the commit leaves the samples pending, so the round simply runs again after a restart.
A version a robot rolled back from is recorded (``declined``), so no restart sends it again.
A sample a round cannot take is *quarantined*: kept, with the reason, but never pending again, so a restart
does not run into it again. Tensors are stored as safetensors bytes (no pickle).

Two backends share the SQL of :class:`SqlStore`: :class:`CloudStore`, one SQLite file (the embedded default), and
:class:`cloud_trainer.store_pg.PgStore`, a PostgreSQL server that workers on several machines share (issue 16).
Each records its ``schema_version``; a store written by an older version is migrated when it is opened.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cdcca.errors import CdccaError

# How long opening a SQLite store waits out another process's lock. Besides its busy handler (the connection's
# timeout), SQLite may answer SQLITE_BUSY at once where waiting could deadlock or while another connection sets up
# the WAL index (sqlite3_busy_handler, "The presence of a busy handler does not guarantee that it will be invoked");
# two torchrun ranks opening one store met that ("database is locked" from PRAGMA journal_mode=WAL). Every step of
# opening is idempotent, so it is retried until this deadline.
OPEN_WAIT_S = 30.0
SCHEMA_VERSION = 2  # 1: the first stores (no optimizer, quarantined, leases, declined); 2: all of them

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    robot_id  TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    received  REAL NOT NULL,
    payload   BLOB NOT NULL,       -- CDR bytes of the UtsTokens message as received
    version   INTEGER,             -- the adapter version whose round used it; NULL while pending
    quarantined TEXT,              -- why no round may use it (NULL: usable)
    PRIMARY KEY (robot_id, sample_id)
);
CREATE INDEX IF NOT EXISTS samples_pending ON samples (robot_id, version, received);
CREATE TABLE IF NOT EXISTS robots (
    robot_id TEXT PRIMARY KEY,
    latest   INTEGER NOT NULL,     -- newest published version
    applied  INTEGER NOT NULL,     -- the version the robot last reported as current
    student  BLOB,                 -- safetensors: cloud student's trainable set and AKD projections
    optimizer BLOB                 -- safetensors: AdamW moments and step counts of those parameters
);
CREATE TABLE IF NOT EXISTS published (
    robot_id TEXT NOT NULL,
    version  INTEGER NOT NULL,
    params   BLOB NOT NULL,        -- safetensors: the trainable set the robot holds at this version (none: resent
                                   -- as a keyframe, the robot may hold either; the next delta is a keyframe)
    delta    BLOB NOT NULL,        -- CDR bytes of the signed WeightDelta
    PRIMARY KEY (robot_id, version)
);
CREATE TABLE IF NOT EXISTS leases (
    robot_id TEXT PRIMARY KEY,     -- a robot whose round a worker has claimed
    worker   TEXT NOT NULL,        -- CloudConfig.worker_id of that worker
    expires  REAL NOT NULL         -- Unix seconds; after it, another worker may claim the robot's round
);
CREATE TABLE IF NOT EXISTS declined (
    robot_id TEXT NOT NULL,
    version  INTEGER NOT NULL,     -- a version the robot rolled back from: never sent to it again
    reason   TEXT NOT NULL,        -- the robot's ROLLED_BACK reason
    PRIMARY KEY (robot_id, version)
);
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL       -- one row: the SCHEMA_VERSION the store was last opened with
);
"""

try:  # what a store operation raises when the database fails (not a bug): the drivers' base errors
    import psycopg

    STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
except ImportError:  # a cloud without PostgreSQL support
    STORE_ERRORS = (sqlite3.Error,)

PENDING = "version IS NULL AND quarantined IS NULL"  # a sample no round has used or may not use


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return load_tensors(bytes(data))


UNKNOWN = to_bytes({})  # a published version's params once it was resent as a keyframe: not known


class StaleRound(RuntimeError):
    """A round's commit found the robot at another version than the round started from: another worker committed
    a round of that robot meanwhile (its lease had expired). Nothing of this round is stored."""


class NewerSchema(RuntimeError):
    """The store was written by a newer cdcca (a higher ``schema_version``): upgrade this worker first."""


class StoreUnreachable(CdccaError, ConnectionError):
    """The store's server cannot be reached when the store is opened (a wrong host, port, database or user, or a
    server that is down): a setting the operator fixes, reported in one line."""


@dataclass
class RobotRecord:
    """A robot's persisted state."""

    robot_id: str
    latest: int
    applied: int
    student: dict[str, torch.Tensor] | None
    published: dict[int, dict[str, torch.Tensor]]
    deltas: dict[int, bytes]
    optimizer: dict[str, torch.Tensor] | None = None
    declined: dict[int, str] = field(default_factory=dict)  # versions the robot rolled back from -> its reason


class Cursor(Protocol):
    """What both drivers' ``execute`` returns (DB-API 2.0, PEP 249)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Executor(Protocol):
    """Runs the shared SQL (``?`` placeholders) on one backend's connection."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Any: ...


class SqlStore:
    """The store's behaviour in SQL that reads the same on SQLite and PostgreSQL (``?`` placeholders, ``ON
    CONFLICT``); the backends give a connection (:meth:`_cursor`), a write transaction (:meth:`_transaction`),
    the lock a round's commit takes on its robot (:meth:`_lock_robot`) and the job-queue claim (:meth:`claim`).
    Every method is safe to call from several threads."""

    _lock: threading.Lock

    # -------------------------------------------------------------------------------- the backend's part
    @contextmanager
    def _cursor(self) -> Iterator[Executor]:
        """The connection in autocommit mode: each statement its own transaction (held under ``_lock``)."""
        raise NotImplementedError

    @contextmanager
    def _transaction(self) -> Iterator[Executor]:
        """One write transaction: committed if the block returns, rolled back if it raises."""
        raise NotImplementedError

    @contextmanager
    def _snapshot(self) -> Iterator[Executor]:
        """Reads that see one state of the store (the robot row and its versions of one moment)."""
        raise NotImplementedError

    def _lock_robot(self, db: Executor, robot_id: str, applied: int) -> int:
        """Inside a commit's transaction: keep other commits of ``robot_id`` out until it ends; its latest version."""
        raise NotImplementedError

    def claim(self, worker: str, lease_s: float, round_size: int, flush_after_s: float | None = None,
              skip: frozenset[str] = frozenset(), now: float | None = None) -> str | None:  # fmt: skip
        """Claim the due round whose oldest pending sample is oldest, for ``lease_s`` seconds; its robot, or ``None``.

        A due round: ``round_size`` pending samples, or one older than ``flush_after_s``; its robot holds no live
        lease of another worker and is not in ``skip``. A worker that dies lets its lease expire; a round that
        outlives its lease cannot commit twice (:meth:`commit_round` checks the version)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- schema
    def _record_schema_version(self) -> None:
        """Record :data:`SCHEMA_VERSION` once the migrations ran; refuse a store written by a newer version."""
        found = self.schema_version()
        if found is not None and found > SCHEMA_VERSION:
            raise NewerSchema(f"the store is at schema version {found}, this cdcca knows {SCHEMA_VERSION}: "
                              "upgrade cdcca on this worker")  # fmt: skip
        if found != SCHEMA_VERSION:
            with self._transaction() as db:
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def schema_version(self) -> int | None:
        """The schema version the store records (:data:`SCHEMA_VERSION` once opened by this code; ``None``: none)."""
        with self._cursor() as db:
            return db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    # ------------------------------------------------------------------------------------ samples
    def add_sample(self, robot_id: str, sample_id: str, payload: bytes) -> bool:
        """Commit a received sample; False if it was already stored (a resend)."""
        with self._cursor() as db:
            cursor = db.execute(
                "INSERT INTO samples (robot_id, sample_id, received, payload) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (robot_id, sample_id) DO NOTHING",
                (robot_id, sample_id, time.time(), payload),
            )
            return cursor.rowcount == 1

    def pending(self, robot_id: str, limit: int | None = None) -> list[tuple[str, bytes]]:
        """Samples of ``robot_id`` no round has used yet, oldest first."""
        query = f"SELECT sample_id, payload FROM samples WHERE robot_id = ? AND {PENDING} ORDER BY received"
        with self._cursor() as db:
            if limit is None:
                rows = db.execute(query, (robot_id,)).fetchall()
            else:
                rows = db.execute(query + " LIMIT ?", (robot_id, limit)).fetchall()
        return [(sample_id, bytes(payload)) for sample_id, payload in rows]

    def used(self, robot_id: str, limit: int) -> list[tuple[str, bytes]]:
        """The ``limit`` most recently received samples of ``robot_id`` that earlier rounds used."""
        with self._cursor() as db:
            rows = db.execute(
                "SELECT sample_id, payload FROM samples WHERE robot_id = ? AND version IS NOT NULL "
                "AND quarantined IS NULL ORDER BY received DESC LIMIT ?",
                (robot_id, limit),
            ).fetchall()
        return [(sample_id, bytes(payload)) for sample_id, payload in rows]

    def pending_counts(self) -> dict[str, int]:
        """robot_id -> number of pending samples."""
        return {robot_id: count for robot_id, (count, _) in self.pending_summary().items()}

    def pending_summary(self) -> dict[str, tuple[int, float]]:
        """robot_id -> (number of pending samples, arrival time of the oldest one, Unix seconds)."""
        with self._cursor() as db:
            rows = db.execute(f"SELECT robot_id, COUNT(*), MIN(received) FROM samples WHERE {PENDING} "
                              "GROUP BY robot_id").fetchall()  # fmt: skip
        return {robot_id: (count, oldest) for robot_id, count, oldest in rows}

    def quarantine(self, robot_id: str, sample_id: str, reason: str) -> None:
        """Keep the sample, with ``reason``, out of every future round (pending and replay)."""
        with self._cursor() as db:
            db.execute("UPDATE samples SET quarantined = ? WHERE robot_id = ? AND sample_id = ?",
                       (reason or "unknown", robot_id, sample_id))  # fmt: skip

    def quarantined(self, robot_id: str | None = None) -> dict[str, dict[str, str]]:
        """robot_id -> {sample_id: reason} of the quarantined samples."""
        query = "SELECT robot_id, sample_id, quarantined FROM samples WHERE quarantined IS NOT NULL"
        with self._cursor() as db:
            if robot_id is None:
                rows = db.execute(query + " ORDER BY robot_id, received").fetchall()
            else:
                rows = db.execute(query + " AND robot_id = ? ORDER BY received", (robot_id,)).fetchall()
        found: dict[str, dict[str, str]] = {}
        for robot, sample_id, reason in rows:
            found.setdefault(robot, {})[sample_id] = reason
        return found

    def quarantine_counts(self) -> dict[str, int]:
        """robot_id -> number of quarantined samples."""
        with self._cursor() as db:
            rows = db.execute(
                "SELECT robot_id, COUNT(*) FROM samples WHERE quarantined IS NOT NULL GROUP BY robot_id"
            ).fetchall()
        return {robot_id: count for robot_id, count in rows}

    def count(self, robot_id: str | None = None) -> int:
        """Stored samples (pending, used and quarantined)."""
        with self._cursor() as db:
            if robot_id is None:
                return db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM samples WHERE robot_id = ?", (robot_id,)).fetchone()[0]

    def sample_ids(self, robot_id: str) -> set[str]:
        with self._cursor() as db:
            rows = db.execute("SELECT sample_id FROM samples WHERE robot_id = ?", (robot_id,)).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------------------------------------------- robots
    def load_robot(self, robot_id: str, adapter: bool = True) -> RobotRecord | None:
        """The robot's chain, deltas and declined versions; with ``adapter`` also its adapter state (``student``
        and ``optimizer``; else both ``None``: a worker reads them at the robot's next round,
        :meth:`load_adapter_state`)."""
        columns = "student, optimizer" if adapter else "NULL, NULL"
        with self._snapshot() as db:
            row = db.execute(f"SELECT latest, applied, {columns} FROM robots WHERE robot_id = ?",
                             (robot_id,)).fetchone()  # fmt: skip
            if row is None:
                return None
            versions = db.execute("SELECT version, params, delta FROM published WHERE robot_id = ?",
                                  (robot_id,)).fetchall()  # fmt: skip
            declined = db.execute("SELECT version, reason FROM declined WHERE robot_id = ?", (robot_id,)).fetchall()
        latest, applied, student, optimizer = row
        return RobotRecord(
            robot_id, latest, applied, from_bytes(student) if student is not None else None,
            published={v: from_bytes(p) for v, p, _ in versions}, deltas={v: bytes(d) for v, _, d in versions},
            optimizer=from_bytes(optimizer) if optimizer is not None else None,
            declined={version: reason for version, reason in declined},
        )  # fmt: skip

    def load_adapter_state(self, robot_id: str) -> tuple[int, dict[str, torch.Tensor] | None,
                                                          dict[str, torch.Tensor] | None] | None:  # fmt: skip
        """(latest version, cloud-student state, optimizer state) as the robot's last round committed them (either
        state ``None`` in a store written before it was kept); ``None`` for a robot without a committed round."""
        with self._cursor() as db:
            row = db.execute("SELECT latest, student, optimizer FROM robots WHERE robot_id = ?",
                             (robot_id,)).fetchone()  # fmt: skip
        if row is None:
            return None
        latest, student, optimizer = row
        return (latest, from_bytes(student) if student is not None else None,
                from_bytes(optimizer) if optimizer is not None else None)  # fmt: skip

    def robots(self) -> list[str]:
        with self._cursor() as db:
            return [r[0] for r in db.execute("SELECT robot_id FROM robots ORDER BY robot_id").fetchall()]

    def commit_round(self, robot_id: str, version: int, sample_ids: list[str], student: dict[str, torch.Tensor],
                     published: dict[str, torch.Tensor], delta: bytes, applied: int,
                     optimizer: dict[str, torch.Tensor] | None = None, base_version: int = 0) -> None:  # fmt: skip
        """Everything a finished round changes, in one transaction; :class:`StaleRound` (and nothing stored) if the
        robot's latest version is no longer ``version - 1`` (another worker's round came first), or if the delta is
        incremental (``base_version`` > 0) on a version another worker has since resent as a keyframe."""
        student_blob, published_blob = to_bytes(student), to_bytes(published)
        optimizer_blob = to_bytes(optimizer) if optimizer is not None else None
        with self._transaction() as db:
            latest = self._lock_robot(db, robot_id, applied)
            if latest != version - 1:
                raise StaleRound(f"robot {robot_id} is at v{latest} in the store, not v{version - 1}: another "
                                 "worker committed first")  # fmt: skip
            if base_version:
                row = db.execute("SELECT length(params) FROM published WHERE robot_id = ? AND version = ?",
                                 (robot_id, base_version)).fetchone()  # fmt: skip
                if row is None or row[0] <= len(UNKNOWN):
                    raise StaleRound(f"robot {robot_id}: v{base_version}, the base of the round's delta, was resent "
                                     "as a keyframe meanwhile: what the robot holds there is not known")  # fmt: skip
            db.execute(
                "INSERT INTO robots (robot_id, latest, applied, student, optimizer) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (robot_id) DO UPDATE SET latest = excluded.latest, student = excluded.student, "
                "optimizer = excluded.optimizer",
                (robot_id, version, applied, student_blob, optimizer_blob),
            )
            db.execute("INSERT INTO published (robot_id, version, params, delta) VALUES (?, ?, ?, ?)",
                       (robot_id, version, published_blob, delta))  # fmt: skip
            if sample_ids:
                used = [s for at in range(0, len(sample_ids), 500)  # under every SQLite's limit on ? per statement
                        for (s,) in db.execute(
                            "SELECT sample_id FROM samples WHERE robot_id = ? AND version IS NOT NULL AND sample_id "
                            f"IN ({', '.join('?' * len(sample_ids[at : at + 500]))})",
                            (robot_id, *sample_ids[at : at + 500])).fetchall()]  # fmt: skip
                if used:  # a sample trains one round: a round on samples another committed is stale, whatever its v
                    raise StaleRound(f"robot {robot_id}: {len(used)} of the round's samples (e.g. {used[0]!r}) were "
                                     "used by a round another worker committed")  # fmt: skip
                db.executemany("UPDATE samples SET version = ? WHERE robot_id = ? AND sample_id = ?",
                               [(version, robot_id, s) for s in sample_ids])  # fmt: skip

    def record_keyframe(self, robot_id: str, version: int, delta: bytes) -> bool:
        """``delta``, a keyframe of ``version``, is sent from now on in place of its incremental delta, and what the
        robot holds at ``version`` becomes unknown (:meth:`cdcca.envelope.VersionChain.keyframe`); False (nothing
        changed) if ``version`` is no longer the robot's latest (another worker committed a newer one)."""
        with self._transaction() as db:
            if self._lock_robot(db, robot_id, 0) != version:
                return False
            return db.execute("UPDATE published SET params = ?, delta = ? WHERE robot_id = ? AND version = ?",
                              (UNKNOWN, delta, robot_id, version)).rowcount == 1  # fmt: skip

    # ------------------------------------------------------------------------------------- leases
    def release(self, robot_id: str, worker: str) -> None:
        """End ``worker``'s lease on ``robot_id`` (its round committed or failed)."""
        with self._cursor() as db:
            db.execute("DELETE FROM leases WHERE robot_id = ? AND worker = ?", (robot_id, worker))

    def renew(self, robot_id: str, worker: str, lease_s: float, now: float | None = None) -> bool:
        """Extend ``worker``'s lease on ``robot_id`` to ``lease_s`` seconds from now (its round is still running);
        False if the worker holds no lease on it any more (another worker claimed it after it expired)."""
        now = time.time() if now is None else now
        with self._cursor() as db:
            return db.execute("UPDATE leases SET expires = ? WHERE robot_id = ? AND worker = ?",
                              (now + lease_s, robot_id, worker)).rowcount == 1  # fmt: skip

    def leases(self) -> dict[str, tuple[str, float]]:
        """robot_id -> (worker, expiry in Unix seconds) of the leases held now or expired unreleased."""
        with self._cursor() as db:
            rows = db.execute("SELECT robot_id, worker, expires FROM leases").fetchall()
        return {robot_id: (worker, expires) for robot_id, worker, expires in rows}

    def latest(self, robot_id: str) -> int:
        """The robot's newest committed version (0: none)."""
        with self._cursor() as db:
            row = db.execute("SELECT latest FROM robots WHERE robot_id = ?", (robot_id,)).fetchone()
        return row[0] if row is not None else 0

    def record_applied(self, robot_id: str, version: int) -> None:
        """The robot reports ``version`` as current; versions it can no longer be based on are pruned."""
        with self._transaction() as db:
            db.execute("UPDATE robots SET applied = ? WHERE robot_id = ?", (version, robot_id))
            db.execute(
                "DELETE FROM published WHERE robot_id = ? AND version < ? "
                "AND version < (SELECT latest FROM robots WHERE robot_id = ?)",
                (robot_id, version, robot_id),
            )

    def record_declined(self, robot_id: str, version: int, reason: str) -> bool:
        """The robot rolled back from ``version`` (``reason``: its status); False if that was recorded already."""
        with self._cursor() as db:
            cursor = db.execute("INSERT INTO declined (robot_id, version, reason) VALUES (?, ?, ?) "
                                "ON CONFLICT (robot_id, version) DO NOTHING", (robot_id, version, reason))  # fmt: skip
            return cursor.rowcount == 1


class CloudStore(SqlStore):
    """SQLite store of the cloud trainer (safe to use from several threads, and from several processes on one
    machine: WAL mode, write transactions under the database's write lock).

    Args:
        path: the database file (created with its parent folder if missing).
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _open(self) -> None:
        """WAL mode, the schema and its migrations (each step idempotent)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_column("robots", "optimizer", "BLOB")  # a store written before the optimizer was kept
        self._add_column("samples", "quarantined", "TEXT")  # ... or before samples could be quarantined
        self._record_schema_version()

    def _add_column(self, table: str, column: str, kind: str) -> None:
        """Migrate a store written by an older version: add ``column`` if ``table`` lacks it."""
        if column in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
            return
        try:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as err:  # another process (torchrun rank) added it first
            if "duplicate column" not in str(err):
                raise

    @contextmanager
    def _cursor(self) -> Iterator[Executor]:
        with self._lock:
            yield self._db  # read at each call: the fault tests swap in a connection that fails writes

    @contextmanager
    def _transaction(self) -> Iterator[Executor]:
        """``BEGIN IMMEDIATE``: the database's write lock from the first statement on, so what a transaction reads
        no other process changes before it commits."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # on SQLITE_FULL SQLite may have rolled back already: keep its error
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def _snapshot(self) -> Iterator[Executor]:
        """A deferred transaction: in WAL mode it reads one snapshot, whatever other processes commit meanwhile."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")  # nothing written: ending it is all

    def _lock_robot(self, db: Executor, robot_id: str, applied: int) -> int:
        row = db.execute("SELECT latest FROM robots WHERE robot_id = ?", (robot_id,)).fetchone()
        return row[0] if row is not None else 0  # BEGIN IMMEDIATE holds the write lock already

    def claim(self, worker: str, lease_s: float, round_size: int, flush_after_s: float | None = None,
              skip: frozenset[str] = frozenset(), now: float | None = None) -> str | None:  # fmt: skip
        """See :meth:`SqlStore.claim`. The job-queue pattern on SQLite: one ``BEGIN IMMEDIATE`` transaction (the
        database's write lock, what ``SELECT ... FOR UPDATE SKIP LOCKED`` gives on PostgreSQL) picks the robot and
        writes its lease."""
        now = time.time() if now is None else now
        flush_before = now - flush_after_s if flush_after_s is not None else -1.0
        skipped = sorted(skip)
        with self._transaction() as db:
            row = db.execute(
                "SELECT s.robot_id FROM samples s LEFT JOIN leases l ON l.robot_id = s.robot_id "
                "WHERE s.version IS NULL AND s.quarantined IS NULL "
                "AND (l.robot_id IS NULL OR l.expires <= ? OR l.worker = ?) "
                f"AND s.robot_id NOT IN ({', '.join('?' * len(skipped))}) "
                "GROUP BY s.robot_id HAVING COUNT(*) >= ? OR MIN(s.received) <= ? "
                "ORDER BY MIN(s.received), s.robot_id LIMIT 1",
                (now, worker, *skipped, round_size, flush_before),
            ).fetchone()
            if row is not None:
                db.execute("INSERT INTO leases (robot_id, worker, expires) VALUES (?, ?, ?) ON CONFLICT (robot_id) "
                           "DO UPDATE SET worker = excluded.worker, expires = excluded.expires",
                           (row[0], worker, now + lease_s))  # fmt: skip
        return row[0] if row is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(spec: str | Path) -> SqlStore:
    """The store named by ``spec``: a ``postgresql://`` (or ``postgres://``) URL opens the PostgreSQL store
    (:mod:`cloud_trainer.store_pg`, for several workers on several machines); anything else is a SQLite file."""
    text = str(spec)
    if text.startswith(("postgresql://", "postgres://")):
        from cloud_trainer.store_pg import PgStore

        return PgStore(text)
    return CloudStore(Path(text))
