"""The cloud's own status on the link: a ``diagnostic_msgs/DiagnosticArray`` every couple of seconds.

The message is the one ROS's ``diagnostic_updater`` publishes on ``/diagnostics`` (docs.ros.org/en/jazzy/p/
diagnostic_updater): one ``DiagnosticStatus`` per robot the cloud knows and one for the worker, each a list of
key/value strings, so ``cdcca status``, ``rqt_robot_monitor`` behind a bridge, or anything that reads CDR can show
it. It travels on the key ``_cloud/cdcca/diagnostics``: ``_cloud`` is a pseudo robot id that the link's key rules
accept (no ``/ ? # $ *``) and that no robot uses (robot ids starting with ``_`` are reserved for the cloud).

Per robot (``name`` = ``cdcca cloud: robot <id>``, ``hardware_id`` = the robot id): ``applied_version``,
``latest_version``, ``pending_samples``, ``rounds``, ``rejections``, ``last_reject_reason``, ``last_seen``.
The worker (``name`` = ``cdcca cloud: worker``, ``hardware_id`` = ``_cloud``): ``rounds_done``,
``current_round``, ``quarantined``, ``pending_total``, ``store_faults``.
"""

from __future__ import annotations

import logging
import threading
import time

from cdcca import wire
from cdcca.wire import DIAGNOSTIC_ARRAY
from cdcca.wire.topics import CLOUD_ID, DIAGNOSTICS
from cloud_trainer.service import CloudTrainer

log = logging.getLogger(__name__)
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
WORKER_NAME = "cdcca cloud: worker"
ROBOT_NAME = "cdcca cloud: robot "


def _status(level: int, name: str, message: str, hardware_id: str, values: dict[str, object]):
    pairs = [wire.new("diagnostic_msgs/msg/KeyValue", key=k, value=str(v)) for k, v in values.items()]
    return wire.new("diagnostic_msgs/msg/DiagnosticStatus", level=level, name=name, message=message,
                    hardware_id=hardware_id, values=pairs)  # fmt: skip


def cloud_diagnostics(trainer: CloudTrainer):
    """The ``DiagnosticArray`` of the cloud's state now (safe from any thread: it reads counters and the store)."""
    pending = trainer.store.pending_counts()
    counters = trainer.counters
    statuses = []
    for robot_id, robot in sorted(dict(trainer.robots).items()):
        behind = 0 <= robot.reported < robot.chain.latest
        level = WARN if robot.gave_up is not None else OK
        message = (f"gave up sending v{robot.chain.latest}: {robot.last_reject_reason or 'no status'}"
                   if robot.gave_up is not None else "behind" if behind else "up to date")  # fmt: skip
        seen = trainer.last_seen.get(robot_id)
        statuses.append(_status(level, ROBOT_NAME + robot_id, message, robot_id, {
            "applied_version": robot.reported, "latest_version": robot.chain.latest,
            "pending_samples": pending.get(robot_id, 0), "rounds": robot.chain.latest,
            "rejections": robot.rejections, "last_reject_reason": robot.last_reject_reason,
            "last_seen": f"{seen:.3f}" if seen is not None else "",
        }))  # fmt: skip
    current = trainer.current_round
    faults = counters.store_faults
    worker = {
        "rounds_done": counters.rounds,
        "current_round": f"{current['robot_id']} v{current['version']} ({current['samples']} samples)" if current
        else "",
        "quarantined": sum(trainer.store.quarantine_counts().values()),
        "pending_total": sum(pending.values()),
        "store_faults": sum(faults.values()),
    }  # fmt: skip
    level, message = (WARN, "store faults: " + ", ".join(sorted(faults))) if faults else (OK, "serving")
    statuses.append(_status(level, WORKER_NAME, message, CLOUD_ID, worker))
    return wire.new(DIAGNOSTIC_ARRAY, header=wire.header(time.time_ns()), status=statuses)


class StatusPublisher:
    """Publishes :func:`cloud_diagnostics` every ``every_s`` seconds on its own daemon thread.

    Args:
        trainer: the service whose state is published (on ``trainer.link``).
        every_s: period (0: never).
    """

    def __init__(self, trainer: CloudTrainer, every_s: float = 2.0) -> None:
        self.trainer, self.every_s = trainer, every_s
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdcca-cloud-status", daemon=True)

    def start(self) -> StatusPublisher:
        if self.every_s > 0:
            self._thread.start()
        return self

    def publish_once(self) -> int:
        data = wire.encode(cloud_diagnostics(self.trainer))
        self.trainer.link.publish_bytes(CLOUD_ID, DIAGNOSTICS, data)
        self.published += 1
        return len(data)

    def _run(self) -> None:
        failed = False
        while not self._stop.is_set():
            try:
                self.publish_once()
                failed = False
            except Exception as err:  # a status is never a reason to stop; said once until it works again
                if not failed:
                    log.warning("publishing the cloud's status failed: %s", err)
                failed = True
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
