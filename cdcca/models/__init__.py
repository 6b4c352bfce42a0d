"""Models: BLIP-2 teacher/student presets, the MLLM wrapper, checkpoints and the trainable set."""

from cdcca.models.checkpoint import build_pair, load_mllm, save_mllm, share_vision_encoder
from cdcca.models.mllm import MLLM, Generation, ImageSpec
from cdcca.models.presets import PRESETS, Preset, TowerSizes, get_preset
from cdcca.models.trainable import (
    LoraSettings,
    add_lora,
    count_parameters,
    freeze_all_but_trainable,
    trainable_parameters,
)

__all__ = [
    "MLLM",
    "Generation",
    "ImageSpec",
    "PRESETS",
    "Preset",
    "TowerSizes",
    "get_preset",
    "build_pair",
    "load_mllm",
    "save_mllm",
    "share_vision_encoder",
    "LoraSettings",
    "add_lora",
    "count_parameters",
    "freeze_all_but_trainable",
    "trainable_parameters",
]
