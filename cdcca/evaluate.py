"""Score a model on benchmark samples: per domain, VQA / MC accuracy and caption BLEU-4 / CIDEr-D."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from cdcca.data.sample import Sample
from cdcca.metrics import aokvqa_mc_accuracy, bleu4, cider, vqa_accuracy
from cdcca.models.mllm import MLLM
from cdcca.report import progress_bar


@dataclass
class DomainScore:
    """Scores of one model on one domain (accuracies in percent, caption metrics as the COCO scorers give them).

    Attributes:
        domain: domain name.
        vqa: mean official VQA accuracy of direct answers (%), or ``None`` without VQA samples.
        mc: multiple-choice accuracy (%), or ``None``.
        bleu4: corpus BLEU-4 of captions (0-1), or ``None``.
        cider: corpus CIDEr-D of captions (0-10), or ``None``.
        accuracy: mean of ``vqa`` and ``mc`` (%), the headline number of the benchmark.
        samples: number of samples scored.
    """

    domain: str
    vqa: float | None
    mc: float | None
    bleu4: float | None
    cider: float | None
    accuracy: float | None
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


class EncodedSamples(list):
    """A fixed test set with the shared frozen encoder's visual tokens of every sample, so that the models that
    share that encoder (a teacher, its student and every adapted copy of it) answer it without encoding its frames
    again. A list of its samples, so anything that takes samples takes it.

    The tokens are computed in :func:`predict`'s batches, so answering from them gives the answers (and scores)
    that encoding the frames in place gives, bit for bit. Build one with :func:`encode_samples`.

    Attributes:
        encoder: the vision encoder module the tokens came from; :func:`predict` uses the tokens only for a model
            whose encoder is this very module (shared, frozen: nothing the project trains is in it).
        tokens: (N, T, D) visual tokens aligned with the samples.
        batch_size: the batch size they were computed at.
    """

    def __init__(self, samples: Sequence[Sample], encoder: torch.nn.Module, tokens: torch.Tensor, batch_size: int):
        super().__init__(samples)
        if tokens.shape[0] != len(self):
            raise ValueError(f"{tokens.shape[0]} token rows for {len(self)} samples")
        self.encoder, self.tokens, self.batch_size = encoder, tokens, batch_size


def encode_samples(model: MLLM, samples: Sequence[Sample], batch_size: int = 128) -> EncodedSamples:
    """``samples`` with ``model``'s visual tokens, batch by batch as :func:`predict` would encode them."""
    model.eval()
    with torch.inference_mode():
        tokens = [model.visual_tokens(model.preprocess([s.load_image() for s in samples[start : start + batch_size]]))
                  for start in range(0, len(samples), batch_size)]  # fmt: skip
    return EncodedSamples(samples, model.blip2.vision_model, torch.cat(tokens), batch_size)


def predict(
    model: MLLM, samples: Sequence[Sample], batch_size: int = 128, progress: bool = True, desc: str = "answering"
) -> list[str]:
    """Greedy answers of ``model`` to every sample, in order (from :class:`EncodedSamples`' tokens when they are
    ``model``'s encoder's at this batch size)."""
    model.eval()
    encoded = (isinstance(samples, EncodedSamples) and samples.encoder is model.blip2.vision_model
               and samples.batch_size == batch_size and len(samples.tokens) == len(samples))  # fmt: skip
    answers: list[str] = []
    with torch.inference_mode():
        for start in progress_bar(range(0, len(samples), batch_size), desc=desc, disable=not progress, leave=False):
            batch = samples[start : start + batch_size]
            prompts = [s.prompt for s in batch]
            if encoded:
                generation = model.generate(prompts, visual_tokens=samples.tokens[start : start + batch_size])
            else:
                generation = model.generate(prompts, images=[s.load_image() for s in batch])
            answers += generation.texts
    return answers


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> list[DomainScore]:
    """Per-domain scores of ``predictions`` (aligned with ``samples``), domains in first-seen order."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    by_domain: dict[str, list[tuple[Sample, str]]] = defaultdict(list)
    for sample, prediction in zip(samples, predictions):
        by_domain[sample.domain].append((sample, prediction))
    scores = []
    for domain, pairs in by_domain.items():
        vqa = [vqa_accuracy(p, s.answers) for s, p in pairs if s.task == "vqa"]
        mc = [aokvqa_mc_accuracy(p, s.choices, s.correct_idx) for s, p in pairs if s.task == "mc"]
        captions = {s.sample_id: p for s, p in pairs if s.task == "caption"}
        references = {s.sample_id: s.references for s, _ in pairs if s.task == "caption"}
        vqa_pct = 100.0 * sum(vqa) / len(vqa) if vqa else None
        mc_pct = 100.0 * sum(mc) / len(mc) if mc else None
        parts = [v for v in (vqa_pct, mc_pct) if v is not None]
        scores.append(
            DomainScore(
                domain=domain,
                vqa=vqa_pct,
                mc=mc_pct,
                bleu4=bleu4(captions, references) if captions else None,
                cider=cider(captions, references) if captions else None,
                accuracy=sum(parts) / len(parts) if parts else None,
                samples=len(pairs),
            )
        )
    return scores


def evaluate(
    model: MLLM, samples: Sequence[Sample], batch_size: int = 128, progress: bool = True, desc: str = "answering"
) -> list[DomainScore]:
    """Answer every sample with ``model`` and score per domain."""
    return score(samples, predict(model, samples, batch_size, progress, desc))


def summarize(scores_by_model: dict[str, list[DomainScore]], source_domain: str = "source") -> dict:
    """Source vs target accuracy per model, and the gaps the benchmark is built around.

    Returns ``{model: {"source": acc, "targets": mean acc over the other domains}}`` plus, when a
    ``teacher`` and a ``student`` are both present, ``teacher_minus_student_on_targets`` and
    ``student_source_minus_targets`` (percentage points).
    """
    summary: dict = {}
    for model, scores in scores_by_model.items():
        source = [s.accuracy for s in scores if s.domain == source_domain and s.accuracy is not None]
        targets = [s.accuracy for s in scores if s.domain != source_domain and s.accuracy is not None]
        summary[model] = {
            "source": source[0] if source else None,
            "targets": sum(targets) / len(targets) if targets else None,
        }
    teacher, student = summary.get("teacher"), summary.get("student")
    if teacher and student and teacher["targets"] is not None and student["targets"] is not None:
        summary["teacher_minus_student_on_targets"] = teacher["targets"] - student["targets"]
        if student["source"] is not None:
            summary["student_source_minus_targets"] = student["source"] - student["targets"]
    return summary
