"""AKD: adapter-based knowledge distillation in the cloud (Wang et al., CVPR 2024, Sec. 3.3, Eq. 5-6).

Per round, on the buffered uncertain samples (visual tokens + mask as uploaded by UTS, or full images):

1. The teacher pseudo-labels them: its greedy answers, attending only to the uploaded tokens.
2. The cloud copy of the student trains its trainable set (LoRA, query tokens, norms, biases) on
   ``L = λq·L_query + λr·L_repr + λce·L_CE + λkl·L_KL``:

   * ``L_query`` (Eq. 5): MSE between the teacher's Q-Former query outputs and ϕ(student query outputs), ϕ a
     learned linear map (the widths may differ);
   * ``L_repr``: MSE between the teacher's last LM hidden states at the answer positions and ψ(the
     student's), ψ another learned linear map -- the attention-driven multimodal representations;
   * ``L_CE``: cross-entropy of the student on the pseudo labels;
   * ``L_KL`` (beyond the paper): temperature-scaled KL between the teacher's and the student's answer-token
     distributions (Hinton et al. 2015), possible because they share a tokenizer.

   The defaults are not the paper's weights (``λq = λr = λce = 1``): they are ``λq = λr = 3``, ``λkl = 2`` and
   ``λce = 0``. UTS uploads the samples the student finds hardest, where the teacher's greedy answers are wrong
   most often (5-9 points less accurate than on all samples, ``bench/README.md``); the KL term trains on the
   teacher's whole distribution, which carries its doubt, instead of on a hard label that hides it. After the
   ridge fit of ϕ and ψ the feature terms are 0.03-0.14 against 3-4 for CE, so at weight 1 they barely pull.
   Measured on three seeds per variant (``bench/sweep_adapt.py``), this is the one default that closes half of
   the teacher-student gap on every visual domain with the worst-seed source drop within 2 points.

ϕ and ψ live in the cloud only and are never sent; everything outside the trainable set stays bit-identical.
Rounds are continual: the same ``Distiller`` keeps the student, ϕ, ψ and the optimizer from round to round.

Beyond the paper, measured in ``bench/README.md``:

* ϕ and ψ are fitted in closed form (ridge regression) on the round's samples before it trains, so L_query
  and L_repr start from the best linear alignment and pull the student's representations toward the
  teacher's instead of toward a random map;
* **what the robot already knew is guarded** (learning without forgetting, Li & Hoiem 2016): the cloud keeps
  an *anchor* set of source-domain inputs (the data the student was pretrained on) with the base student's own
  answers; every step also trains on a replayed anchor batch, and a round publishes only weights whose answers
  on held-out anchors still agree with the base student's (``forget_tolerance``). A check that finds the
  constraint broken does not end the round's progress: the weights go back to the last admissible step and
  the anchor weight doubles for the rest of the round, the multiplier update of constrained learning
  (Chamon & Ribeiro, "Probably approximately correct constrained learning", NeurIPS 2020), so a round that
  drifts learns on under a firmer anchor instead of stopping at its last good step;
* the replay also holds **how the student reads source images**: the MSE between its Q-Former query outputs on the
  replayed anchors and the base student's (``lambda_anchor_query``; feature distillation for continual learning,
  Hou et al., CVPR 2019). The base student answers its own training images with certainty, so the replay's
  cross-entropy has almost no gradient until an answer flips, while unseen source digits near a decision boundary
  are already being misread; the query outputs move with the first step. It halved the worst-seed source drop on
  the committed stream (1.87 to 1.01) and cut it from 2.59 to 0.86 on the held-out shifts (``bench/README.md``);
* a held-out *check* slice of the round's uploads picks the step whose weights best predict the teacher's
  labels there (token log-likelihood, not exact-match, which is a noisy judge of captions).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdcca.data.sample import Sample
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import freeze_all_but_trainable, has_lora


@dataclass
class AKDConfig:
    """Weights and optimisation of a distillation round.

    Args:
        lambda_query: weight of L_query (Eq. 5).
        lambda_repr: weight of L_repr.
        lambda_ce: weight of L_CE on the teacher's pseudo labels (0 by default: L_KL carries the labels).
        lambda_kl: weight of L_KL (0 disables it).
        temperature: softmax temperature of L_KL.
        lr: AdamW learning rate of the trainable set, ϕ and ψ.
        steps: optimizer steps per round.
        batch_size: samples per step.
        seed: seed of batch sampling and dropout.
        pseudo_label_keep: fraction of the buffer, the teacher's most confident answers (lowest mean token
            entropy), that the round trains on; 1.0 uses all, as the paper. UTS uploads the samples the
            student finds hardest, where the teacher is wrong more often too (beyond the paper).
        check_fraction: share of the buffer held out of training to check the round (0 disables): every
            ``check_every`` steps the student's greedy answers on it are compared with the teacher's, and the
            round keeps the weights that agree best, the round's starting point included, so a round that
            drifts away from the teacher is undone instead of published (beyond the paper).
        check_every: optimizer steps between checks.
        check_min: the fewest held-out samples a check may rest on; smaller rounds train on everything
            unchecked (a handful of samples makes a noisy judge).
        fit_projections: fit ϕ and ψ by ridge regression on the round's samples before training.
        lambda_anchor: weight of the anchor replay loss (cross-entropy on the base student's own answers to
            source-domain inputs); needs anchors (``Distiller(anchors=...)``), 0 disables replay.
        anchor_batch: anchor samples replayed per step.
        lambda_anchor_query: weight (times the anchor weight's multiplier) of the MSE between the student's Q-Former
            query outputs on the replayed anchors and the base student's: how the robot reads source images is held,
            not only what it answers about them, whose gradient vanishes on images it answers with certainty
            (feature distillation for continual learning, as in Hou et al., CVPR 2019). Rides on the replay
            (``lambda_anchor > 0``); 0 disables it.
        forget_tolerance: largest drop, as a share of held-out anchors, of agreement with the base student's
            answers that a published round may have; checked every ``check_every`` steps (needs anchors).
        max_backtracks: a check below ``forget_tolerance`` sends the weights back to the last step within it
            and doubles the anchor weight for the rest of the round, at most this many times per round (0: a
            broken check only keeps those weights from being published).
        subspace_fold: train the round in a seeded random subspace of 1/``subspace_fold`` of the trainable set's
            dimensions (:class:`cdcca.dwc_format.SubspaceBasis`, one basis per round, its seed in
            :attr:`RoundReport.subspace_seed`), so the ``subspace`` codec sends the change losslessly but for its
            quantizer (beyond the paper; ``bench/downlink.md``). After each optimizer step the change since the
            round's start is projected onto the subspace; the trainable set's learning rate is multiplied by
            √fold, which keeps a step's length in the subspace what it is in the full space. 0: the full space.
        subspace_chunk: the basis's longest chunk (``SubspaceConfig.chunk``).
        subspace_seed: the round's basis seed instead of the one it draws (the draw is still made, so batches and
            everything else stay as they were; a benchmark's way to try other bases on the same round). ``None``:
            drawn, as the cloud does.
        average_last: the round ends on the mean of its weights over its last ``average_last`` steps instead of the
            last step's (stochastic weight averaging, Izmailov et al., UAI 2018: the mean sits in a flatter region,
            where the noise of a quantized delta costs less; ``bench/downlink.md``). A backtrack restarts the mean.
            In a subspace round the mean stays in the subspace. 0: the last step's weights.
        token_dropout: share of each uploaded sample's tokens hidden from the student at random at every training step
            (at least one stays; the teacher's targets are computed on all of them): an augmentation of the round's few
            frames, since a frame's answer survives losing most of its tokens (``bench/token_information.py``). 0: off.
        lambda_confident: weight of a cross-entropy on the teacher's answer tokens at the positions where the
            teacher gives its token at least ``confidence`` probability (temperature 1), averaged over every answer
            token: hard labels where the teacher is sure, its distribution (L_KL) everywhere (the confidence-masked
            pseudo-labels of FixMatch, Sohn et al., NeurIPS 2020). 0 disables it.
        confidence: the teacher's probability of its own token above which ``lambda_confident`` applies.
        label_views: also ask the teacher from this many views of each upload with a share ``label_view_drop`` of
            its tokens hidden at random, and label the sample with the answer most views give (the full view wins
            ties): a vote over token subsets, since a frame's answer survives losing most of its tokens
            (``bench/token_information.py``); test-time augmentation of the teacher. 0: the full view only.
        label_view_drop: share of an upload's tokens each extra view hides.
        anchor_projection: where the round's gradient would raise the replayed anchors' loss (a negative inner
            product with the anchor gradient), remove that component before adding the anchor gradient (A-GEM,
            Chaudhry et al., "Efficient lifelong learning with A-GEM", ICLR 2019): the round learns along every
            direction that does not undo what the robot knew, instead of trading the two in one weighted sum.
            Needs replay (``lambda_anchor > 0``); the two losses are differentiated apart (the same compute).
        guard_consensus: the forgetting guard checks only the held-out anchors whose base answer the teacher gives
            too, what the robot knew for sure, instead of every one: a change to an answer the teacher disputes (a
            caption reworded, a base answer that was wrong) is not forgetting. Label-free still (the teacher answers
            the held-out anchors once, when the distiller is made); every held-out anchor when none agree.
    """

    lambda_query: float = 3.0
    lambda_repr: float = 3.0
    lambda_ce: float = 0.0
    lambda_kl: float = 2.0
    temperature: float = 2.0
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 32
    seed: int = 0
    pseudo_label_keep: float = 1.0
    check_fraction: float = 0.0
    check_every: int = 10
    check_min: int = 3
    fit_projections: bool = True
    lambda_anchor: float = 1.0
    anchor_batch: int = 16
    lambda_anchor_query: float = 10.0
    forget_tolerance: float = 0.02
    max_backtracks: int = 3
    subspace_fold: int = 0
    subspace_chunk: int = 1024
    subspace_seed: int | None = None
    average_last: int = 0
    token_dropout: float = 0.0
    anchor_projection: bool = False
    lambda_confident: float = 0.0
    confidence: float = 0.9
    label_views: int = 0
    label_view_drop: float = 0.5
    guard_consensus: bool = False

    def __post_init__(self) -> None:
        for name in ("lambda_query", "lambda_repr", "lambda_ce", "lambda_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"AKDConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_query + self.lambda_repr + self.lambda_ce + self.lambda_kl == 0:
            raise ValueError("AKDConfig: at least one loss weight must be > 0")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"AKDConfig.temperature and lr must be > 0, got {self.temperature}, {self.lr}")
        if not 0.0 < self.pseudo_label_keep <= 1.0:
            raise ValueError(f"AKDConfig.pseudo_label_keep must be in (0, 1], got {self.pseudo_label_keep}")
        if not 0.0 <= self.check_fraction < 1.0 or self.check_every < 1:
            raise ValueError(f"AKDConfig needs 0 <= check_fraction < 1 and check_every >= 1, got "
                             f"{self.check_fraction}, {self.check_every}")  # fmt: skip
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"AKDConfig.steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.lambda_anchor_query < 0:
            raise ValueError(f"AKDConfig.lambda_anchor_query must be >= 0, got {self.lambda_anchor_query}")
        if self.lambda_anchor < 0 or self.anchor_batch < 1 or not 0.0 <= self.forget_tolerance <= 1.0:
            raise ValueError(f"AKDConfig needs lambda_anchor >= 0, anchor_batch >= 1 and forget_tolerance in [0, 1], "
                             f"got {self.lambda_anchor}, {self.anchor_batch}, {self.forget_tolerance}")  # fmt: skip
        if self.lambda_confident < 0 or not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"AKDConfig needs lambda_confident >= 0 and confidence in [0, 1], got "
                             f"{self.lambda_confident}, {self.confidence}")  # fmt: skip
        if self.label_views < 0 or not 0.0 <= self.label_view_drop < 1.0:
            raise ValueError(f"AKDConfig needs label_views >= 0 and label_view_drop in [0, 1), got "
                             f"{self.label_views}, {self.label_view_drop}")  # fmt: skip
        if not 0.0 <= self.token_dropout < 1.0:
            raise ValueError(f"AKDConfig.token_dropout must be in [0, 1), got {self.token_dropout}")
        if self.max_backtracks < 0:
            raise ValueError(f"AKDConfig.max_backtracks must be >= 0, got {self.max_backtracks}")
        if not 0 <= self.average_last <= self.steps:
            raise ValueError(f"AKDConfig.average_last must be in [0, steps={self.steps}], got {self.average_last}")
        if self.subspace_fold < 0 or self.subspace_chunk < 1 or self.subspace_chunk & (self.subspace_chunk - 1):
            raise ValueError(f"AKDConfig.subspace_fold must be >= 0 and subspace_chunk a power of two, got "
                             f"{self.subspace_fold}, {self.subspace_chunk}")  # fmt: skip


@dataclass
class DistillSample:
    """One buffered sample as the cloud has it: visual tokens, which of them were uploaded, and the prompt.

    Attributes:
        sample_id: the robot's id of the sample.
        tokens: (N, D) visual tokens (zeros where not uploaded).
        token_mask: (N,) 1 for uploaded tokens.
        prompt: the question or instruction.
        message_id: the ``UtsTokens.sample_id`` of the message that carried it (what the cloud stores, acks and
            quarantines; a message carries every uploaded prompt about one frame). Default: ``sample_id``.
    """

    sample_id: str
    tokens: torch.Tensor
    token_mask: torch.Tensor
    prompt: str
    message_id: str = ""

    def __post_init__(self) -> None:
        self.message_id = self.message_id or self.sample_id

    @classmethod
    def from_uts(cls, msg, **bounds: int | None) -> list[DistillSample]:
        """The samples of a received ``UtsTokens`` message: one per prompt it carries, sharing its tokens;
        ``bounds``: the receiver's ``num_tokens`` and ``token_dim`` (:func:`cdcca.uts.unpack_tokens`)."""
        from cdcca.uts import frame_prompts, unpack_tokens

        prompts = frame_prompts(msg)
        tokens, mask = unpack_tokens(msg, **bounds)
        return [cls(p.sample_id, tokens[0], mask[0], p.prompt, msg.sample_id) for p in prompts]

    @classmethod
    def from_samples(cls, encoder_owner: MLLM, samples: Sequence[Sample]) -> list[DistillSample]:
        """Full-image samples with every token kept (the shared encoder runs here instead of on the robot)."""
        with torch.inference_mode():
            tokens = encoder_owner.visual_tokens(encoder_owner.preprocess([s.load_image() for s in samples]))
        mask = torch.ones(tokens.shape[1], dtype=torch.long)
        return [cls(s.sample_id, tokens[i].clone(), mask, s.prompt) for i, s in enumerate(samples)]


@dataclass
class RoundReport:
    """What a round did: sizes, mean losses over its last steps, time, and the teacher's pseudo labels
    (one per buffered sample, aligned with the round's input). When the round was checked: the step whose
    weights were kept (0 = the round was undone), the check slice's mean log-likelihood of the teacher's
    labels at the start and for the kept weights, and the held-out anchors' agreement with the base student
    at the start and for the kept weights."""

    samples: int
    steps: int
    losses: dict[str, float]
    seconds: float
    pseudo_label_seconds: float
    pseudo_labels: list[str]
    kept_step: int | None = None
    check_score: tuple[float, float] | None = None
    anchor_agreement: tuple[float, float] | None = None
    backtracks: int = 0
    subspace_seed: int | None = None  # the basis the round trained in (AKDConfig.subspace_fold > 0)


ANCHOR_IMAGES = 64  # source images the cloud keeps as anchors: half replayed, half the forgetting guard


def source_anchors(model: MLLM, images: int = ANCHOR_IMAGES) -> list[DistillSample]:
    """The embedded pair's anchor set: ``images`` images of the student's pretraining domain (digits-shift
    ``source``, ``train`` split), one sample per task each, with every visual token. ``cdcca cloud``, ``make demo``
    and ``cdcca bench adapt`` keep the same set."""
    from cdcca.data.digits_shift import SOURCE_DOMAIN, load_domain

    return DistillSample.from_samples(model, load_domain(SOURCE_DOMAIN, "train", limit=images))


@torch.no_grad()
def fit_linear(layer: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2) -> None:
    """Set ``layer`` to the ridge-regression fit of (n, in) ``inputs`` onto (n, out) ``targets``."""
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)  # (n, in + 1)
    penalty = ridge * len(inputs) * torch.eye(design.shape[1], dtype=inputs.dtype)
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(design.T @ design + penalty, design.T @ targets)  # (in + 1, out)
    layer.weight.copy_(solution[:-1].T)
    layer.bias.copy_(solution[-1])


def drop_tokens(mask: torch.Tensor, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) token mask -> the same with each kept token hidden with probability ``share``, but for each row's first
    kept token, so every sample keeps one (``AKDConfig.token_dropout``)."""
    hidden = torch.rand(mask.shape, generator=generator) < share
    hidden[torch.arange(len(mask)), mask.float().argmax(dim=1)] = False
    return mask & ~hidden


def _vote(full: str, views: Sequence[str]) -> str:
    """The answer most of ``[full, *views]`` give; ``full`` wins a tie it is part of."""
    counts = Counter([full, *views])
    best = max(counts.values())
    return full if counts[full] == best else next(answer for answer in views if counts[answer] == best)


@dataclass
class TeacherTarget:
    """The teacher's side of one sample's distillation terms (:meth:`Distiller.teacher_targets`).

    Attributes:
        queries: (Q, Dt) the teacher's Q-Former query outputs (the target of L_query).
        answer_hidden: (A, Ht) its last LM hidden states at the sample's A answer positions (the target of L_repr;
            the LM head turns them into the logits of L_KL).
    """

    queries: torch.Tensor
    answer_hidden: torch.Tensor


@torch.inference_mode()
def greedy_answers(model: MLLM, samples: Sequence[DistillSample], batch_size: int = 128) -> list[str]:
    """``model``'s greedy answers to ``samples``, each attending only to its kept tokens, ``batch_size`` at a time."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        tokens, mask = torch.stack([s.tokens for s in batch]), torch.stack([s.token_mask for s in batch])
        answers += model.generate([s.prompt for s in batch], visual_tokens=tokens, token_mask=mask).texts
    return answers


class Distiller:
    """Teacher -> cloud student distillation through the trainable set.

    Args:
        teacher: the large cloud model (frozen).
        student: the cloud copy of the robot's student, LoRA already injected (``models.add_lora``), as the
            robot received it (its answers to ``anchors`` are what the robot already knows).
        config: loss weights and optimisation.
        anchors: source-domain inputs the student was pretrained on (full tokens); half are replayed during
            training, half check that a round forgets nothing (see :class:`AKDConfig`). ``None``: no guard.
    """

    def __init__(self, teacher: MLLM, student: MLLM, config: AKDConfig | None = None,
                 anchors: Sequence[DistillSample] | None = None) -> None:  # fmt: skip
        if not has_lora(student):
            raise ValueError("the student needs its LoRA adapters before distillation (models.add_lora)")
        if teacher.num_query_tokens != student.num_query_tokens:
            raise ValueError(
                f"L_query pairs query tokens one to one: teacher has {teacher.num_query_tokens}, "
                f"student {student.num_query_tokens}"
            )
        self.teacher, self.student, self.config = teacher.eval(), student, config or AKDConfig()
        teacher.blip2.requires_grad_(False)
        self.trainable = freeze_all_but_trainable(student)
        width = lambda m, key: getattr(m.blip2.config, key).hidden_size  # noqa: E731
        generator = torch.Generator().manual_seed(self.config.seed)
        self.phi = nn.Linear(width(student, "qformer_config"), width(teacher, "qformer_config"))  # Eq. 5
        self.psi = nn.Linear(width(student, "text_config"), width(teacher, "text_config"))
        for layer in (self.phi, self.psi):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5, generator=generator)
            nn.init.zeros_(layer.bias)
        params = [*self.trainable.values(), *self.phi.parameters(), *self.psi.parameters()]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        scale = math.sqrt(self.config.subspace_fold) if self.config.subspace_fold else 1.0
        groups = [{"params": list(self.trainable.values()), "lr": self.config.lr * scale},
                  {"params": [*self.phi.parameters(), *self.psi.parameters()]}]  # fmt: skip
        self.optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=0.0)
        self._params = params
        self.rounds = 0
        self._head_checked = False  # teacher_targets checks once that the LM head rebuilds the teacher's logits
        anchors = list(anchors or [])
        labels = self._greedy(self.student, anchors) if anchors else []
        self.anchor_replay = (anchors[1::2], labels[1::2])  # trained on: the base student's own answers
        self.anchor_check = (anchors[0::2], labels[0::2])  # never trained on: the forgetting guard
        if self.config.guard_consensus and self.anchor_check[0]:
            checked, base = self.anchor_check
            sure = [i for i, answer in enumerate(self._greedy(self.teacher, checked)) if answer == base[i]]
            if sure:  # what the robot knew that the teacher confirms; none: every held-out anchor, as without
                self.anchor_check = ([checked[i] for i in sure], [base[i] for i in sure])
        self.anchor_queries = None  # the base student's query outputs on the replayed anchors (lambda_anchor_query)
        if self.anchor_replay[0] and self.config.lambda_anchor_query > 0:
            with torch.inference_mode():
                self.anchor_queries = self.student.eval().query_outputs(*self._stack(self.anchor_replay[0])).clone()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's per-parameter state as flat tensors (``"<index>.<key>"``, index into the trainable set, ϕ, ψ),
        for safetensors: with it a restarted cloud continues the moments instead of starting them over."""
        return {f"{index}.{key}": torch.as_tensor(value).detach().clone() for index, param in enumerate(self._params)
                for key, value in self.optimizer.state.get(param, {}).items()}  # fmt: skip

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`optimizer_state` returned; raises ``ValueError`` if it is for other parameters."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            index, _, key = name.partition(".")
            if not index.isdigit() or int(index) >= len(self._params) or not key:
                raise ValueError(f"optimizer state entry {name!r} does not name one of {len(self._params)} parameters")
            state.setdefault(int(index), {})[key] = value
        for index, entry in state.items():
            shape = self._params[index].shape
            if set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
                raise ValueError(f"optimizer state of parameter {index} has {sorted(entry)}, not AdamW's "
                                 "step, exp_avg and exp_avg_sq")  # fmt: skip
            if entry["exp_avg"].shape != shape or entry["exp_avg_sq"].shape != shape:
                raise ValueError(f"optimizer state of parameter {index} is not shaped {tuple(shape)}")
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    @torch.inference_mode()
    def pseudo_label(self, samples: Sequence[DistillSample], batch_size: int = 128) -> list[str]:
        """The teacher's greedy answers, attending only to each sample's uploaded tokens."""
        return self._pseudo_label(samples, batch_size)[0]

    @torch.inference_mode()
    def _pseudo_label(self, samples: Sequence[DistillSample], batch_size: int = 128) -> tuple[list[str], np.ndarray]:
        labels: list[str] = []
        entropies = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            tokens, mask = self._stack(batch)
            generation = self.teacher.generate([s.prompt for s in batch], visual_tokens=tokens, token_mask=mask)
            texts = generation.texts
            if self.config.label_views:
                generator = torch.Generator().manual_seed(int(np.random.default_rng(
                    [self.config.seed, self.rounds, start]).integers(2**62)))  # fmt: skip
                drop = self.config.label_view_drop
                views = [self.teacher.generate([s.prompt for s in batch], visual_tokens=tokens,
                                               token_mask=drop_tokens(mask, drop, generator)).texts
                         for _ in range(self.config.label_views)]  # fmt: skip
                texts = [_vote(full, [view[i] for view in views]) for i, full in enumerate(texts)]
            labels += texts
            entropies.append(generation.sample_entropy.cpu().numpy())
        return labels, np.concatenate(entropies)

    @staticmethod
    def _stack(batch: Sequence[DistillSample]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([s.tokens for s in batch]), torch.stack([s.token_mask for s in batch])

    _greedy = staticmethod(greedy_answers)

    def _student_lm(self, batch: Sequence[DistillSample], labels: Sequence[str], token_dropout: float = 0.0):
        tokens, mask = self._stack(batch)
        if token_dropout > 0:
            mask = drop_tokens(mask, token_dropout)
        queries = self.student.query_outputs(tokens, mask)  # (B, Q, Ds)
        return queries, self.student.lm_forward(self.student.blip2.language_projection(queries),
                                                [s.prompt for s in batch], labels)  # fmt: skip

    @torch.no_grad()
    def teacher_targets(self, samples: Sequence[DistillSample], labels: Sequence[str],
                        batch_size: int = 128) -> list[TeacherTarget]:  # fmt: skip
        """The teacher's side of the objective for each sample and its label: its Q-Former query outputs and its
        last LM hidden states at the answer positions, ``batch_size`` samples per forward. The teacher is frozen and
        in eval mode, so a round computes them once for its whole buffer instead of once per step; its answer
        logits are the LM head applied to those hidden states (what the causal LM's own forward does after its
        final norm), recomputed per step rather than kept, so the cache stays small with a large vocabulary."""
        if len(labels) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
        targets: list[TeacherTarget] = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            queries = self.teacher.query_outputs(*self._stack(batch))  # (B, Q, Dt)
            out = self.teacher.lm_forward(self.teacher.blip2.language_projection(queries), [s.prompt for s in batch],
                                          labels[start : start + batch_size])  # fmt: skip
            hidden, positions = out.hidden[:, :-1], out.answer_positions
            if not self._head_checked:  # once: L_KL rebuilds the teacher's logits from these states
                rebuilt = self.teacher.lm.get_output_embeddings()(hidden[positions])
                if not torch.allclose(rebuilt, out.logits[:, :-1][positions], rtol=1e-4, atol=1e-4):
                    raise ValueError("the teacher's LM head applied to its last hidden states does not give its logits "
                                     "(a logit soft-cap or scale after the head?); AKD's L_KL needs a causal LM whose "
                                     "logits are its output embeddings applied to the last hidden state")  # fmt: skip
                self._head_checked = True
            targets += [TeacherTarget(queries[i], hidden[i][positions[i]]) for i in range(len(batch))]
        return targets

    def losses(
        self,
        batch: Sequence[DistillSample],
        labels: Sequence[str],
        anchors: tuple[Sequence[DistillSample], Sequence[str]] | None = None,
        anchor_scale: float = 1.0,
        anchor_queries: torch.Tensor | None = None,
        targets: Sequence[TeacherTarget] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of the AKD objective on one batch (unweighted), plus ``total`` (weighted); ``anchors``
        adds the replay term on (anchor inputs, the base student's answers), weighted ``lambda_anchor`` times
        ``anchor_scale``, and with ``anchor_queries`` (the base student's (B, Q, D) query outputs on those inputs)
        the MSE of the student's to them, weighted ``lambda_anchor_query`` times ``anchor_scale``. ``targets``: the
        teacher's side of each sample as :meth:`teacher_targets` computed it for these labels (default: computed
        here)."""
        targets = self.teacher_targets(batch, labels) if targets is None else targets
        teacher_queries = torch.stack([t.queries for t in targets])  # (B, Q, Dt)
        teacher_hidden = torch.cat([t.answer_hidden for t in targets])  # (A, Ht), the answer positions in order
        dropout = self.config.token_dropout if self.student.training else 0.0
        student_queries, student_out = self._student_lm(batch, labels, dropout)  # (B, Q, Ds)
        s_pos = student_out.answer_positions
        terms = {
            "query": F.mse_loss(self.phi(student_queries), teacher_queries),
            "repr": F.mse_loss(self.psi(student_out.hidden[:, :-1][s_pos]), teacher_hidden),
            "ce": student_out.loss,
        }
        if self.config.lambda_kl > 0 or self.config.lambda_confident > 0:
            with torch.no_grad():
                teacher_logits = self.teacher.lm.get_output_embeddings()(teacher_hidden)  # (A, V)
        if self.config.lambda_kl > 0:
            temperature = self.config.temperature
            teacher_logp = (teacher_logits / temperature).log_softmax(-1)
            student_logp = (student_out.logits[:, :-1][s_pos] / temperature).log_softmax(-1)
            terms["kl"] = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * temperature**2
        if self.config.lambda_confident > 0:
            answer = student_out.labels[:, 1:][s_pos]  # (A,) the teacher's tokens
            with torch.no_grad():
                sure = teacher_logits.softmax(-1).gather(1, answer[:, None])[:, 0] >= self.config.confidence
            token_ce = F.cross_entropy(student_out.logits[:, :-1][s_pos], answer, reduction="none")
            terms["confident"] = (token_ce * sure).sum() / max(1, answer.numel())
        if anchors is not None and self.config.lambda_anchor > 0:
            replayed_queries, replayed = self._student_lm(*anchors)
            terms["anchor"] = replayed.loss
            if anchor_queries is not None:
                terms["anchor_query"] = F.mse_loss(replayed_queries, anchor_queries)
        weights = {"query": self.config.lambda_query, "repr": self.config.lambda_repr, "ce": self.config.lambda_ce,
                   "kl": self.config.lambda_kl, "confident": self.config.lambda_confident,
                   "anchor": self.config.lambda_anchor * anchor_scale,
                   "anchor_query": self.config.lambda_anchor_query * anchor_scale}  # fmt: skip
        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        if self.config.anchor_projection and "anchor" in terms:  # the round's and the replay's shares (_backward)
            replay = ("anchor", "anchor_query")
            terms["split"] = (sum(weights[name] * value for name, value in terms.items() if name in weights
                                  and name not in replay),
                              sum(weights[name] * value for name, value in terms.items() if name in replay))
        return terms

    def _backward(self, terms: dict[str, torch.Tensor]) -> None:
        """Gradients of ``terms["total"]`` into ``.grad``; with ``anchor_projection`` and a replayed anchor
        (``terms["split"]``: the round's and the replay's weighted sums, removed here), the round's part is first
        cleared of its component against the anchors' gradient (:class:`AKDConfig`)."""
        split = terms.pop("split", None)
        if split is None:
            terms["total"].backward()
            return
        params, (round_loss, anchor) = self._params, split
        task = torch.autograd.grad(round_loss, params, allow_unused=True)
        kept = torch.autograd.grad(anchor, params, allow_unused=True)
        task = [g if g is not None else torch.zeros_like(p) for g, p in zip(task, params)]
        kept = [g if g is not None else torch.zeros_like(p) for g, p in zip(kept, params)]
        dot = sum((g * r).sum() for g, r in zip(task, kept))
        norm = sum((r * r).sum() for r in kept)
        scale = float(dot / norm) if dot < 0 and norm > 0 else 0.0
        for param, g, r in zip(params, task, kept):
            param.grad = g - scale * r + r

    @torch.no_grad()
    def fit_projections(self, samples: Sequence[DistillSample], labels: Sequence[str],
                        targets: Sequence[TeacherTarget] | None = None) -> None:  # fmt: skip
        """ϕ and ψ as the ridge fits of the student's query outputs / answer hidden states onto the teacher's,
        on ``samples`` (their optimizer moments restart, since the maps jumped); ``targets`` as in :meth:`losses`."""
        self.student.eval()
        targets = self.teacher_targets(samples, labels) if targets is None else targets
        student_queries, student_out = self._student_lm(samples, labels)
        fit_linear(self.phi, student_queries.flatten(0, 1), torch.cat([t.queries for t in targets]))
        fit_linear(self.psi, student_out.hidden[:, :-1][student_out.answer_positions],
                   torch.cat([t.answer_hidden for t in targets]))  # fmt: skip
        for param in (*self.phi.parameters(), *self.psi.parameters()):
            self.optimizer.state.pop(param, None)

    @torch.inference_mode()
    def _check_score(self, samples: Sequence[DistillSample], labels: Sequence[str]) -> float:
        """Mean log-likelihood per answer token of the teacher's ``labels`` under the student (higher is better)."""
        self.student.eval()
        return -float(self._student_lm(samples, labels)[1].loss)

    def _anchor_agreement(self) -> float:
        """Share of held-out anchors the student answers exactly as the base student did."""
        samples, labels = self.anchor_check
        return float(np.mean([a == b for a, b in zip(self._greedy(self.student, samples), labels)]))

    def _average_gradients(self) -> None:
        """Data parallelism as DDP does it: every rank's gradient of its shard, summed and averaged in one
        all-reduce (gloo on CPU, nccl on GPU), so every rank takes the identical optimizer step."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for param, grad in zip(self._params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable.items()}

    def run_round(self, samples: Sequence[DistillSample]) -> RoundReport:
        """Pseudo-label the buffer, then ``config.steps`` optimizer steps on it; the student changes in place. The
        teacher's side of the loss is computed once for the buffer (:meth:`teacher_targets`), not at every step: a
        round takes 1.4x less time with the same weights (``bench/round_time.py``).

        With a check slice or anchors, every ``check_every`` steps the weights are scored, and the round keeps
        the best-scoring weights among those that still agree with the base student on the held-out anchors
        (step 0, the round's starting point, is always admissible; without a check slice the latest
        admissible step wins).

        Under ``torch.distributed`` (e.g. ``torchrun --nproc-per-node N``) every rank draws the same batch,
        trains on its 1/N shard, and gradients are averaged across ranks before each step; ranks that start
        equal stay bit-identical."""
        if not samples:
            raise ValueError("a distillation round needs at least one sample")
        started = time.perf_counter()
        config = self.config
        labels, entropy = self._pseudo_label(samples)
        all_labels = list(labels)
        if config.pseudo_label_keep < 1.0:  # train on the teacher's most confident answers only
            count = max(1, int(round(config.pseudo_label_keep * len(samples))))
            chosen = np.argsort(entropy, kind="stable")[:count]
            samples, labels = [samples[i] for i in chosen], [labels[i] for i in chosen]
        labelled = time.perf_counter()
        rng = np.random.default_rng([config.seed, self.rounds])
        torch.manual_seed(int(rng.integers(2**62)))
        check: tuple[list[DistillSample], list[str]] | None = None
        held = int(round(config.check_fraction * len(samples)))
        if config.check_fraction > 0 and held >= config.check_min and held < len(samples):
            # whole uploads, in random order, until ``held`` are out: a frame's prompts share its tokens, so none of
            # them is both trained on and checked
            by_upload: dict[str, list[int]] = {}
            for i, s in enumerate(samples):
                by_upload.setdefault(s.message_id, []).append(i)
            groups = list(by_upload.values())
            checked: list[int] = []
            trained: list[int] = []
            for u in rng.permutation(len(groups)):
                (checked if len(checked) < held else trained).extend(groups[u])
            if trained:
                check = ([samples[i] for i in checked], [labels[i] for i in checked])
                samples, labels = [samples[i] for i in trained], [labels[i] for i in trained]
        targets = self.teacher_targets(samples, labels)  # the teacher is frozen: once per round, not per step
        if config.fit_projections:
            self.fit_projections(samples[:64], labels[:64], targets[:64])
        subspace = self._round_subspace(rng) if config.subspace_fold else None
        start = self._snapshot() if subspace is not None else None
        guard = bool(self.anchor_check[0])
        floor = 1.0 - config.forget_tolerance
        start_score = self._check_score(*check) if check is not None else None
        start_anchor = self._anchor_agreement() if guard else None
        best = (start_score, 0, self._snapshot(), start_anchor)  # (score, step, weights, anchor agreement)
        self.student.train()
        self.student.blip2.vision_model.eval()
        replay = self.anchor_replay if self.anchor_replay[0] and config.lambda_anchor > 0 else None
        history: dict[str, list[float]] = {}
        backtracks, anchor_scale = 0, 1.0
        average: dict[str, torch.Tensor] | None = None  # running mean of the last steps' weights (average_last)
        averaged = 0
        for step in range(1, config.steps + 1):
            index = rng.choice(len(samples), size=min(config.batch_size, len(samples)), replace=False)
            index = index[self.rank :: self.world_size] if len(index) >= self.world_size else index
            anchors, base_queries = None, None
            if replay is not None:
                pick = rng.choice(len(replay[0]), size=min(config.anchor_batch, len(replay[0])), replace=False)
                anchors = ([replay[0][i] for i in pick], [replay[1][i] for i in pick])
                base_queries = self.anchor_queries[pick] if self.anchor_queries is not None else None
            terms = self.losses([samples[i] for i in index], [labels[i] for i in index], anchors, anchor_scale,
                                base_queries, [targets[i] for i in index])  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(terms)
            if self.world_size > 1:
                self._average_gradients()
            torch.nn.utils.clip_grad_norm_(self._params, 1.0)
            self.optimizer.step()
            if subspace is not None:
                self._project(subspace, start)
            if config.average_last and step > config.steps - config.average_last:
                averaged += 1
                average = self._running_mean(average, averaged, load=step == config.steps)
            for name, value in terms.items():
                history.setdefault(name, []).append(float(value.detach()))
            if (check is not None or guard) and (step % config.check_every == 0 or step == config.steps):
                agreement = self._anchor_agreement() if guard else None
                if agreement is None or agreement >= min(floor, start_anchor):
                    score = self._check_score(*check) if check is not None else None
                    if check is None or score > best[0]:
                        best = (score, step, self._snapshot(), agreement)
                elif backtracks < config.max_backtracks and step < config.steps:
                    backtracks += 1  # back to the last admissible weights, under a firmer anchor
                    anchor_scale *= 2.0
                    average, averaged = None, 0
                    with torch.no_grad():
                        for name, param in self.trainable.items():
                            param.copy_(best[2][name])
                self.student.train()
                self.student.blip2.vision_model.eval()
        self.student.eval()
        checked = check is not None or guard
        if checked:
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(best[2][name])
        self.rounds += 1
        tail = max(1, config.steps // 10)
        return RoundReport(
            samples=len(samples), steps=config.steps,
            losses={name: float(np.mean(values[-tail:])) for name, values in history.items()},
            seconds=time.perf_counter() - started, pseudo_label_seconds=labelled - started,
            pseudo_labels=all_labels, kept_step=best[1] if checked else None,
            check_score=(start_score, best[0]) if check is not None else None,
            anchor_agreement=(start_anchor, best[3]) if guard else None, backtracks=backtracks,
            subspace_seed=subspace.seed if subspace is not None else None,
        )  # fmt: skip

    @torch.no_grad()
    def _running_mean(self, average: dict[str, torch.Tensor] | None, count: int,
                      load: bool) -> dict[str, torch.Tensor]:  # fmt: skip
        """The trainable set's running mean with the current weights as its ``count``-th term; ``load`` puts the mean
        into the trainable set."""
        if average is None:
            average = {name: param.detach().clone() for name, param in self.trainable.items()}
        else:
            for name, param in self.trainable.items():
                average[name] += (param.detach() - average[name]) / count
        if load:
            for name, param in self.trainable.items():
                param.copy_(average[name])
        return average

    def _round_subspace(self, rng: np.random.Generator):
        """This round's random subspace of the trainable set (in its order, the layout the codec sees)."""
        from cdcca.dwc_format import SubspaceBasis

        numels = tuple(p.numel() for p in self.trainable.values())
        seed = int(rng.integers(2**62))
        seed = seed if self.config.subspace_seed is None else self.config.subspace_seed
        return SubspaceBasis(numels, self.config.subspace_fold, self.config.subspace_chunk, seed)

    @torch.no_grad()
    def _project(self, subspace, start: dict[str, torch.Tensor]) -> None:
        """θ = θ_start + BBᵀ(θ − θ_start) for each trainable tensor: the change stays in the round's subspace."""
        params = list(self.trainable.items())
        change = {i: (param - start[name]).reshape(-1).double().numpy() for i, (name, param) in enumerate(params)}
        kept = subspace.expand_many(subspace.coefficients_many(change))
        for index, (name, param) in enumerate(params):
            param.copy_(start[name] + torch.from_numpy(kept[index]).to(param.dtype).reshape(param.shape))
