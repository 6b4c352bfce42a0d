"""One-knob sweep of CD-CCA's round around the project defaults, per visual domain and seed.

Each variant changes one or two fields of :class:`~cdcca.akd.AKDConfig` or :class:`~cdcca.uts.UTSConfig`
against the defaults that ``cdcca cloud``, ``make demo`` and ``cdcca bench adapt`` use, and runs the whole
digits-shift stream exactly as ``bench adapt``'s ``cdcca`` row does (same anchors, same test split, same
seeds). It answers "would another default close more of the gap on every domain?" with per-domain, per-seed
accuracy and the source drop, so a knob that helps one domain and hurts another shows as such.

Run: ``python bench/sweep_adapt.py --variants default feat3 --seeds 0 1 2 --json bench/results/sweep_adapt.json``
(needs ``cdcca pretrain``; about two minutes per variant and seed on one core). Results are appended to the
JSON's ``runs`` list when it exists, so a sweep can be extended a few runs at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from cdcca.akd import AKDConfig
from cdcca.benchmarks import adapt
from cdcca.data.digits_shift import SOURCE_DOMAIN, VISUAL_DOMAINS, load_domain
from cdcca.models.checkpoint import load_mllm
from cdcca.paths import checkpoint_dir
from cdcca.report import format_table
from cdcca.uts import UTSConfig

# Every variant but ``default`` is a change of the round before the KL + features default (the first row),
# spelled out here in full so a run's JSON still means what it meant when the default moves on.
BEFORE = {"lambda_query": 1.0, "lambda_repr": 1.0, "lambda_ce": 1.0, "lambda_kl": 1.0}
VARIANTS: dict[str, dict[str, dict]] = {
    "default": {"akd": {}, "uts": {}},  # today's AKDConfig / UTSConfig defaults (= "kl-feat3")
    "before-kl-feat3": {"akd": {**BEFORE}, "uts": {}},  # the default until kl-feat3 replaced it
    "steps120": {"akd": {**BEFORE, "steps": 120}, "uts": {}},
    "lr2e-3": {"akd": {**BEFORE, "lr": 2e-3}, "uts": {}},
    "frac0.75": {"akd": {**BEFORE}, "uts": {"sample_fraction": 0.75}},
    "frac1.0": {"akd": {**BEFORE}, "uts": {"sample_fraction": 1.0}},
    "keep0.75": {"akd": {**BEFORE}, "uts": {"token_keep_ratio": 0.75}},
    "soft": {"akd": {**BEFORE, "lambda_kl": 2.0, "lambda_ce": 0.5}, "uts": {}},
    "kl-only": {"akd": {**BEFORE, "lambda_kl": 2.0, "lambda_ce": 0.0}, "uts": {}},
    "feat3": {"akd": {**BEFORE, "lambda_query": 3.0, "lambda_repr": 3.0}, "uts": {}},
    "feat5": {"akd": {**BEFORE, "lambda_query": 5.0, "lambda_repr": 5.0}, "uts": {}},
    "anchor0.5": {"akd": {**BEFORE, "lambda_anchor": 0.5}, "uts": {}},
    "no-backtrack": {"akd": {**BEFORE, "max_backtracks": 0}, "uts": {}},
    "kl-feat3": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 3.0, "lambda_repr": 3.0}, "uts": {}},
    "kl-feat3-ce0.5": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.5, "lambda_query": 3.0, "lambda_repr": 3.0},
                       "uts": {}},
    "kl-feat5": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 5.0, "lambda_repr": 5.0}, "uts": {}},
    "kl-feat3-a128": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 3.0, "lambda_repr": 3.0},
                      "uts": {}, "bench": {"anchor_images": 128}},
    "plk0.75": {"akd": {**BEFORE, "pseudo_label_keep": 0.75}, "uts": {}},
    "tol0.01": {"akd": {**BEFORE, "forget_tolerance": 0.01}, "uts": {}},
}


def run_variant(name: str, seed: int, checkpoints: Path, teacher, tests, config: adapt.AdaptBenchConfig) -> dict:
    """The ``cdcca`` row of ``bench adapt`` for one seed, with the variant's fields changed."""
    change = VARIANTS[name]

    def make(_, student, teacher, steps, seed, anchors=None):
        akd = AKDConfig(**{"steps": steps, "seed": seed, "check_fraction": adapt.CHECK_FRACTION, **change["akd"]})
        uts = UTSConfig(**{"seed": seed, **change["uts"]})
        return adapt.CdccaMethod(student, teacher, uts=uts, akd=akd, seed=seed, anchors=anchors)

    original, adapt.make_method = adapt.make_method, make
    config = dataclasses.replace(config, **change.get("bench", {}))
    try:
        started = time.perf_counter()
        run = adapt.run_method("cdcca", checkpoints, teacher, config, seed, tests, progress=False)
    finally:
        adapt.make_method = original
    return {"variant": name, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "acc": {r["domain"]: round(r["acc"], 2) for r in run["rounds"]},
            "kept_step": [r["kept_step"] for r in run["rounds"]],
            "samples_used": [r["samples_used"] for r in run["rounds"]],
            "backtracks": [r.get("backtracks") for r in run["rounds"]],
            "source_drop": round(run["source_before"] - run["source_after"], 2)}  # fmt: skip


def summarize(runs: list[dict], domains: list[str]) -> list[dict]:
    """Per variant: mean and worst seed accuracy per domain, mean over visual domains, worst source drop."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        row = {"variant": name, "seeds": len(mine)}
        for domain in domains:
            values = [r["acc"][domain] for r in mine]
            row[domain] = f"{np.mean(values):.1f} ({min(values):.1f})"
        row["visual_mean"] = round(float(np.mean([np.mean([r["acc"][d] for d in VISUAL_DOMAINS]) for r in mine])), 2)
        row["worst_drop"] = max(r["source_drop"] for r in mine)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/sweep_adapt.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = checkpoint_dir("tiny")
    config = adapt.AdaptBenchConfig(seeds=tuple(args.seeds), methods=("cdcca",), ablations=False)
    teacher = load_mllm(checkpoints / "teacher")
    tests = {d: load_domain(d, "test", limit=config.test_images) for d in (SOURCE_DOMAIN, *config.domains)}
    report = json.loads(args.json.read_text()) if args.json.exists() else {"variants": VARIANTS, "runs": []}
    report["variants"] = VARIANTS
    for seed in args.seeds:
        for name in args.variants:
            run = run_variant(name, seed, checkpoints, teacher, tests, config)
            print(json.dumps(run), flush=True)
            report["runs"].append(run)
            report["summary"] = summarize(report["runs"], list(config.domains))
            args.json.write_text(json.dumps(report, indent=1))
    columns = ["variant", "seeds", *config.domains, "visual_mean", "worst_drop"]
    print(format_table(report["summary"], columns, title="CD-CCA one-knob sweep: accuracy mean (worst seed)"))
    print(f"report: {args.json}")


if __name__ == "__main__":
    main()
