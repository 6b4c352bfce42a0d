"""``cdcca bench downlink``: what each DWC codec costs on the cloud -> robot link, and what hot-swaps cost.

1. An AKD round: the cloud copy of the student (LoRA added) distills from the teacher on a target domain's
   stream, updating only the trainable set. The round also estimates each tensor's importance (mean
   squared gradient of the AKD objective), which the bit-allocating codec uses.
2. Δ = θ_updated − θ_base (Eq. 7) goes through every codec; for each: bytes, bits per trainable parameter,
   transfer time at 1 Gb/s and 10 Mb/s (computed from bytes), encode/decode time, and the accuracy of
   θ_base + decode(Δ) (Eq. 8) on the domain's test split against the uncompressed Δ (the layout of the
   paper's Table 5).
   Steps 1-2 run once per target domain (``domains``: the cases); each codec's row is its worst case.
3. Hot-swap: a robot answers one prompt at a time while signed deltas arrive every few answers; answer
   latency p50/p99 with and without swaps, swap latency, and failed answers.
4. The default codec: the fewest bits per parameter among the codecs whose accuracy loss pooled over the cases
   is at most ``max_loss_points``; the worst case is reported beside it (the summary says which and why).
5. ``scale`` projects every codec to the paper's trainable-set sizes (:mod:`cdcca.benchmarks.scale`).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.akd import AKDConfig, Distiller, DistillSample
from cdcca.data.digits_shift import load_domain
from cdcca.dwc import gradient_importance
from cdcca.evaluate import evaluate
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import add_lora, trainable_parameters
from cdcca.report import progress_bar, save_figure


@dataclass
class DownlinkBenchConfig:
    """Settings of the downlink benchmark.

    Args:
        domains: target domains, one adaptation round each (the cases); the first also drives the hot-swap run.
        stream_images: stream images the round trains on (each asked one question per task).
        test_images: test images the accuracy is measured on.
        steps: optimizer steps of the round.
        lr: learning rate of the round.
        batch_size: samples per step.
        codecs: codecs to compare (default: every registered codec).
        swap_answers: answers in each hot-swap run (with and without swaps).
        swap_every: a delta arrives after every this many answers.
        max_loss_points: accuracy a codec may lose (points, pooled over the domains) and still be the default.
        scale: also project every codec to the paper-scale trainable sets (``scale`` section).
    """

    domains: tuple[str, ...] = ("printed", "colour_inverted", "noisy_rotated")
    stream_images: int = 200
    test_images: int = 347
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 32
    codecs: tuple[str, ...] | None = None
    swap_answers: int = 600
    swap_every: int = 5
    max_loss_points: float = 0.5
    scale: bool = True

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("DownlinkBenchConfig.domains must name at least one domain")
        for name in ("stream_images", "test_images", "steps", "batch_size", "swap_answers", "swap_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"DownlinkBenchConfig.{name} must be >= 1, got {getattr(self, name)}")


def adaptation_round(student: MLLM, teacher: MLLM, config: DownlinkBenchConfig, domain: str) -> dict:
    """One AKD round of ``student`` (in place) on ``domain``'s stream; also each tensor's importance."""
    samples = load_domain(domain, "stream", limit=config.stream_images)
    distiller = Distiller(teacher, student, AKDConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size))
    buffer = DistillSample.from_samples(student, samples)
    report = distiller.run_round(buffer)
    labels = report.pseudo_labels
    probe = list(range(min(len(buffer), 128)))
    importance = gradient_importance(
        distiller.trainable,
        (distiller.losses([buffer[i] for i in chunk], [labels[i] for i in chunk])["total"]
         for chunk in np.array_split(probe, 16)),
    )  # fmt: skip
    for param in student.blip2.parameters():
        param.requires_grad_(False)
        param.grad = None
    return {"samples": report.samples, "final_loss": report.losses["total"], "seconds": report.seconds,
            "importance": importance}  # fmt: skip


def _load_params(model: MLLM, params: dict[str, torch.Tensor]) -> None:
    live = trainable_parameters(model)
    with torch.no_grad():
        for name, value in params.items():
            live[name].copy_(value)


def _accuracy(model: MLLM, samples) -> float:
    return evaluate(model, samples, progress=False)[0].accuracy


def _run_case(student: MLLM, teacher: MLLM, config: DownlinkBenchConfig, domain: str, codecs: tuple[str, ...],
              progress: bool) -> dict:  # fmt: skip
    """One round on ``domain`` and every codec's bytes, times and accuracy; ``student`` gets LoRA and adapts."""
    from cdcca.dwc import apply_delta, compute_delta, get_codec

    torch.manual_seed(0)
    add_lora(student)
    base = {k: v.detach().clone() for k, v in trainable_parameters(student).items()}
    test = load_domain(domain, "test", limit=config.test_images)
    accuracy_before = _accuracy(student, test)
    round_log = adaptation_round(student, teacher, config, domain)
    importance = round_log.pop("importance")
    updated = {k: v.detach().clone() for k, v in trainable_parameters(student).items()}
    delta = compute_delta(updated, base)
    num_params = sum(t.numel() for t in delta.values())
    accuracy_uncompressed = _accuracy(student, test)
    reference = {name: tuple(t.shape) for name, t in delta.items()}
    rows = []
    for name in progress_bar(codecs, desc=f"codecs on {domain}", disable=not progress):
        codec = get_codec(name)
        started = time.perf_counter()
        payload = codec.encode(delta, importance=importance)
        encoded = time.perf_counter()
        decoded = codec.decode(payload, reference, strict=True)  # as the robot decodes: its own layout, bounded
        decode_s = time.perf_counter() - encoded
        _load_params(student, apply_delta(base, decoded))
        accuracy = _accuracy(student, test)
        bits = 8 * len(payload)
        rows.append({
            "codec": name, "params": num_params, "bytes": len(payload), "bits_per_param": bits / num_params,
            "ms_at_1gbps": 1000 * bits / 1e9, "ms_at_10mbps": 1000 * bits / 1e7,
            "encode_ms": 1000 * (encoded - started), "decode_ms": 1000 * decode_s,
            "accuracy": accuracy, "acc_loss_points": accuracy_uncompressed - accuracy,
        })  # fmt: skip
    _load_params(student, updated)
    per_tensor = {name: float(t.pow(2).mean().sqrt()) for name, t in delta.items()}
    return {"domain": domain, "round": round_log, "accuracy_before": accuracy_before,
            "accuracy_uncompressed": accuracy_uncompressed, "codecs": rows, "delta_rms": per_tensor,
            "base": base, "delta": delta}  # fmt: skip


def _worst_case(cases: list[dict]) -> list[dict]:
    """Each codec's row across the cases: the most bytes and the largest accuracy loss (times: the slowest)."""
    rows = []
    for position, first in enumerate(cases[0]["codecs"]):
        mine = [case["codecs"][position] for case in cases]
        worst = max(mine, key=lambda row: row["acc_loss_points"])
        row = {**max(mine, key=lambda row: row["bytes"])}
        row.update({"accuracy": worst["accuracy"], "acc_loss_points": worst["acc_loss_points"],
                    "encode_ms": max(r["encode_ms"] for r in mine), "decode_ms": max(r["decode_ms"] for r in mine),
                    "mean_acc_loss_points": float(np.mean([r["acc_loss_points"] for r in mine]))})  # fmt: skip
        rows.append(row)
    return rows


def run_downlink_bench(student: MLLM, teacher: MLLM, config: DownlinkBenchConfig, progress: bool = True) -> dict:
    """The whole benchmark; returns the JSON report. ``student`` is modified (LoRA added, adapted on the first
    domain); the other domains adapt copies of it taken before."""
    from cdcca.dwc import CODECS

    codecs = config.codecs or tuple(CODECS)
    pristine = copy.deepcopy(student) if len(config.domains) > 1 else None
    cases = []
    for position, domain in enumerate(config.domains):
        model = student if position == 0 else copy.deepcopy(pristine)
        cases.append(_run_case(model, teacher, config, domain, codecs, progress))
    first = cases[0]
    swap = hot_swap_run(student, first["base"], first["delta"], config, progress)
    rows = _worst_case(cases)
    # One answer of a domain's test split moves its accuracy by 100 / test_images points (0.29 at 347): a single
    # case cannot resolve 0.5 points, so the default is chosen on the loss pooled over the cases (the mean, as the
    # splits are equally large) and the worst case is reported beside it.
    within = [r for r in rows if r["mean_acc_loss_points"] <= config.max_loss_points]
    default = min(within or rows, key=lambda r: r["bits_per_param"])
    nf4 = next((r for r in rows if r["codec"] == "nf4"), None)
    if within:
        why = (f"fewest bits per trainable parameter ({default['bits_per_param']:.2f}) among the codecs whose accuracy "
               f"loss pooled over {len(cases)} domains is at most {config.max_loss_points} points "
               f"({default['mean_acc_loss_points']:.2f}; worst domain {default['acc_loss_points']:.2f}, one answer = "
               f"{100 / config.test_images:.2f}); signed hot-swaps failed {swap['failed_answers']} answers")
    else:
        why = f"no codec loses at most {config.max_loss_points} points pooled over the cases; this one is the smallest"
    summary = {
        "default_codec": default["codec"], "why": why, "best_codec": default["codec"],
        "bits_per_param": default["bits_per_param"], "acc_loss_points": default["mean_acc_loss_points"],
        "worst_case_acc_loss_points": default["acc_loss_points"], "answer_points": 100 / config.test_images,
        "meets_target": bool(within) and default["bits_per_param"] <= 0.5 and swap["failed_answers"] == 0,
        "nf4_bits_per_param": nf4["bits_per_param"] if nf4 else None,
        "p99_swap_ratio": swap["p99_ms_with_swaps"] / swap["p99_ms_without_swaps"],
        "failed_answers": swap["failed_answers"], "accuracy_before": first["accuracy_before"],
        "accuracy_uncompressed": first["accuracy_uncompressed"],
    }  # fmt: skip
    run = {"domain": "+".join(config.domains), "domains": list(config.domains), "stream_images": config.stream_images,
           "test_images": config.test_images, "steps": config.steps, "lr": config.lr,
           "threads": torch.get_num_threads()}  # fmt: skip
    report = {"config": run, "round": first["round"], "codecs": rows, "hot_swap": swap, "summary": summary,
              "cases": [{k: v for k, v in case.items() if k not in ("base", "delta", "delta_rms")} for case in cases]}
    if config.scale:
        from cdcca.benchmarks.scale import run_scale_projection

        report["scale"] = run_scale_projection(first["delta"], codecs, progress=progress)
    return report


def hot_swap_run(student: MLLM, base: dict, delta: dict, config: DownlinkBenchConfig, progress: bool = True) -> dict:
    """Answer latency without and with deltas arriving every ``swap_every`` answers (delivered by a thread)."""
    import tempfile

    from cdcca.edge.adapter_slot import APPLIED, AdapterSlot
    from cdcca.envelope import Signer, TrustStore, VersionChain, generate_key

    _load_params(student, base)
    samples = load_domain(config.domains[0], "test", limit=max(1, config.swap_answers // 3))
    with tempfile.TemporaryDirectory() as keys_dir:
        private, public = generate_key(keys_dir, "bench")
        signer, trust = Signer.load(private), TrustStore()
        trust.add("bench", public.read_text())
    slot = AdapterSlot(student, "bench-robot", trust)
    chain = VersionChain("bench-robot", slot.base)
    # alternate between the adapted and the base adapter so every swap really changes the weights
    targets = [{k: base[k] + delta[k] for k in base}, {k: v.clone() for k, v in base.items()}]
    messages = []
    for version in range(1, config.swap_answers // config.swap_every + 1):
        messages.append(chain.make_delta(targets[version % 2], "fp16", signer))
        chain.record_applied(version)  # built ahead, applied in order: each is incremental on the previous
    latencies: dict[str, list[float]] = {"without": [], "with": []}
    failures, statuses, swap_us = 0, [], []
    queue, arrived, stop = list(messages), threading.Event(), threading.Event()

    def deliver() -> None:  # the robot's subscriber thread: applies each delta as it arrives
        while not stop.is_set():
            if arrived.wait(timeout=0.05) and queue:
                arrived.clear()
                statuses.append(slot.receive(queue.pop(0)).state)
                swap_us.append(slot.counters.last_swap_us)

    def answer(sample) -> float:
        nonlocal failures
        started = time.perf_counter()
        try:
            with slot.model() as model:
                model.generate([sample.prompt], images=[sample.image])
        except Exception:  # noqa: BLE001 - counted: the benchmark's point is that this stays 0
            failures += 1
        return 1000 * (time.perf_counter() - started)

    for sample in samples[:20]:  # warm-up: first calls allocate caches
        answer(sample)
    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    block = 10 * config.swap_every  # alternate blocks with and without swaps, so drift hits both alike
    bar = progress_bar(range(2 * config.swap_answers), desc="hot-swap answers", disable=not progress)
    for i in bar:
        mode = "with" if (i // block) % 2 else "without"
        latencies[mode].append(answer(samples[i % len(samples)]))
        if mode == "with" and (i + 1) % config.swap_every == 0:
            arrived.set()
    stop.set()
    thread.join()
    applied = sum(state == APPLIED for state in statuses)
    return {
        "answers_per_run": config.swap_answers, "swaps_applied": applied, "swaps_sent": len(messages),
        "p50_ms_without_swaps": float(np.percentile(latencies["without"], 50)),
        "p99_ms_without_swaps": float(np.percentile(latencies["without"], 99)),
        "p50_ms_with_swaps": float(np.percentile(latencies["with"], 50)),
        "p99_ms_with_swaps": float(np.percentile(latencies["with"], 99)),
        "swap_us_p50": float(np.percentile(swap_us, 50)) if swap_us else None,
        "apply_ms_last": slot.counters.last_apply_ms, "failed_answers": failures,
    }  # fmt: skip


def plot_downlink(report: dict, path) -> None:
    """Bits per parameter (bars, worst case) and each domain's accuracy loss against its uncompressed Δ (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["codecs"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [r["codec"] for r in rows]
    bars = ax.bar(names, [r["bits_per_param"] for r in rows], color="tab:blue", alpha=0.8)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel("bits per trainable parameter")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    twin = ax.twinx()
    cases = report.get("cases") or [{"domain": report["config"]["domain"], "codecs": rows}]
    for offset, (case, marker) in enumerate(zip(cases, "os^vD")):
        positions = np.arange(len(names)) + 0.12 * (offset - (len(cases) - 1) / 2)
        twin.plot(positions, [r["acc_loss_points"] for r in case["codecs"]], marker, markersize=5,
                  label=f"loss on {case['domain']}")  # fmt: skip
    twin.axhline(0.5, color="tab:red", linestyle="--", linewidth=1, label="0.5-point target")
    twin.axhline(0.0, color="tab:gray", linestyle=":", linewidth=1)
    twin.set_ylabel("accuracy loss vs uncompressed Δ (points)")
    twin.legend(loc="upper center", fontsize=7)
    ax.set_title(f"DWC codecs, one round on each of {report['config']['domain']}; default "
                 f"{report['summary'].get('default_codec', report['summary'].get('best_codec'))}", fontsize=9)
    save_figure(fig, path)
