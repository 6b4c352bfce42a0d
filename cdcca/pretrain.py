"""Pretraining of the embedded teacher/student pair on digits-shift (``cdcca pretrain``).

Three stages, following BLIP-2 and the paper's setting:

0. ``vision``: the shared image encoder is pretrained on the broad distribution (BLIP-2 starts from a
   separately pretrained EVA-CLIP encoder), then frozen for good.
1. ``teacher``: the large cloud model's Q-Former, projection and LM learn to answer on the broad distribution.
2. ``student``: the small model's Q-Former, projection and LM learn on the source domain only, on the same
   frozen encoder -- hence a student that is good at home and worse on the shifted targets.

Training is resumable: every ``checkpoint_every`` steps the stage's weights, the optimizer moments
(safetensors, no pickle), the step, the precision and the settings are written to ``<stage>.partial/``; the batch
and dropout masks at step k depend only on (seed, stage, k), so a resumed run computes exactly what an uninterrupted
one would. Work in ``--out`` done with other settings is refused before any work (:func:`check_settings`), and a
snapshot trained on another encoder than the build's starts its stage again (:func:`run_stage`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from cdcca.data.digits_shift import INK_COLOURS, STYLES, TrainingImage, corpus, training_image, training_samples
from cdcca.errors import CdccaError, CheckpointError
from cdcca.models.checkpoint import _read_json, build_pair, load_mllm, save_mllm, share_vision_encoder
from cdcca.models.mllm import MLLM
from cdcca.models.presets import get_preset
from cdcca.models.tokenizer import build_tokenizer
from cdcca.paths import checkpoint_dir
from cdcca.report import cpu, progress_bar

STAGES = ("vision", "teacher", "student")
PRECISIONS = ("auto", "bf16", "fp32")
ENCODER_PREFIX = "vision_model."  # the shared encoder's weights in a teacher or student snapshot

log = logging.getLogger(__name__)


def resolve_precision(precision: str) -> str:
    """``bf16`` or ``fp32``: ``auto`` is ``bf16`` on a CPU with bfloat16 matrix units (AMX tiles or AVX512-BF16,
    which oneDNN uses for bfloat16 matmuls), else ``fp32``."""
    if precision != "auto":
        return precision
    fast = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return "bf16" if fast else "fp32"


@dataclass
class PretrainConfig:
    """Settings of ``cdcca pretrain``.

    Args:
        preset: model preset (``tiny`` is the embedded default, ``test`` is for unit tests).
        vision_steps: optimizer steps of stage 0, the shared encoder on the broad distribution.
        teacher_steps: optimizer steps of the teacher (Q-Former, projection, LM) on the broad distribution.
        student_steps: optimizer steps of the student on the source domain.
        batch_size: samples per step.
        lr: peak AdamW learning rate of the teacher and student stages (linear warm-up, cosine decay to 10%).
        vision_lr: peak learning rate of stage 0 (a ViT from scratch prefers a smaller one).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear warm-up.
        checkpoint_every: steps between resumable snapshots.
        seed: seed of initialisation and of the training stream.
        out_dir: where ``teacher/`` and ``student/`` are written (default: the cache, see ``cdcca.paths``).
        precision: ``bf16`` runs each step's forward pass under ``torch.autocast(bfloat16)`` (the weights, gradients
            and AdamW's moments stay float32: mixed precision, Micikevicius et al., "Mixed precision training",
            ICLR 2018, with bfloat16's float32 exponent range, which needs no loss scaling). ``fp32`` runs float32
            throughout. ``auto`` (the default): ``bf16`` where the CPU has bfloat16 matrix units (AMX,
            AVX512-BF16; there the vision and teacher stages run about 1.3x faster, ``bench/README.md``), ``fp32``
            elsewhere (emulated bfloat16 is slower than float32); a finished pair is reused whatever precision
            built it. The models record the precision they were built with.
    """

    preset: str = "tiny"
    vision_steps: int = 1000
    teacher_steps: int = 500
    student_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    vision_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    checkpoint_every: int = 200
    seed: int = 0
    out_dir: Path | None = field(default=None)
    precision: str = "auto"

    def __post_init__(self) -> None:
        get_preset(self.preset)  # validates the name
        for name in ("vision_steps", "teacher_steps", "student_steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "vision_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PretrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"PretrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else checkpoint_dir(self.preset)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors (tensors) + JSON (hyper-parameters); no pickle."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().clone().contiguous() if torch.is_tensor(value) else torch.tensor(value)
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(state["param_groups"]))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(path.with_suffix(".json").read_text())
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class VisionPretrainer(nn.Module):
    """The shared encoder with linear heads for digit, image style and ink colour (stage 0).

    BLIP-2 starts from a separately pretrained, then frozen, image encoder (EVA-CLIP). Here that encoder is
    pretrained on the broad distribution with direct supervision, which is fast on a CPU; the heads are
    discarded afterwards.
    """

    def __init__(self, owner: MLLM) -> None:
        super().__init__()
        self.owner = [owner]  # not a submodule: only the encoder and the heads are this module's weights
        self.encoder = owner.blip2.vision_model
        hidden = owner.blip2.config.vision_config.hidden_size
        self.sizes = (10, len(STYLES), len(INK_COLOURS) + 1)
        self.head = nn.Linear(hidden, sum(self.sizes))

    def loss(self, items: list[TrainingImage]) -> torch.Tensor:
        pixels = self.owner[0].preprocess([item.image for item in items])
        tokens = self.encoder(pixel_values=pixels, return_dict=True).last_hidden_state  # (B, N, D)
        logits = self.head(tokens.mean(1)).split(self.sizes, dim=-1)
        colours = list(INK_COLOURS)
        targets = (
            [item.digit for item in items],
            [STYLES.index(item.style) for item in items],
            [colours.index(item.colour_name) + 1 if item.colour_name else 0 for item in items],
        )
        return sum(F.cross_entropy(lg, torch.tensor(t, device=lg.device)) for lg, t in zip(logits, targets))


@dataclass
class _Stage:
    """One resumable training stage: its name, weights to snapshot, parameters to train and loss per step."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    step_loss: Callable[[np.random.Generator], torch.Tensor]
    steps: int
    lr: float


def stage_settings(config: PretrainConfig, stage: str) -> dict:
    """The settings ``stage``'s weights were built with, its own and those of the stages it is built on (a student is
    trained on its teacher's encoder, the teacher on the encoder), as a snapshot, the saved encoder and a finished
    model record them (the precision is checked on its own): a resume under other settings is refused, not mixed in.
    ``out_dir`` and ``checkpoint_every`` do not change the weights (a resumed run computes what an uninterrupted one
    would); the student's steps do not change the teacher, nor the answering stages' settings the encoder."""
    ignored = {"out_dir", "checkpoint_every", "precision"}
    ignored |= {"student_steps"} if stage != "student" else set()
    ignored |= {"teacher_steps", "lr"} if stage == "vision" else set()
    return {k: v for k, v in asdict(config).items() if k not in ignored}


def _snapshot(stage: _Stage, config: PretrainConfig, directory: Path, optimizer, done: int, losses: list[float]):
    directory.mkdir(parents=True, exist_ok=True)
    save_model(stage.module, str(directory / "weights.safetensors"))  # handles tied embeddings
    save_optimizer(optimizer, directory / "optimizer")
    # a resume goes on in the same precision, with the same settings
    progress = {"step": done, "losses": losses, "precision": config.precision,
                "settings": stage_settings(config, stage.name)}  # fmt: skip
    (directory / "progress.json").write_text(json.dumps(progress))


def _encoder_differs(module: nn.Module, weights: Path) -> bool:
    """Whether the teacher or student weights in ``weights`` (a snapshot, or a finished model) were trained on another
    encoder than the one the BLIP-2 ``module`` holds now (left behind by a build whose encoder or teacher was then
    built again, e.g. with other threads)."""
    current = module.state_dict()
    with safe_open(str(weights), framework="pt") as saved:
        names = [n for n in saved.keys() if n.startswith(ENCODER_PREFIX)]  # noqa: SIM118 (safe_open has no __iter__)
        return any(n not in current or not torch.equal(saved.get_tensor(n), current[n]) for n in names)


def run_stage(stage: _Stage, config: PretrainConfig, progress: bool = True) -> dict:
    """Train one stage, resuming from ``<out>/<stage>.partial/`` when present (its settings and precision were
    checked by :func:`pretrain`; a teacher or student snapshot trained on another encoder than the one the build
    holds now starts the stage again, logged, and named in the log's ``discarded``); returns its log."""
    partial_dir = config.out_dir / f"{stage.name}.partial"
    for param in stage.params:
        param.requires_grad_(True)
    # foreach: one kernel per moment over every tensor instead of a loop over them; on a CPU torch picks the loop
    # unless told, and both give the same weights bit for bit (tests/test_pretrain.py)
    optimizer = torch.optim.AdamW(stage.params, lr=stage.lr, weight_decay=config.weight_decay, foreach=True)
    start, losses, discarded = 0, [], None
    weights = partial_dir / "weights.safetensors"
    if (partial_dir / "progress.json").is_file() and stage.name != "vision" and _encoder_differs(stage.module, weights):
        # resuming would load a stale encoder over the one the teacher was (or is being) trained on: the stage
        # starts again, which is what the same settings compute on this encoder
        discarded = f"{partial_dir} was trained on another image encoder than this build's; {stage.name} starts again"
        log.warning(discarded)
        shutil.rmtree(partial_dir)
    if (partial_dir / "progress.json").is_file():
        load_model(stage.module, str(weights))
        load_optimizer(optimizer, partial_dir / "optimizer")
        saved = json.loads((partial_dir / "progress.json").read_text())  # its precision: pretrain() checked it
        start, losses = saved["step"], saved["losses"]
    stage.module.train()
    bf16 = config.precision == "bf16"  # resolved by pretrain()
    started = time.perf_counter()
    bar = progress_bar(
        range(start, stage.steps), initial=start, total=stage.steps, desc=f"pretrain {stage.name}", disable=not progress
    )
    for step in bar:
        rng = np.random.default_rng([config.seed, STAGES.index(stage.name), step])
        torch.manual_seed(int(rng.integers(2**62)))  # dropout masks also depend only on (seed, stage, step)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * _lr_factor(step, stage.steps, config.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = stage.step_loss(rng)  # the backward pass runs outside: autocast records what it cast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.params, 1.0)
        optimizer.step()
        losses.append(round(float(loss.detach()), 5))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < stage.steps:
            _snapshot(stage, config, partial_dir, optimizer, step + 1, losses)
    stage.module.eval()
    for param in stage.params:
        param.requires_grad_(False)
    final_loss = float(np.mean(losses[-20:])) if losses else None
    seconds = round(time.perf_counter() - started, 2)  # this run's steps (a resumed stage's, not the whole stage's)
    report = {"stage": stage.name, "steps": stage.steps, "resumed_from": start, "final_loss": final_loss,
              "seconds": seconds}  # fmt: skip
    return report | ({"discarded": discarded} if discarded else {})


def _answer_loss(model: MLLM, distribution: str, batch_size: int) -> Callable[[np.random.Generator], torch.Tensor]:
    def step_loss(rng: np.random.Generator) -> torch.Tensor:
        model.blip2.vision_model.eval()  # the frozen encoder runs without dropout, as in BLIP-2
        batch = training_samples(distribution, batch_size, rng)
        return model.loss([s.image for s in batch], [s.prompt for s in batch], [s.target for s in batch])

    return step_loss


def is_complete(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and (directory / "cdcca.json").is_file()


class PretrainMismatch(CdccaError, ValueError):
    """``--out`` holds work (a finished model, the saved encoder, a snapshot) done with other settings or in another
    precision than asked for, or a record that cannot be read; the message names it and what to delete."""


def _recorded_settings(piece: Path) -> dict | None:
    """The settings ``piece`` of ``--out`` records: a finished model's ``cdcca.json`` (with its precision: ``auto``
    only if hand-made, none from before bfloat16 was an option), the saved encoder's ``vision.json``, a snapshot's
    ``progress.json``. None: nothing recorded (from before the records)."""
    if is_complete(piece):
        recorded = _pretrain_record(piece)
        if recorded is None:
            return None
        return {**recorded, "precision": _checked_precision(recorded, piece / "cdcca.json", piece)}
    settings = (_precision_of(piece)[2] or {}).get("settings")  # a damaged record is named, with the way on
    return settings if isinstance(settings, dict) else None


def check_settings(config: PretrainConfig, auto: bool = False) -> None:
    """Before any work: every piece of work in ``--out`` this run builds on (finished models, the saved encoder,
    snapshots) is reused only if it records the settings asked for now (:func:`stage_settings`; a finished model, its
    precision too), so ``cdcca pretrain --preset test --out <a tiny pair>`` does not report the tiny pair as built and
    a resume under other settings is not mixed in. Work from before the records is reused as it is. One
    :class:`PretrainMismatch` names every difference and everything to delete: the pieces that differ, what was built
    on them (a teacher on its encoder, a student on its teacher; nothing on a snapshot), and what a rebuild would
    take up once they are gone (the encoder and snapshots beside a finished teacher that differs). A piece a finished
    model that stays makes unused (a snapshot left beside it, the encoder beside a finished teacher) is not judged.
    ``auto``: ``config.precision`` is what ``--precision auto`` chose."""
    out = config.out_dir
    teacher, student, vision = out / "teacher", out / "student", out / "vision.safetensors"
    snapshots = [out / f"{stage}.partial" for stage in STAGES]
    present = [p for p in (teacher, student, vision, *snapshots)
               if is_complete(p) or p.is_file() or (p / "progress.json").is_file()]  # fmt: skip
    records = {p: _recorded_settings(p) for p in present}
    if records.get(vision, {}) is None:  # an encoder from before its record: judged by its teacher's, finished or not
        records[vision] = records.get(teacher) or records.get(snapshots[1])
    conflicts, stale = [], set()

    def kept(piece: Path) -> bool:  # a finished model (or the encoder) that stays
        return piece in present and piece not in stale

    superseded = {vision: lambda: kept(teacher), snapshots[0]: lambda: kept(vision) or kept(teacher),
                  snapshots[1]: lambda: kept(teacher), snapshots[2]: lambda: kept(student)}  # fmt: skip
    for piece in present:  # finished models first, then what they supersede
        if piece in superseded and superseded[piece]():
            continue
        recorded, verb = records[piece], "started" if piece in snapshots else "built"
        if recorded is None:  # from before the records: taken as it is
            continue
        stage = _stage_of(piece)
        asked = stage_settings(config, stage) | ({"precision": config.precision} if is_complete(piece) else {})
        differ = _differing(recorded, asked)
        if differ:
            chose = {"precision": " by --precision auto"} if auto else {}
            changes = ", ".join(f"{k} {recorded[k]!r} (asked {asked[k]!r}{chose.get(k, '')})" for k in differ)
            conflicts.append((STAGES.index(stage), f"{piece.name} was {verb} with {changes}"))
            stale.add(piece)
            if piece not in snapshots:  # what was built on it goes with it
                stale |= {p for p in present if STAGES.index(_stage_of(p)) > STAGES.index(stage)}
    if conflicts:
        order = sorted(stale, key=lambda p: (STAGES.index(_stage_of(p)), p in snapshots))  # as they are built
        names = [n for p in order for n in ((p.name, "vision.json") if p == vision else (p.name,))
                 if (out / n).exists()]  # fmt: skip
        differences = "; ".join(c for _, c in sorted(conflicts))  # in the order the stages are built
        raise PretrainMismatch(f"{out} holds work done with other settings than asked: {differences}; pass "
                               f"another --out, or delete {_listed(names)} from it to build again with these settings")


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _differing(recorded: dict, asked: dict) -> list[str]:
    """The settings ``recorded`` names with another value than ``asked`` (one it does not name is not compared)."""
    return sorted(k for k, v in asked.items() if k in recorded and recorded[k] != v)


def _train_answering(
    model: MLLM, stage: str, distribution: str, steps: int, config: PretrainConfig, progress: bool
) -> dict:
    """Stage 1 or 2: Q-Former, projection and LM learn to answer on ``distribution``; saves ``<out>/<stage>/``."""
    params = [p for n, p in model.blip2.named_parameters() if not n.startswith("vision_model.")]
    loss = _answer_loss(model, distribution, config.batch_size)
    log = run_stage(_Stage(stage, model.blip2, params, loss, steps, config.lr), config, progress)
    # the CPU too: bfloat16 kernels differ between AMX and AVX512-BF16, and so do the pairs they build
    model.meta.update(steps_done=log["steps"], final_loss=log["final_loss"], torch_threads=torch.get_num_threads(),
                      cpu=cpu(), pretrain=asdict(config) | {"out_dir": str(config.out_dir)})  # fmt: skip
    save_mllm(model, config.out_dir / stage)
    shutil.rmtree(config.out_dir / f"{stage}.partial", ignore_errors=True)
    return log


def _resolved(precision: object) -> object:
    return resolve_precision(precision) if precision in PRECISIONS else precision


def _pretrain_record(directory: Path) -> dict | None:
    """The settings a finished model in ``directory`` records in its ``cdcca.json`` (None: it predates them)."""
    meta = _read_json(directory / "cdcca.json").get("meta")  # a damaged file is named, with what to do
    recorded = meta.get("pretrain") if isinstance(meta, dict) else None
    return recorded if isinstance(recorded, dict) else None


def _work_in(out: Path) -> list[Path]:
    """The pretraining work in ``out`` this run builds on, the piece that decides first: a finished teacher, else
    the saved encoder (or its snapshot) and the teacher's snapshot; then a finished student, else its snapshot
    (``<stage>.partial/progress.json``)."""
    if is_complete(out / "teacher"):
        pieces = [out / "teacher"]
    else:
        vision = out / "vision.safetensors"
        pieces = [vision if vision.is_file() else out / "vision.partial", out / "teacher.partial"]
    pieces.append(out / "student" if is_complete(out / "student") else out / "student.partial")
    return [p for p in pieces if is_complete(p) or (p / "progress.json").is_file() or p.name == "vision.safetensors"]


def _way_out(piece: Path) -> str:
    if is_complete(piece):
        beside = " and the student beside it" if piece.name == "teacher" else ""
        return f"delete {piece}{beside} to build it again"
    if piece.is_dir():
        return f"delete {piece} to start that stage again"
    return f"delete {piece} and {piece.with_suffix('.json')} to train the encoder again"


def _checked_precision(recorded: dict | None, file: Path, piece: Path) -> str:
    """The precision a record read from ``file`` names (``fp32`` without one: builds before stop 39's bfloat16
    were); one this version does not know is a :class:`PretrainMismatch` naming the file and the way on."""
    precision = _resolved(recorded.get("precision", "fp32")) if recorded is not None else "fp32"
    if precision not in ("bf16", "fp32"):
        raise PretrainMismatch(f"{file} records precision {precision!r}, which this version does not know; "
                               f"{_way_out(piece)}")  # fmt: skip
    return precision


def _precision_of(piece: Path) -> tuple[str, bool, dict | None]:
    """The precision ``piece`` of :func:`_work_in` was trained in, whether it says so (see
    :func:`_checked_precision`) and its record; a damaged record is a :class:`PretrainMismatch` naming the file and
    the way on."""
    if is_complete(piece):
        recorded, file = _pretrain_record(piece), piece / "cdcca.json"
    else:
        file = piece / "progress.json" if piece.is_dir() else piece.with_suffix(".json")
        try:
            recorded = _read_json(file) if file.is_file() else None
        except CheckpointError as err:  # a stop mid-write: the generic "rebuild it" would fail the same way
            raise PretrainMismatch(f"{file} is damaged or unreadable; {_way_out(piece)}") from err
    return _checked_precision(recorded, file, piece), recorded is not None and "precision" in recorded, recorded


def _stage_of(piece: Path) -> str:
    return piece.name.split(".")[0]  # vision.safetensors, teacher.partial, student, ...


def _choose_precision(config: PretrainConfig) -> str:
    """The precision this run trains in: the one asked for, where ``auto`` goes on in the precision the work
    already in ``--out`` was started in (a finished teacher, the saved encoder, a snapshot to resume), so a pair
    is never part float32 and part bfloat16. A snapshot or encoder of another precision is refused before any
    work (finished models are checked by :func:`check_settings`)."""
    work = {piece: _precision_of(piece) for piece in _work_in(config.out_dir)}  # in the order that decides
    chosen, auto = resolve_precision(config.precision), config.precision == "auto"
    first = next(iter(work), None)
    if auto and first is not None:
        chosen = work[first][0]
    for piece, (built, said, _) in work.items():
        if not is_complete(piece) and built != chosen:
            how = f"was trained in {built!r}" if said else f"has no precision record (taken as {built!r})"
            asked = f"{chosen!r}" + (f" by --precision auto, as {first.name} was" if auto else "")
            raise PretrainMismatch(f"{piece} {how} (asked {asked}); pass another --out, or {_way_out(piece)}")
    return chosen


EMBEDDED_THREADS = 2  # the torch threads the committed results' embedded pair was built with (`make` passes them)


def pretrain(config: PretrainConfig, progress: bool = True) -> dict:
    """Stage 0 shared encoder, stage 1 teacher, stage 2 student; finished stages are reused. Returns a report.

    The weights depend on torch's thread count as well as on the package versions: a kernel splits its sums
    differently on 1 and 2 threads (after six teacher steps the two differ by up to 2e-3), so the pair the committed
    results came from is rebuilt at :data:`EMBEDDED_THREADS` threads in the environment of ``constraints.txt``. Each
    model's ``cdcca.json`` records the count it was trained with (``torch_threads``). They depend on the precision
    too: ``auto`` picks bfloat16 only on a CPU with bfloat16 matrix units, as the committed pair's was; another
    CPU's bfloat16 kernels, or float32, build another pair."""
    out, auto = config.out_dir, config.precision == "auto"
    config = replace(config, precision=_choose_precision(config))  # recorded, and compared on reuse
    report = {"preset": config.preset, "out_dir": str(config.out_dir), "stages": [],
              "torch_threads": torch.get_num_threads(), "precision": config.precision}  # fmt: skip
    tokenizer = build_tokenizer(corpus())
    teacher, student = build_pair(get_preset(config.preset), tokenizer, seed=config.seed)
    check_settings(config, auto)  # before any work: a mismatch found after the teacher's minutes is late
    if is_complete(out / "teacher"):
        teacher = load_mllm(out / "teacher")
        report["stages"] += [{"stage": "vision", "reused": True}, {"stage": "teacher", "reused": True}]
    else:
        vision = VisionPretrainer(teacher)
        vision_file = out / "vision.safetensors"
        if vision_file.is_file():
            load_model(vision, str(vision_file))
            report["stages"].append({"stage": "vision", "reused": True})
        else:
            sampler = lambda rng: vision.loss([training_image("broad", rng) for _ in range(config.batch_size)])  # noqa: E731
            log = run_stage(
                _Stage("vision", vision, list(vision.parameters()), sampler, config.vision_steps, config.vision_lr),
                config,
                progress,
            )
            out.mkdir(parents=True, exist_ok=True)
            record = {"precision": config.precision, "settings": stage_settings(config, "vision")}
            vision_file.with_suffix(".json").write_text(json.dumps(record))  # the record first
            save_model(vision, str(vision_file))
            shutil.rmtree(out / "vision.partial", ignore_errors=True)
            report["stages"].append(log)
        teacher.blip2.vision_model.requires_grad_(False)
        student_dir = out / "student"
        if is_complete(student_dir) and _encoder_differs(teacher.blip2, student_dir / "model.safetensors"):
            # a finished student whose teacher was deleted, on an encoder built again otherwise: reused, the pair would
            # not share its encoder; found before the teacher's minutes
            raise PretrainMismatch(f"{student_dir} was trained on another image encoder than this build's (its teacher "
                                   f"was deleted and built again); delete {student_dir} to train it again on this one")
        report["stages"].append(_train_answering(teacher, "teacher", "broad", config.teacher_steps, config, progress))
    if is_complete(out / "student"):
        report["stages"].append({"stage": "student", "reused": True})
        return report
    share_vision_encoder(teacher, student, check=False)
    report["stages"].append(_train_answering(student, "student", "source", config.student_steps, config, progress))
    return report
