"""The cdcca_edge lifecycle node under real rclpy (Jazzy wheels, Fast DDS): lifecycle, parameters, every stream,
bad input, and the defects issue 14 found when it first ran (numbered as there).

One node process serves the tests of this module in order (loading torch and the student takes seconds);
each test states what it needs of the node's state and leaves it as documented.
"""

import math
import time

import numpy as np
import pytest
import torch
from cdcca_msgs.msg import AdapterStatus, Answer, UtsAck, UtsTokens, WeightDelta
from cdcca_msgs.srv import Ask
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from rcl_interfaces.msg import Log
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from cdcca import wire
from cdcca.envelope import sign_ack
from cdcca.wire.images import compressed_to_msg, image_to_msg
from tests.ros.conftest import EdgeProcess, Graph, show_frame, wait_for

NODE = "/cdcca_edge"
CAMERA = "/robot/camera/image_raw"
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
ROSOUT = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
FRAME = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)  # (H, W, 3)


def to_ros(msg, ros_type):
    """The rclpy message of a cdcca.wire message (same CDR)."""
    return deserialize_message(wire.encode(msg), ros_type)


def signed_delta(checkpoints, signer, robot_id="r1", seed=0):
    from cdcca.envelope import VersionChain
    from cdcca.models.checkpoint import load_adaptable_student
    from cdcca.models.trainable import trainable_parameters

    base = {k: v.detach().clone() for k, v in trainable_parameters(load_adaptable_student(checkpoints)).items()}
    generator = torch.Generator().manual_seed(seed)
    target = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    return VersionChain(robot_id, base).make_delta(target, "fp16", signer)


class Robot:
    """The node process and the test's graph around it: publishers, collected topics."""

    def __init__(self, process, graph):
        self.process, self.graph = process, graph
        node = graph.node
        self.camera = node.create_publisher(Image, CAMERA, qos_profile_sensor_data)
        self.compressed = node.create_publisher(CompressedImage, CAMERA + "/compressed", qos_profile_sensor_data)
        self.prompts = node.create_publisher(String, "/cdcca/prompt", RELIABLE)
        self.deltas = node.create_publisher(WeightDelta, "/cdcca/weight_delta", LATCHED)
        self.acks = node.create_publisher(UtsAck, "/cdcca/uts_ack", RELIABLE)
        self.answers = graph.collect(Answer, "/cdcca/answer", RELIABLE)
        self.tokens = graph.collect(UtsTokens, "/cdcca/uts_tokens", RELIABLE)
        self.statuses = graph.collect(AdapterStatus, "/cdcca/adapter_status", RELIABLE)
        self.diagnostics = graph.collect(DiagnosticArray, "/diagnostics", 10)
        self.rosout = graph.collect(Log, "/rosout", ROSOUT)

    def frame(self, rgb=FRAME, stamp_ns=1_700_000_000_000_000_000, frame_id="camera_color_optical_frame"):
        self.camera.publish(to_ros(image_to_msg(rgb, stamp_ns, frame_id), Image))

    def wait_matched(self):
        """Until the node's subscriptions (made anew at every activate) match each of the test's publishers."""
        publishers = (self.camera, self.compressed, self.prompts, self.deltas, self.acks)
        assert wait_for(lambda: min(p.get_subscription_count() for p in publishers) >= 1, 30)

    def show(self, publish=None):
        """Publish a frame (``self.frame`` unless given) until the node has taken it; see conftest.show_frame."""
        show_frame(publish or self.frame, self.diagnostics)

    def ask(self, *prompts):
        for prompt in prompts:
            self.prompts.publish(String(data=prompt))

    def last_diagnostics(self):
        status = self.diagnostics[-1].status[0]
        return status, {kv.key: kv.value for kv in status.values}

    def wait_answers(self, count, timeout=60.0):
        assert wait_for(lambda: len(self.answers) >= count, timeout), (len(self.answers), self.process.text()[-3000:])


@pytest.fixture(scope="module")
def robot(pretrained_test_pair, ros_keys, tmp_path_factory):
    from tests.ros.conftest import _DOMAINS

    domain_id, work = next(_DOMAINS), tmp_path_factory.mktemp("edge_node")
    overrides = {  # as robot.launch.py passes them (robot_id, model_path, trust_dir, camera_topic) and a few more
        "robot_id": "r1", "checkpoints": pretrained_test_pair, "trust_dir": ros_keys[1], "camera_topic": CAMERA,
        "use_sim_time": "false",
        "state_dir": work / "state", "subscribe_compressed": "true", "uts_sample_mode": "threshold",
        "uts_entropy_threshold": -1.0, "queue_capacity": 3, "max_frame_age_s": 0.0, "heartbeat_every_s": 0.5,
        "resend_after_s": 30.0,
    }  # fmt: skip
    process = EdgeProcess(domain_id, work, overrides)
    graph = Graph(domain_id)
    robot = Robot(process, graph)
    robot.checkpoints, robot.signer = pretrained_test_pair, ros_keys[0]
    try:
        assert wait_for(lambda: NODE in [f"/{n}" for n in graph.node.get_node_names()], 60), process.text()
        yield robot
    finally:
        code = process.stop()
        graph.close()
    assert code == 0, process.text()[-3000:]


def test_an_invalid_transition_is_refused_and_the_node_lives_on(robot):
    """#1: activate while unconfigured raised RCLError out of executor.spin() on Jazzy (Kilted's rclpy refuses it
    itself)."""
    assert robot.graph.state(NODE) == "unconfigured"
    assert robot.graph.transition(NODE, Transition.TRANSITION_ACTIVATE) is False
    assert robot.graph.transition(NODE, Transition.TRANSITION_DEACTIVATE) is False
    assert robot.process.proc.poll() is None and robot.graph.state(NODE) == "unconfigured"
    text = robot.process.text()
    assert "Traceback" not in text
    assert "refused lifecycle transition" in text or "Unable to start transition 3" in text  # Jazzy, Kilted


def test_a_topic_rcl_would_refuse_is_refused_as_a_parameter(robot):
    """#6: a 248-character topic was accepted, and activate failed instead."""
    from rclpy.validate_full_topic_name import validate_full_topic_name

    too_long, longest = "/c" * 124, "/" + "c" * 246
    with pytest.raises(Exception):
        validate_full_topic_name(too_long)  # rcl's own rule...
    validate_full_topic_name(longest)
    results = robot.graph.set_parameters(NODE, camera_topic=too_long)  # ...and the node's
    assert not results[0].successful and "247" in results[0].reason
    assert robot.graph.set_parameters(NODE, camera_topic=longest)[0].successful
    assert robot.graph.set_parameters(NODE, camera_topic=CAMERA)[0].successful


def test_configure_takes_the_params_file_and_the_overrides(robot):
    assert robot.graph.transition(NODE, Transition.TRANSITION_CONFIGURE)
    assert robot.graph.state(NODE) == "inactive"
    values = robot.graph.get_parameters(NODE, "robot_id", "checkpoints", "camera_topic", "queue_capacity",
                                        "uts_sample_mode", "batch_size", "prompts")  # fmt: skip
    assert values["robot_id"] == "r1" and values["checkpoints"] == str(robot.checkpoints)
    assert values["camera_topic"] == CAMERA and values["queue_capacity"] == 3
    assert values["uts_sample_mode"] == "threshold" and values["batch_size"] == 8  # from config/edge.yaml
    assert values["prompts"] == ["what is in the picture?"]
    refused = robot.graph.set_parameters(NODE, robot_id="r2")[0]
    assert not refused.successful and "takes effect at configure" in refused.reason
    assert robot.graph.set_parameters(NODE, batch_size=4)[0].successful  # dynamic
    assert wait_for(lambda: robot.diagnostics and robot.last_diagnostics()[0].message == "inactive: not answering")


def test_active_node_answers_prompts_about_image_and_compressed_frames(robot):
    assert robot.graph.transition(NODE, Transition.TRANSITION_ACTIVATE) and robot.graph.state(NODE) == "active"
    robot.wait_matched()
    robot.show()
    robot.ask("what digit is this?", "what colour is it?")
    robot.wait_answers(2)
    first = robot.answers[0]
    assert first.prompt == "what digit is this?" and first.answer and first.adapter_version == 0
    assert first.header.frame_id == "camera_color_optical_frame" and first.header.stamp.sec == 1_700_000_000
    assert first.sample_id.startswith("r1-") and math.isfinite(first.entropy)
    grey = np.full((32, 32, 3), 90, np.uint8)
    compressed = to_ros(compressed_to_msg(grey, "png", stamp_ns=5 * 10**9, frame_id="compressed"), CompressedImage)
    robot.show(lambda: robot.compressed.publish(compressed))
    robot.ask("and now?")
    robot.wait_answers(3)
    assert robot.answers[2].header.frame_id == "compressed"
    assert "not writable" not in robot.process.text()  # #11: read-only frames made torch warn on every run


def test_the_ask_service_answers_about_the_latest_or_the_given_frame(robot):
    response = robot.graph.call(Ask, "/cdcca/ask", Ask.Request(prompt="what digit?"))
    assert response.answer and response.adapter_version == 0 and math.isfinite(response.entropy)
    request = Ask.Request(prompt="and this one?", image=to_ros(image_to_msg(FRAME, 7, "request"), Image))
    assert robot.graph.call(Ask, "/cdcca/ask", request).answer
    empty = robot.graph.call(Ask, "/cdcca/ask", Ask.Request(prompt="  "))
    assert empty.answer == "" and math.isnan(empty.entropy)


def test_no_ask_goes_unanswered_across_deactivate_and_an_inactive_node_refuses_at_once(robot):
    """Ask used to be destroyed at deactivate: the reply of an Ask in flight was lost, its client waited in vain."""
    robot.show()
    client = robot.graph.node.create_client(Ask, "/cdcca/ask")
    try:
        assert client.wait_for_service(timeout_sec=30)
        futures = [client.call_async(Ask.Request(prompt=f"in flight {i}?")) for i in range(8)]
        assert robot.graph.transition(NODE, Transition.TRANSITION_DEACTIVATE)
        assert wait_for(lambda: all(f.done() for f in futures), 30), [f.done() for f in futures]
        assert robot.graph.state(NODE) == "inactive"
        refused = robot.graph.call(Ask, "/cdcca/ask", Ask.Request(prompt="anyone there?"))
        assert refused.answer == "" and math.isnan(refused.entropy)
        assert wait_for(lambda: any("inactive (activate it to answer)" in m.msg for m in list(robot.rosout)), 10)
    finally:
        robot.graph.node.destroy_client(client)
        assert robot.graph.transition(NODE, Transition.TRANSITION_ACTIVATE)
        robot.wait_matched()
    assert robot.graph.call(Ask, "/cdcca/ask", Ask.Request(prompt="and now?")).answer


def test_a_burst_of_prompts_is_answered_whole(robot):
    """#3: prompts past 10 in a burst were lost silently (KEEP_LAST 10, prompts_dropped 0)."""
    robot.show()
    before = len(robot.answers)
    burst = [f"burst {i}?" for i in range(40)]
    robot.ask(*burst)
    robot.wait_answers(before + 40, timeout=120)
    assert [a.prompt for a in robot.answers[before:] if a.prompt.startswith("burst")] == burst
    assert wait_for(lambda: robot.last_diagnostics()[1]["prompts_dropped"] == "0")


def test_uncertain_samples_go_up_and_acks_empty_the_queue(robot):
    assert wait_for(lambda: len(robot.tokens) >= 3)
    uploaded = robot.tokens[-1]
    assert uploaded.robot_id == "r1" and 0 < len(uploaded.token_indices) < uploaded.num_tokens
    ids = sorted({t.sample_id for t in robot.tokens})
    unsigned = UtsAck(robot_id="r1", sample_ids=ids, sequence=2**62)  # issue 15 D6: deletes nothing
    robot.acks.publish(unsigned)
    assert wait_for(lambda: robot.last_diagnostics()[1]["rejected_acks"] == "1", 10)
    assert robot.last_diagnostics()[1]["uplink_queue_depth"] != "0"
    robot.acks.publish(to_ros(sign_ack(robot.signer, "r1", ids, time.time_ns()), UtsAck))  # the cloud's
    assert wait_for(lambda: robot.last_diagnostics()[1]["uplink_queue_depth"] == "0", 10)
    assert any("[cdcca.edge.runtime] uplink queue full" in m.msg for m in robot.rosout)  # #7: core INFO on /rosout


def test_a_signed_delta_is_applied_and_answers_carry_its_version(robot):
    delta = signed_delta(robot.checkpoints, robot.signer)
    robot.deltas.publish(to_ros(delta, WeightDelta))
    assert wait_for(lambda: any(s.version == 1 and s.reason != "heartbeat" for s in robot.statuses), 30)
    applied = [s for s in robot.statuses if s.version == 1 and s.reason != "heartbeat"][0]
    assert applied.state == AdapterStatus.STATE_APPLIED and applied.robot_id == "r1"
    robot.show()
    robot.ask("after the update?")
    assert wait_for(lambda: robot.answers[-1].prompt == "after the update?", 30)
    assert robot.answers[-1].adapter_version == 1
    assert wait_for(lambda: any(s.reason == "heartbeat" and s.version == 1 for s in robot.statuses), 5)


def test_reactivating_does_not_reject_the_latched_delta_again(robot):
    """#2: the latched delta came again after deactivate/activate: REJECTED 'not newer' and a WARN."""
    statuses = len(robot.statuses)
    assert robot.graph.transition(NODE, Transition.TRANSITION_DEACTIVATE)
    assert wait_for(lambda: robot.deltas.get_subscription_count() == 0, 10)
    assert robot.graph.transition(NODE, Transition.TRANSITION_ACTIVATE)
    robot.wait_matched()
    time.sleep(2.0)  # the transient-local delta is delivered to the new subscription
    assert not any(s.state == AdapterStatus.STATE_REJECTED for s in robot.statuses[statuses:])
    assert wait_for(lambda: robot.last_diagnostics()[0].level == b"\x00"
                    and robot.last_diagnostics()[1]["rejected_deltas"] == "0", 5), robot.last_diagnostics()


def test_a_delta_for_another_robot_is_ignored_without_a_status(robot):
    """#10: a delta addressed to another robot made a REJECTED status and a WARN."""
    statuses = len(robot.statuses)
    robot.deltas.publish(to_ros(signed_delta(robot.checkpoints, robot.signer, robot_id="r2"), WeightDelta))
    assert wait_for(lambda: robot.last_diagnostics()[1]["foreign_deltas"] == "1", 10)
    assert not any(s.state == AdapterStatus.STATE_REJECTED for s in robot.statuses[statuses:])
    assert robot.last_diagnostics()[0].level == b"\x00"


def test_bad_input_is_counted_and_logged_once_and_the_node_serves_on(robot):
    """Malformed CDR, an unreadable encoding, a forged delta; #7: its rejection reaches /rosout exactly once."""
    robot.deltas.publish(b"\x00\x01\x00\x00\xff\xff")  # serialized bytes that are no WeightDelta
    depth = Image(height=2, width=2, encoding="32FC1", step=8, data=bytes(16))  # 16UC1 now reads as grey
    robot.show(lambda: robot.camera.publish(depth))
    robot.ask("about a depth image?")
    assert wait_for(lambda: robot.last_diagnostics()[1]["frames_rejected"] == "1", 10)
    forged = signed_delta(robot.checkpoints, robot.signer, seed=1)
    forged.version, forged.key_id = 5, "mallory"
    robot.deltas.publish(to_ros(forged, WeightDelta))
    assert wait_for(lambda: any(s.state == AdapterStatus.STATE_REJECTED for s in robot.statuses), 10)
    assert wait_for(lambda: robot.last_diagnostics()[1]["malformed_messages"] == "1", 5)
    # /rosout is a topic of its own: its message may arrive after the status and the diagnostics
    assert wait_for(lambda: any("rejected delta v5" in m.msg for m in robot.rosout), 10)
    time.sleep(0.5)  # a second copy, if the node logged it twice, would be here by now
    rejections = [m for m in robot.rosout if "rejected delta v5" in m.msg]
    assert len(rejections) == 1 and rejections[0].name == "cdcca_edge", [m.msg for m in rejections]
    assert robot.process.text().count("rejected delta v5") == 1
    robot.show()
    robot.ask("still there?")
    assert wait_for(lambda: robot.answers[-1].prompt == "still there?", 30)


def test_an_idle_active_node_uses_almost_no_cpu(robot):
    """#12: an active node with no input used 6.5 % of a core (a 20 ms poll timer)."""
    time.sleep(1.0)
    before, started = robot.process.cpu_seconds(), time.monotonic()
    time.sleep(4.0)
    share = (robot.process.cpu_seconds() - before) / (time.monotonic() - started)
    assert share < 0.03, f"{share:.1%} of a core while idle"


def test_cleanup_with_answers_pending_finishes_them_first(robot):
    """#4: cleanup while answers were pending logged KeyError('answer') and closed the runtime under them."""
    robot.show()
    robot.ask(*[f"pending {i}?" for i in range(12)])
    time.sleep(0.2)
    assert robot.graph.transition(NODE, Transition.TRANSITION_DEACTIVATE)
    assert robot.graph.transition(NODE, Transition.TRANSITION_CLEANUP)
    assert robot.graph.state(NODE) == "unconfigured"
    text = robot.process.text()
    assert "KeyError" not in text and "publishing answer failed" not in text and "Traceback" not in text
