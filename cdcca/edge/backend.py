"""What answers on the robot: a backend turns frames and prompts into answers and takes weight deltas.

:class:`EdgeRuntime <cdcca.edge.runtime.EdgeRuntime>` talks to a backend only through :class:`EdgeBackend`,
so the torch student (:class:`TorchBackend`, the default) and the ONNX Runtime export
(``cdcca.edge.onnx_backend.OnnxBackend``) are interchangeable. Answers carry numpy arrays, so this module, the
runtime and the ONNX Runtime backend run without torch (issue 19); :class:`TorchBackend` imports torch when it
is used. UTS runs on what the backend answered with: the ONNX Runtime backend brings its own token sampler
(``token_sampler``), the torch student's frozen, shared vision encoder scores the others
(:class:`cdcca.uts.UncertaintyTokenSampler`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from cdcca.edge.adapter_slot import AdapterSlot


@dataclass
class BackendAnswer:
    """A batch of answers.

    Attributes:
        texts: greedy answers, one per prompt.
        sample_entropy: (B,) float32 mean answer-token entropy in nats (UTS stage 1, Eq. 2).
        visual_tokens: (B, N, D) float32 deterministic visual tokens the answers were computed from.
        adapter_version: the adapter version that answered (one version for the whole batch).
    """

    texts: list[str]
    sample_entropy: np.ndarray
    visual_tokens: np.ndarray
    adapter_version: int


class EdgeBackend(ABC):
    """The contract between the edge runtime and whatever runs the student."""

    name: str = "abstract"
    state_dir: Path | None = None  # where the adapter state persists (None: in memory only)

    @property
    @abstractmethod
    def version(self) -> int:
        """The adapter version answering now (0 = the shipped student)."""

    @abstractmethod
    def answer(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> BackendAnswer:
        """Answer ``prompts[i]`` about ``images[i]`` (HxWx3 uint8 RGB) with one adapter version."""

    @abstractmethod
    def receive(self, msg):
        """Verify and apply a ``cdcca_msgs/WeightDelta``, swap atomically between two answers, and return the
        ``cdcca_msgs/AdapterStatus`` to publish. Never raises for bad input: a rejection is a status."""

    @abstractmethod
    def rollback(self, reason: str = "on request", only_version: int | None = None):
        """Return to the previous adapter; returns the ``AdapterStatus`` to publish (ROLLED_BACK, its reason
        naming the version given up), or ``None`` when ``only_version`` is given and is no longer running."""


class TorchBackend(EdgeBackend):
    """The student in torch eager mode behind an :class:`AdapterSlot` (active/shadow hot-swap).

    Args:
        slot: the adapter slot holding the robot's student.
    """

    name = "torch"

    def __init__(self, slot: AdapterSlot) -> None:
        self.slot = slot

    @property
    def state_dir(self) -> Path | None:
        return self.slot.state_dir

    @property
    def version(self) -> int:
        return self.slot.version

    def answer(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> BackendAnswer:
        import torch

        with torch.inference_mode(), self.slot.model() as model:
            version = self.slot.version_of(model)
            tokens = model.visual_tokens(model.preprocess(list(images)))  # (B, N, D)
            generation = model.generate(list(prompts), visual_tokens=tokens)
            entropy = generation.sample_entropy.float().cpu().numpy()  # (B,)
            return BackendAnswer(generation.texts, entropy, tokens.float().cpu().numpy(), version)

    def receive(self, msg):
        return self.slot.receive(msg)

    def rollback(self, reason: str = "on request", only_version: int | None = None):
        return self.slot.rollback(reason, only_version)
