"""How much of a frame's content a few visual tokens carry: the teacher's and the student's accuracy when they attend
only to k of the frame's tokens, picked by UTS (highest MC-dropout variance, Eq. 3-4), at random, or the lowest-
variance ones, on the target domains' stream frames (no training).

It answers why UTS's token stage is level with random tokens on this benchmark (Table 4): if a handful of tokens,
whichever they are, let the teacher answer as well as all of them, the vision encoder's attention has spread the
frame over every output token, and which tokens go up cannot matter much; how many do. The paper's encoder
(ViT-g/14, 257 tokens on natural images) keeps more of a patch's content local, where ranking tokens matters more.

Run: ``python bench/token_information.py --json bench/results/token_information.json`` (needs ``cdcca pretrain``;
about 2 min on 2 threads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdcca.akd import DistillSample, greedy_answers
from cdcca.benchmarks import adapt
from cdcca.data.digits_shift import VISUAL_DOMAINS, load_domain
from cdcca.evaluate import score
from cdcca.models.checkpoint import load_mllm
from cdcca.paths import checkpoint_dir
from cdcca.report import format_table
from cdcca.uts import UncertaintyTokenSampler, UTSConfig

RULES = ("uts", "random", "lowest")


def masks(variance: torch.Tensor, rule: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N) kept-token masks of ``count`` tokens per frame under ``rule``."""
    ranking = {"uts": variance, "lowest": -variance, "random": torch.rand(variance.shape, generator=generator)}[rule]
    return torch.zeros_like(variance, dtype=torch.bool).scatter_(1, ranking.topk(count, dim=1).indices, True)


@torch.inference_mode()
def accuracy(model, samples, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """``model``'s accuracy (VQA and multiple choice) attending only to ``mask``'s tokens."""
    kept = [DistillSample(s.sample_id, tokens[i], mask[i].long(), s.prompt) for i, s in enumerate(samples)]
    return score(samples, greedy_answers(model, kept))[0].accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 2, 4, 9, 18, 37])
    parser.add_argument("--mask-seeds", nargs="+", type=int, default=[0, 1, 2], help="random masks per count")
    parser.add_argument("--images", type=int, default=150, help="stream frames per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench/results/token_information.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = checkpoint_dir("tiny")
    teacher = load_mllm(checkpoints / "teacher")
    student = adapt._fresh_student(checkpoints, teacher, 0)
    sampler = UncertaintyTokenSampler(student, UTSConfig(seed=0))
    rows = []
    for domain in VISUAL_DOMAINS:
        samples = [s for s in load_domain(domain, "stream", limit=args.images, seed=0) if s.task != "caption"]
        with torch.inference_mode():
            front = sampler._front(student.preprocess([s.load_image() for s in samples]))
            tokens = sampler._deterministic_tail(front)
            variance = torch.cat([sampler.token_variance(front[i : i + 64], tokens[i : i + 64])
                                  for i in range(0, len(samples), 64)])  # fmt: skip
        total = tokens.shape[1]
        for count in [c for c in args.counts if c <= total]:
            for rule in RULES if count < total else ("uts",):
                seeds = args.mask_seeds if rule == "random" else [0]
                result = {"domain": domain, "tokens": count, "share": round(count / total, 3),
                          "rule": rule if count < total else "all"}  # fmt: skip
                for name, model in (("teacher", teacher), ("student", student)):
                    values = [accuracy(model, samples, tokens, masks(variance, rule, count,
                                                                     torch.Generator().manual_seed(seed)))
                              for seed in seeds]  # fmt: skip
                    result[name] = round(float(np.mean(values)), 2)
                rows.append(result)
                print(json.dumps(result), flush=True)
    report = {"command": "python bench/token_information.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k != "json"),
              "frames_per_domain": args.images, "tokens_per_frame": total, "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=1))
    print(format_table(rows, ["domain", "tokens", "rule", "teacher", "student"],
                       title="accuracy attending to k tokens of a frame"))  # fmt: skip
    print(f"report: {args.json}")


if __name__ == "__main__":
    main()
