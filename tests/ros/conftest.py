"""Tests under real ROS 2 (rclpy on rmw_fastrtps_cpp), run by ``make test`` in ``.venv-ros-<distro>`` with
``ros2_ws/install-<distro>`` sourced. In an environment without rclpy these files are not collected at all (see
the report header).

Every test keeps DDS traffic on loopback (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) and uses a domain id of its
own, so tests never see each other's nodes.
"""

import itertools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

try:
    import rclpy
except ImportError:  # the core venv: `make test` runs these in .venv-ros-<distro>
    rclpy = None

collect_ignore_glob = [] if rclpy is not None else ["test_*.py"]

ROOT = Path(__file__).resolve().parents[2]
INSTALL = Path(os.environ.get("CDCCA_ROS_INSTALL", ROOT / "ros2_ws" / "install-jazzy"))  # the colcon install of ros2_ws
EDGE_NODE = INSTALL / "cdcca_edge" / "lib" / "cdcca_edge" / "edge_node"
EDGE_YAML = INSTALL / "cdcca_edge" / "share" / "cdcca_edge" / "config" / "edge.yaml"
_DOMAINS = itertools.count(100 + os.getpid() % 50)  # 100..231: distinct per test, valid for Fast DDS


def pytest_report_header(config):
    if rclpy is None:
        return "tests/ros: not collected (no rclpy here); `make test` runs them in .venv-ros-jazzy and .venv-ros-kilted"
    from rclpy.utilities import get_rmw_implementation_identifier

    return (f"tests/ros: rclpy from {Path(rclpy.__file__).parent} on {get_rmw_implementation_identifier()}, "
            f"installed workspace {INSTALL}")


@pytest.fixture()
def domain_id():
    return next(_DOMAINS)


def wait_for(condition, timeout: float = 20.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def frames_received(diagnostics: list) -> int:
    """The node's count of camera frames taken, from the latest /diagnostics report collected (-1 before any)."""
    if not diagnostics:
        return -1
    values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
    return int(values["frames_received"])


def show_frame(publish, diagnostics: list, timeout: float = 30.0, every: float = 2.5) -> None:
    """Publish a camera frame until the node's diagnostics count it taken. A camera publishes best effort, and under
    load a reader matched a moment ago can miss the first samples (or take them after a prompt sent later on another
    topic): a fixed sleep before asking lost that race in a fresh-clone CI run. A resend is the same frame again."""
    reports = len(diagnostics)  # the count from a report made after this call: the last one may be a second old
    assert wait_for(lambda: len(diagnostics) > reports, timeout), "no /diagnostics report from the node"
    before, deadline = frames_received(diagnostics), time.monotonic() + timeout
    while time.monotonic() < deadline:
        publish()
        if wait_for(lambda: frames_received(diagnostics) > before, every):
            return
    raise AssertionError(f"the node took no frame in {timeout:.0f} s (frames_received {frames_received(diagnostics)})")


def ros_env(domain_id: int, cache: Path | None = None) -> dict:
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain_id), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("ROS_LOCALHOST_ONLY", None)
    if cache is not None:
        env["CDCCA_CACHE"] = str(cache)
    return env


class Graph:
    """The test's own participant: an rclpy context on ``domain_id`` with one node spun on a thread."""

    def __init__(self, domain_id: int, name: str = "tester") -> None:
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shutdown while spinning
            pass

    def collect(self, msg_type, topic: str, qos=10, raw: bool = False) -> list:
        """Every message that arrives on ``topic``, appended to the returned list."""
        got: list = []
        self.node.create_subscription(msg_type, topic, got.append, qos, raw=raw)
        return got

    def call(self, srv_type, name: str, request, timeout: float = 30.0):
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"{name} not available"
            future = client.call_async(request)
            assert wait_for(future.done, timeout), f"{name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def transition(self, node: str, transition_id: int) -> bool:
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request()
        request.transition.id = transition_id
        return self.call(ChangeState, f"{node}/change_state", request).success

    def state(self, node: str) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"{node}/get_state", GetState.Request()).current_state.label

    def set_parameters(self, node: str, **values) -> list:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        request = SetParameters.Request(parameters=parameters)
        return list(self.call(SetParameters, f"{node}/set_parameters", request).results)

    def get_parameters(self, node: str, *names: str) -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self.call(GetParameters, f"{node}/get_parameters", GetParameters.Request(names=list(names)))
        return {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)


class EdgeProcess:
    """The installed ``cdcca_edge`` node (``lib/cdcca_edge/edge_node``, as ``ros2 run`` starts it) with the
    package's ``config/edge.yaml`` and ``-p`` overrides, its output in ``log``."""

    def __init__(self, domain_id: int, work: Path, overrides: dict, ros_args: tuple = ()) -> None:
        args = [str(EDGE_NODE), "--ros-args", "--params-file", str(EDGE_YAML)]
        for name, value in overrides.items():
            args += ["-p", f"{name}:={value}"]
        args += list(ros_args)
        self.log = work / "edge_node.log"
        self._out = self.log.open("w")
        self.proc_env = ros_env(domain_id, work / "cache")
        self.proc = subprocess.Popen(args, env=self.proc_env, stdout=self._out,
                                     stderr=subprocess.STDOUT)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def ros_keys(tmp_path_factory):
    from cdcca.envelope import Signer, generate_key, trust_key

    work = tmp_path_factory.mktemp("keys")
    private, public = generate_key(work / "keys", "cloud-ros")
    trust_key(public, work / "trust")
    return Signer.load(private), work / "trust", private
