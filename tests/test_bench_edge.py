"""``cdcca bench edge`` on the test preset: workers in subprocesses, both backends agree, swaps never fail."""

from types import SimpleNamespace

import pytest

from cdcca.benchmarks.edge import EdgeBenchConfig, cli_bench_edge, plot_edge


def test_edge_report(pretrained_test_pair, tmp_path, capsys):
    args = SimpleNamespace(preset="test", checkpoints=pretrained_test_pair, json=None, plot=tmp_path / "edge.png",
                           threads=1)  # fmt: skip
    config = EdgeBenchConfig(threads=(1,), images_per_domain=2, answers=20, warmup=2, parity_answers=15,
                             swap_answers=20, swap_every=4, uts_answers=4)  # fmt: skip

    report = cli_bench_edge(args, config)

    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"torch", "onnxruntime"} and all(r["threads"] == 1 for r in rows.values())
    for row in rows.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["failed"] == 0 and row["applied"] == "5/5"
        assert row["peak_rss_mb"] > row["model_rss_mb"] > 0
    summary = report["summary"]
    assert summary["ort_over_torch_p50"] == pytest.approx(rows["onnxruntime"]["p50_ms"] / rows["torch"]["p50_ms"])
    assert summary["ort_swap_ms"] == rows["onnxruntime"]["receive_ms"] > 0
    assert summary["failed_answers"] == 0
    assert report["parity"]["1"]["before"] >= 0.99 and report["parity"]["1"]["after"] >= 0.99
    assert report["uts"]["answers"] == 4 and report["uts"]["scoring_ms_mean"] > 0
    ort_uts = report["ort_uts"]
    assert ort_uts["answers"] == 4 and ort_uts["kept_samples"] >= 1 and ort_uts["stage_two_ms_mean"] > 0
    assert summary["uts_scoring_over_ort_answer"] == ort_uts["scoring_over_answer"] > 0
    assert "onnxruntime" in capsys.readouterr().out  # the table
    assert (tmp_path / "edge.png").stat().st_size > 10_000
    assert plot_edge(report, tmp_path / "again.png").is_file()
