"""What answers on the robot: a backend turns frames and prompts into answers and takes weight deltas.

:class:`EdgeRuntime <cdcca.edge.runtime.EdgeRuntime>` talks to a backend only through :class:`EdgeBackend`,
so the torch student (:class:`TorchBackend`, the default) and the ONNX Runtime export
(``cdcca.edge.onnx_backend.OnnxBackend``) are interchangeable. UTS stage 2 (MC-dropout variance) always runs
on the torch copy of the frozen, shared vision encoder, and only for samples stage 1 keeps: adapters never
touch that encoder, so its tokens mean the same thing whichever backend answered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.edge.adapter_slot import AdapterSlot


@dataclass
class BackendAnswer:
    """A batch of answers.

    Attributes:
        texts: greedy answers, one per prompt.
        sample_entropy: (B,) mean answer-token entropy in nats (UTS stage 1, Eq. 2).
        visual_tokens: (B, N, D) the deterministic visual tokens the answers were computed from.
        adapter_version: the adapter version that answered (one version for the whole batch).
    """

    texts: list[str]
    sample_entropy: torch.Tensor
    visual_tokens: torch.Tensor
    adapter_version: int


class EdgeBackend(ABC):
    """The contract between the edge runtime and whatever runs the student."""

    name: str = "abstract"

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
    def version(self) -> int:
        return self.slot.version

    @torch.inference_mode()
    def answer(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> BackendAnswer:
        with self.slot.model() as model:
            version = self.slot.version_of(model)
            tokens = model.visual_tokens(model.preprocess(list(images)))
            generation = model.generate(list(prompts), visual_tokens=tokens)
        return BackendAnswer(generation.texts, generation.sample_entropy.cpu(), tokens.cpu(), version)

    def receive(self, msg):
        return self.slot.receive(msg)

    def rollback(self, reason: str = "on request", only_version: int | None = None):
        return self.slot.rollback(reason, only_version)
