"""The raw-DDS path (cdcca.transport.dds): ROS 2 type names and bytes, and the robot in a DDS graph on loopback.

The "ROS 2 camera" runs in its own process and declares its types by hand, the way rosidl would generate them
(``sensor_msgs::msg::dds_::Image_``, final, XCDR1), independent of the generator under test.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from cyclonedds.core import Policy, Qos
from cyclonedds.util import duration

from cdcca import wire
from cdcca.bag import compressed_to_msg, image_to_msg
from cdcca.envelope import Signer, sign_ack
from cdcca.transport import dds
from tests.test_transport import wait_until


def free_domain_id(slot: int) -> int:
    """A ROS domain for one test (slots 0-3; slot 3 is ``tests/test_edge_observe.py``'s): apart from other test
    runs (by pid) and from each other, since a configured domain exists once per process and refuses a second
    configuration (a fixed id there once met this range's slot 2 under another configuration: 1 run in 67)."""
    assert 0 <= slot < 4
    return 30 + (os.getpid() % 50) * 4 + slot  # 30..229, inside the valid 0..232


FRAME = (np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)  # (H, W, 3), deterministic


def sample_messages():
    stamp = wire.header(1_700_000_000_123_456_789, "camera_color_optical_frame")
    return [
        image_to_msg(FRAME, 5, "cam", encoding="bgr8"),
        compressed_to_msg(FRAME, "png", stamp_ns=7),
        wire.new(wire.STRING, data="what digit is this?"),
        wire.new(wire.ANSWER, header=stamp, sample_id="r1-1", prompt="p", answer="seven", entropy=0.25,
                 adapter_version=3, latency_ms=12.5),  # fmt: skip
        wire.new(wire.UTS_TOKENS, header=stamp, robot_id="r1", sample_id="r1-2", adapter_version=1, prompt="q",
                 student_answer="a", sample_entropy=1.5, num_tokens=17, token_dim=4,
                 token_indices=np.array([0, 3, 9], np.uint16), token_variance=np.array([0.1, 0.2, 0.3], np.float32),
                 encoding=0, scales=np.array([1.0, 2.0, 0.5], np.float32),
                 token_data=np.arange(12, dtype=np.uint8)),  # fmt: skip
        wire.new(wire.UTS_ACK, header=stamp, robot_id="r1", sample_ids=["a", "bb", "ccc"], sequence=2**63 - 1,
                 key_id="cloud-1", signature=np.arange(64, dtype=np.uint8)),  # fmt: skip
        wire.new(wire.WEIGHT_DELTA, header=stamp, robot_id="r1", version=4, base_version=3, keyframe=True, codec="nf4",
                 num_params=123456789012, sha256=np.arange(32, dtype=np.uint8), key_id="cloud-1",
                 signature=np.arange(64, dtype=np.uint8), payload=(np.arange(301) % 256).astype(np.uint8)),  # fmt: skip
        wire.new(wire.ADAPTER_STATUS, header=stamp, robot_id="r1", version=2, state=1, reason="bad signature"),
        wire.new(wire.ASK_REQUEST, prompt="what?", image=image_to_msg(FRAME[:4, :5], 9, "cam")),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.__msgtype__.rsplit("/", 1)[-1])
def test_idl_types_serialize_to_the_exact_ros2_cdr_bytes(msg):
    cdr = wire.encode(msg)
    sample = dds.cdr_to_idl(msg.__msgtype__, cdr)
    assert cdr[:4] == b"\x00\x01\x00\x00"  # XCDR1, little-endian: what a ROS 2 node sends
    assert dds.idl_to_cdr(sample) == cdr
    assert sample.serialize()[:4] == b"\x00\x01\x00\x00"  # final types default to XCDR1 too
    assert wire.encode(dds.from_idl(msg.__msgtype__, sample)) == cdr


def test_ros2_names():
    assert dds.dds_topic("/camera/camera/color/image_raw") == "rt/camera/camera/color/image_raw"
    assert dds.dds_topic("cdcca/answer") == "rt/cdcca/answer"
    assert dds.dds_type_name(wire.IMAGE) == "sensor_msgs::msg::dds_::Image_"
    assert dds.dds_type_name("cdcca_msgs/UtsTokens") == "cdcca_msgs::msg::dds_::UtsTokens_"
    assert dds.dds_type_name(wire.ASK_REQUEST) == "cdcca_msgs::srv::dds_::Ask_Request_"
    assert dds.idl_type(wire.ANSWER).__idl__.idl_transformed_typename == "cdcca_msgs::msg::dds_::Answer_"
    assert [f for f in dds.idl_type(wire.IMAGE).__annotations__] == ["header", "height", "width", "encoding",
                                                                      "is_bigendian", "step", "data"]  # fmt: skip
    for bad in ("", "/a//b", "/a/"):
        with pytest.raises(dds.DdsError):
            dds.dds_topic(bad)


def test_malformed_cdr_is_a_wire_error():
    with pytest.raises(wire.WireError):
        dds.cdr_to_idl(wire.ANSWER, b"\x00\x01\x00\x00\xff\xff\xff\x7f")


def _discovery_reader(graph: dds.DdsGraph):
    """A reader of ``ros_discovery_info`` as rmw and zenoh-bridge-ros2dds create it (reliable, transient local)."""
    from cyclonedds.sub import DataReader
    from cyclonedds.topic import Topic

    topic = Topic(graph.participant, dds.ROS_DISCOVERY_TOPIC, dds.ParticipantEntitiesInfo)
    keep_all = Qos(Policy.Reliability.Reliable(duration(milliseconds=100)), Policy.Durability.TransientLocal,
                   Policy.History.KeepAll)  # fmt: skip  # one keyless topic: keep every participant's samples
    return DataReader(graph.participant, topic, keep_all)


def _cdr_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<I", len(raw)) + raw + b"\0" * (-len(raw) % 4)


def test_the_participant_announces_itself_as_a_ros2_node_with_its_endpoint_gids():
    """ros2 node list / zenoh-bridge-ros2dds see a node whose GIDs are the GUIDs DDS discovery reports."""
    from cyclonedds.builtin import BuiltinDataReader, BuiltinTopicDcpsPublication, BuiltinTopicDcpsSubscription

    domain_id, config = free_domain_id(1), dds.loopback_config()
    robot = dds.DdsGraph(domain_id, config, node_name="cdcca_edge")
    observer = dds.DdsGraph(domain_id, config)  # bare: plays the bridge
    try:
        robot.writer("/cdcca/answer", wire.ANSWER)
        robot.reader("/camera/camera/color/image_raw", wire.IMAGE, dds.SENSOR_DATA)
        robot.writer("/cdcca/uts_tokens", wire.UTS_TOKENS)
        announced = _discovery_reader(observer)
        publications = BuiltinDataReader(observer.participant, BuiltinTopicDcpsPublication)
        subscriptions = BuiltinDataReader(observer.participant, BuiltinTopicDcpsSubscription)
        robot_gid = robot.participant.guid.bytes
        infos, endpoints = [], {}

        def complete():
            infos.extend(dds.take_all(announced))
            for sample in [*publications.take(N=64), *subscriptions.take(N=64)]:
                endpoints[sample.key.bytes] = (sample.topic_name, sample.type_name)
            nodes = infos[-1].node_entities_info_seq if infos else []
            listed = [bytes(g.data) for n in nodes for g in (*n.reader_gid_seq, *n.writer_gid_seq)]
            return len(listed) == 3 and all(gid in endpoints for gid in listed)

        assert wait_until(complete, timeout=15), (infos[-1:], endpoints)
        assert all(bytes(info.gid.data) == robot_gid for info in infos)  # and none from the bare observer
        assert robot._discovery.get_qos()[Policy.DataRepresentation].use_cdrv0_representation  # XCDR1, as rmw
    finally:
        robot.close()
        observer.close()
    [node] = infos[-1].node_entities_info_seq
    assert (node.node_namespace, node.node_name) == ("/", "cdcca_edge")
    assert [endpoints[bytes(g.data)] for g in node.reader_gid_seq] == [
        ("rt/camera/camera/color/image_raw", "sensor_msgs::msg::dds_::Image_")]
    assert [endpoints[bytes(g.data)] for g in node.writer_gid_seq] == [
        ("rt/cdcca/answer", "cdcca_msgs::msg::dds_::Answer_"),
        ("rt/cdcca/uts_tokens", "cdcca_msgs::msg::dds_::UtsTokens_")]
    # The bytes are rmw_dds_common's Jazzy layout, packed here by hand: Gid is 16 bytes with no length, the
    # node's strings come before its reader GIDs, then its writer GIDs.
    gids = lambda seq: struct.pack("<I", len(seq)) + b"".join(bytes(g.data) for g in seq)  # noqa: E731
    expected = (b"\x00\x01\x00\x00" + robot_gid + struct.pack("<I", 1) + _cdr_string("/") + _cdr_string("cdcca_edge")
                + gids(node.reader_gid_seq) + gids(node.writer_gid_seq))  # fmt: skip
    assert dds.idl_to_cdr(infos[-1]) == expected


@pytest.mark.parametrize("name, namespace", [("1robot", "/"), ("edge-node", "/"), ("edge", "r1"), ("edge", "/r1/")])
def test_bad_node_names_are_refused_before_joining(name, namespace):
    with pytest.raises(dds.DdsError, match="node name|namespace"):
        dds.DdsGraph(0, node_name=name, node_namespace=namespace)


@pytest.mark.parametrize("env, multicast, peers", [
    ({}, None, None),  # SUBNET without static peers: Cyclone's own configuration
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "SYSTEM_DEFAULT", "ROS_STATIC_PEERS": "10.0.0.9"}, None, None),
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}, "false", ["localhost"]),
    ({"ROS_LOCALHOST_ONLY": "1", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "ROS_STATIC_PEERS": "10.0.0.7"},
     "false", ["localhost"]),  # the deprecated variable wins and drops the static peers
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_STATIC_PEERS": "robot2.lan; 10.0.0.7"}, "false",
     ["localhost", "robot2.lan", "10.0.0.7"]),
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "ROS_STATIC_PEERS": "10.0.0.7"}, None, ["10.0.0.7"]),
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "OFF", "ROS_STATIC_PEERS": "10.0.0.7"}, "false", []),  # isolated
    ({"ROS_AUTOMATIC_DISCOVERY_RANGE": "subnet"}, "false", ["localhost"]),  # matched exactly; unknown: LOCALHOST
])  # fmt: skip
def test_discovery_settings_follow_the_ros_environment(env, multicast, peers):
    import xml.etree.ElementTree as ET

    config = dds.ros_discovery_config(env)
    if peers is None:
        assert config is None
        return
    root = ET.fromstring(config)
    assert root.findtext("Domain/General/AllowMulticast") == multicast
    assert [p.get("address") for p in root.findall("Domain/Discovery/Peers/Peer")] == peers
    assert root.findtext("Domain/Discovery/ParticipantIndex") == "auto"


LOCALHOST_TALKER = textwrap.dedent('''
    """A process of a ROS graph run with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and its own CYCLONEDDS_URI."""
    import sys, time
    from cdcca import wire
    from cdcca.transport import dds

    graph = dds.DdsGraph(int(sys.argv[1]))  # no config: from the environment
    prompts = graph.writer("/cdcca/prompt", wire.STRING)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        prompts.write(wire.new(wire.STRING, data="hello over localhost"))
        time.sleep(0.1)
''')


def test_participants_find_each_other_with_localhost_discovery(tmp_path, monkeypatch):
    """Two processes, each configured only by the ROS environment (unicast to localhost, no multicast)."""
    domain_id = free_domain_id(2)
    user = "<CycloneDDS><Domain Id='any'><Discovery><MaxAutoParticipantIndex>40</MaxAutoParticipantIndex>" \
           "</Discovery></Domain></CycloneDDS>"  # fmt: skip
    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "CYCLONEDDS_URI": user}
    script = tmp_path / "talker.py"
    script.write_text(LOCALHOST_TALKER)
    log = open(tmp_path / "talker.log", "w")
    talker = subprocess.Popen([sys.executable, str(script), str(domain_id)], env=env, stderr=log)
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.delenv("CYCLONEDDS_URI", raising=False)
    graph = dds.DdsGraph(domain_id)
    assert "<Peer address='localhost'/>" in dds._DOMAINS[domain_id][1]  # the domain runs the derived settings
    try:
        reader = graph.reader("/cdcca/prompt", wire.STRING)
        heard = []
        assert wait_until(lambda: heard.extend(dds.take_all(reader)) or heard, timeout=20), (
            talker.poll(), (tmp_path / "talker.log").read_text()[-2000:])
    finally:
        talker.kill()
        talker.wait()
        log.close()
        graph.close()
    assert heard[0].data == "hello over localhost"


ROS_CAMERA = textwrap.dedent('''
    """A stand-in for a ROS 2 camera node and `ros2 topic echo /cdcca/answer`, with hand-declared rosidl types."""
    import json, sys, time
    from dataclasses import dataclass
    from cyclonedds.core import Policy, Qos
    from cyclonedds.domain import Domain, DomainParticipant
    from cyclonedds.idl import IdlStruct
    from cyclonedds.idl.types import float32, int32, sequence, uint8, uint32
    from cyclonedds.pub import DataWriter
    from cyclonedds.sub import DataReader
    from cyclonedds.topic import Topic
    from cyclonedds.util import duration

    @dataclass
    class Time_(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
        sec: int32
        nanosec: uint32

    @dataclass
    class Header_(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
        stamp: Time_
        frame_id: str

    @dataclass
    class Image_(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
        header: Header_
        height: uint32
        width: uint32
        encoding: str
        is_bigendian: uint8
        step: uint32
        data: sequence[uint8]

    @dataclass
    class String_(IdlStruct, typename="std_msgs::msg::dds_::String_"):
        data: str

    @dataclass
    class Answer_(IdlStruct, typename="cdcca_msgs::msg::dds_::Answer_"):
        header: Header_
        sample_id: str
        prompt: str
        answer: str
        entropy: float32
        adapter_version: uint32
        latency_ms: float32

    domain_id, config, want = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    domain = Domain(domain_id, config)
    participant = DomainParticipant(domain_id)
    xcdr1 = Policy.DataRepresentation(use_cdrv0_representation=True)
    sensor = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(5), xcdr1)  # rclpy sensor-data QoS
    reliable = Qos(Policy.Reliability.Reliable(duration(milliseconds=100)), Policy.History.KeepLast(10), xcdr1)
    camera = DataWriter(participant, Topic(participant, "rt/camera/camera/color/image_raw", Image_), sensor)
    prompts = DataWriter(participant, Topic(participant, "rt/cdcca/prompt", String_), reliable)
    answers = DataReader(participant, Topic(participant, "rt/cdcca/answer", Answer_), reliable)
    pixels = [i % 251 for i in range(24 * 24 * 3)]
    deadline, got, frame = time.monotonic() + 40, 0, 0
    while got < want and time.monotonic() < deadline:
        frame += 1
        stamp = Time_(sec=1_700_000_000 + frame, nanosec=500)
        camera.write(Image_(Header_(stamp, "camera_color_optical_frame"), 24, 24, "rgb8", 0, 72, pixels))
        if frame % 5 == 0 and prompts.get_matched_subscriptions():
            prompts.write(String_("what digit is this?"))
        for answer in answers.take(N=16):
            got += 1
            print(json.dumps({"sample_id": answer.sample_id, "prompt": answer.prompt, "answer": answer.answer,
                              "entropy": answer.entropy, "version": answer.adapter_version,
                              "frame_id": answer.header.frame_id, "sec": answer.header.stamp.sec,
                              "cdr": answer.serialize().hex()}), flush=True)
        time.sleep(0.05)
''')


@pytest.fixture()
def keys(tmp_path):
    from cdcca.envelope import generate_key, trust_key

    _, public = generate_key(tmp_path / "keys", "cloud-test")
    trust_key(public, tmp_path / "trust")
    return tmp_path / "trust"


def test_the_robot_joins_a_ros2_graph_over_dds(pretrained_test_pair, keys, tmp_path):
    """A ROS-style camera process on loopback -> run_dds_edge -> answers it reads; uplink, ack, forged delta."""
    from cdcca.edge.app import build_runtime
    from cdcca.edge.dds_port import DdsEdgeSettings, run_dds_edge
    from cdcca.edge.runtime import EdgeConfig
    from cdcca.uts import UTSConfig

    # Prepare: the robot (every answer uncertain, so every answer is uploaded) and a ROS-side listener
    domain_id = free_domain_id(0)
    config = dds.loopback_config()
    all_samples = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)
    runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "edge", heartbeat_every_s=0.2,
                                                             max_frame_age_s=0.0, uts=all_samples), keys)  # fmt: skip
    stop, ready = threading.Event(), threading.Event()
    settings = DdsEdgeSettings(domain_id=domain_id, config=config)
    report: dict = {}
    robot = threading.Thread(target=lambda: report.update(run_dds_edge(runtime, "/camera/camera/color/image_raw",
                                                                       stop, settings, ready)))  # fmt: skip
    cloud_side = dds.DdsGraph(domain_id, config)  # plays zenoh-bridge-ros2dds: reads the uplink, sends acks
    uplink = cloud_side.reader("/cdcca/uts_tokens", wire.UTS_TOKENS, dds.RELIABLE)
    statuses = cloud_side.reader("/cdcca/adapter_status", wire.ADAPTER_STATUS, dds.RELIABLE)
    acks = cloud_side.writer("/cdcca/uts_ack", wire.UTS_ACK, dds.RELIABLE)
    deltas = cloud_side.writer("/cdcca/weight_delta", wire.WEIGHT_DELTA, dds.LATCHED)
    announced = _discovery_reader(cloud_side)
    script = tmp_path / "ros_camera.py"
    script.write_text(ROS_CAMERA)
    try:
        robot.start()
        assert ready.wait(20)
        # Execute: the camera process publishes frames and prompts until it has read 2 answers
        camera = subprocess.run([sys.executable, str(script), str(domain_id), config, "2"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        lines = [json.loads(line) for line in camera.stdout.splitlines() if line.startswith("{")]
        assert len(lines) >= 2, camera.stderr[-2000:]
        tokens = []
        assert wait_until(lambda: tokens.extend(dds.take_all(uplink)) or len(tokens) >= 2, timeout=10)
        uploaded = [dds.from_idl(wire.UTS_TOKENS, s) for s in tokens]
        signer = Signer.load(tmp_path / "keys" / "cloud-test.key")  # the cloud signs acks with its delta key
        acks.write(sign_ack(signer, "r1", [u.sample_id for u in uploaded], 1))
        assert wait_until(lambda: len(runtime.uplink) == 0, timeout=10)
        nodes = [n for info in dds.take_all(announced) for n in info.node_entities_info_seq]
        forged = wire.new(wire.WEIGHT_DELTA, robot_id="r1", version=1, base_version=0, codec="nf4", key_id="nobody",
                          payload=np.zeros(8, np.uint8))  # fmt: skip
        assert wait_until(lambda: deltas.matched() >= 1)
        deltas.write(forged)
        seen = []
        assert wait_until(lambda: seen.extend(dds.from_idl(wire.ADAPTER_STATUS, s) for s in dds.take_all(statuses))
                          or any(s.state == 1 for s in seen), timeout=15)  # fmt: skip
    finally:
        stop.set()
        robot.join(timeout=30)
        cloud_side.close()
        runtime.close()
    # Assert: the answers a ROS subscriber read are ours, byte-exact CDR, about the camera's frame
    first = lines[0]
    assert first["prompt"] == "what digit is this?" and first["answer"] and first["version"] == 0
    assert first["frame_id"] == "camera_color_optical_frame" and first["sec"] > 1_700_000_000
    decoded = wire.decode(wire.ANSWER, bytes.fromhex(first["cdr"]))
    assert decoded.sample_id == first["sample_id"] and decoded.answer == first["answer"]
    assert {u.sample_id for u in uploaded} >= {line["sample_id"] for line in lines[:2]}
    assert all(u.robot_id == "r1" and 0 < len(u.token_indices) < u.num_tokens for u in uploaded)
    rejected = [s for s in seen if s.state == 1]
    assert rejected[0].robot_id == "r1" and rejected[0].reason and runtime.backend.version == 0
    assert any(s.reason == "heartbeat" for s in seen)
    assert report["deltas_rejected"] == 1 and report["uplink_acked"] >= 2 and report["answers_published"] >= 2
    # The robot is the ROS 2 node cdcca_edge: camera, prompt, delta and ack readers; answer, uplink, status writers
    assert nodes and nodes[-1].node_name == "cdcca_edge"
    assert (len(nodes[-1].reader_gid_seq), len(nodes[-1].writer_gid_seq)) == (4, 3)


def test_a_sample_the_binding_cannot_decode_is_counted_and_the_link_keeps_delivering():
    """A C++ ROS node's std::string need not be UTF-8; Cyclone's Python binding raises while it takes such a
    sample. The cloud's DdsLink must count it and deliver what comes after (its poll thread used to die)."""
    domain_id = free_domain_id(1)  # the same configuration as the node test's: a domain is configured once
    link = dds.DdsLink(domain_id, dds.loopback_config(), poll_s=0.01)
    robots = dds.DdsGraph(domain_id, dds.loopback_config())
    try:
        got = []
        link.subscribe("*", "uts_tokens", lambda robot_id, msg, data: got.append(msg.sample_id))
        writer = robots.writer("/cdcca/uts_tokens", wire.UTS_TOKENS, dds.RELIABLE)

        def upload(sample_id):
            return wire.new(wire.UTS_TOKENS, header=wire.header(1, "cam"), robot_id="r1", sample_id=sample_id)

        assert wait_until(lambda: writer.write(upload("s1")) is None and got, timeout=10)
        good = wire.encode(upload("s-\u00e9"))
        bad = good.replace("s-\u00e9".encode(), b"s-\xe9?")  # same length, not UTF-8
        sample = dds.to_idl(upload("placeholder"))
        sample.serialize = lambda use_version_2=False: bad  # the bytes a C++ node would put on the wire
        writer.writer.write(sample)
        assert wait_until(lambda: link.rejected["uts_tokens"] == 1, timeout=10)
        writer.write(upload("s2"))
        assert wait_until(lambda: "s2" in got, timeout=10) and link._thread.is_alive()  # noqa: SLF001
    finally:
        link.close()
        robots.close()


def test_a_ros_camera_robot_that_is_stopped_reports_like_a_replay(pretrained_test_pair, keys, tmp_path, monkeypatch):
    # `cdcca edge --source ros:TOPIC` stopped by SIGTERM printed its summary, then failed on the report's missing
    # "queries" (exit 1, no --json): the summary and the exit code read the same keys for every source
    import functools

    from cdcca.cli import format_stats
    from cdcca.edge import dds_port
    from cdcca.edge.app import ReplaySettings, build_runtime, edge_exit_code, replay
    from cdcca.edge.runtime import EdgeConfig

    # slot 3, configured as tests/test_edge_observe.py configures it (a domain takes one configuration per process)
    monkeypatch.setattr(dds_port, "DdsEdgeSettings", functools.partial(
        dds_port.DdsEdgeSettings, domain_id=free_domain_id(3), config=dds.loopback_config()))  # fmt: skip
    runtime = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "edge"), keys)
    stop = threading.Event()
    stop.set()  # stopped at once: no frame arrived
    try:
        report = replay(runtime, ReplaySettings(source="ros:/camera/image", linger_s=0), stop)
    finally:
        runtime.stop()
        runtime.close()
    assert (report["queries"], report["answers"], report["start_version"]) == (0, 0, 0) and report["seconds"] >= 0
    assert "robot r1" in format_stats(report, "robot r1") and edge_exit_code(report) == 0
