"""The ``subspace`` codec's subspace size against its quantizer's step, on the downlink bench's cases.

``cdcca bench downlink`` measures the registered ``subspace`` codec (one fold, one step) on six cases. This script
trains each case's codec-aware round once per fold and basis draw, exactly as the bench does (300 steps ending on
the mean of the last 100, the bench's two bases per case), and encodes it at several steps, so a fold's cost before
quantizing and each step's cost after it come from the same rounds. Losses are against each case's uncompressed
standard round (150 steps), as in the bench.

    python bench/subspace_folds.py --seeds 0 1 --folds 10 8 --steps 0.5 0.6 --json /tmp/a.json

(one thread; about a minute per round on the 2-core machine; seeds may run as separate processes side by side and
be merged with ``--merge``.) Results of stops 28 (zstd coder) and 29 (rANS coder, fold 8):
``bench/results/subspace_folds.json``, summarized in ``bench/downlink.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch


def run(seeds: list[int], folds: list[int], steps: list[float], fisher: bool = True,
        domains: list[str] | None = None) -> list[dict]:  # fmt: skip
    from cdcca.benchmarks import downlink
    from cdcca.benchmarks.downlink import DownlinkBenchConfig, _accuracy, _codec_row
    from cdcca.data.digits_shift import load_domain
    from cdcca.dwc import SubspaceCodec, SubspaceConfig, compute_delta
    from cdcca.models.checkpoint import load_mllm
    from cdcca.models.trainable import LoraSettings, add_lora, trainable_parameters
    from cdcca.paths import checkpoint_dir

    checkpoints = checkpoint_dir("tiny")
    teacher, pretrained = load_mllm(checkpoints / "teacher"), load_mllm(checkpoints / "student")
    config = DownlinkBenchConfig(**({"domains": tuple(domains)} if domains else {}))
    rows = []
    for seed in seeds:
        for domain in config.domains:
            student = copy.deepcopy(pretrained)
            torch.manual_seed(seed)
            add_lora(student, LoraSettings(seed=seed))
            base = {k: v.detach().clone() for k, v in trainable_parameters(student).items()}
            pristine = copy.deepcopy(student)
            test = load_domain(domain, "test", limit=config.test_images)
            downlink.adaptation_round(student, teacher, config, domain, seed)
            reference = _accuracy(student, test)  # the standard round, uncompressed
            for fold in folds:
                for draw in range(config.basis_draws):  # the bench's bases: the round's own, then forced seeds
                    model, log = downlink.codec_aware_round(pristine, teacher, config, domain, seed, fold, 1024, draw)
                    delta = compute_delta({k: v.detach().clone() for k, v in trainable_parameters(model).items()},
                                          base)  # fmt: skip
                    row = {"seed": seed, "domain": domain, "fold": fold, "draw": draw, "reference": reference,
                           "loss_unquantized": reference - _accuracy(model, test), "fisher": fisher,
                           "coder": SubspaceConfig().coder, "steps": {}}  # fmt: skip
                    importance = log["importance"] if fisher else None  # finer steps where the Fisher is high
                    for step in steps:
                        codec = SubspaceCodec(SubspaceConfig(fold=fold, basis_seed=log["subspace_seed"], step=step))
                        coded = _codec_row("subspace", codec, model, base, delta, importance, test, reference)
                        row["steps"][str(step)] = {"bits": coded["bits_per_param"], "loss": coded["acc_loss_points"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (fold, Fisher-refined steps or not, entropy coder, step): bits per parameter (mean, max), loss before
    quantizing and after the codec, pooled over the rounds, the worst round, and the rounds counted. Rows without a
    coder are stop 28's, coded by zstd."""

    def key(row: dict) -> tuple[int, bool, str]:
        return row["fold"], row.get("fisher", True), row.get("coder", "zstd")

    out = []
    for fold, fisher, coder in sorted({key(r) for r in rows}, reverse=True):
        mine = [r for r in rows if key(r) == (fold, fisher, coder)]
        for step in sorted({s for r in mine for s in r["steps"]}, key=float):
            cut = [r for r in mine if step in r["steps"]]
            losses = [r["steps"][step]["loss"] for r in cut]
            bits = [r["steps"][step]["bits"] for r in cut]
            before = float(np.mean([r["loss_unquantized"] for r in cut]))
            out.append({"fold": fold, "fisher": fisher, "coder": coder, "step": float(step), "rounds": len(cut),
                        "bits_mean": float(np.mean(bits)), "bits_max": max(bits), "loss_before_quantizing": before,
                        "loss": float(np.mean(losses)), "worst_round": max(losses)})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--folds", nargs="+", type=int, default=[10, 8])
    parser.add_argument("--steps", nargs="+", type=float, default=[0.5])
    parser.add_argument("--no-fisher", action="store_true",
                        help="one step per tensor at --steps x RMS, none finer where the round's Fisher is high")
    parser.add_argument("--domains", nargs="+", default=None,
                        help="target domains (default: the downlink bench's three visual shifts)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="instead of running: merge these reports' rounds into --json")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(path.read_text())["rounds"]]
        command = [c for path in args.merge for c in json.loads(path.read_text())["command"]]
    else:
        rows = run(args.seeds, args.folds, args.steps, fisher=not args.no_fisher, domains=args.domains)
        command = [f"python bench/subspace_folds.py --seeds {' '.join(map(str, args.seeds))} --folds "
                   f"{' '.join(map(str, args.folds))} --steps {' '.join(map(str, args.steps))}"
                   + (" --no-fisher" if args.no_fisher else "")
                   + (f" --domains {' '.join(args.domains)}" if args.domains else "")]  # fmt: skip
    report = {"command": command, "summary": summary(rows), "rounds": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    for row in report["summary"]:
        fisher = "" if row["fisher"] else "no Fisher "
        print(f"1/{row['fold']:<3d} {row['coder']:4s} {fisher}step {row['step']:<5g} {row['rounds']:3d} rounds  "
              f"bits {row['bits_mean']:.3f} (max {row['bits_max']:.3f})  "
              f"loss before quantizing {row['loss_before_quantizing']:+.2f}  after {row['loss']:+.2f}  "
              f"(worst round {row['worst_round']:+.2f})")


if __name__ == "__main__":
    main()
