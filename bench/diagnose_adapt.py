"""Diagnosis of adaptation under visual drift (issue: adaptation that works under visual drift).

Measures, on each visual target domain of digits-shift (first seed, the ``stream`` split the robot sees):

1. the teacher's pseudo-label accuracy on UTS-uploaded samples (with only their kept tokens, and with all
   tokens) against all samples;
2. the mix of prompt kinds in the uploads, with one entropy window for all prompts and with a window per kind;
3. the trainable set's capacity: one PL round with LoRA on the LM only against LoRA on the LM + Q-Former;
4. training on a quarter of the tokens, then answering with all of them;
5. steps and learning rate;
6. the exact-match check: how often the student's answers match the teacher's exactly, per task.

Run: ``python bench/diagnose_adapt.py --json bench/results/diagnose_adapt.json`` (needs ``cdcca pretrain``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.benchmarks.adapt import CdccaMethod
from cdcca.data.digits_shift import SOURCE_DOMAIN, VISUAL_DOMAINS, load_domain
from cdcca.evaluate import evaluate
from cdcca.metrics import aokvqa_mc_accuracy, vqa_accuracy
from cdcca.models.checkpoint import load_mllm, share_vision_encoder
from cdcca.models.trainable import LoraSettings, add_lora
from cdcca.paths import checkpoint_dir
from cdcca.report import format_table, progress_bar
from cdcca.uts import UTSConfig


def label_accuracy(samples, labels) -> float:
    """Mean accuracy (%) of answers on the VQA and MC samples (captions are not scored)."""
    scores = [vqa_accuracy(a, s.answers) if s.task == "vqa" else aokvqa_mc_accuracy(a, s.choices, s.correct_idx)
              for s, a in zip(samples, labels) if s.task != "caption"]  # fmt: skip
    return 100.0 * float(np.mean(scores)) if scores else float("nan")


def student(checkpoints, teacher, lora=LoraSettings()):
    model = load_mllm(checkpoints / "student")
    share_vision_encoder(teacher, model)
    return add_lora(model, lora)


def pl_round(checkpoints, teacher, stream, test, steps=60, lr=1e-3, lora=LoraSettings(), keep_ratio=None) -> float:
    """Accuracy on ``test`` after one plain pseudo-labelling round on ``stream`` (all samples)."""
    torch.manual_seed(0)
    model = student(checkpoints, teacher, lora)
    akd = AKDConfig(steps=steps, lr=lr, lambda_query=0, lambda_repr=0, lambda_ce=1, lambda_kl=0, lambda_anchor=0,
                    fit_projections=False)  # fmt: skip
    stage2 = keep_ratio is not None
    method = CdccaMethod(model, teacher, uts=UTSConfig(token_keep_ratio=keep_ratio or 1.0), akd=akd, stage1=False,
                         stage2=stage2)  # fmt: skip
    method.adapt(stream)
    return evaluate(model, test, progress=False)[0].accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/diagnose_adapt.json"))
    parser.add_argument("--stream-images", type=int, default=150)
    parser.add_argument("--test-images", type=int, default=347)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = checkpoint_dir("tiny")
    teacher = load_mllm(checkpoints / "teacher")
    report: dict = {"domains": {}}
    for domain in progress_bar(VISUAL_DOMAINS, desc="diagnose"):
        stream = load_domain(domain, "stream", limit=args.stream_images)
        test = load_domain(domain, "test", limit=args.test_images)
        by_id = {s.sample_id: s for s in stream}
        row: dict = {}
        # 1-2: uploads and the teacher's labels on them
        for name, group_words in (("one_window", 0), ("window_per_kind", 3)):
            method = CdccaMethod(student(checkpoints, teacher), teacher, uts=UTSConfig(group_words=group_words))
            uploaded = method.upload(stream)
            samples = [by_id[u.sample_id] for u in uploaded]
            row[f"upload_mix_{name}"] = dict(Counter(s.task for s in samples))
            if name == "window_per_kind":
                distiller = Distiller(teacher, method.student)
                full = DistillSample.from_samples(teacher, samples)
                everything = DistillSample.from_samples(teacher, stream)
                kept_labels = distiller.pseudo_label(uploaded)
                row["teacher_label_acc_uploaded_kept_tokens"] = label_accuracy(samples, kept_labels)
                row["teacher_label_acc_uploaded_all_tokens"] = label_accuracy(samples, distiller.pseudo_label(full))
                row["teacher_label_acc_all_samples"] = label_accuracy(stream, distiller.pseudo_label(everything))
                # 6: exact-match agreement of the (unadapted) student with the teacher, per task
                answers = Distiller._greedy(method.student, everything)
                teacher_labels = distiller.pseudo_label(everything)
                row["exact_match_student_teacher"] = {
                    task: float(np.mean([a == b for s, a, b in zip(stream, answers, teacher_labels) if s.task == task]))
                    for task in ("vqa", "mc", "caption")}  # fmt: skip
        # 3-5: one PL round, varying one thing at a time
        row["source_only"] = evaluate(student(checkpoints, teacher), test, progress=False)[0].accuracy
        row["teacher"] = evaluate(teacher, test, progress=False)[0].accuracy
        row["pl_lora_lm_only"] = pl_round(checkpoints, teacher, stream, test, lora=LoraSettings(qformer_modules=()))
        row["pl_lora_lm_qformer"] = pl_round(checkpoints, teacher, stream, test)
        row["pl_quarter_tokens"] = pl_round(checkpoints, teacher, stream, test, keep_ratio=0.25)
        row["pl_half_tokens"] = pl_round(checkpoints, teacher, stream, test, keep_ratio=0.5)
        for steps, lr in ((30, 1e-3), (120, 1e-3), (60, 3e-3)):
            row[f"pl_steps{steps}_lr{lr:g}"] = pl_round(checkpoints, teacher, stream, test, steps=steps, lr=lr)
        report["domains"][domain] = row
    source = load_domain(SOURCE_DOMAIN, "test", limit=args.test_images)
    report["source_only_source_acc"] = evaluate(student(checkpoints, teacher), source, progress=False)[0].accuracy
    columns = sorted({k for r in report["domains"].values() for k, v in r.items() if isinstance(v, float)})
    rows = [{"measure": c, **{d: r[c] for d, r in report["domains"].items()}} for c in columns]
    print(format_table(rows, ["measure", *report["domains"]], title="diagnosis per visual domain (seed 0)"))
    for d, r in report["domains"].items():
        print(d, "uploads one window:", r["upload_mix_one_window"], "per kind:", r["upload_mix_window_per_kind"],
              "exact match:", r["exact_match_student_teacher"])  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
