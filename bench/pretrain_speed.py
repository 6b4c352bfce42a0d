"""Pretraining speed: float32 against bfloat16 autocast, side by side in one run.

Issue 13 asks for the embedded pair's pretraining in at most 5 minutes on 2 cores. How long it takes depends on
the day's machine as much as on the code (the same bfloat16 build took 5:01 in stop 39 and 6:46 in stop 40 on
this VM), so one run's wall time says little; a ratio measured side by side does. This runs ``cdcca pretrain``'s
three stages at a fraction of their steps in each precision, in the order fp32, bf16, bf16, fp32 (a machine
that gets faster or slower during the run weighs on both alike) after an untimed warm-up of each (the first run
in a process also pays for loading the digit scans and for oneDNN's first kernels), and scales each stage's
seconds per step to the full step counts. Each run's scaled total is reported too: their spread is the noise.

Run: ``python bench/pretrain_speed.py --threads 2 --fraction 0.1 --json bench/results/pretrain_speed.json``
(about 4 minutes on 2 cores; bfloat16 is only worth it on a CPU with AMX or AVX512-BF16, see
:func:`cdcca.pretrain.resolve_precision`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from cdcca.pretrain import PretrainConfig, pretrain, resolve_precision
from cdcca.report import environment, format_table, save_figure, write_json

STAGE_STEPS = {"vision": "vision_steps", "teacher": "teacher_steps", "student": "student_steps"}
ORDER = ("fp32", "bf16", "bf16", "fp32")


def timed_run(precision: str, fraction: float, directory: Path) -> dict[str, float]:
    """Seconds per step of each stage, pretraining at ``fraction`` of the default steps into ``directory``."""
    full = PretrainConfig()
    steps = {field: max(1, round(getattr(full, field) * fraction)) for field in STAGE_STEPS.values()}
    config = PretrainConfig(**steps, precision=precision, out_dir=directory, checkpoint_every=10**9)
    report = pretrain(config, progress=False)
    return {log["stage"]: log["seconds"] / log["steps"] for log in report["stages"]}


def full_seconds(per_step: dict[str, float]) -> float:
    """A whole build's seconds at these seconds per step."""
    full = PretrainConfig()
    return sum(per_step[stage] * getattr(full, field) for stage, field in STAGE_STEPS.items())


def summarize(runs: list[dict]) -> list[dict]:
    """One row per stage and a total: mean seconds per step in each precision, the ratio, the full run's time."""
    full = PretrainConfig()
    rows, totals = [], {"fp32": 0.0, "bf16": 0.0}
    for stage, field in STAGE_STEPS.items():
        per_step = {p: float(np.mean([r["per_step_s"][stage] for r in runs if r["precision"] == p])) for p in totals}
        steps = getattr(full, field)
        row = {"stage": stage, "steps": steps}
        for p in totals:
            row[f"{p}_ms_per_step"] = round(1000 * per_step[p], 1)
            row[f"{p}_full_s"] = round(per_step[p] * steps, 1)
            totals[p] += per_step[p] * steps
        row["speedup"] = round(per_step["fp32"] / per_step["bf16"], 2)
        rows.append(row)
    speedup = round(totals["fp32"] / totals["bf16"], 2)
    total = {"stage": "total", "steps": sum(r["steps"] for r in rows), "speedup": speedup}
    rows.append(total | {f"{p}_full_s": round(seconds, 1) for p, seconds in totals.items()})
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bottoms = np.zeros(2)
    for row in rows[:-1]:
        seconds = np.array([row["fp32_full_s"], row["bf16_full_s"]]) / 60
        ax.bar(["float32", "bfloat16 autocast"], seconds, bottom=bottoms, label=row["stage"])
        bottoms += seconds
    ax.axhline(5, color="grey", linestyle="--", linewidth=1, label="5 min")
    ax.set_ylabel("full pretraining (min, scaled)")
    ax.set_title(f"cdcca pretrain on {torch.get_num_threads()} threads: {rows[-1]['speedup']}x")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of each stage's default steps to time")
    parser.add_argument("--json", type=Path, default=Path("bench/results/pretrain_speed.json"))
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    torch.set_num_threads(args.threads)
    if resolve_precision("auto") != "bf16":
        print("pretrain_speed: note: this CPU has no bfloat16 matrix units; bf16 is emulated here", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("fp32", "bf16"):  # untimed
            timed_run(precision, min(args.fraction, 0.02), Path(scratch) / f"warm-{precision}")
        for index, precision in enumerate(ORDER):
            per_step = timed_run(precision, args.fraction, Path(scratch) / f"{index}-{precision}")
            times = ", ".join(f"{stage} {1000 * seconds:.0f} ms/step" for stage, seconds in per_step.items())
            print(f"run {index + 1}/{len(ORDER)} {precision}: {times}", flush=True)
            runs.append({"precision": precision, "per_step_s": per_step, "full_s": round(full_seconds(per_step), 1)})
    rows = summarize(runs)
    columns = ["stage", "steps", "fp32_ms_per_step", "bf16_ms_per_step", "speedup", "fp32_full_s", "bf16_full_s"]
    print(format_table(rows, columns, title="cdcca pretrain: float32 vs bfloat16 autocast, side by side"))
    print("each run's whole build, scaled: " + ", ".join(f"{r['precision']} {r['full_s']} s" for r in runs))
    report = {"command": f"python bench/pretrain_speed.py --threads {args.threads} --fraction {args.fraction} "
                         f"--json {args.json}", "environment": environment(),
              "bfloat16_units": resolve_precision("auto") == "bf16", "order": list(ORDER), "runs": runs,
              "summary": rows}  # fmt: skip
    write_json(report, args.json)
    plot(rows, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
