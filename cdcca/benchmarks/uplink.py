"""``cdcca bench uplink``: what UTS saves on the robot -> cloud link, and what it costs on the robot.

For every frame of the digits-shift target stream (three prompts about each, answered as one batch), the bytes a
robot would send under six policies: the raw RGB frame, a JPEG (quality 90) of the frame, all visual tokens in
fp16, UTS stage 1 only (the frames with an uncertain prompt, all their tokens, fp16), UTS stages 1+2 with one
message per uncertain prompt (the frame's kept tokens repeated in each, as before frames were grouped), and UTS
stages 1+2 as the robot sends them (one message per frame: its kept tokens in int8 once, with every uncertain
prompt). Byte counts of the token policies are the sizes of the actual ``UtsTokens`` CDR messages. Frames are
sized as the robot's camera delivers them (RealSense D400 default colour profile, 640x480 RGB; the model resizes
them to its input) and, for reference, at the benchmark's native 24x24.

Compare the paper (Wang et al., CVPR 2024, Sec. 4.4): 65.54 KB of UTS uplink for 31.10 MB of raw frames.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cdcca import wire
from cdcca.data.digits_shift import TARGET_DOMAINS, load_domain
from cdcca.models.mllm import MLLM
from cdcca.report import progress_bar, save_figure
from cdcca.uts import FramePrompt, UncertaintyTokenSampler, UTSConfig, pack_frame


@dataclass
class UplinkBenchConfig:
    """Settings of the uplink benchmark.

    Args:
        images_per_domain: stream images per target domain (each asked one question per task).
        camera_width: width of the camera frame the robot captures, pixels.
        camera_height: height of the camera frame, pixels.
        jpeg_quality: quality of the JPEG baseline.
        uts: UTS settings.
    """

    images_per_domain: int = 80
    camera_width: int = 640
    camera_height: int = 480
    jpeg_quality: int = 90
    uts: UTSConfig | None = None

    def __post_init__(self) -> None:
        if self.images_per_domain < 1:
            raise ValueError(f"UplinkBenchConfig.images_per_domain must be >= 1, got {self.images_per_domain}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"UplinkBenchConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        self.uts = self.uts or UTSConfig()


def camera_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The benchmark image as a camera would deliver it: scaled to fill the frame height, centred, letterboxed."""
    side = height
    scaled = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
    background = tuple(int(v) for v in image[0, 0])
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = background
    left = (width - side) // 2
    frame[:, left : left + side] = scaled
    return frame


def jpeg_bytes(frame: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def run_uplink_bench(student: MLLM, config: UplinkBenchConfig, progress: bool = True) -> dict:
    """Stream the target domains through the student, each frame's prompts as one batch (as the robot answers the
    prompts waiting for its latest frame); returns the JSON report."""
    torch.manual_seed(0)
    sampler = UncertaintyTokenSampler(student, config.uts)
    samples = [s for d in TARGET_DOMAINS for s in load_domain(d, "stream", limit=config.images_per_domain)]
    by_key: dict[str, list] = {}  # frame key -> its samples, in stream order
    for sample in samples:
        by_key.setdefault(sample.sample_id.rsplit("/", 1)[0], []).append(sample)
    frames: dict[str, dict] = {}  # frame key -> per-policy bytes
    answer_seconds, scoring_seconds, uploaded_scoring = [], [], []
    kept_samples = kept_tokens = tokens_of_kept_frames = 0
    for frame_key, batch in progress_bar(by_key.items(), desc="bench uplink", disable=not progress):
        image = batch[0].image
        camera = camera_frame(image, config.camera_width, config.camera_height)
        bytes_ = frames[frame_key] = {
            "raw": camera.nbytes, "jpeg": jpeg_bytes(camera, config.jpeg_quality),
            "raw_native": image.nbytes, "jpeg_native": jpeg_bytes(image, config.jpeg_quality),
            "all_tokens_fp16": 0, "uts_stage1": 0, "uts_per_prompt": 0, "uts": 0,
        }  # fmt: skip
        scores = sampler.score(batch)
        answer_seconds.append(scores.answer_seconds / len(batch))  # per prompt
        scoring_seconds.append(scores.scoring_seconds / len(batch))
        tokens = scores.visual_tokens[0]  # (N, D): the frame's, shared by its prompts
        every = torch.ones(tokens.shape[0], dtype=torch.bool)
        asked = [FramePrompt(s.sample_id, s.prompt, scores.answers[i], float(scores.sample_entropy[i]))
                 for i, s in enumerate(batch)]  # fmt: skip

        def message(keep, variance, encoding, prompts):
            return len(wire.encode(pack_frame(tokens, keep, variance, prompts, encoding=encoding, robot_id="r1",
                                              adapter_version=0)))  # fmt: skip

        bytes_["all_tokens_fp16"] = message(every, torch.zeros(len(every)), "fp16", asked)  # without UTS
        kept = [asked[i] for i in scores.keep_sample.nonzero().squeeze(1).tolist()]
        if kept:
            first = int(scores.keep_sample.nonzero()[0])
            variance, keep = scores.token_variance[first], scores.keep_tokens[first]
            kept_samples += len(kept)
            tokens_of_kept_frames += tokens.shape[0]
            kept_tokens += int(keep.sum())
            uploaded_scoring.append(scores.scoring_seconds / scores.answer_seconds)
            bytes_["uts_stage1"] = message(every, variance, "fp16", kept)
            bytes_["uts"] = message(keep, variance, config.uts.encoding, kept)
            bytes_["uts_per_prompt"] = sum(message(keep, variance, config.uts.encoding, [p]) for p in kept)
    totals = {key: sum(f[key] for f in frames.values()) for key in next(iter(frames.values()))}
    n_frames = len(frames)
    rows = [
        {"policy": "raw RGB frame", "bytes_per_frame": totals["raw"] / n_frames,
         "native_24px": totals["raw_native"] / n_frames},
        {"policy": f"JPEG q{config.jpeg_quality} frame", "bytes_per_frame": totals["jpeg"] / n_frames,
         "native_24px": totals["jpeg_native"] / n_frames},
        {"policy": "all visual tokens fp16", "bytes_per_frame": totals["all_tokens_fp16"] / n_frames},
        {"policy": "UTS stage 1 (fp16)", "bytes_per_frame": totals["uts_stage1"] / n_frames},
        {"policy": f"UTS stage 1+2 ({config.uts.encoding}), tokens once per prompt",
         "bytes_per_frame": totals["uts_per_prompt"] / n_frames},
        {"policy": f"UTS stage 1+2 ({config.uts.encoding})", "bytes_per_frame": totals["uts"] / n_frames},
    ]  # fmt: skip
    for row in rows:
        row["vs_raw_%"] = 100.0 * row["bytes_per_frame"] / rows[0]["bytes_per_frame"]
    answer, scoring = float(np.mean(answer_seconds)), float(np.mean(scoring_seconds))
    summary = {
        "uts_over_raw": totals["uts"] / totals["raw"],
        "uts_over_jpeg": totals["uts"] / totals["jpeg"],
        "uts_over_raw_native_24px": totals["uts"] / totals["raw_native"],
        "uts_overhead_ratio": scoring / answer,
        "uts_overhead_ratio_uploaded_samples": float(np.mean(uploaded_scoring)) if uploaded_scoring else 0.0,
        "samples_kept_fraction": kept_samples / len(samples),
        "frames_uploaded_fraction": sum(1 for f in frames.values() if f["uts"]) / len(frames),
        "tokens_kept_fraction": kept_tokens / max(1, tokens_of_kept_frames),
        "uts_over_uts_per_prompt": totals["uts"] / max(1, totals["uts_per_prompt"]),
        "answer_ms_p50": 1000 * float(np.median(answer_seconds)),
        "scoring_ms_mean": 1000 * scoring,
    }
    run = {
        "images_per_domain": config.images_per_domain,
        "camera": f"{config.camera_width}x{config.camera_height}",
        "jpeg_quality": config.jpeg_quality,
        "uts": vars(config.uts),
        "domains": list(TARGET_DOMAINS),
        "frames": n_frames,
        "samples": len(samples),
        "threads": torch.get_num_threads(),
    }
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"config": run, "rows": rows, "totals_bytes": totals, "summary": summary, "measured_at": measured_at}


def plot_uplink(report: dict, path) -> None:
    """Bytes per frame of each policy on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    bars = ax.barh([r["policy"] for r in rows][::-1], [r["bytes_per_frame"] for r in rows][::-1], color="tab:blue")
    ax.bar_label(bars, labels=[f"{r['bytes_per_frame']:,.0f} B" for r in rows][::-1], padding=3, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=4 * max(r["bytes_per_frame"] for r in rows))
    ax.set_xlabel(f"bytes per frame (camera {report['config']['camera']}), log scale")
    ax.set_title("uplink per frame on the digits-shift target stream")
    save_figure(fig, path)
