"""Prometheus metrics of the cloud trainer (``prometheus_client``), on ``CloudConfig.metrics_port``.

Counters the service keeps anyway (:class:`~cloud_trainer.service.CloudCounters`) are exposed by a custom
collector that reads them at scrape time, as the client's documentation recommends for values another system
already counts ("custom collectors"); only the round-time histogram is observed as rounds finish. Each service
has its own ``CollectorRegistry``, so two trainers in one process (tests) never share a metric.

Names (all prefixed ``cdcca_cloud_``): ``samples_received_total``, ``samples_admitted_total``,
``samples_duplicate_total``, ``samples_rejected_total{reason}``, ``samples_quarantined_total``,
``rounds_total{outcome="done|failed|abandoned"}``, ``round_seconds`` (histogram), ``deltas_sent_total``,
``delta_bytes_total``, ``update_rejections_total{reason}`` (robots' REJECTED statuses by reason kind),
``store_faults_total{cause}``, ``robot_applied_version{robot}``, ``robot_latest_version{robot}``,
``pending_samples{robot}``. A "sample" of these names is one upload, a ``UtsTokens`` message: one frame's tokens with
every prompt about it that the robot found uncertain (the names predate frame grouping; dashboards keep working).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cloud_trainer.service import CloudTrainer

PREFIX = "cdcca_cloud_"
ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)


class _TrainerCollector:
    """Reads the trainer's counters and the store at scrape time."""

    def __init__(self, trainer: CloudTrainer) -> None:
        self.trainer = trainer

    def describe(self):
        return []  # collected on demand only (no scrape at registration)

    def collect(self):
        trainer, counters = self.trainer, self.trainer.counters

        def counter(name: str, doc: str, value: float | None = None, label: str | None = None,
                    values: dict | None = None):  # fmt: skip
            family = CounterMetricFamily(PREFIX + name, doc, labels=[label] if label else None)
            if label:
                for key, count in sorted((values or {}).items()):
                    family.add_metric([str(key)], count)
            else:
                family.add_metric([], value)
            return family

        received = counters.received + counters.duplicates + counters.rejected + sum(counters.store_faults.values())
        yield counter("samples_received", "UtsTokens messages that reached the service", received)
        yield counter("samples_admitted", "uploads stored (new) and acknowledged", counters.received)
        yield counter("samples_duplicate", "uploads received again (acknowledged again, stored once)",
                      counters.duplicates)
        yield counter("samples_rejected", "uploads refused before the ack, by reason", label="reason",
                      values=counters.rejected_reasons)
        yield counter("samples_quarantined", "stored uploads no round may use", counters.quarantined)
        yield counter("rounds", "rounds by outcome", label="outcome", values={
            "done": counters.rounds, "failed": counters.round_failures, "abandoned": counters.rounds_abandoned,
            "superseded": counters.rounds_superseded})
        yield counter("deltas_sent", "WeightDelta messages published (first sends and resends)", counters.deltas_sent)
        yield counter("delta_bytes", "bytes of the WeightDelta messages published", counters.delta_bytes)
        yield counter("update_rejections", "updates robots rejected, by reason kind", label="reason",
                      values=counters.update_rejections)
        yield counter("store_faults", "store writes that failed, by cause", label="cause", values=counters.store_faults)
        applied = GaugeMetricFamily(PREFIX + "robot_applied_version", "the version each robot reports running",
                                    labels=["robot"])  # fmt: skip
        latest = GaugeMetricFamily(PREFIX + "robot_latest_version", "the newest version published to each robot",
                                   labels=["robot"])  # fmt: skip
        for robot_id, robot in sorted(dict(trainer.robots).items()):
            applied.add_metric([robot_id], robot.reported)
            latest.add_metric([robot_id], robot.chain.latest)
        yield applied
        yield latest
        pending = GaugeMetricFamily(PREFIX + "pending_samples", "uploads waiting for a round", labels=["robot"])
        for robot_id, count in sorted(trainer.store.pending_counts().items()):
            pending.add_metric([robot_id], count)
        yield pending


class CloudMetrics:
    """The trainer's metrics in a private registry; :meth:`serve` exposes them over HTTP.

    Args:
        trainer: the service to observe (its ``on_round`` list gets the histogram's observer).
    """

    def __init__(self, trainer: CloudTrainer) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_TrainerCollector(trainer))
        self.round_seconds = Histogram(PREFIX + "round_seconds", "seconds of a finished round (AKD + DWC + commit)",
                                       buckets=ROUND_BUCKETS, registry=self.registry)  # fmt: skip
        trainer.on_round.append(self._observe)
        self._server = None

    def _observe(self, result: dict) -> None:
        self.round_seconds.observe(result["round_seconds"])

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (``/metrics``) on a daemon thread; returns the bound port (``port`` 0: any)."""
        try:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as err:
            raise ValueError(f"cannot serve metrics on {address}:{port} ({err.strerror or err}); choose another "
                             f"--metrics-port or free that one") from err  # fmt: skip
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
