"""Model presets: BLIP-2 teacher/student pairs built from config, small enough for a CPU.

The paper pairs a large teacher with a student whose Q-Former has half the layers (12 -> 6) and whose LM
is smaller; both share one frozen vision encoder so the visual tokens a robot computes mean the same thing
to both. The presets keep those ratios at toy scale: ``test`` for unit tests (well under 1 M parameters per
model), ``tiny`` for the embedded default (trains on two CPU cores in minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig


@dataclass(frozen=True)
class TowerSizes:
    """The part of a model that differs between teacher and student: Q-Former and language model.

    Args:
        qformer_layers: Q-Former layers (each with cross-attention to the visual tokens).
        qformer_hidden: Q-Former width.
        qformer_heads: Q-Former attention heads; must divide ``qformer_hidden``.
        num_query_tokens: learnable query tokens, i.e. soft visual prompt length seen by the LM.
        lm_hidden: OPT language model width.
        lm_layers: OPT decoder layers.
        lm_heads: OPT attention heads; must divide ``lm_hidden``.
    """

    qformer_layers: int
    qformer_hidden: int
    qformer_heads: int
    num_query_tokens: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"TowerSizes.{name} must be >= 1, got {getattr(self, name)}")
        if self.qformer_hidden % self.qformer_heads:
            raise ValueError(f"qformer_heads={self.qformer_heads} must divide qformer_hidden={self.qformer_hidden}")
        if self.lm_hidden % self.lm_heads:
            raise ValueError(f"lm_heads={self.lm_heads} must divide lm_hidden={self.lm_hidden}")


@dataclass(frozen=True)
class Preset:
    """A teacher/student pair sharing one vision encoder.

    Args:
        name: preset name (``test``, ``tiny``).
        image_size: side of the square input image in pixels.
        patch_size: ViT patch side; the encoder emits ``(image_size / patch_size)**2 + 1`` visual tokens.
        vision_hidden: width of the shared vision encoder.
        vision_layers: depth of the shared vision encoder.
        vision_heads: attention heads of the vision encoder.
        dropout: dropout inside Q-Former, LM and vision attention (MC-dropout in UTS relies on it).
        teacher: teacher Q-Former / LM sizes.
        student: student Q-Former / LM sizes; its Q-Former has half the teacher's layers.
    """

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    dropout: float
    teacher: TowerSizes
    student: TowerSizes

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.student.qformer_layers != max(1, self.teacher.qformer_layers // 2):
            raise ValueError(
                f"student.qformer_layers must be half of teacher.qformer_layers "
                f"({max(1, self.teacher.qformer_layers // 2)}), got {self.student.qformer_layers}"
            )

    def blip2_config(self, role: str, tokenizer) -> Blip2Config:
        """The ``transformers`` BLIP-2 config of the ``teacher`` or the ``student``."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        sizes: TowerSizes = getattr(self, role)
        vision = Blip2VisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=4 * self.vision_hidden,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            attention_dropout=self.dropout,
            initializer_range=0.02,  # the library default (1e-10) suits loading, not training from scratch
        )
        qformer = Blip2QFormerConfig(
            vocab_size=8,  # the Q-Former's own text embeddings are unused (no ITC/ITM stage here)
            hidden_size=sizes.qformer_hidden,
            num_hidden_layers=sizes.qformer_layers,
            num_attention_heads=sizes.qformer_heads,
            intermediate_size=4 * sizes.qformer_hidden,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=64,
            cross_attention_frequency=1,
            encoder_hidden_size=self.vision_hidden,
        )
        text = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.lm_hidden,
            word_embed_proj_dim=sizes.lm_hidden,
            num_hidden_layers=sizes.lm_layers,
            num_attention_heads=sizes.lm_heads,
            ffn_dim=4 * sizes.lm_hidden,
            max_position_embeddings=128,
            dropout=self.dropout,
            attention_dropout=self.dropout,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=sizes.num_query_tokens,
        )


PRESETS: dict[str, Preset] = {
    "test": Preset(
        name="test",
        image_size=24,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        dropout=0.1,
        teacher=TowerSizes(2, 32, 2, 4, 48, 2, 2),
        student=TowerSizes(1, 32, 2, 4, 32, 1, 2),
    ),
    "tiny": Preset(
        name="tiny",
        image_size=24,
        patch_size=4,
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        dropout=0.1,
        teacher=TowerSizes(4, 128, 4, 8, 192, 4, 4),
        student=TowerSizes(2, 128, 4, 8, 96, 2, 4),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error listing the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
