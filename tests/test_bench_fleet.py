"""``cdcca bench fleet`` (issue 16, part 4), small and real: light robot processes on Zenoh loopback against 1 and 2
cloud worker processes sharing one SQLite store, a latency phase at an offered load, and a worker SIGKILLed
mid-round."""

import json

import pytest

from cdcca.benchmarks.fleet import FleetBenchConfig, format_fleet, plot_fleet, read_records, run_fleet_bench

pytest.importorskip("zenoh", reason="the fleet benchmark runs on the real Zenoh link")


@pytest.fixture(scope="module")
def report(pretrained_test_pair, tmp_path_factory):
    config = FleetBenchConfig(checkpoints=pretrained_test_pair, workdir=tmp_path_factory.mktemp("fleet"), robots=(1, 2),
                              workers=(1, 2), saturation_rounds=2, latency_robots=(1, 2), latency_rounds=2,
                              min_period_s=1.0, kill_robots=2, kill_rounds=2, speedup_pairs=2, lease_s=1.5,
                              phase_timeout_s=60.0)  # fmt: skip
    return run_fleet_bench(config, progress=False)


def test_the_report_carries_every_phase_and_the_summary_keys(report, tmp_path):
    phases = [(r["phase"], r["workers"], r["robots"]) for r in report["rows"]]
    assert phases == [("saturation-n1", 1, 1), ("saturation-n2", 1, 2), ("saturation-n1", 2, 1),
                      ("saturation-n2", 2, 2), ("load-n1", 2, 1), ("load-n2", 2, 2), ("kill", 2, 2),
                      # the second pair: fresh fleets, 2 workers first this time, a warm-up then the largest fleet
                      ("pair2-saturation-n1", 2, 1), ("pair2-saturation-n2", 2, 2),
                      ("pair2-saturation-n1", 1, 1), ("pair2-saturation-n2", 1, 2)]  # fmt: skip
    summary = report["summary"]
    by_pair = {(r["pair"], r["workers"]): r["rounds_per_min"] for r in report["rows"]
               if r["phase"].endswith("saturation-n2")}  # fmt: skip
    ratios = [by_pair[p, 2] / by_pair[p, 1] for p in (1, 2)]
    assert summary["speedup_2_workers_by_pair"] == pytest.approx(ratios)
    assert summary["speedup_2_workers"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert summary["speedup_2_workers_worst_pair"] == pytest.approx(min(ratios))
    alone = [by_pair[p, 1] for p in (1, 2)]
    assert summary["rounds_per_min_1_worker_spread"] == pytest.approx(max(alone) / min(alone))
    assert summary["rounds_per_min_1_worker"] == by_pair[1, 1]  # the main pass's figures stay
    for key in ("rss_per_robot_over_state", "speedup_2_workers", "p95_ratio_32_vs_1", "acked_lost"):
        assert key in summary
    assert summary["p95_ratio_32_vs_1"] is None  # no 32-robot fleet here: not made up from other sizes
    assert summary["speedup_2_workers"] > 0 and summary["state_bytes"] > 0
    assert summary["rss_per_robot_over_state"] is not None
    for row in report["rows"]:
        assert row["rounds"] == row["robots"] * (2 if row["phase"] != "load-n2" else 1)
        assert ("pair" in row) == ("saturation" in row["phase"])
        assert row["p50_s"] is not None and 0 <= row["p50_s"] <= row["p95_s"] <= row["max_s"]
        assert row["rss_mib"] > 0 and row["worker_cpu_share"] > 0 and row["load_average_1m"] >= 0
        assert row["robots_cpu_cores"] > 0
    load = [r for r in report["rows"] if r["phase"].startswith("load")]
    assert all(0 < r["offered_share"] <= 0.5 + 1e-9 for r in load)
    json.dumps(report)  # what --json writes
    assert "rounds/min" in format_fleet(report)
    plot_fleet(report, tmp_path / "fleet.png")
    assert (tmp_path / "fleet.png").stat().st_size > 0


def test_no_acknowledged_sample_is_lost_and_every_robot_applies_one_version_per_round(report):
    assert report["summary"]["acked_lost"] == 0 and report["summary"]["acked_unused"] == 0
    for row in report["rows"]:
        assert row["acked"] == row["rounds"] * report["config"]["round_size"], row["phase"]
        assert row["versions_ok"], row["problems"]  # applied exactly 1..R, the store at v R, nothing rejected
        assert row["bad_acks"] == 0


def test_a_killed_worker_s_round_is_rerun_by_the_other(report):
    [kill] = [r for r in report["rows"] if r["phase"] == "kill"]
    assert kill["killed"]["worker"] == "w0"
    assert kill["kill_rerun_by"] == "w1"  # the version w0 was training was committed by w1, once (versions_ok)
    assert kill["versions_ok"] and kill["acked_lost"] == 0


def test_the_recorded_upload_set_reads_back(report, pretrained_test_pair, tmp_path):
    from cdcca import wire
    from cdcca.benchmarks.fleet import write_records

    records = [b"\x00\x01", b"", b"abc"]
    write_records(tmp_path / "r.cdr", records)
    assert read_records(tmp_path / "r.cdr") == records
    upload = read_records(__import__("pathlib").Path(report["config"]["workdir"]) / "recorded" / "uploads.cdr")
    assert len(upload) >= 8 and wire.decode(wire.UTS_TOKENS, upload[0]).robot_id == "recorded"
