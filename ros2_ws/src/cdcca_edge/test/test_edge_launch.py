"""
launch_testing of robot.launch.py and cdcca_edge (needs ROS 2 Jazzy; skipped elsewhere).

Starts robot.launch.py on a tiny test-preset checkpoint built here (cdcca pretrain, seconds), then
checks: the node comes up active and publishes on /cdcca/adapter_status and /diagnostics
(WaitForTopics); a camera frame plus the Ask service gives an answer; a prompt on
/cdcca/prompt gives an Answer; deactivate/activate transitions; a bag written by
cdcca.bag.make_stream_bag and played with `ros2 bag play` produces answers.
launch_testing docs: docs.ros.org/en/jazzy/p/launch_testing.
"""

import os
import subprocess
import tempfile
import time
import unittest

import pytest

pytest.importorskip(
    'launch_testing', reason='launch_testing comes with ROS 2 Jazzy (source /opt/ros/jazzy)')
pytest.importorskip('cdcca', reason='the cdcca core library must be installed in this Python')

from cdcca.bag import image_to_msg, make_stream_bag  # noqa: E402,I100 (after importorskip)
from cdcca.envelope import generate_key, trust_key  # noqa: E402
from cdcca.pretrain import pretrain, PretrainConfig  # noqa: E402
from cdcca_msgs.msg import AdapterStatus, Answer  # noqa: E402
from cdcca_msgs.srv import Ask  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
import launch  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_ros.substitutions import FindPackageShare  # noqa: E402
import launch_testing.actions  # noqa: E402
from launch_testing_ros import WaitForTopics  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from cdcca import wire  # noqa: E402,I100

WORK = tempfile.mkdtemp(prefix='cdcca_edge_test_')


def build_fixture():
    """Build a test-preset checkpoint, a trusted key and a short stream bag under WORK."""
    checkpoints = os.path.join(WORK, 'checkpoints')
    pretrain(PretrainConfig(preset='test', vision_steps=2, teacher_steps=4, student_steps=4,
                            batch_size=8, checkpoint_every=4, out_dir=checkpoints), progress=False)
    _, public = generate_key(os.path.join(WORK, 'keys'), 'cloud-test')
    trust_key(public, os.path.join(WORK, 'trust'))
    make_stream_bag(os.path.join(WORK, 'bag'), domains=('printed',), limit=2)
    return checkpoints


@pytest.mark.launch_test
def generate_test_description():
    """robot.launch.py with the test checkpoint; the state goes to a temporary cache."""
    checkpoints = build_fixture()
    robot = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(launch.substitutions.PathJoinSubstitution(
            [FindPackageShare('cdcca_edge'), 'launch', 'robot.launch.py'])),
        launch_arguments={'model_path': checkpoints,
                          'trust_dir': os.path.join(WORK, 'trust')}.items())
    return launch.LaunchDescription([
        launch.actions.SetEnvironmentVariable('CDCCA_CACHE', os.path.join(WORK, 'cache')),
        robot,
        launch_testing.actions.ReadyToTest(),
    ])


def camera_frame(node):
    """Return a sensor_msgs/Image built by cdcca.bag (same CDR) as an rclpy message."""
    rgb = (np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)
    data = wire.encode(image_to_msg(rgb, time.time_ns(), 'camera_color_optical_frame'))
    return deserialize_message(data, Image)


class TestEdgeNode(unittest.TestCase):
    """The node as launched by robot.launch.py."""

    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node('cdcca_edge_tester')

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def call(self, srv_type, name, request, timeout=60.0):
        client = self.node.create_client(srv_type, name)
        self.assertTrue(client.wait_for_service(timeout_sec=timeout), f'{name} not available')
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        self.node.destroy_client(client)
        self.assertIsNotNone(future.result(), f'{name} did not answer')
        return future.result()

    def state(self):
        return self.call(GetState, '/cdcca_edge/get_state', GetState.Request()).current_state.label

    def wait_active(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state() == 'active':
                return
            time.sleep(0.5)
        self.fail('cdcca_edge did not become active')

    def ask_with_frame(self, prompt):
        camera = self.node.create_publisher(Image, '/camera/camera/color/image_raw', 10)
        for _ in range(20):
            camera.publish(camera_frame(self.node))
            rclpy.spin_once(self.node, timeout_sec=0.05)
        return self.call(Ask, '/cdcca/ask', Ask.Request(prompt=prompt))

    def test_1_active_and_publishing(self):
        self.wait_active()
        waiter = WaitForTopics([('/cdcca/adapter_status', AdapterStatus),
                                ('/diagnostics', DiagnosticArray)], timeout=30.0)
        try:  # not `with`: its __enter__ raises on a timeout and leaves the spin thread running
            self.assertTrue(waiter.wait(), f'no message on {waiter.topics_not_received()}')
        finally:
            waiter.shutdown()

    def test_2_ask_service(self):
        self.wait_active()
        response = self.ask_with_frame('what digit is this?')
        self.assertNotEqual(response.answer, '')
        self.assertEqual(response.adapter_version, 0)
        self.assertTrue(np.isfinite(response.entropy))

    def test_3_prompt_topic_gives_answer(self):
        self.wait_active()
        answers = []
        sub = self.node.create_subscription(Answer, '/cdcca/answer', answers.append, 10)
        prompts = self.node.create_publisher(String, '/cdcca/prompt', 10)
        camera = self.node.create_publisher(Image, '/camera/camera/color/image_raw', 10)
        deadline = time.monotonic() + 60
        while not answers and time.monotonic() < deadline:
            camera.publish(camera_frame(self.node))
            prompts.publish(String(data='is the digit odd or even?'))
            rclpy.spin_once(self.node, timeout_sec=0.5)
        self.node.destroy_subscription(sub)
        self.assertTrue(answers, 'no Answer on /cdcca/answer')
        self.assertEqual(answers[0].prompt, 'is the digit odd or even?')
        self.assertEqual(answers[0].header.frame_id, 'camera_color_optical_frame')

    def test_4_lifecycle_transitions(self):
        self.wait_active()
        deactivate = ChangeState.Request()
        deactivate.transition.id = 4  # lifecycle_msgs/Transition.TRANSITION_DEACTIVATE
        self.assertTrue(self.call(ChangeState, '/cdcca_edge/change_state', deactivate).success)
        self.assertEqual(self.state(), 'inactive')
        activate = ChangeState.Request()
        activate.transition.id = 3  # TRANSITION_ACTIVATE
        self.assertTrue(self.call(ChangeState, '/cdcca_edge/change_state', activate).success)
        self.assertEqual(self.state(), 'active')

    def test_5_bag_replay_produces_answers(self):
        self.wait_active()
        answers = []
        sub = self.node.create_subscription(Answer, '/cdcca/answer', answers.append, 100)
        play = subprocess.Popen(['ros2', 'bag', 'play', os.path.join(WORK, 'bag'), '--delay', '2'])
        deadline = time.monotonic() + 120
        while (play.poll() is None or len(answers) < 2) and time.monotonic() < deadline:
            rclpy.spin_once(self.node, timeout_sec=0.2)
        play.wait(timeout=10)
        self.node.destroy_subscription(sub)
        self.assertEqual(play.returncode, 0)
        self.assertGreaterEqual(len(answers), 2, 'replayed prompts were not answered')
