"""End to end under ROS 2, in one test: an rclpy camera publisher -> the real cdcca_edge node -> the cloud trainer
-> a signed delta -> hot-swap -> an Answer with the new version.

The cloud joins the robot's DDS graph directly (:class:`cdcca.transport.dds.DdsLink`, Cyclone DDS, ROS 2
wire-compatible), as a cloud on the robot's LAN would in the paper's real-world setup. zenoh-bridge-ros2dds, the
path to a remote cloud, cannot be installed here; the Zenoh side of that path is tested in tests/test_edge_runtime.py.
"""

import threading
import time

import numpy as np
from cdcca_msgs.msg import AdapterStatus, Answer
from lifecycle_msgs.msg import Transition
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from cdcca.akd import AKDConfig
from cdcca.data.digits_shift import load_domain
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.transport.dds import DdsLink
from cdcca.wire.images import image_to_msg
from cloud_trainer.service import CloudConfig, CloudTrainer
from tests.ros.conftest import EdgeProcess, Graph, wait_for
from tests.ros.test_edge_node import to_ros

NODE = "/cdcca_edge"
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def test_camera_to_node_to_cloud_and_back_under_ros(pretrained_test_pair, ros_keys, tmp_path, domain_id, monkeypatch):
    signer, trust = ros_keys
    checkpoints = pretrained_test_pair
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    samples = load_domain("printed", "stream", limit=2)[:6]  # 6 prompts about 2 images: one round
    overrides = {"robot_id": "r1", "checkpoints": checkpoints, "trust_dir": trust, "state_dir": tmp_path / "state",
                 "uts_sample_mode": "threshold", "uts_entropy_threshold": -1.0, "max_frame_age_s": 0.0,
                 "heartbeat_every_s": 0.5}  # fmt: skip
    robot = EdgeProcess(domain_id, tmp_path, overrides)
    link = DdsLink(domain_id, node_name="cdcca_cloud")
    config = CloudConfig(state_dir=tmp_path / "cloud", round_size=6, codec="nf4-zstd",
                         akd=AKDConfig(steps=3, batch_size=4))  # fmt: skip
    trainer = CloudTrainer(load_mllm(checkpoints / "teacher"), lambda: load_adaptable_student(checkpoints), signer,
                           config, link)  # fmt: skip
    stop = threading.Event()
    server = threading.Thread(target=trainer.serve, args=(stop,), daemon=True)
    graph = Graph(domain_id, "camera")
    try:
        camera = graph.node.create_publisher(Image, "/camera/camera/color/image_raw", qos_profile_sensor_data)
        prompts = graph.node.create_publisher(String, "/cdcca/prompt", RELIABLE)
        answers = graph.collect(Answer, "/cdcca/answer", RELIABLE)
        statuses = graph.collect(AdapterStatus, "/cdcca/adapter_status", RELIABLE)
        assert wait_for(lambda: "cdcca_edge" in graph.node.get_node_names(), 60), robot.text()
        assert graph.transition(NODE, Transition.TRANSITION_CONFIGURE)
        assert graph.transition(NODE, Transition.TRANSITION_ACTIVATE)
        server.start()
        assert wait_for(lambda: camera.get_subscription_count() >= 1 and prompts.get_subscription_count() >= 1, 30)
        time.sleep(0.5)  # and the node's side of the match
        # The camera shows each sample's image and the prompt about it is asked
        for sample in samples:
            camera.publish(to_ros(image_to_msg(np.asarray(sample.load_image()), time.time_ns(), "camera"), Image))
            time.sleep(0.2)
            prompts.publish(String(data=sample.prompt))
            assert wait_for(lambda: answers and answers[-1].prompt == sample.prompt, 30), robot.text()[-3000:]
        assert answers[0].adapter_version == 0  # the pretrained base answers first
        assert len(answers) == 6
        # The cloud stores every uploaded sample, trains a round and sends a signed delta; the node swaps it in
        assert wait_for(lambda: trainer.store.count() >= 6, 30), (trainer.stats(), robot.text()[-2000:])
        assert wait_for(lambda: trainer.counters.deltas_sent >= 1, 120), trainer.stats()
        applied = (AdapterStatus.STATE_APPLIED, 1)
        assert wait_for(lambda: any((s.state, s.version) == applied and s.reason != "heartbeat" for s in statuses),
                        60), robot.text()[-3000:]  # fmt: skip
        assert wait_for(lambda: trainer.robots["r1"].reported == 1, 10)  # the cloud heard the robot's status
        prompts.publish(String(data="and after the update?"))
        assert wait_for(lambda: answers[-1].prompt == "and after the update?", 30)
        assert answers[-1].adapter_version == 1
    finally:
        stop.set()
        server.join(timeout=60)
        graph.close()
        code = robot.stop()
        link.close()
        trainer.close()
    assert code == 0, robot.text()[-3000:]
