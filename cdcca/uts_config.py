"""UTS settings and the wire packing of kept tokens, without torch (issue 19: a robot that runs only ONNX Runtime).

What both UTS implementations share, the torch one (:mod:`cdcca.uts`, which re-exports every name here) and the
ONNX Runtime one (:mod:`cdcca.edge.onnx_uts`): :class:`UTSConfig` (the settings of Sec. 3.2 of Wang et al., CVPR
2024, Eq. 2-4) and :func:`pack_tokens`, which puts one frame's kept visual tokens into a ``cdcca_msgs/UtsTokens``
message with every prompt about the frame that passed stage 1 (:class:`FramePrompt`; the tokens travel once), int8
with a per-token symmetric scale (default) or fp16, with their indices and variances. Arrays may be numpy arrays or
torch tensors; torch is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from cdcca import wire
from cdcca.errors import CdccaError

ENCODINGS = ("int8", "fp16")
# Stage-1 ties (Eq. 2 rankings and the threshold): two engines compute a sample's mean answer-token entropy with
# different float32 rounding (torch eager vs ONNX Runtime: up to ~1e-6 nats apart on the tiny student, measured over
# 200 test frames), while two distinct samples can sit 4e-7 nats apart. Entropies closer than this tolerance count
# as equal, so the torch and the ORT robot make the same decision unless a gap lands within ~1e-6 of the tolerance
# itself. 5e-6 nats is 5x the largest engine gap seen. No relative part: 1e-5 + 1e-5 relative (5.8e-5 at 4.8 nats)
# tied every sample of a barely trained student (the test preset's entropies spread over only 4.5e-4 nats), so
# stage 1 kept everything.
ENTROPY_TIE_ATOL = 5e-6
ENTROPY_TIE_RTOL = 0.0
# Stage 2's estimate of a token's uncertainty from the M passes: ``mean`` takes their sample variance (Eq. 3 as
# written, the default), ``deterministic`` averages the passes' squared deviation from the dropout-free output (the
# visual tokens the robot answered with, already computed). The dropout-free output stands in for the passes' mean,
# so M passes give M degrees of freedom instead of M - 1: 7 passes rank tokens as well as 8 do with ``mean``, at 7/8
# of stage 2's cost (bench/README.md, "The token stage's estimate").
MC_CENTRES = ("deterministic", "mean")
UPLOAD_PROMPTS = ("uncertain", "frame")  # UTSConfig.upload_prompts


def entropy_tolerance(value: float) -> float:
    """How far above ``value`` (nats) another entropy must be to count as larger: :data:`ENTROPY_TIE_ATOL` plus
    :data:`ENTROPY_TIE_RTOL` of ``|value|``."""
    return ENTROPY_TIE_ATOL + ENTROPY_TIE_RTOL * abs(value)


def above(value: float, reference: float) -> bool:
    """``value`` > ``reference`` by more than the tie tolerance of ``reference`` (stage-1 threshold mode)."""
    return value > reference + entropy_tolerance(reference)


def window_rank(history: Any, value: float) -> int:
    """How many entropies in ``history`` (the sliding window) are larger than ``value`` by more than the tie
    tolerance: the rank ``UTSConfig.sample_fraction`` is compared with in ``top_fraction`` mode."""
    return int((np.asarray(history, np.float64) > value + entropy_tolerance(value)).sum())


@dataclass
class UTSConfig:
    """Settings of uncertainty-guided token sampling.

    Args:
        sample_mode: ``threshold`` (entropy > ``entropy_threshold``) or ``top_fraction`` (entropy among the top
            ``sample_fraction`` of the last ``window`` answers).
        entropy_threshold: stage-1 threshold on the mean answer-token entropy, nats.
        sample_fraction: stage-1 fraction of samples kept in ``top_fraction`` mode.
        window: number of recent entropies in the sliding window (of each prompt kind).
        group_words: prompts sharing their first ``group_words`` words share a window (0: one window for all).
        mc_passes: M, stochastic passes of stage 2 (batched into one forward).
        mc_center: what the passes' spread is measured around: ``mean``, their own mean (the sample variance of
            Eq. 3), or ``deterministic``, the dropout-free output (mean over channels of the
            passes' mean squared deviation from it). The two rank tokens alike (99 % of kept tokens shared at 128
            passes); at equal M the second is less noisy, as it spends no degree of freedom on the mean.
        mc_dropout: attention-dropout rate inside the encoder during the passes.
        mc_layers: how many final encoder layers run stochastically (the earlier ones run once).
        token_mode: ``ratio`` (keep the top ``token_keep_ratio``) or ``threshold`` (variance > ``token_threshold``).
        token_keep_ratio: stage-2 fraction of visual tokens kept in ``ratio`` mode.
        token_threshold: β of Eq. 4 in ``threshold`` mode.
        encoding: ``int8`` (per-token symmetric scale) or ``fp16`` for the kept tokens on the wire.
        seed: seed of the dropout masks, so scoring is reproducible.
        upload_prompts: which prompts of a frame that goes up ride along with its tokens: ``uncertain``, those that
            passed stage 1, or ``frame``, every prompt of the batch about that frame (the tokens travel anyway, so a
            confident prompt costs only its text). ``frame`` trained on 40 % more samples of the digits-shift
            stream and was 0.3-0.4 points worse on the visual means, with a worst source drop of 2.31 on the
            held-out shifts (``bench/README.md``); ``uncertain`` is the default.
    """

    sample_mode: str = "top_fraction"
    entropy_threshold: float = 0.5
    sample_fraction: float = 0.5
    window: int = 50
    group_words: int = 3
    mc_passes: int = 8
    mc_center: str = "mean"
    mc_dropout: float = 0.1
    mc_layers: int = 1
    token_mode: str = "ratio"
    token_keep_ratio: float = 0.5
    token_threshold: float = 0.0
    encoding: str = "int8"
    seed: int = 0
    upload_prompts: str = "uncertain"

    def __post_init__(self) -> None:
        if self.sample_mode not in ("threshold", "top_fraction"):
            raise ValueError(f"UTSConfig.sample_mode must be 'threshold' or 'top_fraction', got {self.sample_mode!r}")
        if self.token_mode not in ("ratio", "threshold"):
            raise ValueError(f"UTSConfig.token_mode must be 'ratio' or 'threshold', got {self.token_mode!r}")
        if self.mc_center not in MC_CENTRES:
            raise ValueError(f"UTSConfig.mc_center must be one of {MC_CENTRES}, got {self.mc_center!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"UTSConfig.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.upload_prompts not in UPLOAD_PROMPTS:
            raise ValueError(f"UTSConfig.upload_prompts must be one of {UPLOAD_PROMPTS}, got {self.upload_prompts!r}")
        for name in ("sample_fraction", "token_keep_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"UTSConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.mc_dropout < 1.0:
            raise ValueError(f"UTSConfig.mc_dropout must be in (0, 1), got {self.mc_dropout}")
        if self.group_words < 0:
            raise ValueError(f"UTSConfig.group_words must be >= 0, got {self.group_words}")
        for name in ("window", "mc_passes", "mc_layers"):
            if getattr(self, name) < (2 if name == "mc_passes" else 1):
                raise ValueError(f"UTSConfig.{name} is too small: {getattr(self, name)}")


class UplinkError(CdccaError, ValueError):
    """A ``UtsTokens`` message that decodes as CDR but cannot be used: inconsistent (sizes, indices, encoding)
    or beyond what the receiver's model takes. ``reason`` is a short code a receiver counts rejections by:
    ``inconsistent``, ``encoding``, ``not_finite``, ``token_grid``, ``token_dim`` or ``oversized`` (and the
    cloud's own, see ``cloud_trainer.admission``)."""

    def __init__(self, message: str, reason: str = "inconsistent") -> None:
        super().__init__(message)
        self.reason = reason


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of a numpy array, a sequence or a CPU torch tensor (without importing torch)."""
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


class FramePrompt(NamedTuple):
    """One prompt asked about a frame, as a ``UtsTokens`` message carries it (its first or one of ``more_*``)."""

    sample_id: str
    prompt: str
    student_answer: str
    sample_entropy: float


def pack_tokens(
    tokens: Any, keep: Any, variance: Any, *, robot_id: str, sample_id: str, adapter_version: int, prompt: str,
    student_answer: str, sample_entropy: float, encoding: str = "int8", stamp_ns: int = 0, frame_id: str = "",
    more: Sequence[FramePrompt] = (),
):  # fmt: skip
    """One frame's kept visual tokens as a ``UtsTokens`` message, for one sample and the ``more`` samples asked
    about the same frame (their tokens travel once).

    Args:
        tokens: (N, D) visual tokens of the frame.
        keep: (N,) which tokens to send.
        variance: (N,) their MC-dropout variance.
        more: further prompts about the frame that passed stage 1 with this one.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    tokens = as_numpy(tokens).astype(np.float32, copy=False)  # (N, D)
    indices = np.flatnonzero(as_numpy(keep).astype(bool, copy=False))  # (K,)
    kept = tokens[indices]  # (K, D)
    if encoding == "int8":
        scales = np.abs(kept).max(axis=1) / 127.0  # (K,) symmetric per-token scale
        scales[scales == 0] = 1.0
        quantized = np.clip(np.rint(kept / scales[:, None]), -127, 127).astype(np.int8)
        data, scales, code = quantized.view(np.uint8).reshape(-1), scales.astype(np.float32), 0
    else:
        largest = float(np.abs(kept).max()) if kept.size else 0.0
        if not largest <= np.finfo(np.float16).max:  # float16 would make it inf, which the cloud refuses
            raise ValueError(f"sample {sample_id!r}: a token value of {largest:.3g} does not fit the fp16 encoding "
                             "(at most 65504); the int8 encoding scales each token and takes it")  # fmt: skip
        data, scales, code = kept.astype("<f2").view(np.uint8).reshape(-1), np.zeros(0, np.float32), 1
    more = [FramePrompt(*m) for m in more]
    return wire.new(
        wire.UTS_TOKENS, header=wire.header(stamp_ns, frame_id), robot_id=robot_id, sample_id=sample_id,
        adapter_version=adapter_version, prompt=prompt, student_answer=student_answer,
        sample_entropy=sample_entropy, num_tokens=tokens.shape[0], token_dim=tokens.shape[1],
        token_indices=indices.astype(np.uint16), token_variance=as_numpy(variance)[indices].astype(np.float32),
        encoding=code, scales=scales, token_data=data, more_sample_ids=[m.sample_id for m in more],
        more_prompts=[m.prompt for m in more], more_student_answers=[m.student_answer for m in more],
        more_sample_entropies=np.asarray([m.sample_entropy for m in more], dtype=np.float32),
    )  # fmt: skip


def pack_frame(tokens: Any, keep: Any, variance: Any, prompts: Sequence[FramePrompt], **fields: Any):
    """:func:`pack_tokens` for one frame and the prompts about it (the first in the message's own fields, the rest
    in ``more_*``); ``fields``: ``robot_id``, ``adapter_version``, ``encoding``, ``stamp_ns``, ``frame_id``."""
    first, *more = prompts
    return pack_tokens(tokens, keep, variance, sample_id=first.sample_id, prompt=first.prompt,
                       student_answer=first.student_answer, sample_entropy=first.sample_entropy, more=more,
                       **fields)  # fmt: skip


MAX_FRAME_PROMPTS = 64  # the most prompts one UtsTokens carries (the cloud refuses more); more go in another


def uploaded(keep: Sequence[bool], frames: Sequence[Any], upload_prompts: str = "uncertain") -> list[int]:
    """Indices of the samples of a batch that go up: those stage 1 ``keep`` s, or (``upload_prompts="frame"``)
    every sample about a frame (``frames[i]``, as for :func:`by_frame`) that one of them is about."""
    kept = [i for i, k in enumerate(keep) if k]
    if upload_prompts == "uncertain":
        return kept
    hot = {frames[i] for i in kept}
    return [i for i in range(len(keep)) if frames[i] in hot]


def by_frame(indices: Sequence[int], frames: Sequence[Any], limit: int = MAX_FRAME_PROMPTS) -> list[list[int]]:
    """``indices`` grouped by their frame (``frames[i]``: any hashable key, e.g. ``id()`` of an image array the caller
    holds), each group in the order given and the groups in the order of their first index, at most ``limit`` per
    group (a frame with more is split): one ``UtsTokens`` per group."""
    groups: dict[Any, list[int]] = {}
    for i in indices:
        groups.setdefault(frames[i], []).append(int(i))
    return [group[start : start + limit] for group in groups.values() for start in range(0, len(group), limit)]


def frame_prompts(msg: Any) -> list[FramePrompt]:
    """Every prompt a ``UtsTokens`` message carries, its own first; :class:`UplinkError` if the ``more_*`` arrays
    are not aligned."""
    sizes = {len(msg.more_sample_ids), len(msg.more_prompts), len(msg.more_student_answers),
             len(msg.more_sample_entropies)}  # fmt: skip
    if len(sizes) != 1:
        raise UplinkError(f"sample {msg.sample_id[:64]!r}: more_sample_ids, more_prompts, more_student_answers and "
                          f"more_sample_entropies must be aligned, got lengths {sorted(sizes)}")  # fmt: skip
    first = FramePrompt(msg.sample_id, msg.prompt, msg.student_answer, float(msg.sample_entropy))
    return [first, *(FramePrompt(*m) for m in zip(msg.more_sample_ids, msg.more_prompts, msg.more_student_answers,
                                                   (float(e) for e in msg.more_sample_entropies)))]  # fmt: skip
