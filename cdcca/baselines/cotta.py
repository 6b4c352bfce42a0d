"""CoTTA: continual test-time adaptation with a mean teacher and stochastic restore (Wang et al., "Continual
Test-Time Domain Adaptation", CVPR 2022).

CoTTA adapts a classifier on an unlabelled, continually shifting stream: an exponential-moving-average (mean)
teacher of the model makes the pseudo labels -- averaged over augmentations of the input when the prediction is
not confident -- the model trains on them by cross-entropy, the teacher follows the model, and after each step a
random small fraction of the weights returns to the source values against forgetting. Adapted to an MLLM:

* a pseudo label is an answer: the EMA model greedily answers each sample, and the per-token targets are the EMA
  model's next-token distributions along that answer (soft targets, as in CoTTA's code);
* confidence is the EMA model's mean max-probability over the answer tokens, decided per sample (CoTTA decides
  per batch, from the source model's confidence); an unconfident sample's targets are the mean over
  ``num_augmentations`` augmented copies of its image (shift up to 2 px, brightness), which change the visual
  tokens, not the answer being scored. CoTTA's set for natural images also flips; a mirrored digit or word is
  another symbol, so the flip is left out (with it, the averaged targets of unconfident samples mixed in the
  mirrored symbol's answer, and CoTTA ended 1.1-2.6 points lower per visual domain on the first seed);
* updates, EMA and restore act on the trainable set (LoRA, query tokens, norms, biases). The EMA model is no deep
  copy: only the trainable set's EMA values are kept and swapped into the student for the EMA's passes, so it
  shares every frozen tensor, the vision encoder included;
* the model left adapted (and evaluated) is the student; CoTTA's own predictions come from the EMA teacher.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.baselines.base import AdaptationMethod, RoundResult, finish_round, optimizer_step
from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import freeze_all_but_trainable


@dataclass
class CoTTAConfig:
    """Optimisation, mean teacher and restore of a CoTTA round.

    Args:
        lr: AdamW learning rate of the trainable set.
        steps: optimizer steps per round.
        batch_size: samples per step.
        seed: seed of batch sampling, dropout, augmentations and restore masks.
        ema_momentum: weight of the old EMA value in each update (CoTTA: 0.999).
        restore_probability: chance that each trainable element returns to its source value after a step.
        confidence_threshold: samples whose EMA confidence is below it get augmentation-averaged targets.
        num_augmentations: augmented views averaged for an unconfident sample (CoTTA: 32).
        max_answer_tokens: longest greedy pseudo answer, in tokens.
    """

    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    ema_momentum: float = 0.999
    restore_probability: float = 0.01
    confidence_threshold: float = 0.9
    num_augmentations: int = 4
    max_answer_tokens: int = 12

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"CoTTAConfig.lr must be > 0, got {self.lr}")
        for name in ("steps", "batch_size", "num_augmentations", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CoTTAConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ema_momentum", "restore_probability", "confidence_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CoTTAConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def augment_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random label-preserving view of an RGB uint8 (H, W, 3) frame: shift by up to 2 px (edge-padded), brightness
    x0.8-1.2 (no flip: a mirrored digit is another symbol)."""
    height, width = image.shape[:2]
    dy, dx = rng.integers(-2, 3, size=2)
    view = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")[2 + dy : 2 + dy + height, 2 + dx : 2 + dx + width]
    return (view.astype(np.float32) * rng.uniform(0.8, 1.2)).round().clip(0, 255).astype(np.uint8)


@dataclass
class PseudoTargets:
    """The EMA model's pseudo labels for a batch.

    Attributes:
        answers: its greedy answers (the teacher-forced sequences).
        targets: (A, V) target distribution at every answer position, samples in order.
        owner: (A,) the sample each answer position belongs to.
        confidence: (B,) mean max-probability over each sample's answer tokens (before augmentation).
        augmented: (B,) whether the sample's targets were averaged over augmented views.
    """

    answers: list[str]
    targets: torch.Tensor
    owner: torch.Tensor
    confidence: torch.Tensor
    augmented: torch.Tensor


class CoTTA(AdaptationMethod):
    """Mean-teacher self-training with augmentation-averaged pseudo labels and stochastic restore (no teacher)."""

    name = "cotta"

    def __init__(self, student: MLLM, teacher: MLLM | None = None, config: CoTTAConfig | None = None) -> None:
        super().__init__(student, teacher)
        self.config = config or CoTTAConfig()
        self.trainable = freeze_all_but_trainable(student)
        self.source = {name: p.detach().clone() for name, p in self.trainable.items()}
        self.ema = {name: p.detach().clone() for name, p in self.trainable.items()}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=self.config.lr, weight_decay=0.0)
        self.restore_generator = torch.Generator().manual_seed(self.config.seed)
        self.augmented_samples = 0  # samples whose targets were augmentation-averaged, over all rounds
        self.rounds = 0

    @contextmanager
    def ema_weights(self) -> Iterator[MLLM]:
        """The student computing with the EMA values of its trainable set (swapped in, then back)."""
        with torch.no_grad():
            own = {name: p.detach().clone() for name, p in self.trainable.items()}
            for name, param in self.trainable.items():
                param.copy_(self.ema[name])
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(own[name])

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- m * ema + (1 - m) * student, per trainable tensor."""
        momentum = self.config.ema_momentum
        for name, param in self.trainable.items():
            self.ema[name].mul_(momentum).add_(param.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def stochastic_restore(self, probability: float | None = None) -> None:
        """Return each trainable element to its source value with ``probability`` (default: the config's)."""
        probability = self.config.restore_probability if probability is None else probability
        for name, param in self.trainable.items():
            restore = torch.rand(param.shape, generator=self.restore_generator) < probability
            param.copy_(torch.where(restore.to(param.device), self.source[name], param))

    def _answer_probs(
        self, visual_tokens: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, V) next-token probabilities at the answer positions and (A,) the sample each belongs to."""
        out = self.student.lm_forward(self.student.encode_visual(visual_tokens=visual_tokens), prompts, answers)
        positions = out.answer_positions  # (B, L - 1)
        return out.logits[:, :-1][positions].float().softmax(-1), positions.nonzero()[:, 0]

    @torch.no_grad()
    def pseudo_targets(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        visual_tokens: torch.Tensor | None = None,
        rng: np.random.Generator | None = None,
    ) -> PseudoTargets:
        """The EMA model's answers and targets; unconfident samples' targets averaged over augmented views."""
        rng = rng if rng is not None else np.random.default_rng(self.config.seed)
        student = self.student.eval()
        tokens = student.visual_tokens(student.preprocess(images)) if visual_tokens is None else visual_tokens
        with self.ema_weights():
            generation = student.generate(prompts, visual_tokens=tokens, max_new_tokens=self.config.max_answer_tokens)
            answers = generation.texts
            targets, owner = self._answer_probs(tokens, prompts, answers)  # (A, V), (A,)
            counts = torch.bincount(owner, minlength=len(prompts)).float()
            confidence = targets.new_zeros(len(prompts)).index_add_(0, owner, targets.max(-1).values) / counts  # (B,)
            augmented = confidence < self.config.confidence_threshold
            rows = augmented.nonzero()[:, 0].tolist()
            if rows:
                views = []
                for _ in range(self.config.num_augmentations):
                    view = student.visual_tokens(student.preprocess([augment_image(images[i], rng) for i in rows]))
                    views.append(self._answer_probs(view, [prompts[i] for i in rows], [answers[i] for i in rows])[0])
                targets[augmented[owner]] = torch.stack(views).mean(0)
        self.augmented_samples += len(rows)
        return PseudoTargets(answers, targets, owner, confidence, augmented)

    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        if not samples:
            raise ValueError("a CoTTA round needs at least one sample")
        started = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, self.rounds])
        torch.manual_seed(int(rng.integers(2**62)))
        self.student.eval()
        images = [s.load_image() for s in samples]
        with torch.no_grad():
            stream_tokens = self.student.visual_tokens(self.student.preprocess(images))  # (N, T, D)
        losses, used = [], set()
        for _ in range(self.config.steps):
            index = rng.choice(len(samples), size=min(self.config.batch_size, len(samples)), replace=False)
            used.update(index.tolist())
            prompts, tokens = [samples[i].prompt for i in index], stream_tokens[index]  # (B, T, D)
            pseudo = self.pseudo_targets([images[i] for i in index], prompts, tokens, rng)
            self.student.train()
            self.student.blip2.vision_model.eval()
            out = self.student.lm_forward(self.student.encode_visual(visual_tokens=tokens), prompts, pseudo.answers)
            log_probs = out.logits[:, :-1][out.answer_positions].float().log_softmax(-1)  # (A, V)
            loss = -(pseudo.targets * log_probs).sum(-1).mean()
            losses.append(optimizer_step(self.optimizer, loss, self.trainable.values()))
            self.update_ema()
            self.stochastic_restore()
        self.rounds += 1
        return finish_round(self.student, self.config.steps, started, losses, len(used))
