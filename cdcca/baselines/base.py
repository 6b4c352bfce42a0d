"""The interface every adaptation method of the continual benchmark implements (baselines and CD-CCA)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM


@dataclass
class RoundResult:
    """What one adaptation round did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the round.
        loss: mean objective over the round's last steps (the method's own objective).
        samples_used: stream samples the update actually used.
    """

    steps: int
    seconds: float
    loss: float
    samples_used: int


class AdaptationMethod(ABC):
    """Adapts ``student`` in place, one round per stream segment, without ever seeing labels.

    Args:
        student: the model being adapted (LoRA already injected: ``models.add_lora``); it is changed in place.
        teacher: the cloud teacher, for methods that distill from it; ``None`` for purely local methods.
    """

    name: str

    def __init__(self, student: MLLM, teacher: MLLM | None = None) -> None:
        self.student, self.teacher = student, teacher

    @abstractmethod
    def adapt(self, samples: Sequence[Sample]) -> RoundResult:
        """One round on unlabelled stream samples (images + prompts; targets must not be read)."""


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> float:
    """One clipped (norm 1) optimizer step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params), 1.0)
    optimizer.step()
    return float(loss.detach())


def finish_round(student: MLLM, steps: int, started: float, losses: list[float], used: int) -> RoundResult:
    """Back to eval mode; the round's result with the mean loss of its last tenth of steps."""
    student.eval()
    tail = max(1, steps // 10)
    return RoundResult(steps, time.perf_counter() - started, float(np.mean(losses[-tail:])), used)
