"""Faults of the cloud's own machine (a full disk, a store it cannot write), said once and counted.

A full disk fails every write the same way; a traceback per received sample (issue 17 saw 232 in 20 s) hides
the one thing an operator must do. So each *cause* is logged as one WARNING at most every ``every_s`` seconds,
with how many times it happened since the last line, the way the Python logging HOWTO suggests filtering
repeated records rather than emitting them all; the counters keep the exact totals.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

DISK_FULL = "disk_full"
STORE_READONLY = "store_readonly"
STORE_ERROR = "store_error"


def fault_cause(err: BaseException) -> str | None:
    """The cause of a failed store write (``disk_full``, ``store_readonly``, ``store_error``), or ``None`` for an
    error that is not the store's or the disk's (a bug: let it surface)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return STORE_READONLY
    if isinstance(err, sqlite3.Error):
        text = str(err).lower()
        if "disk is full" in text or "database or disk is full" in text:
            return DISK_FULL
        if "readonly" in text or "read-only" in text:
            return STORE_READONLY
        return STORE_ERROR
    if type(err).__module__.split(".")[0] == "psycopg":  # the PostgreSQL store (no import: psycopg is optional)
        state = getattr(err, "sqlstate", None)  # SQLSTATE classes: PostgreSQL manual, appendix A
        return DISK_FULL if state == "53100" else STORE_READONLY if state == "25006" else STORE_ERROR
    return None


ADVICE = {
    DISK_FULL: "free space on the cloud's disk; samples are not acknowledged, so robots keep them and resend",
    STORE_READONLY: "make the state directory (or the database) writable; samples are not acknowledged, so robots "
    "keep them",
    STORE_ERROR: "check the cloud's store (its SQLite file or PostgreSQL server); samples are not acknowledged, so "
    "robots keep them",
}


class FaultLog:
    """One WARNING per cause every ``every_s`` seconds; ``counts`` has every occurrence.

    Args:
        logger: where the warnings go.
        every_s: the least time between two lines of one cause.
        clock: monotonic seconds (tests pass their own).
        on_count: called with the cause on every occurrence (e.g. to publish it as a metric).
    """

    def __init__(self, logger: logging.Logger, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 on_count: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.logger, self.every_s, self.clock, self.on_count = logger, every_s, clock, on_count
        self.counts: dict[str, int] = {}
        self._last: dict[str, tuple[float, int]] = {}  # cause -> (time of its last line, count at that line)
        self._lock = threading.Lock()

    def record(self, cause: str, what: str, err: BaseException) -> bool:
        """Count one failure of ``what`` (e.g. ``"storing a sample from r1"``); True if a line was logged."""
        now = self.clock()
        with self._lock:
            self.counts = {**self.counts, cause: self.counts.get(cause, 0) + 1}  # replaced: readers copy it
            last = self._last.get(cause)
            due = last is None or now - last[0] >= self.every_s
            if due:
                since = self.counts[cause] - (last[1] if last else 0)
                self._last[cause] = (now, self.counts[cause])
        if self.on_count is not None:
            self.on_count(cause)
        if due:
            repeat = f" ({since} times in the last {self.every_s:.0f} s)" if last is not None else ""
            self.logger.warning("%s failed: %s (%s)%s; %s", what, cause.replace("_", " "), err, repeat,
                                ADVICE.get(cause, "see the error"))  # fmt: skip
        return due
