"""What a cloud round costs with the teacher's side computed once per round against once per step.

The teacher is frozen and in eval mode, so its Q-Former query outputs and answer hidden states on a buffered sample
are the same at every step of a round. :meth:`cdcca.akd.Distiller.run_round` computes them once for the buffer
(:meth:`~cdcca.akd.Distiller.teacher_targets`); before stop 32 every step ran the teacher on its batch again. This
runs ``bench adapt``'s CD-CCA row through the whole stream twice on the same seed, once as the round does now and
once with the teacher run per step (the targets are dropped on the way into :meth:`~cdcca.akd.Distiller.losses`, so
it computes them from the batch), and reports per round the seconds, the accuracy after it and the source drop.

Run: ``python bench/round_time.py --seeds 0 1 --json bench/results/round_time.json`` (needs ``cdcca pretrain``;
about 3 min per seed on one thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cdcca.benchmarks import adapt
from cdcca.data.digits_shift import SOURCE_DOMAIN, load_domain
from cdcca.evaluate import evaluate
from cdcca.models.checkpoint import load_mllm
from cdcca.paths import checkpoint_dir
from cdcca.report import format_table

MODES = ("per-round", "per-step")


def run(mode: str, seed: int, checkpoints: Path, teacher, tests: dict, config: adapt.AdaptBenchConfig) -> dict:
    """The CD-CCA row for one seed, the teacher's side computed once per round (``per-round``) or per step."""
    torch.manual_seed(seed)
    student = adapt._fresh_student(checkpoints, teacher, seed)
    anchors = adapt.source_anchors(student, config.anchor_images)
    method = adapt.make_method("cdcca", student, teacher, config.steps, seed, anchors)
    if mode == "per-step":
        method.distiller.losses = _drop_targets(method.distiller.losses)
    before = evaluate(student, tests[SOURCE_DOMAIN], progress=False)[0].accuracy
    rounds = []
    for domain in config.domains:
        stream = load_domain(domain, "stream", limit=config.stream_images, seed=seed)
        started = time.perf_counter()
        method.adapt(stream)
        seconds = time.perf_counter() - started
        report = method.last_report
        rounds.append({"domain": domain, "seconds": round(seconds, 2),
                       "train_seconds": round(report.seconds - report.pseudo_label_seconds, 2),
                       "acc": round(evaluate(student, tests[domain], progress=False)[0].accuracy, 2)})  # fmt: skip
    drop = before - evaluate(student, tests[SOURCE_DOMAIN], progress=False)[0].accuracy
    return {"mode": mode, "seed": seed, "rounds": rounds, "source_drop": round(drop, 2),
            "round_seconds": round(float(np.mean([r["seconds"] for r in rounds])), 2)}  # fmt: skip


def _drop_targets(losses):
    """``losses`` called without the round's precomputed teacher targets: the teacher runs on every batch."""

    def per_step(batch, labels, anchors=None, anchor_scale=1.0, anchor_queries=None, targets=None):
        return losses(batch, labels, anchors, anchor_scale, anchor_queries)

    return per_step


def summarize(runs: list[dict], domains) -> dict:
    """Per mode: mean seconds per round and of its training steps, accuracy per domain, worst source drop; and how
    many times faster a round is with the teacher's side computed once."""
    rows = []
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, "seeds": len(mine),
               "round_s": round(float(np.mean([r["round_seconds"] for r in mine])), 2),
               "train_s": round(float(np.mean([x["train_seconds"] for r in mine for x in r["rounds"]])), 2),
               "worst_drop": max(r["source_drop"] for r in mine)}  # fmt: skip
        for domain in domains:
            accuracy = [x["acc"] for r in mine for x in r["rounds"] if x["domain"] == domain]
            row[domain] = round(float(np.mean(accuracy)), 2)
        rows.append(row)
    return {"summary": rows, "round_speedup": round(rows[1]["round_s"] / rows[0]["round_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/round_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = checkpoint_dir("tiny")
    config = adapt.AdaptBenchConfig()
    teacher = load_mllm(checkpoints / "teacher")
    tests = {d: load_domain(d, "test", limit=config.test_images) for d in (SOURCE_DOMAIN, *config.domains)}
    runs = [run(mode, seed, checkpoints, teacher, tests, config) for seed in args.seeds for mode in MODES]
    seeds = " ".join(map(str, args.seeds))
    report = {"command": f"python bench/round_time.py --seeds {seeds} --threads {args.threads}",
              "threads": args.threads, "runs": runs, **summarize(runs, config.domains)}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=1))
    title = f"a CD-CCA round, teacher once per round vs per step ({report['round_speedup']:.2f}x)"
    print(format_table(report["summary"], list(report["summary"][0]), title=title))
    print(f"report: {args.json}")


if __name__ == "__main__":
    main()
