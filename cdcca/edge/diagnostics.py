"""What a robot reports on ``/diagnostics``: answer rate and latency, adapter version, uplink depth, rejections.

The key/value status model of ``diagnostic_msgs/DiagnosticStatus`` (and of ``diagnostic_updater``,
docs.ros.org/en/jazzy/p/diagnostic_updater), computed from an :class:`~cdcca.edge.runtime.EdgeRuntime` without ROS.
The same report goes out on the link (topic ``diagnostics``, :func:`diagnostic_array`) for ``cdcca status``, which
reads the keys of :data:`cdcca.wire.topics.ROBOT_STATUS_KEYS`: ``adapter_version``, ``uplink_queued``,
``uplink_acked``, ``answers``, ``updates_applied``, ``updates_rejected`` and ``cloud`` (``up``, ``down``, or
``unknown`` where the robot has no view of the cloud, e.g. behind a ROS bridge).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cdcca import wire

if TYPE_CHECKING:
    from cdcca.edge.runtime import EdgeRuntime

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


@dataclass
class DiagnosticReport:
    """One ``diagnostic_msgs/DiagnosticStatus``: level (0 OK, 1 WARN, 2 ERROR), message, key/values."""

    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class AnswerMeter:
    """Answer rate and latency over a sliding window of ``window_s`` seconds."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._events: deque[tuple[float, float]] = deque()  # (time, latency_ms)
        self._started = clock()
        self._lock = threading.Lock()

    def record(self, latency_ms: float, count: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._events.extend([(now, float(latency_ms))] * count)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def rate_hz(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, max(now - self._started, 1e-9))
            return len(self._events) / span

    def latency_ms(self) -> tuple[float, float]:
        """(mean, 95th percentile) over the window; NaN without answers."""
        with self._lock:
            values = np.array([latency for _, latency in self._events], dtype=float)
        if values.size == 0:
            return math.nan, math.nan
        return float(values.mean()), float(np.percentile(values, 95))


class EdgeDiagnostics:
    """The runtime's ``/diagnostics`` status; WARN for what happened since the previous report.

    Args:
        runtime: the robot's runtime.
        callback_errors: how many middleware callbacks raised (the shell counts them).
    """

    def __init__(self, runtime: EdgeRuntime, callback_errors: Callable[[], int] = lambda: 0) -> None:
        self.runtime, self._callback_errors = runtime, callback_errors
        self._rejected_at_last_report = 0
        self._failed_at_last_report = 0
        self._health_rollbacks_at_last_report = 0
        self._acks_rejected_at_last_report = 0
        self._record_failures_at_last_report = 0

    def report(self) -> DiagnosticReport:
        """WARN when a delta was rejected, an ack refused, an answer failed, an update failed its health check
        (and was rolled back) or the health check's record could not be written since the previous report, when the
        uplink queue is
        at least 90 % full, or when the latest frame is older than ``max_frame_age_s``; ERROR when no camera
        frame has arrived while prompts wait."""
        runtime = self.runtime
        stats, counters, frame = runtime.stats(), runtime.counters, runtime.frame
        mean, p95 = runtime.meter.latency_ms()
        depth, capacity = int(stats["uplink_queued"]), runtime.uplink.capacity
        age, max_age = frame.age_s(), runtime.config.max_frame_age_s
        values = {
            "answer_rate_hz": f"{runtime.meter.rate_hz():.2f}",
            "latency_ms_mean": f"{mean:.1f}",
            "latency_ms_p95": f"{p95:.1f}",
            "adapter_version": str(stats["adapter_version"]),
            "uplink_queue_depth": str(depth),
            "uplink_queue_capacity": str(capacity),
            "uplink_dropped": str(stats["uplink_dropped"]),
            "rejected_deltas": str(counters.deltas_rejected),
            "applied_deltas": str(counters.deltas_applied),
            "health_rollbacks": str(counters.health_rollbacks),
            "health_probation": "none" if runtime.health.probation is None else str(runtime.health.probation),
            "health_record_failures": str(runtime.health.record_failures),
            "foreign_deltas": str(counters.deltas_foreign),
            "rejected_acks": str(counters.acks_rejected),
            "answers": str(counters.answers),
            "failed_answers": str(counters.failed_answers),
            "frames_received": str(frame.received),
            "frames_rejected": str(frame.bad),
            "frame_age_s": "inf" if math.isinf(age) else f"{age:.2f}",
            "prompts_waiting": str(runtime.pending()),
            "prompts_dropped": str(counters.prompts_dropped),
            "malformed_messages": str(counters.malformed),
            "callback_errors": str(self._callback_errors()),
            # the keys `cdcca status` reads (cdcca.wire.topics.ROBOT_STATUS_KEYS)
            "uplink_queued": str(depth),
            "uplink_acked": str(stats["uplink_acked"]),
            "updates_applied": str(counters.deltas_applied),
            "updates_rejected": str(counters.deltas_rejected),
            "cloud": "unknown" if runtime.cloud is None else "up" if runtime.cloud.up else "down",
            "faults": str(sum(counters.faults.values())),
            "publish_errors": str(counters.publish_errors),
        }
        problems = []
        if counters.deltas_rejected > self._rejected_at_last_report:
            problems.append("a weight delta was rejected")
        if counters.failed_answers > self._failed_at_last_report:
            problems.append("answering failed")
        if counters.health_rollbacks > self._health_rollbacks_at_last_report:
            problems.append("an update failed its health check and was rolled back")
        if runtime.health.record_failures > self._record_failures_at_last_report:
            problems.append("the health record could not be written (a restart checks against an older one)")
        if counters.acks_rejected > self._acks_rejected_at_last_report:
            problems.append("a UtsAck was refused (unsigned, untrusted key or replayed)")
        if depth >= 0.9 * capacity:
            problems.append("uplink queue nearly full (cloud unreachable?)")
        if max_age > 0 and frame.received and age > max_age:
            problems.append(f"camera frame {age:.1f} s old")
        self._rejected_at_last_report = counters.deltas_rejected
        self._failed_at_last_report = counters.failed_answers
        self._health_rollbacks_at_last_report = counters.health_rollbacks
        self._acks_rejected_at_last_report = counters.acks_rejected
        self._record_failures_at_last_report = runtime.health.record_failures
        if frame.received == 0 and runtime.pending():
            return DiagnosticReport(ERROR, "no camera frame received; prompts are waiting", values)
        if problems:
            return DiagnosticReport(WARN, "; ".join(problems), values)
        return DiagnosticReport(OK, f"answering with adapter version {stats['adapter_version']}", values)


def diagnostic_array(report: DiagnosticReport, robot_id: str, stamp_ns: int | None = None):
    """A ``diagnostic_msgs/DiagnosticArray`` holding ``report`` as one ``DiagnosticStatus`` named
    ``cdcca_edge: <robot_id>`` (hardware_id: the robot id), as ``diagnostic_updater`` would publish it."""
    values = [wire.new("diagnostic_msgs/msg/KeyValue", key=key, value=value) for key, value in report.values.items()]
    status = wire.new("diagnostic_msgs/msg/DiagnosticStatus", level=int(report.level), name=f"cdcca_edge: {robot_id}",
                      message=report.message, hardware_id=robot_id, values=values)  # fmt: skip
    return wire.new(wire.DIAGNOSTIC_ARRAY, header=wire.header(time.time_ns() if stamp_ns is None else stamp_ns),
                    status=[status])  # fmt: skip
