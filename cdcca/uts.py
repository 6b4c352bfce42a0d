"""UTS: uncertainty-guided token sampling on the device (Wang et al., CVPR 2024, Sec. 3.2, Eq. 2-4).

Only what the student is unsure about goes to the cloud, in two stages:

1. **Sample level (Eq. 2).** The mean token entropy of the student's greedy answer. A sample passes when
   its entropy exceeds a fixed threshold, or when it is in the top fraction of a sliding window of recent
   entropies (robust to a drifting entropy scale). The windows are kept per prompt kind (the prompt's first
   words), beyond the paper: an open caption request always has a higher answer entropy than a yes/no
   question, so one shared window would upload almost only captions, whatever the student is unsure of.
2. **Token level (Eq. 3-4).** Monte-Carlo dropout *inside the model*: the last ``mc_layers`` layers of the
   frozen vision encoder run ``M`` times with attention dropout active, batched as one forward of ``M``
   copies; a visual token's uncertainty is the variance of its representation across the passes, averaged
   over channels. Tokens above β, or the top ``token_keep_ratio`` of them, are kept (Eq. 4).

Why not dropout on the finished tokens: for a fixed input x, dropout with rate p has the closed-form
variance x^2 p/(1-p), so "uncertainty" would just rank tokens by magnitude. Dropout inside attention makes a
token's variance depend on how its attention to the other tokens is spread, which is what the paper means.

Kept tokens travel in a ``cdcca_msgs/UtsTokens`` message, int8 with a per-token scale (default) or fp16,
with their indices; the cloud rebuilds them with :func:`unpack_tokens` and attends only to those. Stage 2 depends
on the frame, not on the prompt, so it runs once per frame, and one message carries the frame's kept tokens with
every prompt about it that passed stage 1 (:func:`frame_prompts`; beyond the paper, which sends a sample's tokens
per sample).
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM
from cdcca.uts_config import (  # noqa: F401  (torch-free; re-exported)
    ENCODINGS,
    MAX_FRAME_PROMPTS,
    FramePrompt,
    UplinkError,
    UTSConfig,
    above,
    by_frame,
    frame_prompts,
    pack_frame,
    pack_tokens,
    uploaded,
    window_rank,
)  # fmt: skip


@dataclass
class UTSScores:
    """What UTS computed for a batch.

    Attributes:
        answers: the student's greedy answers.
        sample_entropy: (B,) mean answer-token entropy, nats (Eq. 2).
        keep_sample: (B,) stage-1 decision.
        visual_tokens: (B, N, D) deterministic visual tokens (what the student answered with).
        token_variance: (B, N) MC-dropout variance (Eq. 3) of each sample's frame; computed for the frames of kept
            samples only, NaN elsewhere.
        keep_tokens: (B, N) stage-2 decision of each sample's frame (all False for frames no kept sample is about).
        answer_seconds: wall time of answering the batch.
        scoring_seconds: wall time of UTS on top of answering (stage-2 passes and selection).
    """

    answers: list[str]
    sample_entropy: torch.Tensor
    keep_sample: torch.Tensor
    visual_tokens: torch.Tensor
    token_variance: torch.Tensor
    keep_tokens: torch.Tensor
    answer_seconds: float
    scoring_seconds: float


class UncertaintyTokenSampler:
    """Two-stage UTS for one student on one robot.

    Args:
        student: the device's student MLLM.
        config: thresholds, window and MC-dropout settings.
    """

    def __init__(self, student: MLLM, config: UTSConfig | None = None) -> None:
        self.student = student
        self.config = config or UTSConfig()
        layers = student.blip2.vision_model.encoder.layers
        if self.config.mc_layers > len(layers):
            raise ValueError(f"UTSConfig.mc_layers={self.config.mc_layers} exceeds the encoder's {len(layers)} layers")
        # a private copy of the tail, permanently in train mode with the MC rate, so scoring never flips the
        # shared encoder's mode while another thread answers with it
        self._mc_tail = copy.deepcopy(layers[len(layers) - self.config.mc_layers :]).train()
        for layer in self._mc_tail:
            layer.self_attn.attention_dropout = self.config.mc_dropout
            layer.requires_grad_(False)
        self._recent: dict[str, deque] = {}  # prompt kind -> its recent entropies
        self._generator = torch.Generator().manual_seed(self.config.seed)

    # ------------------------------------------------------------------------------------------ stages
    def _front(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder up to the stochastic tail: (B, 3, S, S) -> (B, N, D)."""
        vision = self.student.blip2.vision_model
        hidden = vision.embeddings(pixel_values)
        for layer in vision.encoder.layers[: len(vision.encoder.layers) - self.config.mc_layers]:
            hidden = layer(hidden)
        return hidden

    def _deterministic_tail(self, hidden: torch.Tensor) -> torch.Tensor:
        vision = self.student.blip2.vision_model
        layers = vision.encoder.layers
        for layer in layers[len(layers) - self.config.mc_layers :]:
            hidden = layer(hidden)
        return vision.post_layernorm(hidden)

    def token_variance(self, hidden_front: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) front activations -> (B, N) MC-dropout uncertainty of each output token (Eq. 3), averaged over
        channels: around the dropout-free output (``mc_center="deterministic"``; ``center``, (B, N, D), is that
        output if the caller has it, else it is computed here) or the sample variance (``"mean"``)."""
        batch, tokens, width = hidden_front.shape
        passes = self.config.mc_passes
        hidden = hidden_front.repeat_interleave(passes, dim=0)  # (B*M, N, D): the M passes as one forward
        state = torch.get_rng_state()
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=self._generator)))
        try:
            for layer in self._mc_tail:
                hidden = layer(hidden)
        finally:
            torch.set_rng_state(state)
        outputs = self.student.blip2.vision_model.post_layernorm(hidden).view(batch, passes, tokens, width)
        if self.config.mc_center == "mean":
            return outputs.var(dim=1).mean(dim=-1)  # (B, N)
        if center is None:
            center = self._deterministic_tail(hidden_front)
        return (outputs - center.unsqueeze(1)).square().mean(dim=(1, 3))  # (B, N)

    def prompt_kind(self, prompt: str) -> str:
        """The window a prompt's entropy is ranked in: its first ``group_words`` words."""
        return " ".join(prompt.lower().split()[: self.config.group_words])

    def keep_samples(self, sample_entropy: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Stage 1 on a batch of entropies (updates the sliding windows); ``prompts`` picks each one's window.

        Entropies within :func:`cdcca.uts_config.entropy_tolerance` count as tied, the rule the ONNX robot applies
        too (:meth:`cdcca.edge.onnx_uts.OnnxTokenSampler.keep_samples`), so both engines keep the same samples."""
        keep = torch.zeros(len(sample_entropy), dtype=torch.bool)
        for i, entropy in enumerate(torch.as_tensor(sample_entropy).float().tolist()):
            if self.config.sample_mode == "threshold":
                keep[i] = above(entropy, self.config.entropy_threshold)
            else:
                kind = self.prompt_kind(prompts[i]) if prompts is not None else ""
                recent = self._recent.setdefault(kind, deque(maxlen=self.config.window))
                recent.append(entropy)
                rank = window_rank(recent, entropy)  # samples in the window more uncertain than this one
                keep[i] = bool(rank < max(1, int(np.ceil(self.config.sample_fraction * len(recent)))))
        return keep

    def keep_tokens(self, variance: torch.Tensor) -> torch.Tensor:
        """Stage 2 (Eq. 4) on (B, N) variances -> (B, N) boolean mask."""
        if self.config.token_mode == "threshold":
            return variance > self.config.token_threshold
        count = max(1, int(round(self.config.token_keep_ratio * variance.shape[1])))
        top = variance.topk(count, dim=1).indices
        return torch.zeros_like(variance, dtype=torch.bool).scatter_(1, top, True)

    @torch.inference_mode()
    def stage_two(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2 alone on preprocessed frames: (B, N) MC-dropout variance and (B, N) kept-token mask."""
        variance = self.token_variance(self._front(pixel_values))
        return variance, self.keep_tokens(variance)

    # ----------------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def score(self, batch: Sequence[Sample]) -> UTSScores:
        """Answer the batch with the student and run both UTS stages on it.

        Stage 2 runs once per frame: samples that share an image (the same array, or the same file) get the
        same token variance and kept tokens, and :meth:`select` sends that frame's tokens once."""
        self.student.eval()
        started = time.perf_counter()
        pixels = self.student.preprocess([s.load_image() for s in batch])
        front = self._front(pixels)
        visual_tokens = self._deterministic_tail(front)  # (B, N, D)
        generation = self.student.generate([s.prompt for s in batch], visual_tokens=visual_tokens)
        answered = time.perf_counter()
        entropy = generation.sample_entropy.cpu()
        keep_sample = self.keep_samples(entropy, [s.prompt for s in batch])
        variance = torch.full(visual_tokens.shape[:2], float("nan"))
        keep_tokens = torch.zeros(visual_tokens.shape[:2], dtype=torch.bool)
        if keep_sample.any():
            keys = frame_keys(batch)
            groups = by_frame(keep_sample.nonzero().squeeze(1).tolist(), keys, limit=len(batch))
            first = torch.tensor([group[0] for group in groups])
            scored = self.token_variance(front[first], visual_tokens[first]).cpu()
            kept = self.keep_tokens(scored)
            row_of = {keys[group[0]]: row for row, group in enumerate(groups)}
            for i, key in enumerate(keys):  # every sample about a scored frame, kept or not
                if key in row_of:
                    variance[i], keep_tokens[i] = scored[row_of[key]], kept[row_of[key]]
        return UTSScores(
            answers=generation.texts, sample_entropy=entropy, keep_sample=keep_sample,
            visual_tokens=visual_tokens.cpu(), token_variance=variance, keep_tokens=keep_tokens,
            answer_seconds=answered - started, scoring_seconds=time.perf_counter() - answered,
        )  # fmt: skip

    def select(
        self, batch: Sequence[Sample], robot_id: str = "robot", adapter_version: int = 0, stamp_ns: int | None = None
    ) -> list:
        """``UtsTokens`` messages for the samples of ``batch`` that pass both stages, one per frame."""
        scores = self.score(batch)
        stamp_ns = time.time_ns() if stamp_ns is None else stamp_ns
        messages = []
        keys = frame_keys(batch)
        for group in by_frame(uploaded(scores.keep_sample.tolist(), keys, self.config.upload_prompts), keys):
            prompts = [FramePrompt(batch[i].sample_id, batch[i].prompt, scores.answers[i],
                                   float(scores.sample_entropy[i])) for i in group]  # fmt: skip
            i = group[0]
            messages.append(pack_frame(scores.visual_tokens[i], scores.keep_tokens[i], scores.token_variance[i],
                                       prompts, robot_id=robot_id, adapter_version=adapter_version,
                                       encoding=self.config.encoding, stamp_ns=stamp_ns))  # fmt: skip
        return messages


def frame_keys(batch: Sequence[Sample]) -> list:
    """What identifies each sample's frame: its image file, or the identity of its in-memory image."""
    return [s.image_path if s.image_path is not None else id(s.image) for s in batch]


# ---------------------------------------------------------------------------------------- wire packing
MAX_TOKEN_VALUES = 1 << 24  # unpack_tokens' cap on num_tokens * token_dim without tighter bounds (64 MiB float32)


def unpack_tokens(msg, *, num_tokens: int | None = None, token_dim: int | None = None,
                  max_values: int = MAX_TOKEN_VALUES) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cloud side: a ``UtsTokens`` message -> (1, N, D) tokens (zeros where dropped) and (1, N) attention mask.

    Every size is checked before anything is allocated: against the receiver's bounds when given (the shared
    vision encoder's token grid ``num_tokens`` and width ``token_dim``: a sample of another grid cannot be
    batched with the others), and always against ``max_values`` values for N x D.

    Raises :class:`UplinkError` (with a ``reason``) if the message is inconsistent or out of bounds.
    """
    n, d = int(msg.num_tokens), int(msg.token_dim)
    name = f"sample {msg.sample_id[:64]!r}"
    if n <= 0 or d <= 0:
        raise UplinkError(f"{name}: num_tokens and token_dim must be positive, got {n} x {d}")
    if num_tokens is not None and n != num_tokens:
        raise UplinkError(f"{name}: {n} tokens, but the receiver's vision encoder emits {num_tokens}; the robot "
                          "and the cloud must run the same shared encoder", "token_grid")  # fmt: skip
    if token_dim is not None and d != token_dim:
        raise UplinkError(f"{name}: tokens of width {d}, but the receiver's vision encoder emits {token_dim}; the "
                          "robot and the cloud must run the same shared encoder", "token_dim")  # fmt: skip
    if n * d > max_values:
        raise UplinkError(f"{name}: {n} x {d} tokens exceed the receiver's cap of {max_values} values", "oversized")
    k = len(msg.token_indices)
    if k > n:
        raise UplinkError(f"{name}: {k} token indices for {n} tokens")
    indices = np.asarray(msg.token_indices, dtype=np.int64)
    if k and (indices.max() >= n or np.any(np.diff(indices) <= 0)):
        raise UplinkError(f"{name}: token_indices must be strictly ascending and below {n}")
    if len(msg.token_variance) != k:
        raise UplinkError(f"{name}: {len(msg.token_variance)} variances for {k} tokens")
    data = np.asarray(msg.token_data, dtype=np.uint8)
    if msg.encoding == 0:
        if len(data) != k * d or len(msg.scales) != k:
            raise UplinkError(f"{name}: int8 payload needs {k * d} bytes and {k} scales, "
                              f"got {len(data)} bytes and {len(msg.scales)} scales")  # fmt: skip
        values = data.view(np.int8).reshape(k, d).astype(np.float32) * np.asarray(msg.scales, np.float32)[:, None]
    elif msg.encoding == 1:
        if len(data) != 2 * k * d:
            raise UplinkError(f"{name}: fp16 payload needs {2 * k * d} bytes, got {len(data)}")
        values = data.view("<f2").reshape(k, d).astype(np.float32)
    else:
        raise UplinkError(f"{name}: unknown token encoding {msg.encoding} (0 = int8, 1 = fp16)", "encoding")
    if not np.isfinite(values).all():
        raise UplinkError(f"{name}: token values are not finite", "not_finite")
    tokens = torch.zeros(1, n, d)
    mask = torch.zeros(1, n, dtype=torch.long)
    tokens[0, indices] = torch.from_numpy(values)
    mask[0, indices] = 1
    return tokens, mask
