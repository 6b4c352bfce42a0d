"""The robot's runtime: answer, select what to upload, take updates, and keep answering whatever the link does.

One :class:`EdgeRuntime` per robot (Algorithm 1 of Wang et al., CVPR 2024, device side):

1. **Answer** every prompt about its frame with the student (a :class:`~cdcca.edge.backend.EdgeBackend`).
2. **UTS** on every answer: stage 1 on the answer entropy, stage 2 (MC-dropout token variance on the frozen
   encoder) for the samples stage 1 keeps; kept tokens are packed into ``UtsTokens``.
3. **Uplink**: each selected sample goes into the durable :class:`~cdcca.edge.uplink.UplinkQueue` and is
   sent until the cloud acknowledges it; with the cloud unreachable the queue fills (bounded, lowest
   uncertainty dropped) and answering is unaffected.
4. **Downlink**: a ``WeightDelta`` is verified and hot-swapped by the backend off the answering thread;
   the resulting ``AdapterStatus`` is published, and repeated as a heartbeat so the cloud knows the applied
   version even after a lost message or a restart.

The runtime is plain Python: ROS nodes (``ros2_ws/src/cdcca_edge``) and ``cdcca edge`` both drive it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cdcca import wire
from cdcca.edge.adapter_slot import APPLIED
from cdcca.edge.backend import EdgeBackend
from cdcca.edge.uplink import UplinkQueue
from cdcca.models.mllm import MLLM
from cdcca.uts import UncertaintyTokenSampler, UTSConfig, pack_tokens

log = logging.getLogger(__name__)


@dataclass
class EdgeConfig:
    """Settings of one robot's runtime.

    Args:
        robot_id: this robot's name (the first part of every Zenoh key).
        state_dir: where the uplink queue and the adapter state persist.
        queue_capacity: the most samples waiting for the cloud.
        resend_after_s: resend a sample not acknowledged within this time.
        pump_every_s: how often the background thread sends due samples.
        heartbeat_every_s: how often the current ``AdapterStatus`` is repeated.
        uts: UTS settings.
    """

    robot_id: str = "r1"
    state_dir: Path = Path("edge_state")
    queue_capacity: int = 1024
    resend_after_s: float = 10.0
    pump_every_s: float = 0.1
    heartbeat_every_s: float = 2.0
    uts: UTSConfig = field(default_factory=UTSConfig)


@dataclass
class EdgeCounters:
    answers: int = 0
    failed_answers: int = 0
    selected: int = 0
    deltas_received: int = 0
    statuses_published: int = 0
    uplink_bytes: int = 0


class EdgeRuntime:
    """Answers, UTS, the durable uplink and hot-swapped updates for one robot.

    Args:
        backend: what answers (torch or ONNX Runtime) and applies deltas.
        encoder_owner: a torch student whose frozen vision encoder UTS stage 2 runs on.
        config: runtime settings.
        link: the Zenoh link to the cloud; ``None`` runs offline (the queue still fills).
    """

    def __init__(self, backend: EdgeBackend, encoder_owner: MLLM, config: EdgeConfig, link=None) -> None:
        self.backend, self.config, self.link = backend, config, link
        self.encoder_owner = encoder_owner
        self.sampler = UncertaintyTokenSampler(encoder_owner, config.uts)
        self.uplink = UplinkQueue(Path(config.state_dir) / "uplink.sqlite", config.queue_capacity)
        self.counters = EdgeCounters()
        self._deltas: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._answer_lock = threading.Lock()  # UTS keeps a sliding window; one batch at a time
        self._ids = itertools.count()
        if link is not None:
            link.subscribe(config.robot_id, "weight_delta", lambda _, msg, __: self._deltas.put(msg))
            link.subscribe(config.robot_id, "uts_ack", lambda _, msg, __: self.uplink.ack(list(msg.sample_ids)))

    # ----------------------------------------------------------------------------------- answering
    def ask(self, images: Sequence[np.ndarray], prompts: Sequence[str], sample_ids: Sequence[str] | None = None,
            stamp_ns: int | None = None) -> list:  # fmt: skip
        """Answer a batch, run UTS on it, queue the uncertain samples; returns the ``Answer`` messages.

        A failure inside the model is logged and counted; the batch then gets empty answers (never raises
        for model errors, so a caller's loop keeps serving).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        stamp = time.time_ns() if stamp_ns is None else stamp_ns
        if sample_ids is None:  # unique per robot: the cloud drops repeated ids as resends
            ids = [f"{self.config.robot_id}-{time.time_ns()}-{next(self._ids)}" for _ in prompts]
        else:
            ids = list(sample_ids)
        started = time.perf_counter()
        with self._answer_lock:
            try:
                result = self.backend.answer(images, prompts)
            except Exception:
                log.exception("answering a batch of %d failed", len(prompts))
                self.counters.failed_answers += len(prompts)
                return [self._answer_msg(i, p, "", float("nan"), self.backend.version, 0.0, stamp)
                        for i, p in zip(ids, prompts)]  # fmt: skip
            latency_ms = 1000 * (time.perf_counter() - started) / max(1, len(prompts))
            self.counters.answers += len(prompts)
            self._select(images, prompts, ids, result, stamp)
        answers = [
            self._answer_msg(ids[i], prompts[i], result.texts[i], float(result.sample_entropy[i]),
                             result.adapter_version, latency_ms, stamp)
            for i in range(len(prompts))
        ]  # fmt: skip
        if self.link is not None:
            for msg in answers:
                self._publish("answer", msg)
        return answers

    def _answer_msg(self, sample_id, prompt, answer, entropy, version, latency_ms, stamp):
        return wire.new(wire.ANSWER, header=wire.header(stamp), sample_id=sample_id, prompt=prompt, answer=answer,
                        entropy=entropy, adapter_version=int(version), latency_ms=latency_ms)  # fmt: skip

    @torch.inference_mode()
    def _select(self, images, prompts, ids, result, stamp: int) -> None:
        keep = self.sampler.keep_samples(result.sample_entropy)
        if not keep.any():
            return
        index = keep.nonzero().squeeze(1).tolist()
        variance, tokens_kept = self.sampler.stage_two(self.encoder_owner.preprocess([images[i] for i in index]))
        for row, i in enumerate(index):
            msg = pack_tokens(result.visual_tokens[i], tokens_kept[row], variance[row], robot_id=self.config.robot_id,
                              sample_id=ids[i], adapter_version=result.adapter_version, prompt=prompts[i],
                              student_answer=result.texts[i], sample_entropy=float(result.sample_entropy[i]),
                              encoding=self.config.uts.encoding, stamp_ns=stamp)  # fmt: skip
            dropped = self.uplink.put(ids[i], float(result.sample_entropy[i]), wire.encode(msg))
            if dropped is not None:
                log.info("uplink queue full: dropped the least uncertain sample %s", dropped)
            self.counters.selected += 1

    # ------------------------------------------------------------------------------------- the link
    def _publish(self, topic: str, msg) -> None:
        try:
            self.link.publish(self.config.robot_id, topic, msg)
        except Exception as err:  # a closed or broken session must not stop answering
            log.warning("publishing %s failed: %s", topic, err)

    def pump(self, send: Callable[[str, bytes], object] | None = None) -> int:
        """Send the uplink samples that are due through ``send(topic, cdr_bytes)`` (default: the Zenoh link; a
        ROS or DDS shell passes its own publisher); returns how many were sent."""
        if send is None:
            if self.link is None:
                return 0
            send = partial(self.link.publish_bytes, self.config.robot_id)
        sent = 0
        for _, payload in self.uplink.due(self.config.resend_after_s):
            try:
                send("uts_tokens", payload)
                self.counters.uplink_bytes += len(payload)
                sent += 1
            except Exception as err:
                log.warning("uplink send failed (will retry): %s", err)
                break
        return sent

    def apply(self, msg):
        """Verify and hot-swap one ``WeightDelta``; publishes and returns the ``AdapterStatus``."""
        self.counters.deltas_received += 1
        status = self.backend.receive(msg)
        self.publish_status(status)
        return status

    def heartbeat(self):
        """The current version as an APPLIED ``AdapterStatus``: repeated so the cloud learns what this robot runs
        even after a lost message or a restart."""
        return wire.new(wire.ADAPTER_STATUS, header=wire.header(time.time_ns()), robot_id=self.config.robot_id,
                        version=self.backend.version, state=APPLIED, reason="heartbeat")  # fmt: skip

    def publish_status(self, status=None) -> None:
        """Publish ``status`` (default: :meth:`heartbeat`) on the link."""
        status = status if status is not None else self.heartbeat()
        if self.link is not None:
            self._publish("adapter_status", status)
            self.counters.statuses_published += 1

    def process_deltas(self, timeout: float = 0.0) -> int:
        """Apply every ``WeightDelta`` that arrived; returns how many."""
        done = 0
        while True:
            try:
                msg = self._deltas.get(timeout=timeout if done == 0 else 0.0)
            except queue.Empty:
                return done
            self.apply(msg)
            done += 1

    # -------------------------------------------------------------------------------- background
    def start(self) -> EdgeRuntime:
        """Run pumping, delta application and heartbeats on a background thread."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name=f"edge-{self.config.robot_id}", daemon=True)
            self._worker.start()
        return self

    def _loop(self) -> None:
        next_heartbeat = 0.0
        while not self._stop.is_set():
            try:
                self.process_deltas(timeout=self.config.pump_every_s)
                self.pump()
                if time.monotonic() >= next_heartbeat:
                    self.publish_status()
                    next_heartbeat = time.monotonic() + self.config.heartbeat_every_s
            except Exception:  # keep the robot alive; the cause is in the log
                log.exception("edge background step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
            self._worker = None

    def close(self) -> None:
        self.stop()
        self.uplink.close()

    def stats(self) -> dict:
        """Counters of the runtime, the uplink queue and the link, as one flat dict."""
        report = {**vars(self.counters), "adapter_version": self.backend.version}
        report.update({f"uplink_{k}": v for k, v in vars(self.uplink.stats()).items()})
        if self.link is not None:
            report["rejected"] = dict(self.link.rejected)
        return report
