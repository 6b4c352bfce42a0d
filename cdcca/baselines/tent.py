"""TENT: test-time entropy minimisation through the normalisation layers (Wang et al., "Tent: Fully Test-Time
Adaptation by Entropy Minimization", ICLR 2021).

TENT adapts a classifier on unlabelled test batches by minimising the Shannon entropy of its predictions,
updating only the affine parameters of its normalisation layers. Adapted to an MLLM:

* a prediction is an answer, so the entropy is that of the next-token distributions at the answer positions:
  the student greedily answers each sample (eval mode, no gradient), then a teacher-forced pass on those
  answers gives the distributions whose mean entropy (over all answer tokens of the batch) is minimised;
* the normalisation layers are the LayerNorms of the Q-Former and of the LM (weights and biases). The shared
  vision encoder's stay frozen, so visual tokens keep meaning the same thing to the teacher. LayerNorm keeps
  no running statistics, so TENT's re-estimation of batch-norm statistics has no counterpart here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cdcca.baselines.base import AdaptationMethod, RoundResult, finish_round, optimizer_step
from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM, LMOutput
from cdcca.models.trainable import freeze_all_but, trainable_parameters


@dataclass
class TentConfig:
    """Optimisation of a TENT round.

    Args:
        lr: AdamW learning rate of the normalisation parameters.
        steps: optimizer steps per round.
        batch_size: samples per step.
        seed: seed of batch sampling and dropout.
        max_answer_tokens: longest greedy answer (in tokens) whose entropy is minimised.
    """

    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    max_answer_tokens: int = 12

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"TentConfig.lr must be > 0, got {self.lr}")
        for name in ("steps", "batch_size", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TentConfig.{name} must be >= 1, got {getattr(self, name)}")


def norm_parameters(model: MLLM) -> dict[str, nn.Parameter]:
    """Weights and biases of the normalisation layers of the Q-Former and the LM, never the vision encoder's."""
    return trainable_parameters(model, groups=("norms",))


def answer_entropy(out: LMOutput) -> torch.Tensor:
    """Mean entropy (nats) of the predicted next-token distributions at the answer positions (TENT's objective)."""
    log_probs = out.logits[:, :-1][out.answer_positions].float().log_softmax(-1)  # (A, V)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


class Tent(AdaptationMethod):
    """Entropy minimisation of the student's own answers through its LayerNorms; purely local (no teacher)."""

    name = "tent"

    def __init__(self, student: MLLM, teacher: MLLM | None = None, config: TentConfig | None = None) -> None:
        super().__init__(student, teacher)
        self.config = config or TentConfig()
        self.norms = freeze_all_but(student, norm_parameters(student))
        self.optimizer = torch.optim.AdamW(self.norms.values(), lr=self.config.lr, weight_decay=0.0)
        self.rounds = 0

    def loss(self, visual_tokens: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Mean answer-token entropy of the student on its own greedy answers; leaves the student in train mode."""
        self.student.eval()
        answers = self.student.generate(
            prompts, visual_tokens=visual_tokens, max_new_tokens=self.config.max_answer_tokens
        ).texts
        self.student.train()
        self.student.blip2.vision_model.eval()
        soft_prompt = self.student.encode_visual(visual_tokens=visual_tokens)  # (B, Q, D)
        return answer_entropy(self.student.lm_forward(soft_prompt, prompts, answers))

    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        if not samples:
            raise ValueError("a TENT round needs at least one sample")
        started = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, self.rounds])
        torch.manual_seed(int(rng.integers(2**62)))
        self.student.eval()
        with torch.no_grad():
            tokens = self.student.visual_tokens(self.student.preprocess([s.load_image() for s in samples]))  # (N, T, D)
        losses, used = [], set()
        for _ in range(self.config.steps):
            index = rng.choice(len(samples), size=min(self.config.batch_size, len(samples)), replace=False)
            used.update(index.tolist())
            loss = self.loss(tokens[index], [samples[i].prompt for i in index])
            losses.append(optimizer_step(self.optimizer, loss, self.norms.values()))
        self.rounds += 1
        return finish_round(self.student, self.config.steps, started, losses, len(used))
