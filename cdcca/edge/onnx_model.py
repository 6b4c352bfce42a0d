"""The ONNX export on disk, as the robot reads it: no torch, no onnx package (issue 19, "a robot without torch").

:func:`cdcca.edge.onnx_export.export_onnx` (torch, on the machine that exports) writes a directory of graphs
(``encoder.onnx``, ``decoder.onnx``, ``uts.onnx``), the tokenizer, ``base.safetensors`` (θ_base, the trainable
set at version 0) and ``manifest.json`` (written last). This module opens it, checks adapters against it and
writes/reads the per-graph ``.onnx_adapter`` files of ONNX Runtime's multi-LoRA mechanism
(``onnxruntime.AdapterFormat``; onnxruntime.ai/docs/genai/tutorials/finetune.html), with numpy and onnxruntime
only; ``cdcca.edge.onnx_export`` re-exports every name, so both import paths work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdcca.errors import CdccaError

ENCODER_FILE, DECODER_FILE, UTS_FILE = "encoder.onnx", "decoder.onnx", "uts.onnx"
MANIFEST_FILE, BASE_FILE = "manifest.json", "base.safetensors"
FORMAT_VERSION = 2  # 2: uts.onnx takes the dropout-free output (``center``) and gives ``token_spread``
UTS_PRECISIONS = ("int8", "fp32")  # how uts.onnx runs its linear layers (manifest ``uts.precision``); first: default


def as_array(value: Any) -> np.ndarray:
    """A float32 numpy array of a numpy array or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(value, np.float32)


class OnnxModelMismatch(CdccaError, ValueError):
    """An ONNX export and an adapter (or a state, or a checkpoint) that do not belong together."""


@dataclass
class OnnxExport:
    """An exported student on disk.

    Attributes:
        directory: the export directory (graphs, tokenizer, ``base.safetensors``, ``manifest.json``).
        manifest: what :func:`export_onnx` recorded: graph files, the trainable names of each graph, LM
            geometry, special token ids, image spec and ``student_id`` (a hash of the frozen weights).
    """

    directory: Path
    manifest: dict

    @classmethod
    def load(cls, directory: str | Path) -> OnnxExport:
        """Open an export directory; a clear error if it is not one."""
        directory = Path(directory).expanduser()
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise OnnxModelMismatch(f"{directory} is not an ONNX export (no {MANIFEST_FILE}); create one with "
                                    "`cdcca export --backend onnx` or cdcca.edge.onnx_export.export_onnx")  # fmt: skip
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OnnxModelMismatch(f"{path} is damaged or unreadable ({err}); export the student again with "
                                    "`cdcca export --backend onnx`") from err  # fmt: skip
        if not isinstance(manifest, dict):
            raise OnnxModelMismatch(f"{path} holds JSON but not an object; export the student again with "
                                    "`cdcca export --backend onnx`")  # fmt: skip
        if manifest.get("format_version") != FORMAT_VERSION:
            raise OnnxModelMismatch(f"{path} has format {manifest.get('format_version')}, this CD-CCA reads "
                                    f"{FORMAT_VERSION}; export the student again")  # fmt: skip
        return cls(directory, manifest)

    def base(self) -> dict:
        """θ_base as torch tensors (imports torch): the trainable set at version 0, in trainable-set order."""
        from safetensors.torch import load_file

        params = load_file(str(self.directory / BASE_FILE))
        self.check_params(params)
        return {name: params[name] for name in self.manifest["trainable"]}

    def base_arrays(self) -> dict[str, np.ndarray]:
        """θ_base as numpy arrays (no torch), as :meth:`base`."""
        from safetensors.numpy import load_file

        params = load_file(str(self.directory / BASE_FILE))
        self.check_params(params)
        return {name: params[name] for name in self.manifest["trainable"]}

    def graph_params(self, graph: str) -> list[str]:
        """Trainable names that ``graph`` (``encoder`` or ``decoder``) takes as overridable inputs."""
        return self.manifest["graphs"][graph]["params"]

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise :class:`OnnxModelMismatch` unless ``params`` has exactly this export's names and shapes."""
        shapes = self.manifest["shapes"]
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        if missing or extra:
            raise OnnxModelMismatch(f"adapter does not match this export ({self.directory}): missing {missing[:3]}, "
                                    f"unexpected {extra[:3]}; it was built for another student -- re-export the "
                                    "student the adapter belongs to, or start from this export's base")  # fmt: skip
        for name, tensor in params.items():
            if list(tensor.shape) != shapes[name]:
                raise OnnxModelMismatch(f"adapter tensor {name!r} has shape {list(tensor.shape)}, this export "
                                        f"({self.directory}) expects {shapes[name]}; it was built for another "
                                        "student -- re-export the student it belongs to")  # fmt: skip


# ------------------------------------------------------------------------------------------- adapters
def write_adapters(export: OnnxExport, params: Mapping[str, Any], directory: str | Path,
                   stem: str, version: int = 0) -> dict[str, Path]:  # fmt: skip
    """Write ``params`` (the whole trainable set: numpy arrays or torch tensors) as one ``.onnx_adapter`` file per
    graph; graph -> path.

    ``AdapterFormat.set_model_version`` records which export the adapter is for, ``set_adapter_version`` the
    adapter version. Raises :class:`OnnxModelMismatch` if ``params`` is not this export's trainable set, and
    ``OSError`` if a file cannot be written (ORT reports a full disk as a ``RuntimeError``); none of the files is
    then left behind.
    """
    import onnxruntime as ort

    export.check_params(params)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for graph in export.manifest["graphs"]:
        adapter = ort.AdapterFormat()
        adapter.set_model_version(export.manifest["adapter_model_version"])
        adapter.set_adapter_version(int(version))
        values = {n: as_array(params[n]) for n in export.graph_params(graph)}
        adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in values.items()})
        paths[graph] = directory / f"{stem}.{graph}.onnx_adapter"
        try:
            adapter.export_adapter(str(paths[graph]))
        except RuntimeError as err:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise OSError(f"writing {paths[graph]}: {err}") from err
    return paths


def read_adapter(export: OnnxExport, path: str | Path) -> dict[str, np.ndarray]:
    """Read one graph's ``.onnx_adapter`` after checking it was written for ``export``."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    if adapter.get_model_version() != export.manifest["adapter_model_version"]:
        raise OnnxModelMismatch(f"{path} was written for another export (model version {adapter.get_model_version()}, "
                                f"this export is {export.manifest['adapter_model_version']}); rebuild the adapter "
                                "from this export's base")  # fmt: skip
    return {name: value.numpy() for name, value in adapter.get_parameters().items()}


# ------------------------------------------------------------------------------------------ threads
def one_thread_options() -> Any:
    """ONNX Runtime session options for one intra-op thread, no spinning, warnings off (overridable initializers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level, options.inter_op_num_threads, options.intra_op_num_threads = 3, 1, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def faster_session(sessions: Mapping[Any, Any], feeds: dict, run_options: Any = None, rounds: int = 15) -> Any:
    """The key of the session in ``sessions`` that ran ``feeds`` fastest: the median of ``rounds`` timed runs each,
    the candidates alternating (so a change in load hits all of them), after two untimed runs that allocate.

    How a tiny graph's run scales with threads depends on the board and on what else it runs (a second thread
    pays off only where an op's work exceeds the hand-off), so the robot times the candidates where it runs, as
    autotuners such as ATLAS or cuDNN's benchmark mode pick kernels. The candidates compute the same numbers."""
    times: dict[Any, list[float]] = {key: [] for key in sessions}
    for index in range(rounds + 2):
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds, run_options)
            if index >= 2:
                times[key].append(time.perf_counter() - started)
    return min(times, key=lambda key: float(np.median(times[key])))
