"""What a robot's ROS 2 shell does around :class:`~cdcca.edge.runtime.EdgeRuntime`, without importing ROS.

The ``cdcca_edge`` nodes (``ros2_ws/src/cdcca_edge``) and the raw-DDS runner (:mod:`cdcca.transport.dds`) are
thin: they move bytes between their middleware and an :class:`EdgeGlue`, which holds everything worth testing
here -- the parameter schema and its validation, the latest camera frame and its conversion to RGB, the
prompt queue and batching, the ``link=None`` duties of the robot (publish the durable uplink, take
``UtsAck``, apply ``WeightDelta`` and publish ``AdapterStatus``, heartbeat) and the values reported on
``/diagnostics``.

Everything crosses this module as ROS 2 CDR bytes (:mod:`cdcca.wire`) or as decoded messages, so rclpy can
use ``raw=True`` subscriptions and publish serialized bytes (rclpy ``Publisher.publish`` accepts a
serialized message), and the DDS runner can hand over its samples unchanged.

References: ROS 2 parameters (declare with a descriptor, validate in a set-parameters callback:
docs.ros.org/en/jazzy/Concepts/Basic/About-Parameters.html), the YAML parameter file format
(``/node: ros__parameters:``, docs.ros.org/en/jazzy/How-To-Guides/Node-arguments.html), and the
``diagnostic_updater`` key/value status model (docs.ros.org/en/jazzy/p/diagnostic_updater).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdcca import wire
from cdcca.bag import CAMERA_TOPIC, PROMPT_TOPIC, ImageEncodingError, msg_to_rgb
from cdcca.edge.adapter_slot import APPLIED, REJECTED  # noqa: F401  (AdapterStatus states)
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.edge.sources import DEFAULT_PROMPTS
from cdcca.errors import CdccaError
from cdcca.paths import cache_dir, checkpoint_dir
from cdcca.transport import TOPICS
from cdcca.uts import UTSConfig

log = logging.getLogger(__name__)

NODE_NAME = "cdcca_edge"
ROS_TOPICS = {name: f"/cdcca/{name}" for name in TOPICS}  # answer, uts_tokens, uts_ack, weight_delta, adapter_status
_ROS_NAME = re.compile(r"^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")  # fully qualified or relative


class ParameterError(CdccaError, ValueError):
    """A node parameter has a wrong type or value; the message names each parameter and what it accepts."""


class NoFrameError(CdccaError, RuntimeError):
    """No usable camera frame to answer about; check that the camera topic is published (``ros2 topic hz``)."""


# --------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter.

    Args:
        name: ROS parameter name.
        default: the value ``config/edge.yaml`` ships with.
        kind: ``string``, ``integer``, ``double``, ``bool`` or ``string_array`` (the ROS parameter type).
        description: shown by ``ros2 param describe``.
        check: returns why a value is unacceptable, or ``None``.
        read_only: takes effect only at configure time (changing it at run time is refused).
    """

    name: str
    default: Any
    kind: str
    description: str
    check: Callable[[Any], str | None] = lambda _: None
    read_only: bool = True


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def _range(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[Any], str | None]:
    def check(value):
        ok = (value > low if low_open else value >= low) and value <= high
        return None if ok else f"must be {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf
                                                                                 else "")  # fmt: skip

    return check


def _topic(value: str) -> str | None:
    return None if _ROS_NAME.match(value) else "must be a ROS topic name such as /camera/camera/color/image_raw"


def _robot_id(value: str) -> str | None:
    if not value or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return "must be non-empty letters, digits and _ (it is the Zenoh key prefix and the bridge namespace)"
    return None


def _prompts(value: list) -> str | None:
    if not value or not all(isinstance(p, str) and p.strip() for p in value):
        return "must be a non-empty list of non-empty prompts"
    return None


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("robot_id", "r1", "string", "this robot's name: UtsTokens.robot_id, the Zenoh key prefix "
              "<robot_id>/cdcca/<topic> and the zenoh-bridge-ros2dds namespace", _robot_id),
    ParamSpec("checkpoints", "", "string", "directory holding student/ (cdcca pretrain output); empty: the "
              "tiny preset in the CD-CCA cache"),
    ParamSpec("trust_dir", "", "string", "trust store of the cloud's Ed25519 public keys (cdcca keys trust); "
              "empty: <cache>/trust"),
    ParamSpec("state_dir", "", "string", "durable uplink queue and adapter state; empty: <cache>/edge/<robot_id>"),
    ParamSpec("backend", "torch", "string", "what answers: torch (eager student) or onnx (cdcca export "
              "--backend onnx)", _one_of("torch", "onnx")),
    ParamSpec("threads", 0, "integer", "ONNX Runtime intra-op threads; 0: its default", _range(0, 256)),
    ParamSpec("camera_topic", CAMERA_TOPIC, "string", "sensor_msgs/Image topic (sensor-data QoS); remappable",
              _topic),
    ParamSpec("subscribe_compressed", False, "bool", "also subscribe to sensor_msgs/CompressedImage on "
              "<camera_topic>/compressed (image_transport's name)"),
    ParamSpec("prompt_topic", PROMPT_TOPIC, "string", "std_msgs/String topic of prompts answered about the "
              "latest frame", _topic),
    ParamSpec("prompts", list(DEFAULT_PROMPTS), "string_array", "prompts asked about the latest frame every "
              "1/ask_rate_hz s without anyone sending them (never empty: ROS YAML cannot type an empty list)",
              _prompts, read_only=False),
    ParamSpec("ask_rate_hz", 0.0, "double", "how often the prompts parameter is asked; 0: never, answer only "
              "prompts on prompt_topic and Ask calls", _range(0.0, 100.0)),
    ParamSpec("batch_size", 8, "integer", "prompts answered together in one forward pass", _range(1, 256),
              read_only=False),
    ParamSpec("max_frame_age_s", 2.0, "double", "prompts are answered only about a frame received at most this "
              "long ago (0: any age)", _range(0.0), read_only=False),
    ParamSpec("queue_capacity", 1024, "integer", "the most uncertain samples waiting for the cloud; beyond it the "
              "least uncertain is dropped", _range(1, 10**7)),
    ParamSpec("resend_after_s", 10.0, "double", "resend an uplink sample not acknowledged (UtsAck) within this "
              "time", _range(0.0, low_open=True)),
    ParamSpec("pump_every_s", 0.1, "double", "how often due uplink samples are published", _range(0.001, 60.0)),
    ParamSpec("heartbeat_every_s", 2.0, "double", "how often the current AdapterStatus is repeated",
              _range(0.0, low_open=True)),
    ParamSpec("diagnostics_period_s", 1.0, "double", "period of the /diagnostics report", _range(0.1, 60.0)),
    ParamSpec("uts_sample_mode", "top_fraction", "string", "UTS stage 1: top_fraction of the recent window, or "
              "threshold on the answer entropy", _one_of("top_fraction", "threshold")),
    ParamSpec("uts_entropy_threshold", 0.5, "double", "UTS stage 1 threshold, nats (threshold mode)"),
    ParamSpec("uts_sample_fraction", 0.3, "double", "UTS stage 1 fraction kept (top_fraction mode)",
              _range(0.0, 1.0, low_open=True)),
    ParamSpec("uts_token_keep_ratio", 0.25, "double", "UTS stage 2 fraction of visual tokens kept",
              _range(0.0, 1.0, low_open=True)),
    ParamSpec("uts_encoding", "int8", "string", "kept tokens on the wire: int8 or fp16", _one_of("int8", "fp16")),
)  # fmt: skip
SPECS = {spec.name: spec for spec in PARAMETERS}
_PY_TYPES = {"string": (str,), "integer": (int,), "double": (float, int), "bool": (bool,), "string_array": (list,)}


def default_parameters() -> dict[str, Any]:
    """Every parameter at its default (what ``config/edge.yaml`` holds)."""
    return {spec.name: (list(spec.default) if isinstance(spec.default, list) else spec.default) for spec in PARAMETERS}


def check_parameter(name: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or ``None`` when it is."""
    spec = SPECS.get(name)
    if spec is None:
        return f"unknown parameter {name!r}; known: {', '.join(SPECS)}"
    if isinstance(value, bool) and spec.kind != "bool" or not isinstance(value, _PY_TYPES[spec.kind]):
        return f"{name} must be a {spec.kind}, got {type(value).__name__} {value!r}"
    reason = spec.check(value)
    return None if reason is None else f"{name} {reason}, got {value!r}"


def validate_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` over the defaults, checked; raises :class:`ParameterError` listing every problem."""
    merged = default_parameters()
    merged.update(values)
    problems = [reason for name, value in merged.items() if (reason := check_parameter(name, value))]
    if problems:
        raise ParameterError("invalid cdcca_edge parameters: " + "; ".join(problems))
    for spec in PARAMETERS:  # ROS gives 1 for a double written as 1 (``-p ask_rate_hz:=1``); hand out floats
        if spec.kind == "double":
            merged[spec.name] = float(merged[spec.name])
    return merged


def read_parameter_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The ``ros__parameters`` of ``node_name`` (or of ``/**``) in a ROS 2 YAML parameter file."""
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ParameterError(f"cannot read parameter file {path}: {err}") from err
    for key in (f"/{node_name}", node_name, "/**"):
        section = (document or {}).get(key)
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            return dict(section["ros__parameters"])
    raise ParameterError(f"{path} has no '/{node_name}: ros__parameters:' section")


@dataclass
class EdgePaths:
    """Where the runtime reads its model and keeps its state (parameters resolved against the cache)."""

    checkpoints: Path
    trust_dir: Path
    state_dir: Path


def resolve_paths(params: Mapping[str, Any]) -> EdgePaths:
    """Empty path parameters mean the CD-CCA cache defaults (as ``cdcca edge``)."""
    return EdgePaths(
        checkpoints=Path(params["checkpoints"]).expanduser() if params["checkpoints"] else checkpoint_dir("tiny"),
        trust_dir=Path(params["trust_dir"]).expanduser() if params["trust_dir"] else cache_dir() / "trust",
        state_dir=(Path(params["state_dir"]).expanduser() if params["state_dir"]
                   else cache_dir() / "edge" / params["robot_id"]),
    )  # fmt: skip


def edge_config(params: Mapping[str, Any]) -> EdgeConfig:
    """The runtime settings of validated parameters."""
    uts = UTSConfig(sample_mode=params["uts_sample_mode"], entropy_threshold=float(params["uts_entropy_threshold"]),
                    sample_fraction=float(params["uts_sample_fraction"]),
                    token_keep_ratio=float(params["uts_token_keep_ratio"]),
                    encoding=params["uts_encoding"])  # fmt: skip
    return EdgeConfig(robot_id=params["robot_id"], state_dir=resolve_paths(params).state_dir,
                      queue_capacity=int(params["queue_capacity"]), resend_after_s=float(params["resend_after_s"]),
                      pump_every_s=float(params["pump_every_s"]),
                      heartbeat_every_s=float(params["heartbeat_every_s"]), uts=uts)  # fmt: skip


def build_edge_runtime(params: Mapping[str, Any], link=None) -> EdgeRuntime:
    """Configure step of the edge node: load the student (and its adapter state) for validated parameters."""
    from cdcca.edge.app import build_runtime

    paths = resolve_paths(params)
    return build_runtime(paths.checkpoints, edge_config(params), paths.trust_dir, link=link, backend=params["backend"],
                         threads=int(params["threads"]) or None)  # fmt: skip


# ------------------------------------------------------------------------------------------------- frames


class LatestFrame:
    """The newest camera message, converted to RGB only when a prompt needs it (cameras outpace prompts).

    Args:
        clock: monotonic seconds, for the frame's age (receive time, so bag replay and sim time do not matter).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._msg: Any = None
        self._received = 0.0
        self._rgb: tuple[np.ndarray, int, str] | None = None
        self.received = 0
        self.bad = 0

    def update(self, msg: Any) -> None:
        """Keep ``msg`` (a decoded ``sensor_msgs/Image`` or ``CompressedImage``, ROS or IDL object)."""
        with self._lock:
            self._msg, self._received, self._rgb = msg, self._clock(), None
            self.received += 1

    def age_s(self) -> float:
        """Seconds since the latest frame arrived (infinite before the first)."""
        with self._lock:
            return math.inf if self._msg is None else self._clock() - self._received

    def get(self, max_age_s: float = 0.0) -> tuple[np.ndarray, int, str]:
        """(RGB (H, W, 3) uint8, capture stamp ns, frame_id) of the latest frame; :class:`NoFrameError` if none
        is usable (none yet, older than ``max_age_s`` when that is > 0, or an encoding we cannot read)."""
        with self._lock:
            if self._msg is None:
                raise NoFrameError("no camera frame received yet; check the camera topic and its QoS")
            age = self._clock() - self._received
            if max_age_s > 0 and age > max_age_s:
                raise NoFrameError(f"the latest camera frame is {age:.1f} s old (max_frame_age_s={max_age_s})")
            if self._rgb is None:
                try:
                    rgb = msg_to_rgb(self._msg)
                except ImageEncodingError as err:
                    self.bad += 1
                    self._msg = None
                    raise NoFrameError(f"camera frame rejected: {err}") from err
                self._rgb = (rgb, wire.stamp_ns(self._msg.header), str(self._msg.header.frame_id))
            return self._rgb


def image_from_request(image_msg: Any) -> tuple[np.ndarray, int, str] | None:
    """The frame of an ``Ask`` request, or ``None`` when it is empty (width 0: use the latest camera frame)."""
    if image_msg is None or int(image_msg.width) == 0:
        return None
    try:
        return msg_to_rgb(image_msg), wire.stamp_ns(image_msg.header), str(image_msg.header.frame_id)
    except ImageEncodingError as err:
        raise NoFrameError(f"the request's image cannot be used: {err}") from err


# ------------------------------------------------------------------------------------------- diagnostics


@dataclass
class DiagnosticReport:
    """One ``diagnostic_msgs/DiagnosticStatus``: level (0 OK, 1 WARN, 2 ERROR), message, key/values."""

    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels


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


# ---------------------------------------------------------------------------------------------- the glue

Publish = Callable[[str, bytes], None]  # (topic name from transport.TOPICS, CDR bytes)


@dataclass
class GlueCounters:
    frames: int = 0
    prompts: int = 0
    prompts_dropped: int = 0  # no usable frame, or the prompt queue overflowed
    answers_published: int = 0
    malformed: int = 0  # undecodable CDR on a subscribed topic
    deltas_applied: int = 0
    deltas_rejected: int = 0
    acks_foreign: int = 0  # UtsAck for another robot, ignored
    uplink_published: int = 0
    uplink_bytes: int = 0
    statuses_published: int = 0
    callback_errors: int = 0  # a middleware callback raised; logged, the node keeps serving


class EdgeGlue:
    """Between a middleware (rclpy or raw DDS) and an :class:`EdgeRuntime`: frames, prompts, answers, the loop.

    Args:
        runtime: the robot's runtime.
        publish: sends CDR bytes on a topic of :data:`ROS_TOPICS` (by its short name).
        batch_size: prompts answered together.
        max_frame_age_s: answer only about a frame at most this old (0: any age).
        carry_loop: publish the uplink, status and heartbeat and take deltas/acks here; default: when the
            runtime has no Zenoh link of its own (with a link, the runtime does that itself).
        prompt_capacity: prompts waiting at most; beyond it the oldest is dropped (counted).
        clock: monotonic seconds.
    """

    def __init__(self, runtime: EdgeRuntime, publish: Publish, batch_size: int = 8, max_frame_age_s: float = 2.0,
                 carry_loop: bool | None = None, prompt_capacity: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.runtime, self.publish = runtime, publish
        self.batch_size, self.max_frame_age_s = batch_size, max_frame_age_s
        self.carry_loop = runtime.link is None if carry_loop is None else carry_loop
        self.frame = LatestFrame(clock)
        self.meter = AnswerMeter(clock=clock)
        self.counters = GlueCounters()
        self._prompts: deque[str] = deque()
        self._prompt_capacity = prompt_capacity
        self._prompt_lock = threading.Lock()
        self._ids = itertools.count()
        self._boot_ns = time.time_ns()  # sample ids stay unique across restarts and replays of one bag
        self._clock = clock
        self._next_pump = self._next_heartbeat = 0.0
        self._rejected_at_last_report = 0
        self._failed_at_last_report = 0

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
        if msg is not None:
            self.frame.update(msg)
            self.counters.frames += 1

    def on_prompt(self, data: Any) -> None:
        """A prompt: text, a ``std_msgs/String`` or its CDR bytes; answered by the next :meth:`answer_pending`."""
        if not isinstance(data, str):
            msg = self._decode(wire.STRING, data)
            if msg is None:
                return
            data = msg.data
        if not data.strip():
            return
        with self._prompt_lock:
            if len(self._prompts) >= self._prompt_capacity:
                self._prompts.popleft()
                self.counters.prompts_dropped += 1
            self._prompts.append(data)
            self.counters.prompts += 1

    def pending(self) -> int:
        return len(self._prompts)

    # --------------------------------------------------------------------------------------- answers
    def _sample_ids(self, count: int) -> list[str]:
        return [f"{self.runtime.config.robot_id}-{self._boot_ns}-{next(self._ids)}" for _ in range(count)]

    def _answer(self, rgb: np.ndarray, stamp_ns: int, frame_id: str, prompts: list[str]) -> list:
        answers = self.runtime.ask([rgb] * len(prompts), prompts, self._sample_ids(len(prompts)), stamp_ns=stamp_ns)
        for answer in answers:
            answer.header = wire.header(stamp_ns, frame_id)
        if answers and math.isfinite(answers[0].entropy):  # a failed batch has NaN entropy
            self.meter.record(float(answers[0].latency_ms), len(answers))
        for answer in answers:
            self.publish("answer", wire.encode(answer))
            self.counters.answers_published += 1
        return answers

    def answer_pending(self) -> list:
        """Answer up to ``batch_size`` waiting prompts about the latest frame and publish the answers.

        Without a usable frame the prompts stay queued while no frame was ever received (a camera that is
        starting) and are dropped (counted, logged) when the latest frame is too old or unreadable.
        """
        with self._prompt_lock:
            if not self._prompts:
                return []
            try:
                rgb, stamp, frame_id = self.frame.get(self.max_frame_age_s)
            except NoFrameError as err:
                if self.frame.received == 0:
                    return []
                self.counters.prompts_dropped += len(self._prompts)
                log.warning("dropped %d prompt(s): %s", len(self._prompts), err)
                self._prompts.clear()
                return []
            batch = [self._prompts.popleft() for _ in range(min(self.batch_size, len(self._prompts)))]
        return self._answer(rgb, stamp, frame_id, batch)

    def ask_about_latest(self, prompts: Iterable[str]) -> list:
        """Ask ``prompts`` (the ``prompts`` parameter) about the latest frame now; [] without a usable frame."""
        prompts = list(prompts)
        try:
            rgb, stamp, frame_id = self.frame.get(self.max_frame_age_s)
        except NoFrameError:
            return []
        return [a for i in range(0, len(prompts), self.batch_size)
                for a in self._answer(rgb, stamp, frame_id, prompts[i:i + self.batch_size])]  # fmt: skip

    def ask(self, prompt: str, image_msg: Any = None) -> Any:
        """The ``Ask`` service: answer ``prompt`` about ``image_msg`` (when it has width > 0) or the latest frame.

        Raises :class:`NoFrameError` when there is nothing to answer about, ``ValueError`` for an empty prompt.
        """
        if not prompt.strip():
            raise ValueError("Ask.prompt is empty")
        frame = image_from_request(image_msg) or self.frame.get(self.max_frame_age_s)
        return self._answer(*frame, [prompt])[0]

    # ------------------------------------------------------------------------------------------ loop
    def on_weight_delta(self, data: Any) -> Any | None:
        """Verify and hot-swap a ``WeightDelta``; publishes (when carrying the loop) and returns the status."""
        msg = self._decode(wire.WEIGHT_DELTA, data)
        if msg is None:
            return None
        status = self.runtime.apply(msg)
        if status.state == REJECTED:
            self.counters.deltas_rejected += 1
            log.warning("rejected WeightDelta version %d: %s", msg.version, status.reason)
        else:
            self.counters.deltas_applied += 1
        if self.carry_loop:
            self._publish_status(status)
        return status

    def on_ack(self, data: Any) -> int:
        """Drop acknowledged samples from the durable uplink; returns how many were ours."""
        msg = self._decode(wire.UTS_ACK, data)
        if msg is None:
            return 0
        if msg.robot_id != self.runtime.config.robot_id:
            self.counters.acks_foreign += 1
            return 0
        ids = list(msg.sample_ids)
        self.runtime.uplink.ack(ids)
        return len(ids)

    def _publish_status(self, status: Any) -> None:
        self.publish("adapter_status", wire.encode(status))
        self.counters.statuses_published += 1

    def heartbeat_status(self) -> Any:
        """The runtime's heartbeat (:meth:`EdgeRuntime.heartbeat`)."""
        return self.runtime.heartbeat()

    def pump(self) -> int:
        """Publish the due uplink samples (``UtsTokens`` CDR, unchanged from the durable queue) through the
        runtime's own resend logic, on this shell's publisher."""

        def send(topic: str, data: bytes) -> None:
            self.publish(topic, data)
            self.counters.uplink_published += 1
            self.counters.uplink_bytes += len(data)

        return self.runtime.pump(send)

    def tick(self) -> None:
        """Periodic duties when carrying the loop: pump every ``pump_every_s``, heartbeat every
        ``heartbeat_every_s``."""
        if not self.carry_loop:
            return
        now = self._clock()
        if now >= self._next_pump:
            self.pump()
            self._next_pump = now + self.runtime.config.pump_every_s
        if now >= self._next_heartbeat:
            self._publish_status(self.heartbeat_status())
            self._next_heartbeat = now + self.runtime.config.heartbeat_every_s

    # ----------------------------------------------------------------------------------- diagnostics
    def diagnostics(self) -> DiagnosticReport:
        """The ``/diagnostics`` status: answer rate, latency, adapter version, uplink depth, rejected deltas.

        WARN when a delta was rejected or an answer failed since the previous report, when the uplink queue is
        at least 90 % full, or when the latest frame is older than ``max_frame_age_s``; ERROR when no camera
        frame has arrived while prompts wait.
        """
        stats = self.runtime.stats()
        mean, p95 = self.meter.latency_ms()
        depth, capacity = int(stats["uplink_queued"]), self.runtime.uplink.capacity
        age = self.frame.age_s()
        values = {
            "answer_rate_hz": f"{self.meter.rate_hz():.2f}",
            "latency_ms_mean": f"{mean:.1f}",
            "latency_ms_p95": f"{p95:.1f}",
            "adapter_version": str(stats["adapter_version"]),
            "uplink_queue_depth": str(depth),
            "uplink_queue_capacity": str(capacity),
            "uplink_dropped": str(stats["uplink_dropped"]),
            "rejected_deltas": str(self.counters.deltas_rejected),
            "applied_deltas": str(self.counters.deltas_applied),
            "answers": str(stats["answers"]),
            "failed_answers": str(stats["failed_answers"]),
            "frames_received": str(self.frame.received),
            "frames_rejected": str(self.frame.bad),
            "frame_age_s": "inf" if math.isinf(age) else f"{age:.2f}",
            "prompts_waiting": str(self.pending()),
            "prompts_dropped": str(self.counters.prompts_dropped),
            "malformed_messages": str(self.counters.malformed),
            "callback_errors": str(self.counters.callback_errors),
        }
        problems = []
        if self.counters.deltas_rejected > self._rejected_at_last_report:
            problems.append("a weight delta was rejected")
        if stats["failed_answers"] > self._failed_at_last_report:
            problems.append("answering failed")
        if depth >= 0.9 * capacity:
            problems.append("uplink queue nearly full (cloud unreachable?)")
        if self.max_frame_age_s > 0 and self.frame.received and age > self.max_frame_age_s:
            problems.append(f"camera frame {age:.1f} s old")
        self._rejected_at_last_report = self.counters.deltas_rejected
        self._failed_at_last_report = stats["failed_answers"]
        if self.frame.received == 0 and self.pending():
            return DiagnosticReport(ERROR, "no camera frame received; prompts are waiting", values)
        if problems:
            return DiagnosticReport(WARN, "; ".join(problems), values)
        return DiagnosticReport(OK, f"answering with adapter version {stats['adapter_version']}", values)
