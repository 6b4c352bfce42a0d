"""UTS on ONNX Runtime and numpy: both stages of uncertainty-guided token sampling without torch (issue 19).

The same two stages as :mod:`cdcca.uts` (Wang et al., CVPR 2024, Sec. 3.2, Eq. 2-4), for a robot that runs the
ONNX export (:mod:`cdcca.edge.onnx_export`):

1. **Sample level (Eq. 2)**: :func:`sample_entropy` averages the entropies (:func:`token_entropy`) of the
   answer tokens, computed from the decoder graph's logits; :meth:`OnnxTokenSampler.keep_samples` keeps those
   above a threshold or in the top fraction of a sliding window per prompt kind, the decisions
   ``UncertaintyTokenSampler.keep_samples`` makes.
2. **Token level (Eq. 3-4)**: the export's ``uts.onnx`` runs the last ``mc_layers`` encoder layers M times as
   one batch, from the ``uts_front`` the encoder graph already computed while answering, with attention
   dropout as an input mask; the spread of each output token over the passes, averaged over channels, is its
   uncertainty: around the passes' mean (the sample variance, ``mc_center="mean"``, the default) or around the
   dropout-free ``visual_tokens`` the robot answered with (``"deterministic"``). Tokens above β, or the top ratio,
   are kept.

The masks come from a numpy generator (PCG64) seeded with ``config.seed`` (:func:`dropout_keep_mask`), so scoring
is reproducible for a seed; they are not the masks torch's generator draws for the same seed, so a parity check
feeds both paths one mask (``tests/test_onnx_uts.py``): the variances then agree to float32 rounding and the kept
samples and tokens are the same sets. ``cdcca.edge.onnx_export.MCDropoutTail`` is the same computation in torch,
for the int8 graph of a default export too (``precision="int8"``: the linear layers' inputs quantized per run, so
an int8 graph runs one sample per run).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from cdcca.edge.onnx_model import faster_session, one_thread_options
from cdcca.uts_config import above, window_rank


def dropout_keep_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float,
                      out: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """An attention-dropout mask of ``shape`` drawn from ``rng``: 0 where dropped, 1/(1-p) where kept, in float32
    as ``torch.nn.functional.dropout`` scales.

    Each entry is one 16-bit draw from the generator's raw stream, dropped where it falls under
    ``round(p * 2**16)``: the drop rate is ``p`` to within 2**-17 (0.1 becomes 0.100006). Drawing 16 bits instead of
    a float32 uniform per entry, and comparing integers, makes the mask three times faster to draw (52 against
    160 us for 8 passes over a 37-token layer, a tenth of stage 2 on one thread; ``bench/edge.md``).

    ``out`` (float32, C-contiguous, ``shape``): write into it instead of allocating; the values are the same."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if out is None:
        out = np.empty(shape, np.float32)
    count = int(np.prod(shape))
    draws = rng.bit_generator.random_raw((count + 3) // 4).view(np.uint16)[:count].reshape(shape)
    threshold = np.uint16(min(round(p * 65536), 65535))
    return np.multiply(draws >= threshold, np.float32(1.0) / np.float32(1.0 - p), out=out, dtype=np.float32)


class UTSSettings(Protocol):
    """The fields of ``cdcca.uts.UTSConfig`` this module reads (that class, validated, is what callers pass)."""

    sample_mode: str
    entropy_threshold: float
    sample_fraction: float
    window: int
    group_words: int
    mc_passes: int
    mc_center: str
    mc_dropout: float
    mc_layers: int
    token_mode: str
    token_keep_ratio: float
    token_threshold: float
    seed: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) decoder logits -> (B, V) log-probabilities of the next token."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def token_entropy(log_probs: np.ndarray) -> np.ndarray:
    """(B, V) log-probabilities -> (B,) entropy of the next-token distribution, nats."""
    return -(np.exp(log_probs) * log_probs).sum(-1)


def sample_entropy(entropy: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Eq. 2: (B, T) per-step entropies and the (B, T) mask of steps that belong to the answer (its EOS
    included, padding after it not) -> (B,) mean answer-token entropy, nats."""
    return (entropy * alive).sum(1) / np.maximum(alive.sum(1), 1)


class OnnxTokenSampler:
    """Two-stage UTS for one robot on the exported graphs.

    Args:
        graph: the export's ``uts.onnx``.
        info: the export manifest's ``uts`` entry (``mc_layers``, ``heads``, ``tokens``, ``width``).
        config: UTS settings (a ``cdcca.uts.UTSConfig``); ``mc_layers`` must be the export's.
        session_options: ORT options (threads); ``None``: ORT's defaults. Stage 2 of one sample runs on these
            threads or on one, whichever ran a blank sample faster when the sampler was built
            (:func:`~cdcca.edge.onnx_model.faster_session`; :attr:`single_sample_threads`, 0 for ORT's default).
    """

    def __init__(self, graph: str | Path, info: dict, config: UTSSettings,
                 session_options: ort.SessionOptions | None = None) -> None:  # fmt: skip
        if config.mc_layers != info["mc_layers"]:
            raise ValueError(f"UTS runs the last {config.mc_layers} encoder layers stochastically, but this export's "
                             f"uts graph has {info['mc_layers']}; export again with mc_layers={config.mc_layers} or "
                             f"set mc_layers={info['mc_layers']}")  # fmt: skip
        self.config, self.info = config, info
        self.precision = info.get("precision", "fp32")  # exports before int8 stage 2 ran it in float32
        self.session = ort.InferenceSession(str(graph), session_options, providers=["CPUExecutionProvider"])
        # one sample (stage 2 of one kept answer): the faster of this session and a one-thread one, timed here
        threads = session_options.intra_op_num_threads if session_options is not None else 0  # 0: ORT's default
        self.single_sample_threads, self._single = threads, self.session
        if threads != 1:
            one = ort.InferenceSession(str(graph), one_thread_options(), providers=["CPUExecutionProvider"])
            candidates = {threads: self.session, 1: one}
            blank = np.zeros((1, info["tokens"], info["width"]), np.float32)
            feeds = {"uts_front": blank, "center": blank, "dropout_keep": np.ones(self._mask_shape(1), np.float32)}
            self.single_sample_threads = faster_session(candidates, feeds)
            self._single = candidates[self.single_sample_threads]
        self._recent: dict[str, deque] = {}  # prompt kind -> its recent entropies
        self._rng = np.random.default_rng(config.seed)
        self._rng_lock = threading.Lock()  # the generator, and the mask buffer while a run reads it
        self._mask: np.ndarray | None = None  # reused: stage 2 runs once per kept sample

    # ------------------------------------------------------------------------------------------ stage 1
    def prompt_kind(self, prompt: str) -> str:
        """The window a prompt's entropy is ranked in: its first ``group_words`` words."""
        return " ".join(prompt.lower().split()[: self.config.group_words])

    def keep_samples(self, entropy: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Stage 1 on (B,) entropies (updates the sliding windows) -> (B,) bool; ``prompts`` pick the windows.

        Entropies within :func:`cdcca.uts_config.entropy_tolerance` of each other (or of the threshold) count as
        tied, so float rounding that differs between engines does not change a decision."""
        keep = np.zeros(len(entropy), bool)
        for i, value in enumerate(np.asarray(entropy, np.float32).tolist()):
            if self.config.sample_mode == "threshold":
                keep[i] = above(value, self.config.entropy_threshold)
                continue
            kind = self.prompt_kind(prompts[i]) if prompts is not None else ""
            recent = self._recent.setdefault(kind, deque(maxlen=self.config.window))
            recent.append(value)
            rank = window_rank(recent, value)  # samples in the window more uncertain than this one
            keep[i] = rank < max(1, int(np.ceil(self.config.sample_fraction * len(recent))))
        return keep

    # ------------------------------------------------------------------------------------------ stage 2
    def _session(self, front: np.ndarray) -> ort.InferenceSession:
        return self._single if front.shape[0] == 1 else self.session

    def _mask_shape(self, batch: int) -> tuple[int, ...]:
        info = self.info
        return info["mc_layers"], batch, self.config.mc_passes, info["heads"], info["tokens"], info["tokens"]

    def dropout_keep(self, batch: int) -> np.ndarray:
        """The next (L, B, M, H, N, N) attention-dropout mask: 0 where dropped, 1/(1-p) where kept."""
        with self._rng_lock:
            return dropout_keep_mask(self._rng, self._mask_shape(batch), self.config.mc_dropout)

    def token_variance(self, front: np.ndarray, center: np.ndarray | None = None,
                       keep: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """Eq. 3: (B, N, D) ``uts_front`` -> (B, N) MC-dropout uncertainty (``config.mc_center``); ``center``: the
        (B, N, D) ``visual_tokens`` the encoder graph gave with that front (required for the ``deterministic``
        centre); ``keep``: a mask of :meth:`dropout_keep`'s shape (the next seeded one if omitted: the mask
        :meth:`dropout_keep` would return, drawn into a buffer this sampler reuses, held under the generator's
        lock for the run)."""
        front = np.ascontiguousarray(front, np.float32)
        if front.ndim != 3 or front.shape[1:] != (self.info["tokens"], self.info["width"]):
            raise ValueError(f"uts_front must be (B, {self.info['tokens']}, {self.info['width']}), got {front.shape}")
        if center is not None:
            center = np.ascontiguousarray(center, np.float32)
            if center.shape != front.shape:
                raise ValueError(f"center must be the visual tokens of the same frames, {front.shape}, "
                                 f"got {center.shape}")  # fmt: skip
        elif self.config.mc_center == "deterministic":
            raise ValueError("mc_center='deterministic' measures the passes around the dropout-free output: pass "
                             "the answer's visual_tokens as center")  # fmt: skip
        else:  # the sample variance does not read it; the graph still takes the input
            center = np.zeros_like(front)
        if keep is not None:
            return self._run(front, center, np.ascontiguousarray(keep, np.float32))
        shape = self._mask_shape(front.shape[0])
        with self._rng_lock:
            if self._mask is None or self._mask.shape != shape:
                self._mask = np.empty(shape, np.float32)
            return self._run(front, center, dropout_keep_mask(self._rng, shape, self.config.mc_dropout, out=self._mask))

    def _run(self, front: np.ndarray, center: np.ndarray, keep: np.ndarray) -> np.ndarray:
        output = "token_spread" if self.config.mc_center == "deterministic" else "token_variance"
        return self.run_graph(front, center, keep, [output])[0]

    def run_graph(self, front: np.ndarray, center: np.ndarray, keep: np.ndarray,
                  outputs: Sequence[str] = ("token_variance", "token_spread")) -> list[np.ndarray]:  # fmt: skip
        """``uts.onnx`` on (B, N, D) fronts and centres and an (L, B, M, H, N, N) mask -> its (B, N) ``outputs``.
        An int8 graph quantizes each linear layer's input over the whole run, so it runs one sample at a time: a
        sample's scores are then the same whatever else was kept with it."""
        outputs = list(outputs)
        if self.precision != "int8" or front.shape[0] == 1:
            return self._session(front).run(outputs, {"uts_front": front, "center": center, "dropout_keep": keep})
        runs = [self._single.run(outputs, {"uts_front": front[i : i + 1], "center": center[i : i + 1],
                                           "dropout_keep": np.ascontiguousarray(keep[:, i : i + 1])})
                for i in range(front.shape[0])]  # fmt: skip
        return [np.concatenate(parts) for parts in zip(*runs)]

    def keep_tokens(self, variance: np.ndarray) -> np.ndarray:
        """Eq. 4 on (B, N) variances -> (B, N) bool: above β, or the top ``token_keep_ratio``."""
        if self.config.token_mode == "threshold":
            return variance > self.config.token_threshold
        count = max(1, int(round(self.config.token_keep_ratio * variance.shape[1])))
        top = np.argsort(-variance, axis=1, kind="stable")[:, :count]  # (B, count)
        keep = np.zeros(variance.shape, bool)
        np.put_along_axis(keep, top, True, axis=1)
        return keep

    def stage_two(self, front: np.ndarray, center: np.ndarray | None = None,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(B, N) MC-dropout uncertainty and (B, N) kept-token mask of the samples' ``uts_front`` (``center``: their
        ``visual_tokens``; see :meth:`token_variance`)."""
        variance = self.token_variance(front, center, keep)
        return variance, self.keep_tokens(variance)
