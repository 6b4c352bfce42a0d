"""PKD: feature distillation through the Pearson correlation coefficient (Cao et al., "PKD: General Distillation
Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

PKD distills a detector's FPN features by normalising teacher and student features to zero mean and unit
variance per channel and minimising their MSE, which is 2 (1 - Pearson r): the student matches the teacher's
relational pattern, not its magnitudes. Adapted to an MLLM:

* the feature map is the Q-Former's query outputs (B, Q, C), the query axis playing the spatial axis; the
  statistics are taken per sample and per channel over the queries (PKD pools them over the batch too);
* the loss is half the MSE of the normalised features, i.e. exactly the mean over (sample, channel) of 1 - r;
* if the widths differ, a learned linear projection of the student's features (cloud-only, never sent) comes
  first; the student trains its trainable set (LoRA, query tokens, norms, biases);
* like every feature-distillation method, PKD is a term added to the student's task loss (PKD trains the
  detector's own losses plus ``α·L_pkd``). The stream has no labels, so the task loss is the cross-entropy on the
  teacher's greedy answers (every token), as in the benchmark's PL round. Without it the feature term alone,
  which is blind to each channel's offset and scale, moved the query outputs away from what the student's LM
  reads, and the rounds collapsed the student (28.8 % against 58.5 % source-only, ``bench/README.md``).

``FeatureDistillation`` is the round both PKD and CWD share; only ``feature_loss`` differs.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdcca.akd import DistillSample, greedy_answers
from cdcca.baselines.base import AdaptationMethod, RoundResult, finish_round, optimizer_step
from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import freeze_all_but_trainable


@dataclass
class FeatureDistillConfig:
    """Optimisation of a feature-distillation round.

    Args:
        lr: AdamW learning rate of the trainable set and the projection.
        steps: optimizer steps per round.
        batch_size: samples per step.
        seed: seed of batch sampling, dropout and the projection's initialisation.
        lambda_task: weight of the task loss, the cross-entropy on the teacher's greedy answers (0: the feature
            term alone).
        lambda_feature: weight of the method's feature term.
    """

    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    lambda_task: float = 1.0
    lambda_feature: float = 1.0

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if self.lr <= 0:
            raise ValueError(f"{kind}.lr must be > 0, got {self.lr}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{kind}.{name} must be >= 1, got {getattr(self, name)}")
        if self.lambda_task < 0 or self.lambda_feature < 0 or self.lambda_task + self.lambda_feature == 0:
            raise ValueError(f"{kind} needs lambda_task, lambda_feature >= 0, not both 0; got "
                             f"{self.lambda_task}, {self.lambda_feature}")  # fmt: skip


@dataclass
class PKDConfig(FeatureDistillConfig):
    """A PKD round (``FeatureDistillConfig``'s fields, plus):

    Args:
        eps: added to each standard deviation before dividing (PKD: 1e-6).
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps <= 0:
            raise ValueError(f"PKDConfig.eps must be > 0, got {self.eps}")


def pearson_distill_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, Q, C) student and teacher features -> mean over (sample, channel) of 1 - Pearson r over the Q axis."""

    def standardise(features: torch.Tensor) -> torch.Tensor:
        mean, std = features.mean(1, keepdim=True), features.std(1, unbiased=False, keepdim=True)  # (B, 1, C)
        return (features - mean) / (std + eps)

    return F.mse_loss(standardise(student), standardise(teacher)) / 2


class FeatureDistillation(AdaptationMethod):
    """Distills the teacher's Q-Former query outputs into the student's through the trainable set, next to the
    task loss on the teacher's greedy answers.

    The pair shares one frozen vision encoder (``models.share_vision_encoder``), so one set of visual tokens feeds
    both Q-Formers.
    """

    def __init__(self, student: MLLM, teacher: MLLM | None, config: FeatureDistillConfig) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} distills from the cloud teacher: pass teacher=")
        if teacher.num_query_tokens != student.num_query_tokens:
            raise ValueError(
                f"{type(self).__name__} pairs query tokens one to one: teacher has {teacher.num_query_tokens}, "
                f"student {student.num_query_tokens}"
            )
        super().__init__(student, teacher)
        self.config = config
        self.trainable = freeze_all_but_trainable(student)
        student_width = student.blip2.config.qformer_config.hidden_size
        teacher_width = teacher.blip2.config.qformer_config.hidden_size
        self.projection: nn.Linear | None = None
        if student_width != teacher_width:
            self.projection = nn.Linear(student_width, teacher_width).to(student.device)
            generator = torch.Generator().manual_seed(config.seed)
            weight = torch.randn(teacher_width, student_width, generator=generator) * student_width**-0.5
            with torch.no_grad():
                self.projection.weight.copy_(weight)
                self.projection.bias.zero_()
        self._params = [*self.trainable.values(), *(self.projection.parameters() if self.projection else [])]
        self.optimizer = torch.optim.AdamW(self._params, lr=config.lr, weight_decay=0.0)
        self.rounds = 0

    @abstractmethod
    def feature_loss(self, student_queries: torch.Tensor, teacher_queries: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) projected student and teacher query outputs -> scalar distillation loss."""

    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        if not samples:
            raise ValueError(f"a {type(self).__name__} round needs at least one sample")
        started = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, self.rounds])
        torch.manual_seed(int(rng.integers(2**62)))
        self.student.eval()
        with torch.no_grad():  # the shared encoder and the teacher are frozen: their outputs are fixed this round
            tokens = self.student.visual_tokens(self.student.preprocess([s.load_image() for s in samples]))  # (N, T, D)
            teacher_queries = self.teacher.eval().query_outputs(tokens)  # (N, Q, Ct)
            prompts = [s.prompt for s in samples]
            labels = self._pseudo_labels(tokens, prompts) if self.config.lambda_task > 0 else None
        self.student.train()
        self.student.blip2.vision_model.eval()
        losses, used = [], set()
        for _ in range(self.config.steps):
            index = rng.choice(len(samples), size=min(self.config.batch_size, len(samples)), replace=False)
            used.update(index.tolist())
            student_queries = self.student.query_outputs(tokens[index])  # (B, Q, Cs)
            loss = torch.zeros(())
            if labels is not None:
                soft_prompt = self.student.blip2.language_projection(student_queries)
                task = self.student.lm_forward(soft_prompt, [prompts[i] for i in index], [labels[i] for i in index])
                loss = loss + self.config.lambda_task * task.loss
            if self.projection is not None:
                student_queries = self.projection(student_queries)  # (B, Q, Ct)
            if self.config.lambda_feature > 0:
                loss = loss + self.config.lambda_feature * self.feature_loss(student_queries, teacher_queries[index])
            losses.append(optimizer_step(self.optimizer, loss, self._params))
        self.rounds += 1
        return finish_round(self.student, self.config.steps, started, losses, len(used))

    def _pseudo_labels(self, tokens: torch.Tensor, prompts: list[str], batch_size: int = 128) -> list[str]:
        """The teacher's greedy answers on every visual token (N, T, D), the round's task labels."""
        every = torch.ones(tokens.shape[1], dtype=torch.long, device=tokens.device)
        samples = [DistillSample(str(i), tokens[i], every, prompt) for i, prompt in enumerate(prompts)]
        return greedy_answers(self.teacher, samples, batch_size)


class PKD(FeatureDistillation):
    """Pearson-correlation feature distillation of the Q-Former query outputs."""

    name = "pkd"

    def __init__(self, student: MLLM, teacher: MLLM | None = None, config: PKDConfig | None = None) -> None:
        super().__init__(student, teacher, config or PKDConfig())

    def feature_loss(self, student_queries: torch.Tensor, teacher_queries: torch.Tensor) -> torch.Tensor:
        return pearson_distill_loss(student_queries, teacher_queries, self.config.eps)
