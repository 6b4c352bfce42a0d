"""``cdcca cloud``: the cloud trainer as a process, serving robots over Zenoh until SIGINT/SIGTERM.

Stopping follows the shutdown contract of long-running services (systemd's ``KillSignal`` then ``SIGKILL`` after
a timeout; Kubernetes' termination grace period): the first SIGINT/SIGTERM stops the service within
``CloudConfig.stop_grace_s`` (about a second), abandoning a round in progress before its commit, so its samples
stay pending in the store and the robot gets no version from it; a second signal exits at once. The rounds run
on a worker thread so that the main thread is always free to take the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from cdcca.akd import ANCHOR_IMAGES, source_anchors
from cdcca.envelope import Signer
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.paths import LOCK_FILE, FolderLock
from cdcca.transport import Link
from cloud_trainer.service import CloudConfig, CloudTrainer
from cloud_trainer.store import open_store

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def build_trainer(checkpoints: Path, key_file: Path, config: CloudConfig, link=None,
                  anchor_images: int = ANCHOR_IMAGES, hold_state: bool = True) -> CloudTrainer:  # fmt: skip
    """A trainer with the preset's teacher, a fresh LoRA student per robot and, for the embedded digits-shift
    pair, ``anchor_images`` images of the student's source domain as anchors (0: no forgetting guard).

    ``hold_state``: hold ``config.state_dir`` (:class:`~cdcca.paths.FolderLock`) until ``trainer.close()``, so a
    second cloud on it is refused before its teacher loads (two trainers on one store would each make versions for
    the same robots); fleet workers (``worker_id``), which may share a folder, each hold their own id in it; a
    torchrun rank other than 0 shares rank 0's folder and passes ``False``."""
    hold = None
    if hold_state:  # workers of one fleet may share a folder (and its SQLite store): one process per worker id
        name = LOCK_FILE if config.worker_id is None else f"{LOCK_FILE}-{config.worker_id}"
        again = "pass another --state folder" if config.worker_id is None else "give this worker another --worker-id"
        hold = FolderLock(Path(config.state_dir), again, name)
    store = None
    try:
        signer = Signer.load(key_file)
        store = open_store(config.store or Path(config.state_dir) / "cloud.sqlite")  # an unreachable one fails now
        teacher = load_mllm(Path(checkpoints) / "teacher")
        anchors = None
        if anchor_images > 0 and teacher.meta.get("preset"):  # the embedded pair: its pretraining data is at hand
            anchors = source_anchors(teacher, anchor_images)
        if link is not None and hasattr(link, "declare_presence"):  # robots see the cloud come and go (liveliness)
            link.declare_presence()
        trainer = CloudTrainer(teacher, lambda: load_adaptable_student(checkpoints), signer, config, link,
                               anchors=anchors, store=store)  # fmt: skip
    except BaseException:
        if store is not None:
            store.close()
        if hold is not None:
            hold.release()
        raise
    trainer.folder_lock = hold
    return trainer


def _take_signals(stop: threading.Event) -> dict | None:
    """First SIGINT/SIGTERM: set ``stop``; second: exit at once. Returns the handlers to restore (``None`` when
    not on the main thread, where Python cannot take signals: then whoever owns ``stop`` sets it). After a signal
    the handler stays, so that a second one during the rest of the shutdown still exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            os.write(2, b"interrupted again: exiting now (the store is consistent; the round is not committed)\n")
            os._exit(EXIT_INTERRUPTED)
        previous["signalled"] = True
        log.info("stopping (%s); interrupt again to exit at once", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return previous


def _report_abandoned(trainer: CloudTrainer, round_: dict, running: bool) -> None:
    """Say what became of the round a stop interrupted: abandoned (its samples stay pending), or, when its commit
    was already under way, what the store holds now."""
    robot_id, version, samples = round_["robot_id"], round_["version"], round_["samples"]
    if not round_.get("committing"):
        log.warning("stopping: round for %s abandoned, its %d samples stay pending", robot_id, samples)
        return
    if running:  # its commit holds the store's lock: asking the store would wait for it (on PostgreSQL, unbounded)
        log.warning("stopping: round v%d for %s was still committing; it commits whole or not at all", version,
                    robot_id)  # fmt: skip
        return
    try:
        committed = trainer.store.latest(robot_id) >= version
    except Exception as err:  # noqa: BLE001 - a report, not a decision: say what is not known
        log.warning("stopping: round v%d for %s was committing; the store cannot say if it did (%s)", version,
                    robot_id, err)  # fmt: skip
        return
    if committed:
        log.info("stopping: round v%d for %s was committing and is committed", version, robot_id)
    else:
        log.warning("stopping: round v%d for %s was not committed, its %d samples stay pending", version, robot_id,
                    samples)  # fmt: skip


def serve(trainer: CloudTrainer, stop: threading.Event) -> dict:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM when called on the main thread); returns the stats.

    A round in progress when the service stops is abandoned before its commit (one line says so and how many
    samples stay pending); the metrics endpoint (``CloudConfig.metrics_port``) and the cloud's diagnostics on the
    link (``CloudConfig.status_every_s``) run alongside and stop with it.
    """
    from cloud_trainer.status import StatusPublisher

    config = trainer.config
    log.info("cloud trainer serving (state %s)", config.state_dir)
    exporter = None
    if config.metrics_port is not None:
        from cloud_trainer.prometheus import CloudMetrics

        exporter = CloudMetrics(trainer)
        port = exporter.serve(config.metrics_port, config.metrics_address)
        log.info("Prometheus metrics on http://%s:%d/metrics", config.metrics_address, port)
    publisher = StatusPublisher(trainer, config.status_every_s).start() if isinstance(trainer.link, Link) else None
    previous = _take_signals(stop)
    worker = threading.Thread(target=trainer.serve, args=(stop,), name="cdcca-cloud-rounds", daemon=True)
    worker.start()
    try:
        while worker.is_alive() and not stop.wait(0.1):
            pass
    finally:
        stop.set()
        abandoned = trainer.abandon_round()
        worker.join(config.stop_grace_s)
        if abandoned is not None:
            _report_abandoned(trainer, abandoned, worker.is_alive())
        if worker.is_alive():  # e.g. inside one long native call; it commits nothing now (abandon is set)
            log.warning("the round worker did not stop within %.1f s; exiting without it", config.stop_grace_s)
        if publisher is not None:
            publisher.stop()
        if exporter is not None:
            exporter.close()
        if previous is not None and not previous.pop("signalled", False):
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return trainer.stats()
