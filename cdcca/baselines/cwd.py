"""CWD: channel-wise knowledge distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

CWD turns each channel of a dense feature (or logit) map into a distribution over spatial locations with a
temperature-τ softmax, and minimises the KL divergence from the teacher's to the student's, scaled by τ² and
averaged over channels: the student learns where each channel fires most. Adapted to an MLLM:

* the feature map is the Q-Former's query outputs (B, Q, C), the query axis playing the spatial axis: each
  channel of each sample becomes a distribution over the Q queries;
* the loss is τ² · KL(teacher ‖ student), averaged over channels and samples, as in CWD's code;
* as in PKD (``cdcca.baselines.pkd.FeatureDistillation``, whose round this reuses): a learned linear projection
  of the student's features if the widths differ (cloud-only), the student trains its trainable set, and the
  term is added to the task loss (CWD trains the segmentation loss plus the distillation term; here, with no
  labels, the cross-entropy on the teacher's greedy answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdcca.baselines.pkd import FeatureDistillation, FeatureDistillConfig
from cdcca.models.mllm import MLLM


@dataclass
class CWDConfig(FeatureDistillConfig):
    """A CWD round (``FeatureDistillConfig``'s fields: lr, steps, batch_size, seed, plus):

    Args:
        temperature: softmax temperature τ over the query axis (CWD: 4 for feature maps).
    """

    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"CWDConfig.temperature must be > 0, got {self.temperature}")


def channel_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """(B, Q, C) student and teacher features -> τ² · KL(teacher ‖ student) of the per-channel softmax over Q,
    averaged over samples and channels."""
    teacher_logp = (teacher.float() / temperature).log_softmax(1)  # (B, Q, C): each (b, :, c) is a distribution
    student_logp = (student.float() / temperature).log_softmax(1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(1)  # (B, C)
    return kl.mean() * temperature**2


class CWD(FeatureDistillation):
    """Channel-wise distillation of the Q-Former query outputs."""

    name = "cwd"

    def __init__(self, student: MLLM, teacher: MLLM | None = None, config: CWDConfig | None = None) -> None:
        super().__init__(student, teacher, config or CWDConfig())

    def feature_loss(self, student_queries: torch.Tensor, teacher_queries: torch.Tensor) -> torch.Tensor:
        return channel_distill_loss(student_queries, teacher_queries, self.config.temperature)
