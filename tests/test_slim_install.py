"""`pip install cdcca[edge]` in a fresh venv: the robot's install, without torch (issue 19, "a slim robot install").

The venv is built from nothing (no system site-packages) and gets the package and its dependencies from the
package index the way a robot would; nothing of this test's own environment leaks in. It then runs the ONNX robot on
an export made here (export needs the cloud install) and checks that the cloud's verbs say which install they need.
Where no package index can be reached, the test is skipped with that reason.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_edge_torch_free import PROMPTS, robot_files  # noqa: F401  (the export, frames and trust store)
from tests.test_transport import free_port

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
           "Failed to establish a new connection", "ConnectTimeout", "Max retries exceeded")  # fmt: skip


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory):
    """A fresh venv with `pip install <repo>[edge]`: its python, or a skip when no package index is reachable."""
    root = tmp_path_factory.mktemp("slim")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"{REPO}[edge]"], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    if done.returncode != 0 and any(marker in done.stdout + done.stderr for marker in OFFLINE):
        pytest.skip(f"no package index reachable to build the slim venv: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return python, env


def test_the_edge_install_has_no_torch_and_runs_the_onnx_robot(slim_venv, robot_files):  # noqa: F811
    # Prepare
    python, env = slim_venv
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            env=env, check=True)  # fmt: skip
    installed = {row["name"].lower() for row in json.loads(listed.stdout)}
    args = ["edge", "--backend", "onnx", "--model", str(robot_files["export"]), "--source",
            f"dir:{robot_files['frames']}", "--linger", "0", "--trust", str(robot_files["trust"]), "--state",
            str(robot_files["root"] / "slim_state"), "--endpoint", f"tcp/127.0.0.1:{free_port()}",
            "--no-status-line", "--json", str(robot_files["root"] / "slim.json")]  # fmt: skip
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    # Execute: the installed console script, from a folder outside the repository
    robot = subprocess.run([str(python.parent / "cdcca"), *args], capture_output=True, text=True, env=env,
                           cwd=robot_files["root"], timeout=300)  # fmt: skip
    cloud = subprocess.run([str(python.parent / "cdcca"), "cloud"], capture_output=True, text=True, env=env,
                           cwd=robot_files["root"], timeout=120)  # fmt: skip
    # Assert: no heavy package installed; every prompt answered (exit 3: no cloud listens); `cloud` says what to do
    assert not installed & {"torch", "transformers", "peft", "bitsandbytes", "onnx"}
    assert {"onnxruntime", "eclipse-zenoh", "rosbags", "cryptography", "zstandard", "numpy"} <= installed
    assert robot.returncode == 3, robot.stderr[-2000:]
    report = json.loads((robot_files["root"] / "slim.json").read_text())
    assert report["answers"] == 3 * len(PROMPTS)
    lines = [line for line in cloud.stderr.splitlines() if line.strip()]
    assert cloud.returncode == 2 and len(lines) == 1 and "pip install 'cdcca[cloud]'" in lines[0]
