"""``cdcca demo``: the whole loop as a user runs it -- a cloud trainer and a robot, two processes on loopback.

1. Keys: a fresh Ed25519 signing key for the cloud, its public half in the robot's trust store.
2. A rosbag2 of the digits-shift target stream (``cdcca make-bag``), replayed through ``cdcca edge`` at a
   camera-like rate. The robot answers every prompt, runs UTS and uploads the uncertain samples.
3. ``cdcca cloud`` stores them, runs a teacher + AKD round per ``round_size`` samples, and publishes signed
   DWC deltas, which the robot verifies and hot-swaps while it keeps answering.
4. This process watches the link like any other peer: it counts uplink bytes of the round's samples (the
   cloud's round log in the work directory says which they were) against the raw frames of every query
   answered up to the round's last sample (what a cloud-only system would upload), and downlink bytes
   against the full fp32 student; it applies every
   delta it sees to a mirror of the robot's student (the same verification, the same θ_base + Δ) and scores
   the mirror on held-out target samples after each round; the robot's own ``AdapterStatus`` confirms it
   runs the same version, and the time from the round's first uploaded sample to that status is the
   update latency.

Any child process dying is an error with the tail of its log; Ctrl-C stops both children cleanly.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cdcca import wire
from cdcca.akd import AKDConfig
from cdcca.bag import image_to_msg, write_stream_bag
from cdcca.children import LoggedChild
from cdcca.data.digits_shift import load_domain
from cdcca.edge.adapter_slot import AdapterSlot
from cdcca.edge.sources import open_source
from cdcca.envelope import TrustStore, generate_key, trust_key
from cdcca.errors import CdccaError
from cdcca.evaluate import evaluate
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cdcca.report import format_table, progress_bar, save_figure
from cdcca.transport import Link, LinkConfig

log = logging.getLogger(__name__)
DEMO_DOMAINS = ("colour_inverted", "printed", "noisy_rotated")


class DemoError(CdccaError, RuntimeError):
    """A process of the demo died or the loop did not finish in time."""


@dataclass
class DemoConfig:
    """Settings of the demo.

    Args:
        checkpoints: directory holding ``teacher/`` and ``student/``.
        workdir: state of the run (recreated each time).
        robot_id: the robot's name.
        rounds: adaptation rounds to wait for.
        domains: target domains of the stream.
        interleave: shuffle the domains' frames into one stream (a world that keeps changing) instead of
            streaming one domain after the other.
        stream_images: stream images per domain in the bag (one prompt per task each).
        test_images: held-out test images per domain the accuracy is measured on.
        round_size: uploads (one per frame, with every uncertain prompt about it) that start a cloud round.
        max_round_samples: the most new uploads one round takes.
        steps: AKD optimizer steps per round.
        lr: AKD learning rate.
        replay: samples of earlier rounds each round trains on again (see ``CloudConfig.replay``).
        pseudo_label_keep: share of a round's samples, the teacher's most confident, trained on.
        check_fraction: share of a round's samples held out to pick the round's best weights (0: off).
        check_min: the fewest held-out samples a check may rest on.
        rate_hz: queries per second the robot answers (the bag is paced like a camera).
        codec: DWC codec of the deltas.
        flush_after_s: the cloud also runs a round on fewer samples once the oldest waited this long.
        port: loopback TCP port the cloud listens on.
        threads: CPU threads in all; each process gets its share.
        timeout_s: give up when the rounds have not arrived by then.
    """

    checkpoints: Path
    workdir: Path
    robot_id: str = "r1"
    rounds: int = 3
    domains: tuple[str, ...] = field(default=DEMO_DOMAINS)
    interleave: bool = True
    stream_images: int = 150
    test_images: int = 100
    round_size: int = 64
    max_round_samples: int = 256
    steps: int = AKDConfig.steps
    lr: float = 1e-3
    replay: int = 128
    pseudo_label_keep: float = 1.0
    check_fraction: float = AKDConfig.check_fraction
    check_min: int = 32
    rate_hz: float = 40.0
    codec: str = "subspace"
    flush_after_s: float = 10.0
    port: int = 7447
    threads: int = 2
    timeout_s: float = 480.0


@dataclass
class _Observed:
    """What the demo saw on the link, with arrival times."""

    uploads: list = field(default_factory=list)  # (time, sample_id, nbytes)
    deltas: queue.Queue = field(default_factory=queue.Queue)  # (time, msg, nbytes)
    statuses: list = field(default_factory=list)  # (time, version, state)
    answers: list = field(default_factory=list)  # sample ids answered, in order
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, link: Link, robot_id: str) -> None:
        def upload(_, msg, data):
            with self.lock:
                self.uploads.append((time.monotonic(), msg.sample_id, len(data)))

        def status(_, msg, __):
            with self.lock:
                self.statuses.append((time.monotonic(), int(msg.version), int(msg.state)))

        def delta(_, msg, data):
            self.deltas.put((time.monotonic(), msg, len(data)))

        def answer(_, msg, __):
            with self.lock:
                self.answers.append(msg.sample_id)

        link.subscribe(robot_id, "uts_tokens", upload)
        link.subscribe(robot_id, "weight_delta", delta)
        link.subscribe(robot_id, "adapter_status", status)
        link.subscribe(robot_id, "answer", answer)

    def applied_at(self, version: int) -> float | None:
        with self.lock:
            return next((t for t, v, s in self.statuses if v == version and s == 0), None)


def _accuracy(model, tests) -> float:
    scores = evaluate(model, tests, progress=False)
    return float(np.mean([s.accuracy for s in scores]))


def run_demo(config: DemoConfig, progress: bool = True) -> dict:
    """Run the loop until ``config.rounds`` updates are applied on the robot; returns the report."""
    import torch

    torch.set_num_threads(1)
    work = Path(config.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    private, public = generate_key(work / "keys", "demo-cloud")
    trust_key(public, work / "trust")
    bag = work / "stream"
    summary = _stream_bag(bag, config)
    frames = {q.sample_id: q.image for q in open_source(f"bag:{bag}")}  # keyed as the robot names its answers
    tests = [s for d in config.domains for s in load_domain(d, "test", limit=config.test_images)]
    endpoint = f"tcp/127.0.0.1:{config.port}"
    share = str(max(1, config.threads // 2))
    cloud_args = ["cloud", "--checkpoints", str(config.checkpoints), "--state", str(work / "cloud"),
                  "--key", str(private), "--endpoint", endpoint, "--round-size", str(config.round_size),
                  "--max-round-samples", str(config.max_round_samples),
                  "--steps", str(config.steps), "--lr", str(config.lr), "--codec", config.codec,
                  "--threads", share,
                  "--replay", str(config.replay), "--pseudo-label-keep", str(config.pseudo_label_keep),
                  "--check-fraction", str(config.check_fraction), "--check-min", str(config.check_min),
                  "--flush-after", str(config.flush_after_s)]  # fmt: skip
    cloud = LoggedChild("cloud", "cdcca.cli", cloud_args, work / "cloud.log", error=DemoError)
    edge = None
    link = None
    try:
        teacher = load_mllm(Path(config.checkpoints) / "teacher")
        mirror = load_adaptable_student(config.checkpoints)
        slot = AdapterSlot(mirror, config.robot_id, TrustStore.load(work / "trust"))
        teacher_acc = _accuracy(teacher, tests)
        del teacher
        before = _accuracy(mirror, tests)
        full_bytes = 4 * sum(p.numel() for p in mirror.parameters())
        cloud.wait_for("cloud trainer serving", timeout=120)
        link = Link(LinkConfig.loopback(False, endpoint))
        observed = _Observed()
        observed.watch(link, config.robot_id)
        edge_args = ["edge", "--robot-id", config.robot_id, "--checkpoints", str(config.checkpoints),
                     "--source", f"bag:{bag}", "--state", str(work / "edge"), "--trust", str(work / "trust"),
                     "--endpoint", endpoint, "--query-rate", str(config.rate_hz), "--rate", "0",
                     "--linger", "-1", "--threads", share]  # fmt: skip
        edge = LoggedChild("robot", "cdcca.cli", edge_args, work / "robot.log", error=DemoError)
        rows = []
        answered_upto = 0  # answers before this index belong to earlier rounds
        last_delta = time.monotonic()
        deadline = time.monotonic() + config.timeout_s
        bar = progress_bar(None, total=config.rounds, desc="adaptation rounds", disable=not progress)
        while len(rows) < config.rounds:
            for child in (cloud, edge):
                child.check()
            if time.monotonic() > deadline:
                raise DemoError(f"only {len(rows)} of {config.rounds} rounds within {config.timeout_s:.0f} s; see "
                                f"{cloud.log_path} and {edge.log_path}")  # fmt: skip
            try:
                arrived, msg, nbytes = observed.deltas.get(timeout=0.5)
            except queue.Empty:
                stalled = time.monotonic() - last_delta > config.flush_after_s + 60
                if stalled and "source finished" in edge.log_path.read_text(errors="replace"):
                    raise DemoError(f"the stream ended after {len(rows)} of {config.rounds} rounds; replay more "
                                    "frames (--stream-images) or lower the cloud's round size") from None  # fmt: skip
                continue
            last_delta = arrived
            status = slot.receive(msg)
            if status.state != 0:
                raise DemoError(f"the mirror rejected v{msg.version}: {status.reason}")
            applied = _wait_applied(observed, int(msg.version), (cloud, edge))
            members = set(_round_record(work / "cloud" / "rounds.jsonl", int(msg.version))["sample_ids"])
            with observed.lock:
                uploads = [(t, n) for t, sample_id, n in observed.uploads if sample_id in members]
                # the answers this round's samples were chosen from: those after the previous round's up to its newest
                # member. Rounds need not follow answer order (frames answered before the link was up are uploaded
                # later), so a round whose members were all answered before gets its own members' frames.
                last = max((i for i, s in enumerate(observed.answers) if s in members), default=-1)
                answered = observed.answers[answered_upto : last + 1] or [s for s in observed.answers if s in members]
            answered_upto = max(answered_upto, last + 1)
            with slot.model() as active:  # the copy the update was swapped into
                after = _accuracy(active, tests)
            rows.append({
                "round": len(rows) + 1, "version": int(msg.version), "keyframe": bool(msg.keyframe),
                "student_acc_before": before, "student_acc_after": after, "teacher_acc": teacher_acc,
                "answers": len(answered), "uploaded_samples": len(members),
                "uplink_bytes": sum(n for _, n in uploads),
                "raw_bytes": sum(_frame_bytes(frames[s]) for s in answered if s in frames),
                "downlink_bytes": nbytes, "full_bytes": full_bytes,
                "update_latency_s": applied - min((t for t, _ in uploads), default=arrived),
            })  # fmt: skip
            before = after
            bar.update(1)
        bar.close()
        edge_code, cloud_code = edge.stop(), cloud.stop()
        if edge_code != 0 or cloud_code != 0:
            raise DemoError(f"unclean shutdown: robot exit {edge_code}, cloud exit {cloud_code}")
    finally:
        if link is not None:
            link.close()
        for child in (edge, cloud):
            if child is not None:
                child.stop()
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "bag": {"path": str(summary.path), "queries": len(frames)}, "rounds": rows,
              "answers_seen": len(observed.answers),
              "summary": _summary(rows)}  # fmt: skip
    print(_table(rows))
    return report


def _stream_bag(path: Path, config: DemoConfig):
    """The digits-shift stream of ``config.domains`` as a bag, domain after domain or interleaved by frame."""
    samples = [s for d in config.domains for s in load_domain(d, "stream", limit=config.stream_images)]
    if config.interleave:  # shuffle frames, keeping each frame's prompts together
        frames: dict[str, list] = {}
        for sample in samples:  # ids are domain/split/image/task
            frames.setdefault(sample.sample_id.rsplit("/", 1)[0], []).append(sample)
        order = np.random.default_rng(0).permutation(len(frames))
        groups = list(frames.values())
        samples = [s for i in order for s in groups[i]]
    return write_stream_bag(path, samples)


def _frame_bytes(image) -> int:
    """Bytes of the frame as a ``sensor_msgs/Image`` (what uploading the raw camera frame would cost)."""
    return len(wire.encode(image_to_msg(image)))


def _round_record(path: Path, version: int, timeout: float = 30.0) -> dict:
    """The cloud's log entry of the round that produced ``version`` (it lists the round's new samples)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.is_file():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["version"] == version:
                    return record
        if time.monotonic() > deadline:
            raise DemoError(f"the cloud's round log {path} has no entry for v{version}")
        time.sleep(0.05)


def _wait_applied(observed: _Observed, version: int, children, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while (applied := observed.applied_at(version)) is None:
        for child in children:
            child.check()
        if time.monotonic() > deadline:
            raise DemoError(f"the robot did not report v{version} applied within {timeout:.0f} s")
        time.sleep(0.05)
    return applied


def _summary(rows: list[dict]) -> dict:
    first, last = rows[0], rows[-1]
    return {
        "student_acc_start": first["student_acc_before"], "student_acc_end": last["student_acc_after"],
        "teacher_acc": first["teacher_acc"],
        "rises_every_round": all(r["student_acc_after"] > r["student_acc_before"] for r in rows),
        "uplink_vs_raw": sum(r["uplink_bytes"] for r in rows) / max(1, sum(r["raw_bytes"] for r in rows)),
        "downlink_vs_full": float(np.mean([r["downlink_bytes"] / r["full_bytes"] for r in rows])),
        "mean_update_latency_s": float(np.mean([r["update_latency_s"] for r in rows])),
    }  # fmt: skip


def _table(rows: list[dict]) -> str:
    columns = ["round", "version", "student_acc_before", "student_acc_after", "teacher_acc", "answers",
               "uploaded_samples", "uplink_bytes", "raw_bytes", "downlink_bytes", "full_bytes",
               "update_latency_s"]  # fmt: skip
    headers = {"student_acc_before": "acc before", "student_acc_after": "acc after", "teacher_acc": "teacher",
               "uploaded_samples": "uploaded", "uplink_bytes": "uplink B", "raw_bytes": "raw B",
               "downlink_bytes": "downlink B", "full_bytes": "full B", "update_latency_s": "latency s"}  # fmt: skip
    return format_table(rows, columns, title="CD-CCA loop: robot + cloud on loopback, per adaptation round",
                        headers=headers)  # fmt: skip


def plot_demo(report: dict, path: str | Path) -> Path:
    """Accuracy per round (student vs teacher) and bytes per round (uplink vs raw, downlink vs full)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rounds"]
    rounds = [0] + [r["round"] for r in rows]
    fig, (acc, size) = plt.subplots(1, 2, figsize=(11, 4))
    acc.plot(rounds, [rows[0]["student_acc_before"]] + [r["student_acc_after"] for r in rows], "o-", label="student")
    acc.axhline(rows[0]["teacher_acc"], color="grey", linestyle="--", label="teacher")
    acc.set(xlabel="round", ylabel="held-out target accuracy (%)", title="student after each applied update")
    acc.set_xticks(rounds)
    acc.legend()
    x = np.arange(len(rows))
    bars = ((-0.3, "uplink_bytes", "uplink (UTS)"), (-0.1, "raw_bytes", "raw frames"),
            (0.1, "downlink_bytes", "downlink (delta)"), (0.3, "full_bytes", "full student"))  # fmt: skip
    for offset, key, label in bars:
        size.bar(x + offset, [r[key] for r in rows], width=0.2, label=label)
    size.set(yscale="log", xlabel="round", ylabel="bytes", title="link traffic per round")
    size.set_xticks(x, [str(r["round"]) for r in rows])
    size.legend(fontsize=8)
    return save_figure(fig, path)
