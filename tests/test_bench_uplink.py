"""``cdcca bench uplink`` on the test preset: byte accounting and the summary the issue asks for."""

import json

import numpy as np
import pytest

from cdcca.benchmarks.uplink import UplinkBenchConfig, camera_frame, run_uplink_bench
from cdcca.cli import main
from cdcca.models.checkpoint import load_mllm
from cdcca.uts import UTSConfig


def test_camera_frame_letterboxes_the_image():
    image = np.zeros((24, 24, 3), np.uint8)
    image[8:16, 8:16] = 255
    frame = camera_frame(image, 64, 48)
    assert frame.shape == (48, 64, 3)
    assert frame[:, :8].max() == 0 and frame[24, 32].min() == 255  # background bars, bright centre


def test_uplink_report_accounts_bytes(pretrained_test_pair):
    student = load_mllm(pretrained_test_pair / "student")
    report = run_uplink_bench(student, UplinkBenchConfig(images_per_domain=2, camera_width=64, camera_height=48),
                              progress=False)  # fmt: skip
    rows = {r["policy"]: r for r in report["rows"]}
    assert rows["raw RGB frame"]["bytes_per_frame"] == 64 * 48 * 3
    assert rows["raw RGB frame"]["native_24px"] == 24 * 24 * 3
    assert report["config"]["frames"] == 2 * 4 and report["config"]["samples"] == 2 * 4 * 3
    summary = report["summary"]
    for key in ("uts_over_raw", "uts_over_jpeg", "uts_overhead_ratio"):
        assert summary[key] > 0
    totals = report["totals_bytes"]
    assert summary["uts_over_raw"] == pytest.approx(totals["uts"] / totals["raw"])
    # int8 and stage 2 make each uploaded sample smaller than the same sample with all tokens in fp16
    assert totals["uts"] < totals["uts_stage1"]
    assert totals["uts"] <= totals["uts_per_prompt"]


def test_a_frames_tokens_travel_once_however_many_of_its_prompts_are_uncertain(pretrained_test_pair):
    student = load_mllm(pretrained_test_pair / "student")
    every = UTSConfig(sample_mode="threshold", entropy_threshold=-1.0)  # all three prompts of every frame
    report = run_uplink_bench(student, UplinkBenchConfig(images_per_domain=1, camera_width=64, camera_height=48,
                                                         uts=every), progress=False)  # fmt: skip
    summary, totals = report["summary"], report["totals_bytes"]
    assert summary["samples_kept_fraction"] == summary["frames_uploaded_fraction"] == 1.0
    # three prompts per frame: one message of the tokens and three prompts against three messages (on the test
    # preset's narrow tokens the header and prompts are a good part of a message)
    assert 1 / 3 < totals["uts"] / totals["uts_per_prompt"] == summary["uts_over_uts_per_prompt"] < 0.6
    assert summary["tokens_kept_fraction"] == pytest.approx(UTSConfig.token_keep_ratio, abs=0.05)


def test_bench_cli_writes_json_and_plot(pretrained_test_pair, tmp_path, capsys):
    out = tmp_path / "uplink.json"
    code = main(["bench", "uplink", "--checkpoints", str(pretrained_test_pair), "--images-per-domain", "1",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    assert "UTS stage 1+2 (int8)" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["summary"]) >= {"uts_over_raw", "uts_over_jpeg", "uts_overhead_ratio"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
