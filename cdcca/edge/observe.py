"""Seeing what a robot does: its answers, whether the cloud is there, a terminal status line and Prometheus metrics.

Everything here watches an :class:`~cdcca.edge.runtime.EdgeRuntime` from outside; none of it is needed to answer.

* :class:`AnswerSink` prints each answer as one line and/or appends it to a JSON Lines file (one object per
  answer, jsonlines.org), the format log shippers and ``jq`` read line by line.
* :class:`CloudWatch` tells whether the cloud is reachable: from the cloud's Zenoh liveliness token
  (:meth:`cdcca.transport.Link.declare_presence`), its diagnostics and its acks. It warns within seconds when
  there is none, and logs when it comes and goes.
* :class:`StatusLine` rewrites one line in place on a terminal (``\\r`` and ANSI "erase in line", ECMA-48).
* :class:`EdgeMetrics` serves the runtime's counters in the Prometheus text format with ``prometheus_client``:
  a private ``CollectorRegistry`` per runtime, read from the runtime when scraped (the library's "custom
  collector" pattern), plus a histogram of answer latency. Metric names follow Prometheus' naming practices
  (``cdcca_edge_`` prefix, ``_total`` counters, base units: seconds).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cdcca import wire

if TYPE_CHECKING:
    from cdcca.edge.runtime import EdgeRuntime

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ answers
def answer_record(msg: Any) -> dict:
    """One ``cdcca_msgs/Answer`` as a JSON-ready dict."""
    entropy = float(msg.entropy)
    return {"sample_id": msg.sample_id, "stamp_ns": wire.stamp_ns(msg.header), "frame_id": msg.header.frame_id,
            "prompt": msg.prompt, "answer": msg.answer, "entropy": entropy if math.isfinite(entropy) else None,
            "adapter_version": int(msg.adapter_version), "latency_ms": round(float(msg.latency_ms), 3)}  # fmt: skip


def answer_line(msg: Any) -> str:
    """``[stamp s frame] SAMPLE_ID "prompt" -> "answer" (entropy 0.123, adapter v2)`` on one line; the sample id
    names the frame (``bag@<recorded stamp ns>#<prompt>``, ``<file>#<prompt>``)."""
    stamp = wire.stamp_ns(msg.header) / 1e9
    where = f" {msg.header.frame_id}" if msg.header.frame_id else ""
    entropy = float(msg.entropy)
    shown = f"{entropy:.3f}" if math.isfinite(entropy) else "nan (failed)"
    one_line = lambda text: " ".join(str(text).split())  # noqa: E731  (a prompt or answer never breaks the line)
    return (f"[{stamp:.3f}{where}] {msg.sample_id} {json.dumps(one_line(msg.prompt))} -> "
            f"{json.dumps(one_line(msg.answer))} "
            f"(entropy {shown}, adapter v{int(msg.adapter_version)})")  # fmt: skip


class AnswerSink:
    """Where answers go besides the link: printed (``show``) and/or appended to a JSONL file (``path``).

    A file that cannot be written (a full disk) is reported to ``on_fault`` and the answers go on.
    """

    def __init__(self, show: bool = False, path: str | Path | None = None, stream: TextIO | None = None,
                 on_fault: Callable[[str, str], None] | None = None) -> None:  # fmt: skip
        self.show, self.stream = show, stream
        self.path = Path(path) if path is not None else None
        self._on_fault = on_fault
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
            except OSError as err:
                raise ValueError(f"cannot append answers to {self.path}: {err.strerror or err}; "
                                 "choose a writable --answers-file") from err  # fmt: skip

    def __call__(self, answers: Sequence[Any]) -> None:
        with self._lock:
            if self.show:
                stream = self.stream or sys.stdout
                stream.write("".join(f"\r\x1b[K{answer_line(a)}\n" if stream.isatty() else f"{answer_line(a)}\n"
                                     for a in answers))  # fmt: skip
                stream.flush()
            if self._file is not None:
                try:
                    self._file.write("".join(json.dumps(answer_record(a)) + "\n" for a in answers))
                    self._file.flush()
                except OSError as err:
                    report = self._on_fault or (lambda kind, detail: log.warning("%s", detail))
                    report("answers_file", f"cannot append answers to {self.path}: {err}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as err:
                    log.warning("closing %s: %s", self.path, err)
                self._file = None


# -------------------------------------------------------------------------------------------------- cloud
class CloudWatch:
    """Whether the cloud is reachable, as this robot can tell.

    Up while a cloud presence token is alive (:meth:`cdcca.transport.Link.watch_presence`), or while the cloud was
    heard from (an accepted ack, the cloud's diagnostics) in the last ``heard_ttl_s``: a cloud older than the
    presence token is still recognised by what it sends. :meth:`check` (called by the runtime's loop) logs a
    WARNING when no cloud was seen ``warn_after_s`` after start (repeated at doubling intervals while it stays
    away), a WARNING when it goes away, and an INFO when it comes (back).

    Args:
        endpoint: where the cloud is expected (for the log lines).
        queued: how many uplink samples wait (for the log lines).
        warn_after_s: seconds without a cloud before the first warning.
        heard_ttl_s: how long a message from the cloud counts as "up" without a presence token.
    """

    def __init__(self, endpoint: str, queued: Callable[[], int] = lambda: 0, warn_after_s: float = 5.0,
                 heard_ttl_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.endpoint, self._queued, self._clock = endpoint, queued, clock
        self.warn_after_s, self.heard_ttl_s = warn_after_s, heard_ttl_s
        self._lock = threading.Lock()
        self._tokens: set[str] = set()
        self._heard_at: float | None = None
        self._live_source = False  # a presence token or the cloud's diagnostics were seen: "down" is knowable
        self._since = clock()  # start, or when it went down
        self._next_warning = self._since + warn_after_s
        self._was_up = False
        self.reached = False  # seen at least once
        self.transitions = 0  # ups and downs logged

    def presence(self, name: str, alive: bool) -> None:
        """A cloud presence token appeared or went away (a :meth:`Link.watch_presence` callback)."""
        with self._lock:
            (self._tokens.add if alive else self._tokens.discard)(name)
            self._live_source = True
        self.check()

    def heard(self, what: str = "ack") -> None:
        """Something only the cloud sends arrived: a verified ``ack`` or the cloud's ``diagnostics``. Acks alone
        (a cloud with neither presence token nor diagnostics) say it was reached, never that it left: an idle
        cloud sends none."""
        with self._lock:
            self._heard_at = self._clock()
            self._live_source = self._live_source or what != "ack"
        self.check()

    @property
    def up(self) -> bool:
        with self._lock:
            if self._tokens:
                return True
            if self._heard_at is None:
                return False
            return not self._live_source or self._clock() - self._heard_at < self.heard_ttl_s

    def check(self) -> bool:
        """Log what changed since the last call; returns whether the cloud is up."""
        up, now = self.up, self._clock()
        with self._lock:
            was_up, self._was_up = self._was_up, up
            if up and not was_up:
                again = " again" if self.reached else ""
                self.reached = True
                self.transitions += 1
                self._since = now
            elif was_up and not up:
                self.transitions += 1
                self._since, self._next_warning = now, now + self.warn_after_s
            warn = not up and now >= self._next_warning
            if warn:
                away = now - self._since
                self._next_warning = now + max(self.warn_after_s, away)  # 5, 10, 20, 40... s
        if up and not was_up:
            log.info("cloud at %s is up%s; %d uploads queued", self.endpoint, again, self._queued())
        elif was_up and not up:
            log.warning("lost the cloud at %s; answers continue, uploads are kept (%d queued)", self.endpoint,
                        self._queued())  # fmt: skip
        elif warn:
            log.warning("no cloud at %s for %.0f s; answers continue, uploads are kept (%d queued)", self.endpoint,
                        away, self._queued())  # fmt: skip
        return up


# ------------------------------------------------------------------------------------------- status line
def status_text(runtime: EdgeRuntime) -> str:
    """``r1 | 12 answers, 3.0/s | uplink 4 queued, 8 acked | adapter v2 | cloud up``."""
    stats = runtime.stats()
    cloud = runtime.cloud
    link = "offline" if cloud is None else "up" if cloud.up else "down"
    if not stats["link_connected"] and runtime.port is not None:  # a Zenoh client still looking for its router
        link += f", link connecting ({stats['link_connect_failures']} failed tries)"
    return (f"{runtime.config.robot_id} | {stats['answers']} answers, {runtime.meter.rate_hz():.1f}/s | uplink "
            f"{stats['uplink_queued']} queued, {stats['uplink_acked']} acked | adapter v{stats['adapter_version']} | "
            f"cloud {link}")  # fmt: skip


class StatusLine:
    """A one-line status rewritten in place every ``every_s`` seconds while ``stream`` is a terminal."""

    def __init__(self, runtime: EdgeRuntime, stream: TextIO | None = None, every_s: float = 1.0) -> None:
        self.runtime, self.stream, self.every_s = runtime, stream or sys.stdout, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StatusLine:
        if self.stream.isatty() and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edge-status", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.stream.write(f"\r\x1b[K{status_text(self.runtime)}")
                self.stream.flush()
            except Exception as err:  # a closed terminal must not take the robot down
                log.debug("status line: %s", err)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except Exception:  # noqa: S110  (the terminal is gone: nothing to clear)
                pass


# ---------------------------------------------------------------------------------------------- metrics
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EdgeMetrics:
    """The runtime's counters for Prometheus on ``port`` (``None``/0: not served, still collectable).

    Counters (``_total``): ``cdcca_edge_answers``, ``cdcca_edge_uploads_enqueued``, ``cdcca_edge_uploads_acked``,
    ``cdcca_edge_updates_applied``, ``cdcca_edge_updates_rejected{reason}`` (a short kind: signature, version,
    fingerprint, payload, robot, persist, other), ``cdcca_edge_faults{kind}``; gauges
    ``cdcca_edge_uplink_queue_depth``, ``cdcca_edge_adapter_version``, ``cdcca_edge_cloud_up``; histogram
    ``cdcca_edge_answer_latency_seconds``. Every series carries ``robot``.
    """

    def __init__(self, runtime: EdgeRuntime, port: int | None = None, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram("cdcca_edge_answer_latency_seconds", "Answer latency per prompt", ["robot"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.registry.register(_RuntimeCollector(runtime))
        self.server = None
        self.port = None
        if port:
            from prometheus_client import start_http_server

            try:
                self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as err:  # the port is taken, or the address is none of this machine's
                import errno

                flag = "--metrics-port" if err.errno in (errno.EADDRINUSE, errno.EACCES) else "--metrics-address"
                raise ValueError(f"cannot serve metrics on {addr}:{port}: {err}; pick another {flag}") from err
            self.port = self.server.server_port

    def observe(self, answers: Sequence[Any]) -> None:
        """An answer listener: each answer's latency into the histogram."""
        robot = self.runtime.config.robot_id
        for msg in answers:
            if math.isfinite(float(msg.entropy)):
                self.latency.labels(robot).observe(float(msg.latency_ms) / 1000.0)

    def exposition(self) -> str:
        """What a scrape returns, in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _RuntimeCollector:
    """Reads the runtime's counters at scrape time (prometheus_client's custom collector protocol)."""

    def __init__(self, runtime: EdgeRuntime) -> None:
        self.runtime = runtime

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runtime = self.runtime
        robot = runtime.config.robot_id
        stats = runtime.stats()
        counters = runtime.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"cdcca_edge_{name}", doc, labels=["robot"])
            family.add_metric([robot], value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"cdcca_edge_{name}", doc, labels=["robot"])
            family.add_metric([robot], value)
            return family

        yield counter("answers", "Prompts answered", stats["answers"])
        yield counter("uploads_enqueued", "Uploads queued for the cloud (one per frame, with its uncertain prompts)",
                      stats["uplink_enqueued"])  # fmt: skip
        yield counter("uploads_acked", "Samples the cloud acknowledged", stats["uplink_acked"])
        yield counter("updates_applied", "Weight deltas applied", counters.deltas_applied)
        rejected = CounterMetricFamily("cdcca_edge_updates_rejected", "Weight deltas rejected, by reason kind",
                                       labels=["robot", "reason"])  # fmt: skip
        for reason, count in sorted(counters.deltas_rejected_reasons.items()):
            rejected.add_metric([robot, reason], count)
        yield rejected
        faults = CounterMetricFamily("cdcca_edge_faults", "Runtime faults logged, counted and skipped, by kind",
                                     labels=["robot", "kind"])  # fmt: skip
        for kind, count in sorted(counters.faults.items()):
            faults.add_metric([robot, kind], count)
        yield faults
        yield gauge("uplink_queue_depth", "Samples waiting for the cloud's ack", stats["uplink_queued"])
        yield gauge("adapter_version", "Adapter version answering now", stats["adapter_version"])
        cloud = runtime.cloud
        yield gauge("cloud_up", "1 while the cloud is reachable", float(cloud is not None and cloud.up))
        yield gauge("link_connected", "1 once the link reached the network (a Zenoh client: its router)",
                    float(stats["link_connected"]))  # fmt: skip
