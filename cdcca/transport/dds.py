"""Join a ROS 2 graph without ROS: a raw DDS participant (Eclipse Cyclone DDS, ``cyclonedds``) that speaks ROS 2.

A ROS 2 node on a DDS RMW is, on the wire, a DDS participant whose topic ``/a/b`` is the DDS topic ``rt/a/b``
and whose message type ``pkg/msg/Name`` is the DDS type ``pkg::msg::dds_::Name_``, a *final* struct with the
fields of the ``.msg`` file, serialized as XCDR1 (plain CDR, 4-byte encapsulation header ``00 01 00 00``
little-endian). ROS 2 design, "Topic and Service name mapping to DDS" (design.ros2.org/articles/
topic_and_service_names.html); rmw_cyclonedds (github.com/ros2/rmw_cyclonedds) for the ``dds_`` type names.

So this module builds, for every message of :mod:`cdcca.wire` (``cdcca_msgs`` plus ``sensor_msgs/Image``,
``CompressedImage``, ``std_msgs/String``), a ``cyclonedds.idl.IdlStruct`` with that type name, generated from
the same ``rosbags`` field definitions that produce our CDR -- the ``.msg`` files stay the only source of truth.
``IdlStruct.serialize(use_version_2=False)`` of a sample is byte for byte :func:`cdcca.wire.encode` of the same
message (tested), and writers are created with the XCDR1 data representation so that is what goes on the wire
(cyclonedds Python API: cyclonedds.io/docs/cyclonedds-python, ``cyclonedds.idl``, ``cyclonedds.qos.Policy``).

With that, :mod:`cdcca.edge.dds_port` runs the robot's :class:`~cdcca.edge.runtime.EdgeRuntime` in a ROS 2
graph; this module knows nothing of the robot.

A ROS 2 *node*, as opposed to a bare participant, is what the participant announces on the ``ros_discovery_info``
topic: ``rmw_dds_common/msg/ParticipantEntitiesInfo``, its own GID and, per node, the GIDs of the node's readers
and writers, where a GID is the entity's 16-byte DDS GUID (rmw_dds_common's ``Gid.msg``, 16 bytes since Iron;
rmw_cyclonedds ``convert_guid_to_gid``). ``ros2 node list`` reads it, and zenoh-bridge-ros2dds routes only
endpoints some node lists there (its ``discovered_entities.rs``), so :class:`DdsGraph` given a ``node_name``
announces one node holding every reader and writer it creates, republished whole after each change.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any, Mapping
from xml.sax.saxutils import escape

from cyclonedds.core import Policy, Qos
from cyclonedds.domain import Domain, DomainParticipant
from cyclonedds.idl import IdlStruct, make_idl_struct
from cyclonedds.idl import types as idl
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration
from rosbags.typesys.base import Nodetype

from cdcca import wire
from cdcca.errors import CdccaError

log = logging.getLogger(__name__)

_BASE = {
    "bool": bool, "byte": idl.byte, "char": idl.uint8, "octet": idl.byte, "int8": idl.int8, "uint8": idl.uint8,
    "int16": idl.int16, "uint16": idl.uint16, "int32": idl.int32, "uint32": idl.uint32, "int64": idl.int64,
    "uint64": idl.uint64, "float32": idl.float32, "float64": idl.float64, "string": str,
}  # fmt: skip  # ROS 2 .msg primitive -> IDL type (rosidl: char is uint8, byte is octet)
_TYPES: dict[str, type[IdlStruct]] = {}
_DOMAINS: dict[int, tuple[Domain, str]] = {}  # a configured domain exists once per process; participants share it
_DOMAINS_LOCK = threading.Lock()

# QoS as rclpy's profiles (rclpy.qos.qos_profile_sensor_data, the default profile, and a latched topic).
SENSOR_DATA = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(1), Policy.Durability.Volatile)
RELIABLE = Qos(Policy.Reliability.Reliable(duration(milliseconds=100)), Policy.History.KeepLast(10),
               Policy.Durability.Volatile)  # fmt: skip
LATCHED = Qos(Policy.Reliability.Reliable(duration(milliseconds=100)), Policy.History.KeepLast(1),
              Policy.Durability.TransientLocal)  # fmt: skip
_XCDR1 = Policy.DataRepresentation(use_cdrv0_representation=True)


ROS_DISCOVERY_TOPIC = "ros_discovery_info"  # no rt/ prefix: rmw creates it with avoid_ros_namespace_conventions


# rmw_dds_common's messages (rosidl IDL, final, XCDR1). Built with make_idl_struct because this module's
# annotations are strings (``from __future__ import annotations``), which cyclonedds cannot resolve.
Gid = make_idl_struct("Gid_", "rmw_dds_common::msg::dds_::Gid_", {
    "data": idl.array[idl.uint8, 16]})  # Jazzy: char[16] data, the DDS GUID of a participant, reader or writer
NodeEntitiesInfo = make_idl_struct("NodeEntitiesInfo_", "rmw_dds_common::msg::dds_::NodeEntitiesInfo_", {
    "node_namespace": idl.bounded_str[256], "node_name": idl.bounded_str[256],
    "reader_gid_seq": idl.sequence[Gid], "writer_gid_seq": idl.sequence[Gid]})  # readers first, as in the .msg
ParticipantEntitiesInfo = make_idl_struct(
    "ParticipantEntitiesInfo_", "rmw_dds_common::msg::dds_::ParticipantEntitiesInfo_",
    {"gid": Gid, "node_entities_info_seq": idl.sequence[NodeEntitiesInfo]})  # what goes on ros_discovery_info


class DdsError(CdccaError, RuntimeError):
    """The DDS participant cannot be created or a topic cannot be used."""


_ROS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a node name (ROS 2 design: topic and service names)
_ROS_NAMESPACE = re.compile(r"(/[A-Za-z_][A-Za-z0-9_]*)+")


def dds_topic(ros_topic: str) -> str:
    """The DDS topic of a ROS 2 topic: ``/camera/image`` -> ``rt/camera/image`` (relative names: from ``/``)."""
    name = ros_topic.strip()
    if not name or name.endswith("/") or "//" in name:
        raise DdsError(f"not a ROS topic name: {ros_topic!r}")
    return "rt/" + name.lstrip("/")


def dds_type_name(type_name: str) -> str:
    """``sensor_msgs/msg/Image`` -> ``sensor_msgs::msg::dds_::Image_`` (the name rmw implementations register)."""
    full = wire.canonical(type_name)
    parts = full.split("/")
    if parts[1] == "srv":  # rosbags keeps service parts as pkg/srv/msg/Name_Request
        return f"{parts[0]}::srv::dds_::{parts[-1]}_"
    return f"{parts[0]}::msg::dds_::{parts[-1]}_"


def idl_type(type_name: str) -> type[IdlStruct]:
    """The ``IdlStruct`` of a registered ROS message type, generated from its ``.msg`` field definitions."""
    full = wire.canonical(type_name)
    if full not in _TYPES:
        _, fields = wire.TYPESTORE.fielddefs[full]
        annotations = {name: _idl_field(node) for name, node in fields}
        class_name = dds_type_name(full).rsplit("::", 1)[-1]
        _TYPES[full] = make_idl_struct(class_name, dds_type_name(full), annotations)  # final, as rosidl's IDL
    return _TYPES[full]


def _idl_field(node: tuple) -> Any:
    kind, detail = node
    if kind == Nodetype.BASE:
        base, bound = detail
        return idl.bounded_str[bound] if base == "string" and bound else _BASE[base]
    if kind == Nodetype.NAME:
        return idl_type(detail)
    element, size = detail
    if kind == Nodetype.ARRAY:
        return idl.array[_idl_field(element), size]
    return idl.sequence[_idl_field(element), size] if size else idl.sequence[_idl_field(element)]


def to_idl(msg: Any) -> IdlStruct:
    """The IDL sample of a :mod:`cdcca.wire` message (through its CDR, so the bytes stay the ROS ones)."""
    return cdr_to_idl(msg.__msgtype__, wire.encode(msg))


def cdr_to_idl(type_name: str, data: bytes) -> IdlStruct:
    """Parse ROS 2 CDR bytes as the IDL sample of ``type_name``."""
    try:
        return idl_type(type_name).deserialize(bytes(data))
    except Exception as err:  # struct.error, IndexError, UnicodeDecodeError from the binding's machine
        raise wire.WireError(f"malformed {type_name}: {type(err).__name__}: {err}") from err


def idl_to_cdr(sample: IdlStruct) -> bytes:
    """XCDR1 bytes of an IDL sample (equal to :func:`cdcca.wire.encode` of the same message)."""
    return sample.serialize(use_version_2=False)


def from_idl(type_name: str, sample: IdlStruct) -> Any:
    """The :mod:`cdcca.wire` message of an IDL sample."""
    return wire.decode(type_name, idl_to_cdr(sample))


def _cyclone_config(peers: list[str], multicast: bool = False, interface: str | None = None,
                    max_index: int = 32) -> str:  # fmt: skip
    """A Cyclone DDS domain configuration for unicast discovery over participant indices (``auto``)."""
    quoted = "".join(f"<Peer address='{escape(p, {chr(39): '&apos;'})}'/>" for p in peers)
    general = "" if interface is None else f"<Interfaces><NetworkInterface address='{interface}'/></Interfaces>"
    general += "" if multicast else "<AllowMulticast>false</AllowMulticast>"
    return (f"<CycloneDDS><Domain Id='any'><General>{general}</General><Discovery><ParticipantIndex>auto"
            f"</ParticipantIndex><MaxAutoParticipantIndex>{max_index}</MaxAutoParticipantIndex><Peers>{quoted}"
            f"</Peers></Discovery></Domain></CycloneDDS>")  # fmt: skip


# Fast DDS 3 (ROS 2 Kilted's rmw_fastrtps) sends XTypes type information that Cyclone DDS 11 rejects for types
# with sequences (sensor_msgs/Image, cdcca_msgs/UtsAck, ros_discovery_info's ParticipantEntitiesInfo): the
# endpoints then never match, so a Kilted camera sends this participant no frames and rclpy does not list its
# node. Ignoring the remote type information there (matching by type name, as ROS 2 does) restores it; Jazzy's
# Fast DDS 2.14 is unaffected. Prepended to every configuration a DdsGraph uses (issue 14, #13).
FAST_DDS_3_COMPATIBILITY = ("<CycloneDDS><Domain Id='any'><Compatibility><IgnoreTypeInformation>1.15"
                            "</IgnoreTypeInformation></Compatibility></Domain></CycloneDDS>")


def loopback_config() -> str:
    """A Cyclone DDS configuration that stays on 127.0.0.1 with unicast discovery (no multicast needed): for
    tests and for a robot whose ROS graph is one host (give ROS the same via ``CYCLONEDDS_URI``)."""
    return _cyclone_config(["127.0.0.1"], interface="127.0.0.1", max_index=30)


DISCOVERY_RANGES = ("SUBNET", "LOCALHOST", "OFF", "SYSTEM_DEFAULT")


def ros_discovery_config(environ: Mapping[str, str] | None = None) -> str | None:
    """The Cyclone DDS discovery settings a Jazzy node derives from its environment, or ``None`` for Cyclone's own.

    As rcl reads them in Jazzy ("Improved dynamic discovery", docs.ros.org/en/jazzy/Tutorials/Advanced/Improved-
    Dynamic-Discovery.html; rcl's discovery options): ``ROS_LOCALHOST_ONLY=1`` (deprecated) wins and means
    ``LOCALHOST`` without static peers; otherwise ``ROS_AUTOMATIC_DISCOVERY_RANGE`` -- ``SUBNET`` when unset,
    ``LOCALHOST``, ``OFF``, ``SYSTEM_DEFAULT``, matched exactly, anything else warned about and taken as
    ``LOCALHOST`` -- with ``ROS_STATIC_PEERS`` (``;``-separated) for every range but ``OFF``. rmw_cyclonedds then
    discovers without multicast and with the peer ``localhost`` for ``LOCALHOST``, with neither multicast nor peers
    for ``OFF`` (so the participant sees no other process), and adds the static peers to multicast for
    ``SUBNET``. A robot whose graph is limited to ``LOCALHOST`` is unreachable by multicast, so without this a
    raw participant would see nothing. A user ``$CYCLONEDDS_URI`` is applied after these settings and wins.
    """
    env = os.environ if environ is None else environ
    peers = [p.strip() for p in env.get("ROS_STATIC_PEERS", "").split(";") if p.strip()]
    if env.get("ROS_LOCALHOST_ONLY", "").strip() == "1":
        scope, peers = "LOCALHOST", []
    else:
        scope = env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "").strip() or "SUBNET"
        if scope not in DISCOVERY_RANGES:
            log.warning("ROS_AUTOMATIC_DISCOVERY_RANGE=%r is none of %s: using LOCALHOST, as rcl does", scope,
                        ", ".join(DISCOVERY_RANGES))  # fmt: skip
            scope = "LOCALHOST"
    if scope == "SYSTEM_DEFAULT" or (scope == "SUBNET" and not peers):
        return None
    if scope == "OFF":
        return _cyclone_config([])
    if scope == "LOCALHOST":  # on the loopback interface, so the locators it announces are the ones a
        return _cyclone_config(["localhost", *peers], interface="127.0.0.1")  # localhost-only Fast DDS can reach
    return _cyclone_config(peers, multicast=True)


class DdsWriter:
    """A DDS writer of one ROS topic; writes messages or their CDR bytes, XCDR1 on the wire."""

    def __init__(self, writer: DataWriter, type_name: str) -> None:
        self.writer, self.type_name = writer, type_name

    def write_cdr(self, data: bytes) -> None:
        self.writer.write(cdr_to_idl(self.type_name, data))

    def write(self, msg: Any) -> None:
        self.writer.write(to_idl(msg))

    def matched(self) -> int:
        """How many readers (ROS subscriptions) this writer is matched with."""
        return len(self.writer.get_matched_subscriptions())


def _gid(entity: Any) -> IdlStruct:
    return Gid(list(entity.guid.bytes))


class DdsGraph:
    """One DDS participant in a ROS 2 domain, optionally announced as a ROS 2 node.

    Args:
        domain_id: the ROS domain (``$ROS_DOMAIN_ID``, default 0).
        config: Cyclone DDS XML configuration for this domain (default: what :func:`ros_discovery_config` derives
            from the ROS environment, then ``$CYCLONEDDS_URI``; with neither, Cyclone's built-in one), always after
            :data:`FAST_DDS_3_COMPATIBILITY`.
        node_name: announce the participant's readers and writers as this ROS 2 node on ``ros_discovery_info``
            (see the module doc); ``None``: a bare participant, invisible to ``ros2 node list`` and to
            zenoh-bridge-ros2dds.
        node_namespace: the node's namespace (absolute).
    """

    def __init__(self, domain_id: int | None = None, config: str | None = None, node_name: str | None = None,
                 node_namespace: str = "/") -> None:  # fmt: skip
        if node_name is not None and not _ROS_NAME.fullmatch(node_name):
            raise DdsError(f"not a ROS 2 node name: {node_name!r} (letters, digits and _, not starting with a digit)")
        if not (node_namespace == "/" or _ROS_NAMESPACE.fullmatch(node_namespace)):
            raise DdsError(f"not an absolute ROS 2 namespace: {node_namespace!r}")
        self.node_name, self.node_namespace = node_name, node_namespace
        self.domain_id = int(os.environ.get("ROS_DOMAIN_ID", "0")) if domain_id is None else int(domain_id)
        if config is None:  # later fragments override earlier ones: a user's $CYCLONEDDS_URI comes last
            config = ",".join(filter(None, [ros_discovery_config(), os.environ.get("CYCLONEDDS_URI")]))
        config = ",".join(filter(None, [FAST_DDS_3_COMPATIBILITY, config]))
        try:
            if config:
                with _DOMAINS_LOCK:
                    if self.domain_id not in _DOMAINS:
                        _DOMAINS[self.domain_id] = (Domain(self.domain_id, config), config)
                    elif _DOMAINS[self.domain_id][1] != config:
                        raise DdsError(f"DDS domain {self.domain_id} already runs with another configuration")
            self.participant = DomainParticipant(self.domain_id)
        except DdsError:
            raise
        except Exception as err:
            raise DdsError(f"cannot join DDS domain {self.domain_id}: {err}") from err
        self._topics: dict[str, Topic] = {}
        self._entities: list[Any] = []  # our readers and writers, in creation order (the node lists them)
        self._discovery: DataWriter | None = None

    def _topic(self, ros_topic: str, type_name: str) -> Topic:
        name = dds_topic(ros_topic)
        if name not in self._topics:
            self._topics[name] = Topic(self.participant, name, idl_type(type_name))
        return self._topics[name]

    def writer(self, ros_topic: str, type_name: str, qos: Qos = RELIABLE) -> DdsWriter:
        writer = DataWriter(self.participant, self._topic(ros_topic, type_name), Qos(*qos, _XCDR1))
        self._entities.append(writer)
        self._announce()
        return DdsWriter(writer, type_name)

    def reader(self, ros_topic: str, type_name: str, qos: Qos = RELIABLE) -> DataReader:
        reader = DataReader(self.participant, self._topic(ros_topic, type_name), qos)
        self._entities.append(reader)
        self._announce()
        return reader

    def node_info(self) -> IdlStruct:
        """What this participant announces on ``ros_discovery_info`` (no node without ``node_name``)."""
        readers = [_gid(e) for e in self._entities if isinstance(e, DataReader)]
        writers = [_gid(e) for e in self._entities if isinstance(e, DataWriter)]
        nodes = [] if self.node_name is None else [
            NodeEntitiesInfo(self.node_namespace, self.node_name, readers, writers)]
        return ParticipantEntitiesInfo(_gid(self.participant), nodes)

    def _announce(self) -> None:
        """Publish the whole :meth:`node_info`: rmw and the bridge keep the newest sample of each participant."""
        if self.node_name is None:
            return
        if self._discovery is None:
            topic = Topic(self.participant, ROS_DISCOVERY_TOPIC, ParticipantEntitiesInfo)
            self._discovery = DataWriter(self.participant, topic, Qos(*LATCHED, _XCDR1))  # as rmw: depth 1
        self._discovery.write(self.node_info())

    def close(self) -> None:
        """Delete the participant and everything in it (it leaves the graph at once, and so does its node)."""
        self._entities.clear()
        self._discovery = None
        self._topics.clear()
        if getattr(self, "participant", None) is not None:
            self.participant.__del__()  # dds_delete: the binding's only way to delete an entity explicitly
            self.participant = None


def take_all(reader: DataReader, limit: int = 64, on_error: Callable[[Exception], None] | None = None) -> list:
    """Valid samples taken from ``reader``, at most ``limit`` (invalid ones: disposals, unregistrations, are skipped).

    One sample at a time: the binding decodes a sample inside ``take`` after removing it from the reader, and a
    sample the wire accepts but Python cannot decode (a string that is not UTF-8, which a C++ node may send) raises
    there. That sample is lost either way; ``on_error(err)`` is told (default: logged), and the rest are taken.
    """
    samples = []
    for _ in range(limit):
        try:
            taken = reader.take(N=1)
        except Exception as err:  # noqa: BLE001 - the binding's decode errors are many types (UnicodeDecodeError...)
            if on_error is not None:
                on_error(err)
            else:
                log.warning("dropped a DDS sample that does not decode: %s: %s", type(err).__name__, err)
            continue
        if not taken:
            break
        samples.extend(s for s in taken if getattr(s, "sample_info", None) is None or s.sample_info.valid_data)
    return samples


class DdsLink:
    """The cloud's side of a robot's ROS 2 graph, joined directly over DDS (no bridge): the interface of
    :class:`cdcca.transport.Link` on the ROS topics ``/cdcca/<topic>`` instead of Zenoh keys.

    For a cloud trainer on the robots' LAN (the paper's real-world setup) or on their host. Every robot of the
    graph shares each topic, so a message's sender is its ``robot_id`` field; ``weight_delta`` is latched (transient
    local, depth 1) as the robot's subscription expects, which keeps the newest delta of the whole graph: with
    several robots, a robot that joins late gets only the newest one (and then a keyframe, as after any gap).

    Args:
        domain_id: the ROS domain (default ``$ROS_DOMAIN_ID`` or 0).
        config: Cyclone DDS configuration (default: derived from the ROS environment, as :class:`DdsGraph`).
        node_name: the ROS 2 node this participant announces.
        poll_s: how often the readers are polled.
    """

    def __init__(self, domain_id: int | None = None, config: str | None = None, node_name: str = "cdcca_cloud",
                 poll_s: float = 0.02) -> None:  # fmt: skip
        from collections import Counter

        from cdcca.wire.topics import LINK_TOPICS, ROS_TOPICS

        self._types, self._names = LINK_TOPICS, ROS_TOPICS
        self.graph = DdsGraph(domain_id, config, node_name=node_name)
        self.rejected: Counter[str] = Counter()
        self._writers: dict[str, DdsWriter] = {}
        self._subscriptions: list[tuple[DataReader, str, str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_s = poll_s
        self._thread = threading.Thread(target=self._poll, name="dds-link", daemon=True)
        self._thread.start()

    def publish(self, robot_id: str, topic: str, msg: Any) -> int:
        return self.publish_bytes(robot_id, topic, wire.encode(msg))

    def publish_bytes(self, robot_id: str, topic: str, data: bytes) -> int:
        with self._lock:
            if topic not in self._writers:
                qos = LATCHED if topic == "weight_delta" else RELIABLE
                self._writers[topic] = self.graph.writer(self._names[topic], self._types[topic], qos)
            self._writers[topic].write_cdr(data)
        return len(data)

    def subscribe(self, robot_id: str, topic: str, handler: Any) -> None:
        """Call ``handler(robot_id, msg, cdr)`` for every valid message on the topic from ``robot_id`` (``*``: all)."""
        with self._lock:
            reader = self.graph.reader(self._names[topic], self._types[topic], RELIABLE)
            self._subscriptions.append((reader, topic, robot_id, handler))

    def _undecodable(self, topic: str, err: Exception) -> None:
        self.rejected[topic] += 1
        log.warning("rejected a %s sample that does not decode: %s: %s", topic, type(err).__name__, err)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                subscriptions = list(self._subscriptions)
            busy = False
            for reader, topic, robot_id, handler in subscriptions:
                for sample in take_all(reader, on_error=functools.partial(self._undecodable, topic)):
                    busy = True
                    try:
                        data = idl_to_cdr(sample)
                        msg = wire.decode(self._types[topic], data)
                    except wire.WireError as err:
                        self.rejected[topic] += 1
                        log.warning("rejected a %s sample: %s", topic, err)
                        continue
                    sender = getattr(msg, "robot_id", "")
                    if robot_id != "*" and sender != robot_id:
                        continue
                    try:
                        handler(sender, msg, data)
                    except Exception:
                        log.exception("handler of %s failed", topic)
                        self.rejected[f"{topic}:handler_error"] += 1
            if not busy:
                self._stop.wait(self._poll_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.graph.close()
