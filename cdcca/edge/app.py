"""``cdcca edge``: one robot as a process -- a source of frames and prompts through an :class:`EdgeRuntime`
connected to the cloud over Zenoh. With ``--backend onnx`` nothing here loads torch, transformers, peft or
bitsandbytes (issue 19): the ONNX Runtime export answers, scores UTS and applies deltas on its own."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cdcca.edge.observe import AnswerSink, CloudWatch, EdgeMetrics, StatusLine
from cdcca.edge.ports import FanOut, ZenohPort
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.edge.sources import DEFAULT_PROMPTS, open_source
from cdcca.envelope import TrustStore
from cdcca.paths import FolderLock
from cdcca.transport import CLOUD_PRESENCE
from cdcca.wire.topics import CLOUD_ID, DIAGNOSTICS, LINK_TOPICS

log = logging.getLogger(__name__)


def build_runtime(checkpoints: Path, config: EdgeConfig, trust_dir: Path, link=None, backend: str = "torch",
                  threads: int | None = None, port=None,
                  state_hint: str = "pass another --state folder") -> EdgeRuntime:  # fmt: skip
    """The robot's runtime; the adapter state persists under ``config.state_dir``, which the runtime holds
    (:class:`~cdcca.paths.FolderLock`) until ``runtime.close()``: a second robot on it is refused.

    Args:
        link: an open Zenoh :class:`~cdcca.transport.Link` to the cloud (becomes a
            :class:`~cdcca.edge.ports.ZenohPort`); ``None`` with no ``port``: offline.
        port: any other port of the runtime (an rclpy or DDS shell passes its own).
        backend: ``torch`` (eager student behind an adapter slot) or ``onnx`` (ONNX Runtime on the export made
            by ``cdcca export --backend onnx``: ``checkpoints`` itself when it is one, else
            ``<checkpoints>/student_onnx``; torch is not imported).
        threads: ONNX Runtime intra-op threads.
        state_hint: what a robot refused its state folder is told to do (the ROS node names its parameter).
    """
    trust = TrustStore.load(trust_dir)
    hold = FolderLock(Path(config.state_dir), state_hint)  # before the backend restores the adapter state
    try:
        runtime = _build(checkpoints, config, trust, link, backend, threads, port)
    except BaseException:
        hold.release()
        raise
    runtime.folder_lock = hold  # released by runtime.close()
    return runtime


def _build(checkpoints: Path, config: EdgeConfig, trust: TrustStore, link, backend: str, threads: int | None,
           port) -> EdgeRuntime:  # fmt: skip
    if backend == "torch":
        from cdcca.edge.adapter_slot import AdapterSlot
        from cdcca.edge.backend import TorchBackend
        from cdcca.models.checkpoint import load_adaptable_student

        student = load_adaptable_student(checkpoints)  # UTS stage 2 runs on its frozen encoder
        answering = TorchBackend(AdapterSlot(student, config.robot_id, trust, Path(config.state_dir) / "adapter"))
    elif backend == "onnx":
        from cdcca.edge.onnx_backend import OnnxBackend
        from cdcca.edge.onnx_model import MANIFEST_FILE

        export = Path(checkpoints)
        export = export if (export / MANIFEST_FILE).is_file() else export / "student_onnx"
        student = None  # UTS runs on the export's own graphs (OnnxBackend.token_sampler)
        answering = OnnxBackend(export, config.robot_id, trust, state_dir=Path(config.state_dir) / "onnx_adapter",
                                threads=threads)  # fmt: skip
    else:
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    if link is not None:
        port = ZenohPort(link, config.robot_id) if port is None else FanOut(ZenohPort(link, config.robot_id), port)
    runtime = EdgeRuntime(answering, student, config, port, trust=trust)
    if link is not None:
        watch_cloud(runtime, link, config.cloud_warn_after_s)
    return runtime


def watch_cloud(runtime: EdgeRuntime, link, warn_after_s: float = 5.0) -> CloudWatch:
    """Tell ``runtime`` whether the cloud behind ``link`` is reachable: its presence token
    (:meth:`~cdcca.transport.Link.declare_presence`), its diagnostics (key ``_cloud/cdcca/diagnostics``) and
    the acks the runtime accepts. A warning comes ``warn_after_s`` after start when there is no cloud."""
    endpoint = ", ".join(link.config.connect or link.config.listen) or "(no endpoint)"
    cloud = CloudWatch(endpoint, queued=lambda: len(runtime.uplink), warn_after_s=warn_after_s)
    runtime.cloud = cloud
    link.watch_presence(CLOUD_PRESENCE, cloud.presence)
    if DIAGNOSTICS in LINK_TOPICS:
        link.subscribe(CLOUD_ID, DIAGNOSTICS, lambda *_: cloud.heard("diagnostics"))
    return cloud


@dataclass
class ReplaySettings:
    """How a source is fed through the runtime.

    Args:
        source: ``bag:PATH[#TOPIC]``, ``dir:PATH``, ``realsense``, ``realsense:FILE`` or ``ros:TOPIC``.
        prompts: prompts asked about each frame of sources without their own.
        batch_size: queries answered together.
        rate_hz: queries per second at most (0: no limit).
        speed: recordings replay at their recorded rate times this, as ``ros2 bag play --rate`` (0: as fast
            as possible).
        linger_s: after the source ends, keep serving (uplink, updates): a recording until the cloud has
            acknowledged its uplink, for at most this long (``None``: :data:`DRAIN_TIMEOUT_S`); other sources
            this long (``None``: until stopped); negative: until stopped.
        show_answers: print each answer on stdout, one line (stamp, prompt, answer, entropy, adapter version).
        answers_file: append each answer to this JSON Lines file (one object per answer).
        metrics_port: serve Prometheus metrics on this port (``None`` or 0: off).
        metrics_addr: the address the metrics server binds (default: every interface, as exporters do).
        status_line: a one-line status rewritten in place on stdout; ``None``: when stdout is a terminal.
        wait_updates: a recording, after its uplink drained, also waits (within ``linger_s``) until this many
            new adapter versions are applied: offline adaptation that ends with the adapted student in place.
    """

    source: str
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    batch_size: int = 8
    rate_hz: float = 0.0
    speed: float = 1.0
    linger_s: float | None = None
    show_answers: bool = False
    answers_file: Path | None = None
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    status_line: bool | None = None
    wait_updates: int = 0

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port (--metrics-port) must be a TCP port 1-65535 (0: off), "
                             f"got {self.metrics_port}")  # fmt: skip
        if self.wait_updates < 0:
            raise ValueError(f"wait_updates (--wait-updates) must be >= 0, got {self.wait_updates}")
        if self.answers_file is not None:
            self.answers_file = Path(self.answers_file)
            if self.answers_file.is_dir():
                raise ValueError(f"answers_file (--answers-file) {self.answers_file} is a folder; name a .jsonl file")
        if not self.rate_hz >= 0:
            raise ValueError(f"rate_hz must be >= 0 (0: no limit), got {self.rate_hz}")
        if not self.speed >= 0:
            raise ValueError(f"speed (--rate) must be >= 0 (0: as fast as possible), got {self.speed}")


DRAIN_TIMEOUT_S = 30.0  # the longest a finished recording waits for the cloud to acknowledge its uplink


def _linger(runtime: EdgeRuntime, settings: ReplaySettings, stop: threading.Event, start_version: int = 0) -> None:
    """After the source ends: serve until stopped, for ``linger_s``, or (a recording) until the uplink drains
    and, with ``wait_updates``, until that many versions past ``start_version`` are applied."""
    recording = settings.source.startswith(("bag:", "realsense:")) and settings.source != "realsense:"
    if settings.linger_s is not None and settings.linger_s < 0 or settings.linger_s is None and not recording:
        stop.wait(None)
        return
    if not recording:
        stop.wait(settings.linger_s)
        return
    wait_s = DRAIN_TIMEOUT_S if settings.linger_s is None else settings.linger_s
    deadline = time.monotonic() + wait_s
    while len(runtime.uplink) and time.monotonic() < deadline and not stop.wait(0.2):
        pass
    if len(runtime.uplink):
        log.warning("the cloud did not acknowledge %d queued samples within %.0f s; they stay queued in %s",
                    len(runtime.uplink), wait_s, runtime.config.state_dir)  # fmt: skip
        return
    if settings.wait_updates > 0:
        target = start_version + settings.wait_updates
        log.info("uplink drained; waiting for adapter v%d from the cloud (at most %.0f s more)", target,
                 max(0.0, deadline - time.monotonic()))  # fmt: skip
        while runtime.backend.version < target and time.monotonic() < deadline and not stop.wait(0.2):
            pass
        if runtime.backend.version < target:
            log.warning("no adapter v%d within %.0f s (running v%d); the cloud may still be training: run again "
                        "with a longer --linger", target, wait_s, runtime.backend.version)  # fmt: skip


EXIT_NO_CLOUD = 3  # the cloud was never reached, or a recording's uplink was left unacknowledged


class TruthScore:
    """Accuracy of the answers to a bag's own prompts that carry ground truth (``cdcca make-bag`` streams record it
    on :data:`~cdcca.wire.topics.GROUND_TRUTH_TOPIC` after each prompt), per adapter version: VQA accuracy and
    A-OKVQA multiple-choice accuracy, the benchmark's metrics; captions are not scored per answer. An answer
    listener of :class:`~cdcca.edge.runtime.EdgeRuntime`; a bag without ground truth scores nothing."""

    def __init__(self, path: Path) -> None:
        from cdcca.bag import GroundTruth, Prompt, read_bag
        from cdcca.wire.topics import GROUND_TRUTH_TOPIC, PROMPT_TOPIC

        self.truth: dict[str, dict] = {}  # sample id of the bag's prompt (as the bag source names it) -> record
        prompt = None
        for event in read_bag(path, topics=(PROMPT_TOPIC, GROUND_TRUTH_TOPIC), on_skip=lambda *_: None):
            if isinstance(event, Prompt):
                prompt = event
            elif isinstance(event, GroundTruth) and prompt is not None:
                self.truth[f"{path.name}@{prompt.stamp_ns}"] = event.record
                prompt = None
        self.scores: dict[int, dict[str, list[float]]] = {}  # version -> task -> per-answer accuracy (%)
        self._lock = threading.Lock()

    def __call__(self, answers) -> None:
        from cdcca.metrics import aokvqa_mc_accuracy, vqa_accuracy

        for msg in answers:
            record = self.truth.get(msg.sample_id)
            if record is None or record.get("task") not in ("vqa", "mc"):
                continue
            if record["task"] == "vqa":
                score = vqa_accuracy(msg.answer, record["answers"])
            else:
                score = aokvqa_mc_accuracy(msg.answer, record["choices"], record["correct_idx"])
            with self._lock:
                self.scores.setdefault(int(msg.adapter_version), {}).setdefault(record["task"], []).append(100 * score)

    def report(self) -> dict:
        """``{"scored": n, "accuracy": mean of VQA and MC (%), "by_version": {v: {...}}}`` (empty without truth)."""
        def summary(tasks: dict[str, list[float]]) -> dict:
            means = {task: sum(values) / len(values) for task, values in tasks.items() if values}
            return {"answers": sum(len(v) for v in tasks.values()), **{f"{t}_acc": m for t, m in means.items()},
                    "accuracy": sum(means.values()) / len(means) if means else None}  # fmt: skip

        with self._lock:
            merged: dict[str, list[float]] = {}
            for tasks in self.scores.values():
                for task, values in tasks.items():
                    merged.setdefault(task, []).extend(values)
            by_version = {version: summary(tasks) for version, tasks in sorted(self.scores.items())}
        return {"scored": sum(len(v) for v in merged.values()), "accuracy": summary(merged)["accuracy"],
                "by_version": by_version} if merged else {}


def edge_exit_code(report: dict) -> int:
    """The exit status of ``cdcca edge`` after :func:`replay`: 0, or :data:`EXIT_NO_CLOUD` (3) when a cloud was
    expected and never reached, a recording ended with uploads the cloud did not acknowledge, or the updates a
    recording waited for (``wait_updates``) did not arrive."""
    return 0 if edge_exit_reason(report) is None else EXIT_NO_CLOUD


def edge_exit_reason(report: dict) -> str | None:
    """The one line that goes with exit status 3 (``None`` for 0)."""
    queued = report.get("uplink_queued", 0)
    if report.get("cloud_expected") and not report.get("cloud_reached"):
        return (f"no cloud was reached at {report.get('cloud_endpoint', 'the link endpoint')}; answers were made, "
                f"{queued} uploads stay queued for the next run; check --endpoint / --link and that `cdcca cloud` "
                "runs")  # fmt: skip
    waited, start = report.get("updates_waited_for", 0), report.get("start_version", 0)
    if report.get("recording") and waited and queued == 0 and report.get("adapter_version", 0) < start + waited:
        return (f"the cloud acknowledged every upload but sent no adapter v{start + waited} in time (running "
                f"v{report.get('adapter_version', 0)}); its round may still run: --linger waits longer")  # fmt: skip
    if report.get("recording") and queued > 0:
        return (f"the cloud did not acknowledge {queued} uploads before the end; they stay queued for the next run "
                "(--linger waits longer)")  # fmt: skip
    return None


def replay(runtime: EdgeRuntime, settings: ReplaySettings, stop: threading.Event) -> dict:
    """Feed the source through ``runtime`` (its background thread does uplink and updates); returns stats.

    ``ros:TOPIC`` joins a ROS 2 graph as a raw DDS participant (no rclpy) and answers about the camera on
    TOPIC until stopped (:func:`cdcca.edge.dds_port.run_dds_edge`; ``rate_hz`` is then how often the
    ``prompts`` are asked, default once a second).

    Answers are printed / written as ``settings`` asks, metrics served on ``metrics_port``, and a status line
    kept on a terminal while it runs. The report adds ``cloud_expected``, ``cloud_reached`` and ``recording``
    (see :func:`edge_exit_code`) and ``metrics_port`` (the port served, or ``None``)."""
    sink = AnswerSink(settings.show_answers, settings.answers_file, on_fault=runtime.record_fault)
    metrics = EdgeMetrics(runtime, settings.metrics_port, settings.metrics_addr) if settings.metrics_port else None
    truth = TruthScore(Path(settings.source[4:].partition("#")[0])) if settings.source.startswith("bag:") else None
    listeners = [sink] + ([metrics.observe] if metrics is not None else []) + ([truth] if truth else [])
    runtime.answer_listeners.extend(listeners)
    status = StatusLine(runtime)
    if settings.status_line or settings.status_line is None and status.stream.isatty():
        status.start()
    if metrics is not None:
        log.info("serving Prometheus metrics on %s:%d/metrics", settings.metrics_addr, metrics.port)
    try:
        report = _replay(runtime, settings, stop)
    finally:
        status.stop()
        for listener in listeners:
            runtime.answer_listeners.remove(listener)
        sink.close()
        if metrics is not None:
            metrics.close()
    recording = settings.source.startswith(("bag:", "realsense:")) and settings.source != "realsense:"
    cloud = runtime.cloud
    scored = truth.report() if truth is not None else {}
    if scored:
        log.info("accuracy on the bag's ground truth: %.1f over %d answers (%s)", scored["accuracy"],
                 scored["scored"], ", ".join(f"v{v}: {s['accuracy']:.1f} on {s['answers']}"
                                            for v, s in scored["by_version"].items()))  # fmt: skip
    return {**report, "cloud_expected": cloud is not None, "recording": recording,
            "cloud_endpoint": None if cloud is None else cloud.endpoint,
            "metrics_port": None if metrics is None else metrics.port, "ground_truth": scored}  # fmt: skip


def _replay(runtime: EdgeRuntime, settings: ReplaySettings, stop: threading.Event) -> dict:
    if settings.source.startswith("ros:"):
        from cdcca.edge.dds_port import DdsEdgeSettings, run_dds_edge

        runtime.config.prompts = tuple(settings.prompts)
        runtime.config.ask_rate_hz = settings.rate_hz or 1.0
        runtime.config.batch_size = settings.batch_size
        started, start_version = time.monotonic(), runtime.backend.version
        stats = run_dds_edge(runtime, settings.source[4:], stop, DdsEdgeSettings())
        # a camera's queries are the prompts answered about its frames (the summary reads them as a replay's)
        return {"queries": stats["answers"] + stats["failed_answers"], "seconds": time.monotonic() - started,
                "start_version": start_version, "updates_waited_for": 0, **stats}  # fmt: skip
    runtime.start()
    started, start_version = time.monotonic(), runtime.backend.version
    batch, done = [], 0
    first_stamp_ns = None
    for query in open_source(settings.source, settings.prompts, on_fault=runtime.record_fault):
        if stop.is_set():
            break
        if query.stamp_ns is not None and settings.speed > 0:  # recorded rate x speed, as ros2 bag play --rate
            first_stamp_ns = query.stamp_ns if first_stamp_ns is None else first_stamp_ns
            due = started + (query.stamp_ns - first_stamp_ns) / 1e9 / settings.speed
            if due > time.monotonic() and batch:  # answer what was recorded before waiting for the next frame
                runtime.ask([q.image for q in batch], [q.prompt for q in batch], [q.sample_id for q in batch])
                done += len(batch)
                batch = []
            if stop.wait(max(0.0, due - time.monotonic())):
                break
        batch.append(query)
        if len(batch) < settings.batch_size:
            continue
        runtime.ask([q.image for q in batch], [q.prompt for q in batch], [q.sample_id for q in batch])
        done += len(batch)
        batch = []
        if settings.rate_hz > 0:  # pace like a camera: never ahead of rate_hz queries per second
            stop.wait(max(0.0, started + done / settings.rate_hz - time.monotonic()))
    if batch and not stop.is_set():
        runtime.ask([q.image for q in batch], [q.prompt for q in batch], [q.sample_id for q in batch])
        done += len(batch)
    log.info("source finished after %d queries in %.1f s", done, time.monotonic() - started)
    _linger(runtime, settings, stop, start_version)
    return {"queries": done, "seconds": time.monotonic() - started, "start_version": start_version,
            "updates_waited_for": settings.wait_updates, **runtime.stats()}


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` so the process shuts down cleanly (queue and adapter state are durable)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
