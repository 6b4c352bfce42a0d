"""The cloud trainer: durable buffer, per-robot rounds of teacher + AKD + DWC, and update tracking.

Algorithm 1 of Wang et al. (CVPR 2024), cloud side, as a long-running service:

* every received ``UtsTokens`` is checked against the models (``cloud_trainer.admission``: the encoder's token
  grid and width, the LMs' positions, sizes derived from them; a rejection is counted by reason), committed
  to SQLite and only then acknowledged with a ``UtsAck``, signed with the delta key and numbered by a per-robot
  sequence that only grows (the clock in ns, or one more than the last, so a restart never reuses one: robots
  refuse an ack they accepted before, and one more than 60 s below the newest they accepted, so the acks of
  several workers may cross, ``cdcca.edge.uplink.ACK_WINDOW``); duplicates by (robot_id, sample_id) are
  acknowledged again and otherwise ignored;
* when a robot has ``round_size`` pending samples, a round runs on them (up to ``max_round_samples``): the
  teacher pseudo-labels the kept tokens and AKD distills into that robot's cloud student (continual: each
  round starts from the last), DWC encodes the change against the version the robot runs, and the signed
  ``WeightDelta`` is committed together with the new state before it is published;
* ``AdapterStatus`` messages (after each delta, and heartbeats) tell the cloud what each robot runs; a robot
  that is behind gets the latest delta again, or a keyframe when the stored delta is based on a version it
  does not hold.

A robot still behind after ``max_resends`` resends is given up on with a WARNING naming the version and the
robot's last rejection reason; its next message after ``comeback_after_s`` (doubling per come-back) is a
come-back and gets the version once more as a keyframe. A store write that fails for the disk's sake (full,
read-only) is one WARNING per cause per 30 s (``cloud_trainer.faults``), counted in ``store_faults``, and the sample
is not acknowledged, so the robot keeps it. A round in progress when the service stops is abandoned before its
commit (:meth:`CloudTrainer.abandon_round`); its samples stay pending.

A worker holds the frozen teacher and one student with one distiller (``cloud_trainer.adapter_states``); a robot is
its adapter state (trainable set, ϕ/ψ, AdamW moments, round counter), swapped into that student for its round and
committed with it, plus its version chain. A round that fails is undone (the robot is reloaded from its last
commit); the samples it fails on alone are quarantined (kept,
counted, logged, never pending again) and the round runs on the rest. A failure that no sample explains puts
only that robot on hold for ``round_retry_s``: other robots and :meth:`CloudTrainer.serve` go on.

Several workers (processes with their own ``CloudConfig.worker_id``) may serve one store: each claims due rounds
with an expiring lease, the robot with the oldest pending sample first (:meth:`CloudStore.claim`), renews the lease
every third of ``lease_s`` while the round runs (so a long round is not taken over by another worker while its worker
lives), and catches up with the versions the others committed before it trains. A commit checks the robot's version
in the same transaction, so a round that outlived its lease and ran again elsewhere publishes once. The worker that
committed a version resends it; any other worker resends the store's latest delta to a robot still behind after
twice ``resend_after_s`` (so a robot behind gets its update even when the worker that published it is gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cdcca import wire
from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.dwc import SUBSPACE_ANCHOR_QUERY_SCALE, SUBSPACE_AVERAGED_SHARE, SUBSPACE_STEPS_FACTOR, get_codec
from cdcca.edge.adapter_slot import rolled_back_from
from cdcca.edge.adapter_state import rejection_kind
from cdcca.envelope import Signer, VersionChain, seal, sign_ack
from cdcca.fingerprint import student_fingerprint
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import trainable_parameters
from cdcca.transport import Link
from cdcca.uts import UplinkError
from cdcca.wire import APPLIED, REJECTED, ROLLED_BACK
from cdcca.wire.topics import CLOUD_ID, DIAGNOSTICS
from cloud_trainer.adapter_states import AdapterState, SharedStudent, state_tensors
from cloud_trainer.admission import SampleAdmission
from cloud_trainer.faults import FaultLog, fault_cause
from cloud_trainer.store import STORE_ERRORS, StaleRound, open_store

log = logging.getLogger(__name__)


@dataclass
class CloudConfig:
    """Settings of the cloud trainer.

    Args:
        state_dir: where the round log lives, and the SQLite store unless ``store`` names another.
        store: the durable store: a SQLite file path or a ``postgresql://`` URL shared by several workers
            (``None``: ``state_dir/cloud.sqlite``); see :func:`cloud_trainer.store.open_store`.
        round_size: pending uploads of a robot that start a round. An upload is one ``UtsTokens``: one frame's
            tokens with every prompt about it that the robot found uncertain, each a sample of the round.
        max_round_samples: the most new samples one round takes, in whole uploads (oldest first; the rest wait;
            at least one upload).
        replay: samples of earlier rounds (most recent first) trained on again with the new ones, so a round
            on one shifted domain does not overwrite what earlier rounds taught (0: new samples only, as in
            the paper).
        flush_after_s: also run a round on fewer than ``round_size`` samples once the oldest has waited this
            long (``None``: never), so a robot that uploads little still gets updates.
        codec: DWC codec of the deltas (see ``cdcca.dwc.get_codec``).
        resend_after_s: a robot still behind this long after a send gets the update again.
        max_resends: resends per version before the cloud gives up on a robot (a WARNING names the robot, the
            version and the robot's last rejection reason; a version the robot rolled back is never resent).
        comeback_after_s: after a give-up, the robot's next message (an upload, an ``AdapterStatus``, its
            diagnostics) at least this long after the give-up is a *come-back*: the latest version goes out once
            more, as a keyframe; each further come-back for the same version waits twice as long (bounded).
        metrics_port: serve Prometheus metrics on this TCP port (``None``: off; see ``cloud_trainer.prometheus``).
        metrics_address: the address the metrics endpoint binds to.
        status_every_s: publish the cloud's ``DiagnosticArray`` on the link this often (0: never).
        stop_grace_s: on SIGINT/SIGTERM, how long :func:`cloud_trainer.app.serve` waits for the round worker
            after asking it to abandon its round.
        poll_s: idle wait of the service loop.
        round_retry_s: a robot whose round failed for no sample's fault waits this long before the next try.
        worker_id: this process's name among several workers sharing one store (``None``: the only worker). Each
            worker claims a due round with a lease (:meth:`CloudStore.claim`: the oldest pending sample first),
            and publishes and resends only the versions it committed.
        lease_s: how long a claimed round is this worker's; a worker that dies frees its robots after it. Longer
            than a round takes: a round that outlives its lease may be run again by another worker, and then
            only the first commit counts.
        adapter_cache: robots whose adapter state (trainable set, ϕ/ψ, AdamW moments) stays in memory besides the
            one in the shared student, least recently used dropped first; the others are read from the store at
            their next round (0: always from the store). Memory per robot, never a student per robot.
        akd: distillation settings of every round.
    """

    state_dir: Path = Path("cloud_state")
    store: str | None = None
    round_size: int = 64
    max_round_samples: int = 256
    replay: int = 0
    flush_after_s: float | None = None
    codec: str = "subspace"
    resend_after_s: float = 5.0
    max_resends: int = 5
    comeback_after_s: float = 10.0
    poll_s: float = 0.05
    round_retry_s: float = 30.0
    adapter_cache: int = 4
    worker_id: str | None = None
    lease_s: float = 600.0
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    status_every_s: float = 2.0
    stop_grace_s: float = 1.0
    akd: AKDConfig = field(default_factory=AKDConfig)

    def __post_init__(self) -> None:
        if self.round_size < 1 or self.max_round_samples < self.round_size:
            raise ValueError(f"CloudConfig needs 1 <= round_size <= max_round_samples, got {self.round_size}, "
                             f"{self.max_round_samples}")  # fmt: skip
        if self.round_retry_s < 0:
            raise ValueError(f"CloudConfig.round_retry_s must be >= 0, got {self.round_retry_s}")
        if self.adapter_cache < 0:
            raise ValueError(f"CloudConfig.adapter_cache must be >= 0, got {self.adapter_cache}")
        if self.worker_id is not None and not self.worker_id.strip():
            raise ValueError("CloudConfig.worker_id must be a non-empty name or None (the only worker)")
        if self.lease_s <= 0:
            raise ValueError(f"CloudConfig.lease_s must be > 0, got {self.lease_s}")
        if self.max_resends < 0 or self.comeback_after_s < 0:
            raise ValueError(f"CloudConfig.max_resends and comeback_after_s must be >= 0, got {self.max_resends}, "
                             f"{self.comeback_after_s}")  # fmt: skip
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"CloudConfig.metrics_port must be a TCP port 0..65535 or None, got {self.metrics_port}")
        if self.status_every_s < 0 or self.stop_grace_s < 0:
            raise ValueError(f"CloudConfig.status_every_s and stop_grace_s must be >= 0, got {self.status_every_s}, "
                             f"{self.stop_grace_s}")  # fmt: skip
        codec = get_codec(self.codec)
        if getattr(codec, "round_bound", False) and not self.akd.subspace_fold:
            # a codec-aware codec: every round trains in its subspace, for more steps (bench/downlink.md)
            steps = self.akd.steps * SUBSPACE_STEPS_FACTOR
            anchor_query = self.akd.lambda_anchor_query * SUBSPACE_ANCHOR_QUERY_SCALE
            self.akd = replace(self.akd, subspace_fold=codec.config.fold, subspace_chunk=codec.config.chunk,
                               steps=steps, average_last=int(steps * SUBSPACE_AVERAGED_SHARE),
                               lambda_anchor_query=anchor_query)  # fmt: skip
        elif getattr(codec, "round_bound", False) and self.akd.subspace_fold != codec.config.fold:
            raise ValueError(f"CloudConfig: codec {self.codec!r} sends a 1/{codec.config.fold} subspace, but the "
                             f"rounds train in 1/{self.akd.subspace_fold}")  # fmt: skip


@dataclass
class _Robot:
    """What the service tracks of a robot besides its adapter state (see ``cloud_trainer.adapter_states``)."""

    chain: VersionChain
    reported: int = -1  # version the robot last said it runs (-1: not heard from)
    last_sent: float = float("-inf")  # monotonic time of the last send; never: due at once, whatever the host's uptime
    resends: int = 0  # of the latest version
    latest_delta: bytes | None = None  # the signed WeightDelta of the latest version, as published
    declined: dict[int, str] = field(default_factory=dict)  # versions the robot rolled back from -> its reason
    rejections: int = 0  # REJECTED statuses received from the robot
    last_reject_reason: str = ""
    gave_up: float | None = None  # monotonic time the resends of the latest version were given up (None: not)
    comebacks: int = 0  # come-backs that got the latest version again since the give-up
    comeback_due: bool = False  # the robot came back: the service loop sends it the latest version once
    owned: bool = True  # this worker committed the latest version, so it resends it (always, as the only worker)
    # monotonic time a worker that does not own the latest version last read it from the store (never: at once)
    synced: float = float("-inf")


@dataclass
class CloudCounters:
    """What the service did since it started; ``rejected_reasons`` splits ``rejected`` by reason (see
    ``cloud_trainer.admission`` and ``cdcca.uts.UplinkError``)."""

    received: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    rounds: int = 0
    round_failures: int = 0  # rounds undone (a quarantined sample's, or one that put its robot on hold)
    quarantined: int = 0  # samples quarantined by this process
    failures: int = 0  # other errors the loop survived (resends, the store)
    deltas_sent: int = 0
    resends: int = 0
    keyframes: int = 0
    rollbacks: int = 0  # versions robots rolled back from (health check or request); never resent
    statuses_ignored: dict[str, int] = field(default_factory=dict)  # AdapterStatus dropped, by reason: ``state``
    # (not one of the STATE_* constants), ``version`` (a version this cloud never published for that robot)
    update_rejections: dict[str, int] = field(default_factory=dict)  # REJECTED statuses by rejection_kind
    give_ups: int = 0  # versions whose resends were given up (robot still behind after max_resends)
    comeback_resends: int = 0  # latest versions sent again to a robot that came back after a give-up
    rounds_abandoned: int = 0  # rounds stopped by a shutdown; their samples stay pending
    rounds_superseded: int = 0  # rounds dropped at their commit: another worker committed that robot's round first
    store_faults: dict[str, int] = field(default_factory=dict)  # store writes that failed, by cause (disk_full)
    delta_bytes: int = 0  # bytes of the deltas published (first sends and resends)
    lease_renewals: int = 0  # leases renewed while their round ran (among several workers)
    foreign_resends: int = 0  # resends of a version another worker committed (it did not get the robot there)


class RoundFailed(RuntimeError):
    """A round failed and no single sample explains it; the robot waits ``CloudConfig.round_retry_s``."""


class RoundAbandoned(BaseException):
    """The service is stopping: the round in progress is dropped before its commit (its samples stay pending).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way (a round's
    failure handling, sample probing) takes it for a failure of the round."""


def whole_uploads(samples: list[DistillSample], limit: int) -> list[DistillSample]:
    """The first uploads of ``samples`` (in order) whose prompts together are at most ``limit`` samples, and at
    least the first upload: an upload is used, committed and quarantined whole."""
    sizes = Counter(s.message_id for s in samples)  # an upload's samples are consecutive (admitted together)
    kept: list[DistillSample] = []
    for sample in samples:
        starts_upload = kept and kept[-1].message_id != sample.message_id
        if starts_upload and len(kept) + sizes[sample.message_id] > limit:
            break
        kept.append(sample)
    return kept


class CloudTrainer:
    """The service object; :meth:`serve` runs it, :meth:`step` is one pass (tests drive it directly).

    Args:
        teacher: the shared teacher (frozen).
        make_student: builds the robots' student with LoRA (the version-0 base every robot ships with); called
            once: every robot's rounds run on that one student, with the robot's adapter state swapped in.
        signer: the key deltas are signed with.
        config: service settings.
        link: the Zenoh link; ``None`` for offline use (feed :meth:`receive_tokens` directly).
        anchors: source-domain inputs the student was pretrained on; every robot's rounds replay them and
            publish only weights that still answer them as the base student does (``AKDConfig.forget_tolerance``).
    """

    def __init__(self, teacher: MLLM, make_student: Callable[[], MLLM], signer: Signer, config: CloudConfig,
                 link=None, anchors: Sequence[DistillSample] | None = None, store=None) -> None:  # fmt: skip
        self.teacher, self.make_student, self.signer = teacher, make_student, signer
        self.folder_lock = None  # a cdcca.paths.FolderLock on config.state_dir, when build_trainer took one
        self.anchors = list(anchors or [])
        self.config, self.link = config, link
        # the store of config.store (or state_dir/cloud.sqlite); build_trainer opens it before the teacher loads
        self.store = store if store is not None else open_store(config.store or Path(config.state_dir) / "cloud.sqlite")
        self.robots: dict[str, _Robot] = {}
        self.counters = CloudCounters()
        self._counters_lock = threading.Lock()  # counters change on the link's threads, the round's and the loop's
        student = make_student()
        self.admission = SampleAdmission(teacher, student)  # the limits come from the models
        # one base for every robot, hashed once and stated in every delta; each chain's version 0
        self.base_fingerprint = student_fingerprint(student)
        self._base = {name: p.detach().clone() for name, p in trainable_parameters(student).items()}
        self.shared = SharedStudent(teacher, student, config.akd, self.anchors, config.adapter_cache)
        self._hold: dict[str, float] = {}  # robot_id -> monotonic time its rounds may be tried again
        self._stop = threading.Event()
        self._chain_lock = threading.Lock()  # statuses arrive on Zenoh's thread while a round publishes
        self._ack_lock = threading.Lock()  # acks of one robot leave in the order of their sequence
        self._ack_sequence: dict[str, int] = {}  # robot_id -> sequence of the last ack sent
        self.round_log = Path(config.state_dir) / "rounds.jsonl"
        self.round_log.parent.mkdir(parents=True, exist_ok=True)  # the store may live elsewhere (--store)
        self.faults = FaultLog(log)  # store and disk faults: one line per cause per 30 s, counted
        self.current_round: dict | None = None  # the round in progress: robot_id, version, samples, started_unix
        self.on_round: list[Callable[[dict], None]] = []  # called with each finished round's result (metrics)
        self.last_seen: dict[str, float] = {}  # robot_id -> Unix time of its last message
        self._abandon = threading.Event()  # set by abandon_round(): the round in progress stops before its commit
        self._robots_lock = threading.Lock()  # making a robot's state (from the store) and adding it to robots
        self._closed = False
        for robot_id in self.store.robots():
            self._robot(robot_id)
        if link is not None:
            link.subscribe("*", "uts_tokens", self.receive_tokens)
            link.subscribe("*", "adapter_status", lambda robot_id, msg, _: self.receive_status(robot_id, msg))
            if isinstance(link, Link):  # a robot's diagnostics also say it is back (Zenoh: DDS has /diagnostics)
                link.subscribe("*", DIAGNOSTICS, lambda robot_id, msg, _: self.seen(robot_id))

    # ------------------------------------------------------------------------------------ receiving
    def receive_tokens(self, robot_id: str, msg, data: bytes | None = None) -> bool:
        """Validate, persist and acknowledge one ``UtsTokens`` (``data``: its CDR bytes as received, stored as
        they are; re-encoded from ``msg`` when not given); False if rejected (counted by reason, not acked)."""
        try:
            self.admission.check(msg, len(data) if data is not None else None)  # what a round needs of it
        except UplinkError as err:
            self._reject(robot_id, err.reason, err)
            return False
        except Exception as err:  # whatever a peer's bytes trigger, the receiving thread survives
            self._reject(robot_id, "malformed", err)
            return False
        if self._closed:  # shutting down: not stored, so not acknowledged; the robot keeps it
            return False
        self.seen(robot_id)
        try:
            added = self.store.add_sample(robot_id, msg.sample_id, data if data is not None else wire.encode(msg))
        except Exception as err:  # a full disk fails every sample alike: one line per cause, counted, no ack
            cause = fault_cause(err)
            if cause is None:
                raise
            self._store_fault(cause, f"storing a sample from {robot_id}", err)
            return False
        if added:
            self._count(received=1)
        else:
            self._count(duplicates=1)
        # acknowledged only now that it is committed, and at once: a round in progress must not delay acks,
        # or the robot resends what the cloud already has
        if self.link is not None:
            with self._ack_lock:
                now = time.time_ns()
                sequence = self._ack_sequence[robot_id] = max(now, self._ack_sequence.get(robot_id, 0) + 1)
                self.link.publish(robot_id, "uts_ack", sign_ack(self.signer, robot_id, [msg.sample_id], sequence, now))
        self._count(acked=1)
        return True

    def _count(self, **increments: int) -> None:
        """Add to counters: the link's threads, the round thread and the service loop all count."""
        with self._counters_lock:
            for name, amount in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def _count_in(self, field: str, key: str) -> int:
        """One more under ``key`` in the counter dict ``field``; returns the new count. The dict is replaced, not
        mutated, so a copy stats() holds never changes."""
        with self._counters_lock:
            counts = getattr(self.counters, field)
            setattr(self.counters, field, {**counts, key: counts.get(key, 0) + 1})
            return counts.get(key, 0) + 1

    def _store_fault(self, cause: str, what: str, err: BaseException) -> None:
        self.faults.record(cause, what, err)
        with self._counters_lock:
            self.counters.store_faults = dict(self.faults.counts)

    def seen(self, robot_id: str) -> None:
        """A message from ``robot_id`` arrived (an upload, a status, its diagnostics). If the cloud gave up
        resending the robot's latest version, the first message ``comeback_after_s`` (doubling with each
        come-back of the same version) after the give-up is a come-back: the service loop sends the version
        once more (:meth:`resend_after_comeback`)."""
        if robot_id == CLOUD_ID:  # the cloud's own diagnostics, not a robot
            return
        self.last_seen[robot_id] = time.time()
        robot = self.robots.get(robot_id)
        if robot is None or robot.gave_up is None or robot.comeback_due:
            return
        wait = self.config.comeback_after_s * 2 ** min(robot.comebacks, 16)
        if not robot.owned:  # another worker published the latest version: it sends first, this one after twice
            wait *= 2
        if time.monotonic() - robot.gave_up >= wait:
            robot.comeback_due = True

    def _reject(self, robot_id: str, reason: str, err: Exception) -> None:
        self._count(rejected=1)
        self._count_in("rejected_reasons", reason)
        log.warning("rejected UtsTokens from %s (%s): %s", robot_id, reason, err)

    def receive_status(self, robot_id: str, msg) -> None:
        """Track what a robot runs (APPLIED and ROLLED_BACK and heartbeats carry the current version).

        A ROLLED_BACK status names the version the robot gave up (its reason, see
        :func:`~cdcca.edge.adapter_slot.rollback_reason`); that version is recorded and never sent again. A status
        whose state is none of the STATE_* constants, or that names a version this cloud never published for that
        robot (forged, or another cloud's), changes nothing and is counted in ``statuses_ignored`` by reason.
        """
        if self._closed:  # shutting down: the store is closed, the robot repeats its status
            return
        if msg.state not in (APPLIED, REJECTED, ROLLED_BACK):  # not a state: never taken for APPLIED
            self._ignore_status(robot_id, "state", msg)
            return
        if msg.state == REJECTED:
            log.warning("robot %s rejected v%d: %s", robot_id, msg.version, msg.reason)
            self._count_in("update_rejections", rejection_kind(msg.reason))
            rejecting = self.robots.get(robot_id)
            if rejecting is not None:
                with self._chain_lock:  # link threads report at once (a += is not atomic without the GIL)
                    rejecting.rejections += 1
                    rejecting.last_reject_reason = msg.reason[:500]
            self.seen(robot_id)
            return
        robot = self.robots.get(robot_id)
        self.seen(robot_id)
        if self.config.worker_id is not None:
            if robot is None and self.store.latest(robot_id) > 0:
                robot = self._robot(robot_id)  # trained by another worker: resent from here if that worker is gone
            if robot is not None and msg.version > robot.chain.latest:
                self._reload_chain(robot_id, robot)  # another worker may have published it: the store knows
            # a robot the store never heard of gets no state here: a status names no version of it (counted below)
        if msg.version > (robot.chain.latest if robot is not None else 0):  # forged, or another cloud's version
            self._ignore_status(robot_id, "version", msg)
            return
        if robot is None:
            return  # a robot this cloud has not trained for (yet): it runs the base
        with self._chain_lock:
            if msg.state == ROLLED_BACK:
                self._record_rollback(robot_id, robot, msg)
            if msg.version != robot.reported:
                robot.reported = int(msg.version)
                if msg.version >= robot.chain.latest:  # caught up: a later give-up starts afresh
                    robot.gave_up, robot.comebacks, robot.comeback_due = None, 0, False
                if msg.version != robot.chain.applied and msg.version in {0, *robot.chain.published}:
                    robot.chain.record_applied(int(msg.version))
                    try:
                        self.store.record_applied(robot_id, int(msg.version))
                    except Exception as err:  # kept in memory for this process; stored with the next change
                        cause = fault_cause(err)
                        if cause is None:
                            raise
                        self._store_fault(cause, f"recording v{msg.version} applied by {robot_id}", err)

    def _ignore_status(self, robot_id: str, reason: str, msg) -> None:
        first = self._count_in("statuses_ignored", reason) == 1
        log_at = log.warning if first else log.debug  # a heartbeat repeats every few seconds
        log_at("ignored an AdapterStatus from %s (%s): state %d, v%d", robot_id, reason, msg.state, msg.version)

    def _record_rollback(self, robot_id: str, robot: _Robot, msg) -> None:
        declined = rolled_back_from(msg.reason)
        if declined is None:  # a robot that does not name it: the newest version it may have run
            declined = robot.reported if robot.reported > msg.version else robot.chain.latest
        if declined <= msg.version or declined in robot.declined:
            return
        robot.declined[declined] = msg.reason[:500]
        self._count(rollbacks=1)
        try:  # durable, so a restarted cloud does not offer it again either
            self.store.record_declined(robot_id, declined, robot.declined[declined])
        except STORE_ERRORS as err:  # still never resent by this process
            self._count(failures=1)
            log.error("robot %s: recording the rollback from v%d failed: %s", robot_id, declined, err)
        log.warning("robot %s rolled back from v%d to v%d (%s); v%d is not sent again", robot_id, declined,
                    msg.version, msg.reason, declined)  # fmt: skip

    # --------------------------------------------------------------------------------------- robots
    @property
    def student(self) -> MLLM:
        """The worker's one student (it holds the adapter state of ``shared.active``)."""
        return self.shared.student

    @property
    def distiller(self) -> Distiller:
        """The worker's one distiller (it holds the adapter state of ``shared.active``)."""
        return self.shared.distiller

    def _activate(self, robot_id: str) -> Distiller:
        """The distiller, holding ``robot_id``'s adapter state (from memory, else its last commit, else version 0)."""
        return self.shared.activate(robot_id, lambda: self._stored_state(robot_id))

    def adapter_state(self, robot_id: str) -> AdapterState:
        """``robot_id``'s adapter state as its next round would start from it (nothing is swapped)."""
        return self.shared.state_of(robot_id, lambda: self._stored_state(robot_id))

    def _stored_state(self, robot_id: str) -> AdapterState | None:
        """The robot's state as its last round committed it; ``None`` before its first round."""
        stored = self.store.load_adapter_state(robot_id)
        if stored is None:
            return None
        latest, tensors, optimizer = stored
        initial = self.shared.initial
        # a store written before the optimizer column has no moments: they start over, as they did then
        return AdapterState(tensors if tensors is not None else initial.tensors, optimizer or {}, latest)

    def _robot(self, robot_id: str) -> _Robot:
        """The robot's state, made once per process (from its last commit, if any) and then only ever changed in
        place: a status handler on the link's thread never holds an object the round thread has replaced."""
        robot = self.robots.get(robot_id)
        if robot is not None:
            return robot
        with self._robots_lock:
            robot = self.robots.get(robot_id)
            if robot is not None:
                return robot
            robot = _Robot(VersionChain(robot_id, self._base, base_fingerprint=self.base_fingerprint),
                           owned=self.config.worker_id is None)  # fmt: skip
            record = self.store.load_robot(robot_id, adapter=False)  # the adapter state is read at its next round
            if record is not None:  # a restart: continue from the last committed round
                self._take_record(robot, record, foreign=not robot.owned)
            self.robots[robot_id] = robot  # complete before any handler can see it
        return robot

    # --------------------------------------------------------------------------------------- rounds
    def run_round(self, robot_id: str) -> dict:
        """Teacher + AKD on the robot's pending samples, then DWC; commits, publishes, returns a report.

        Stored samples the models cannot take are quarantined first (a store written before the admission
        checks may hold some). If the round fails it is undone, the samples it fails on alone are quarantined,
        and it runs again on the rest; :class:`RoundFailed` if no sample explains the failure. A round whose
        every sample is quarantined returns (and logs) ``{"event": "quarantine", "version": None, ...}``.
        """
        pending = self.store.pending(robot_id, self.config.max_round_samples)
        if not pending:
            raise ValueError(f"robot {robot_id} has no pending samples")
        started = time.perf_counter()
        quarantined: dict[str, str] = {}
        fresh = whole_uploads(self._admit_stored(robot_id, pending, quarantined), self.config.max_round_samples)
        replayed = whole_uploads(self._admit_stored(robot_id, self.store.used(robot_id, self.config.replay),
                                                    quarantined), self.config.replay) \
            if self.config.replay else []  # fmt: skip
        while fresh:
            robot = self._robot(robot_id)
            start = robot.chain.latest
            log.info("robot %s: round v%d on %d samples started", robot_id, robot.chain.latest + 1, len(fresh))
            self.current_round = {"robot_id": robot_id, "version": robot.chain.latest + 1, "samples": len(fresh),
                                  "started_unix": time.time()}  # fmt: skip
            try:
                msg, data, report, params = self._train_and_commit(robot_id, robot, fresh, replayed)
            except RoundAbandoned:  # the service is stopping: nothing was committed, the samples stay pending
                self._count(rounds_abandoned=1)
                self._forget(robot_id)
                raise
            except StaleRound as err:  # another worker's round of this robot committed first: that one counts
                self._count(rounds_superseded=1)
                self._undo(robot_id, start)
                log.warning("robot %s: round dropped: %s", robot_id, err)
                result = {"event": "superseded", "robot_id": robot_id, "version": None, "samples": len(fresh),
                          "quarantined": quarantined, "finished_unix": time.time()}  # fmt: skip
                self._log_round(result)
                return result
            except Exception as err:  # undone below; what is left is a sample's fault or RoundFailed
                self._count(round_failures=1)
                self._undo(robot_id, start)
                cause = fault_cause(err)
                if cause is not None:  # the store could not commit (a full disk): no sample's fault
                    self._store_fault(cause, f"committing the round of {robot_id}", err)
                    raise RoundFailed(f"robot {robot_id}: the round could not be committed ({cause}); its samples "
                                      f"stay pending") from err  # fmt: skip
                if self.distiller.world_size > 1:  # the other ranks ran (part of) it: they cannot be undone here
                    raise
                try:
                    poison = self._probe(robot_id, fresh + replayed)
                except RoundAbandoned:  # stopping while the samples were probed: counted as abandoned
                    self._count(rounds_abandoned=1)
                    self._forget(robot_id)
                    raise
                if not poison:
                    raise RoundFailed(f"robot {robot_id}: the round failed and no sample fails alone "
                                      f"({type(err).__name__}: {err})") from err  # fmt: skip
                log.warning("robot %s: round failed (%s: %s); quarantining %d sample(s) and running on the rest",
                            robot_id, type(err).__name__, err, len(poison))  # fmt: skip
                for sample_id, reason in poison.items():
                    self._quarantine(robot_id, sample_id, reason, quarantined)
                fresh = [s for s in fresh if s.message_id not in poison]
                replayed = [s for s in replayed if s.message_id not in poison]
                continue
            finally:
                self.current_round = None
            robot.latest_delta, robot.resends, robot.owned = data, 0, True
            robot.gave_up, robot.comebacks, robot.comeback_due = None, 0, False
            self._send(robot_id, robot, data)
            self._count(rounds=1)
            result = {
                "event": "round", "robot_id": robot_id, "version": int(msg.version),
                "base_version": int(msg.base_version), "keyframe": bool(msg.keyframe), "samples": len(fresh),
                "replayed": len(replayed), "akd_seconds": report.seconds, "kept_step": report.kept_step,
                "check_score": report.check_score, "anchor_agreement": report.anchor_agreement,
                "round_seconds": time.perf_counter() - started, "delta_bytes": len(data),
                "full_bytes": 4 * sum(t.numel() for t in params.values()), "losses": report.losses,
                "finished_unix": time.time(), "sample_ids": [s.sample_id for s in fresh], "quarantined": quarantined,
            }  # fmt: skip
            self._log_round(result)
            log.info("robot %s: round v%d on %d samples in %.1f s, delta %d bytes", robot_id, result["version"],
                     result["samples"], result["round_seconds"], result["delta_bytes"])  # fmt: skip
            for callback in self.on_round:
                callback(result)
            return result
        result = {"event": "quarantine", "robot_id": robot_id, "version": None, "samples": 0,
                  "quarantined": quarantined, "finished_unix": time.time()}  # fmt: skip
        self._log_round(result)
        return result

    def _train_and_commit(self, robot_id: str, robot: _Robot, fresh: list[DistillSample],
                          replayed: list[DistillSample]) -> tuple:  # fmt: skip
        """AKD on the samples, DWC against what the robot holds, and the commit: (msg, CDR bytes, report,
        published params). Raises on any failure, the round then being undone by the caller."""
        samples = fresh + replayed
        distiller = self._activate(robot_id)
        start = robot.chain.latest  # a status naming a newer version may reload the chain while the round trains
        if distiller.world_size > 1:  # under torchrun: the other ranks run this round with us
            from cloud_trainer.distributed import send_round

            send_round(robot_id, samples)
        report = distiller.run_round(samples)
        if self._abandon.is_set():
            raise RoundAbandoned(robot_id)
        losses = [name for name, value in report.losses.items() if not math.isfinite(value)]
        if losses:  # the round may have kept its starting weights, but some sample poisons the objective
            raise FloatingPointError(f"the round's losses {losses} are NaN/Inf")
        params = {name: p.detach().clone() for name, p in distiller.trainable.items()}
        broken = [name for name, tensor in params.items() if not bool(torch.isfinite(tensor).all())]
        if broken:
            raise FloatingPointError(f"the round left NaN/Inf in {broken[:3]}")
        with self._chain_lock:
            if self._abandon.is_set():  # checked under the lock abandon_round() sets it under: all or nothing
                raise RoundAbandoned(robot_id)
            if robot.chain.latest != start:  # another worker committed v(start + 1) and the robot reported it
                raise StaleRound(f"robot {robot_id} moved from v{start} to v{robot.chain.latest} while this round "
                                 "ran: another worker committed first")  # fmt: skip
            codec = get_codec(self.config.codec)
            if report.subspace_seed is not None and getattr(codec, "round_bound", False):
                codec = codec.for_round(report.subspace_seed)
            msg = robot.chain.make_delta(params, codec, self.signer, stamp_ns=time.time_ns(),
                                         round_start=robot.chain.latest)  # fmt: skip
            if getattr(codec, "round_bound", False):
                # the next round starts from what the robot will hold, so its change is all in its own subspace
                with torch.no_grad():
                    for name, param in distiller.trainable.items():
                        param.copy_(robot.chain.published[int(msg.version)][name])
            data = wire.encode(msg)
            self.store.commit_round(robot_id, int(msg.version), list(dict.fromkeys(s.message_id for s in fresh)),
                                    state_tensors(distiller), robot.chain.published[int(msg.version)], data,
                                    robot.chain.applied, distiller.optimizer_state(),
                                    base_version=int(msg.base_version))  # fmt: skip
            self.current_round = None  # committed: a stop from here on no longer abandons it
        return msg, data, report, params

    def _admit_stored(self, robot_id: str, rows: list[tuple[str, bytes]],
                      quarantined: dict[str, str]) -> list[DistillSample]:  # fmt: skip
        """Stored samples as a round takes them; those the models cannot take are quarantined."""
        samples = []
        for sample_id, payload in rows:
            try:
                samples.extend(self.admission.check(wire.decode(wire.UTS_TOKENS, payload)))
            except UplinkError as err:
                self._quarantine(robot_id, sample_id, f"{err.reason}: {err}", quarantined)
            except Exception as err:  # e.g. bytes that no longer decode
                self._quarantine(robot_id, sample_id, f"malformed: {type(err).__name__}: {err}", quarantined)
        return samples

    def _quarantine(self, robot_id: str, sample_id: str, reason: str, quarantined: dict[str, str]) -> None:
        reason = reason[:500]
        self.store.quarantine(robot_id, sample_id, reason)
        self._count(quarantined=1)
        quarantined[sample_id] = reason
        log.warning("robot %s: sample %r quarantined: %s", robot_id, sample_id, reason)

    def _probe(self, robot_id: str, samples: list[DistillSample]) -> dict[str, str]:
        """message_id -> why, for each stored upload with a sample a round fails on alone: the teacher's labels and
        every AKD loss of that one sample must compute and be finite (the upload's other prompts share its tokens,
        so it is quarantined whole)."""
        distiller = self._activate(robot_id)
        poison = {}
        for sample in samples:
            try:
                with torch.no_grad():
                    terms = distiller.losses([sample], distiller.pseudo_label([sample]))
                broken = [name for name, value in terms.items() if not bool(torch.isfinite(value).all())]
                if broken:
                    poison[sample.message_id] = f"round: non-finite {', '.join(broken)}"
            except Exception as err:  # any failure of this one sample is its own
                poison[sample.message_id] = f"round: {type(err).__name__}: {err}"
        return poison

    def _undo(self, robot_id: str, start: int) -> None:
        """Reload the robot's chain from its last commit, in place (a failed round may have changed weights, moments,
        chain); ``start``: the latest version when the round started. What the robot said (its version, rollbacks,
        rejections) stays: statuses that arrived meanwhile are kept, not overwritten by a copy from before the round.
        The resend state stays too, unless another worker committed a newer version meanwhile: that one is theirs."""
        self.shared.forget(robot_id)
        robot = self.robots.get(robot_id)
        if robot is None:
            return
        record = self.store.load_robot(robot_id, adapter=False)
        with self._chain_lock:
            chain = robot.chain
            if record is None:
                chain.latest, chain.applied, chain.published, robot.latest_delta = 0, 0, {}, None
            else:
                self._take_record(robot, record, foreign=self.config.worker_id is not None and record.latest != start)
            # a status read meanwhile (a rollback to v0), or one a store fault kept from the store
            if robot.reported != chain.applied and robot.reported in {0, *chain.published}:
                chain.record_applied(robot.reported)

    def _forget(self, robot_id: str) -> None:
        """Drop the robot's adapter state after an abandoned round (its weights are half trained; the chain was not
        touched: a round is abandoned before its delta is made); it is read again at the robot's next round."""
        self.shared.forget(robot_id)

    def _log_round(self, result: dict) -> None:
        try:
            with open(self.round_log, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        except OSError as err:  # the round is committed and published; only its log line is lost
            self._store_fault(fault_cause(err) or "store_error", f"writing {self.round_log.name}", err)

    def _send(self, robot_id: str, robot: _Robot, data: bytes) -> None:
        robot.last_sent = time.monotonic()
        if self.link is not None:
            try:
                self.link.publish_bytes(robot_id, "weight_delta", data)
            except Exception as err:  # committed already; the resend path delivers it later
                self._count(failures=1)
                log.error("robot %s: publishing a delta failed (%s); it is resent when the robot reports", robot_id,
                          err)  # fmt: skip
                return
            self._count(deltas_sent=1)
            self._count(delta_bytes=len(data))

    def resend_if_behind(self, robot_id: str) -> bool:
        """Send the latest version again to a robot still behind ``resend_after_s`` after the last send.

        Among several workers, the worker that committed the latest version resends it; the others read the robot's
        latest version from the store every ``resend_after_s`` and resend the store's delta once the robot is still
        behind ``2 * resend_after_s`` after they learnt of it or last sent it (the worker that published it may be
        gone; if it is not, a duplicate is all it costs: the robot refuses a version it runs already)."""
        robot = self.robots[robot_id]
        wait = self.config.resend_after_s
        if not robot.owned:  # another worker published the latest version: it resends first
            self._sync_foreign(robot_id, robot)
            wait = 2 * self.config.resend_after_s
        latest = robot.chain.latest
        behind = 0 <= robot.reported < latest
        if not behind or time.monotonic() - robot.last_sent < wait:
            return False
        if latest in robot.declined:
            return False
        if robot.resends >= self.config.max_resends:
            with self._chain_lock:  # a status saying it caught up may have arrived since the check above
                give_up = robot.gave_up is None and 0 <= robot.reported < robot.chain.latest
                if give_up:
                    robot.gave_up = time.monotonic()
            if give_up:
                self._count(give_ups=1)
                log.warning("robot %s: giving up on sending v%d after %d resends (it runs v%d; its last rejection: "
                            "%s); it is sent again when the robot comes back", robot_id, latest, robot.resends,
                            robot.reported, robot.last_reject_reason or "none reported")  # fmt: skip
            return False
        stored = robot.latest_delta
        msg = wire.decode(wire.WEIGHT_DELTA, stored) if stored is not None else None
        if msg is None or not (msg.keyframe or msg.base_version == robot.reported):
            msg = self._keyframe(robot_id, robot)
            if msg is None:
                return False
        robot.resends += 1
        self._count(resends=1)
        if not robot.owned:
            self._count(foreign_resends=1)
        log.info("robot %s runs v%d, latest is v%d: sending %s%s", robot_id, robot.reported, latest,
                 "a keyframe" if msg.keyframe else "the delta again",
                 "" if robot.owned else " (another worker committed it)")  # fmt: skip
        self._send(robot_id, robot, wire.encode(self._signed_now(msg)))
        return True

    def _keyframe(self, robot_id: str, robot: _Robot):
        """The robot's latest version as a keyframe: the one sent before if there is one, else a new one, recorded in
        the store in place of the incremental delta, the version then being unknown
        (:meth:`cdcca.envelope.VersionChain.keyframe`: the next round's delta goes against the base). ``None`` if
        another worker committed a newer version meanwhile (the chain is reloaded; that worker sends it), or if the
        store cannot record it (a store fault; tried again ``resend_after_s`` later: a keyframe sent but not recorded
        would leave the store claiming to know what the robot holds)."""
        with self._chain_lock:
            latest, stored = robot.chain.latest, robot.latest_delta
            msg = wire.decode(wire.WEIGHT_DELTA, stored) if stored is not None else None
            if msg is not None and msg.keyframe and msg.version == latest:
                return msg
            known = robot.chain.published.get(latest)
            msg = robot.chain.keyframe(self.config.codec, self.signer, stamp_ns=time.time_ns())
            data = wire.encode(msg)
            try:
                recorded = self.store.record_keyframe(robot_id, latest, data)
            except BaseException as err:
                robot.chain.published[latest] = known  # nothing sent: the version's incremental delta still holds
                cause = fault_cause(err)
                if cause is None:
                    raise
                self._store_fault(cause, f"recording the keyframe of v{latest} for {robot_id}", err)
                robot.last_sent = time.monotonic()  # tried again after resend_after_s, not at every pass
                return None
            if recorded:
                robot.latest_delta = data
            else:
                robot.chain.published[latest] = known
        if not recorded:
            log.info("robot %s: v%d is no longer its latest version; not sent as a keyframe", robot_id, latest)
            self._reload_chain(robot_id, robot)
            return None
        self._count(keyframes=1)
        return msg

    def _signed_now(self, msg):
        """``msg`` as sent again: the same payload signed by this cloud's key if another key signed it (a stored delta
        from before a key rotation; robots may have revoked the old key)."""
        if msg.key_id == self.signer.key_id:
            return msg
        return seal(bytes(np.asarray(msg.payload, np.uint8)), robot_id=msg.robot_id, version=int(msg.version),
                    base_version=int(msg.base_version), keyframe=bool(msg.keyframe), codec=msg.codec,
                    num_params=int(msg.num_params), signer=self.signer, stamp_ns=time.time_ns(),
                    base_fingerprint=msg.base_fingerprint)  # fmt: skip

    def _sync_foreign(self, robot_id: str, robot: _Robot) -> None:
        """A robot whose latest version another worker committed: every ``resend_after_s``, read its latest version
        from the store (a newer one starts that worker's grace anew, see :meth:`resend_if_behind`)."""
        now = time.monotonic()
        if now - robot.synced < self.config.resend_after_s:
            return
        robot.synced = now
        if self.store.latest(robot_id) != robot.chain.latest:
            self._reload_chain(robot_id, robot)
            robot.last_sent = now

    def resend_after_comeback(self, robot_id: str) -> bool:
        """Send the latest version once more, as a keyframe, to a robot that came back after a give-up (see
        :meth:`seen`); True if sent. Among several workers, one that did not publish the version does so too, after
        twice the wait (the publisher may be gone; if it is not, the robot is no longer behind by then)."""
        robot = self.robots.get(robot_id)
        if robot is None or not robot.comeback_due:
            return False
        robot.comeback_due = False
        if not robot.owned:
            self._sync_foreign(robot_id, robot)
        latest = robot.chain.latest
        if robot.gave_up is None or not 0 <= robot.reported < latest or latest in robot.declined:
            return False
        msg = self._keyframe(robot_id, robot)
        with self._chain_lock:  # the next come-back waits from here, sent or not (a store fault), unless it caught up
            if 0 <= robot.reported < robot.chain.latest:
                robot.gave_up = time.monotonic()
        if msg is None:
            return False
        robot.comebacks += 1  # ... twice as long
        self._count(comeback_resends=1)
        log.info("robot %s is back (runs v%d): sending v%d again as a keyframe (come-back %d)", robot_id,
                 robot.reported, latest, robot.comebacks)  # fmt: skip
        self._send(robot_id, robot, wire.encode(self._signed_now(msg)))
        return True

    def step(self) -> list[dict]:
        """One pass: run every due round, resend to robots that are behind. A robot whose round fails is put on
        hold for ``round_retry_s``; the other robots' rounds still run."""
        results = []
        for robot_id in self._due_rounds():
            try:
                with self._lease_renewal(robot_id):
                    results.append(self.run_round(robot_id))
            except Exception as err:  # one robot's failure never stops the others or the service
                if not isinstance(err, RoundFailed):
                    self._count(failures=1)
                self._hold[robot_id] = time.monotonic() + self.config.round_retry_s
                log.error("robot %s: round failed, next try in %.0f s: %s", robot_id, self.config.round_retry_s,
                          err, exc_info=not isinstance(err, RoundFailed))  # fmt: skip
            finally:
                self._release(robot_id)
        for robot_id in list(self.robots):
            try:
                self.resend_after_comeback(robot_id) or self.resend_if_behind(robot_id)
            except Exception as err:
                self._count(failures=1)
                log.error("robot %s: resend failed: %s", robot_id, err)
        return results

    def _due_rounds(self):
        """The robots whose round is due, in turn. As the only worker: each due robot not on hold, by id. Among
        several workers: rounds claimed one at a time from the shared store (the oldest pending sample first,
        robots leased to other workers skipped), at most as many as robots have pending samples now."""
        worker, config = self.config.worker_id, self.config
        if worker is None:
            for robot_id, (count, oldest) in sorted(self.store.pending_summary().items()):
                due = count >= config.round_size or (config.flush_after_s is not None
                                                     and time.time() - oldest >= config.flush_after_s)  # fmt: skip
                if due and self._hold.get(robot_id, 0.0) <= time.monotonic():
                    yield robot_id
            return
        for _ in range(len(self.store.pending_summary())):
            held = frozenset(r for r, until in self._hold.items() if until > time.monotonic())
            robot_id = self.store.claim(worker, config.lease_s, config.round_size, config.flush_after_s, held)
            if robot_id is None:
                return
            self._refresh(robot_id)
            yield robot_id

    def _release(self, robot_id: str) -> None:
        """End this worker's lease on ``robot_id`` (among several workers); a failure only lets it expire."""
        if self.config.worker_id is None:
            return
        try:
            self.store.release(robot_id, self.config.worker_id)
        except STORE_ERRORS as err:
            self._count(failures=1)
            log.error("robot %s: releasing the lease failed (it expires in %.0f s): %s", robot_id, self.config.lease_s,
                      err)  # fmt: skip

    @contextlib.contextmanager
    def _lease_renewal(self, robot_id: str):
        """Among several workers, while the block (a round of ``robot_id``) runs: renew this worker's lease on the
        robot every third of ``lease_s`` from a helper thread, as job queues extend a visibility timeout while a
        job runs (a lease that expires only when its worker is gone). A renewal that fails is logged; the lease
        then expires, and the round's commit is refused if another worker ran it meanwhile (:class:`StaleRound`)."""
        worker = self.config.worker_id
        if worker is None:
            yield
            return
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.config.lease_s / 3):
                try:
                    if self._renew_lease(robot_id, worker):
                        self._count(lease_renewals=1)
                    else:
                        log.warning("robot %s: the lease of its round could not be renewed (another worker holds it)",
                                    robot_id)  # fmt: skip
                        return
                except Exception as err:  # the store briefly unavailable: the next renewal may still succeed
                    self._count(failures=1)
                    log.error("robot %s: renewing the lease of its round failed: %s", robot_id, err)

        thread = threading.Thread(target=renew, name=f"cdcca-lease-{robot_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(5.0)

    def _renew_lease(self, robot_id: str, worker: str) -> bool:
        """Extend ``worker``'s lease on ``robot_id`` by ``lease_s`` from now; False if another worker holds it."""
        return self.store.renew(robot_id, worker, self.config.lease_s)

    def _refresh(self, robot_id: str) -> None:
        """Among several workers, before a round: catch up with the rounds other workers committed for ``robot_id``
        (its chain from the store; an adapter state in memory from before them is dropped)."""
        latest = self.store.latest(robot_id)
        self.shared.forget_stale(robot_id, latest)
        robot = self._robot(robot_id)
        if robot.chain.latest != latest:
            self._reload_chain(robot_id, robot)

    def _reload_chain(self, robot_id: str, robot: _Robot) -> None:
        """Take the robot's chain as the store has it now: another worker published a newer version, which that
        worker resends."""
        record = self.store.load_robot(robot_id, adapter=False)
        if record is None:
            return
        with self._chain_lock:
            self._take_record(robot, record, foreign=record.latest != robot.chain.latest)

    @staticmethod
    def _take_record(robot: _Robot, record, foreign: bool) -> None:
        """The robot's chain as the store holds it, in place; the declined versions merged (one recorded here is kept
        if the store missed it). ``foreign``: the latest version is another worker's, which that worker resends first:
        this worker's resend state of its own last version goes."""
        chain = robot.chain
        chain.latest, chain.applied, chain.published = record.latest, record.applied, record.published
        robot.latest_delta = record.deltas.get(record.latest)
        robot.declined = {**record.declined, **robot.declined}
        if foreign:
            robot.owned, robot.resends, robot.comebacks, robot.comeback_due, robot.gave_up = False, 0, 0, False, None
            robot.last_sent = robot.synced = time.monotonic()

    def serve(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` (or :meth:`stop`) is set; a failing pass is logged, counted and retried. A round
        in progress stops at its next module call once :meth:`abandon_round` is called (from another thread)."""
        stop = stop or self._stop
        with self._interruptible():
            while not stop.is_set():
                try:
                    busy = bool(self.step())
                except RoundAbandoned:
                    return
                except Exception:  # e.g. the store briefly unavailable
                    self._count(failures=1)
                    log.exception("cloud trainer pass failed; retrying")
                    busy = False
                if not busy:
                    stop.wait(self.config.poll_s)

    @contextlib.contextmanager
    def _interruptible(self):
        """While :meth:`serve` runs, every ``nn.Module`` call on its thread checks the abandon flag (a global
        forward pre-hook, ``torch.nn.modules.module.register_module_forward_pre_hook``): the round's teacher
        labelling and AKD steps are all module calls, so an abandoned round stops within one of them, without a
        hook in ``cdcca.akd``."""
        thread = threading.get_ident()
        abandon = self._abandon

        def check(module, args):
            if abandon.is_set() and threading.get_ident() == thread:
                raise RoundAbandoned("the service is stopping")

        handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
        try:
            yield
        finally:
            handle.remove()

    def abandon_round(self) -> dict | None:
        """Make the round in progress (if any) stop before its commit; returns what it was (robot_id, version,
        samples) or ``None`` when no round was running or it had committed already. Taken under the lock the
        commit holds, so a round is either committed whole or not at all. If that lock is not free within a second
        (a commit waiting on a busy store), the round is reported with ``committing: True``: it may still commit,
        whole (the caller can ask the store once the worker has stopped)."""
        locked = self._chain_lock.acquire(timeout=1.0)  # a commit in progress finishes first (one transaction)
        try:
            self._abandon.set()
            return {**self.current_round, "committing": not locked} if self.current_round is not None else None
        finally:
            if locked:
                self._chain_lock.release()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        """Counters, stored and quarantined samples, versions, and the robots on hold (seconds left)."""
        now = time.monotonic()
        robots = dict(self.robots)  # copies: the link's threads add robots and rollbacks meanwhile
        declined = {r: dict(robot.declined) for r, robot in robots.items()}
        with self._counters_lock:
            counters = asdict(self.counters)
        return {**counters, "stored": self.store.count(),
                "quarantine": self.store.quarantine_counts(),
                "on_hold": {r: round(t - now, 1) for r, t in dict(self._hold).items() if t > now},
                "versions": {r: robot.chain.latest for r, robot in robots.items()},
                "reported": {r: robot.reported for r, robot in robots.items()},
                "declined": {r: {str(v): why for v, why in d.items()} for r, d in declined.items() if d}}  # fmt: skip

    def close(self) -> None:
        self._closed = True
        try:
            self.store.close()
        finally:
            if self.folder_lock is not None:
                self.folder_lock.release()
