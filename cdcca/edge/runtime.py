"""The robot's runtime: answer, select what to upload, take updates, and keep answering whatever the link does.

One :class:`EdgeRuntime` per robot (Algorithm 1 of Wang et al., CVPR 2024, device side):

1. **Answer** every prompt about its frame with the student (a :class:`~cdcca.edge.backend.EdgeBackend`).
2. **UTS** on every answer: stage 1 on the answer entropy, stage 2 (MC-dropout token variance on the frozen
   encoder) for the samples stage 1 keeps; kept tokens are packed into ``UtsTokens``. An ONNX Runtime backend
   scores with its own graphs (``backend.token_sampler``, :mod:`cdcca.edge.onnx_uts`), so a robot on it runs
   without torch (issue 19); otherwise the torch student's encoder scores (:class:`cdcca.uts.UncertaintyTokenSampler`).
3. **Uplink**: each frame with selected samples goes into the durable :class:`~cdcca.edge.uplink.UplinkQueue` as
   one ``UtsTokens`` (its kept tokens once, every uncertain prompt about it) and is sent until the cloud
   acknowledges it; with the cloud unreachable the queue fills (bounded, lowest
   uncertainty dropped) and answering is unaffected.
4. **Downlink**: a ``WeightDelta`` is verified and hot-swapped by the backend off the answering thread;
   the resulting ``AdapterStatus`` is published, and repeated as a heartbeat so the cloud knows the applied
   version even after a lost message or a restart.
5. **Health check**: a new version answers on probation (:mod:`cdcca.edge.health`); if its first answers
   are broken (non-finite entropy, empty, entropy far above the pre-swap level) the runtime rolls it back by
   itself and publishes ROLLED_BACK with the reason, so the cloud stops offering it.

The runtime owns the latest camera frame, the prompt queue, the sample ids and **the one loop** (a loop
thread for the link's duties, an answering worker woken by prompts). It talks to the outside through **one
port**: anything with ``publish(topic, cdr_bytes)`` for the short topic names of
:data:`cdcca.wire.topics.LINK_TOPICS`; what arrives is handed to :meth:`on_camera`, :meth:`on_prompt`,
:meth:`on_weight_delta` and :meth:`on_ack` as CDR bytes or decoded messages. The Zenoh link
(:class:`~cdcca.edge.ports.ZenohPort`), the rclpy node (``ros2_ws/src/cdcca_edge``) and the raw DDS participant
(:mod:`cdcca.edge.dds_port`) are thin implementations of that port.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cdcca import wire
from cdcca.edge.adapter_state import rejection_kind
from cdcca.edge.backend import EdgeBackend
from cdcca.edge.frames import LatestFrame, NoFrameError, frame_of_request
from cdcca.edge.health import RECORD_FILE, HealthCheck, HealthConfig
from cdcca.edge.sources import DEFAULT_PROMPTS
from cdcca.edge.uplink import StaleAck, UplinkQueue, UplinkWriteError
from cdcca.envelope import AckRejected, TrustStore, verify_ack
from cdcca.uts_config import FramePrompt, UTSConfig, as_numpy, by_frame, pack_frame, uploaded
from cdcca.wire.topics import DIAGNOSTICS, ROBOT_ID, ROBOT_ID_RULE

if TYPE_CHECKING:
    from cdcca.models.mllm import MLLM

log = logging.getLogger(__name__)


class Port(Protocol):
    """Where the runtime's messages go: ``publish(topic, data)`` with a short topic name of
    :data:`cdcca.wire.topics.LINK_TOPICS` and the message's CDR bytes."""

    def publish(self, topic: str, data: bytes) -> None: ...


@dataclass
class EdgeConfig:
    """Settings of one robot's runtime.

    Args:
        robot_id: this robot's name: UtsTokens.robot_id, the Zenoh key prefix <robot_id>/cdcca/<topic> and the
            zenoh-bridge-ros2dds namespace.
        state_dir: where the uplink queue and the adapter state persist.
        queue_capacity: the most uncertain samples waiting for the cloud; beyond it the least uncertain is dropped.
        resend_after_s: resend an uplink sample not acknowledged (UtsAck) within this time.
        pump_every_s: how often due uplink samples are published.
        heartbeat_every_s: how often the current AdapterStatus is repeated.
        batch_size: prompts answered together in one forward pass.
        max_frame_age_s: prompts are answered only about a frame received at most this long ago (0: any age).
        prompt_capacity: prompts waiting at most; beyond it the oldest is dropped and counted.
        prompts: prompts asked about the latest frame every 1/ask_rate_hz s without anyone sending them.
        ask_rate_hz: how often the prompts are asked; 0: never, answer only prompts that arrive and Ask calls.
        uts: UTS settings.
        health: when a swapped-in adapter version is kept or rolled back (the post-update health check).
        diagnostics_every_s: how often the robot's status (``diagnostic_msgs/DiagnosticArray``) goes out on the
            link topic ``diagnostics``, for ports that carry it; 0: never.
        log_every_s: how often acknowledged uploads are summed up in the log (one INFO line, not one per sample).
        cloud_warn_after_s: with a link, warn when no cloud was reached this long after start (see
            :class:`~cdcca.edge.observe.CloudWatch`).
    """

    robot_id: str = "r1"
    state_dir: Path = Path("edge_state")
    queue_capacity: int = 1024
    resend_after_s: float = 10.0
    pump_every_s: float = 0.1
    heartbeat_every_s: float = 2.0
    batch_size: int = 8
    max_frame_age_s: float = 2.0
    prompt_capacity: int = 256
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    ask_rate_hz: float = 0.0
    uts: UTSConfig = field(default_factory=UTSConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    diagnostics_every_s: float = 2.0
    log_every_s: float = 10.0
    cloud_warn_after_s: float = 5.0

    def __post_init__(self) -> None:
        def require(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"EdgeConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        require("robot_id", isinstance(self.robot_id, str) and bool(ROBOT_ID.fullmatch(self.robot_id)), ROBOT_ID_RULE)
        self.state_dir = Path(self.state_dir)
        self.prompts = tuple(self.prompts)
        require("queue_capacity", 1 <= self.queue_capacity <= 10**7, ">= 1 and <= 10000000")
        require("resend_after_s", self.resend_after_s > 0, "> 0")
        require("pump_every_s", 0.001 <= self.pump_every_s <= 60.0, ">= 0.001 and <= 60")
        require("heartbeat_every_s", self.heartbeat_every_s > 0, "> 0")
        require("batch_size", 1 <= self.batch_size <= 256, ">= 1 and <= 256")
        require("max_frame_age_s", self.max_frame_age_s >= 0, ">= 0")
        require("prompt_capacity", 1 <= self.prompt_capacity <= 10**6, ">= 1 and <= 1000000")
        require("prompts", bool(self.prompts) and all(isinstance(p, str) and p.strip() for p in self.prompts),
                "a non-empty list of non-empty prompts")  # fmt: skip
        require("ask_rate_hz", 0.0 <= self.ask_rate_hz <= 100.0, ">= 0 and <= 100")
        require("uts", isinstance(self.uts, UTSConfig), "a UTSConfig")
        require("health", isinstance(self.health, HealthConfig), "a HealthConfig")
        require("diagnostics_every_s", 0 <= self.diagnostics_every_s <= 3600, ">= 0 (0: off) and <= 3600")
        require("log_every_s", 0 < self.log_every_s <= 3600, "> 0 and <= 3600")
        require("cloud_warn_after_s", 0 < self.cloud_warn_after_s <= 3600, "> 0 and <= 3600")


@dataclass
class EdgeCounters:
    """What the runtime has done; all of it is on ``/diagnostics`` and in :meth:`EdgeRuntime.stats`."""

    answers: int = 0
    failed_answers: int = 0
    answers_published: int = 0
    selected: int = 0
    frames: int = 0
    prompts: int = 0
    prompts_dropped: int = 0  # no usable frame, or the prompt queue overflowed
    malformed: int = 0  # undecodable CDR on an input
    deltas_received: int = 0
    deltas_applied: int = 0
    deltas_rejected: int = 0
    deltas_rejected_reasons: dict[str, int] = field(default_factory=dict)  # kind (see rejection_kind) -> count
    deltas_duplicate: int = 0  # the version already running (a latched topic delivers it again): ignored
    deltas_foreign: int = 0  # addressed to another robot on a shared graph: ignored
    acks_foreign: int = 0  # addressed to another robot on a shared graph: ignored
    acks_accepted: int = 0  # signed by a trusted key and newer than the last: their samples deleted
    acks_rejected: int = 0  # not signed by a trusted key, malformed or replayed: nothing deleted
    acks_rejected_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count (see AckRejected)
    statuses_published: int = 0
    uplink_published: int = 0
    uplink_bytes: int = 0
    publish_errors: int = 0
    health_passed: int = 0  # versions marked good after their first answers
    health_rollbacks: int = 0  # versions rolled back by the health check
    faults: dict[str, int] = field(default_factory=dict)  # kind -> runtime faults logged, counted and skipped


STOP_WAIT_S = 60.0  # how long stop() waits for each loop thread (a batch in flight finishes first)
PUMP_RETRY_S = 0.5  # the first wait before publishing again after the link refused an upload (then doubling)


class EdgeRuntime:
    """Answers, UTS, the durable uplink and hot-swapped updates for one robot, behind one port.

    Args:
        backend: what answers (torch or ONNX Runtime) and applies deltas.
        encoder_owner: a torch student whose frozen vision encoder UTS stage 2 runs on; ``None`` for a backend
            with its own ``token_sampler(config)`` (ONNX Runtime), which is then used whether or not one is given.
        config: runtime settings.
        port: where messages go (see the module doc); ``None`` runs offline (the queue still fills). A port
            with ``attach(runtime)`` is attached, so it can hand over what arrives.
        clock: monotonic seconds (frame ages, answer rate).
        trust: the cloud's keys a ``UtsAck`` must be signed with (the ones deltas are checked against); default:
            the backend's (``backend.trust``, or ``backend.slot.trust``). Without one every ack is refused.
    """

    def __init__(self, backend: EdgeBackend, encoder_owner: MLLM | None, config: EdgeConfig,
                 port: Port | None = None, clock: Callable[[], float] = time.monotonic,
                 trust: TrustStore | None = None) -> None:  # fmt: skip
        from cdcca.edge.diagnostics import AnswerMeter

        self.backend, self.config, self.encoder_owner = backend, config, encoder_owner
        self.sampler, self.sampler_on_backend = self._token_sampler(backend, encoder_owner, config.uts)
        self.uplink = UplinkQueue(Path(config.state_dir) / "uplink.sqlite", config.queue_capacity)
        self.counters = EdgeCounters()
        if trust is None:  # the keys the backend checks deltas against
            trust = getattr(backend, "trust", None) or getattr(getattr(backend, "slot", None), "trust", None)
        self.trust = trust
        self.frame = LatestFrame(clock)
        self.meter = AnswerMeter(clock=clock)
        adapter_dir = getattr(backend, "state_dir", None)  # a backend that keeps no adapter state has none
        record = None if adapter_dir is None else Path(adapter_dir) / RECORD_FILE  # beside the adapter state
        self.health = HealthCheck.resume(config.health, backend.version, record)
        self._clock = clock
        self._pump_retry_at, self._pump_backoff_s = 0.0, PUMP_RETRY_S  # after the link refused an upload
        self._publish_failing: set[str] = set()  # topics whose last publish failed (logged once per outage)
        self._status_lock = threading.RLock()  # an adapter change and its AdapterStatus, in order (publish_status)
        self._deltas: queue.Queue = queue.Queue()
        self._prompts: deque[str] = deque()
        self._wake = threading.Condition()  # prompts arrived, a first frame arrived, or stop
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._answer_lock = threading.Lock()  # UTS keeps a sliding window; one batch at a time
        self._ids = itertools.count()
        self._boot_ns = time.time_ns()  # sample ids stay unique across restarts and replays of one bag
        self.cloud = None  # a cdcca.edge.observe.CloudWatch when a link to the cloud is known
        self.answer_listeners: list[Callable[[list], None]] = []  # each batch of Answer messages, after publishing
        self._acked_since_log = 0
        self._diagnostics = None  # EdgeDiagnostics of publish_diagnostics, made on first use
        self.port: Port | None = None
        self.folder_lock = None  # a cdcca.paths.FolderLock on config.state_dir, when build_runtime took one
        if port is not None:
            self.connect(port)

    @staticmethod
    def _token_sampler(backend: EdgeBackend, encoder_owner: MLLM | None, config: UTSConfig) -> tuple[Any, bool]:
        """UTS for this robot and whether it is the backend's own: ``backend.token_sampler(config)`` when the backend
        has one (scores its answers' ``uts_front``, no torch), else the torch sampler on ``encoder_owner``."""
        from cdcca.edge.onnx_model import OnnxModelMismatch

        make = getattr(backend, "token_sampler", None)
        if make is not None:
            try:
                return make(config), True
            except OnnxModelMismatch:  # an export without a UTS graph: the torch encoder scores, if there is one
                if encoder_owner is None:
                    raise
                log.warning("the ONNX export has no UTS graph; UTS stage 2 runs on the torch student's encoder")
        if encoder_owner is None:
            raise ValueError(f"the {getattr(backend, 'name', 'given')} backend has no token sampler of its own; "
                             "pass the torch student as encoder_owner for UTS")  # fmt: skip
        from cdcca.uts import UncertaintyTokenSampler

        return UncertaintyTokenSampler(encoder_owner, config), False

    def connect(self, port: Port | None) -> None:
        """Send through ``port`` from now on (``None``: nowhere; a node detaches before it drops its publishers)."""
        if port is not None and hasattr(port, "attach"):
            port.attach(self)
        self.port = port

    # ---------------------------------------------------------------------------------------- inputs
    def _decode(self, type_name: str, data: Any) -> Any | None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return data  # already a message
        try:
            return wire.decode(type_name, data)
        except wire.WireError as err:
            self.counters.malformed += 1
            log.warning("dropped a malformed %s: %s", type_name, err)
            return None

    def on_camera(self, data: Any, type_name: str = wire.IMAGE) -> None:
        """A camera message (CDR bytes or decoded ``Image``/``CompressedImage``) became the latest frame."""
        msg = self._decode(type_name, data)
        if msg is None:
            return
        first = self.frame.received == 0
        self.frame.update(msg)
        self.counters.frames += 1
        if first and self._prompts:  # prompts were waiting for a camera that was starting
            with self._wake:
                self._wake.notify_all()

    def on_prompt(self, data: Any) -> None:
        """A prompt (text, a ``std_msgs/String`` or its CDR bytes), answered about the latest frame."""
        if not isinstance(data, str):
            msg = self._decode(wire.STRING, data)
            if msg is None:
                return
            data = msg.data
        if not data.strip():
            return
        with self._wake:
            if len(self._prompts) >= self.config.prompt_capacity:
                self._prompts.popleft()
                self.counters.prompts_dropped += 1
                log.warning("prompt queue full (%d): dropped the oldest prompt", self.config.prompt_capacity)
            self._prompts.append(data)
            self.counters.prompts += 1
            self._wake.notify_all()

    def on_weight_delta(self, data: Any) -> bool:
        """Queue a ``WeightDelta`` for the loop (applied off the answering thread); returns whether it was ours."""
        msg = self._decode(wire.WEIGHT_DELTA, data)
        if msg is None:
            return False
        if msg.robot_id != self.config.robot_id:  # several robots on one graph: not an error
            self.counters.deltas_foreign += 1
            log.debug("ignored a WeightDelta for robot %r", msg.robot_id)
            return False
        self._deltas.put(msg)
        return True

    def on_ack(self, data: Any) -> int:
        """Drop acknowledged samples from the durable uplink, if the cloud signed the ack (a trusted key, not
        revoked) and it is newer than the last accepted (no replay, also across restarts); returns how many ids
        it named (0 for an ack refused: counted by reason, logged, nothing deleted)."""
        msg = self._decode(wire.UTS_ACK, data)
        if msg is None:
            return 0
        if msg.robot_id != self.config.robot_id:  # several robots on one graph: not an attack
            self.counters.acks_foreign += 1
            return 0
        try:
            sequence, ids = verify_ack(msg, trust=self.trust, robot_id=self.config.robot_id)
            self.uplink.ack(ids, sequence=sequence)
        except AckRejected as err:
            self._refuse_ack(err.reason, str(err))
            return 0
        except StaleAck as err:
            self._refuse_ack("replayed", str(err))
            return 0
        except UplinkWriteError as err:
            self.record_fault("uplink_disk_full" if err.disk_full else "uplink_write", str(err))
            return 0
        self.counters.acks_accepted += 1
        self._acked_since_log += len(ids)
        if self.cloud is not None:
            self.cloud.heard("ack")
        return len(ids)

    def _refuse_ack(self, reason: str, detail: str) -> None:
        counters = self.counters
        counters.acks_rejected += 1
        reasons = counters.acks_rejected_reasons  # replaced, not mutated: stats() may be copying it meanwhile
        counters.acks_rejected_reasons = {**reasons, reason: reasons.get(reason, 0) + 1}
        count = counters.acks_rejected_reasons[reason]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th... of a reason: a flood cannot flood the log
            log.warning("refused a UtsAck (%s, %d so far): %s", reason, count, detail)

    def record_fault(self, kind: str, detail: str) -> None:
        """A runtime fault that was skipped (a bad image, a broken bag message, a full disk under the uplink queue):
        counted under ``kind`` in ``counters.faults`` and logged at the 1st, 2nd, 4th, 8th... of its kind, so a
        fault on every frame cannot flood the log. Answering continues (ARCHITECTURE.md: bad input gets a logged
        rejection, never a crash of the runtime)."""
        counters = self.counters
        faults = counters.faults  # replaced, not mutated: stats() may be copying it meanwhile
        counters.faults = {**faults, kind: faults.get(kind, 0) + 1}
        count = counters.faults[kind]
        if count & (count - 1) == 0:
            log.warning("%s (%s: %d so far); answers continue", detail, kind, count)

    def pending(self) -> int:
        """Prompts waiting to be answered."""
        return len(self._prompts)

    # ----------------------------------------------------------------------------------- answering
    def _sample_ids(self, count: int) -> list[str]:
        return [f"{self.config.robot_id}-{self._boot_ns}-{next(self._ids)}" for _ in range(count)]

    def ask(self, images: Sequence[np.ndarray], prompts: Sequence[str], sample_ids: Sequence[str] | None = None,
            stamp_ns: int | None = None, frame_id: str = "") -> list:  # fmt: skip
        """Answer a batch, run UTS on it, queue the uncertain samples, publish and return the ``Answer`` messages.

        A failure inside the model is logged and counted, and never raises, so a caller's loop keeps serving. A batch
        that fails is answered again one prompt at a time, so one prompt the model cannot take (say, longer than its
        positions) costs only its own answer: that prompt gets an empty answer with NaN entropy. Such a failure is
        not a verdict on the adapter: only answers the model gave reach the health check (a broken adapter shows as
        non-finite entropies, not as exceptions: a delta with non-finite values is rejected before it applies).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        stamp = time.time_ns() if stamp_ns is None else stamp_ns
        ids = self._sample_ids(len(prompts)) if sample_ids is None else list(sample_ids)
        started = time.perf_counter()
        with self._answer_lock:
            version = self.backend.version  # what a failed answer is tagged with (a swap may come meanwhile)
            try:
                result = self.backend.answer(images, prompts)
            except Exception:
                if len(prompts) == 1:
                    return [self._failed(ids[0], prompts[0], stamp, frame_id, version)]
                result = None
            else:
                latency_ms = 1000 * (time.perf_counter() - started) / max(1, len(prompts))
                self.counters.answers += len(prompts)
                try:
                    self._select(images, prompts, ids, result, stamp)
                except Exception as err:  # the answers are made: they are published whatever UTS does
                    log.debug("UTS failed", exc_info=True)
                    self.record_fault("uts", f"selecting samples for the cloud failed: {type(err).__name__}: {err}")
        if result is None:  # outside the lock: each of these answers takes it
            log.warning("answering a batch of %d failed; answering its prompts one at a time", len(prompts))
            return [answer for i in range(len(prompts))
                    for answer in self.ask(images[i : i + 1], prompts[i : i + 1], ids[i : i + 1], stamp, frame_id)]
        answers = [
            self._answer_msg(ids[i], prompts[i], result.texts[i], float(result.sample_entropy[i]),
                             result.adapter_version, latency_ms, stamp, frame_id)
            for i in range(len(prompts))
        ]  # fmt: skip
        self.meter.record(latency_ms, len(answers))
        self._publish_answers(answers)
        self._check_health(result.adapter_version, result.texts, result.sample_entropy.tolist())
        return answers

    def _failed(self, sample_id: str, prompt: str, stamp: int, frame_id: str, version: int):
        """The published empty answer (NaN entropy) of a prompt the model failed on, logged and counted."""
        log.exception("answering the prompt %r failed", prompt if len(prompt) <= 80 else prompt[:77] + "...")
        self.counters.failed_answers += 1
        answer = self._answer_msg(sample_id, prompt, "", math.nan, version, 0.0, stamp, frame_id)
        self._publish_answers([answer])
        return answer

    def _check_health(self, version: int, texts: Sequence[str], entropies: Sequence[float]) -> None:
        """Feed the health check; a version on probation that fails is rolled back and ROLLED_BACK published."""
        passed = self.health.passed
        reason = self.health.observe(version, texts, entropies)
        if self.health.passed > passed:
            self.counters.health_passed += 1
            log.info("adapter v%d passed its health check", version)
        if reason is None:
            return
        log.error("adapter v%d failed its health check: %s; rolling back", version, reason)
        with self._status_lock:  # no APPLIED or heartbeat of the old state can follow this status
            status = self.backend.rollback(f"health check: {reason}", only_version=version)
            if status is None:  # a newer version was applied meanwhile; it is on probation itself
                return
            if status.state == wire.ROLLED_BACK:
                self.counters.health_rollbacks += 1
                if status.version != self.health.good:  # back to a version never marked good (v3 replaced it first)
                    self.health.start(status.version)
            else:  # nothing to roll back to (the last rollback went back already): the cloud hears why
                log.error("cannot roll back v%d: %s", version, status.reason)
            self.publish_status(status)

    def _publish_answers(self, answers: list) -> None:
        for msg in answers:
            if self._send("answer", wire.encode(msg)):
                self.counters.answers_published += 1
        for listener in list(self.answer_listeners):
            try:
                listener(answers)
            except Exception as err:  # a printer or a metrics hook must not stop answering
                self.record_fault("answer_listener", f"answer listener {listener!r} failed: {err}")

    def _answer_msg(self, sample_id, prompt, answer, entropy, version, latency_ms, stamp, frame_id):
        return wire.new(wire.ANSWER, header=wire.header(stamp, frame_id), sample_id=sample_id, prompt=prompt,
                        answer=answer, entropy=entropy, adapter_version=int(version),
                        latency_ms=latency_ms)  # fmt: skip

    def _stage_two(self, images, result, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(K, N) MC-dropout variance and kept-token mask of the samples ``index`` of a batch (UTS stage 2)."""
        if self.sampler_on_backend:  # from the encoder state the backend answered with (issue 19: no torch)
            return self.sampler.stage_two(np.asarray(result.uts_front)[index], np.asarray(result.visual_tokens)[index])
        import torch

        with torch.inference_mode():
            variance, keep = self.sampler.stage_two(self.encoder_owner.preprocess([images[i] for i in index]))
        return as_numpy(variance), as_numpy(keep)

    def _select(self, images, prompts, ids, result, stamp: int) -> None:
        """UTS on an answered batch: stage 2 once per frame with an uncertain prompt, and one ``UtsTokens`` per such
        frame carrying every uncertain prompt about it (the frame's tokens travel once)."""
        keep = as_numpy(self.sampler.keep_samples(as_numpy(result.sample_entropy), prompts)).astype(bool)
        if not keep.any():
            return
        frames = list(images)  # held while grouping, so equal id() means the same array (views of a 4-D batch differ)
        keys = [id(frame) for frame in frames]
        groups = by_frame(uploaded(keep.tolist(), keys, self.config.uts.upload_prompts), keys)
        variance, tokens_kept = self._stage_two(images, result, [group[0] for group in groups])
        for row, group in enumerate(groups):
            asked = [FramePrompt(ids[i], prompts[i], result.texts[i], float(result.sample_entropy[i])) for i in group]
            first = group[0]
            msg = pack_frame(result.visual_tokens[first], tokens_kept[row], variance[row], asked,
                             robot_id=self.config.robot_id, adapter_version=result.adapter_version,
                             encoding=self.config.uts.encoding, stamp_ns=stamp)  # fmt: skip
            priority = max(e if math.isfinite(e) else math.inf for e in (a.sample_entropy for a in asked))
            try:  # queued by its most uncertain prompt (a broken one first): the queue drops the least uncertain
                dropped = self.uplink.put(ids[first], priority, wire.encode(msg))
            except UplinkWriteError as err:  # the upload is lost, counted; what is queued stays queued
                kind = "uplink_disk_full" if err.disk_full else "uplink_write"
                self.record_fault(kind, f"{err}; the samples already queued are kept")
                continue
            if dropped is not None:
                log.info("uplink queue full: dropped the least uncertain upload %s", dropped)
            self.counters.selected += len(group)

    def answer_pending(self) -> list:
        """Answer up to ``batch_size`` waiting prompts about the latest frame (published; also returned).

        Without a usable frame the prompts stay queued while no frame was ever received (a camera that is
        starting) and are dropped (counted, logged) when the latest frame is too old or unreadable.
        """
        with self._wake:
            if not self._prompts:
                return []
            try:
                rgb, stamp, frame_id = self.frame.get(self.config.max_frame_age_s)
            except NoFrameError as err:
                if self.frame.received == 0:
                    return []
                self.counters.prompts_dropped += len(self._prompts)
                log.warning("dropped %d prompt(s): %s", len(self._prompts), err)
                self._prompts.clear()
                return []
            batch = [self._prompts.popleft() for _ in range(min(self.config.batch_size, len(self._prompts)))]
        return self.ask([rgb] * len(batch), batch, stamp_ns=stamp, frame_id=frame_id)

    def ask_about_latest(self, prompts: Sequence[str] | None = None) -> list:
        """Ask ``prompts`` (default: ``config.prompts``) about the latest frame now; [] without a usable frame."""
        prompts = list(self.config.prompts if prompts is None else prompts)
        try:
            rgb, stamp, frame_id = self.frame.get(self.config.max_frame_age_s)
        except NoFrameError:
            return []
        size = self.config.batch_size
        return [a for i in range(0, len(prompts), size)
                for a in self.ask([rgb] * len(prompts[i:i + size]), prompts[i:i + size], stamp_ns=stamp,
                                  frame_id=frame_id)]  # fmt: skip

    def ask_one(self, prompt: str, image_msg: Any = None) -> Any:
        """The ``Ask`` service: answer ``prompt`` about ``image_msg`` (when it has width > 0) or the latest frame.

        Raises :class:`~cdcca.edge.frames.NoFrameError` when there is nothing to answer about, ``ValueError``
        for an empty prompt.
        """
        if not prompt.strip():
            raise ValueError("Ask.prompt is empty")
        rgb, stamp, frame_id = frame_of_request(image_msg) or self.frame.get(self.config.max_frame_age_s)
        return self.ask([rgb], [prompt], stamp_ns=stamp, frame_id=frame_id)[0]

    # ------------------------------------------------------------------------------------- the port
    def _send(self, topic: str, data: bytes) -> bool:
        port = self.port
        if port is None:
            return False
        try:
            port.publish(topic, data)
        except Exception as err:  # a closed session or a dropped publisher must not stop the robot
            self.counters.publish_errors += 1
            # once per outage of each topic (a link still looking for its router refuses every answer it is given)
            if topic in self._publish_failing:
                log.debug("publishing %s failed: %s", topic, err)
            else:
                log.warning("publishing %s failed: %s (logged again once it has worked)", topic, err)
                self._publish_failing.add(topic)
            return False
        if topic in self._publish_failing:
            self._publish_failing.discard(topic)
            log.info("publishing %s works again", topic)
        return True

    def pump(self) -> int:
        """Publish the uplink samples that are due (unchanged CDR from the durable queue); returns how many.

        Uploads the link refuses go back to the queue, due again; the next try waits 0.5 s, doubling while the link
        keeps refusing, up to ``resend_after_s`` (a link that is down costs no log line and disk write per pump)."""
        if self.port is None or self._clock() < self._pump_retry_at:
            return 0
        sent = 0
        try:
            due = self.uplink.due(self.config.resend_after_s)
        except UplinkWriteError as err:
            self.record_fault("uplink_disk_full" if err.disk_full else "uplink_write", str(err))
            return 0
        for index, (_, payload) in enumerate(due):
            if not self._send("uts_tokens", payload):
                self.uplink.unsend([sample_id for sample_id, _ in due[index:]])  # due again at the next try
                self._pump_retry_at = self._clock() + self._pump_backoff_s
                self._pump_backoff_s = min(2 * self._pump_backoff_s, max(PUMP_RETRY_S, self.config.resend_after_s))
                return sent
            self._pump_backoff_s = PUMP_RETRY_S
            self.counters.uplink_published += 1
            self.counters.uplink_bytes += len(payload)
            sent += 1
        return sent

    def apply(self, msg) -> Any | None:
        """Verify and hot-swap one ``WeightDelta``; publishes and returns the ``AdapterStatus`` (``None`` for the
        version already running, which a latched topic delivers again after a reconnect)."""
        self.counters.deltas_received += 1
        if int(msg.version) == self.backend.version and int(msg.version) > 0:
            self.counters.deltas_duplicate += 1
            log.debug("WeightDelta version %d is already applied", msg.version)
            return None
        with self._status_lock:  # a rollback's status cannot overtake this one
            status = self.backend.receive(msg)  # the backend logs why it rejected a delta
            if status.state == wire.REJECTED:
                self.counters.deltas_rejected += 1
                kind, reasons = rejection_kind(status.reason), self.counters.deltas_rejected_reasons
                self.counters.deltas_rejected_reasons = {**reasons, kind: reasons.get(kind, 0) + 1}
            else:
                self.counters.deltas_applied += 1
                self.health.start(status.version)
                based = "keyframe" if msg.keyframe else f"on v{msg.base_version}"
                log.info("applied adapter v%d from the cloud (%s delta, %d applied so far)", status.version, based,
                         self.counters.deltas_applied)  # fmt: skip
            self.publish_status(status)
        return status

    def heartbeat(self):
        """The current version as an APPLIED ``AdapterStatus``: repeated so the cloud learns what this robot runs
        even after a lost message or a restart."""
        return wire.new(wire.ADAPTER_STATUS, header=wire.header(time.time_ns()), robot_id=self.config.robot_id,
                        version=self.backend.version, state=wire.APPLIED, reason="heartbeat")  # fmt: skip

    def publish_status(self, status=None) -> None:
        """Publish ``status`` (default: :meth:`heartbeat`). Statuses are made and published under one lock, so the
        cloud hears them in the order the adapter changed (a heartbeat read before a rollback cannot follow the
        ROLLED_BACK, nor an APPLIED the rollback of its own version)."""
        with self._status_lock:
            if self._send("adapter_status", wire.encode(status if status is not None else self.heartbeat())):
                self.counters.statuses_published += 1

    def publish_diagnostics(self) -> bool:
        """Publish the robot's status as a ``diagnostic_msgs/DiagnosticArray`` on the link topic ``diagnostics``
        (what ``cdcca status`` reads), if the port carries that topic; returns whether it was sent."""
        from cdcca.edge.diagnostics import EdgeDiagnostics, diagnostic_array

        port = self.port
        if port is None or DIAGNOSTICS not in getattr(port, "topics", ()):
            return False
        if self._diagnostics is None:
            self._diagnostics = EdgeDiagnostics(self)
        return self._send(DIAGNOSTICS, wire.encode(diagnostic_array(self._diagnostics.report(), self.config.robot_id)))

    def log_uplink(self, period_s: float) -> None:
        """One INFO line for the uploads the cloud acknowledged in the last ``period_s`` (nothing if none)."""
        acked, self._acked_since_log = self._acked_since_log, 0
        if acked:
            stats = self.uplink.stats()
            log.info("cloud acknowledged %d uploads in the last %.0f s (%d acknowledged in all, %d queued)", acked,
                     period_s, stats.acked, stats.queued)  # fmt: skip

    def process_deltas(self, timeout: float = 0.0) -> int:
        """Apply every ``WeightDelta`` that arrived (waiting up to ``timeout`` for the first); returns how many."""
        done = 0
        while True:
            try:
                msg = self._deltas.get(timeout=timeout if done == 0 else 0.0)
            except queue.Empty:
                return done
            self.apply(msg)
            done += 1

    # ------------------------------------------------------------------------------------ the loop
    def start(self) -> EdgeRuntime:
        """Run the loop: a thread for the link (deltas, uplink, heartbeat) and the answering worker (prompts
        that arrive, ``prompts`` every 1/``ask_rate_hz`` s). Restartable after :meth:`stop`."""
        if not self._threads or self._stop.is_set():
            # each run has its own stop event: a loop of an earlier run that outlived stop() (a publish that blocked
            # for a minute) ends once it is unblocked instead of seeing a cleared event and running on
            stop = self._stop = threading.Event()
            self._threads = [threading.Thread(target=self._link_loop, args=(stop,),
                                              name=f"edge-link-{self.config.robot_id}", daemon=True),
                             threading.Thread(target=self._answer_loop, args=(stop,),
                                              name=f"edge-answer-{self.config.robot_id}", daemon=True)]  # fmt: skip
            for thread in self._threads:
                thread.start()
        return self

    def _link_loop(self, stop: threading.Event) -> None:
        next_pump = next_heartbeat = next_diagnostics = 0.0
        next_log = self._clock() + self.config.log_every_s
        while not stop.is_set():
            try:
                self.process_deltas(timeout=min(self.config.pump_every_s, self.config.heartbeat_every_s))
                now = self._clock()
                if now >= next_pump:
                    self.pump()
                    next_pump = now + self.config.pump_every_s
                if now >= next_heartbeat:
                    self.publish_status()
                    next_heartbeat = now + self.config.heartbeat_every_s
                if self.cloud is not None:
                    self.cloud.check()
                if self.config.diagnostics_every_s > 0 and now >= next_diagnostics:
                    self.publish_diagnostics()
                    next_diagnostics = now + self.config.diagnostics_every_s
                if now >= next_log:
                    self.log_uplink(now - next_log + self.config.log_every_s)
                    next_log = now + self.config.log_every_s
            except Exception:  # keep the robot alive; the cause is in the log
                log.exception("edge link step failed")
                stop.wait(0.1)

    def _answer_loop(self, stop: threading.Event) -> None:
        next_ask = self._clock()
        while not stop.is_set():
            try:
                rate = self.config.ask_rate_hz
                with self._wake:
                    while not stop.is_set():
                        if self._prompts and self.frame.received:
                            break
                        wait = None if rate <= 0 else next_ask - self._clock()
                        if wait is not None and wait <= 0:
                            break
                        self._wake.wait(wait)  # idle: no polling (issue 14: an idle node used 6.5 % of a core)
                if stop.is_set():
                    return
                while self._prompts and not stop.is_set() and self.answer_pending():
                    pass
                if rate > 0 and self._clock() >= next_ask:
                    self.ask_about_latest()
                    next_ask = self._clock() + 1.0 / rate
            except Exception:
                log.exception("answering failed")
                stop.wait(0.1)

    def stop(self) -> None:
        """Stop the loop; a batch in flight finishes (and is published) first."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        others = [thread for thread in self._threads if thread is not threading.current_thread()]
        for thread in others:  # (stop() from an answer listener: its own loop ends by itself)
            thread.join(timeout=STOP_WAIT_S)
        alive = [thread.name for thread in others if thread.is_alive()]
        if alive:
            log.error("edge loop threads %s did not stop within %.0f s; they end once unblocked", alive, STOP_WAIT_S)
        self._threads = []

    def close(self) -> None:
        self.stop()
        try:
            self.uplink.close()
        finally:
            if self.folder_lock is not None:
                self.folder_lock.release()

    def stats(self) -> dict:
        """Counters of the runtime, the uplink queue and the port, as one flat dict."""
        report = {**vars(self.counters), "adapter_version": self.backend.version, "prompts_waiting": self.pending(),
                  "health_probation": -1 if self.health.probation is None else self.health.probation,
                  "health_record_failures": self.health.record_failures}  # fmt: skip
        report.update({f"uplink_{k}": v for k, v in vars(self.uplink.stats()).items()})
        cloud = self.cloud
        report["cloud_reached"] = bool(cloud is not None and cloud.reached)
        report["cloud_up"] = bool(cloud is not None and cloud.up)
        rejected = getattr(self.port, "rejected", None)
        if rejected is not None:
            report["rejected"] = dict(rejected)
        report["link_connected"] = bool(getattr(self.port, "connected", self.port is not None))
        report["link_connect_failures"] = int(getattr(self.port, "connect_failures", 0))
        return report
