"""The robot in a ROS 2 graph without rclpy: the runtime's port on a raw DDS participant (:mod:`cdcca.transport.dds`).

:func:`run_dds_edge` subscribes to a real camera topic (``sensor_msgs/Image``, sensor-data QoS) and to prompts
(``std_msgs/String``) and hands them to the :class:`~cdcca.edge.runtime.EdgeRuntime`; the runtime's messages go
out through a :class:`DdsPort`: ``cdcca_msgs/Answer`` on ``/cdcca/answer`` always and -- when the runtime has no
other port (Zenoh) -- the loop topics as the ``cdcca_edge`` node carries them: ``/cdcca/uts_tokens`` and
``/cdcca/adapter_status`` out, ``/cdcca/weight_delta`` (transient local, depth 1) and ``/cdcca/uts_ack`` in, for a
``zenoh-bridge-ros2dds`` or a cloud on the robot's DDS graph. Services (``Ask``) need the ROS request/reply
header and are left to the rclpy node. The participant announces itself as the ROS 2 node ``cdcca_edge``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cdcca import wire
from cdcca.edge.ports import FanOut
from cdcca.edge.runtime import EdgeRuntime
from cdcca.transport.dds import LATCHED, RELIABLE, SENSOR_DATA, DdsGraph, DdsWriter, dds_topic, from_idl, take_all
from cdcca.wire.topics import CAMERA_TOPIC, COMPRESSED_SUFFIX, LINK_TOPICS, PROMPT_TOPIC, ROS_TOPICS

log = logging.getLogger(__name__)


class DdsPort:
    """Publishes the runtime's CDR bytes with DDS writers on ``/cdcca/<topic>`` (XCDR1, unchanged).

    Args:
        writers: one writer per short topic name this port carries.
    """

    def __init__(self, writers: dict[str, DdsWriter]) -> None:
        self.writers = writers
        self.topics = frozenset(writers)

    def publish(self, topic: str, data: bytes) -> None:
        self.writers[topic].write_cdr(data)


@dataclass
class DdsEdgeSettings:
    """How :func:`run_dds_edge` joins the graph.

    Args:
        prompt_topic: ``std_msgs/String`` prompts answered about the latest frame.
        subscribe_compressed: also read ``sensor_msgs/CompressedImage`` on ``<camera_topic>/compressed``.
        domain_id: ROS domain (default ``$ROS_DOMAIN_ID`` or 0).
        config: Cyclone DDS XML configuration (default: as :class:`~cdcca.transport.dds.DdsGraph`).
        poll_s: idle wait between polls of the readers.
        node_name: the ROS 2 node the participant announces (``ros2 node list``; the rclpy node's name).
    """

    prompt_topic: str = PROMPT_TOPIC
    subscribe_compressed: bool = False
    domain_id: int | None = None
    config: str | None = None
    poll_s: float = 0.02
    node_name: str = "cdcca_edge"
    no_frames_warning_s: float = 3.0  # first warning when no camera frame arrived; then at doubling intervals


class CameraSilence:
    """Warns when a camera topic stays silent: after ``first_s`` seconds without a frame, then at doubling intervals
    (capped at ``max_s``), naming the topic and whether any publisher matched (DDS discovery), so a typo in the
    topic, another ROS_DOMAIN_ID or a camera that is not running shows up instead of silence."""

    def __init__(self, topic: str, domain_id: int, first_s: float = 3.0, max_s: float = 60.0,
                 clock=time.monotonic) -> None:  # fmt: skip
        self.topic, self.domain_id, self.max_s, self._clock = topic, domain_id, max_s, clock
        self._started = clock()
        self._next, self._interval = self._started + first_s, first_s
        self.warnings = 0

    def check(self, frames: int, publishers: Callable[[], int]) -> bool:
        """Log a warning if one is due (no frame yet; ``publishers()`` counts the matched ones); returns whether it
        did."""
        now = self._clock()
        if frames or now < self._next:
            return False
        publishers = publishers()
        self._interval = min(self._interval * 2, self.max_s)
        self._next = now + self._interval
        self.warnings += 1
        why = ("no publisher on it (check the topic name with `ros2 topic list` and ROS_DOMAIN_ID)" if publishers == 0
               else f"{publishers} publisher(s) matched but no frames yet (QoS or encoding?)")  # fmt: skip
        log.warning("no camera frame on %s after %.0f s in ROS domain %d: %s; prompts wait", self.topic,
                    now - self._started, self.domain_id, why)  # fmt: skip
        return True


def _publishers(readers) -> int:
    try:
        return sum(len(reader.get_matched_publications()) for reader in readers)
    except Exception:  # a binding without the call: report "no publisher" rather than fail
        return 0


def run_dds_edge(runtime: EdgeRuntime, camera_topic: str = CAMERA_TOPIC, stop_event: threading.Event | None = None,
                 settings: DdsEdgeSettings | None = None, ready: threading.Event | None = None) -> dict:  # fmt: skip
    """Serve ``runtime`` in a ROS 2 DDS graph until ``stop_event`` is set; returns its stats.

    The runtime's own loop answers prompts (and ``config.prompts`` every 1/``config.ask_rate_hz`` s) and carries
    the uplink, deltas and heartbeat; this function only moves samples between DDS and the runtime. ``ready``
    is set once every reader and writer exists.
    """
    settings = settings or DdsEdgeSettings()
    stop_event = stop_event or threading.Event()
    graph = DdsGraph(settings.domain_id, settings.config, node_name=settings.node_name)
    previous = runtime.port
    carried = ("answer",) if previous is not None else ("answer", "uts_tokens", "adapter_status")
    qos = {"answer": RELIABLE, "uts_tokens": RELIABLE, "adapter_status": RELIABLE}
    port = DdsPort({name: graph.writer(ROS_TOPICS[name], LINK_TOPICS[name], qos[name]) for name in carried})
    cameras = [(graph.reader(camera_topic, wire.IMAGE, SENSOR_DATA), wire.IMAGE)]
    if settings.subscribe_compressed:
        compressed = camera_topic.rstrip("/") + COMPRESSED_SUFFIX
        cameras.append((graph.reader(compressed, wire.COMPRESSED_IMAGE, SENSOR_DATA), wire.COMPRESSED_IMAGE))
    inputs = [(graph.reader(settings.prompt_topic, wire.STRING, RELIABLE), wire.STRING, runtime.on_prompt)]
    if previous is None:
        inputs += [
            (graph.reader(ROS_TOPICS["weight_delta"], wire.WEIGHT_DELTA, LATCHED), wire.WEIGHT_DELTA,
             runtime.on_weight_delta),
            (graph.reader(ROS_TOPICS["uts_ack"], wire.UTS_ACK, RELIABLE), wire.UTS_ACK, runtime.on_ack),
        ]  # fmt: skip
    runtime.port = port if previous is None else FanOut(previous, port)  # the previous port stays attached
    runtime.start()
    if ready is not None:
        ready.set()
    log.info("joined ROS 2 domain %d: camera %s (%s), prompts %s", graph.domain_id, camera_topic,
             dds_topic(camera_topic), settings.prompt_topic)  # fmt: skip
    silence = CameraSilence(camera_topic, graph.domain_id, settings.no_frames_warning_s)

    def malformed(err: Exception) -> None:  # a sample the binding cannot decode (a non-UTF-8 string): counted
        runtime.counters.malformed += 1
        log.warning("dropped a sample that does not decode: %s: %s", type(err).__name__, err)

    try:
        while not stop_event.is_set():
            if not runtime.frame.received:
                silence.check(runtime.frame.received, lambda: _publishers(reader for reader, _ in cameras))
            busy = False
            for reader, type_name in cameras:
                samples = take_all(reader, on_error=malformed)
                if samples:  # the newest only: cameras outpace prompts
                    runtime.on_camera(samples[-1], type_name)  # IDL sample: msg_to_rgb reads the same field names
            for reader, type_name, handle in inputs:
                for sample in take_all(reader, on_error=malformed):
                    busy = True
                    try:
                        handle(sample.data if type_name == wire.STRING else from_idl(type_name, sample))
                    except Exception:
                        runtime.counters.malformed += 1
                        log.exception("handling %s failed", type_name)
            if not busy:
                stop_event.wait(settings.poll_s)
    finally:
        stop_event.set()
        runtime.stop()
        runtime.port = previous
        graph.close()
    return runtime.stats()
