"""``cdcca status``: live robots, versions, queue depths, rounds and rejections, read from the link.

It only listens: robots' ``diagnostic_msgs/DiagnosticArray`` on ``<robot>/cdcca/diagnostics`` (keys
``adapter_version``, ``uplink_queued``, ``uplink_acked``, ``answers``, ``updates_applied``, ``updates_rejected``,
``cloud``), the cloud's on ``_cloud/cdcca/diagnostics`` (see ``cloud_trainer.status``), every robot's
``AdapterStatus`` (applied / rejected and why), the ``WeightDelta`` messages the cloud sends (rounds) and the cloud
workers' presence tokens (up before their first status, which comes every 2 s). Values
are read leniently: a key that is missing or not a number leaves its cell empty, so robots of other versions
still show. The view is a ``rich`` live table (rich.live.Live) on a terminal, and a plain table otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from cdcca import wire
from cdcca.transport import CLOUD_PRESENCE, Link, LinkConfig
from cdcca.wire.topics import CLOUD_ID, DIAGNOSTICS

log = logging.getLogger(__name__)
CLOUD_ROBOT_PREFIX = "cdcca cloud: robot "
COLUMNS = ("robot", "version", "queued", "answers", "acked", "rounds", "rejections", "last reason", "last seen")


def _number(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


class StatusMonitor:
    """What the link says about every robot and the cloud, kept up to date by the link's subscriptions.

    Args:
        link: an open link (only subscribed to; nothing is published).
        clock: Unix seconds (tests pass their own).
    """

    def __init__(self, link: Link, clock=time.time) -> None:
        self.link, self.clock = link, clock
        self.robots: dict[str, dict[str, Any]] = {}
        self.cloud: dict[str, Any] = {}
        self.cloud_present: set[str] = set()  # presence tokens of cloud workers up now (``cloud``, ``cloud/<id>``)
        self._lock = threading.Lock()
        link.subscribe("*", DIAGNOSTICS, lambda robot_id, msg, _: self.on_diagnostics(robot_id, msg))
        link.subscribe("*", "adapter_status", lambda robot_id, msg, _: self.on_adapter_status(robot_id, msg))
        link.subscribe("*", "weight_delta", lambda robot_id, msg, _: self.on_weight_delta(robot_id, msg))
        link.watch_presence(CLOUD_PRESENCE, self.on_presence)

    def _row(self, robot_id: str) -> dict[str, Any]:
        row = self.robots.get(robot_id)
        if row is None:
            row = self.robots[robot_id] = {
                "robot": robot_id, "adapter_version": None, "uplink_queued": None, "answers": None,
                "uplink_acked": None, "rounds": None, "rejections": 0, "last_reject_reason": "", "last_seen": None,
                "cloud": None, "updates_applied": None, "pending_samples": None, "latest_version": None,
            }  # fmt: skip
        return row

    # ------------------------------------------------------------------------------- link handlers
    def on_diagnostics(self, sender: str, msg) -> None:
        now = self.clock()
        with self._lock:
            if sender == CLOUD_ID:
                self._on_cloud(msg, now)
                return
            row = self._row(sender)
            row["last_seen"] = now
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                for key in ("adapter_version", "uplink_queued", "uplink_acked", "answers", "updates_applied"):
                    if _number(values.get(key)) is not None:
                        row[key] = _number(values[key])
                if _number(values.get("updates_rejected")) is not None:
                    row["rejections"] = max(row["rejections"], _number(values["updates_rejected"]))
                if values.get("cloud"):
                    row["cloud"] = values["cloud"]

    def _on_cloud(self, msg, now: float) -> None:
        self.cloud = {"last_seen": now}
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if status.name.startswith(CLOUD_ROBOT_PREFIX):
                row = self._row(status.name[len(CLOUD_ROBOT_PREFIX) :])
                for key, name in (("rounds", "rounds"), ("pending_samples", "pending_samples"),
                                  ("latest_version", "latest_version")):  # fmt: skip
                    if _number(values.get(key)) is not None:
                        row[name] = _number(values[key])
                if _number(values.get("rejections")) is not None:
                    row["rejections"] = max(row["rejections"], _number(values["rejections"]))
                if values.get("last_reject_reason"):
                    row["last_reject_reason"] = values["last_reject_reason"]
                if row["adapter_version"] is None and _number(values.get("applied_version")) not in (None, -1):
                    row["adapter_version"] = _number(values["applied_version"])
            else:
                self.cloud.update({"level": int(status.level), "message": status.message,
                                   **{k: _number(v) if _number(v) is not None else v for k, v in values.items()}})

    def on_presence(self, name: str, alive: bool) -> None:
        with self._lock:
            (self.cloud_present.add if alive else self.cloud_present.discard)(name)

    def on_adapter_status(self, robot_id: str, msg) -> None:
        with self._lock:
            row = self._row(robot_id)
            row["last_seen"] = self.clock()
            if msg.state == wire.REJECTED:
                row["rejections"] += 1
                row["last_reject_reason"] = msg.reason
            elif msg.state in (wire.APPLIED, wire.ROLLED_BACK):
                row["adapter_version"] = int(msg.version)

    def on_weight_delta(self, robot_id: str, msg) -> None:
        with self._lock:
            row = self._row(robot_id)
            row["latest_version"] = max(row["latest_version"] or 0, int(msg.version))
            row["rounds"] = max(row["rounds"] or 0, int(msg.version))

    # --------------------------------------------------------------------------------------- views
    def snapshot(self) -> dict:
        """``{"robots": [row, ...], "cloud": {...} | None, "taken_unix": ...}``; rows sorted by robot id."""
        now = self.clock()
        with self._lock:
            robots = [dict(row) for _, row in sorted(self.robots.items())]
            cloud = dict(self.cloud) if self.cloud else None
            present = sorted(self.cloud_present)
        for row in robots:
            row["seen_s_ago"] = round(now - row["last_seen"], 1) if row["last_seen"] is not None else None
        if cloud is not None:
            cloud["seen_s_ago"] = round(now - cloud["last_seen"], 1)
        return {"robots": robots, "cloud": cloud, "cloud_present": present, "taken_unix": now}

    def close(self) -> None:
        """Nothing of its own to release: the subscriptions end with the link."""


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def table_rows(snapshot: dict) -> list[list[str]]:
    """One list of cells per robot, in :data:`COLUMNS` order."""
    rows = []
    for row in snapshot["robots"]:
        reason = row["last_reject_reason"]
        reason = reason if len(reason) <= 40 else reason[:39] + "…"
        seen = f"{row['seen_s_ago']:.0f} s ago" if row["seen_s_ago"] is not None else "never"
        counts = [_cell(row[key]) for key in ("adapter_version", "uplink_queued", "answers", "uplink_acked", "rounds")]
        rows.append([row["robot"], *counts, str(row["rejections"]), reason, seen])
    return rows


def cloud_line(snapshot: dict) -> str:
    cloud = snapshot["cloud"]
    if cloud is None and snapshot.get("cloud_present"):
        return f"cloud: up ({', '.join(snapshot['cloud_present'])}), no status heard yet (it reports every 2 s)"
    if cloud is None:
        return "cloud: not heard from (is it running, and does it publish its status?)"
    current = cloud.get("current_round") or "idle"
    return (f"cloud: {cloud.get('message', '')} | rounds {_cell(cloud.get('rounds_done'))} | now {current} | "
            f"pending {_cell(cloud.get('pending_total'))} | quarantined {_cell(cloud.get('quarantined'))} | "
            f"seen {cloud['seen_s_ago']:.0f} s ago")  # fmt: skip


def plain_table(snapshot: dict) -> str:
    """The snapshot as fixed-width text (for pipes, logs and files)."""
    rows = [list(COLUMNS), *table_rows(snapshot)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not snapshot["robots"]:
        lines.append("(no robot heard from yet)")
    return "\n".join([*lines, cloud_line(snapshot)])


def rich_table(snapshot: dict):
    """The snapshot as a ``rich.table.Table`` (the cloud's line as its caption)."""
    from rich.table import Table

    table = Table(title="CD-CCA robots", caption=cloud_line(snapshot), expand=False)
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in ("version", "queued", "answers", "acked", "rounds",
                                                           "rejections") else "left")  # fmt: skip
    for cells in table_rows(snapshot):
        table.add_row(*cells)
    return table


def run_status(link_config: LinkConfig, *, once_after_s: float | None, json_out: bool, refresh_s: float = 1.0,
               out=None) -> dict:  # fmt: skip
    """Listen on the link and show what it says; returns the last snapshot.

    Args:
        link_config: how to join the network (a monitor connects like a robot does).
        once_after_s: listen this long, print one table (or JSON) and return; ``None``: a live view until Ctrl-C.
        json_out: print the snapshot as JSON instead of a table.
        refresh_s: period of the live view.
        out: where to print (default ``sys.stdout``).
    """
    if once_after_s is not None and once_after_s < 0:
        raise ValueError(f"--once must be >= 0 seconds, got {once_after_s}")
    out = out or sys.stdout
    link = Link(link_config)
    monitor = StatusMonitor(link)
    try:
        if once_after_s is not None:
            time.sleep(once_after_s)
            snapshot = monitor.snapshot()
            print(json.dumps(snapshot, indent=2) if json_out else plain_table(snapshot), file=out, flush=True)
            return snapshot
        return _live(monitor, json_out, refresh_s, out)
    finally:
        monitor.close()
        link.close()


def _live(monitor: StatusMonitor, json_out: bool, refresh_s: float, out) -> dict:
    snapshot = monitor.snapshot()
    try:
        if json_out or not out.isatty():  # a pipe or a file: one plain table (or JSON line) per refresh
            while True:
                time.sleep(refresh_s)
                snapshot = monitor.snapshot()
                text = json.dumps(snapshot) if json_out else plain_table(snapshot) + "\n"
                print(text, file=out, flush=True)
        from rich.console import Console
        from rich.live import Live

        with Live(rich_table(snapshot), console=Console(file=out), refresh_per_second=4) as live:
            while True:
                time.sleep(refresh_s)
                snapshot = monitor.snapshot()
                live.update(rich_table(snapshot))
    except KeyboardInterrupt:
        return snapshot
