"""Paper-scale projections: the students' trainable sets come from their configs (meta device), the synthetic
deltas follow the tiny run's per-kind statistics, and every codec's row adds up."""

from __future__ import annotations

import math

import pytest
import torch

from cdcca.benchmarks.scale import STUDENTS, delta_statistics, project_codecs, synthetic_delta, tensor_kind


@pytest.mark.parametrize("name, kind", [
    ("qformer.encoder.layer.0.crossattention.attention.query.lora_A.default.weight", "lora_A"),
    ("language_model.model.decoder.layers.1.self_attn.v_proj.lora_B.default.weight", "lora_B"),
    ("qformer.encoder.layer.1.output_query.LayerNorm.weight", "norm_weight"),
    ("language_model.model.decoder.final_layer_norm.bias", "norm_bias"),
    ("language_projection.bias", "bias"),
    ("query_tokens", "tokens"),
    ("llama.layers.31.adaption_prompt", "tokens"),
])  # fmt: skip
def test_tensor_kind(name, kind):
    assert tensor_kind(name) == kind


def test_students_are_built_from_their_configs_without_weights():
    paper = STUDENTS["paper-llama-adapter-7b"]()
    blip2 = STUDENTS["blip2-opt-2.7b"]()

    assert sum(math.prod(shape) for shape in paper.values()) == 1_643_038  # the paper's "about 1.65 M"
    assert paper["llama.layers.2.adaption_prompt"] == (10, 4096) and "llama.layers.1.adaption_prompt" not in paper
    assert not any(name.startswith("qformer.encoder.layer.6.") for name in paper)  # 6 Q-Former layers
    assert sum(math.prod(shape) for shape in blip2.values()) == 7_730_176  # 4 488 192 at rank 8, before stop 32
    assert blip2["language_model.model.decoder.layers.31.self_attn.q_proj.lora_A.default.weight"] == (16, 2560)


def test_synthetic_delta_follows_the_measured_statistics_robustly():
    tiny = {"a.lora_A": torch.full((8, 16), 0.1), "b.lora_A": torch.full((8, 16), 0.1),
            "c.lora_A": torch.full((8, 16), 0.1), "k.bias": torch.full((4,), 1e-7), "v.bias": torch.full((4,), 0.02),
            "w.bias": torch.full((4,), 0.02), "x.bias": torch.full((4,), 0.02)}  # fmt: skip
    stats = delta_statistics(tiny)

    assert stats["lora_A"]["rms"] == pytest.approx(0.1) and stats["lora_A"]["log_spread"] == pytest.approx(0.0)
    assert stats["bias"]["rms"] == pytest.approx(0.02)  # the nearly untouched key bias does not move the median
    delta = synthetic_delta({"big.bias": (10000,), "big.lora_A": (8, 4096)}, stats)
    assert float(delta["big.lora_A"].pow(2).mean().sqrt()) == pytest.approx(0.1, rel=0.05)
    assert float(delta["big.bias"].pow(2).mean().sqrt()) <= 0.02 * math.exp(2 * stats["bias"]["log_spread"]) * 1.05


def test_projection_rows_add_up():
    delta = {"t.lora_B": torch.randn(256, 8) * 0.01, "t.bias": torch.randn(256) * 0.01}

    rows = {row["codec"]: row for row in project_codecs(delta, ("fp16", "ecsq"))}

    for row in rows.values():
        assert row["params"] == 2304
        assert row["bits_per_param"] == pytest.approx(8 * row["bytes"] / 2304)
        assert row["s_at_10mbps"] == pytest.approx(10 * row["s_at_100mbps"]) == pytest.approx(8 * row["bytes"] / 1e7)
        assert row["encode_s"] > 0 and row["decode_s"] > 0 and row["apply_s"] > 0
    assert rows["ecsq"]["bytes"] < rows["fp16"]["bytes"] / 4
