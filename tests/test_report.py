"""What a JSON report says about where its figures came from: the environment and the checkpoint."""

import json
from pathlib import Path

from cdcca.report import checkpoint_fingerprint, environment, write_json


def test_the_environment_names_the_packages_that_change_numbers():
    env = environment()

    assert env["cpus"] >= 1 and env["python"].count(".") == 2
    # which bfloat16 kernels a pretrained pair came from (AMX and AVX512-BF16 build different pairs)
    assert set(env["cpu"]) == {"model", "bf16_units"}
    if not Path("/proc/cpuinfo").is_file():
        assert env["cpu"]["bf16_units"] is None  # unknown, not "none"
        return
    # what torch's own probes (CPUID) say, which oneDNN's bfloat16 kernels follow
    import torch

    if torch.cpu._is_amx_tile_supported():
        assert env["cpu"]["bf16_units"] == "amx"
    elif torch.cpu._is_avx512_bf16_supported():
        assert env["cpu"]["bf16_units"] == "avx512_bf16"
    else:
        assert env["cpu"]["bf16_units"] == "none"
    assert env["cpu"]["model"]
    packages = env["packages"]
    assert packages["torch"].startswith("2.") and packages["pillow"]  # Pillow renders the benchmark's images
    assert set(packages) == {"torch", "transformers", "peft", "numpy", "pillow", "scikit-learn", "onnxruntime"}


def test_measuring_verbs_write_their_environment_and_others_do_not(tmp_path, monkeypatch):
    from cdcca import cli

    monkeypatch.setitem(cli.HANDLERS, "eval", lambda args: {"rows": [1]})
    monkeypatch.setitem(cli.HANDLERS, "keys", lambda args: {"accepted": "trust"})
    measured, other = tmp_path / "eval.json", tmp_path / "keys.json"

    assert cli.main(["eval", "--json", str(measured)]) == 0
    assert cli.main(["keys", "list", "--json", str(other)]) == 0

    report = json.loads(measured.read_text())
    assert report.pop("wall_s") >= 0.0  # the verb's wall time, seconds
    assert report == {"rows": [1], "environment": environment()}
    assert json.loads(other.read_text()) == {"accepted": "trust"}  # a key report is not a measurement
    plain = json.loads(write_json({"rows": [2]}, tmp_path / "nested" / "plain.json").read_text())
    assert plain == {"rows": [2]}


def test_checkpoint_fingerprints_tell_checkpoints_apart(tmp_path):
    for model, weights in (("teacher", b"teacher weights"), ("student", b"student weights")):
        (tmp_path / "a" / model).mkdir(parents=True)
        (tmp_path / "a" / model / "model.safetensors").write_bytes(weights)
    (tmp_path / "b" / "teacher").mkdir(parents=True)
    (tmp_path / "b" / "teacher" / "model.safetensors").write_bytes(b"teacher weights, retrained")

    first, second = checkpoint_fingerprint(tmp_path / "a"), checkpoint_fingerprint(tmp_path / "b")

    assert first == checkpoint_fingerprint(tmp_path / "a") and len(first["teacher"]) == 16
    assert first["teacher"] != first["student"] and second["teacher"] != first["teacher"]
    assert second["student"] is None  # no student there
