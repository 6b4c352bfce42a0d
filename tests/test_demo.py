"""`cdcca demo` end to end on the test preset: two real processes on loopback, three rounds, a JSON-ready report."""

import json
import shutil

import pytest

from cdcca.demo import DemoConfig, DemoError, plot_demo, run_demo
from tests.test_transport import free_port

FIELDS = ("student_acc_before", "student_acc_after", "teacher_acc", "uplink_bytes", "raw_bytes", "downlink_bytes",
          "full_bytes", "update_latency_s")  # fmt: skip


def test_demo_runs_three_rounds_between_two_processes(pretrained_test_pair, tmp_path):
    config = DemoConfig(checkpoints=pretrained_test_pair, workdir=tmp_path / "demo", stream_images=8, test_images=4,
                        round_size=6, max_round_samples=6, steps=3, rate_hz=200.0, port=free_port(),
                        timeout_s=240)  # fmt: skip
    report = run_demo(config, progress=False)
    rows = report["rounds"]
    assert [r["version"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(isinstance(row[name], (int, float)) for name in FIELDS)
        assert row["uploaded_samples"] >= 1 and row["uplink_bytes"] > 0 and row["update_latency_s"] > 0
        assert row["raw_bytes"] > 0  # the frames of the answered prompts, found under the ids the robot uses
        assert 0 < row["downlink_bytes"] < row["full_bytes"]
    assert rows[1]["student_acc_before"] == rows[0]["student_acc_after"]
    assert report["answers_seen"] == report["bag"]["queries"] or report["answers_seen"] > 0
    json.dumps(report)  # the report is plain JSON
    assert plot_demo(report, tmp_path / "demo.png").stat().st_size > 10_000
    assert "round v3" in (tmp_path / "demo" / "cloud.log").read_text()


def test_a_dying_process_is_a_clear_error(pretrained_test_pair, tmp_path):
    broken = tmp_path / "checkpoints"
    shutil.copytree(pretrained_test_pair / "student", broken / "student")  # no teacher/: the cloud cannot start
    config = DemoConfig(checkpoints=broken, workdir=tmp_path / "demo", stream_images=2, test_images=2,
                        port=free_port(), timeout_s=60)  # fmt: skip
    with pytest.raises(Exception) as caught:
        run_demo(config, progress=False)
    assert isinstance(caught.value, (DemoError, FileNotFoundError, ValueError))
    assert "teacher" in str(caught.value)
