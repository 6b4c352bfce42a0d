"""``cdcca bench edge`` on the test preset: workers in subprocesses, both backends agree, swaps never fail, the ONNX
Runtime worker runs without torch, and the summary carries issue 19's figures and targets."""

import contextlib
import io
from types import SimpleNamespace

import pytest

from cdcca.benchmarks.edge import EdgeBenchConfig, cli_bench_edge, plot_edge
from cloud_trainer.service import CloudConfig


@pytest.fixture(scope="module")
def edge_run(pretrained_test_pair, tmp_path_factory):
    """One small run of the benchmark (its printed output and plot kept), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench_edge")
    args = SimpleNamespace(preset="test", checkpoints=pretrained_test_pair, json=None, plot=out / "edge.png",
                           threads=1)  # fmt: skip
    config = EdgeBenchConfig(threads=(1,), images_per_domain=2, answers=20, warmup=2, parity_answers=15,
                             swap_answers=20, swap_every=4, uts_answers=4, uts_warmup=3, latency_rounds=2)  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = cli_bench_edge(args, config)
    return report, printed.getvalue(), out


@pytest.fixture
def edge_report(edge_run):
    return edge_run[0]


def test_edge_report(edge_run, tmp_path):
    report, printed, out = edge_run
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"torch", "onnxruntime"} and all(r["threads"] == 1 for r in rows.values())
    for row in rows.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["failed"] == 0 and row["applied"] == "5/5"
        assert row["peak_rss_mb"] > row["model_rss_mb"] > 0
    for worker in report["workers"]:  # p50 pools both latency rounds, so it lies between their p50s
        by_round = worker["latency_p50_ms_by_round"]
        assert len(by_round) == 2 and min(by_round) <= worker["latency_ms"]["p50"] <= max(by_round)
        assert "latencies_ms" not in worker
    summary = report["summary"]
    assert summary["ort_over_torch_p50"] == pytest.approx(rows["onnxruntime"]["p50_ms"] / rows["torch"]["p50_ms"])
    assert summary["ort_swap_ms"] == rows["onnxruntime"]["receive_ms"] > 0
    assert summary["failed_answers"] == 0
    assert report["parity"]["1"]["before"] >= 0.99 and report["parity"]["1"]["after"] >= 0.99
    assert report["uts"]["answers"] == 4 and report["uts"]["scoring_ms_mean"] > 0
    ort_uts = report["ort_uts"]
    assert ort_uts["answers"] == 4 and ort_uts["kept_samples"] >= 1 and ort_uts["stage_two_ms_mean"] > 0
    assert summary["uts_scoring_over_ort_answer"] == ort_uts["scoring_over_answer"] > 0
    # the warm-up's answers are scored first and reported apart; both workers decide on all seven
    assert len(ort_uts["keep_decisions"]) == len(report["uts"]["keep_decisions"]) == 7
    assert ort_uts["warmup_answers"] == 3 and ort_uts["kept_samples"] == sum(ort_uts["keep_decisions"][3:])
    assert ort_uts["cold_kept_fraction"] == 1.0  # the first answer of each prompt kind is always kept
    assert summary["uts_scoring_over_ort_answer_cold"] == ort_uts["cold_scoring_over_answer"] > 0
    assert summary["uts_kept_fraction"] == ort_uts["kept_samples"] / 4
    assert "onnxruntime" in printed and "ort_peak_rss_mib" in printed  # the table and the summary
    assert (out / "edge.png").stat().st_size > 10_000
    assert plot_edge(report, tmp_path / "again.png").is_file()
    assert plot_edge(report, tmp_path / "again.png").is_file()


def test_edge_report_measures_the_robot_without_torch(edge_report):
    # Assert: the ORT worker imported nothing of the torch stack; the torch worker did (the check can fail)
    report = edge_report
    workers = {w["backend"]: w for w in report["workers"]}
    assert workers["onnxruntime"]["heavy_modules"] == [] and "torch" in workers["torch"]["heavy_modules"]
    summary = report["summary"]
    assert summary["ort_worker_heavy_modules"] == [] and summary["targets_met"]["ort_worker_without_torch"]
    assert report["config"]["codec"] == CloudConfig.codec == "subspace"
    # VmHWM of each worker: without torch the ORT robot's peak is well below the torch one's
    rows = {r["backend"]: r for r in report["rows"]}
    by_threads = summary["ort_peak_rss_mib_by_threads"]
    assert summary["ort_peak_rss_mib"] == rows["onnxruntime"]["peak_rss_mb"] == by_threads["1"]
    assert 0 < summary["ort_peak_rss_mib"] < summary["torch_peak_rss_mib"] - 100


def test_edge_report_summary_carries_the_issue_targets(edge_report):
    summary = edge_report["summary"]
    assert summary["ort_over_torch_p50_by_threads"].keys() == {"1"}
    assert summary["uts_scoring_over_ort_answer_by_threads"]["1"] == summary["uts_scoring_over_ort_answer"] > 0
    assert summary["uts_scoring_over_kept_ort_answer"] >= summary["uts_scoring_over_ort_answer"]  # stage 2 runs there
    assert summary["parity_min"] >= 0.99 and 0 <= summary["uts_same_kept_samples_min"] <= 1
    assert summary["ort_swap_p99_ms"] >= summary["ort_swap_ms"] > 0
    assert summary["ort_picked_threads"] == {"1": {"single_frame": 1, "single_sample": 1}}  # one thread: no choice
    targets = summary["targets_met"]
    assert set(targets) == {"ort_worker_without_torch", "ort_peak_rss_at_most_200_mib",
                            "uts_scoring_at_most_0.3_ort_answer", "ort_p50_at_most_0.4_torch_at_1_and_2_threads",
                            "ort_swap_at_most_20ms_with_0_failed_answers", "answers_identical_to_torch"}  # fmt: skip
    assert targets["ort_p50_at_most_0.4_torch_at_1_and_2_threads"] is False  # 2 threads were not measured
    assert targets["ort_peak_rss_at_most_200_mib"] == (summary["ort_peak_rss_mib"] <= 200)
    assert targets["uts_scoring_at_most_0.3_ort_answer"] == (summary["uts_scoring_over_ort_answer"] <= 0.3)


def test_uts_figures_split_the_cold_start_from_the_steady_state():
    """The warm-up's answers count only in the cold-start figures; the target is read on the rest."""
    import numpy as np

    from cdcca.benchmarks.edge import _uts_figures

    config = EdgeBenchConfig(uts_answers=4, uts_warmup=2)
    answer_s = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    scoring_s = np.array([0.9, 0.7, 0.8, 0.0, 0.4, 0.0])
    kept = np.array([True, True, True, False, True, False])
    figures = _uts_figures(config, answer_s, scoring_s, kept)
    assert figures["scoring_over_answer"] == pytest.approx(1.2 / 8)
    assert figures["kept_scoring_over_answer"] == pytest.approx(1.2 / 4)
    assert figures["cold_scoring_over_answer"] == pytest.approx(1.6 / 2) and figures["cold_kept_fraction"] == 1.0
    assert figures["kept_samples"] == 2 and figures["keep_decisions"] == kept.tolist()
    assert figures["answer_ms_mean"] == pytest.approx(2000.0) and figures["scoring_ms_mean"] == pytest.approx(300.0)
    none = _uts_figures(EdgeBenchConfig(uts_answers=4, uts_warmup=0), answer_s[2:], scoring_s[2:], kept[2:])
    assert none["cold_scoring_over_answer"] is None and none["scoring_over_answer"] == figures["scoring_over_answer"]
    with pytest.raises(ValueError, match="uts_warmup"):
        EdgeBenchConfig(uts_warmup=-1)
