"""``cdcca edge --backend onnx`` runs without torch, transformers, peft or bitsandbytes (issue 19).

The robot runs in a subprocess (this test process has torch loaded): it answers a folder of frames through the CLI,
applies a signed delta of the cloud's default codec, answers again with it, and reports which heavy modules were
ever imported and its peak RSS.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cdcca import wire
from cdcca.cli import main
from cdcca.data.digits_shift import load_domain
from cdcca.dwc import get_codec
from cdcca.edge.app import EXIT_NO_CLOUD
from cdcca.edge.onnx_export import OnnxExport
from cdcca.envelope import Signer, VersionChain, generate_key, trust_key
from cloud_trainer.service import CloudConfig
from tests.test_transport import free_port

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
PROMPTS = ("what digit is this?", "is the digit even?")
REPO = Path(__file__).resolve().parents[1]

# The robot's process: `cdcca edge --backend onnx` through the CLI, then the delta through the ONNX runtime on the
# same state, then `cdcca edge` again (it resumes at the persisted version). Prints one RESULT line of JSON.
ROBOT = """
import json, resource, sys
from pathlib import Path
from cdcca import wire
from cdcca.cli import main
from cdcca.edge.app import build_runtime
from cdcca.edge.runtime import EdgeConfig

args, delta_file, state, export, trust = json.loads(sys.argv[1]), *sys.argv[2:6]
codes = [main(args + ["--answers-file", str(Path(state) / "before.jsonl")])]
runtime = build_runtime(Path(export), EdgeConfig(state_dir=Path(state)), Path(trust), backend="onnx")
status = runtime.apply(wire.decode(wire.WEIGHT_DELTA, Path(delta_file).read_bytes()))
runtime.close()
codes.append(main(args + ["--answers-file", str(Path(state) / "after.jsonl")]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "bitsandbytes"))
# peak RSS: VmHWM (this process image only; ru_maxrss also counts what the forking parent, pytest, had resident)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("RESULT " + json.dumps({"codes": codes, "heavy": heavy, "state": int(status.state), "reason": status.reason,
                              "version": int(status.version), "peak_rss_kib": hwm[0] if hwm else None,
                              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def onnx_robot_files(pretrained_test_pair, root: Path, robot_id: str) -> dict:
    """In ``root``: an export made by `cdcca export --backend onnx`, a folder of three frames, a trust store holding
    the cloud's key and a signed keyframe delta (the cloud's default codec) to a perturbed adapter for ``robot_id``,
    as a message (``delta_msg``) and as CDR in a file (``delta``)."""
    export_dir = root / "student_onnx"
    assert main(["export", "--backend", "onnx", "--model", str(pretrained_test_pair), "--out", str(export_dir)]) == 0
    frames = root / "frames"
    frames.mkdir()
    for i, sample in enumerate(load_domain("printed", "stream", limit=3)[:3]):
        Image.fromarray(sample.load_image()).save(frames / f"frame{i}.png")
    private, public = generate_key(root / "keys", "cloud-1")
    trust_key(public, root / "trust")
    base = OnnxExport.load(export_dir).base()
    generator = torch.Generator().manual_seed(7)
    target = {name: value + 0.02 * torch.randn(value.shape, generator=generator) for name, value in base.items()}
    codec = get_codec(CloudConfig.codec)  # the cloud's default
    codec = codec.for_round(1) if hasattr(codec, "for_round") else codec  # a round-bound codec: the round's basis
    delta = VersionChain(robot_id, base).make_delta(target, codec, Signer.load(private), round_start=0)
    (root / "delta.cdr").write_bytes(wire.encode(delta))
    return {"root": root, "export": export_dir, "frames": frames, "trust": root / "trust", "delta": root / "delta.cdr",
            "delta_msg": delta}  # fmt: skip


@pytest.fixture(scope="module")
def robot_files(pretrained_test_pair, tmp_path_factory):
    return onnx_robot_files(pretrained_test_pair, tmp_path_factory.mktemp("torch_free"), "r1")


def test_the_onnx_robot_answers_and_applies_the_clouds_default_delta_without_torch(robot_files):
    # Prepare: the robot's command line (no cloud listens on its endpoint)
    assert CloudConfig.codec == robot_files["delta_msg"].codec == "subspace"  # the cloud's default codec
    state = robot_files["root"] / "state"
    args = ["edge", "--backend", "onnx", "--model", str(robot_files["export"]),
            "--source", f"dir:{robot_files['frames']}", "--linger", "0", "--robot-id", "r1",
            "--trust", str(robot_files["trust"]), "--state", str(state),
            "--endpoint", f"tcp/127.0.0.1:{free_port()}", "--no-status-line", "--threads", "1"]  # fmt: skip
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    # Execute
    done = subprocess.run([sys.executable, "-c", ROBOT, json.dumps(args), str(robot_files["delta"]), str(state),
                           str(robot_files["export"]), str(robot_files["trust"])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    # Assert: no heavy module was ever imported, every prompt answered, the delta applied and answered with
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    if result["peak_rss_kib"] is not None:
        print(f"ORT robot peak RSS: {result['peak_rss_kib'] / 1024:.0f} MiB")
    assert result["heavy"] == []
    assert result["codes"] == [EXIT_NO_CLOUD, EXIT_NO_CLOUD]  # answered; only the (absent) cloud is reported
    assert (result["state"], result["version"]) == (wire.APPLIED, 1), result["reason"]
    runs = [[json.loads(line) for line in (state / name).read_text().splitlines()]
            for name in ("before.jsonl", "after.jsonl")]  # fmt: skip
    expected = sorted(f"frame{i}.png#{k}" for i in range(3) for k in range(len(PROMPTS)))
    for records, version in zip(runs, (0, 1)):
        assert sorted(r["sample_id"] for r in records) == expected
        assert all(r["answer"] and r["entropy"] is not None and r["adapter_version"] == version for r in records)
    assert len(list((state / "onnx_adapter").glob("adapter.safetensors"))) == 1  # v1 persisted by the robot
