"""``cdcca bench adapt`` on the test preset: every method runs the stream; evaluation never sees adapted data."""

import pytest
import torch

from cdcca.benchmarks.adapt import AdaptBenchConfig, CdccaMethod, make_method, run_adapt_bench
from cdcca.data.digits_shift import load_domain
from cdcca.models.checkpoint import load_mllm, share_vision_encoder
from cdcca.models.trainable import add_lora

ALL_METHODS = ["source-only", "tent", "cotta", "pkd", "cwd", "cdcca", "cdcca-paper", "cdcca-no-anchor", "pl", "pl@0.3",
               "+akd", "+uts-1", "uts@0.5", "random@0.5"]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_builds(pretrained_test_pair, name):
    teacher, student = load_mllm(pretrained_test_pair / "teacher"), load_mllm(pretrained_test_pair / "student")
    share_vision_encoder(teacher, student)
    add_lora(student)
    assert make_method(name, student, teacher, steps=1, seed=0).name in (name, "cdcca") or name == "source-only"


def test_stage_switches_change_what_is_uploaded(pretrained_test_pair):
    teacher, student = load_mllm(pretrained_test_pair / "teacher"), load_mllm(pretrained_test_pair / "student")
    share_vision_encoder(teacher, student)
    add_lora(student)
    stream = load_domain("printed", "stream", limit=10)
    everything = CdccaMethod(student, teacher, stage1=False, stage2=False).upload(stream)
    full = CdccaMethod(student, teacher).upload(stream)
    random = CdccaMethod(student, teacher, token_selection="random").upload(stream)
    assert len(everything) == len(stream) and all(int(s.token_mask.sum()) == len(s.token_mask) for s in everything)
    assert 0 < len(full) < len(stream)
    some = CdccaMethod(student, teacher, stage1=False, stage2=False, sample_fraction=0.5).upload(stream)
    assert 0 < len(some) < len(stream)
    kept = [int(s.token_mask.sum()) for s in full]
    assert [int(s.token_mask.sum()) for s in random] == kept and max(kept) < len(full[0].token_mask)


def test_lowest_token_selection_keeps_the_least_uncertain_tokens_of_each_frame(pretrained_test_pair):
    teacher, student = load_mllm(pretrained_test_pair / "teacher"), load_mllm(pretrained_test_pair / "student")
    share_vision_encoder(teacher, student)
    add_lora(student)
    stream = load_domain("printed", "stream", limit=10)  # one batch: one stage-2 draw, the same for a same-seed sampler

    lowest = CdccaMethod(student, teacher, token_selection="lowest").upload(stream)
    scores = CdccaMethod(student, teacher).sampler.score(stream)

    row = {s.sample_id: i for i, s in enumerate(stream)}
    assert lowest
    for sample in lowest:
        i = row[sample.sample_id]
        variance, count = scores.token_variance[i], int(scores.keep_tokens[i].sum())
        kept = sample.token_mask.nonzero().squeeze(1)
        assert len(kept) == count  # the count UTS keeps ...
        assert set(kept.tolist()) == set(variance.argsort()[:count].tolist())  # ... of the lowest variances
        assert not set(kept.tolist()) & set(scores.keep_tokens[i].nonzero().squeeze(1).tolist())
    with pytest.raises(ValueError, match="token_selection"):
        CdccaMethod(student, teacher, token_selection="highest")


def test_report_has_the_summary_and_held_out_rounds(pretrained_test_pair):
    config = AdaptBenchConfig(seeds=(0, 1), stream_images=2, test_images=2, steps=1, anchor_images=2,
                              methods=("source-only", "pl", "cdcca"), ablations=False,
                              domains=("printed", "rephrased"))  # fmt: skip
    report = run_adapt_bench(pretrained_test_pair, config, progress=False)
    summary = report["summary"]
    assert set(summary) >= {"cdcca_gain_mc", "cdcca_gain_da", "pl_gain_mc", "pl_gain_da", "best_baseline_gain_mc",
                            "best_baseline_gain_da", "gap_closed", "per_domain_gap_closed", "mean_gap_closed",
                            "source_drop", "worst_seed_source_drop", "teacher_lead"}  # fmt: skip
    assert set(summary["per_domain_gap_closed"]) == {"printed", "rephrased"}
    assert summary["mean_gap_closed"] == pytest.approx(sum(summary["per_domain_gap_closed"].values()) / 2)
    drops = [r["source_before"] - r["source_after"] for r in report["runs"] if r["method"] == "cdcca"]
    assert summary["worst_seed_source_drop"] == pytest.approx(max(drops))
    row = report["per_domain"]["printed"]["cdcca"]
    assert len(row["per_seed"]) == 2 and row["gap_closed_worst_seed"] <= row["gap_closed"]
    assert set(summary["per_domain_margin"]) == {"printed"}  # the visual domains: the target is about them
    cells, margin = report["per_domain"]["printed"], summary["per_domain_margin"]["printed"]
    assert margin["best_baseline"] == margin["closest_baseline"] == "pl"  # the one baseline here
    assert margin["margin"] == pytest.approx(cells["cdcca"]["acc"] - cells["pl"]["acc"])
    assert margin["spread"] == pytest.approx(max(cells["cdcca"]["std"], cells["pl"]["std"]))
    assert summary["uts_minus_random"] == {}  # no ablation, no comparison
    source_only = next(r for r in report["runs"] if r["method"] == "source-only")
    assert [r["domain"] for r in source_only["rounds"]] == ["printed", "rephrased"]
    assert source_only["source_before"] == source_only["source_after"]  # nothing adapted, nothing forgotten
    assert report["summary"]["cdcca_gain_mc"] == pytest.approx(
        report["headline"]["cdcca"]["mc"]["mean"] - report["headline"]["source-only"]["mc"]["mean"]
    )


def test_a_round_with_nothing_uploaded_is_a_no_op(pretrained_test_pair):
    from cdcca.uts import UTSConfig

    teacher, student = load_mllm(pretrained_test_pair / "teacher"), load_mllm(pretrained_test_pair / "student")
    share_vision_encoder(teacher, student)
    add_lora(student)
    method = CdccaMethod(student, teacher, uts=UTSConfig(sample_mode="threshold", entropy_threshold=1e9))
    result = method.adapt(load_domain("printed", "stream", limit=2))
    assert (result.steps, result.samples_used) == (0, 0)


def test_runs_on_worker_processes_report_what_one_process_reports(pretrained_test_pair):
    # Prepare: a small stream with the ablations (so the job list mixes headline and ablation runs)
    threads = torch.get_num_threads()
    settings = dict(seeds=(0,), stream_images=2, test_images=2, steps=1, anchor_images=2, keep_ratios=(0.25,),
                    methods=("source-only", "pl", "cdcca"), domains=("printed",), threads=2)  # fmt: skip
    torch.set_num_threads(1)  # the workers run on 2 // 2 threads each: the same float rounding as here
    try:
        # Execute
        serial = run_adapt_bench(pretrained_test_pair, AdaptBenchConfig(**settings), progress=False)
        parallel = run_adapt_bench(pretrained_test_pair, AdaptBenchConfig(**settings, workers=2), progress=False)
    finally:
        torch.set_num_threads(threads)

    # Assert: the same runs in the same order, the ablation rows reusing the headline's where they are identical
    def rows(report, key):
        return [(r["method"], r["seed"], [round(x["acc"], 6) for x in r["rounds"]], r["uplink_bytes"])
                for r in report[key]]  # fmt: skip

    assert rows(parallel, "runs") == rows(serial, "runs")
    assert rows(parallel, "ablation") == rows(serial, "ablation")
    names = [r["method"] for r in parallel["ablation"]]
    assert names == ["cdcca-paper", "pl", "+akd", "+uts-1", "cdcca", "cdcca-no-anchor", "uts@0.25", "random@0.25",
                     "pl@0.1", "pl@0.3"]  # fmt: skip
    assert parallel["summary"] == serial["summary"]
    accs = {r["method"]: r["rounds"][0]["acc"] for r in parallel["ablation"]}  # one round: printed
    assert parallel["summary"]["uts_minus_random"] == {"0.25": pytest.approx(accs["uts@0.25"] - accs["random@0.25"])}


def test_ablation_rows_identical_to_another_run_are_run_once(pretrained_test_pair, monkeypatch):
    # Prepare: a headline without PL, so the ablation's PL row runs here; "uts@0.5" is the headline's CD-CCA run
    import cdcca.benchmarks.adapt as adapt

    ran = []
    real = adapt.run_method

    def counting(name, *args, **kwargs):
        ran.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(adapt, "run_method", counting)
    config = AdaptBenchConfig(seeds=(0,), stream_images=2, test_images=2, steps=1, anchor_images=2, keep_ratios=(0.5,),
                              methods=("source-only", "cdcca"), domains=("printed",))  # fmt: skip

    # Execute
    report = run_adapt_bench(pretrained_test_pair, config, progress=False)

    # Assert
    assert sorted(ran) == sorted(["source-only", "cdcca", "cdcca-paper", "pl", "+akd", "+uts-1", "cdcca-no-anchor",
                                  "random@0.5", "pl@0.1", "pl@0.3"])  # fmt: skip
    rows = {r["method"]: r for r in report["ablation"]}
    assert rows["uts@0.5"]["rounds"] == rows["cdcca"]["rounds"] == report["runs"][1]["rounds"]
    with pytest.raises(ValueError, match="source-only and cdcca"):
        AdaptBenchConfig(methods=("source-only", "pl"))


def test_bench_adapt_runs_on_shifts_declared_in_a_file(pretrained_test_pair, tmp_path, monkeypatch):
    import json

    from cdcca import cli
    from cdcca.data import digits_shift

    monkeypatch.setattr(digits_shift, "DOMAINS", dict(digits_shift.DOMAINS))
    monkeypatch.setattr(digits_shift, "_LOADED_SHIFTS", {})
    shifts = tmp_path / "shifts.py"
    shifts.write_text("from cdcca.data.digits_shift import DomainSpec, white_on_black\n"
                      "SHIFTS = (DomainSpec('flipped', transform=lambda ink, rng: white_on_black(ink[:, ::-1])),\n"
                      "          DomainSpec('dim', transform=lambda ink, rng: white_on_black(ink * 0.5)))\n")
    out = tmp_path / "adapt.json"

    code = cli.main(["bench", "adapt", "--model", str(pretrained_test_pair), "--shifts", str(shifts), "--seeds", "0",
                     "--methods", "pl", "--no-ablations", "--stream-images", "2", "--steps", "1", "--json", str(out),
                     "--threads", "2"])  # fmt: skip

    report = json.loads(out.read_text())
    assert code == 0 and report["config"]["domains"] == ["flipped", "dim"]  # two workers: each registered them
    assert set(report["summary"]["per_domain_gap_closed"]) == {"flipped", "dim"}
    assert [r["domain"] for r in report["runs"][0]["rounds"]] == ["flipped", "dim"]
    assert report["environment"]["packages"]["torch"] and len(report["checkpoint"]["student"]) == 16
    assert cli.main(["bench", "adapt", "--model", str(pretrained_test_pair), "--shifts", f"{shifts}:NOPE"]) == 2


def test_the_margin_per_domain_is_beyond_the_seed_spread_only_if_every_baseline_is_cleared():
    from cdcca.benchmarks.adapt import per_domain_margin, uts_minus_random

    def cell(acc, std):
        return {"acc": acc, "std": std}

    per_domain = {
        "colour": {"cdcca": cell(85.0, 0.4), "pl": cell(85.7, 0.3), "cwd": cell(85.4, 0.9)},  # behind PL
        "noisy": {"cdcca": cell(74.0, 0.2), "pl": cell(72.0, 0.5), "cwd": cell(72.5, 0.9)},  # clear of both
        # ahead of the best (PL, 1.0 > 0.3) but not of CWD's wide spread: 1.1 < 1.5
        "printed": {"cdcca": cell(74.0, 0.2), "pl": cell(73.0, 0.3), "cwd": cell(72.9, 1.5)},
        "tied": {"cdcca": cell(80.0, 0.1), "pl": cell(79.0, 0.2), "cwd": cell(79.0, 1.2)},  # a tie: the first is best
    }
    margins = per_domain_margin(per_domain, ["colour", "noisy", "printed", "tied"], ["pl", "cwd"])
    assert margins["colour"] == {"best_baseline": "pl", "margin": pytest.approx(-0.7), "spread": 0.4,
                                 "closest_baseline": "cwd", "beyond_spread": False}  # 0.4 behind CWD's 0.9 spread
    assert margins["noisy"] == {"best_baseline": "cwd", "margin": pytest.approx(1.5), "spread": 0.9,
                                "closest_baseline": "cwd", "beyond_spread": True}  # fmt: skip
    assert margins["printed"]["best_baseline"] == "pl" and margins["printed"]["margin"] == pytest.approx(1.0)
    assert margins["printed"]["closest_baseline"] == "cwd" and margins["printed"]["beyond_spread"] is False
    assert margins["tied"]["best_baseline"] == "pl" and margins["tied"]["closest_baseline"] == "cwd"
    assert margins["tied"]["beyond_spread"] is False  # 1.0 against CWD's 1.2
    assert per_domain_margin(per_domain, ["colour"], []) == {}

    # UTS against random tokens over the rounds asked for only (a phrasing round cannot tell tokens apart)
    def row(method, accs):
        return {"method": method, "rounds": [{"domain": d, "acc": a} for d, a in zip(["printed", "rephrased"], accs)]}

    ablation = [row("uts@0.5", [80.0, 90.0]), row("random@0.5", [79.0, 97.0]), row("uts@0.25", [78.0, 95.0])]
    assert uts_minus_random(ablation, ["printed"]) == {"0.5": pytest.approx(1.0)}  # no random@0.25 to compare
    assert uts_minus_random(ablation, ["printed", "rephrased"]) == {"0.5": pytest.approx(-3.0)}
