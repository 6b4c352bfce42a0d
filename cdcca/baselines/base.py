"""The interface every adaptation method of the continual benchmark implements (baselines and CD-CCA)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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
