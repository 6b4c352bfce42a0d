"""``cdcca bench fleet``: N light robots on the real Zenoh link against 1 and 2 cloud workers sharing one store
(issue 16, part 4).

What runs, all on loopback:

* a hub: this process holds a Zenoh peer session listening on a free port; every other process connects to it and
  listens on an ephemeral port, so gossip scouting meshes them (``LinkConfig.loopback``);
* W cloud workers: processes running :class:`cloud_trainer.service.CloudTrainer` through
  :func:`cloud_trainer.app.serve` (the service loop of ``cdcca cloud``), one torch thread each, with their own
  ``worker_id`` and a short lease, sharing one store (a SQLite file here, or ``--store postgresql://...``);
* robots: a few light processes (no torch, no student), each simulating several robots. A robot publishes
  ``UtsTokens`` re-stamped from an upload set recorded once from the student (its robot_id, fresh sample ids),
  verifies each ``UtsAck``, and resends what is not acknowledged; it verifies every ``WeightDelta`` (signature,
  SHA-256, fingerprint, version chain) and applies it with the torch-free numpy decoder
  (:func:`cdcca.edge.adapter_state.verify_delta`) to the trainable state it holds, then reports
  ``AdapterStatus`` (and heartbeats, so a worker resends to a robot that is behind).

Phases, per worker count W (the workers serve the phases in turn, so the store and the workers' memory grow with
every robot served):

1. *saturation*, for each N: every robot publishes all its rounds' samples at once; rounds/min is the rounds of
   the phase over the time from the first sample to the last commit; the workers' RSS is read after the phase
   (``psutil``) against the robots served so far: the slope is the bytes per added robot;
2. *offered load* (W = the largest count): each robot fills a round every ``P_N`` seconds, the robots' fills
   spread evenly over the period, with ``P_N = max(min_period_s, N / (load * capacity))`` where capacity is the
   saturation throughput of the same workers at the largest N: the offered load is ``load`` of capacity where the
   fleet is large enough, less for small fleets (the report states it per N);
3. *kill*: robots fill rounds, one worker is SIGKILLed while it holds a lease (mid-round); its lease expires
   (``lease_s`` is short here), another worker reruns the round, and each robot must still get exactly one
   version per round.

Then *pairs*: the speedup of a second worker is a ratio of two phases run a minute apart, and a shared machine's
speed drifts between them (two runs of the same code here gave 1.56 and 2.32). So ``speedup_pairs - 1`` more pairs
of fresh fleets run the largest saturation phase again (after a warm-up phase of the smallest fleet), the worker
counts taking turns (1, 2 | 2, 1 | 1, 2 ...: a steady drift raises one pair's ratio and lowers the next one's). The
summary's ``speedup_2_workers`` is the median of the pairs' ratios, each pair's is reported, and so is the spread
of the one-worker throughput over the pairs (how much the machine moved).

Latency is the time from a round filling up (the last of its samples acknowledged: from then on it is due in the
store) to the robot having applied the version it made. ``acked_lost`` counts acknowledged samples the store does
not hold afterwards (and ``acked_unused`` those still unused once every round was run): both must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import socket
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cdcca import wire
from cdcca.children import LoggedChild
from cdcca.edge.adapter_state import adapter_status, verify_delta
from cdcca.envelope import AckRejected, DeltaRejected, TrustStore, verify_ack
from cdcca.errors import CdccaError
from cdcca.transport import Link, LinkConfig

log = logging.getLogger(__name__)


class FleetBenchError(CdccaError, RuntimeError):
    """A process of the fleet benchmark died, or a phase did not finish in time."""


@dataclass
class FleetBenchConfig:
    """Settings of the fleet benchmark.

    Args:
        checkpoints: directory holding ``teacher/`` and ``student/``.
        workdir: state of the run (recreated each time).
        robots: fleet sizes N.
        workers: cloud worker counts W.
        store: a ``postgresql://`` URL the workers share (``None``: a SQLite file per worker count).
        round_size: samples that make a round (also the most one round takes).
        steps: AKD optimizer steps per round.
        batch_size: AKD samples per step.
        anchor_images: source images the workers keep as anchors (the forgetting guard; 0: none).
        codec: DWC codec of the deltas.
        saturation_rounds: rounds per robot in the saturation phase.
        load: offered load of the latency phase, as a share of the saturation throughput.
        min_period_s: shortest time between two rounds of one robot in the latency phase.
        latency_rounds: rounds measured per N in the latency phase at least (small fleets fill several each).
        latency_robots: fleet sizes of the latency phase (``None``: ``robots``).
        kill_robots: robots of the kill phase (0: no kill phase).
        kill_rounds: rounds per robot of the kill phase.
        speedup_pairs: pairs of adjacent saturation phases at the largest N (1 and 2 workers, taking turns) whose
            median throughput ratio is the speedup; the main pass is the first (1: only it).
        lease_s: the workers' lease (short, so a killed worker's round is rerun soon; renewed while a round runs).
        resend_after_s: the workers' resend delay (a robot behind gets the update again).
        heartbeat_s: the robots' ``AdapterStatus`` heartbeat.
        robot_processes: the most processes the robots of one phase are spread over.
        phase_timeout_s: give up on a phase after this long.
        port: the hub's loopback port (``None``: a free one).
    """

    checkpoints: Path
    workdir: Path
    robots: tuple[int, ...] = (1, 8, 32, 128)
    workers: tuple[int, ...] = (1, 2)
    store: str | None = None
    round_size: int = 4
    steps: int = 3
    batch_size: int = 4
    anchor_images: int = 8
    codec: str = "ecsq"
    saturation_rounds: int = 1
    load: float = 0.5
    min_period_s: float = 2.0
    latency_rounds: int = 16
    latency_robots: tuple[int, ...] | None = None
    kill_robots: int = 8
    kill_rounds: int = 2
    speedup_pairs: int = 3
    lease_s: float = 3.0
    resend_after_s: float = 2.0
    heartbeat_s: float = 2.0
    robot_processes: int = 4
    phase_timeout_s: float = 300.0
    port: int | None = None

    def __post_init__(self) -> None:
        if not self.robots or min(self.robots) < 1 or not self.workers or min(self.workers) < 1:
            raise ValueError(f"FleetBenchConfig needs robots and workers >= 1, got {self.robots}, {self.workers}")
        if not 0 < self.load < 1:
            raise ValueError(f"FleetBenchConfig.load is a share of the throughput in (0, 1), got {self.load}")
        if self.round_size < 1 or self.saturation_rounds < 1 or self.kill_rounds < 1 or self.latency_rounds < 1:
            raise ValueError("FleetBenchConfig: round_size and the rounds per phase must be >= 1")
        if self.speedup_pairs < 1:
            raise ValueError(f"FleetBenchConfig.speedup_pairs must be >= 1, got {self.speedup_pairs}")


# ------------------------------------------------------------------------------------------------ upload set
def write_records(path: Path, records: list[bytes]) -> None:
    """Length-prefixed CDR messages in one file (no pickle)."""
    with open(path, "wb") as handle:
        for data in records:
            handle.write(struct.pack("<I", len(data)) + data)


def read_records(path: Path) -> list[bytes]:
    data, records, at = Path(path).read_bytes(), [], 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        records.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return records


def record_upload_set(checkpoints: Path, out: Path, count: int = 8) -> dict:
    """Record ``count`` ``UtsTokens`` from the student once (printed domain, half the tokens kept), and the robots'
    version-0 trainable set (numpy safetensors) and base fingerprint; what every simulated robot replays."""
    import torch
    from safetensors.numpy import save_file

    from cdcca.data.digits_shift import load_domain
    from cdcca.fingerprint import student_fingerprint
    from cdcca.models.checkpoint import load_adaptable_student
    from cdcca.models.trainable import trainable_parameters
    from cdcca.uts import pack_tokens

    student = load_adaptable_student(checkpoints)
    samples = load_domain("printed", "stream", limit=count)[:count]
    with torch.inference_mode():
        tokens = student.visual_tokens(student.preprocess([s.load_image() for s in samples]))  # (B, N, D)
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[::2] = True
    variance = torch.linspace(0, 1, tokens.shape[1])
    records = [wire.encode(pack_tokens(tokens[i], keep, variance, robot_id="recorded", sample_id=s.sample_id,
                                       adapter_version=0, prompt=s.prompt, student_answer="?", sample_entropy=1.0))
               for i, s in enumerate(samples)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "uploads.cdr", records)
    base = {name: p.detach().float().numpy().copy() for name, p in trainable_parameters(student).items()}
    save_file(base, str(out / "base.safetensors"))
    return {"uploads": str(out / "uploads.cdr"), "base": str(out / "base.safetensors"), "names": list(base),
            "fingerprint": student_fingerprint(student), "upload_bytes": sum(map(len, records)) // len(records),
            "trainable_bytes": sum(a.nbytes for a in base.values())}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the robots
@dataclass
class _SimRobot:
    """One simulated robot: its schedule, what it sent and was acknowledged, and the adapter it holds."""

    robot_id: str
    fills: list[float]  # Unix times its rounds are due to be published
    params: dict
    version: int = 0
    newest: int = 0
    published: int = 0  # rounds published so far
    sent: dict[str, float] = field(default_factory=dict)  # sample_id -> last publish time
    acked: dict[str, float] = field(default_factory=dict)  # sample_id -> first ack time
    round_ids: list[list[str]] = field(default_factory=list)  # sample ids of each round
    applied: list[tuple[int, float, bool]] = field(default_factory=list)  # (version, time, keyframe)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    bad_acks: int = 0


def run_robots(spec: dict) -> dict:
    """The body of one robot process (see the module docstring); returns what each robot saw (``robots``) and the
    process's CPU seconds (``cpu_s``)."""
    from safetensors.numpy import load_file

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trust = TrustStore.load(spec["trust"])
    loaded = load_file(spec["base"])
    base = {name: loaded[name] for name in spec["names"]}  # the trainable set's order: the delta's layout follows it
    recorded = [wire.decode(wire.UTS_TOKENS, data) for data in read_records(Path(spec["uploads"]))]
    robots = {rid: _SimRobot(rid, fills, base) for rid, fills in spec["robots"].items()}
    round_size, fingerprint = spec["round_size"], spec["fingerprint"]
    inbox: queue.Queue = queue.Queue()
    link = Link(LinkConfig(listen=["tcp/127.0.0.1:0"], connect=[spec["endpoint"]]))

    def on_ack(robot_id, msg, _):
        if robot_id in robots:
            inbox.put(("ack", robot_id, msg, time.time()))

    def on_delta(robot_id, msg, _):
        if robot_id in robots:
            inbox.put(("delta", robot_id, msg, time.time()))

    link.subscribe("*", "uts_ack", on_ack)
    link.subscribe("*", "weight_delta", on_delta)

    def publish(robot: _SimRobot, sample_id: str, index: int) -> None:
        msg = dataclasses.replace(recorded[index % len(recorded)], robot_id=robot.robot_id, sample_id=sample_id)
        link.publish(robot.robot_id, "uts_tokens", msg)
        robot.sent[sample_id] = time.time()

    def status(robot: _SimRobot, state: int = wire.APPLIED, reason: str = "") -> None:
        link.publish(robot.robot_id, "adapter_status", adapter_status(robot.robot_id, robot.version, state, reason))

    def handle(kind: str, robot_id: str, msg, arrived: float) -> None:
        robot = robots[robot_id]
        if kind == "ack":
            try:
                _, ids = verify_ack(msg, trust=trust, robot_id=robot_id)
            except AckRejected:
                robot.bad_acks += 1
                return
            for sample_id in ids:
                robot.acked.setdefault(sample_id, arrived)
            return
        if msg.version <= robot.version:  # a resend of what it runs (several workers may resend)
            robot.duplicates += 1
            status(robot)
            return
        try:
            robot.params = verify_delta(msg, trust=trust, robot_id=robot_id, version=robot.version,
                                        newest_version=robot.newest, base=base, current=robot.params,
                                        base_fingerprint=fingerprint)  # fmt: skip
        except DeltaRejected as err:
            robot.rejected.append(err.reason)
            status(robot, wire.REJECTED, err.reason)
            return
        robot.version = robot.newest = int(msg.version)
        robot.applied.append((robot.version, time.time(), bool(msg.keyframe)))
        status(robot)

    deadline = spec["deadline_unix"]
    while link.peers() < 1 and time.time() < deadline:
        time.sleep(0.05)
    next_beat = next_resend = time.time() + spec["heartbeat_s"]
    while time.time() < deadline:
        now = time.time()
        for robot in robots.values():
            while robot.published < len(robot.fills) and robot.fills[robot.published] <= now:
                k = robot.published
                ids = [f"{robot.robot_id}-k{k}-{j}" for j in range(round_size)]
                for j, sample_id in enumerate(ids):
                    publish(robot, sample_id, k * round_size + j)
                robot.round_ids.append(ids)
                robot.published += 1
        with contextlib.suppress(queue.Empty):
            handle(*inbox.get(timeout=0.02))
            while True:
                handle(*inbox.get_nowait())
        now = time.time()
        if now >= next_resend:  # what is not acknowledged yet goes again, as a robot's uplink queue does
            next_resend = now + spec["resend_s"]
            for robot in robots.values():
                for sample_id, sent in list(robot.sent.items()):
                    if sample_id not in robot.acked and now - sent >= spec["resend_s"]:
                        k, j = (int(x) for x in sample_id.rsplit("-k", 1)[1].split("-"))
                        publish(robot, sample_id, k * round_size + j)
        if now >= next_beat:
            next_beat = now + spec["heartbeat_s"]
            for robot in robots.values():
                status(robot)
        done = all(r.published == len(r.fills) and len(r.acked) == len(r.sent) and r.version >= len(r.fills)
                   for r in robots.values())  # fmt: skip
        if done:
            break
    link.close()
    seen = {rid: {"fills": r.fills, "round_ids": r.round_ids, "sent": r.sent, "acked": r.acked, "applied": r.applied,
                  "version": r.version, "duplicates": r.duplicates, "rejected": r.rejected, "bad_acks": r.bad_acks}
            for rid, r in robots.items()}  # fmt: skip
    return {"robots": seen, "cpu_s": time.process_time()}


# ----------------------------------------------------------------------------------------------- the workers
def run_worker(spec: dict) -> dict:
    """The body of one cloud worker process: a :class:`CloudTrainer` served as ``cdcca cloud`` serves it."""
    import threading

    import torch

    from cdcca.akd import AKDConfig
    from cloud_trainer.app import build_trainer, serve
    from cloud_trainer.service import CloudConfig

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = CloudConfig(state_dir=Path(spec["state"]), store=spec["store"], round_size=spec["round_size"],
                         max_round_samples=spec["round_size"], codec=spec["codec"], worker_id=spec["worker_id"],
                         lease_s=spec["lease_s"], resend_after_s=spec["resend_after_s"], status_every_s=0.0,
                         akd=AKDConfig(steps=spec["steps"], batch_size=spec["batch_size"],
                                       anchor_batch=spec["batch_size"]))  # fmt: skip
    link = Link(LinkConfig(listen=["tcp/127.0.0.1:0"], connect=[spec["endpoint"]]))
    trainer = build_trainer(Path(spec["checkpoints"]), Path(spec["key"]), config, link, spec["anchor_images"])
    try:
        return serve(trainer, threading.Event())
    finally:
        trainer.close()
        link.close()


# ------------------------------------------------------------------------------------------------ the parent
class _Process(LoggedChild):
    """A child process of the benchmark (a worker or a robot process) running its role on a JSON spec."""

    def __init__(self, name: str, role: str, spec: dict, work: Path) -> None:
        self.spec_path, self.out = work / f"{name}.json", work / f"{name}.out.json"
        self.spec_path.write_text(json.dumps({**spec, "out": str(self.out)}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        super().__init__(name, "cdcca.benchmarks.fleet", [role, str(self.spec_path)], work / f"{name}.log",
                         error=FleetBenchError, env=env, may_exit=True)  # fmt: skip

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (``None`` once it is gone)."""
        import psutil

        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class _Fleet:
    """The workers of one worker count and the phases they serve."""

    def __init__(self, config: FleetBenchConfig, work: Path, recorded: dict, key: Path, trust: Path, endpoint: str,
                 workers: int) -> None:  # fmt: skip
        self.config, self.work, self.recorded, self.trust, self.endpoint = config, work, recorded, trust, endpoint
        self.count = workers
        work.mkdir(parents=True, exist_ok=True)
        self.store_spec = config.store or str(work / "cloud.sqlite")
        self.workers: dict[str, _Process] = {}
        self.robots_served = 0
        self.phases = 0
        for index in range(workers):
            worker_id = f"w{index}"
            spec = {"checkpoints": str(config.checkpoints), "key": str(key), "store": self.store_spec,
                    "state": str(work / worker_id), "worker_id": worker_id, "endpoint": endpoint,
                    "round_size": config.round_size, "codec": config.codec, "lease_s": config.lease_s,
                    "resend_after_s": config.resend_after_s, "steps": config.steps, "batch_size": config.batch_size,
                    "anchor_images": config.anchor_images}  # fmt: skip
            self.workers[worker_id] = _Process(f"worker-{worker_id}", "worker", spec, work)
        self.worker_ids = list(self.workers)
        for worker in self.workers.values():
            worker.wait_for("cloud trainer serving", timeout=180)

    def open_store(self):
        from cloud_trainer.store import open_store

        return open_store(self.store_spec)

    def rounds(self, robot_ids: set[str]) -> list[dict]:
        """The committed rounds of these robots, from every worker's round log."""
        found = []
        for worker_id in self.worker_ids:  # a killed worker's log too: what it committed counts
            path = self.work / worker_id / "rounds.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    entry = json.loads(line)
                    if entry.get("event") == "round" and entry["robot_id"] in robot_ids:
                        found.append({**entry, "worker": worker_id})
        return found

    def run_phase(self, name: str, schedules: dict[str, list[float]], kill: str | None = None) -> dict:
        """Run the robots of ``schedules`` (robot_id -> fill times) until each applied its rounds; ``kill``: SIGKILL
        that worker once it holds a lease. Returns the phase's measurements."""
        config = self.config
        self.phases += 1
        folder = self.work / f"phase{self.phases}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        ids = sorted(schedules)
        processes = max(1, min(config.robot_processes, len(ids)))
        deadline = time.time() + config.phase_timeout_s
        base = {"endpoint": self.endpoint, "trust": str(self.trust), "uploads": self.recorded["uploads"],
                "base": self.recorded["base"], "names": self.recorded["names"],
                "fingerprint": self.recorded["fingerprint"],
                "round_size": config.round_size, "heartbeat_s": config.heartbeat_s,
                "resend_s": max(2.0, config.resend_after_s), "deadline_unix": deadline}  # fmt: skip
        children = [_Process(f"robots{i}", "robots", {**base, "robots": {r: schedules[r] for r in ids[i::processes]}},
                             folder) for i in range(processes)]  # fmt: skip
        killed: dict | None = None
        store = self.open_store() if kill is not None else None
        cpu_before = {worker_id: worker.cpu_seconds() for worker_id, worker in self.workers.items()}
        wall_before = time.monotonic()
        try:
            while any(child.process.poll() is None for child in children):
                for child in children:
                    child.check()
                for worker in self.workers.values():
                    worker.check()  # a worker this phase killed counts as stopped
                if kill is not None and killed is None:
                    held = [r for r, (w, expires) in store.leases().items() if w == kill and expires > time.time()]
                    if held:  # between its claim and its release: the round is running
                        version = store.latest(held[0]) + 1
                        self.workers[kill].kill()
                        killed = {"worker": kill, "robot_id": held[0], "version": version, "unix": time.time()}
                        log.info("fleet bench: killed %s in the round of %s v%d", kill, held[0], version)
                if time.time() > deadline + 30:
                    raise FleetBenchError(f"phase {name} did not finish within {config.phase_timeout_s:.0f} s")
                time.sleep(0.01 if kill is not None and killed is None else 0.1)
            for child in children:
                child.check()
        finally:
            for child in children:
                if child.process.poll() is None:
                    child.kill()
            if store is not None:
                store.close()
        wall = time.monotonic() - wall_before
        if killed is not None:
            self.workers.pop(killed["worker"])
        # how much of their cores the workers got: on a machine shared with other work, well below 1 while busy
        used = [worker.cpu_seconds() - cpu_before[w] for w, worker in self.workers.items() if cpu_before[w] is not None]
        seen: dict = {}
        robots_cpu = 0.0
        for child in children:
            out = json.loads(child.out.read_text())
            seen.update(out["robots"])
            robots_cpu += out["cpu_s"]
        self.robots_served += len(ids)
        row = self._measure(name, schedules, seen, killed)
        row["phase_wall_s"] = wall
        row["worker_cpu_share"] = sum(used) / (wall * len(used)) if used and wall > 0 else None
        row["robots_cpu_cores"] = robots_cpu / wall if wall > 0 else None  # the robot processes' load, in cores
        row["load_average_1m"] = os.getloadavg()[0]
        return row

    def _measure(self, name: str, schedules: dict[str, list[float]], seen: dict, killed: dict | None) -> dict:
        store = self.open_store()
        try:
            lost = unused = 0
            versions_ok, latencies, problems = True, [], []
            for robot_id, robot in seen.items():
                stored = store.sample_ids(robot_id)
                pending = {sample_id for sample_id, _ in store.pending(robot_id)}
                acked = set(robot["acked"])
                lost += len(acked - stored)
                unused += len(acked & pending)
                rounds = len(schedules[robot_id])
                applied = [v for v, _, _ in robot["applied"]]
                latest = store.latest(robot_id)
                if applied != list(range(1, rounds + 1)) or latest != rounds or robot["rejected"]:
                    versions_ok = False
                    problems.append(f"{robot_id}: applied {applied}, store at v{latest}, rejected {robot['rejected']}")
                for k, sample_ids in enumerate(robot["round_ids"]):
                    if k < len(robot["applied"]) and all(s in robot["acked"] for s in sample_ids):
                        filled = max(robot["acked"][s] for s in sample_ids)
                        latencies.append(max(0.0, robot["applied"][k][1] - filled))
        finally:
            store.close()
        rounds = self.rounds(set(seen))
        first = min((min(r["sent"].values()) for r in seen.values() if r["sent"]), default=0.0)
        last = max((r["finished_unix"] for r in rounds), default=first)
        span = max(last - first, 1e-9)
        rss = {worker_id: worker.rss() for worker_id, worker in self.workers.items()}
        row = {"phase": name, "workers": self.count, "robots": len(seen), "rounds": len(rounds),
               "rounds_per_min": 60.0 * len(rounds) / span, "span_s": span,
               "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
               "max_s": max(latencies) if latencies else None, "latencies": len(latencies),
               "rss_mib": max(rss.values()) / 2**20 if rss else None, "rss_bytes": rss,
               "robots_served": self.robots_served, "acked": sum(len(r["acked"]) for r in seen.values()),
               "acked_lost": lost, "acked_unused": unused, "versions_ok": versions_ok, "problems": problems[:5],
               "duplicates": sum(r["duplicates"] for r in seen.values()),
               "bad_acks": sum(r["bad_acks"] for r in seen.values()),
               "round_seconds_mean": float(np.mean([r["round_seconds"] for r in rounds])) if rounds else None}
        if killed is not None:  # the killed worker's round: which worker committed that version in the end
            row["killed"] = killed
            row["kill_rerun_by"] = next((r["worker"] for r in rounds if r["robot_id"] == killed["robot_id"]
                                         and r["version"] == killed["version"]), None)  # fmt: skip
        return row

    def state_bytes(self) -> int | None:
        """One robot's adapter state (trainable set + ϕ/ψ) and AdamW moments as the store holds them, in bytes."""
        store = self.open_store()
        try:
            for robot_id in store.robots():
                stored = store.load_adapter_state(robot_id)
                if stored is not None and stored[1] is not None:
                    tensors = [*stored[1].values(), *(stored[2] or {}).values()]
                    return sum(t.numel() * t.element_size() for t in tensors)
        finally:
            store.close()
        return None

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x (``None`` with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0])


def _saturate(fleet: _Fleet, phase: str, prefix: str, robots: int, pair: int) -> dict:
    """A saturation phase: ``robots`` robots (ids ``<prefix>-r<i>``) publish all their rounds at once."""
    t0 = time.time() + 1.0
    schedules = {f"{prefix}-r{i}": [t0] * fleet.config.saturation_rounds for i in range(robots)}
    return {**fleet.run_phase(phase, schedules), "pair": pair}


def run_fleet_bench(config: FleetBenchConfig, progress: bool = True) -> dict:
    """Run every phase (see the module docstring); returns the report (config, rows, rss, summary)."""
    import shutil

    from cdcca.envelope import generate_key, trust_key
    from cdcca.report import progress_bar

    work = Path(config.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    private, public = generate_key(work / "keys", "fleet-cloud")
    trust = work / "trust"
    trust_key(public, trust)
    recorded = record_upload_set(config.checkpoints, work / "recorded", count=max(8, config.round_size))
    endpoint = f"tcp/127.0.0.1:{config.port or _free_port()}"
    latency_sizes = tuple(config.latency_robots or config.robots)
    largest = max(config.robots)
    pair_sizes = sorted({min(config.robots), largest})  # a warm-up phase of fresh workers, then the measured one
    phases = len(config.workers) * len(config.robots) + len(latency_sizes) + (1 if config.kill_robots else 0)
    phases += (config.speedup_pairs - 1) * len(config.workers) * len(pair_sizes)
    bar = progress_bar(None, total=phases, desc="fleet phases", disable=not progress)
    rows: list[dict] = []
    rss_points: dict[str, list[tuple[float, float]]] = {}
    state_bytes = None
    capacity = {}
    run = f"{os.urandom(2).hex()}-" if config.store else ""  # a shared store may hold earlier runs' robots
    hub = Link(LinkConfig(listen=[endpoint]))
    started = time.monotonic()
    try:
        for count in config.workers:
            fleet = _Fleet(config, work / f"workers{count}", recorded, private, trust, endpoint, count)
            try:
                for n in config.robots:
                    row = _saturate(fleet, f"saturation-n{n}", f"{run}w{count}n{n}", n, pair=1)
                    rows.append(row)
                    for worker_id, rss in row["rss_bytes"].items():
                        rss_points.setdefault(f"W{count}/{worker_id}", []).append((row["robots_served"], rss))
                    bar.update(1)
                capacity[count] = rows[-1]["rounds_per_min"] / 60.0
                state_bytes = state_bytes or fleet.state_bytes()
                if count == max(config.workers):
                    for n in latency_sizes:
                        period = max(config.min_period_s, n / (config.load * capacity[count]))
                        per_robot = max(1, math.ceil(config.latency_rounds / n))
                        t0 = time.time() + 1.0
                        schedules = {f"{run}w{count}lat{n}-r{i}": [t0 + i * period / n + k * period
                                                              for k in range(per_robot)] for i in range(n)}  # fmt: skip
                        row = fleet.run_phase(f"load-n{n}", schedules)
                        row["offered_rounds_per_min"] = 60.0 * n / period
                        row["offered_share"] = n / period / capacity[count]
                        row["period_s"] = period
                        rows.append(row)
                        bar.update(1)
                    if config.kill_robots and count >= 2:
                        t0 = time.time() + 1.0
                        schedules = {f"{run}w{count}kill-r{i}": [t0] * config.kill_rounds
                                     for i in range(config.kill_robots)}  # fmt: skip
                        rows.append(fleet.run_phase("kill", schedules, kill="w0"))
                        bar.update(1)
            finally:
                fleet.stop()
        for pair in range(2, config.speedup_pairs + 1):
            for count in config.workers if pair % 2 else tuple(reversed(config.workers)):
                fleet = _Fleet(config, work / f"pair{pair}-workers{count}", recorded, private, trust, endpoint, count)
                try:
                    for n in pair_sizes:
                        rows.append(_saturate(fleet, f"pair{pair}-saturation-n{n}", f"{run}p{pair}w{count}n{n}", n,
                                              pair))  # fmt: skip
                        bar.update(1)
                finally:
                    fleet.stop()
    finally:
        hub.close()
        bar.close()
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "recorded": {k: v for k, v in recorded.items() if k not in ("uploads", "base", "names")},
            "rows": rows, "rss_points": rss_points, "state_bytes": state_bytes,
            "seconds": time.monotonic() - started,
            "summary": _summary(config, rows, rss_points, state_bytes)}  # fmt: skip


def _summary(config: FleetBenchConfig, rows: list[dict], rss_points: dict, state_bytes: int | None) -> dict:
    # the first phase is the workers' warm-up (first rounds, first link peers): left out of the slope when more follow
    slopes = {name: _slope(points[1:] if len(points) >= 3 else points) for name, points in rss_points.items()}
    known = [s for s in slopes.values() if s is not None]
    per_robot = max(known) if known else None
    saturation = {(r["workers"], r["robots"]): r for r in rows if r["phase"].startswith("saturation")}
    largest = max(config.robots)
    one, two = saturation.get((1, largest)), saturation.get((2, largest))
    load = {r["robots"]: r for r in rows if r["phase"].startswith("load")}
    small = min(load) if load else None
    big = 32 if 32 in load else (max(load) if load else None)
    ratio = (load[big]["p95_s"] / load[small]["p95_s"]) if load and load[small]["p95_s"] else None
    pairs = speedup_pairs(rows, largest)
    ratios = [pair["speedup"] for pair in pairs]
    alone = [pair["rounds_per_min"][1] for pair in pairs]
    summary = {
        "rss_per_robot_over_state": per_robot / state_bytes if per_robot is not None and state_bytes else None,
        "speedup_2_workers": float(np.median(ratios)) if ratios else None,  # the pairs' median
        "speedup_2_workers_by_pair": ratios,
        "speedup_2_workers_worst_pair": min(ratios) if ratios else None,
        # how far the machine moved over the pairs: the one-worker throughput's largest over its smallest
        "rounds_per_min_1_worker_spread": max(alone) / min(alone) if alone and min(alone) > 0 else None,
        "p95_ratio_32_vs_1": ratio if big == 32 and small == 1 else None,
        "acked_lost": sum(r["acked_lost"] for r in rows),
        "acked_unused": sum(r["acked_unused"] for r in rows),
        "versions_ok": all(r["versions_ok"] for r in rows),
        "rss_per_added_robot_bytes": per_robot,
        "rss_per_added_robot_bytes_by_worker": slopes,
        "state_bytes": state_bytes,
        "rounds_per_min_1_worker": one["rounds_per_min"] if one else None,
        "rounds_per_min_2_workers": two["rounds_per_min"] if two else None,
        "worker_cpu_share_1_worker": one.get("worker_cpu_share") if one else None,  # below 1: the cores were shared
        "worker_cpu_share_2_workers": two.get("worker_cpu_share") if two else None,
        "p95_ratio_largest_vs_smallest": ratio,
        "latency_robots_compared": [small, big] if load else None,
        "worst_p95_s": max((r["p95_s"] for r in rows if r["p95_s"] is not None), default=None),
        "worst_case_phase": max(rows, key=lambda r: r["p95_s"] or 0.0)["phase"] if rows else None,
        "kill_round_rerun_by": next((r.get("kill_rerun_by") for r in rows if r["phase"] == "kill"), None),
    }
    return summary


def speedup_pairs(rows: list[dict], robots: int) -> list[dict]:
    """Per pair (see :class:`FleetBenchConfig`), the rounds/min of 1 and 2 workers at saturation with ``robots``
    robots and their ratio; pairs missing either count are left out."""
    found: dict[int, dict[int, float]] = {}
    for row in rows:
        if "pair" in row and row["robots"] == robots and row["phase"].endswith(f"saturation-n{robots}"):
            found.setdefault(row["pair"], {})[row["workers"]] = row["rounds_per_min"]
    return [{"pair": pair, "rounds_per_min": rate, "speedup": rate[2] / rate[1]}
            for pair, rate in sorted(found.items()) if rate.get(1) and 2 in rate]


# ----------------------------------------------------------------------------------------------- reporting
COLUMNS = ["phase", "workers", "robots", "rounds", "rounds_per_min", "p50_s", "p95_s", "max_s", "rss_mib",
           "acked_lost", "versions_ok", "worker_cpu_share", "load_average_1m"]  # fmt: skip


def format_fleet(report: dict) -> str:
    from cdcca.report import format_table

    rows = [{**r, "versions_ok": "yes" if r["versions_ok"] else "NO"} for r in report["rows"]]
    text = format_table(rows, COLUMNS, title="fleet: light robots on Zenoh against cloud workers sharing one store",
                        headers={"rounds_per_min": "rounds/min", "versions_ok": "1 version/round",
                                 "worker_cpu_share": "cpu share", "load_average_1m": "load"})  # fmt: skip
    loads = [r for r in report["rows"] if r["phase"].startswith("load")]
    if loads:
        text += "\n" + format_table(loads, ["robots", "period_s", "offered_rounds_per_min", "offered_share", "p50_s",
                                            "p95_s", "max_s"], title="offered load of the latency phase")  # fmt: skip
    return text


def plot_fleet(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cdcca.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, points in report["rss_points"].items():
        axes[0].plot([x for x, _ in points], [y / 2**20 for _, y in points], marker="o", label=name)
    axes[0].set(xlabel="robots served", ylabel="worker RSS (MiB)", title="cloud memory")
    axes[0].legend(fontsize=8)
    rows = report["rows"]
    for count in sorted({r["workers"] for r in rows}):  # the main pass; the pairs' phases are in the title
        mine = [r for r in rows if r["workers"] == count and r["phase"].startswith("saturation")]
        axes[1].plot([r["robots"] for r in mine], [r["rounds_per_min"] for r in mine], marker="o",
                     label=f"{count} worker(s)")  # fmt: skip
    axes[1].set(xscale="log", xlabel="robots", ylabel="rounds/min", title="throughput at saturation")
    axes[1].legend(fontsize=8)
    loads = [r for r in rows if r["phase"].startswith("load") and r["p95_s"] is not None]
    if loads:
        axes[2].plot([r["robots"] for r in loads], [r["p50_s"] for r in loads], marker="o", label="p50")
        axes[2].plot([r["robots"] for r in loads], [r["p95_s"] for r in loads], marker="s", label="p95")
        axes[2].plot([r["robots"] for r in loads], [r["max_s"] for r in loads], marker="^", label="max")
        axes[2].legend(fontsize=8)
    axes[2].set(xscale="log", xlabel="robots", ylabel="seconds", title="round filled -> update applied (offered load)")
    summary = report["summary"]
    fig.suptitle(f"RSS/robot over state {summary['rss_per_robot_over_state'] or float('nan'):.2f}, "
                 f"speedup 2 workers {summary['speedup_2_workers'] or float('nan'):.2f} (median of pairs "
                 f"{' / '.join(f'{r:.2f}' for r in summary.get('speedup_2_workers_by_pair') or [])}), "
                 f"acked lost {summary['acked_lost']}", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def cli_bench_fleet(args) -> dict:
    """``cdcca bench fleet`` (options: :mod:`cdcca.benchmarks.fleet_cli`)."""
    from cdcca.paths import checkpoint_dir

    checkpoints = args.checkpoints or checkpoint_dir(args.preset)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cdcca-fleet-"))
    config = FleetBenchConfig(checkpoints=Path(checkpoints), workdir=Path(workdir), robots=tuple(args.robots),
                              workers=tuple(args.workers), store=args.store, round_size=args.round_size,
                              steps=args.steps or FleetBenchConfig.steps, saturation_rounds=args.saturation_rounds,
                              load=args.load, latency_rounds=args.latency_rounds,
                              latency_robots=tuple(args.latency_robots) if args.latency_robots else None,
                              kill_robots=args.kill_robots, speedup_pairs=args.speedup_pairs,
                              lease_s=args.lease)  # fmt: skip
    report = run_fleet_bench(config, progress=not getattr(args, "quiet", False))
    print(format_fleet(report))
    for key, value in report["summary"].items():
        if isinstance(value, list):
            print(f"{key}: " + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value))
        elif not isinstance(value, dict):
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot is not None:
        plot_fleet(report, plot)
        print(f"plot: {plot}")
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m cdcca.benchmarks.fleet {robots,worker} SPEC.json``: one child process of the benchmark."""
    parser = argparse.ArgumentParser(description="a child process of cdcca bench fleet")
    parser.add_argument("role", choices=["robots", "worker"])
    parser.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = run_robots(spec) if args.role == "robots" else run_worker(spec)
    Path(spec["out"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
