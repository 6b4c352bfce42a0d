"""The cloud's durable state on a PostgreSQL server, for workers on several machines (issue 16).

The same store as the SQLite :class:`cloud_trainer.store.CloudStore` (every method is :class:`SqlStore`'s shared
SQL), on psycopg 3 with real transactions. What PostgreSQL does differently:

- **Claiming a round** is the job-queue pattern PostgreSQL's manual gives for ``SKIP LOCKED`` ("to avoid lock
  contention with multiple consumers accessing a queue-like table"): each robot that ever sent a sample has one
  ``queue`` row, and a claim locks its candidate's row with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two workers
  claiming at once never wait for each other and never get the same robot. See :meth:`PgStore.claim`.
- **Committing a round** locks the robot's ``robots`` row (``SELECT ... FOR UPDATE``), so two commits of one
  robot run one after the other and the second sees the first's version (:class:`StaleRound`).
- Blobs are ``BYTEA``, times ``DOUBLE PRECISION`` Unix seconds (the workers' clocks: keep them NTP-synchronised;
  a lease is seconds long, so milliseconds of skew do not matter).

One connection per store, used under a lock from the round thread and the link's callback thread (as
CloudStore does); a connection the server dropped is opened again at the next call.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from cloud_trainer.store import PENDING, Executor, SqlStore, StoreUnreachable
from cloud_trainer.store import SCHEMA as SQLITE_SCHEMA

# SQLite's schema in PostgreSQL's types (BLOB -> BYTEA; SQLite's REAL is already an 8-byte float), plus the
# per-robot rows a claim locks
SCHEMA = re.sub(r"\bBLOB\b", "BYTEA", re.sub(r"\bREAL\b", "DOUBLE PRECISION", SQLITE_SCHEMA)) + """
CREATE TABLE IF NOT EXISTS queue (
    robot_id TEXT PRIMARY KEY      -- a robot that sent a sample: the row a claim locks (SKIP LOCKED)
);
"""
SCHEMA_LOCK = 0x63646363  # the advisory lock two workers opening a new database at once take ("cdcc")


class _Executor:
    """The shared SQL on a psycopg cursor: ``?`` placeholders become ``%s`` (the shared SQL has no literal ``?``
    or ``%``)."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.cursor.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.cursor.executemany(sql.replace("?", "%s"), params)


class PgStore(SqlStore):
    """PostgreSQL store of the cloud trainer, shared by several workers (processes, machines).

    Args:
        url: a libpq connection URL, e.g. ``postgresql://cdcca:secret@db.local:5432/cdcca`` (``PGPASSWORD`` and
            ``~/.pgpass`` work as for psql). The database must exist; the tables are created on first use.
        connect_timeout_s: how long to wait for the server when connecting.
    """

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        self.url, self.connect_timeout_s = url, connect_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn = self._connect()
        except psycopg.OperationalError as err:
            shown = re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)  # never print a password: in the address
            shown = re.sub(r"([?&]password=)[^&]*", r"\1***", shown)  # or as a parameter
            reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise StoreUnreachable(f"cannot reach the --store {shown}: {reason}; check the host, port, database and "
                                   "user, and that the server runs") from err  # fmt: skip
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            db.cursor.execute(SCHEMA)
            # a robot with samples but no queue row (a store filled by hand) can still be claimed
            db.execute("INSERT INTO queue (robot_id) SELECT DISTINCT robot_id FROM samples ON CONFLICT DO NOTHING")
        self._record_schema_version()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)))

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection (opened again if the server dropped it); under ``_lock``."""
        if self._closed:
            raise psycopg.InterfaceError("the store is closed")
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def _cursor(self) -> Iterator[Executor]:
        with self._lock, self._connection().cursor() as cursor:
            yield _Executor(cursor)

    @contextmanager
    def _transaction(self) -> Iterator[_Executor]:
        """``BEGIN`` ... ``COMMIT`` at READ COMMITTED: what must not change under a transaction is locked in it."""
        with self._lock:
            connection = self._connection()
            with connection.transaction(), connection.cursor() as cursor:
                yield _Executor(cursor)

    @contextmanager
    def _snapshot(self) -> Iterator[_Executor]:
        """A REPEATABLE READ, READ ONLY transaction: every statement in it sees the store as of its first one."""
        with self._lock:
            connection = self._connection()
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield _Executor(cursor)

    def _lock_robot(self, db: Executor, robot_id: str, applied: int) -> int:
        """Lock the robot's row for the commit (a first round inserts it: a second first round waits for the unique
        key, then finds the row the first committed)."""
        db.execute("INSERT INTO robots (robot_id, latest, applied) VALUES (?, 0, ?) ON CONFLICT (robot_id) DO NOTHING",
                   (robot_id, applied))  # fmt: skip
        return db.execute("SELECT latest FROM robots WHERE robot_id = ? FOR UPDATE", (robot_id,)).fetchone()[0]

    def add_sample(self, robot_id: str, sample_id: str, payload: bytes) -> bool:
        """Commit a received sample (and its robot's ``queue`` row); False if it was already stored (a resend)."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO samples (robot_id, sample_id, received, payload) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (robot_id, sample_id) DO NOTHING",
                (robot_id, sample_id, time.time(), payload),
            )
            added = cursor.rowcount == 1
            if added:
                db.execute("INSERT INTO queue (robot_id) VALUES (?) ON CONFLICT DO NOTHING", (robot_id,))
        return added

    def claim(self, worker: str, lease_s: float, round_size: int, flush_after_s: float | None = None,
              skip: frozenset[str] = frozenset(), now: float | None = None) -> str | None:  # fmt: skip
        """See :meth:`SqlStore.claim`. One transaction: list the due robots without a live lease of another
        worker, oldest pending sample first; lock each candidate's ``queue`` row in turn with ``FOR UPDATE SKIP
        LOCKED`` (a robot another worker is claiming this moment is skipped, not waited for); then, holding the lock,
        read its lease and its pending samples again, since at READ COMMITTED a new statement sees every claim and
        round that committed before the lock was taken, which the listing may have missed; if it is still due and
        free, write the lease, else try the next robot. The lease is committed before the lock is released, so a
        worker that locks the row later sees it."""
        now = time.time() if now is None else now
        flush_before = now - flush_after_s if flush_after_s is not None else -1.0
        with self._transaction() as db:
            candidates = db.execute(
                "SELECT s.robot_id FROM samples s LEFT JOIN leases l ON l.robot_id = s.robot_id "
                "WHERE s.version IS NULL AND s.quarantined IS NULL "
                "AND (l.robot_id IS NULL OR l.expires <= ? OR l.worker = ?) "
                "AND s.robot_id <> ALL(?::text[]) GROUP BY s.robot_id HAVING COUNT(*) >= ? OR MIN(s.received) <= ? "
                "ORDER BY MIN(s.received), s.robot_id",
                (now, worker, sorted(skip), round_size, flush_before),
            ).fetchall()
            for (robot_id,) in candidates:
                if db.execute("SELECT 1 FROM queue WHERE robot_id = ? FOR UPDATE SKIP LOCKED", (robot_id,)).fetchone() \
                        is None:  # fmt: skip
                    continue  # another worker holds it: it is claiming this robot now
                lease = db.execute("SELECT worker, expires FROM leases WHERE robot_id = ?", (robot_id,)).fetchone()
                if lease is not None and lease[0] != worker and lease[1] > now:
                    continue  # claimed and committed since the listing
                count, oldest = db.execute(f"SELECT COUNT(*), MIN(received) FROM samples WHERE robot_id = ? "
                                           f"AND {PENDING}", (robot_id,)).fetchone()  # fmt: skip
                if count == 0 or (count < round_size and oldest > flush_before):
                    continue  # its round ran since the listing
                db.execute("INSERT INTO leases (robot_id, worker, expires) VALUES (?, ?, ?) ON CONFLICT (robot_id) "
                           "DO UPDATE SET worker = excluded.worker, expires = excluded.expires",
                           (robot_id, worker, now + lease_s))  # fmt: skip
                return robot_id
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()
