"""``cdcca bench downlink`` on the test preset: the round changes only the trainable set; the report adds up, and
the ``ecdq`` rate point is chosen on held-out stream images by the stated rule."""

import pytest
import torch

from cdcca.benchmarks.downlink import DownlinkBenchConfig, run_downlink_bench
from cdcca.models.checkpoint import load_mllm
from cdcca.models.trainable import trainable_parameters


def test_downlink_report(pretrained_test_pair):
    student, teacher = load_mllm(pretrained_test_pair / "student"), load_mllm(pretrained_test_pair / "teacher")
    frozen_before = {n: p.detach().clone() for n, p in student.blip2.named_parameters()}
    config = DownlinkBenchConfig(domains=("printed", "colour_inverted"), stream_images=8, test_images=4, steps=3,
                                 batch_size=8, swap_answers=20, swap_every=2, scale=False, seeds=(0,),
                                 calibration_images=3, ladder=(2.0, 4.0), dither_seeds=(0, 1))

    report = run_downlink_bench(student, teacher, config, progress=False)

    trainable = set(trainable_parameters(student))
    for name, param in student.blip2.named_parameters():
        if name not in trainable and name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name  # only the trainable set moved
    rows = {r["codec"]: r for r in report["codecs"]}
    assert set(rows) >= {"fp16", "nf4", "sparse-sign-ref"}
    for row in rows.values():
        assert row["bits_per_param"] == pytest.approx(8 * row["bytes"] / row["params"])
        assert row["ms_at_10mbps"] == pytest.approx(100 * row["ms_at_1gbps"])
    assert rows["sparse-sign-ref"]["bytes"] < rows["ecsq"]["bytes"] < rows["nf4"]["bytes"] < rows["fp16"]["bytes"] * 1.5
    assert rows["ecdq"]["bytes"] < rows["ecsq"]["bytes"]
    for case in report["cases"]:  # the frontier: every (step, dither seed), and the point chosen on held-out images
        points = case["frontier"]
        assert [(p["step"], p["seed"]) for p in points] == [(2.0, 0), (2.0, 1), (4.0, 0), (4.0, 1)]
        assert points[2]["bits_per_param"] < points[0]["bits_per_param"]
        chosen = case["codecs"][-1]
        assert chosen["codec"] == "ecdq@cal"
        assert (chosen["step"], chosen["seed"]) in [(p["step"], p["seed"]) for p in points]
        within = [p for p in points if p["held_out_loss_points"] + p["held_out_error_points"] <= config.max_loss_points]
        assert all(p["held_out_error_points"] >= 0 for p in points)
        if within:
            assert chosen["held_out_loss_points"] + chosen["held_out_error_points"] <= config.max_loss_points
            assert chosen["bits_per_param"] == min(p["bits_per_param"] for p in within)
    assert len(report["summary"]["calibrated"]["chosen"]) == 2
    assert [case["domain"] for case in report["cases"]] == ["printed", "colour_inverted"]
    for position, row in enumerate(report["codecs"]):  # each codec's row is its worst case over the domains
        per_case = [case["codecs"][position] for case in report["cases"]]
        assert row["acc_loss_points"] == max(r["acc_loss_points"] for r in per_case)
        assert row["bytes"] == max(r["bytes"] for r in per_case)
    for case in report["cases"]:  # the codec-aware codec: one round per basis draw, the loss their mean
        aware = next(r for r in case["codecs"] if r["codec"] == "subspace")
        assert len(aware["draws"]) == config.basis_draws == 2
        assert len({d["basis_seed"] for d in aware["draws"]}) == 2
        assert aware["acc_loss_points"] == pytest.approx(sum(d["acc_loss_points"] for d in aware["draws"]) / 2)
        assert aware["bytes"] == max(d["bytes"] for d in aware["draws"])
    swap = report["hot_swap"]
    assert swap["failed_answers"] == 0 and swap["swaps_applied"] == swap["swaps_sent"] == 10
    summary = report["summary"]
    assert set(summary) >= {"default_codec", "why", "bits_per_param", "acc_loss_points", "nf4_bits_per_param",
                            "p99_swap_ratio", "failed_answers", "meets_target"}  # fmt: skip
    default = rows[summary["default_codec"]]
    assert "@" not in summary["default_codec"]  # a registered codec, which CloudConfig.codec can name
    within = [r for n, r in rows.items() if r["mean_acc_loss_points"] <= config.max_loss_points and "@" not in n]
    if within:  # the default is the smallest codec within the loss target, else the smallest of all
        assert default["bits_per_param"] == min(r["bits_per_param"] for r in within)
    assert summary["bits_per_param"] == default["bits_per_param"]
    assert summary["worst_case_acc_loss_points"] == default["acc_loss_points"] >= summary["acc_loss_points"]
    assert f"{default['bits_per_param']:.2f}" in summary["why"] or summary["why"].startswith("no codec")
