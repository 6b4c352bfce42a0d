"""The downlink default on cases the committed ``bench downlink`` run never saw: other round seeds.

``cdcca bench downlink`` adapts the tiny student on three visual domains with round seeds 0 and 1 (six cases) and
names the default codec by its loss pooled over them. One answer of a test split is 0.29 points and two basis draws
of the same round moved a case by up to 2 points, so six cases are a small sample of what a new round sees. This
script runs the same cases (``run_downlink_bench``, same round, same codec, two basis draws per case) with other
round seeds and only the codecs asked for, without the frontier, the calibrated point and the scale projection,
and prints the loss per case and basis draw.

    python bench/downlink_seeds.py --seeds 2 3 --json bench/results/downlink_seeds.json

(one thread; about 9 minutes per seed on the 2-core machine; seeds may run as separate processes side by side,
``--json`` of each then merged by :func:`merge`, since every case adapts its own copy of the student.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def run(seeds: tuple[int, ...], codecs: tuple[str, ...]) -> dict:
    from cdcca.benchmarks.downlink import DownlinkBenchConfig, run_downlink_bench
    from cdcca.models.checkpoint import load_mllm
    from cdcca.paths import checkpoint_dir

    checkpoints = checkpoint_dir("tiny")
    teacher, student = load_mllm(checkpoints / "teacher"), load_mllm(checkpoints / "student")
    config = DownlinkBenchConfig(seeds=seeds, codecs=codecs, scale=False, calibration_images=0, swap_answers=50)
    report = run_downlink_bench(student, teacher, config, progress=False)
    return {"command": f"python bench/downlink_seeds.py --seeds {' '.join(map(str, seeds))}", "seeds": list(seeds),
            "codecs": list(codecs), "cases": report["cases"]}  # fmt: skip


def merge(reports: list[dict]) -> dict:
    """One report of several runs' cases (each case is independent of the others)."""
    return {"command": [r["command"] for r in reports], "seeds": [s for r in reports for s in r["seeds"]],
            "codecs": reports[0]["codecs"], "cases": [c for r in reports for c in r["cases"]]}  # fmt: skip


def summary(report: dict, codec: str = "subspace") -> dict:
    """Per case and basis draw: the codec's loss against the standard round's uncompressed delta, and the loss of
    the codec-aware round before quantizing; pooled over all rounds, per draw, and the worst round."""
    rows = []
    for case in report["cases"]:
        row = next(r for r in case["codecs"] if r["codec"] == codec)
        reference = row["accuracy"] + row["acc_loss_points"]  # the standard round's uncompressed accuracy
        for number, draw in enumerate(row.get("draws") or [row]):
            rows.append({"domain": case["domain"], "seed": case["seed"], "draw": number,
                         "acc_loss_points": draw["acc_loss_points"],
                         "subspace_loss_points": reference - draw.get("accuracy_subspace_uncompressed", reference)})
    losses = [r["acc_loss_points"] for r in rows]
    draws = sorted({r["draw"] for r in rows})
    return {"codec": codec, "rounds": len(rows), "acc_loss_points": float(np.mean(losses)),
            "acc_loss_points_by_draw": [float(np.mean([r["acc_loss_points"] for r in rows if r["draw"] == d]))
                                        for d in draws],
            "subspace_loss_points": float(np.mean([r["subspace_loss_points"] for r in rows])),
            "worst_round_acc_loss_points": max(losses), "per_round": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--codecs", nargs="+", default=["fp16", "subspace"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="instead of running: merge these reports into --json")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        report = merge([json.loads(p.read_text()) for p in args.merge])
    else:
        report = run(tuple(args.seeds), tuple(args.codecs))
    report["summary"] = {codec: summary(report, codec) for codec in report["codecs"] if codec != "fp16"}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    for codec, s in report["summary"].items():
        for row in s["per_round"]:
            print(f"{codec:10s} {row['domain']:16s} seed {row['seed']}  draw {row['draw']}  loss "
                  f"{row['acc_loss_points']:+.2f}  (codec-aware round before quantizing "
                  f"{row['subspace_loss_points']:+.2f})")
        print(f"{codec}: pooled over {s['rounds']} rounds {s['acc_loss_points']:.2f} points (by draw "
              f"{', '.join(f'{v:.2f}' for v in s['acc_loss_points_by_draw'])}; before quantizing "
              f"{s['subspace_loss_points']:.2f}); worst round {s['worst_round_acc_loss_points']:.2f}")


if __name__ == "__main__":
    main()
