"""Paper-scale projections of the downlink: every DWC codec on the trainable sets of real-size students.

Projections, not measurements of trained models: the trainable sets are built from the students' configs on
PyTorch's meta device (names and shapes only; nothing is downloaded or allocated), and the deltas are
synthetic, drawn per tensor with the RMS change that the tiny run measured for tensors of the same kind
(LoRA A, LoRA B, norm weights, norm biases, other biases, query tokens), spread log-normally as there.

Students:

- ``blip2-opt-2.7b``: BLIP-2 with OPT-2.7B (``transformers``' ``Blip2Config`` defaults: ViT-g, 12-layer
  Q-Former, 32 queries) and this project's trainable set (``cdcca.models.trainable``: LoRA, rank 16 since stop 32,
  on the LM's q/v and where the Q-Former reads the visual tokens, query tokens, norms, biases).
- ``paper-llama-adapter-7b``: the paper's student (Wang et al., CVPR 2024, Sec. 4.1): LLaMA-Adapter on a
  LLaMA-7B (Zhang et al., "LLaMA-Adapter", ICLR 2024: 10 prompt tokens in the top 30 of 32 layers, one
  zero-initialised gate per layer) behind a 6-layer Q-Former with this project's Q-Former trainable set at rank 8
  (``PAPER_LORA_RANK``), which puts it at the paper's reported 1.65 M trainable values, so its bytes compare with the
  paper's 0.791 MB.

Per codec: bytes, bits per parameter, transfer time at 10 and 100 Mb/s, encode and decode time (one CPU
thread as configured by the caller), and the robot-side apply time (Eq. 8, ``apply_delta``), beside the
paper's reported 0.791 MB and 0.013 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import torch

PAPER_MB = 0.791  # the paper's compressed delta (Sec. 4.4)
PAPER_SECONDS = 0.013  # the paper's reported transfer/update time for it
KINDS = ("lora_A", "lora_B", "norm_weight", "norm_bias", "bias", "tokens")
PAPER_LORA_RANK = 8  # the Q-Former LoRA rank that puts the paper's student at its reported 1.65 M values


def tensor_kind(name: str) -> str:
    """Which statistics class a trainable tensor belongs to (by its name)."""
    lowered = name.lower()
    if "lora_a" in lowered:
        return "lora_A"
    if "lora_b" in lowered:
        return "lora_B"
    if "query_tokens" in lowered or "adaption_prompt" in lowered:
        return "tokens"
    if "norm" in lowered:
        return "norm_weight" if lowered.endswith("weight") else "norm_bias"
    return "bias"


def delta_statistics(delta: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per kind: median RMS change and a robust spread of log RMS across tensors of that kind (interquartile
    range / 1.349, so that the few tensors a round leaves nearly untouched, e.g. key biases, do not dominate)."""
    by_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for name, tensor in delta.items():
        rms = float(tensor.float().pow(2).mean().sqrt())
        if rms > 0:
            by_kind[tensor_kind(name)].append(rms)
    fallback = [r for values in by_kind.values() for r in values] or [1e-3]
    stats = {}
    for kind, values in by_kind.items():
        values = values or fallback
        quartiles = np.percentile(np.log(values), [25, 75])
        stats[kind] = {"rms": float(np.median(values)), "log_spread": float((quartiles[1] - quartiles[0]) / 1.349),
                       "tensors": len(values)}  # fmt: skip
    return stats


def _blip2_opt_2_7b() -> dict[str, tuple[int, ...]]:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from cdcca.models.trainable import add_lora, trainable_parameters

    text = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                     word_embed_proj_dim=2560, vocab_size=50272)  # fmt: skip  # facebook/opt-2.7b's config
    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(Blip2Config(text_config=text.to_dict()))
    model = SimpleNamespace(blip2=blip2)  # the part of MLLM that the trainable-set helpers read
    add_lora(model)
    return {name: tuple(param.shape) for name, param in trainable_parameters(model).items()}


def _paper_student() -> dict[str, tuple[int, ...]]:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, OPTConfig

    from cdcca.models.trainable import LoraSettings, add_lora, trainable_parameters

    qformer = Blip2QFormerConfig(num_hidden_layers=6)  # the paper's student halves the teacher's 12 layers
    tiny_lm = OPTConfig(hidden_size=64, num_hidden_layers=1, ffn_dim=64, num_attention_heads=1,
                        word_embed_proj_dim=64, vocab_size=16)  # fmt: skip  # placeholder, its tensors are dropped
    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(Blip2Config(qformer_config=qformer.to_dict(),
                                                          text_config=tiny_lm.to_dict()))  # fmt: skip
    model = SimpleNamespace(blip2=blip2)
    add_lora(model, LoraSettings(rank=PAPER_LORA_RANK, alpha=2 * PAPER_LORA_RANK))
    shapes = {name: tuple(param.shape) for name, param in trainable_parameters(model).items()
              if name.startswith("qformer.") or name == "query_tokens"}  # fmt: skip
    hidden, layers, prompt_layers, prompt_length = 4096, 32, 30, 10  # LLaMA-7B, LLaMA-Adapter v1
    for layer in range(layers - prompt_layers, layers):
        shapes[f"llama.layers.{layer}.adaption_prompt"] = (prompt_length, hidden)
        shapes[f"llama.layers.{layer}.adaption_gate"] = (1,)
    shapes["language_projection.bias"] = (hidden,)
    return shapes


STUDENTS = {"blip2-opt-2.7b": _blip2_opt_2_7b, "paper-llama-adapter-7b": _paper_student}


def synthetic_delta(shapes: Mapping[str, tuple[int, ...]], stats: Mapping[str, Mapping[str, float]],
                    seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """A Gaussian Δ per tensor whose RMS is its kind's median times a log-normal spread clipped at two sigma
    (seeded)."""
    rng = np.random.default_rng(seed)
    delta = {}
    for name, shape in shapes.items():
        kind = stats[tensor_kind(name)]
        rms = kind["rms"] * math.exp(kind["log_spread"] * float(np.clip(rng.standard_normal(), -2, 2)))
        delta[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(rms))
    return delta


def project_codecs(delta: Mapping[str, torch.Tensor], codecs: tuple[str, ...], repeats: int = 1) -> list[dict]:
    """Bytes, transfer, encode/decode and robot-side apply time of each codec on ``delta`` (best of ``repeats``)."""
    from cdcca.dwc import apply_delta, get_codec

    reference = {name: tuple(t.shape) for name, t in delta.items()}
    num_params = sum(t.numel() for t in delta.values())
    base = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 0.02 for name, t in delta.items()}
    rows = []
    for name in codecs:
        codec = get_codec(name)
        encode_s = decode_s = apply_s = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            payload = codec.encode(delta)
            encode_s = min(encode_s, time.perf_counter() - started)
            started = time.perf_counter()
            decoded = codec.decode(payload, reference, strict=True)
            decode_s = min(decode_s, time.perf_counter() - started)
            started = time.perf_counter()
            apply_delta(base, decoded)
            apply_s = min(apply_s, time.perf_counter() - started)
        bits = 8 * len(payload)
        rows.append({
            "codec": name, "params": num_params, "bytes": len(payload), "mb": len(payload) / 1e6,
            "bits_per_param": bits / num_params, "s_at_10mbps": bits / 10e6, "s_at_100mbps": bits / 100e6,
            "encode_s": encode_s, "decode_s": decode_s, "apply_s": apply_s,
            "vs_paper_mb": len(payload) / 1e6 / PAPER_MB,
        })  # fmt: skip
    return rows


def run_scale_projection(tiny_delta: Mapping[str, torch.Tensor], codecs: tuple[str, ...],
                         students: tuple[str, ...] = tuple(STUDENTS), progress: bool = True) -> dict:  # fmt: skip
    """The ``scale`` section of the downlink report: statistics from ``tiny_delta``, one projection per student."""
    from cdcca.report import progress_bar

    stats = delta_statistics(tiny_delta)
    section = {"label": "projection: synthetic deltas with the tiny run's per-kind statistics, not trained models",
               "paper_mb": PAPER_MB, "paper_seconds": PAPER_SECONDS, "statistics": stats, "students": {}}  # fmt: skip
    for student in progress_bar(students, desc="scale projections", disable=not progress):
        shapes = STUDENTS[student]()
        delta = synthetic_delta(shapes, stats)
        section["students"][student] = {
            "tensors": len(shapes), "params": sum(math.prod(s) for s in shapes.values()),
            "codecs": project_codecs(delta, codecs),
        }  # fmt: skip
    return section
