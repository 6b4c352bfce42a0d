"""The robot's adapter slot: verify a weight delta, apply it off the inference path, swap atomically.

Two copies of the student share every frozen tensor and differ only in the trainable set (LoRA, query
tokens, norms, biases). One answers (*active*); the other (*shadow*) receives θ_base + decode(Δ) (paper
Eq. 8) while answers continue. The swap is a pointer exchange under a lock held for microseconds; the
shadow is only written once no answer still uses it. After a swap the shadow holds the previous adapter,
which is what :meth:`AdapterSlot.rollback` returns to.

The current adapter persists through :mod:`cdcca.edge.adapter_state` (torch-free, shared with the ONNX Runtime
backend) before anything in memory changes: a failed write (a full disk) leaves the robot exactly as it was, the
delta is reported REJECTED and counted in ``persist_failures``, and a resend of the same version applies once the
disk has room.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cdcca.edge import adapter_state
from cdcca.edge.adapter_state import (  # noqa: F401  (kept importable from here)
    APPLIED,
    REJECTED,
    ROLLED_BACK,
    STATE_FILE,
    SlotCounters,
    adapter_status,
    persist_adapter,
    persist_failed_reason,
    restore_adapter,
    rollback_reason,
    rolled_back_from,
)
from cdcca.envelope import DeltaRejected, TrustStore, dwc_decode
from cdcca.fingerprint import student_fingerprint
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import has_lora, trainable_parameters

log = logging.getLogger(__name__)


def _shadow_copy(model: MLLM, trainable: set[str]) -> MLLM:
    """A copy of ``model`` sharing every tensor except the trainable set (and sharing the tokenizer)."""
    memo = {id(model.tokenizer): model.tokenizer}
    for name, param in model.blip2.named_parameters():
        if name not in trainable:
            memo[id(param)] = param
    for buffer in model.blip2.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


Params = dict[str, torch.Tensor]


def verify_delta(msg, *, trust: TrustStore, robot_id: str, version: int, newest_version: int, base: Params,
                 current: Params, base_fingerprint: str = "") -> Params:  # fmt: skip
    """:func:`cdcca.edge.adapter_state.verify_delta` on torch tensors (``cdcca.dwc`` decodes and applies): every
    check on a ``WeightDelta``, then Eq. 8. Returns the new adapter; raises :class:`DeltaRejected`."""
    from cdcca.dwc import apply_delta

    return adapter_state.verify_delta(msg, trust=trust, robot_id=robot_id, version=version,
                                      newest_version=newest_version, base=base, current=current,
                                      base_fingerprint=base_fingerprint, decode=dwc_decode,
                                      apply=apply_delta)  # fmt: skip


class AdapterSlot:
    """Active/shadow students, the current and previous adapter, and the persisted version.

    Args:
        student: the robot's student with LoRA already injected (its trainable set at version 0 is the base).
        robot_id: this robot; deltas for another robot are rejected.
        trust: public keys deltas must be signed with.
        state_dir: where the current adapter persists; ``None`` keeps it in memory only.
        base_fingerprint: the student's :func:`~cdcca.fingerprint.student_fingerprint` (``None``: computed here,
            once); a delta stating another one is rejected. ``""`` turns the check off.
    """

    def __init__(self, student: MLLM, robot_id: str, trust: TrustStore, state_dir: str | Path | None = None,
                 base_fingerprint: str | None = None) -> None:  # fmt: skip
        if not has_lora(student):
            raise ValueError("the student needs its LoRA adapters before it gets an adapter slot (models.add_lora)")
        self.robot_id, self.trust = robot_id, trust
        self.base_fingerprint = student_fingerprint(student) if base_fingerprint is None else base_fingerprint
        self.state_dir = Path(state_dir) if state_dir is not None else None
        student.eval()
        trainable = trainable_parameters(student)
        self.base = {name: p.detach().clone() for name, p in trainable.items()}  # version 0
        self._models = [student, _shadow_copy(student, set(trainable))]
        self._slots = [trainable, trainable_parameters(self._models[1])]  # each copy's live trainable tensors
        self._active = 0
        self._versions = [0, 0]  # the adapter version each copy holds
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = [0, 0]
        self._apply_lock = threading.Lock()  # one delta at a time
        self.version, self.newest_version = 0, 0
        self.current = self.base
        self.previous: tuple[int, dict[str, torch.Tensor]] | None = None
        self.counters = SlotCounters()
        if self.state_dir is not None:
            self._restore()

    # ------------------------------------------------------------------------------------- answering
    @contextmanager
    def model(self) -> Iterator[MLLM]:
        """The active student for one answer; a swap during the answer does not disturb it."""
        with self._lock:
            index = self._active
            self._in_flight[index] += 1
        try:
            yield self._models[index]
        finally:
            with self._lock:
                self._in_flight[index] -= 1
                self._idle.notify_all()

    def version_of(self, model: MLLM) -> int:
        """The adapter version ``model`` (one of the slot's two copies, from :meth:`model`) holds."""
        return self._versions[0 if model is self._models[0] else 1]

    # -------------------------------------------------------------------------------------- updating
    def receive(self, msg, stamp_ns: int | None = None):
        """Verify and apply a ``WeightDelta``; returns the ``AdapterStatus`` to publish. Never raises for bad input."""
        with self._apply_lock:
            try:
                started = time.perf_counter()
                params = verify_delta(msg, trust=self.trust, robot_id=self.robot_id, version=self.version,
                                      newest_version=self.newest_version, base=self.base,
                                      current=self.current, base_fingerprint=self.base_fingerprint)  # fmt: skip
            except DeltaRejected as err:
                self.counters.rejected += 1
                log.warning("robot %s rejected delta v%s: %s", self.robot_id, msg.version, err.reason)
                return self._status(msg.version, REJECTED, err.reason, stamp_ns)
            try:
                self._install(int(msg.version), params)
            except OSError as err:  # e.g. a full disk: nothing in memory changed
                self.counters.persist_failures += 1
                reason = persist_failed_reason(int(msg.version), self.version, err)
                log.error("robot %s: %s", self.robot_id, reason)
                return self._status(msg.version, REJECTED, reason, stamp_ns)
            self.counters.applied += 1
            self.counters.last_apply_ms = 1000 * (time.perf_counter() - started)
            return self._status(self.version, APPLIED, "", stamp_ns)

    def rollback(self, reason: str = "on request", only_version: int | None = None, stamp_ns: int | None = None):
        """Return to the previous adapter (one level); returns the ``AdapterStatus`` to publish, or ``None`` when
        ``only_version`` is given and another version is running (a newer delta came first).

        The robot stops answering with the adapter it leaves even if the state cannot be written; that failure
        is counted (``persist_failures``) and named in the status.
        """
        with self._apply_lock:
            if only_version is not None and only_version != self.version:
                return None
            if self.previous is None:
                return self._status(self.version, REJECTED, "no previous adapter to roll back to", stamp_ns)
            version, params = self.previous
            left, note = self.version, ""
            try:
                self._persist(version, params)
            except OSError as err:
                self.counters.persist_failures += 1
                note = f" (not persisted: {err}; a restart resumes v{left})"
                log.error("robot %s: rolling back to v%d: %s", self.robot_id, version, note)
            self._swap()  # the shadow still holds the previous adapter (and its version)
            self.previous, self.version, self.current = None, version, params
            self.counters.rolled_back += 1
            return self._status(version, ROLLED_BACK, rollback_reason(left, reason) + note, stamp_ns)

    def _install(self, version: int, params: dict[str, torch.Tensor]) -> None:
        # first: if it fails (OSError), nothing in memory has changed
        self._persist(version, params, previous=(self.version, self.current))
        shadow_index = 1 - self._active
        with self._lock:  # wait for answers that started before the last swap and still use the shadow
            self._idle.wait_for(lambda: self._in_flight[shadow_index] == 0)
        shadow = self._slots[shadow_index]
        with torch.no_grad():  # off the inference path: nobody answers with the shadow
            for name, value in params.items():
                shadow[name].copy_(value)
        self._versions[shadow_index] = version
        self._swap()
        self.previous = (self.version, self.current)
        self.version, self.current = version, params
        self.newest_version = max(self.newest_version, version)

    def _swap(self) -> None:
        started = time.perf_counter()
        with self._lock:
            self._active = 1 - self._active
        self.counters.last_swap_us = 1e6 * (time.perf_counter() - started)

    # ----------------------------------------------------------------------------------- persistence
    def _persist(self, version: int, params: dict[str, torch.Tensor],
                 previous: tuple[int, dict[str, torch.Tensor]] | None = None) -> None:  # fmt: skip
        if self.state_dir is not None:
            persist_adapter(self.state_dir, self.robot_id, version, self.newest_version, params, self._extra(),
                            previous)  # fmt: skip

    def _extra(self) -> dict[str, str]:
        """Metadata the persisted state must agree with: an adapter made for other base weights is not restored."""
        return {"base_fingerprint": self.base_fingerprint} if self.base_fingerprint else {}

    def _restore(self) -> None:
        try:
            restored = restore_adapter(self.state_dir, self.robot_id, self.base, self._extra())
        except ValueError as err:
            self.counters.restore_failures += 1
            log.error("ignoring adapter state in %s (%s); starting from the base adapter", self.state_dir, err)
            return
        if restored is None:
            return
        version, newest, params, previous = restored
        shadow = 1 - self._active  # holds the previous adapter, as after a swap (what rollback swaps back to)
        for index, live in enumerate(self._slots):
            held = previous[1] if index == shadow and previous is not None else params
            with torch.no_grad():
                for name, value in held.items():
                    live[name].copy_(value)
            self._versions[index] = previous[0] if index == shadow and previous is not None else version
        self.version, self.newest_version, self.current = version, newest, params
        self.previous = previous

    def _status(self, version: int, state: int, reason: str, stamp_ns: int | None):
        return adapter_status(self.robot_id, version, state, reason, stamp_ns)
