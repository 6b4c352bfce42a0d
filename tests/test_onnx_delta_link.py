"""End to end over the link: a running ``cdcca edge --backend onnx`` (no torch in its process) receives a signed
WeightDelta the cloud side publishes on Zenoh loopback, applies it and reports AdapterStatus APPLIED (issue 19).

This test process plays the cloud: it listens on a loopback endpoint, as ``cdcca cloud`` does, builds the delta as
the cloud trainer does (``VersionChain.make_delta`` with the cloud's default codec and a ``Signer``) and publishes it
on the robot's ``weight_delta`` topic until the robot's ``adapter_status`` says v1 is applied. The robot is the CLI
in a subprocess (``--linger -1``: it keeps serving after its frames are answered) and stops on SIGTERM, then reports
which torch-stack modules it ever imported.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdcca import wire
from cdcca.transport import Link, LinkConfig
from tests.test_edge_torch_free import onnx_robot_files
from tests.test_transport import free_port

REPO = Path(__file__).resolve().parents[1]
ROBOT_ID = "r_link"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
APPLY_TIMEOUT_S = 120.0


# The robot's process: the CLI until SIGTERM, then one RESULT line (exit status, torch-stack modules ever imported)
ROBOT = """
import json, sys
from cdcca.cli import main
code = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "bitsandbytes"))
print("RESULT " + json.dumps({"code": code, "heavy": heavy}), flush=True)
"""


@pytest.fixture(scope="module")
def cloud_side(pretrained_test_pair, tmp_path_factory):
    """An export of the pretrained ``test`` student, frames, the cloud's key (trusted by the robot) and a signed
    keyframe delta to a perturbed adapter, as the cloud trainer would send it."""
    return onnx_robot_files(pretrained_test_pair, tmp_path_factory.mktemp("onnx_link"), ROBOT_ID)


def test_a_running_onnx_robot_applies_a_delta_published_on_the_link(cloud_side):
    # Prepare: the cloud's end of the link, listening; the robot connects to it
    endpoint = f"tcp/127.0.0.1:{free_port()}"
    cloud = Link(LinkConfig.loopback(True, endpoint))
    statuses: queue.Queue = queue.Queue()
    cloud.subscribe(ROBOT_ID, "adapter_status", lambda _robot, msg, _data: statuses.put(msg))
    state = cloud_side["root"] / "state"
    args = ["edge", "--backend", "onnx", "--model", str(cloud_side["export"]), "--source",
            f"dir:{cloud_side['frames']}", "--linger", "-1", "--robot-id", ROBOT_ID,
            "--trust", str(cloud_side["trust"]), "--state", str(state), "--endpoint", endpoint, "--no-status-line",
            "--threads", "1",
            "--prompt", "what digit is this?"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    robot = subprocess.Popen([sys.executable, "-c", ROBOT, json.dumps(args)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    applied, seen = None, []
    try:
        # Execute: publish the delta (again every second: the robot may not have subscribed yet) until it reports v1
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        next_send = 0.0
        while applied is None and time.monotonic() < deadline and robot.poll() is None:
            if time.monotonic() >= next_send:
                cloud.publish(ROBOT_ID, "weight_delta", cloud_side["delta_msg"])
                next_send = time.monotonic() + 1.0
            try:
                status = statuses.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append((int(status.version), int(status.state), status.reason))
            if int(status.version) == 1 and int(status.state) == wire.APPLIED:
                applied = status
    finally:
        if robot.poll() is None:
            robot.send_signal(signal.SIGTERM)
        try:
            out, err = robot.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            robot.kill()
            out, err = robot.communicate()
        cloud.close()

    # Assert: APPLIED v1 over the link, persisted, and the robot's process never imported the torch stack
    assert applied is not None, f"statuses seen: {seen}\nrobot stderr:\n{err[-3000:]}"
    assert applied.robot_id == ROBOT_ID and applied.reason == ""
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the robot did not report (exit {robot.returncode}):\n{err[-3000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["heavy"] == []
    assert (state / "onnx_adapter" / "adapter.safetensors").is_file()  # v1 persisted before it was reported
    assert all(state_ != wire.REJECTED or version == 1 for version, state_, _ in seen)  # only resends were refused
