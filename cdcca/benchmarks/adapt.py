"""``cdcca bench adapt``: the continual online stream of the paper's Tables 1-4 on digits-shift.

The robot's student meets the target domains one after another (one round each, in stream order). In
each round a method adapts on that domain's unlabelled ``stream`` split; the student is then scored on the
domain's held-out ``test`` split (never adapted on): MC accuracy, DA accuracy (official VQA accuracy on the
direct-answer questions) and BLEU-4 / CIDEr-D on captions. Methods: source-only (no adaptation), TENT, CoTTA,
PKD, CWD and CD-CCA (UTS on the robot -> int8 tokens -> AKD in the cloud -> the adapted student). Also the
ablation PL / +AKD / +UTS-1 / +UTS-2 (Table 3) and UTS keep ratios against random token sampling (Table 4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.baselines.base import AdaptationMethod, RoundResult
from cdcca.data.digits_shift import SOURCE_DOMAIN, TARGET_DOMAINS, load_domain
from cdcca.data.sample import Sample
from cdcca.evaluate import DomainScore, evaluate
from cdcca.models.checkpoint import load_mllm, share_vision_encoder
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import LoraSettings, add_lora
from cdcca.report import progress_bar, save_figure
from cdcca.uts import UncertaintyTokenSampler, UTSConfig, pack_tokens


class CdccaMethod(AdaptationMethod):
    """CD-CCA as one round of the loop: UTS picks uncertain samples and tokens on the robot, they travel as
    int8 ``UtsTokens``, the teacher pseudo-labels them and AKD distills into the student.

    Args:
        student: the robot's student (adapted in place: the downlink is taken as lossless here; the DWC
            benchmark measures what codecs cost).
        teacher: the cloud teacher.
        uts: UTS settings; ``stage1=False`` uploads every sample, ``stage2=False`` every token.
        akd: distillation settings (``lambda_query = lambda_repr = 0`` gives plain pseudo-labelling, PL).
        token_selection: ``uts`` (MC-dropout variance) or ``random`` (same count, random tokens: Table 4).
    """

    name = "cdcca"

    def __init__(
        self,
        student: MLLM,
        teacher: MLLM,
        uts: UTSConfig | None = None,
        akd: AKDConfig | None = None,
        stage1: bool = True,
        stage2: bool = True,
        token_selection: str = "uts",
        seed: int = 0,
    ) -> None:
        super().__init__(student, teacher)
        if token_selection not in ("uts", "random"):
            raise ValueError(f"token_selection must be 'uts' or 'random', got {token_selection!r}")
        self.sampler = UncertaintyTokenSampler(student, uts or UTSConfig(seed=seed))
        self.distiller = Distiller(teacher, student, akd or AKDConfig(seed=seed))
        self.stage1, self.stage2, self.token_selection = stage1, stage2, token_selection
        self.generator = torch.Generator().manual_seed(seed)

    def upload(self, samples: Sequence[Sample], batch_size: int = 64) -> list[DistillSample]:
        """What the robot sends for a stream segment, as the cloud receives it."""
        uploaded = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            scores = self.sampler.score(batch)
            for i, sample in enumerate(batch):
                if self.stage1 and not scores.keep_sample[i]:
                    continue
                keep = scores.keep_tokens[i]
                if not self.stage2:
                    keep = torch.ones_like(keep)
                elif not scores.keep_sample[i]:  # stage 1 off: stage 2 was not computed for this sample
                    keep = self.sampler.stage_two(self.student.preprocess([sample.image]))[1][0]
                if self.stage2 and self.token_selection == "random":
                    count = int(keep.sum())
                    keep = torch.zeros_like(keep)
                    keep[torch.randperm(len(keep), generator=self.generator)[:count]] = True
                message = pack_tokens(scores.visual_tokens[i], keep, torch.zeros(len(keep)), robot_id="bench",
                                      sample_id=sample.sample_id, adapter_version=0, prompt=sample.prompt,
                                      student_answer=scores.answers[i],
                                      sample_entropy=float(scores.sample_entropy[i]))  # fmt: skip
                uploaded.append(DistillSample.from_uts(message))
        return uploaded

    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        started = time.perf_counter()
        uploaded = self.upload(samples)
        if not uploaded:  # nothing was uncertain enough to send: the cloud has nothing to learn from
            return RoundResult(steps=0, seconds=time.perf_counter() - started, loss=0.0, samples_used=0)
        report = self.distiller.run_round(uploaded)
        return RoundResult(steps=report.steps, seconds=time.perf_counter() - started,
                           loss=report.losses["total"], samples_used=len(uploaded))  # fmt: skip


class SourceOnly(AdaptationMethod):
    """No adaptation: the pretrained student as it ships."""

    name = "source-only"

    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        return RoundResult(steps=0, seconds=0.0, loss=0.0, samples_used=0)


@dataclass
class AdaptBenchConfig:
    """Settings of the continual benchmark.

    Args:
        seeds: seeds of the headline table (mean ± std over them).
        stream_images: stream images per domain a method adapts on (each asked one question per task).
        test_images: held-out test images per domain.
        steps: optimizer steps per round for every method.
        methods: methods of the headline table.
        ablations: run Table 3 (PL / +AKD / +UTS-1 / +UTS-2) and Table 4 (keep ratios vs random), first seed.
        keep_ratios: UTS token keep ratios of Table 4.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    stream_images: int = 150
    test_images: int = 347
    steps: int = 30
    methods: tuple[str, ...] = ("source-only", "tent", "cotta", "pkd", "cwd", "cdcca")
    ablations: bool = True
    keep_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    domains: tuple[str, ...] = field(default=TARGET_DOMAINS)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("AdaptBenchConfig.seeds must name at least one seed")
        for name in ("stream_images", "test_images", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdaptBenchConfig.{name} must be >= 1, got {getattr(self, name)}")


def _baseline(name: str) -> Callable[..., AdaptationMethod]:
    from cdcca.baselines.cotta import CoTTA, CoTTAConfig
    from cdcca.baselines.cwd import CWD, CWDConfig
    from cdcca.baselines.pkd import PKD, PKDConfig
    from cdcca.baselines.tent import Tent, TentConfig

    table = {
        "tent": (Tent, TentConfig),
        "cotta": (CoTTA, CoTTAConfig),
        "pkd": (PKD, PKDConfig),
        "cwd": (CWD, CWDConfig),
    }
    cls, config_cls = table[name]
    return lambda student, teacher, steps, seed: cls(student, teacher, config_cls(steps=steps, seed=seed))


CHECK_FRACTION = 0.2  # CD-CCA rounds hold out a fifth of the uploads to keep their best weights (AKDConfig)


def make_method(name: str, student: MLLM, teacher: MLLM, steps: int, seed: int) -> AdaptationMethod:
    """A method of the benchmark by name (headline methods and the ablation variants).

    Every CD-CCA variant checks its rounds on a held-out fifth of the uploads (``AKDConfig.check_fraction``,
    beyond the paper); ``cdcca-paper`` is the paper's round, training on everything with no check.
    """
    akd = AKDConfig(steps=steps, seed=seed, check_fraction=CHECK_FRACTION)
    pl = AKDConfig(steps=steps, seed=seed, lambda_query=0.0, lambda_repr=0.0, check_fraction=CHECK_FRACTION)
    if name == "source-only":
        return SourceOnly(student, teacher)
    if name == "cdcca":
        return CdccaMethod(student, teacher, akd=akd, seed=seed)
    if name == "cdcca-paper":
        return CdccaMethod(student, teacher, akd=AKDConfig(steps=steps, seed=seed), seed=seed)
    if name == "pl":
        return CdccaMethod(student, teacher, akd=pl, stage1=False, stage2=False, seed=seed)
    if name == "+akd":
        return CdccaMethod(student, teacher, akd=akd, stage1=False, stage2=False, seed=seed)
    if name == "+uts-1":
        return CdccaMethod(student, teacher, akd=akd, stage2=False, seed=seed)
    if name.startswith(("uts@", "random@")):
        kind, ratio = name.split("@")
        uts = UTSConfig(token_keep_ratio=float(ratio), seed=seed)
        return CdccaMethod(student, teacher, uts=uts, akd=akd, seed=seed,
                           token_selection="uts" if kind == "uts" else "random")  # fmt: skip
    return _baseline(name)(student, teacher, steps, seed)


def _fresh_student(checkpoints, teacher: MLLM, seed: int) -> MLLM:
    student = load_mllm(checkpoints / "student")
    share_vision_encoder(teacher, student)
    return add_lora(student, LoraSettings(seed=seed))


def _row(scores: DomainScore) -> dict:
    return {"mc": scores.mc, "da": scores.vqa, "bleu4": scores.bleu4, "cider": scores.cider, "acc": scores.accuracy}


def run_method(name: str, checkpoints, teacher: MLLM, config: AdaptBenchConfig, seed: int,
               tests: dict[str, list[Sample]], progress: bool = True) -> dict:  # fmt: skip
    """One method through the whole stream; per-round scores on held-out test data and the source drop."""
    torch.manual_seed(seed)
    student = _fresh_student(checkpoints, teacher, seed)
    method = make_method(name, student, teacher, config.steps, seed)
    source_before = evaluate(student, tests[SOURCE_DOMAIN], progress=False)[0].accuracy
    rounds = []
    for domain in progress_bar(config.domains, desc=f"{name} seed {seed}", disable=not progress, leave=False):
        stream = load_domain(domain, "stream", limit=config.stream_images, seed=seed)
        result = method.adapt(stream)
        student.eval()
        rounds.append({"domain": domain, **_row(evaluate(student, tests[domain], progress=False)[0]),
                       "seconds": result.seconds, "samples_used": result.samples_used})  # fmt: skip
    source_after = evaluate(student, tests[SOURCE_DOMAIN], progress=False)[0].accuracy
    mean = {key: float(np.mean([r[key] for r in rounds])) for key in ("mc", "da", "bleu4", "cider", "acc")}
    return {"method": name, "seed": seed, "rounds": rounds, "mean": mean,
            "source_before": source_before, "source_after": source_after}  # fmt: skip


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def run_adapt_bench(checkpoints, config: AdaptBenchConfig, progress: bool = True) -> dict:
    """Headline table over seeds, ablations on the first seed, teacher reference; returns the JSON report."""
    teacher = load_mllm(checkpoints / "teacher")
    tests = {d: load_domain(d, "test", limit=config.test_images) for d in (SOURCE_DOMAIN, *config.domains)}
    teacher_scores = {d: _row(evaluate(teacher, tests[d], progress=False)[0]) for d in config.domains}
    runs = [run_method(name, checkpoints, teacher, config, seed, tests, progress)
            for seed in config.seeds for name in config.methods]  # fmt: skip
    headline = {}
    for name in config.methods:
        mine = [r for r in runs if r["method"] == name]
        headline[name] = {key: _stats([r["mean"][key] for r in mine]) for key in ("mc", "da", "bleu4", "cider", "acc")}
        headline[name]["source_drop"] = _stats([r["source_before"] - r["source_after"] for r in mine])
        headline[name]["per_round_acc"] = [float(np.mean([r["rounds"][k]["acc"] for r in mine]))
                                           for k in range(len(config.domains))]  # fmt: skip
    ablation = []
    if config.ablations:
        names = ["cdcca-paper", "pl", "+akd", "+uts-1", "cdcca"] + [f"{kind}@{ratio}" for ratio in config.keep_ratios
                                                      for kind in ("uts", "random")]  # fmt: skip
        seed = config.seeds[0]
        ablation = [run_method(n, checkpoints, teacher, config, seed, tests, progress) for n in names]
    base = headline["source-only"]
    teacher_acc = float(np.mean([teacher_scores[d]["acc"] for d in config.domains]))
    gain = {name: {k: headline[name][k]["mean"] - base[k]["mean"] for k in ("mc", "da", "acc")} for name in headline}
    baselines = [n for n in config.methods if n not in ("source-only", "cdcca")]
    summary = {
        "cdcca_gain_mc": gain["cdcca"]["mc"], "cdcca_gain_da": gain["cdcca"]["da"],
        "best_baseline_gain_mc": max((gain[n]["mc"] for n in baselines), default=None),
        "best_baseline_gain_da": max((gain[n]["da"] for n in baselines), default=None),
        "gap_closed": gain["cdcca"]["acc"] / max(1e-9, teacher_acc - base["acc"]["mean"]),
        "source_drop": headline["cdcca"]["source_drop"]["mean"],
        "teacher_acc": teacher_acc, "source_only_acc": base["acc"]["mean"],
        "seeds": list(config.seeds),
    }  # fmt: skip
    return {"config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "teacher": teacher_scores,
            "headline": headline, "gain": gain, "runs": runs, "ablation": ablation, "summary": summary}  # fmt: skip


def plot_adapt(report: dict, path) -> None:
    """Accuracy per round per method (mean over seeds), with the teacher for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [r["domain"] for r in report["runs"][0]["rounds"]]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, row in report["headline"].items():
        style = {"linewidth": 2.5} if name == "cdcca" else {"linewidth": 1.2}
        ax.plot(domains, row["per_round_acc"], marker="o", label=name, **style)
    ax.plot(domains, [report["teacher"][d]["acc"] for d in domains], "k--", linewidth=1, label="teacher")
    ax.set_ylabel("accuracy (%), mean of MC and DA")
    ax.set_xlabel("round (target domain, in stream order)")
    ax.set_title(f"continual adaptation on digits-shift ({len(report['summary']['seeds'])} seeds)")
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, path)
