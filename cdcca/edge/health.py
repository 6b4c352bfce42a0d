"""Health-checked updates: a swapped-in adapter stays only once its first answers look sane ("mark good").

A signed, well-formed delta can still break the student (a cloud round gone wrong: every answer empty, or NaN
entropy). As RAUC and Mender do with a freshly booted slot, the robot holds each new version on probation:
its next :attr:`HealthConfig.answers` answers must have finite entropies, mostly non-empty texts, and a mean
entropy (UTS Eq. 2) not far above the level the previous version had just before the swap. A version that
fails is rolled back by the runtime at once, with the reason in a ROLLED_BACK ``AdapterStatus``; one that
passes is marked good and its answers become the level the next update is held to.

A restart does not end a probation. The check keeps a small record beside the adapter state (``health.json``: the
version marked good, its level, the one on probation, the versions that failed), written at each swap and verdict; a
robot that restarts on a version the record does not mark good holds it to the check again (:meth:`HealthCheck.resume`),
and the adapter state keeps the previous adapter for the rollback (:mod:`cdcca.edge.adapter_state`). Without it a
power cut during a probation would have made any new version good.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cdcca.paths import write_atomic

log = logging.getLogger(__name__)
RECORD_FILE = "health.json"
FAILED_KEPT = 32  # versions that failed, kept in the record


@dataclass
class HealthConfig:
    """When a new adapter version is kept.

    Args:
        answers: answers of a new version that must pass before it is marked good (0: no health check).
        max_empty_fraction: the most of those answers that may be empty (0 to 1).
        entropy_ratio: the new version fails if its mean answer entropy exceeds ``entropy_ratio`` times the
            pre-swap level plus ``entropy_margin`` (>= 1).
        entropy_margin: nats added to the allowed entropy level (>= 0).
        baseline_answers: the last this many answers of the version marked good form the pre-swap level (>= 1).
    """

    answers: int = 8
    max_empty_fraction: float = 0.5
    entropy_ratio: float = 2.0
    entropy_margin: float = 0.5
    baseline_answers: int = 64

    def __post_init__(self) -> None:
        def require(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"HealthConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        require("answers", 0 <= self.answers <= 10_000, ">= 0 and <= 10000")
        require("max_empty_fraction", 0.0 <= self.max_empty_fraction <= 1.0, ">= 0 and <= 1")
        require("entropy_ratio", self.entropy_ratio >= 1.0, ">= 1")
        require("entropy_margin", self.entropy_margin >= 0.0, ">= 0")
        require("baseline_answers", 1 <= self.baseline_answers <= 100_000, ">= 1 and <= 100000")


class HealthCheck:
    """The probation of the latest applied version; thread-safe (deltas and answers arrive on two threads)."""

    def __init__(self, config: HealthConfig, good: int | None = None, record: str | Path | None = None) -> None:
        self.config = config
        self.record = Path(record) if record is not None else None  # None: kept in memory only
        self.record_failures = 0  # the record could not be written (the check itself goes on)
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=config.baseline_answers)  # entropies of the version marked good
        self._good = good  # the version marked good (the running one at start; None: the first answering), then each
        # that passes; a version that failed is never adopted as good
        self._adopt_first = good is None  # resume() knows what is good, or that nothing is: it never adopts
        self._failed: set[int] = set()
        self._before: list[float] = []  # the good version's level when the one on probation was swapped in
        self._baseline: float | None = None  # the pre-swap level of the version on probation
        self._level: float | None = None  # the good version's level as last measured (kept in the record)
        self._probation: int | None = None
        self._seen: list[tuple[str, float]] = []
        self.passed = 0
        self.failed = 0

    @classmethod
    def resume(cls, config: HealthConfig, running: int, record: str | Path | None) -> HealthCheck:
        """The check of a robot that starts running ``running`` (the adapter version it restored); ``record``:
        where the check keeps what it decided (``None``: in memory only).

        The base (0) and the version the record marks good run as good. Any other version goes on probation, held
        to the good version's recorded level: the one on probation when the robot stopped, one whose swap the record
        never heard of (the robot stopped between persisting the adapter and writing the record), one the robot
        returned to without a check; one that failed before (a rollback the robot could not persist) fails at its
        first answer. With no record yet (a first start, or state from a release without it) the running version is
        good; with an unreadable one it goes on probation. With the check off a record is begun if there is none,
        and otherwise left as it is (versions applied meanwhile are checked once the check is on again).
        """
        check, running = cls(config, record=record), int(running)
        check._adopt_first = False
        saved = check._read()
        if not config.answers:  # no check: nothing goes on probation, and a record is only begun, never changed
            check._good = running
            if saved == {}:
                with check._lock:
                    check._save()
            return check
        with check._lock:
            failed = saved.get("failed", [])
            check._failed = {int(v) for v in failed if isinstance(v, int)} if isinstance(failed, list) else set()
            good, level = saved.get("good"), saved.get("level")
            check._level = float(level) if isinstance(level, (int, float)) and math.isfinite(level) else None
            if running == 0 or running == good or saved == {}:
                if running != good:
                    check._level = None  # the level recorded was another version's
                check._good = running
            else:
                check._good = good if isinstance(good, int) else None
                check._probation, check._baseline = running, check._level
                why = f"v{good} is the last marked good" if isinstance(good, int) else "no version is recorded as good"
                log.warning("adapter v%d was not marked good when the robot stopped (%s): its health check starts "
                            "again", running, why)  # fmt: skip
            check._save()
        return check

    def _read(self) -> dict:
        """The record; ``{}`` when there is none, ``{"unreadable": ...}`` when it cannot be read."""
        if self.record is None or not self.record.is_file():
            return {}
        try:
            saved = json.loads(self.record.read_text(encoding="utf-8"))
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
            return saved
        except (OSError, ValueError) as err:  # written atomically, so only a hand edit or a bad disk gets here
            log.error("cannot read the health record %s (%s): the running adapter goes on probation", self.record, err)
            return {"unreadable": str(err)}

    def _save(self) -> None:
        """Write the record, durably (a torn or lost record after a power cut would put the running version on
        probation, or forget a failure), under the lock, so two threads' records land in the order they were made.
        Once per swap and once per verdict."""
        if self.record is None:
            return
        state = {"good": self._good, "level": self._level, "failed": sorted(self._failed)[-FAILED_KEPT:]}
        if self._probation is not None:
            state["probation"] = self._probation
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)  # a robot's first start: no adapter written yet
            write_atomic(self.record, json.dumps(state) + "\n", durable=True)
        except OSError as err:
            self.record_failures += 1
            log.error("cannot write the health record %s (%s): a restart checks the running adapter against the last "
                      "record written", self.record, err)  # fmt: skip

    @property
    def good(self) -> int | None:
        """The version marked good: its answers make the level the next version is held to."""
        return self._good

    @property
    def probation(self) -> int | None:
        """The version on probation, ``None`` when the running version is marked good."""
        return self._probation

    def start(self, version: int) -> None:
        """``version`` was just swapped in: hold it to the level of the answers before the swap."""
        if self.config.answers == 0:
            return
        with self._lock:
            if self._probation is None:  # replacing a version on probation: held to the same good version's level
                self._before = list(self._recent)
            if self._before:
                self._level = sum(self._before) / len(self._before)
            self._baseline = self._level
            self._recent.clear()
            self._probation, self._seen = int(version), []
            self._save()

    def observe(self, version: int, texts: Sequence[str], entropies: Sequence[float]) -> str | None:
        """Record answers of ``version``; returns why the version on probation fails, or ``None``.

        Answers of another version are ignored: one still in flight from before the swap, one of the new version
        that finished before :meth:`start` was called, a straggler of a version rolled back. Only answers of the
        version marked good make the level the next version is held to. A non-finite entropy fails at once; the
        other checks are made when :attr:`HealthConfig.answers` answers are in. A version that fails leaves the level
        as it was before its swap (the runtime rolls back to the good version).
        """
        entropies = [float(e) for e in entropies]
        with self._lock:
            if self._probation is None:
                if self._good is None and self._adopt_first and int(version) not in self._failed:
                    self._good = int(version)
                if int(version) == self._good:
                    self._recent.extend(e for e in entropies if math.isfinite(e))
                return None
            if int(version) != self._probation:
                return None
            self._seen.extend(zip(texts, entropies))
            reason = self._verdict()
            if reason is not None:
                self.failed += 1
                self._failed.add(self._probation)
                self._recent.extend(self._before)
                self._probation, self._seen = None, []
                self._save()
            elif len(self._seen) >= self.config.answers:
                self.passed += 1
                self._good = self._probation
                self._recent.extend(e for _, e in self._seen if math.isfinite(e))
                self._level = sum(self._recent) / len(self._recent) if self._recent else None
                self._probation, self._seen = None, []
                self._save()
            return reason

    def _verdict(self) -> str | None:
        seen, config = self._seen, self.config
        version = f"v{self._probation}"
        if self._probation in self._failed:  # it failed already, and the robot could not leave it (a rollback
            # refused or not persisted, then a restart or a rollback to it)
            return f"{version} failed its health check already"
        broken = sum(not math.isfinite(e) for _, e in seen)
        if broken:
            return f"{broken} of {len(seen)} answers of {version} have a non-finite entropy"
        if len(seen) < config.answers:
            return None
        empty = sum(not text.strip() for text, _ in seen)
        if empty > config.max_empty_fraction * len(seen):
            return f"{empty} of {len(seen)} answers of {version} are empty (at most {config.max_empty_fraction:.0%})"
        mean = sum(e for _, e in seen) / len(seen)
        if self._baseline is not None:
            limit = config.entropy_ratio * self._baseline + config.entropy_margin
            if mean > limit:
                return (f"mean answer entropy of {version} is {mean:.3f} nats, above {limit:.3f} ("
                        f"{config.entropy_ratio:g} x {self._baseline:.3f} before the swap + {config.entropy_margin:g})")
        return None
