"""The robot's uplink queue: bounded, durable, at-least-once.

Every ``UtsTokens`` message UTS selects is written to SQLite (WAL, ``synchronous=FULL``) before it is sent.
It stays there until the cloud acknowledges it with a ``UtsAck``, which the cloud sends only after it has
stored the sample itself, so a sample is never in neither place. Unacknowledged samples are sent again after
``resend_after_s``; the cloud ignores duplicates by (robot_id, sample_id). When the queue is full the least
uncertain sample (lowest answer entropy, the newcomer included) is dropped and counted: the cloud learns
most from the samples the student is least sure about (UTS, Eq. 2).

Nothing leaves the queue without a count. A NaN or infinite entropy (a broken model: exactly the samples
the cloud most needs, and UTS stage 1 always keeps them) is stored as +inf, the most uncertain value, and
counted in ``nonfinite_entropy``; SQLite would otherwise turn NaN into NULL and refuse the row. A sample
that cannot be sent (an empty payload or sample id) is refused and counted in ``refused``; a second sample
under a queued id is not stored (the first is kept) and counted in ``duplicates``.

A write the disk cannot take (SQLite's ``database or disk is full``, ``OSError(ENOSPC)``, any ``sqlite3.Error``) is
rolled back if SQLite has not already done so itself -- it does for SQLITE_FULL, so a plain ``ROLLBACK`` would then
replace the real cause with "cannot rollback - no transaction is active" -- and raised as :class:`UplinkWriteError`:
that sample is not stored, ``write_failures`` counts it, and every sample stored before stays queued.

Acks are signed by the cloud (:func:`cdcca.envelope.verify_ack`) and carry a sequence that grows with every ack;
the newest accepted sequence is stored in the same file, in the transaction that deletes, so an old ack replayed
(also after a restart) deletes nothing (:class:`StaleAck`).
"""

from __future__ import annotations

import errno
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cdcca.errors import CdccaError

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS ack_sequence (
    id       INTEGER PRIMARY KEY CHECK (id = 0),
    sequence INTEGER NOT NULL     -- UtsAck.sequence of the newest accepted ack
);
CREATE TABLE IF NOT EXISTS ack_seen (
    sequence INTEGER PRIMARY KEY  -- accepted acks within ACK_WINDOW of the newest
);
"""
COUNTERS = ("enqueued", "dropped", "acked", "sent", "resent", "nonfinite_entropy", "refused", "duplicates")


@dataclass
class UplinkStats:
    """What the queue holds and has done (counters survive restarts)."""

    queued: int
    enqueued: int
    dropped: int
    acked: int
    sent: int
    resent: int
    nonfinite_entropy: int = 0  # stored with entropy +inf (most uncertain)
    refused: int = 0  # not stored: empty payload or sample id
    duplicates: int = 0  # not stored: the id was already queued (the queued sample is kept)
    ack_sequence: int = 0  # UtsAck.sequence of the newest accepted ack (0: none yet)
    write_failures: int = 0  # writes the disk refused since this process opened the queue (e.g. disk full)


# How far below the newest accepted ack sequence an unseen ack is still taken (the sequences are the cloud's clock
# in ns): 60 s. Several cloud workers ack one robot, each numbering from its own clock, and two workers' acks
# cross on the way; the anti-replay window of IPsec and DTLS (RFC 4303, Sec. 3.4.3; RFC 6347, Sec. 4.1.2.6)
# takes those and still refuses every ack it took before.
ACK_WINDOW = 60_000_000_000


class StaleAck(CdccaError):
    """An ack the replay window refuses: one accepted before, or one older than the window below the newest
    accepted (it deleted nothing)."""

    def __init__(self, sequence: int, last: int, seen: bool) -> None:
        why = ("was accepted before" if seen
               else f"is more than {ACK_WINDOW / 1e9:.0f} s older than {last}, the newest accepted")  # fmt: skip
        super().__init__(f"ack sequence {sequence} {why} (replayed?)")
        self.sequence, self.last, self.seen = sequence, last, seen


class UplinkWriteError(CdccaError):
    """The queue could not write (``disk_full``: SQLITE_FULL or ENOSPC); nothing of that write was stored."""

    def __init__(self, message: str, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def is_disk_full(err: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or the OS's ENOSPC / EDQUOT."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(err, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (code is None and "disk is full" in str(err))


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
        self._closed = False
        self.path = path
        self.write_failures = 0
        self._marked: dict[str, float | None] = {}  # the last due() call's samples -> their sent_at before it
        with self._lock:  # a queue reopened with a smaller capacity keeps its most uncertain samples
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = self._trim()
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        if dropped:
            log.warning("uplink queue %s held more than its capacity %d: dropped the %d least uncertain samples",
                        path, capacity, len(dropped))  # fmt: skip

    def _trim(self) -> list[str]:
        """Drop (counted) the least uncertain samples beyond capacity, inside the caller's transaction."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()
        if count <= self.capacity:
            return []
        dropped = [sample_id for (sample_id,) in self._db.execute(
            "SELECT sample_id FROM uplink ORDER BY entropy ASC, enqueued DESC LIMIT ?", (count - self.capacity,))]
        self._db.executemany("DELETE FROM uplink WHERE sample_id = ?", [(sample_id,) for sample_id in dropped])
        self._bump("dropped", len(dropped))
        return dropped

    def _rollback(self) -> None:
        """Undo the open transaction, unless SQLite already has (it does after SQLITE_FULL)."""
        if not self._closed and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as err:  # the cause being handled is the one to report
                log.debug("uplink queue: rollback failed: %s", err)

    def _write_error(self, what: str, err: BaseException) -> UplinkWriteError:
        self.write_failures += 1
        full = is_disk_full(err)
        cause = "disk full" if full else "write failed"
        return UplinkWriteError(f"uplink queue {self.path}: {cause} ({err}); {what}", full)

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                         (name, by, by))  # fmt: skip

    def put(self, sample_id: str, entropy: float, payload: bytes) -> str | None:
        """Store a sample; returns the id of a sample no longer held (``None``: nothing lost).

        That is the sample dropped to stay within capacity (maybe this one), or this one when it is refused
        (empty payload or id). Each case is counted (see :class:`UplinkStats`), as is a duplicate id (the
        queued sample under that id stays, ``None`` is returned).
        """
        if not sample_id or not payload:
            what = "sample id" if not sample_id else "payload"
            with self._lock:
                if not self._closed:
                    self._bump("refused")
            log.warning("uplink queue refused sample %r: empty %s", sample_id, what)
            return sample_id
        entropy = float(entropy)
        finite = math.isfinite(entropy)
        if not finite:  # NaN would become NULL; a broken model's samples are the most uncertain of all
            entropy = math.inf
        with self._lock:
            self._open_transaction()
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO uplink (sample_id, entropy, payload, enqueued) VALUES (?, ?, ?, ?)",
                    (sample_id, entropy, payload, time.time()),
                )
                dropped = None
                if not cursor.rowcount:
                    self._bump("duplicates")
                else:
                    self._bump("enqueued")
                    if not finite:
                        self._bump("nonfinite_entropy")
                    gone = self._trim()
                    dropped = sample_id if sample_id in gone else (gone[0] if gone else None)
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as err:
                self._rollback()
                raise self._write_error(f"sample {sample_id} not stored", err) from err
            except BaseException:
                self._rollback()
                raise
            return dropped

    def due(self, resend_after_s: float, limit: int = 64, now: float | None = None) -> list[tuple[str, bytes]]:
        """Samples to send now: never sent, or sent more than ``resend_after_s`` ago without an ack (most
        uncertain first), or "sent" after ``now`` (the wall clock stepped back since). Marks them as sent; what then
        cannot be published goes back with :meth:`unsend`."""
        now = time.time() if now is None else now
        with self._lock:
            if self._closed:
                return []
            rows = self._db.execute(
                "SELECT sample_id, payload, sent_at FROM uplink WHERE sent_at IS NULL OR sent_at < ? OR sent_at > ? "
                "ORDER BY sent_at IS NOT NULL, entropy DESC LIMIT ?",
                (now - resend_after_s, now, limit),
            ).fetchall()
            if rows:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany("UPDATE uplink SET sent_at = ? WHERE sample_id = ?",
                                         [(now, sample_id) for sample_id, _, _ in rows])  # fmt: skip
                    resent = sum(sent_at is not None for _, _, sent_at in rows)
                    self._bump("sent", len(rows) - resent)
                    self._bump("resent", resent)
                    self._db.execute("COMMIT")
                except (sqlite3.Error, OSError) as err:  # unmarked samples would go out at every pump: wait
                    self._rollback()
                    raise self._write_error(f"{len(rows)} due samples stay queued, unsent for now", err) from err
            self._marked = {sample_id: sent_at for sample_id, _, sent_at in rows}
        return [(sample_id, bytes(payload)) for sample_id, payload, _ in rows]

    def unsend(self, sample_ids: list[str]) -> None:
        """Samples of the last :meth:`due` that could not be published: back as they were (due again at once, the
        ``sent``/``resent`` counters as before). If the disk refuses even that, they wait ``resend_after_s``."""
        with self._lock:
            back = [(self._marked.pop(s), s) for s in sample_ids if s in self._marked]
            if not back or self._closed:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE uplink SET sent_at = ? WHERE sample_id = ?", back)
                resent = sum(sent_at is not None for sent_at, _ in back)
                self._bump("sent", resent - len(back))
                self._bump("resent", -resent)
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as err:
                self._rollback()
                log.warning("%s", self._write_error(f"{len(back)} unpublished samples wait to be resent", err))

    def ack(self, sample_ids: list[str], sequence: int | None = None) -> int:
        """The cloud stored these samples; forget them. Returns how many were still queued.

        With ``sequence`` (a verified ``UtsAck.sequence``) the ack counts only if no ack with that sequence was
        accepted before and it is at most :data:`ACK_WINDOW` below the newest accepted one; it is recorded in the
        same transaction as the deletes. Raises :class:`StaleAck` (deleting nothing) otherwise. A replayed ack is
        refused after a restart too (the window is persisted); one the robot never saw that still falls in the
        window only names samples the cloud stored.

        The cost under the queue lock (which the answering thread needs to queue a sample) is bounded by what
        the queue holds, not by the ack: the ids are hashed outside it, and when the ack names more ids than
        are queued the queued ids are looked up in the ack instead. One transaction, O(1) per id.
        """
        wanted = set(sample_ids)  # an ack of any size is paid for here, not on the answering path
        if not wanted and sequence is None:
            return 0
        with self._lock:
            self._open_transaction()
            try:
                if sequence is not None:
                    self._take_sequence(sequence)
                (queued,) = self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()
                if len(wanted) > queued:
                    wanted = {sid for (sid,) in self._db.execute("SELECT sample_id FROM uplink") if sid in wanted}
                removed = self._db.executemany("DELETE FROM uplink WHERE sample_id = ?",
                                               [(sid,) for sid in wanted]).rowcount if wanted else 0  # fmt: skip
                self._bump("acked", max(removed, 0))
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as err:
                self._rollback()
                raise self._write_error(f"an ack of {len(wanted)} samples not applied (they stay queued and are "
                                        "resent; the cloud ignores duplicates)", err) from err  # fmt: skip
            except BaseException:
                self._rollback()
                raise
        return max(removed, 0)

    def _take_sequence(self, sequence: int) -> None:
        """Record ``sequence`` as accepted (inside the ack's transaction), or raise :class:`StaleAck`."""
        last = self._last_sequence()
        seen = self._db.execute("SELECT 1 FROM ack_seen WHERE sequence = ?", (sequence,)).fetchone() is not None
        if seen or sequence <= last - ACK_WINDOW:
            raise StaleAck(sequence, last, seen)
        self._db.execute("INSERT INTO ack_seen VALUES (?)", (sequence,))
        if sequence > last:
            self._db.execute("INSERT INTO ack_sequence VALUES (0, ?) ON CONFLICT(id) DO UPDATE SET "
                             "sequence = excluded.sequence", (sequence,))  # fmt: skip
            self._db.execute("DELETE FROM ack_seen WHERE sequence <= ?", (sequence - ACK_WINDOW,))

    def _last_sequence(self) -> int:
        row = self._db.execute("SELECT sequence FROM ack_sequence WHERE id = 0").fetchone()
        return 0 if row is None else int(row[0])

    def ids(self) -> list[str]:
        """Queued sample ids, most uncertain first."""
        with self._lock:
            if self._closed:
                return list(self._closed_ids)
            return [r[0] for r in self._db.execute("SELECT sample_id FROM uplink ORDER BY entropy DESC")]

    def __len__(self) -> int:
        with self._lock:
            if self._closed:
                return len(self._closed_ids)
            return self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()[0]

    def stats(self) -> UplinkStats:
        with self._lock:
            return self._closed_stats if self._closed else self._read_stats()

    def _read_stats(self) -> UplinkStats:  # under _lock
        counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        queued = self._db.execute("SELECT COUNT(*) FROM uplink").fetchone()[0]
        return UplinkStats(queued=queued, ack_sequence=self._last_sequence(), write_failures=self.write_failures,
                           **{name: counters.get(name, 0) for name in COUNTERS})  # fmt: skip

    def _open_transaction(self) -> None:
        """``BEGIN IMMEDIATE`` (under ``_lock``); a closed queue refuses writes with an :class:`UplinkWriteError`."""
        if self._closed:
            raise UplinkWriteError(f"uplink queue {self.path} is closed", disk_full=False)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as err:
            raise self._write_error("nothing was written", err) from err

    def close(self) -> None:
        """Close the file. Afterwards writes are refused (:class:`UplinkWriteError`), nothing is due, and
        :meth:`stats`, :meth:`ids` and ``len`` answer as of the close (a loop or a diagnostics timer that outlived the
        runtime's stop reads them)."""
        with self._lock:
            if self._closed:
                return
            self._closed_ids = [r[0] for r in self._db.execute("SELECT sample_id FROM uplink ORDER BY entropy DESC")]
            self._closed_stats = self._read_stats()
            self._closed = True
            self._db.close()
