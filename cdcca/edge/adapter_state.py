"""What both robot backends do with an adapter besides running it, without torch (issue 19): verify a weight
delta and apply Eq. 8 (θ = θ_base + decode(Δ), Wang et al., CVPR 2024), persist and restore the current adapter,
and build the ``AdapterStatus`` to publish.

The torch :class:`~cdcca.edge.adapter_slot.AdapterSlot` and the ONNX Runtime
:class:`~cdcca.edge.onnx_backend.OnnxBackend` share these functions, so a delta is accepted or refused for the
same reasons on both. An adapter is a dict of numpy arrays (the ORT robot) or of torch tensors (the torch robot);
the functions here keep to the kind they are given and import torch only for torch tensors, which a caller that
holds them has imported already.

The current adapter and version persist as one safetensors file replaced atomically (write, fsync, rename, fsync
the folder), the previous adapter as a second one: a restart resumes at the last version applied and can still roll
back one level (a version on probation when the robot stopped is checked again, :mod:`cdcca.edge.health`), and a
crash mid-write never leaves a torn adapter.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cdcca import wire
from cdcca.edge import np_delta
from cdcca.envelope import Decoder, DeltaRejected, TrustStore, open_envelope
from cdcca.paths import fsync_folder
from cdcca.wire import APPLIED, REJECTED, ROLLED_BACK  # noqa: F401  (AdapterStatus states)

log = logging.getLogger(__name__)
STATE_FILE = "adapter.safetensors"
PREVIOUS_FILES = "adapter.previous-v*.safetensors"  # the previous adapter's file, named by its version
SAFETENSORS_SCRATCH = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # where safetensors >= 0.8 writes before its own rename

Params = Mapping[str, Any]  # name -> numpy array or torch tensor: one kind per adapter
Apply = Callable[[Params, Params], dict[str, Any]]  # Eq. 8 (base, delta) -> new adapter; ValueError if unusable


@dataclass
class SlotCounters:
    """What happened to deltas on this robot."""

    applied: int = 0
    rejected: int = 0
    rolled_back: int = 0
    restore_failures: int = 0
    persist_failures: int = 0  # the adapter state could not be written (e.g. ENOSPC); nothing was swapped
    last_apply_ms: float = 0.0
    last_swap_us: float = 0.0


def numpy_decode(payload: bytes, codec: str, reference: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The numpy :class:`~cdcca.envelope.Decoder`: a strict :func:`cdcca.edge.np_delta.decode` (float32 arrays, the
    values ``cdcca.dwc`` decodes, bit for bit)."""
    return np_delta.decode(payload, codec, reference, strict=True)


def verify_delta(msg, *, trust: TrustStore, robot_id: str, version: int, newest_version: int, base: Params,
                 current: Params, base_fingerprint: str = "", decode: Decoder = numpy_decode,
                 apply: Apply = np_delta.apply) -> dict[str, Any]:  # fmt: skip
    """Every check on a ``WeightDelta`` (:func:`~cdcca.envelope.open_envelope`), then Eq. 8 against its reference:
    θ_base for a keyframe, the current adapter otherwise. Returns the new adapter; raises :class:`DeltaRejected`
    (nothing is modified). ``base_fingerprint``: this robot's base student (:mod:`cdcca.fingerprint`); empty: not
    checked. ``decode`` and ``apply`` default to numpy (:mod:`cdcca.edge.np_delta`); the torch slot passes
    ``cdcca.dwc``'s."""
    delta = open_envelope(msg, trust=trust, robot_id=robot_id, current_version=version,
                          newest_version=newest_version, expected=current, base_fingerprint=base_fingerprint,
                          decode=decode)  # fmt: skip
    try:
        return apply(base if msg.keyframe else current, delta)
    except ValueError as err:  # NaN/Inf after adding, or a change beyond the bound: the model must not see it
        raise DeltaRejected(f"applying the delta fails: {err}") from err


def _is_torch(params: Params) -> bool:
    return any(hasattr(value, "detach") for value in params.values())


def save_file(params: Params, path: str, metadata: dict[str, str]) -> None:
    """Write ``params`` as safetensors (``safetensors.torch`` for torch tensors, ``safetensors.numpy`` otherwise): the
    one place the adapter state touches the disk (a test makes it raise ``ENOSPC`` here)."""
    if _is_torch(params):
        from safetensors.torch import save_file as save_tensors

        save_tensors({k: v.contiguous() for k, v in params.items()}, path, metadata=metadata)
    else:
        from safetensors.numpy import save_file as save_arrays

        save_arrays({k: np.ascontiguousarray(v) for k, v in params.items()}, path, metadata=metadata)


_REJECTION_KINDS = (  # (kind, words of AdapterStatus.reason that mean it), first match wins
    ("fingerprint", ("base fingerprint",)),
    ("robot", ("addressed to robot",)),
    ("signature", ("signature", "signing key", "trust store")),
    ("version", ("not newer", "based on version", "keyframe must")),
    ("persist", ("persisting",)),
    ("payload", ("SHA-256", "decode", "num_params", "tensors", "shape", "applying")),
)


def rejection_kind(reason: str) -> str:
    """A short, bounded label for a rejection reason (for metrics, on the robot and in the cloud, which counts the
    reasons robots send): fingerprint, robot, signature, version, persist, payload or other."""
    return next((kind for kind, words in _REJECTION_KINDS if any(w in reason for w in words)), "other")


class Restored(NamedTuple):
    """What :func:`restore_adapter` read: the running version and its adapter, the newest version seen, and the
    adapter to roll back to (``(version, params)``, ``None`` when there is none)."""

    version: int
    newest_version: int
    params: dict[str, Any]
    previous: tuple[int, dict[str, Any]] | None


def persist_adapter(state_dir: Path, robot_id: str, version: int, newest_version: int, params: Params,
                    extra: dict[str, str] | None = None,
                    previous: tuple[int, Params] | None = None) -> None:  # fmt: skip
    """Replace ``state_dir/adapter.safetensors`` atomically (write, fsync, rename, fsync the folder).

    ``previous``: the adapter a rollback returns to, ``(version, params)``, kept first in a file of its own version
    (:func:`previous_file`, which a release from before it ignores; a hard link to the state file that holds it,
    when it does); the current file names that version,
    and the other versions' files are deleted only once it has landed, so a swap that fails halfway (a full disk, a
    power cut) leaves the running version's rollback intact. Version 0's tensors are not written: they are the base
    every restore is given."""
    state_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"robot_id": robot_id, **(extra or {})}
    if previous is not None and int(previous[0]) != 0:
        _keep_previous(state_dir, int(previous[0]), previous[1], metadata)
    current = metadata | {"version": str(version), "newest_version": str(max(newest_version, version))}
    if previous is not None:
        current["previous_version"] = str(int(previous[0]))
    _write_state(state_dir / STATE_FILE, params, current)
    named = previous_file(state_dir, int(previous[0])) if previous is not None else None
    for stale in state_dir.glob(PREVIOUS_FILES):  # only now: until the new state landed, the old one named its own
        if stale != named:
            stale.unlink(missing_ok=True)


def _keep_previous(state_dir: Path, version: int, params: Params, metadata: dict[str, str]) -> None:
    """The previous adapter's file: the state file as it is, when it holds ``version`` (a hard link, no copy: the
    swap's latency stays that of one write); written out otherwise (a rollback whose write failed left another
    version there) or where the file system has no hard links (FAT)."""
    from safetensors import SafetensorError, safe_open

    target, current = previous_file(state_dir, version), state_dir / STATE_FILE
    link = target.with_name(target.name + ".link")  # not _write_state's scratch name: nothing ever writes into it
    try:
        with safe_open(str(current), framework="numpy") as handle:
            held = (handle.metadata() or {}).get("version")
        if held == str(version):
            if target.exists() and os.path.samefile(current, target):  # a swap that failed after linking it
                return
            link.unlink(missing_ok=True)
            os.link(current, link)
            os.replace(link, target)
            fsync_folder(state_dir)  # kept before the state file that names it is written
            return
    except (OSError, SafetensorError):
        pass
    finally:
        link.unlink(missing_ok=True)
    _write_state(target, params, metadata | {"version": str(version)})


def previous_file(state_dir: Path, version: int) -> Path:
    """Where the adapter of ``version`` is kept while it is the one a rollback returns to."""
    return state_dir / f"adapter.previous-v{int(version)}.safetensors"


def _write_state(final: Path, params: Params, metadata: dict[str, str]) -> None:
    partial = final.with_name(final.name + ".partial")
    partial.unlink(missing_ok=True)  # a new file, never one another name shares
    from safetensors import SafetensorError

    try:
        save_file(params, str(partial), metadata)
    except SafetensorError as err:  # safetensors reports a full disk (ENOSPC) or an I/O error as its own type
        partial.unlink(missing_ok=True)
        raise OSError(f"writing {partial}: {err}") from err
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)  # atomic on POSIX: readers see the old or the new file, never half of one
    fsync_folder(final.parent)


def restore_adapter(state_dir: Path, robot_id: str, base: Params,
                    extra: dict[str, str] | None = None) -> Restored | None:  # fmt: skip
    """The persisted state (params of ``base``'s kind), or ``None`` if nothing was persisted.

    Raises ``ValueError`` for a current adapter that cannot be used (corrupt, another robot, another trainable set,
    or metadata that contradicts ``extra``); writes that never completed are discarded first. A previous adapter
    that cannot be used (missing, unreadable, or not the version the current one names) is left out with a
    warning: the robot then runs the current one without a rollback, as a state written before it was kept does.
    """
    for pattern in ("adapter*.safetensors.partial", "adapter.previous-v*.safetensors.link"):
        for partial in state_dir.glob(pattern):
            partial.unlink(missing_ok=True)
    for scratch in state_dir.glob(".tmp??????"):  # safetensors >= 0.8 writes there first: a crash mid-write left it
        if SAFETENSORS_SCRATCH.fullmatch(scratch.name) and scratch.is_file():
            scratch.unlink(missing_ok=True)
    if not (state_dir / STATE_FILE).is_file():
        return None
    metadata, params = _read_state(state_dir / STATE_FILE, robot_id, base, extra)
    try:
        version = int(metadata["version"])
        newest = int(metadata.get("newest_version", version))
        before = int(metadata["previous_version"]) if "previous_version" in metadata else None
    except (KeyError, ValueError) as err:
        raise ValueError(f"unreadable adapter state: bad metadata ({err})") from err
    previous = None
    if before == 0:
        previous = (0, {k: v.clone() if hasattr(v, "clone") else v.copy() for k, v in base.items()})
    elif before is not None:
        try:
            kept_metadata, kept = _read_state(previous_file(state_dir, before), robot_id, base, extra)
            if kept_metadata.get("version") != str(before):
                raise ValueError(f"it holds v{kept_metadata.get('version')}, not v{before}")
            previous = (before, kept)
        except ValueError as err:
            log.warning("restoring v%d without the previous adapter v%d (%s): no rollback until the next update",
                        version, before, err)  # fmt: skip
    return Restored(version, newest, params, previous)


def _read_state(path: Path, robot_id: str, base: Params, extra: dict[str, str] | None) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    if _is_torch(base):
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        params = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"unreadable adapter state: {err}") from err
    if metadata.get("robot_id") != robot_id:
        raise ValueError(f"state belongs to robot {metadata.get('robot_id')!r}")
    for key, value in (extra or {}).items():  # checked where the writer recorded it
        if key in metadata and metadata[key] != value:
            raise ValueError(f"state has {key}={metadata.get(key)!r}, expected {value!r}")
    _check_trainable_set(params, base)
    return metadata, params


def _check_trainable_set(params: Params, base: Params) -> None:
    if set(params) != set(base) or any(tuple(params[k].shape) != tuple(base[k].shape) for k in params):
        raise ValueError("tensors do not match this student's trainable set")


def rollback_reason(version: int, why: str) -> str:
    """``AdapterStatus.reason`` of a ROLLED_BACK status: names the version given up (``version`` carries the one
    now running), so the cloud can stop offering it (:func:`rolled_back_from`)."""
    return f"rolled back from v{int(version)}: {why}"


def rolled_back_from(reason: str) -> int | None:
    """The version a ROLLED_BACK status gave up, from its reason (``None`` if the reason does not say)."""
    prefix = "rolled back from v"
    if not reason.startswith(prefix):
        return None
    digits = reason[len(prefix) :].split(":", 1)[0]
    return int(digits) if digits.isdigit() else None


def persist_failed_reason(version: int, running: int, err: OSError) -> str:
    return f"persisting v{version} failed ({err}); still running v{running}, a resend of v{version} applies"


def adapter_status(robot_id: str, version: int, state: int, reason: str, stamp_ns: int | None = None):
    """A ``cdcca_msgs/AdapterStatus`` (``state``: APPLIED, REJECTED or ROLLED_BACK)."""
    return wire.new(wire.ADAPTER_STATUS, header=wire.header(time.time_ns() if stamp_ns is None else stamp_ns),
                    robot_id=robot_id, version=int(version), state=state, reason=reason)  # fmt: skip
