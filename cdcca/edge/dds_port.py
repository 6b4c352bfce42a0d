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
    try:
        while not stop_event.is_set():
            busy = False
            for reader, type_name in cameras:
                samples = take_all(reader)
                if samples:  # the newest only: cameras outpace prompts
                    runtime.on_camera(samples[-1], type_name)  # IDL sample: msg_to_rgb reads the same field names
            for reader, type_name, handle in inputs:
                for sample in take_all(reader):
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
