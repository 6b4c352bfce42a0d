"""colcon builds and tests the ROS 2 packages of this repository, as a Jazzy workspace would.

The real colcon (colcon-core with colcon-ros, which builds ``ament_python`` packages) runs on copies of the
packages in a temporary workspace. ``cdcca_msgs`` is an ``ament_cmake`` package whose build needs rosidl from a
ROS 2 underlay, which this machine lacks, so each build here treats it as coming from the underlay
(``--packages-ignore cdcca_msgs``), as it does once ``/opt/ros/jazzy`` is sourced. What these tests pin down is
everything colcon itself decides: package discovery and order, the install layout ``ros2 run`` and
``ros2 launch`` look in (ament index marker, ``lib/<pkg>`` executables, ``share/<pkg>`` launch/config), the
environment hooks of ``install/setup.sh``, and ``colcon test`` running the package's own tests (which skip
without ROS, each with its reason).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
COLCON = Path(sys.executable).parent / "colcon"
BASE_PATHS = ("--base-paths", "src/cd-cca", "src/cd-cca/ros2_ws/src")  # the README's: the core, then ros2_ws/src
pytestmark = pytest.mark.skipif(not COLCON.exists(), reason="colcon is a dev dependency: pip install -e '.[dev]'")


def _colcon(workspace: Path, *args: str) -> str:
    """Run colcon in ``workspace``; its output. Fails on an error and on colcon-ros's layout warnings."""
    env = {**os.environ, "PATH": f"{COLCON.parent}{os.pathsep}{os.environ['PATH']}", "COLCON_HOME": str(workspace)}
    env.pop("AMENT_PREFIX_PATH", None)
    done = subprocess.run([str(COLCON), *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"colcon {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    assert "doesn't explicitly install" not in done.stderr, done.stderr  # marker / package.xml missing
    return done.stdout


def _copy_repository(dest: Path) -> None:
    """The files a clone would hold that colcon and the build read (no caches, no .venv, no results)."""
    for name in ("package.xml", "setup.py", "pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "install", "log")
    for name in ("cdcca", "cloud_trainer", "ros2_ws"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace holding the repository (src/cd-cca), built by colcon: the core ``cdcca`` and ``cdcca_edge``."""
    ws = tmp_path_factory.mktemp("cdcca_ws")
    repo = ws / "src" / "cd-cca"
    repo.mkdir(parents=True)
    _copy_repository(repo)
    _colcon(ws, "build", *BASE_PATHS, "--packages-ignore", "cdcca_msgs")
    return ws


def test_colcon_finds_the_three_packages_in_dependency_order(tmp_path):
    repo = tmp_path / "src" / "cd-cca"
    repo.mkdir(parents=True)
    _copy_repository(repo)
    # colcon stops crawling at a package, so the repository root alone yields only the core...
    assert _colcon(tmp_path, "list", "--names-only", "--base-paths", "src").split() == ["cdcca"]
    # ...and the README's --base-paths add the ROS packages under ros2_ws/src.
    listed = _colcon(tmp_path, "list", "--topological-order", *BASE_PATHS)
    rows = [line.split("\t") for line in listed.strip().splitlines()]
    assert [(name, kind) for name, _, kind in rows] == [
        ("cdcca", "(ros.ament_python)"), ("cdcca_msgs", "(ros.ament_cmake)"), ("cdcca_edge", "(ros.ament_python)")]
    info = _colcon(tmp_path, "info", "cdcca_edge", *BASE_PATHS)
    run_depends = next(line for line in info.splitlines() if line.strip().startswith("run:")).split()[1:]
    assert {"cdcca", "cdcca_msgs", "rclpy", "diagnostic_msgs"} <= set(run_depends)


def test_cdcca_edge_installs_where_ros2_run_and_ros2_launch_look(workspace):
    prefix = workspace / "install" / "cdcca_edge"
    assert (prefix / "share/ament_index/resource_index/packages/cdcca_edge").is_file()
    installed = ET.parse(prefix / "share/cdcca_edge/package.xml").getroot()
    assert installed.findtext("name") == "cdcca_edge" and installed.get("format") == "3"
    assert (prefix / "share/cdcca_edge/launch/robot.launch.py").read_text() == (
        ROOT / "ros2_ws/src/cdcca_edge/launch/robot.launch.py").read_text()
    assert (prefix / "share/cdcca_edge/config/edge.yaml").is_file()
    entry_points = next((prefix / SITE).glob("cdcca_edge-*.egg-info")) / "entry_points.txt"
    for executable, target in (("edge_node", "cdcca_edge.edge_node:main"), ("ask", "cdcca_edge.ask:main")):
        script = prefix / "lib" / "cdcca_edge" / executable  # ros2 run looks in lib/<package>
        assert os.access(script, os.X_OK) and script.read_text().startswith(f"#!{sys.executable}"), script
        assert f"{executable} = {target}" in entry_points.read_text()  # what the script loads
    assert (prefix / SITE / "cdcca_edge" / "edge_node.py").is_file()


def test_the_core_builds_with_its_console_script_and_message_lookup(workspace):
    prefix = workspace / "install" / "cdcca"
    assert (prefix / "share/ament_index/resource_index/packages/cdcca").is_file()
    assert (prefix / "bin" / "cdcca").is_file()
    for module in ("cdcca/wire/__init__.py", "cdcca/edge/runtime.py", "cloud_trainer/service.py"):
        assert (prefix / SITE / module).is_file(), module


def test_install_setup_sh_puts_the_built_packages_first_on_the_python_path(workspace):
    """``. install/setup.sh`` (colcon's hooks) makes Python import the installed copies, not the checkout."""
    code = "import cdcca, cdcca_edge; print(cdcca.__file__); print(cdcca_edge.__file__)"
    done = subprocess.run(["sh", "-c", f'. install/setup.sh && "{sys.executable}" -c "{code}"'], cwd=workspace,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    core, edge = done.stdout.split()
    assert Path(core).is_relative_to(workspace / "install" / "cdcca" / SITE)
    assert Path(edge).is_relative_to(workspace / "install" / "cdcca_edge" / SITE)


def test_colcon_test_runs_the_package_tests_which_skip_without_ros(workspace):
    if importlib.util.find_spec("launch_testing") is not None:
        pytest.skip("ROS 2 is installed here: colcon test would run the launch tests, which need cdcca_msgs built")
    _colcon(workspace, "test", *BASE_PATHS, "--packages-ignore",
            "cdcca_msgs", "--packages-select", "cdcca_edge")
    report = ET.parse(workspace / "build" / "cdcca_edge" / "pytest.xml").getroot()
    cases = report.findall(".//testcase")
    modules = {c.get("name").rsplit(".", 1)[-1] for c in cases}  # skipped at import: one case per module
    assert modules == {"test_edge_launch", "test_flake8", "test_pep257", "test_xmllint"}
    reasons = [c.find("skipped").text for c in cases]
    assert len(cases) == 4 and all("ROS 2" in r or "Jazzy" in r for r in reasons), reasons
    summary = _colcon(workspace, "test-result", "--test-result-base", "build/cdcca_edge")
    assert "4 tests, 0 errors, 0 failures, 4 skipped" in summary
