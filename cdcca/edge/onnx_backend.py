"""The student on ONNX Runtime, with weight deltas hot-swapped as ORT LoRA adapters.

:func:`~cdcca.edge.onnx_export.export_onnx` writes two graphs whose trainable tensors are overridable
initializers. An *adapter* here is the whole trainable set of one version, written as one ``.onnx_adapter``
file per graph (``onnxruntime.AdapterFormat``), memory-mapped by ``onnxruntime.LoraAdapter`` and attached to
a ``RunOptions`` with ``add_active_adapter`` (ONNX Runtime multi-LoRA: onnxruntime.ai/docs/genai/tutorials/
finetune.html; C API ``RunOptionsAddActiveLoraAdapter``). The sessions are built once; a swap only changes
which ``RunOptions`` the next answer picks up.

A delta is verified as :class:`~cdcca.edge.adapter_slot.AdapterSlot` verifies it (the shared
:func:`~cdcca.edge.adapter_state.verify_delta`, decoded and applied in numpy by :mod:`cdcca.edge.np_delta`), the
new adapter is built off the answering path, persisted atomically (:func:`~cdcca.edge.adapter_state.persist_adapter`),
then published by replacing one reference.
Each answer reads that reference once and uses it for every run of the answer, so an answer in flight
finishes on the adapter it started with; the previous adapter stays loaded for :meth:`OnnxBackend.rollback`.
Adapters are activated through ``InferenceSession.run``: ORT ignores active adapters with IOBinding.

UTS runs on the same export without torch (:mod:`cdcca.edge.onnx_uts`): an answer's entropy (stage 1) comes
from the decoder's logits, and each :class:`OnnxAnswer` carries the encoder's ``uts_front``, from which
:meth:`OnnxBackend.token_sampler`'s ``uts.onnx`` scores the tokens of the samples stage 1 keeps (stage 2).

Nothing here imports torch, transformers, peft or bitsandbytes: ``cdcca edge --backend onnx`` runs without them
(``tests/test_edge_torch_free.py``). Only :attr:`OnnxBackend.base` and ``_Adapter.params``, torch views for parity
checks against the torch student and for a cloud-side ``VersionChain``, import torch when they are read.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cdcca.edge.adapter_state import (
    APPLIED,
    REJECTED,
    ROLLED_BACK,
    SlotCounters,
    adapter_status,
    persist_adapter,
    persist_failed_reason,
    restore_adapter,
    rollback_reason,
    verify_delta,
)  # fmt: skip
from cdcca.edge.backend import BackendAnswer, EdgeBackend
from cdcca.edge.onnx_model import (
    OnnxExport,
    OnnxModelMismatch,
    faster_session,
    one_thread_options,
    write_adapters,
)  # fmt: skip
from cdcca.edge.onnx_uts import OnnxTokenSampler, UTSSettings, log_softmax, sample_entropy, token_entropy
from cdcca.envelope import DeltaRejected, TrustStore

log = logging.getLogger(__name__)

PROMPT_CACHE = 1024  # distinct prompts whose token ids the tokenizer keeps
TUNE_ROUNDS = 15  # encoder runs per candidate thread count when the backend picks one for single frames


@functools.lru_cache(maxsize=16)
def _resize_weights(source: int, target: int) -> np.ndarray:
    """(target, source) weights of a 1-D antialiased bilinear resize, as ``torch.nn.functional.interpolate(...,
    mode="bilinear", antialias=True, align_corners=False)`` computes them (PIL's triangle filter: its support
    widens by the scale when shrinking; ATen ``UpSampleKernel.cpp``, ``_compute_indices_min_size_weights_aa``)."""
    scale = source / target
    support, inverse = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    weights = np.zeros((target, source))
    for i in range(target):
        center = scale * (i + 0.5)
        low, high = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), source)
        taps = np.clip(1.0 - np.abs((np.arange(low, high) - center + 0.5) * inverse), 0.0, None)
        weights[i, low:high] = taps / taps.sum() if taps.sum() > 0 else taps
    weights.setflags(write=False)
    return weights


class _Tokenizer:
    """The export's tokenizer through the ``tokenizers`` library alone (no transformers, no torch) when the export
    holds a ``tokenizer.json`` (every fast tokenizer saves one); ``transformers.AutoTokenizer`` otherwise."""

    def __init__(self, directory: Path) -> None:
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast, self._auto = Tokenizer.from_file(str(directory / "tokenizer.json")), None
        else:
            from transformers import AutoTokenizer

            self._fast, self._auto = None, AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self._encoded: dict[str, tuple[int, ...]] = {}

    def encode(self, prompt: str) -> list[int]:
        """``<s> prompt`` ids (with the special tokens the tokenizer's post-processor adds), memoised: a robot asks
        the same few prompts again and again, and encoding one cost ~0.07 ms, 3 % of a tiny student's answer."""
        ids = self._encoded.get(prompt)
        if ids is None:
            if self._fast is not None:
                ids = tuple(self._fast.encode(prompt, add_special_tokens=True).ids)
            else:
                ids = tuple(self._auto(prompt, add_special_tokens=True)["input_ids"])
            if len(self._encoded) >= PROMPT_CACHE:
                self._encoded.clear()  # prompts from a free-text source: start over rather than grow without bound
            self._encoded[prompt] = ids
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._auto.decode(ids, skip_special_tokens=True)


@dataclass
class OnnxAnswer(BackendAnswer):
    """A :class:`BackendAnswer` with what UTS stage 2 starts from.

    Attributes:
        uts_front: (B, N, Dv) the encoder's hidden state before its last ``mc_layers`` layers (``None`` for an
            export without a UTS graph).
    """

    uts_front: np.ndarray | None = None


@dataclass
class _Adapter:
    """One loaded adapter version: its tensors, the mapped ORT adapters and a ``RunOptions`` per graph."""

    version: int
    arrays: dict[str, np.ndarray]  # the trainable set of this version, numpy
    run_options: dict[str, ort.RunOptions]
    files: list[Path] = field(default_factory=list)
    loaded: list[ort.LoraAdapter] = field(default_factory=list)  # kept alive as long as the RunOptions are

    @property
    def params(self) -> dict:
        """The trainable set as torch tensors (imports torch; copies): for comparisons with the torch student."""
        return _torch_copy(self.arrays)


def _torch_copy(arrays: dict[str, np.ndarray]) -> dict:
    import torch

    return {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}


def _session(path: Path, options) -> ort.InferenceSession:
    """An ONNX Runtime session of one graph of an export; a missing or damaged graph file is an
    :class:`~cdcca.edge.onnx_model.OnnxModelMismatch` naming it (ORT's own errors read as a crash)."""
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own types (NoSuchFile, InvalidProtobuf, Fail)
        raise OnnxModelMismatch(f"cannot load {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                "export the student again with `cdcca export --backend onnx`") from err


class OnnxBackend(EdgeBackend):
    """The exported student on ONNX Runtime (CPU), with multi-LoRA hot-swap and rollback.

    Args:
        export: an export directory (or an opened :class:`OnnxExport`).
        robot_id: this robot; deltas for another robot are rejected.
        trust: public keys deltas must be signed with.
        state_dir: where the current adapter persists (as the torch slot persists it) and where adapter
            files live; ``None`` keeps the state in memory and the files in a temporary folder.
        threads: ONNX Runtime intra-op threads (``None``: ORT's default) of the UTS graph and of batched runs.
            Greedy decoding of a single prompt runs on one thread whatever this is: its ops are a few microseconds
            each (one token, batch 1), less than handing half of one to a second thread costs; on this 2-core
            machine a prefill took 170 us on one thread vs 271 us on two, a cached step 94 vs 121 us. Whether the
            encoder's single-frame run gains from more than one thread depends on the board and on what else runs
            on it (here, with other work on the two cores, it took 2.2 ms on one thread and 3.7 ms on two), so the
            backend times both on a blank frame when it starts (:meth:`_tune_single_frame`) and keeps the faster:
            :attr:`single_frame_threads`. Both choices compute the same numbers (one row per thread split).
        max_new_tokens: longest answer, as ``MLLM.generate``.
        spinning: let ORT's worker threads spin between runs. Off by default: on a small shared CPU a spinning
            worker takes the core other work (the link, the uplink queue, other processes) needs, and made 2-thread
            answers ~1.5x slower here.
    """

    name = "onnxruntime"

    def __init__(self, export: str | Path | OnnxExport, robot_id: str, trust: TrustStore,
                 state_dir: str | Path | None = None, threads: int | None = None, max_new_tokens: int = 12,
                 spinning: bool = False) -> None:  # fmt: skip
        self.export = export if isinstance(export, OnnxExport) else OnnxExport.load(export)
        self.robot_id, self.trust, self.max_new_tokens = robot_id, trust, max_new_tokens
        self.state_dir = Path(state_dir) if state_dir is not None else None
        manifest = self.export.manifest
        self.lm, self.spec = manifest["lm"], manifest["image_spec"]
        self.uts = manifest.get("uts")  # None: an export written before UTS had a graph
        self._options = options = ort.SessionOptions()
        options.log_severity_level = 3  # overridable initializers are the point; ORT warns about each one
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        directory = self.export.directory
        self.sessions = {graph: _session(directory / info["file"], options)
                         for graph, info in manifest["graphs"].items()}  # fmt: skip
        # decodes one prompt: on one thread (see ``threads``)
        self._single_decoder = self.sessions["decoder"] if threads == 1 else self._one_thread_session("decoder")
        self.tokenizer = _Tokenizer(directory)
        self.base_arrays = self.export.base_arrays()  # θ_base, version 0
        self._check_export()
        self._files = self.state_dir / "onnx_adapters" if self.state_dir is not None else Path(tempfile.mkdtemp())
        if self.state_dir is None:
            weakref.finalize(self, shutil.rmtree, self._files, True)
        self._apply_lock = threading.Lock()  # one delta at a time
        self.counters = SlotCounters()
        self.newest_version = 0
        self._active, self._previous = self._load(0, self.base_arrays), None
        self._threads = self.single_frame_threads = threads  # None: ORT's default
        self._single_encoder = self._tune_single_frame() if threads != 1 else self.sessions["encoder"]
        if self.state_dir is not None:
            self._restore()
            self._drop_unused_files()  # a run that restores nothing would leave the files of every earlier start

    def _one_thread_session(self, graph: str) -> ort.InferenceSession:
        return _session(self.export.directory / self.export.manifest["graphs"][graph]["file"], one_thread_options())

    def _tune_single_frame(self, rounds: int = TUNE_ROUNDS) -> ort.InferenceSession:
        """The encoder session single frames run on: the multi-threaded one or a one-thread one, whichever ran a
        blank frame faster (:func:`~cdcca.edge.onnx_model.faster_session`). Sets :attr:`single_frame_threads`."""
        candidates = {self._threads: self.sessions["encoder"], 1: self._one_thread_session("encoder")}
        size = self.spec["size"]
        feeds = {"pixel_values": np.zeros((1, 3, size, size), np.float32)}
        self.single_frame_threads = faster_session(candidates, feeds, self._active.run_options["encoder"], rounds)
        return candidates[self.single_frame_threads]

    def _check_export(self) -> None:
        """The graphs, ``base.safetensors`` and the manifest must agree (an edited or mixed export fails here)."""
        for graph, session in self.sessions.items():
            inputs = {i.name: list(i.shape) for i in session.get_overridable_initializers()}
            wanted = {name: self.export.manifest["shapes"][name] for name in self.export.graph_params(graph)}
            if inputs != wanted:
                raise OnnxModelMismatch(f"{graph} graph in {self.export.directory} takes trainable inputs that differ "
                                        "from its manifest (the export was edited or mixed with another student's); "
                                        "export the student again into an empty directory")  # fmt: skip

    # ------------------------------------------------------------------------------------- answering
    @property
    def version(self) -> int:
        return self._active.version

    @property
    def base(self) -> dict:
        """θ_base as torch tensors (imports torch; copies), what a cloud-side ``VersionChain`` for this robot starts
        from; the backend itself keeps :attr:`base_arrays`."""
        return _torch_copy(self.base_arrays)

    def _pixel_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 frames -> (B, 3, S, S) float32, the same resize and normalisation as ``MLLM.preprocess``."""
        size, batch = self.spec["size"], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
            pixels = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)  # (3, H, W)
            if pixels.shape[1:] != (size, size):
                rows, columns = _resize_weights(pixels.shape[1], size), _resize_weights(pixels.shape[2], size)
                pixels = (rows @ pixels.astype(np.float64) @ columns.T).astype(np.float32)  # (3, S, S)
            batch.append(pixels)
        mean = np.asarray(self.spec["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.spec["std"], np.float32).reshape(1, 3, 1, 1)
        return (np.stack(batch) - mean) / std  # as MLLM.preprocess: bit-identical without a resize, else ~1e-7

    def _prompt_batch(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ``<s> prompt`` ids (B, T) and mask (B, T), as ``MLLM._text_batch``."""
        rows = [self.tokenizer.encode(p) for p in prompts]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.lm["pad_token_id"], np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        return ids, mask

    def answer(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> BackendAnswer:
        adapter = self._active  # read once: a swap during this answer does not reach it
        outputs = ["visual_tokens", "soft_prompt"] + ([self.uts["front_output"]] if self.uts else [])
        # the runtime asks a batch of prompts about one frame ([rgb] * n): encode that frame once
        one_frame = len(images) > 1 and all(image is images[0] for image in images)
        pixels = self._pixel_values(images[:1] if one_frame else images)
        session = self._single_encoder if pixels.shape[0] == 1 else self.sessions["encoder"]
        encoded = session.run(outputs, {"pixel_values": pixels}, adapter.run_options["encoder"])
        if one_frame:
            encoded = [np.repeat(value, len(images), axis=0) for value in encoded]
        visual_tokens, soft_prompt, *front = encoded
        token_ids, entropy, alive = self.generate(soft_prompt, prompts, adapter)
        pad = self.lm["pad_token_id"]
        texts = [" ".join(self.tokenizer.decode(row[row != pad].tolist()).split())
                 for row in token_ids]  # fmt: skip
        return OnnxAnswer(texts, sample_entropy(entropy, alive).astype(np.float32), visual_tokens, adapter.version,
                          front[0] if front else None)  # fmt: skip

    def token_sampler(self, config: UTSSettings) -> OnnxTokenSampler:
        """UTS on this export (both stages, no torch) with ``config`` (a ``cdcca.uts.UTSConfig``); its stage 2
        scores an :class:`OnnxAnswer`'s ``uts_front``. :class:`OnnxModelMismatch` for an export without one."""
        if not self.uts:
            raise OnnxModelMismatch(f"the export in {self.export.directory} has no UTS graph (written by an older "
                                    "CD-CCA); export the student again with `cdcca export --backend onnx`")  # fmt: skip
        return OnnxTokenSampler(self.export.directory / self.uts["file"], self.uts, config, self._options)

    def generate(self, soft_prompt: np.ndarray, prompts: Sequence[str], adapter: _Adapter | None = None,
                 logits_out: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Greedy decoding with the KV cache, as ``MLLM.generate``: token ids (B, T), entropies (B, T), answer
        mask (B, T). ``logits_out`` (a list) receives each step's (B, V) logits, for parity checks."""
        adapter = adapter or self._active
        ids, text_mask = self._prompt_batch(prompts)
        batch = len(prompts)
        mask = np.concatenate([np.ones((batch, soft_prompt.shape[1]), np.int64), text_mask], axis=1)
        empty_past = np.zeros((batch, self.lm["heads"], 0, self.lm["head_dim"]), np.float32)
        graph = self.export.manifest["graphs"]["decoder"]
        feeds = {"prefix_embeds": soft_prompt, "input_ids": ids, "attention_mask": mask,
                 **dict.fromkeys(graph["past"], empty_past)}  # fmt: skip
        eos, pad = self.lm["eos_token_id"], self.lm["pad_token_id"]
        no_prefix = np.zeros((batch, 0, self.lm["hidden"]), np.float32)
        done = np.zeros(batch, bool)
        tokens, entropies, alive = [], [], []
        session = self._single_decoder if batch == 1 else self.sessions["decoder"]
        options = adapter.run_options["decoder"]
        for _ in range(self.max_new_tokens):
            logits, *present = session.run(None, feeds, options)  # (B, V), then the cache
            if logits_out is not None:
                logits_out.append(logits)
            log_probs = log_softmax(logits)
            entropies.append(token_entropy(log_probs))
            alive.append(~done)
            next_token = np.where(done, pad, log_probs.argmax(-1))
            tokens.append(next_token)
            done = done | (next_token == eos)
            if done.all():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"prefix_embeds": no_prefix, "input_ids": next_token[:, None].astype(np.int64),
                     "attention_mask": mask, **dict(zip(graph["past"], present))}  # fmt: skip
        return np.stack(tokens, 1), np.stack(entropies, 1).astype(np.float32), np.stack(alive, 1).astype(np.float32)

    # -------------------------------------------------------------------------------------- updating
    def _load(self, version: int, arrays: dict[str, np.ndarray]) -> _Adapter:
        """Write and map the adapter files of ``arrays`` (off the answering path)."""
        stem = f"v{version}-{time.time_ns()}"  # unique: a rolled-back version may be rebuilt later
        paths = write_adapters(self.export, arrays, self._files, stem, version)
        adapter = _Adapter(version, arrays, {}, list(paths.values()))
        for graph, path in paths.items():
            lora = ort.LoraAdapter()
            lora.Load(str(path))
            options = ort.RunOptions()
            options.add_active_adapter(lora)
            adapter.loaded.append(lora)
            adapter.run_options[graph] = options
        return adapter

    def _activate(self, adapter: _Adapter, previous: _Adapter | None) -> None:
        """Publish ``adapter`` for the next answer (one reference assignment) and drop unneeded files."""
        dropped = (self._active, self._previous)  # released below, not inside the timed swap
        started = time.perf_counter()
        self._active, self._previous = adapter, previous
        self.counters.last_swap_us = 1e6 * (time.perf_counter() - started)
        del dropped
        self._drop_unused_files()

    def _drop_unused_files(self) -> None:
        """Delete the ``.onnx_adapter`` files neither the active nor the previous adapter maps (those of earlier
        versions, and of earlier runs on this state directory)."""
        keep = {p.name for a in (self._active, self._previous) if a is not None for p in a.files}
        for path in self._files.glob("*.onnx_adapter"):  # answers still running map theirs: unlinking is safe
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def receive(self, msg, stamp_ns: int | None = None):
        """Verify and apply a ``WeightDelta``; returns the ``AdapterStatus`` to publish. Never raises for bad input."""
        with self._apply_lock:
            started = time.perf_counter()
            current = self._active
            try:
                params = verify_delta(msg, trust=self.trust, robot_id=self.robot_id, version=current.version,
                                      newest_version=self.newest_version, base=self.base_arrays,
                                      current=current.arrays)  # fmt: skip
            except DeltaRejected as err:
                self.counters.rejected += 1
                log.warning("robot %s rejected delta v%s: %s", self.robot_id, msg.version, err.reason)
                return adapter_status(self.robot_id, msg.version, REJECTED, err.reason, stamp_ns)
            adapter = None
            try:  # written and persisted before anything the robot answers with changes
                adapter = self._load(int(msg.version), params)
                newest = max(self.newest_version, adapter.version)
                self._persist(adapter, newest, previous=current)
            except OSError as err:  # e.g. a full disk; newest_version stays, so a resend applies
                for path in adapter.files if adapter is not None else ():
                    path.unlink(missing_ok=True)
                self.counters.persist_failures += 1
                reason = persist_failed_reason(int(msg.version), current.version, err)
                log.error("robot %s: %s", self.robot_id, reason)
                return adapter_status(self.robot_id, msg.version, REJECTED, reason, stamp_ns)
            self.newest_version = newest
            self._activate(adapter, current)
            self.counters.applied += 1
            self.counters.last_apply_ms = 1000 * (time.perf_counter() - started)
            return adapter_status(self.robot_id, adapter.version, APPLIED, "", stamp_ns)

    def rollback(self, reason: str = "on request", only_version: int | None = None, stamp_ns: int | None = None):
        """Return to the previous adapter (one level); as :meth:`AdapterSlot.rollback
        <cdcca.edge.adapter_slot.AdapterSlot.rollback>`."""
        with self._apply_lock:
            if only_version is not None and only_version != self.version:
                return None
            previous = self._previous
            if previous is None:
                return adapter_status(self.robot_id, self.version, REJECTED, "no previous adapter to roll back to",
                                      stamp_ns)  # fmt: skip
            left, note = self.version, ""
            try:
                self._persist(previous, self.newest_version)
            except OSError as err:
                self.counters.persist_failures += 1
                note = f" (not persisted: {err}; a restart resumes v{left})"
                log.error("robot %s: rolling back to v%d: %s", self.robot_id, previous.version, note)
            self._activate(previous, None)
            self.counters.rolled_back += 1
            return adapter_status(self.robot_id, previous.version, ROLLED_BACK, rollback_reason(left, reason) + note,
                                  stamp_ns)  # fmt: skip

    # ----------------------------------------------------------------------------------- persistence
    def _persist(self, adapter: _Adapter, newest_version: int, previous: _Adapter | None = None) -> None:
        if self.state_dir is not None:
            persist_adapter(self.state_dir, self.robot_id, adapter.version, newest_version, adapter.arrays,
                            {"student_id": self.export.manifest["student_id"]},
                            None if previous is None else (previous.version, previous.arrays))  # fmt: skip

    def _restore(self) -> None:
        try:
            restored = restore_adapter(self.state_dir, self.robot_id, self.base_arrays,
                                       {"student_id": self.export.manifest["student_id"]})  # fmt: skip
        except ValueError as err:
            self.counters.restore_failures += 1
            log.error("ignoring adapter state in %s (%s); starting from the base adapter", self.state_dir, err)
            return
        if restored is not None:
            version, self.newest_version, params, previous = restored
            before = None if previous is None else self._load(*previous)
            self._activate(self._load(version, params), before)
