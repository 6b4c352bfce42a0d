"""What a JSON report says about where its figures came from: the environment and the checkpoint."""

import json

from cdcca.report import checkpoint_fingerprint, environment, write_json


def test_json_reports_carry_the_environment_that_changes_numbers(tmp_path):
    path = write_json({"rows": [1, 2]}, tmp_path / "nested" / "report.json")

    report = json.loads(path.read_text())

    assert report["rows"] == [1, 2]
    packages = report["environment"]["packages"]
    assert packages["torch"].startswith("2.") and packages["pillow"]  # Pillow renders the benchmark's images
    assert report["environment"] == environment()
    kept = json.loads(write_json({"environment": "given"}, tmp_path / "given.json").read_text())
    assert kept["environment"] == "given"  # a report that says where it ran keeps its own


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
