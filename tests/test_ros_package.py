"""The ROS 2 packages parse and agree with the core: package.xml, setup.py, setup.cfg, config, launch files.

ROS itself is not installed here; these checks are what can run without it (colcon and launch_testing
run the rest in a Jazzy workspace). Launch files are parsed with ``ast``, and imported only where
``launch`` exists.
"""

import ast
import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from cdcca import wire
from cdcca.edge import params

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "ros2_ws" / "src" / "cdcca_edge"
MSGS = ROOT / "ros2_ws" / "src" / "cdcca_msgs"
LAUNCH_FILES = [EDGE / "launch" / "robot.launch.py", ROOT / "launch" / "cloud.launch.py",
                ROOT / "launch" / "replay.launch.py"]  # fmt: skip


def test_package_xml_is_format_3_with_the_run_dependencies():
    root = ET.parse(EDGE / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "cdcca_edge" and root.findtext("license") == "Apache-2.0"
    assert root.findtext("buildtool_depend") == "ament_python"
    assert root.find("export/build_type").text == "ament_python"
    exec_depends = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "cdcca_msgs", "diagnostic_msgs", "cdcca",
            "lifecycle_msgs"} <= exec_depends  # fmt: skip
    test_depends = {e.text for e in root.findall("test_depend")}
    assert {"ament_flake8", "ament_pep257", "launch_testing", "launch_testing_ros"} <= test_depends
    core = ET.parse(ROOT / "package.xml").getroot()  # the exec_depend "cdcca" resolves to this package
    assert core.findtext("name") == "cdcca"


def _setup_call():
    tree = ast.parse((EDGE / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    assert len(calls) == 1
    return {kw.arg: kw.value for kw in calls[0].keywords}, tree


def test_setup_py_installs_launch_config_marker_and_console_scripts():
    keywords, tree = _setup_call()
    names = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}  # fmt: skip
    assert names["package_name"] == "cdcca_edge"
    data_files = ast.unparse(keywords["data_files"])
    for needle in ("share/ament_index/resource_index/packages", "'resource/' + package_name", "package.xml",
                   "/launch', glob('launch/*.launch.py')", "/config', glob('config/*.yaml')"):
        assert needle in data_files, needle
    scripts = ast.literal_eval(keywords["entry_points"])["console_scripts"]
    assert "edge_node = cdcca_edge.edge_node:main" in scripts and "ask = cdcca_edge.ask:main" in scripts
    for script in scripts:  # every console script points at a module with main()
        module = script.split("=")[1].strip().split(":")[0]
        source = ast.parse((EDGE / (module.replace(".", "/") + ".py")).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in source.body), module
    assert (EDGE / "resource" / "cdcca_edge").is_file() and (EDGE / "cdcca_edge" / "__init__.py").is_file()
    assert "script_dir=$base/lib/cdcca_edge" in (EDGE / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/cdcca_edge" in (EDGE / "setup.cfg").read_text()
    assert list((EDGE / "launch").glob("*.launch.py")) and list((EDGE / "config").glob("*.yaml"))


def test_config_yaml_holds_exactly_the_parameter_schema_at_its_defaults():
    document = yaml.safe_load((EDGE / "config" / "edge.yaml").read_text())
    assert list(document) == ["/cdcca_edge"]
    values = params.read_parameter_file(EDGE / "config" / "edge.yaml")
    assert values == params.default_parameters()
    assert params.validate_parameters(values) == values
    assert (EDGE / "config" / "edge.yaml").read_text() == params.parameter_file(), (
        "config/edge.yaml is generated: python -m cdcca.edge.params > ros2_ws/src/cdcca_edge/config/edge.yaml")


def test_the_node_declares_every_parameter_of_the_schema_with_its_description():
    source = (EDGE / "cdcca_edge" / "edge_node.py").read_text()
    tree = ast.parse(source)
    assert "for spec in edge_params.PARAMETERS" in source and "description=spec.description" in source
    assert "add_on_set_parameters_callback" in source
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    methods = {f.name for f in classes["EdgeNode"].body if isinstance(f, ast.FunctionDef)}
    assert {"on_configure", "on_activate", "on_deactivate", "on_cleanup", "on_shutdown"} <= methods
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "rclpy" in ast.unparse(n)
                   for p in (ROOT / "cdcca").rglob("*.py") for n in ast.walk(ast.parse(p.read_text())))  # fmt: skip


def _launch_arguments(path: Path) -> dict[str, str]:
    """name -> description of the ARGUMENTS table every launch file here declares from."""
    tree = ast.parse(path.read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ARGUMENTS")
    rows = {}
    for row in table.elts:
        name, _, description = row.elts
        rows[ast.literal_eval(name)] = ast.literal_eval(description)
    return rows


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_parse_and_describe_every_argument(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    arguments = _launch_arguments(path)
    assert arguments and all(len(text) > 10 for text in arguments.values())
    assert "DeclareLaunchArgument(name, default_value=default, description=description)" in path.read_text()


def test_robot_launch_has_the_documented_arguments():
    arguments = _launch_arguments(EDGE / "launch" / "robot.launch.py")
    assert {"robot_id", "model_path", "camera_topic", "start_camera", "start_bridge", "cloud_endpoint"} <= set(
        arguments)
    source = (EDGE / "launch" / "robot.launch.py").read_text()
    assert "'--namespace', ['/', config['robot_id']]" in source and "rs_launch.py" in source
    assert "LifecycleNode(" in source and "TRANSITION_ACTIVATE" in source
    replay = (ROOT / "launch" / "replay.launch.py").read_text()
    assert "'ros2', 'bag', 'play'" in replay and "robot.launch.py" in replay


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_build_a_launch_description_where_launch_is_installed(path):
    if importlib.util.find_spec("launch") is None or importlib.util.find_spec("launch_ros") is None:
        pytest.skip("launch / launch_ros have no wheel (neither Jazzy nor Kilted), so no environment here has them; "
                    "the PyPI project 'launch' is an unrelated program")
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {a.name for a in description.get_launch_arguments()}
    assert declared == set(_launch_arguments(path))


def test_interface_files_register_and_round_trip():
    """Every .msg/.srv of cdcca_msgs is registered from the files themselves (cdcca.wire)."""
    names = {p.stem for p in (MSGS / "msg").glob("*.msg")}
    assert names == set(wire.OUR_MESSAGES)
    assert {p.stem for p in (MSGS / "srv").glob("*.srv")} == set(wire.OUR_SERVICES)
    for name in names:
        msg = wire.new(f"cdcca_msgs/msg/{name}")
        assert wire.encode(wire.decode(f"cdcca_msgs/msg/{name}", wire.encode(msg))) == wire.encode(msg)
        fields = [n for n, _ in wire.TYPESTORE.fielddefs[wire.canonical(f"cdcca_msgs/msg/{name}")][1]]
        text = (MSGS / "msg" / f"{name}.msg").read_text()
        assert all(f" {field}" in text for field in fields)
    assert ET.parse(MSGS / "package.xml").getroot().findtext("name") == "cdcca_msgs"


def test_ros_package_linters_are_configured_and_skip_without_ros():
    for name in ("test_flake8.py", "test_pep257.py", "test_xmllint.py", "test_edge_launch.py"):
        source = (EDGE / "test" / name).read_text()
        assert "pytest.importorskip(" in source and "reason=" in source, name
    launch_test = (EDGE / "test" / "test_edge_launch.py").read_text()
    for needle in ("WaitForTopics", "Ask.Request", "ChangeState", "'ros2', 'bag', 'play'", "ReadyToTest"):
        assert needle in launch_test, needle


# ament_flake8's configuration (ament/ament_lint, ament_flake8/configuration/ament_flake8.ini), run here with the
# flake8 plugins ament_flake8 loads on Jazzy: import order (google), quotes, builtins, comprehensions, docstrings.
AMENT_FLAKE8_INI = """[flake8]
extend-ignore = C816,D100,D101,D102,D103,D104,D105,D106,D107,D203,D212,D404,I202
import-order-style = google
max-line-length = 99
"""


@pytest.mark.parametrize("folder", [EDGE, ROOT / "launch"], ids=["cdcca_edge", "launch"])
def test_ros_python_passes_ament_flake8_rules(folder, tmp_path):
    config = tmp_path / "ament_flake8.ini"
    config.write_text(AMENT_FLAKE8_INI)
    plugins = subprocess.run([sys.executable, "-m", "flake8", "--version"], capture_output=True, text=True).stdout
    wanted = ("flake8_import_order", "flake8-quotes", "flake8-builtins", "flake8-docstrings")
    assert all(plugin in plugins for plugin in wanted), plugins
    done = subprocess.run([sys.executable, "-m", "flake8", "--config", str(config), "."], cwd=folder,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr


# ament_pep257's "ament" convention (ament_lint, ament_pep257/main.py): every pydocstyle check but these, so D213
# (the summary on the second line of a multi-line docstring) is on; flake8's default pep257 convention leaves it off.
AMENT_PEP257_IGNORE = "D100,D101,D102,D103,D104,D105,D106,D107,D203,D212,D404"


@pytest.mark.parametrize("folder", [EDGE, ROOT / "launch"], ids=["cdcca_edge", "launch"])
def test_ros_python_passes_ament_pep257_rules(folder):
    done = subprocess.run([sys.executable, "-m", "flake8", "--select", "D", "--docstring-convention", "all",
                           "--ignore", AMENT_PEP257_IGNORE, "."], cwd=folder, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("folder, name", [(EDGE, "cdcca_edge"), (MSGS, "cdcca_msgs"), (ROOT, "cdcca")],
                         ids=["cdcca_edge", "cdcca_msgs", "cdcca"])  # fmt: skip
def test_package_xml_validates_with_catkin_pkg_without_warnings(folder, name):
    """catkin_pkg is what colcon-ros and rosdep parse package.xml with (REP 149 checks)."""
    from catkin_pkg.package import parse_package

    warnings: list[str] = []
    package = parse_package(folder, warnings=warnings)
    package.validate()  # raises InvalidPackage
    assert (package.name, package.package_format, warnings) == (name, 3, [])


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names)


def test_every_module_the_ros_package_imports_is_a_declared_dependency():
    """A missing <exec_depend> works on the developer's machine and fails after rosdep on a fresh robot."""
    from catkin_pkg.package import parse_package

    package = parse_package(EDGE)
    runtime = {d.name for d in package.exec_depends} | {d.name for d in package.build_export_depends}
    tests = runtime | {d.name for d in package.test_depends}
    rosdep_key = {"numpy": "python3-numpy", "yaml": "python3-yaml", "pytest": "python3-pytest"}  # pip name -> key
    for path in [*(EDGE / "cdcca_edge").glob("*.py"), *(EDGE / "launch").glob("*.py")]:
        missing = {rosdep_key.get(m, m) for m in _imported_roots(path)} - runtime - {"cdcca_edge"}
        assert not missing, f"{path.name} imports {missing}, not in package.xml"
    for path in (EDGE / "test").glob("*.py"):
        missing = {rosdep_key.get(m, m) for m in _imported_roots(path)} - tests - {"cdcca_edge"}
        assert not missing, f"test/{path.name} imports {missing}, not in package.xml"
