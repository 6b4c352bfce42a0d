"""An rclpy node on Fast DDS and the project's raw Cyclone DDS participant (cdcca.transport.dds, in a process of
its own as on a robot) in one ROS 2 graph: every topic the robot uses crosses both ways, byte-exact, and the raw
participant is a ROS 2 node that rclpy lists. This is what lets ``cdcca edge --source ros:TOPIC`` (no rclpy)
serve a ROS camera, and a cloud on the robot's LAN join its DDS graph directly."""

import json
import subprocess
import sys
import textwrap
import threading

from cdcca_msgs.msg import AdapterStatus, Answer, UtsAck, UtsTokens, WeightDelta
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from cdcca import wire
from tests.ros.conftest import ROOT, Graph, ros_env, wait_for
from tests.ros.test_cdr import CASES, wire_message

ROS_TYPES = {Image: "/camera/camera/color/image_raw", CompressedImage: "/camera/camera/color/image_raw/compressed",
             String: "/cdcca/prompt", Answer: "/cdcca/answer", UtsTokens: "/cdcca/uts_tokens",
             UtsAck: "/cdcca/uts_ack", WeightDelta: "/cdcca/weight_delta",
             AdapterStatus: "/cdcca/adapter_status"}  # fmt: skip
TOPICS = [(type_name, ros_type, values) for type_name, ros_type, values in CASES if ros_type in ROS_TYPES]
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
RAW_SIDE = textwrap.dedent("""
    import json, sys, time
    from cdcca import wire
    from cdcca.transport import dds
    from tests.ros.test_interop import ROS_TYPES, TOPICS, wire_message

    graph = dds.DdsGraph(node_name="cdcca_raw")  # domain and discovery from the ROS environment, as rcl reads them
    ends = [(ROS_TYPES[r], t, graph.reader(ROS_TYPES[r], t, dds.RELIABLE), graph.writer(ROS_TYPES[r], t, dds.RELIABLE),
             wire_message(t, v)) for t, r, v in TOPICS]
    reported = set()
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline and len(reported) < len(ends):
        for topic, type_name, reader, writer, msg in ends:
            writer.write(msg)  # until the rclpy side has had it (it stops us when it has all)
            for sample in dds.take_all(reader):
                if topic not in reported:
                    reported.add(topic)
                    print(json.dumps({"topic": topic, "cdr": wire.encode(dds.from_idl(type_name, sample)).hex()}),
                          flush=True)
        time.sleep(0.1)
    time.sleep(float(sys.argv[2]))
    graph.close()
""")



def unpadded(data: bytes, expected: bytes) -> bytes:
    """Serialized bytes without the trailing padding to 4 bytes: Cyclone pads a payload and says how much in the
    encapsulation options' last two bits (DDS-XTypes 1.3, 7.6.3.1.2), but a sample can also arrive padded with
    zeros the options do not announce; Fast DDS does not pad, so equal messages can differ there. Only zeros that
    take ``expected``'s length to the next multiple of 4 count as padding."""
    data = data[: len(data) - (data[3] & 0x3)] if len(data) >= 4 else data
    tail = data[len(expected):]
    if data.startswith(expected) and len(data) % 4 == 0 and len(tail) < 4 and not any(tail):
        return data[: len(expected)]
    return data

def test_every_topic_crosses_both_ways_and_the_raw_node_is_listed(domain_id, tmp_path):
    ros = Graph(domain_id, "rclpy_side")
    script = tmp_path / "raw_side.py"
    script.write_text(RAW_SIDE)
    env = {**ros_env(domain_id), "PYTHONPATH": f"{ROOT}:{ros_env(domain_id).get('PYTHONPATH', '')}"}
    errors = tmp_path / "raw_side.err"  # a file, not a pipe: nobody reads stderr while the test runs
    with errors.open("w") as stderr:
        raw = subprocess.Popen([sys.executable, str(script), "40", "5"], env=env, stdout=subprocess.PIPE, stderr=stderr,
                               text=True)  # fmt: skip
    try:
        received = {topic: ros.collect(ros_type, topic, RELIABLE, raw=True) for ros_type, topic in ROS_TYPES.items()}
        publishers = {topic: ros.node.create_publisher(ros_type, topic, RELIABLE)
                      for ros_type, topic in ROS_TYPES.items()}  # fmt: skip
        expected = {ROS_TYPES[r]: wire.encode(wire_message(t, v)) for t, r, v in TOPICS}
        assert wait_for(lambda: "cdcca_raw" in ros.node.get_node_names(), 30), ros.node.get_node_names()

        lines: list[str] = []  # what the raw side has reported so far, read as it goes

        def read_reports() -> None:
            for line in raw.stdout:
                lines.append(line)

        reader = threading.Thread(target=read_reports, daemon=True)
        reader.start()

        def publish_all_until_received() -> bool:  # Fast DDS -> Cyclone: serialized bytes, as the node publishes
            for topic, publisher in publishers.items():
                publisher.publish(expected[topic])
            # our own samples arrive here at once (local delivery): go on until the raw side has had every topic too,
            # since a sample published before its reader matched our writer is not delivered to it
            return all(received.values()) and len(lines) >= len(expected)

        assert wait_for(publish_all_until_received, 40, every=0.2), ({t: len(v) for t, v in received.items()}, lines)
        for topic, data in received.items():  # Cyclone -> Fast DDS (or the node's own sample, whichever came first)
            assert unpadded(bytes(data[0]), expected[topic]) == expected[topic], topic
        raw.wait(timeout=60)  # it stops once it has had every topic, after a last 5 s of serving
        reader.join(timeout=10)
    finally:
        raw.kill()
        ros.close()
    reported = {line["topic"]: bytes.fromhex(line["cdr"]) for line in map(json.loads, lines)}
    assert reported == expected, errors.read_text()[-2000:]
