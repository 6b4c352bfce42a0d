"""The trainable set: what adaptation changes on the cloud and what DWC transmits to the robot.

As in the paper (Sec. 3.3): adapters where the visual tokens are read -- LoRA (via ``peft``) on the Q-Former's
cross-attention (its queries' projections and the cross-attention output) and on the query feed-forward
output -- and in the LM (LoRA on the attention), plus the Q-Former query tokens, the weights and biases of
normalisation layers, and the biases of linear layers. Everything else stays frozen, and the shared vision
encoder is never part of it, so visual tokens keep meaning the same thing on both sides.

Why the Q-Former adapters: under a visual shift the LM is not what is wrong; how the queries read the
shifted tokens is. With LoRA on the LM alone, only norms and biases could change that reading (measured in
``bench/README.md``).

Why rank 16 (since stop 32; 66 272 trainable values on the tiny student, 37 600 at rank 8): with the source
replay holding how source images are read (``AKDConfig.lambda_anchor_query``), rank 8 left the rounds short of
room. Over 3 seeds, rank 16 lifted the visual mean on all three streams the project measures (committed +0.35,
held-out +0.15, fresh +1.23) and the cloud's subspace rounds closed 0.67 of ``colour_inverted``'s gap instead of 0.46,
with every worst-seed source drop under 2 (``bench/README.md``). The price is the downlink: 1.76x the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from cdcca.models.mllm import MLLM

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the language model's attention projections and where the Q-Former reads the visual tokens.

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (update scaled by alpha / rank).
        dropout: dropout on the LoRA input path.
        target_modules: attention projections of the LM to adapt (OPT names).
        qformer_modules: Q-Former linears to adapt (suffixes of ``transformers``' BLIP-2 Q-Former names);
            empty leaves the Q-Former without LoRA, as before the Q-Former adapters existed.
        seed: seed of the LoRA A initialisation. Cloud and robot must start from the same θ_base (the
            paper's Eq. 8 adds the delta to it), so the random A matrices are seeded, not drawn freshly.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    qformer_modules: tuple[str, ...] = (
        "crossattention.attention.query",
        "crossattention.attention.value",
        "crossattention.output.dense",
        "output_query.dense",
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraSettings.target_modules must name at least one module")


def has_lora(model: MLLM) -> bool:
    return any("lora_" in name for name, _ in model.blip2.named_parameters())


def add_lora(model: MLLM, settings: LoraSettings = LoraSettings()) -> MLLM:
    """Inject LoRA adapters (B initialised to zero, so outputs are unchanged) into the LM attention and the
    Q-Former's reading of the visual tokens, in place."""
    if has_lora(model):
        raise ValueError("the model already carries LoRA adapters")
    towers = [(model.blip2.language_model, settings.target_modules), (model.blip2.qformer, settings.qformer_modules)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for tower, targets in towers:
            if targets:
                config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                    target_modules=list(targets), bias="none")  # fmt: skip
                inject_adapter_in_model(config, tower)
    return model


def _trainable_groups(model: MLLM) -> dict[str, tuple[nn.Parameter, str]]:
    """name -> (parameter, group) for the trainable set; group is query_tokens, lora, norms or biases."""
    selected: dict[str, tuple[nn.Parameter, str]] = {}
    for module_name, module in model.blip2.named_modules():
        if module_name == "vision_model" or module_name.startswith("vision_model."):
            continue
        prefix = f"{module_name}." if module_name else ""
        for param_name, param in module.named_parameters(recurse=False):
            name = prefix + param_name
            if name == "query_tokens":
                selected[name] = (param, "query_tokens")
            elif "lora_" in name:
                selected[name] = (param, "lora")
            elif isinstance(module, _NORMS):
                selected[name] = (param, "norms")
            elif isinstance(module, nn.Linear) and param_name == "bias":
                selected[name] = (param, "biases")
    return selected


GROUPS = ("query_tokens", "lora", "norms", "biases")


def trainable_parameters(model: MLLM, groups: tuple[str, ...] = GROUPS) -> dict[str, nn.Parameter]:
    """Named parameters of the trainable set (names relative to the BLIP-2 module), in module order;
    ``groups`` narrows it (e.g. ``("norms",)`` for TENT)."""
    return {name: param for name, (param, group) in _trainable_groups(model).items() if group in groups}


def freeze_all_but(model: MLLM, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on exactly ``params`` (the model's own); returns them."""
    chosen = {id(p) for p in params.values()}
    for param in model.blip2.parameters():
        param.requires_grad_(id(param) in chosen)
    return params


def freeze_all_but_trainable(model: MLLM) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on exactly the trainable set; returns it."""
    return freeze_all_but(model, trainable_parameters(model))


def count_parameters(model: MLLM) -> dict[str, int]:
    """Parameter counts: total, the shared vision encoder, the trainable set and each of its groups."""
    groups = {"query_tokens": 0, "lora": 0, "norms": 0, "biases": 0}
    for param, group in _trainable_groups(model).values():
        groups[group] += param.numel()
    return {
        "total": sum(p.numel() for p in model.blip2.parameters()),
        "vision_encoder": sum(p.numel() for p in model.blip2.vision_model.parameters()),
        "trainable": sum(groups.values()),
        **groups,
    }
