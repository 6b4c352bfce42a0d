"""One student per worker: a robot is its adapter state, swapped into the shared student for its round.

Issue 16 (part 1) and the cloud-trainer section of ``ARCHITECTURE.md``: a worker holds the frozen teacher and
**one** student base with one :class:`~cdcca.akd.Distiller`. What tells one robot from another is small: the
trainable set (adapters, query tokens, norms, biases), the AKD projections ϕ/ψ, AdamW's moments of both, and
the round counter that seeds its rounds (``Distiller.rounds``). That is :class:`AdapterState`. Before a robot's
round its state is copied into the shared student, and the round's commit stores it (``CloudStore.commit_round``).
This is how multi-adapter serving keeps one base model for many LoRA adapters (S-LoRA, Sheng et al. 2023; peft's
``set_adapter``), here for training as well as inference.

Everything else a round reads is the same for every robot and built once per worker: the teacher, the frozen
student weights, the anchor set, and the base student's answers to it and query outputs on it
(``Distiller.anchor_replay`` / ``anchor_check`` / ``anchor_queries``). A round is a function of the robot's state
and its samples only, so swapping states gives bit-identical deltas to one student per robot
(``tests/test_cloud_fleet.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.models.mllm import MLLM


@dataclass(frozen=True)
class AdapterState:
    """One robot's adapter state, as a worker holds it between rounds.

    Attributes:
        tensors: ``"student.<name>"`` for the trainable set, ``"phi.<key>"`` / ``"psi.<key>"`` for ϕ/ψ (the
            store's ``robots.student`` column).
        optimizer: AdamW's state (:meth:`Distiller.optimizer_state`; empty before the first round).
        rounds: rounds the robot has had; seeds the next one (``numpy`` seed ``[AKDConfig.seed, rounds]``).
    """

    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rounds: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.optimizer.values()))


def state_tensors(distiller: Distiller) -> dict[str, torch.Tensor]:
    """The distiller's trainable set and ϕ/ψ under the store's names (views, not copies)."""
    state = {f"student.{name}": p for name, p in distiller.trainable.items()}
    state.update({f"phi.{key}": v for key, v in distiller.phi.state_dict().items()})
    state.update({f"psi.{key}": v for key, v in distiller.psi.state_dict().items()})
    return state


def load_state_tensors(distiller: Distiller, state: dict[str, torch.Tensor]) -> None:
    """Copy what :func:`state_tensors` named into the distiller's parameters (in place: the optimizer keeps them)."""
    with torch.no_grad():
        for name, param in distiller.trainable.items():
            param.copy_(state[f"student.{name}"])
    for prefix, layer in (("phi.", distiller.phi), ("psi.", distiller.psi)):
        layer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


class SharedStudent:
    """The worker's one student and distiller, and which robot's state they hold now.

    Args:
        teacher: the frozen teacher.
        student: the robots' student as every robot ships it (LoRA injected, version 0).
        config: AKD settings of every round.
        anchors: source-domain anchors; the base student answers them once, here.
        cache_size: robots whose state is kept in memory besides the one in the student (least recently used
            dropped first); the others are read from the store at their next round. In the service every kept
            state equals that robot's last commit, so dropping one loses nothing.
    """

    def __init__(self, teacher: MLLM, student: MLLM, config: AKDConfig,
                 anchors: Sequence[DistillSample] | None = None, cache_size: int = 4) -> None:  # fmt: skip
        if cache_size < 0:
            raise ValueError(f"SharedStudent cache_size must be >= 0, got {cache_size}")
        self.student = student
        self.distiller = Distiller(teacher, student, config, anchors=anchors)
        self.initial = self.capture()  # what a robot is before its first round: base weights, seeded ϕ/ψ
        self.cache_size = cache_size
        self.active: str | None = None  # the robot whose state the student holds (None: none of them reliably)
        self._cache: OrderedDict[str, AdapterState] = OrderedDict()

    def capture(self) -> AdapterState:
        """A copy of the state the student and distiller hold now."""
        tensors = {name: t.detach().clone() for name, t in state_tensors(self.distiller).items()}
        return AdapterState(tensors, self.distiller.optimizer_state(), self.distiller.rounds)

    def restore(self, state: AdapterState) -> None:
        """Put ``state`` into the student and distiller, which then run as a distiller built for that robot would."""
        load_state_tensors(self.distiller, state.tensors)
        self.distiller.load_optimizer_state(state.optimizer)
        self.distiller.optimizer.zero_grad(set_to_none=True)
        self.distiller.rounds = state.rounds
        self.student.eval()  # as a freshly loaded student

    def activate(self, robot_id: str, stored: Callable[[], AdapterState | None]) -> Distiller:
        """The distiller, holding ``robot_id``'s state: kept in memory, else ``stored()`` (its last commit), else
        :attr:`initial`. The state it held for another robot is kept in memory first."""
        if self.active == robot_id:
            return self.distiller
        if self.active is not None and self.cache_size > 0:
            self._keep(self.active, self.capture())
        self.active = None  # until the restore is complete: a failure leaves no robot's name on other weights
        state = self._cache.pop(robot_id, None)
        if state is None:
            state = stored() or self.initial
        self.restore(state)
        self.active = robot_id
        return self.distiller

    def state_of(self, robot_id: str, stored: Callable[[], AdapterState | None]) -> AdapterState:
        """``robot_id``'s state (a copy when it is the active one), without swapping it in."""
        if self.active == robot_id:
            return self.capture()
        return self._cache.get(robot_id) or stored() or self.initial

    def forget(self, robot_id: str) -> None:
        """Drop what memory holds for ``robot_id`` (a failed or abandoned round): its next round reads the store."""
        self._cache.pop(robot_id, None)
        if self.active == robot_id:
            self.active = None

    def forget_stale(self, robot_id: str, rounds: int) -> None:
        """Drop what memory holds for ``robot_id`` unless it is its state after ``rounds`` rounds (the store's
        latest version: among several workers, another may have run its rounds since)."""
        cached = self._cache.get(robot_id)
        if cached is not None and cached.rounds != rounds:
            del self._cache[robot_id]
        if self.active == robot_id and self.distiller.rounds != rounds:
            self.active = None

    def cached(self) -> list[str]:
        """Robots whose state is in memory besides the active one, least recently used first."""
        return list(self._cache)

    def _keep(self, robot_id: str, state: AdapterState) -> None:
        self._cache[robot_id] = state
        self._cache.move_to_end(robot_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
