"""The robot's uplink queue: bounded, durable, at-least-once.

Every ``UtsTokens`` message UTS selects is written to SQLite (WAL, ``synchronous=FULL``) before it is sent.
It stays there until the cloud acknowledges it with a ``UtsAck``, which the cloud sends only after it has
stored the sample itself, so a sample is never in neither place. Unacknowledged samples are sent again after
``resend_after_s``; the cloud ignores duplicates by (robot_id, sample_id). When the queue is full the least
uncertain sample (lowest answer entropy, the newcomer included) is dropped and counted: the cloud learns
most from the samples the student is least sure about (UTS, Eq. 2).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS uplink (
    sample_id TEXT PRIMARY KEY,
    entropy   REAL NOT NULL,
    payload   BLOB NOT NULL,      -- CDR bytes of the UtsTokens message
    enqueued  REAL NOT NULL,
    sent_at   REAL                -- NULL: never sent
);
CREATE INDEX IF NOT EXISTS uplink_entropy ON uplink (entropy);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
COUNTERS = ("enqueued", "dropped", "acked", "sent", "resent")


@dataclass
class UplinkStats:
    """What the queue holds and has done (counters survive restarts)."""

    queued: int
    enqueued: int
    dropped: int
    acked: int
    sent: int
    resent: int


class UplinkQueue:
    """Durable bounded queue of encoded ``UtsTokens``.

    Args:
        path: SQLite file (created if missing); ``":memory:"`` for a non-durable queue.
        capacity: the most samples held; beyond it the least uncertain one is dropped.
    """

    def __init__(self, path: str | Path, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"UplinkQueue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                         (name, by, by))  # fmt: skip

    def put(self, sample_id: str, entropy: float, payload: bytes) -> str | None:
        """Store a sample; returns the id of the sample dropped to stay within capacity (maybe this one)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO uplink (sample_id, entropy, payload, enqueued) VALUES (?, ?, ?, ?)",
                    (sample_id, float(entropy), payload, time.time()),
                )
                dropped = None
                if cursor.rowcount:
                    self._bump("enqueued")
                    (count,) = self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()
                    if count > self.capacity:
                        (dropped,) = self._db.execute(
                            "SELECT sample_id FROM uplink ORDER BY entropy ASC, enqueued DESC LIMIT 1"
                        ).fetchone()
                        self._db.execute("DELETE FROM uplink WHERE sample_id = ?", (dropped,))
                        self._bump("dropped")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return dropped

    def due(self, resend_after_s: float, limit: int = 64, now: float | None = None) -> list[tuple[str, bytes]]:
        """Samples to send now: never sent, or sent more than ``resend_after_s`` ago without an ack (most
        uncertain first). Marks them as sent."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, payload, sent_at FROM uplink WHERE sent_at IS NULL OR sent_at < ? "
                "ORDER BY sent_at IS NOT NULL, entropy DESC LIMIT ?",
                (now - resend_after_s, limit),
            ).fetchall()
            if rows:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE uplink SET sent_at = ? WHERE sample_id = ?",
                                     [(now, sample_id) for sample_id, _, _ in rows])  # fmt: skip
                resent = sum(sent_at is not None for _, _, sent_at in rows)
                self._bump("sent", len(rows) - resent)
                self._bump("resent", resent)
                self._db.execute("COMMIT")
        return [(sample_id, bytes(payload)) for sample_id, payload, _ in rows]

    def ack(self, sample_ids: list[str]) -> int:
        """The cloud stored these samples; forget them. Returns how many were still queued."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            removed = 0
            for sample_id in sample_ids:
                removed += self._db.execute("DELETE FROM uplink WHERE sample_id = ?", (sample_id,)).rowcount
            self._bump("acked", removed)
            self._db.execute("COMMIT")
        return removed

    def ids(self) -> list[str]:
        """Queued sample ids, most uncertain first."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT sample_id FROM uplink ORDER BY entropy DESC")]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()[0]

    def stats(self) -> UplinkStats:
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            queued = self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()[0]
        return UplinkStats(queued=queued, **{name: counters.get(name, 0) for name in COUNTERS})

    def close(self) -> None:
        with self._lock:
            self._db.close()
