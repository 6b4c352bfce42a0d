"""The parameters of the robot's ROS 2 node, derived from the validated config dataclasses.

Each parameter is a field of :class:`EdgeNodeConfig` (the shell: model paths, topics, diagnostics), of
:class:`~cdcca.edge.runtime.EdgeConfig` (the runtime) or of :class:`~cdcca.uts.UTSConfig` (prefixed ``uts_``).
Its default, ROS type and description come from the field (type hint, default, the ``Args:`` docstring line),
and a value is checked by building the dataclass with it, so ``__post_init__`` is the only validation there is.
``config/edge.yaml`` holds the same defaults (tested).

References: ROS 2 parameters (declare with a descriptor, validate in a set-parameters callback:
docs.ros.org/en/jazzy/Concepts/Basic/About-Parameters.html) and the YAML parameter file format
(``/node: ros__parameters:``, docs.ros.org/en/jazzy/How-To-Guides/Node-arguments.html).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.errors import CdccaError
from cdcca.paths import cache_dir, checkpoint_dir
from cdcca.uts_config import UTSConfig
from cdcca.wire.topics import CAMERA_TOPIC, PROMPT_TOPIC, topic_problem

NODE_NAME = "cdcca_edge"


class ParameterError(CdccaError, ValueError):
    """A node parameter has a wrong type or value; the message names each parameter and what it accepts."""


@dataclass
class EdgeNodeConfig:
    """Settings of the robot's ROS shell around the runtime.

    Args:
        checkpoints: directory holding student/ (cdcca pretrain output); empty: the tiny preset in the CD-CCA cache.
        trust_dir: trust store of the cloud's Ed25519 public keys (cdcca keys trust); empty: <cache>/trust.
        state_dir: durable uplink queue and adapter state; empty: <cache>/edge/<robot_id>.
        backend: what answers: torch (eager student) or onnx (cdcca export --backend onnx).
        threads: ONNX Runtime intra-op threads; 0: its default.
        camera_topic: sensor_msgs/Image topic (sensor-data QoS); remappable.
        subscribe_compressed: also subscribe to sensor_msgs/CompressedImage on <camera_topic>/compressed
            (image_transport's name).
        prompt_topic: std_msgs/String topic of prompts answered about the latest frame.
        diagnostics_period_s: period of the /diagnostics report.
    """

    checkpoints: str = ""
    trust_dir: str = ""
    state_dir: str = ""
    backend: str = "torch"
    threads: int = 0
    camera_topic: str = CAMERA_TOPIC
    subscribe_compressed: bool = False
    prompt_topic: str = PROMPT_TOPIC
    diagnostics_period_s: float = 1.0

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"EdgeNodeConfig.backend must be one of torch, onnx, got {self.backend!r}")
        if not 0 <= self.threads <= 256:
            raise ValueError(f"EdgeNodeConfig.threads must be >= 0 and <= 256, got {self.threads!r}")
        for name in ("camera_topic", "prompt_topic"):
            reason = topic_problem(getattr(self, name))
            if reason is not None:
                raise ValueError(f"EdgeNodeConfig.{name} {reason}, got {getattr(self, name)!r}")
        if not 0.1 <= self.diagnostics_period_s <= 60.0:
            raise ValueError(f"EdgeNodeConfig.diagnostics_period_s must be >= 0.1 and <= 60, "
                             f"got {self.diagnostics_period_s!r}")  # fmt: skip


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: a field of a config dataclass.

    Args:
        name: ROS parameter name.
        owner: the dataclass holding the field.
        field: the field's name.
        default: the field's default (what ``config/edge.yaml`` ships with).
        kind: ``string``, ``integer``, ``double``, ``bool`` or ``string_array`` (the ROS parameter type).
        description: the field's ``Args:`` line; shown by ``ros2 param describe``.
        read_only: takes effect only at configure (changing it while configured is refused).
    """

    name: str
    owner: type
    field: str
    default: Any
    kind: str
    description: str
    read_only: bool = True


_KINDS = {"str": "string", "Path": "string", "int": "integer", "float": "double", "bool": "bool",
          "tuple[str, ...]": "string_array"}  # fmt: skip
_PY_TYPES = {"string": (str,), "integer": (int,), "double": (float, int), "bool": (bool,),
             "string_array": (list, tuple)}  # fmt: skip


def _arg_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Args:`` section of a dataclass's docstring."""
    docs: dict[str, str] = {}
    lines = (inspect.getdoc(cls) or "").split("Args:", 1)[-1].splitlines()
    current = None
    for line in lines:
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and re.match(r"^        \S", line):
            docs[current] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def _spec(name: str, owner: type, field_name: str, read_only: bool = True) -> ParamSpec:
    fields = {f.name: f for f in dataclasses.fields(owner)}
    item = fields[field_name]
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()  # type: ignore[misc]
    default = list(default) if isinstance(default, tuple) else default
    type_name = item.type if isinstance(item.type, str) else item.type.__name__
    return ParamSpec(name, owner, field_name, default, _KINDS[type_name], _arg_docs(owner)[field_name],
                     read_only)  # fmt: skip


PARAMETERS: tuple[ParamSpec, ...] = (
    _spec("robot_id", EdgeConfig, "robot_id"),
    *(_spec(name, EdgeNodeConfig, name) for name in ("checkpoints", "trust_dir", "state_dir", "backend", "threads",
                                                     "camera_topic", "subscribe_compressed", "prompt_topic")),
    _spec("prompts", EdgeConfig, "prompts", read_only=False),
    _spec("ask_rate_hz", EdgeConfig, "ask_rate_hz"),
    _spec("batch_size", EdgeConfig, "batch_size", read_only=False),
    _spec("max_frame_age_s", EdgeConfig, "max_frame_age_s", read_only=False),
    *(_spec(name, EdgeConfig, name) for name in ("prompt_capacity", "queue_capacity", "resend_after_s",
                                                 "pump_every_s", "heartbeat_every_s")),
    _spec("diagnostics_period_s", EdgeNodeConfig, "diagnostics_period_s"),
    *(_spec(f"uts_{name}", UTSConfig, name) for name in ("sample_mode", "entropy_threshold", "sample_fraction",
                                                         "token_keep_ratio", "mc_passes", "mc_center", "encoding")),
)  # fmt: skip
SPECS = {spec.name: spec for spec in PARAMETERS}


def _typed(spec: ParamSpec, value: Any) -> Any:
    if spec.kind == "double":
        return float(value)  # ROS gives 1 for a double written as 1 (-p ask_rate_hz:=1)
    if spec.kind == "string_array":
        return tuple(value)
    return value


def default_parameters() -> dict[str, Any]:
    """Every parameter at its default (what ``config/edge.yaml`` holds)."""
    return {spec.name: (list(spec.default) if isinstance(spec.default, list) else spec.default) for spec in PARAMETERS}


def check_parameter(name: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or ``None`` when it is."""
    spec = SPECS.get(name)
    if spec is None:
        return f"unknown parameter {name!r}; known: {', '.join(SPECS)}"
    if isinstance(value, bool) and spec.kind != "bool" or not isinstance(value, _PY_TYPES[spec.kind]):
        return f"{name} must be a {spec.kind}, got {type(value).__name__} {value!r}"
    try:
        spec.owner(**{spec.field: _typed(spec, value)})
    except ValueError as err:
        return f"{name}: {err}"
    return None


def validate_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` over the defaults, checked; raises :class:`ParameterError` listing every problem."""
    merged = default_parameters()
    merged.update(values)
    problems = [reason for name, value in merged.items() if (reason := check_parameter(name, value))]
    if problems:
        raise ParameterError("invalid cdcca_edge parameters: " + "; ".join(problems))
    return {name: (float(v) if SPECS[name].kind == "double" else v) for name, v in merged.items()}


def read_parameter_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The ``ros__parameters`` of ``node_name`` (or of ``/**``) in a ROS 2 YAML parameter file."""
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ParameterError(f"cannot read parameter file {path}: {err}") from err
    for key in (f"/{node_name}", node_name, "/**"):
        section = (document or {}).get(key)
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            return dict(section["ros__parameters"])
    raise ParameterError(f"{path} has no '/{node_name}: ros__parameters:' section")


def configs(params: Mapping[str, Any]) -> tuple[EdgeNodeConfig, EdgeConfig]:
    """The shell and runtime settings of validated parameters; empty paths mean the CD-CCA cache defaults."""
    groups: dict[type, dict[str, Any]] = {EdgeNodeConfig: {}, EdgeConfig: {}, UTSConfig: {}}
    for spec in PARAMETERS:
        groups[spec.owner][spec.field] = _typed(spec, params[spec.name])
    node = EdgeNodeConfig(**groups[EdgeNodeConfig])
    state_dir = Path(node.state_dir).expanduser() if node.state_dir else cache_dir() / "edge" / params["robot_id"]
    runtime = EdgeConfig(**groups[EdgeConfig], state_dir=state_dir, uts=UTSConfig(**groups[UTSConfig]))
    return node, runtime


def build_edge_runtime(params: Mapping[str, Any], port: Any = None) -> EdgeRuntime:
    """Configure step of the edge node: load the student (and its adapter state) for validated parameters."""
    from cdcca.edge.app import build_runtime

    node, config = configs(params)
    checkpoints = Path(node.checkpoints).expanduser() if node.checkpoints else checkpoint_dir("tiny")
    trust = Path(node.trust_dir).expanduser() if node.trust_dir else cache_dir() / "trust"
    return build_runtime(checkpoints, config, trust, port=port, backend=node.backend, threads=node.threads or None,
                         state_hint="give this node another state_dir")  # fmt: skip


def parameter_file() -> str:
    """``config/edge.yaml``: every parameter at its default with its description (regenerate after changing a
    config default: ``python -m cdcca.edge.params > ros2_ws/src/cdcca_edge/config/edge.yaml``)."""
    import json
    import textwrap

    lines = ["# Parameters of the cdcca_edge node, at their defaults (`ros2 param describe /cdcca_edge <name>`).",
             "# Derived from the config dataclasses (cdcca.edge.params): a value they refuse makes `configure` fail",
             "# and says why; the ones marked dynamic can also be set while the node is configured.",
             "# Generated: python -m cdcca.edge.params > config/edge.yaml",
             f"/{NODE_NAME}:", "  ros__parameters:"]  # fmt: skip
    for spec in PARAMETERS:
        text = spec.description.rstrip(".") + ("" if spec.read_only else " (dynamic)")
        lines += ["    # " + line for line in textwrap.wrap(text, 94)]
        value = spec.default
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, (str, list)):
            shown = json.dumps(value, ensure_ascii=False)
        else:
            shown = repr(value)
        lines.append(f"    {spec.name}: {shown}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(parameter_file(), end="")
