"""One-knob sweep of CD-CCA's round around the project defaults, per visual domain and seed.

Each variant changes one or two fields of :class:`~cdcca.akd.AKDConfig` or :class:`~cdcca.uts.UTSConfig`
against the defaults that ``cdcca cloud``, ``make demo`` and ``cdcca bench adapt`` use, and runs the whole
digits-shift stream exactly as ``bench adapt``'s ``cdcca`` row does (same anchors, same test split, same
seeds). It answers "would another default close more of the gap on every domain?" with per-domain, per-seed
accuracy and the source drop, so a knob that helps one domain and hurts another shows as such.

Run: ``python bench/sweep_adapt.py --variants default feat3 --seeds 0 1 2 --json bench/results/sweep_adapt.json``
(needs ``cdcca pretrain``; about two minutes per variant and seed on one core). Results are appended to the
JSON's ``runs`` list when it exists, so a sweep can be extended a few runs at a time.

``--domains heldout`` runs the stream of ``bench/heldout_shifts.py`` instead (shifts written after the defaults
were chosen; results in ``bench/results/heldout_adapt.json``), with the ``source-only`` and ``pl`` rows of
``bench adapt`` as variants, and reports the share of the teacher-student gap each variant closes per domain.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from cdcca.akd import AKDConfig
from cdcca.benchmarks import adapt
from cdcca.data.digits_shift import DOMAINS, SOURCE_DOMAIN, load_domain
from cdcca.evaluate import evaluate
from cdcca.models.checkpoint import load_mllm
from cdcca.models.trainable import LoraSettings
from cdcca.paths import checkpoint_dir
from cdcca.report import checkpoint_fingerprint, environment, format_table
from cdcca.uts import UTSConfig

# Every variant but ``default`` is a change of the round before the KL + features default (the first row),
# spelled out here in full so a run's JSON still means what it meant when the default moves on.
BEFORE = {"lambda_query": 1.0, "lambda_repr": 1.0, "lambda_ce": 1.0, "lambda_kl": 1.0}
# Every linear of a Q-Former layer that reads the queries or the visual tokens (self-attention, cross-attention
# with its key, the query feed-forward both ways); the default adapts four of them.
QFORMER_ALL = ("attention.attention.query", "attention.attention.value", "attention.output.dense",
               "crossattention.attention.query", "crossattention.attention.key", "crossattention.attention.value",
               "crossattention.output.dense", "intermediate_query.dense", "output_query.dense")  # fmt: skip
EVERY_TOKEN = {"sample_fraction": 1.0, "token_keep_ratio": 1.0}  # PL's upload: every sample, every token
VARIANTS: dict[str, dict[str, dict]] = {
    "default": {"akd": {}, "uts": {}},  # today's AKDConfig / UTSConfig defaults (= "kl-feat3" + "anchor-query10")
    "before-kl-feat3": {"akd": {**BEFORE}, "uts": {}},  # the default until kl-feat3 replaced it
    "steps120": {"akd": {**BEFORE, "steps": 120}, "uts": {}},
    "lr2e-3": {"akd": {**BEFORE, "lr": 2e-3}, "uts": {}},
    "frac0.75": {"akd": {**BEFORE}, "uts": {"sample_fraction": 0.75}},
    "frac1.0": {"akd": {**BEFORE}, "uts": {"sample_fraction": 1.0}},
    "keep0.75": {"akd": {**BEFORE}, "uts": {"token_keep_ratio": 0.75}},
    "soft": {"akd": {**BEFORE, "lambda_kl": 2.0, "lambda_ce": 0.5}, "uts": {}},
    "kl-only": {"akd": {**BEFORE, "lambda_kl": 2.0, "lambda_ce": 0.0}, "uts": {}},
    "feat3": {"akd": {**BEFORE, "lambda_query": 3.0, "lambda_repr": 3.0}, "uts": {}},
    "feat5": {"akd": {**BEFORE, "lambda_query": 5.0, "lambda_repr": 5.0}, "uts": {}},
    "anchor0.5": {"akd": {**BEFORE, "lambda_anchor": 0.5}, "uts": {}},
    "no-backtrack": {"akd": {**BEFORE, "max_backtracks": 0}, "uts": {}},
    "kl-feat3": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 3.0, "lambda_repr": 3.0}, "uts": {}},
    "kl-feat3-ce0.5": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.5, "lambda_query": 3.0, "lambda_repr": 3.0},
                       "uts": {}},
    "kl-feat5": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 5.0, "lambda_repr": 5.0}, "uts": {}},
    "kl-feat3-a128": {"akd": {"lambda_kl": 2.0, "lambda_ce": 0.0, "lambda_query": 3.0, "lambda_repr": 3.0},
                      "uts": {}, "bench": {"anchor_images": 128}},
    "plk0.75": {"akd": {**BEFORE, "pseudo_label_keep": 0.75}, "uts": {}},
    "tol0.01": {"akd": {**BEFORE, "forget_tolerance": 0.01}, "uts": {}},
    "frac1.0-keep0.25": {"akd": {}, "uts": {"sample_fraction": 1.0, "token_keep_ratio": 0.25}},  # same bytes
    "frac0.75-keep0.33": {"akd": {}, "uts": {"sample_fraction": 0.75, "token_keep_ratio": 0.33}},  # same bytes
    "keep0.25": {"akd": {}, "uts": {"token_keep_ratio": 0.25}},  # Table 4 over seeds: UTS tokens ...
    "random0.25": {"akd": {}, "uts": {"token_keep_ratio": 0.25}, "tokens": "random"},  # ... against random ones
    "random0.5": {"akd": {}, "uts": {}, "tokens": "random"},
    # a sharper token ranking: 32 MC passes instead of 8 (bench/uts_passes.py: 8 passes share 59-70 % of the kept
    # tokens with a 128-pass estimate), against random tokens at the same bytes
    "mc32": {"akd": {}, "uts": {"mc_passes": 32}},
    "mc32-keep0.25": {"akd": {}, "uts": {"mc_passes": 32, "token_keep_ratio": 0.25}},
    "mc6": {"akd": {}, "uts": {"mc_passes": 6}},  # fewer passes: three quarters of stage 2's cost on the robot
    # 7 passes measured around the dropout-free tokens: 8 passes' ranking at 7/8 of the cost (bench/uts_passes.py)
    "mc7-centred": {"akd": {}, "uts": {"mc_passes": 7, "mc_center": "deterministic"}},
    "kl-t1": {"akd": {"temperature": 1.0}, "uts": {}},  # the teacher's distribution unsoftened
    "kl-t1.5": {"akd": {"temperature": 1.5}, "uts": {}},
    "frame-prompts": {"akd": {}, "uts": {"upload_prompts": "frame"}},  # every prompt of an uploaded frame rides along
    # the benchmark's own rows, for a stream of other domains (--domains)
    "swa20": {"akd": {"average_last": 20}, "uts": {}},  # the round ends on the mean of its last 20 of 60 steps
    "swa30": {"akd": {"average_last": 30}, "uts": {}},
    # LoRA capacity (LoraSettings): the rank everywhere, and the Q-Former linears the adapters reach
    "lora-r16": {"akd": {}, "uts": {}, "lora": {"rank": 16, "alpha": 32}},
    "lora-r4": {"akd": {}, "uts": {}, "lora": {"rank": 4, "alpha": 8}},
    "qformer-all": {"akd": {}, "uts": {}, "lora": {"qformer_modules": QFORMER_ALL}},
    # the rounds `cdcca cloud` trains under its default codec (`subspace`, CloudConfig): 1/8 of the trainable set,
    # twice the steps, ending on the mean of the last third (the downlink taken as lossless, as in bench adapt); and
    # with three times the steps or at twice the rate, two ways to let them learn more (measured, not kept)
    "subspace8": {"akd": {"subspace_fold": 8, "steps": 120, "average_last": 40}, "uts": {}},
    "subspace8-steps180": {"akd": {"subspace_fold": 8, "steps": 180, "average_last": 60}, "uts": {}},
    "subspace8-lr2e-3": {"akd": {"subspace_fold": 8, "steps": 120, "average_last": 40, "lr": 2e-3}, "uts": {}},
    # the cloud's rounds without the averaging (stop 30: the phrasing shift's loss is partly the mean's lag)
    "subspace8-noswa": {"akd": {"subspace_fold": 8, "steps": 120}, "uts": {}},
    # less gradient noise per step: twice the batch, or half the rate for twice the steps (stop 30)
    "batch64": {"akd": {"batch_size": 64}, "uts": {}},
    "lr5e-4-steps120": {"akd": {"lr": 5e-4, "steps": 120}, "uts": {}},
    # the forgetting guard on source images the student never trained on (the last 32 scans of the source stream
    # split, which the benchmark's 150-image target streams never reach) instead of train images it memorised
    "guard-unseen": {"akd": {}, "uts": {}, "anchors": "unseen"},
    "guard-unseen-a192": {"akd": {}, "uts": {}, "anchors": "unseen", "bench": {"anchor_images": 192}},  # 96 checked
    # ... and replay on unseen source images too (training images the student memorised carry no gradient)
    "anchors-unseen-a192": {"akd": {}, "uts": {}, "anchors": "all-unseen", "bench": {"anchor_images": 192}},
    "pl": {"method": "pl"},
    "pl-lr5e-4-steps120": {"method": "pl", "akd_defaults": {"lr": 5e-4}, "bench": {"steps": 120}},
    "source-only": {"method": "source-only"},
}
# The variants above were written before the query anchor became the default (stop 31): they ran without it, and keep
# meaning that. The ones below set it themselves.
for _name, _change in VARIANTS.items():
    if "akd" in _change and _name != "default":
        _change["akd"] = {"lambda_anchor_query": 0.0, **_change["akd"]}
VARIANTS.update({
    # the query anchor (stop 31): MSE to the base student's Q-Former query outputs on the replayed source anchors
    "no-anchor-query": {"akd": {"lambda_anchor_query": 0.0}, "uts": {}},  # the default of stop 30
    "anchor-query1": {"akd": {"lambda_anchor_query": 1.0}, "uts": {}},
    "anchor-query3": {"akd": {"lambda_anchor_query": 3.0}, "uts": {}},
    "anchor-query10": {"akd": {"lambda_anchor_query": 10.0}, "uts": {}},  # = the default since stop 31
    "anchor-query10-lr1.5e-3": {"akd": {"lambda_anchor_query": 10.0, "lr": 1.5e-3}, "uts": {}},
    "anchor-query10-replay0.5": {"akd": {"lambda_anchor_query": 10.0, "lambda_anchor": 0.5}, "uts": {}},
    # the cloud's default rounds (subspace8: 1/8 of the trainable set, 120 steps, the mean of the last 40) with it
    "anchor-query10-subspace8": {"akd": {"lambda_anchor_query": 10.0, "subspace_fold": 8, "steps": 120,
                                         "average_last": 40}, "uts": {}},  # fmt: skip
    "anchor-query3-subspace8": {"akd": {"lambda_anchor_query": 3.0, "subspace_fold": 8, "steps": 120,
                                        "average_last": 40}, "uts": {}},  # fmt: skip
    # Table 4 over seeds under the query-anchor default: UTS's tokens against random ones at equal bytes
    "anchor-query10-keep0.25": {"akd": {"lambda_anchor_query": 10.0}, "uts": {"token_keep_ratio": 0.25}},
    "anchor-query10-random0.25": {"akd": {"lambda_anchor_query": 10.0}, "uts": {"token_keep_ratio": 0.25},
                                  "tokens": "random"},  # fmt: skip
    "anchor-query10-random0.5": {"akd": {"lambda_anchor_query": 10.0}, "uts": {}, "tokens": "random"},
    # stop 32: fewer tokens per frame (the teacher answers as well from 4 of the 37 as from all, UTS or random)
    "keep0.1": {"akd": {"lambda_anchor_query": 10.0}, "uts": {"token_keep_ratio": 0.1}},
    "random0.1": {"akd": {"lambda_anchor_query": 10.0}, "uts": {"token_keep_ratio": 0.1}, "tokens": "random"},
    # the cloud's subspace rounds at 180 steps: with the teacher's side computed once per round, they cost what 120 did
    "anchor-query10-subspace8-steps180": {"akd": {"lambda_anchor_query": 10.0, "subspace_fold": 8, "steps": 180,
                                                  "average_last": 60}, "uts": {}},  # fmt: skip
    "anchor-query3-subspace8-steps180": {"akd": {"lambda_anchor_query": 3.0, "subspace_fold": 8, "steps": 180,
                                                 "average_last": 60}, "uts": {}},  # fmt: skip
    # more adapters under the query anchor: rank 16, and LoRA on the LM's feed-forward layers too
    "anchor-query10-lora-r16": {"akd": {"lambda_anchor_query": 10.0}, "uts": {}, "lora": {"rank": 16, "alpha": 32}},
    "anchor-query10-lora-lm-ffn": {"akd": {"lambda_anchor_query": 10.0}, "uts": {},
                                   "lora": {"target_modules": ("q_proj", "v_proj", "fc1", "fc2")}},  # fmt: skip
    "anchor-query10-subspace8-lora-r16": {"akd": {"lambda_anchor_query": 10.0, "subspace_fold": 8, "steps": 120,
                                                  "average_last": 40}, "uts": {},
                                          "lora": {"rank": 16, "alpha": 32}},  # fmt: skip
    # the least uncertain tokens instead (bench/token_information.py: the teacher answers best from those)
    "lowest0.5": {"akd": {"lambda_anchor_query": 10.0}, "uts": {}, "tokens": "lowest"},
    "lowest0.25": {"akd": {"lambda_anchor_query": 10.0}, "uts": {"token_keep_ratio": 0.25}, "tokens": "lowest"},
})  # fmt: skip
# The variants above ran with rank-8 LoRA (α 16), the default until stop 32 made it 16 (α 32): they keep it. The ones
# below get the default unless they say otherwise.
for _name, _change in VARIANTS.items():
    if _name != "default":
        _change["lora"] = {"rank": 8, "alpha": 16, **_change.get("lora", {})}
VARIANTS.update({
    "pl-r16": {"method": "pl"},  # PL on the rank-16 adapters: every method of bench adapt shares the trainable set
    "lora-r32": {"akd": {}, "uts": {}, "lora": {"rank": 32, "alpha": 64}},  # twice the default rank again
    # stop 33: the student sees a random share of each upload's tokens hidden at every step (an augmentation)
    "tokdrop0.25": {"akd": {"token_dropout": 0.25}, "uts": {}},
    "tokdrop0.5": {"akd": {"token_dropout": 0.5}, "uts": {}},
    "tokdrop0.75": {"akd": {"token_dropout": 0.75}, "uts": {}},
    "tokdrop0.5-subspace8": {"akd": {"token_dropout": 0.5, "subspace_fold": 8, "steps": 120, "average_last": 40},
                             "uts": {}},  # fmt: skip
    # stop 35: the round's gradient cleared of its component against the replayed anchors' (A-GEM)
    "agem": {"akd": {"anchor_projection": True}, "uts": {}},
    "agem-bt0": {"akd": {"anchor_projection": True, "max_backtracks": 0}, "uts": {}},
    # stop 35: hard labels where the teacher is sure of its token, its distribution everywhere (FixMatch's mask)
    "sure0.9": {"akd": {"lambda_confident": 1.0, "confidence": 0.9}, "uts": {}},
    "sure0.7": {"akd": {"lambda_confident": 1.0, "confidence": 0.7}, "uts": {}},
    "sure0.9x2": {"akd": {"lambda_confident": 2.0, "confidence": 0.9}, "uts": {}},
    "sure0.5": {"akd": {"lambda_confident": 1.0, "confidence": 0.5}, "uts": {}},
    # Table 4 on the rebuilt pair and today's defaults: random tokens instead of UTS's at the same count (equal bytes)
    "random-r16": {"akd": {}, "uts": {}, "tokens": "random"},
    # the teacher's label by a vote over views of the upload with half its tokens hidden (test-time augmentation)
    "vote4": {"akd": {"label_views": 4}, "uts": {}},
    "vote8-drop0.75": {"akd": {"label_views": 8, "label_view_drop": 0.75}, "uts": {}},
    # what holds colour_inverted under PL: the query anchor (x10 by default) and the replay, on today's adapters
    "aq0-r16": {"akd": {"lambda_anchor_query": 0.0}, "uts": {}},
    "no-replay-r16": {"akd": {"lambda_anchor": 0.0}, "uts": {}},
    # ... and the loss: PL's hard labels next to the soft ones, or instead of them, on UTS's uploads
    "ce1-r16": {"akd": {"lambda_ce": 1.0}, "uts": {}},
    "ce1-kl0-r16": {"akd": {"lambda_ce": 1.0, "lambda_kl": 0.0}, "uts": {}},
    # the cloud's subspace rounds at rank 16 with a third of the query anchor's weight (stop 31 measured it at rank 8)
    "anchor-query3-subspace8-r16": {"akd": {"lambda_anchor_query": 3.0, "subspace_fold": 8, "steps": 120,
                                            "average_last": 40}, "uts": {}},  # fmt: skip
    # stop 36: the guard's share of the cost. bench adapt's cdcca-no-anchor (no replay, no query anchor, no guard)
    # reads colour_inverted 86.2 on seed 0 against the default's 84.9; removing either anchor loss alone (aq0-r16,
    # no-replay-r16) lowers it instead. These keep both losses and loosen or drop the guard's check.
    "noguard": {"akd": {"forget_tolerance": 1.0}, "uts": {}},  # agreement never below 0: never backtracks
    "tol0.04": {"akd": {"forget_tolerance": 0.04}, "uts": {}},
    "bt0": {"akd": {"max_backtracks": 0}, "uts": {}},  # a broken check ends the round on its last good weights
    # stop 37: both anchor losses at a fraction of their weight together (removing both lifted colour_inverted, removing
    # either alone lowered it); the guard's backtracks still double them where the source drifts
    "anchors0.5": {"akd": {"lambda_anchor": 0.5, "lambda_anchor_query": 5.0}, "uts": {}},
    "anchors0.25": {"akd": {"lambda_anchor": 0.25, "lambda_anchor_query": 2.5}, "uts": {}},
    # stop 38: today's round on every sample (stage 1 keeps all, twice the uplink): is the half UTS does not send
    # what PL has over CD-CCA on colour_inverted (stop 35's reading)?
    "all-samples": {"akd": {}, "uts": {"sample_fraction": 1.0}},
    # stop 42, what PL has on the third pair's small printed digits: every token of each upload, or no feature losses
    "all-tokens": {"akd": {}, "uts": {"token_keep_ratio": 1.0}},
    "feat0": {"akd": {"lambda_query": 0.0, "lambda_repr": 0.0}, "uts": {}},
    # PL's round through CD-CCA's code (every sample and token, CE only, no features, no anchors), then with the anchors
    "pl-akd": {"akd": {**adapt.PL_ROUND}, "uts": {**EVERY_TOKEN}},
    "pl-akd-anchors": {"akd": {**adapt.PL_ROUND, "lambda_anchor": 1.0}, "uts": {**EVERY_TOKEN}},
    # the guard on what the robot knew for sure: held-out anchors whose base answer the teacher gives too
    "guard-consensus": {"akd": {"guard_consensus": True}, "uts": {}},
})  # fmt: skip


def run_variant(name: str, seed: int, checkpoints: Path, teacher, tests, config: adapt.AdaptBenchConfig) -> dict:
    """The ``cdcca`` row of ``bench adapt`` for one seed with the variant's fields changed, or (``method``) another
    row of it as it is, under the variant's ``akd_defaults`` and ``bench`` settings."""
    change = VARIANTS[name]

    def make(_, student, teacher, steps, seed, anchors=None):
        akd = AKDConfig(**{"steps": steps, "seed": seed, "check_fraction": adapt.CHECK_FRACTION, **change["akd"]})
        uts = UTSConfig(**{"seed": seed, **change["uts"]})
        return adapt.CdccaMethod(student, teacher, uts=uts, akd=akd, seed=seed, anchors=anchors,
                                 token_selection=change.get("tokens", "uts"))  # fmt: skip

    patched = {"AKDConfig": functools.partial(AKDConfig, **change.get("akd_defaults", {}))}
    if "method" not in change:
        patched["make_method"] = make
    if "lora" in change:
        patched["_fresh_student"] = functools.partial(adapt._fresh_student, lora=LoraSettings(**change["lora"]))
    if "anchors" in change:
        patched["source_anchors"] = ANCHOR_SETS[change["anchors"]]
    original = {key: getattr(adapt, key) for key in patched}
    for key, value in patched.items():
        setattr(adapt, key, value)
    try:
        started = time.perf_counter()
        bench = dataclasses.replace(config, **change.get("bench", {}))
        run = adapt.run_method(change.get("method", "cdcca"), checkpoints, teacher, bench, seed, tests, progress=False)
    finally:
        for key, value in original.items():
            setattr(adapt, key, value)
    return _record(name, seed, run, started)


def _unseen_guard_anchors(model, images: int = 64):
    """Anchors whose checked half (even positions, :class:`~cdcca.akd.Distiller`) is every sample of the last
    ``images // 2`` scans of the source ``stream`` split, and whose replayed half (odd positions) is the train
    images' samples as before."""
    from cdcca.akd import DistillSample

    replay = DistillSample.from_samples(model, load_domain(SOURCE_DOMAIN, "train", limit=images))[1::2]
    check = DistillSample.from_samples(model, load_domain(SOURCE_DOMAIN, "stream")[-len(replay) :])
    return [s for pair in zip(check, replay) for s in pair]


def _unseen_anchors(model, images: int = 64):
    """Anchors from the last ``images`` scans of the source ``stream`` split: the checked half (even positions) every
    sample of the last ``images // 2``, the replayed half (odd positions) every sample of the ``images // 2`` before."""
    from cdcca.akd import DistillSample

    stream = load_domain(SOURCE_DOMAIN, "stream")
    per_image = len(stream) // len({s.sample_id.rsplit("/", 1)[0] for s in stream})  # one prompt per task
    samples = DistillSample.from_samples(model, stream[-per_image * images :])
    half = len(samples) // 2
    return [s for pair in zip(samples[half:], samples[:half]) for s in pair]


ANCHOR_SETS = {"unseen": _unseen_guard_anchors, "all-unseen": _unseen_anchors}  # a variant's "anchors"


def _record(name: str, seed: int, run: dict, started: float) -> dict:
    return {"variant": name, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "acc": {r["domain"]: round(r["acc"], 2) for r in run["rounds"]},
            "mc": {r["domain"]: round(r["mc"], 2) for r in run["rounds"]},
            "da": {r["domain"]: round(r["da"], 2) for r in run["rounds"]},
            "kept_step": [r["kept_step"] for r in run["rounds"]],
            "samples_used": [r["samples_used"] for r in run["rounds"]],
            "backtracks": [r.get("backtracks") for r in run["rounds"]],
            "source_drop": round(run["source_before"] - run["source_after"], 2)}  # fmt: skip


def summarize(runs: list[dict], domains: list[str], teacher: dict[str, float] | None = None) -> list[dict]:
    """Per variant (runs over ``domains`` only): mean and worst seed accuracy per domain, mean over the visual
    domains, worst source drop; with the ``teacher``'s accuracy per domain and a ``source-only`` variant, also the
    share of the teacher-student gap closed per domain (mean over seeds, and the worst seed)."""
    runs = [r for r in runs if set(domains) <= set(r["acc"])]
    visual = [d for d in domains if DOMAINS[d].shifted_vision]
    base = {d: float(np.mean([r["acc"][d] for r in runs if r["variant"] == "source-only"] or [np.nan]))
            for d in domains}  # fmt: skip
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        row = {"variant": name, "seeds": len(mine)}
        for domain in domains:
            values = [r["acc"][domain] for r in mine]
            row[domain] = f"{np.mean(values):.1f} ({min(values):.1f})"
        row["visual_mean"] = round(float(np.mean([np.mean([r["acc"][d] for d in visual]) for r in mine])), 2)
        row["worst_drop"] = max(r["source_drop"] for r in mine)
        if teacher and not np.isnan(list(base.values())).any():
            closed = {d: [(r["acc"][d] - base[d]) / max(1e-9, teacher[d] - base[d]) for r in mine] for d in domains}
            row["gap_closed"] = {d: round(float(np.mean(v)), 3) for d, v in closed.items()}
            row["gap_closed_worst_seed"] = {d: round(float(min(v)), 3) for d, v in closed.items()}
        rows.append(row)
    return rows


SHIFT_GROUPS = ("heldout", "fresh", "sealed", "unseen")  # bench/heldout_shifts.py's GROUPS, in the order written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--domains", choices=["committed", *SHIFT_GROUPS], default="committed",
                        help="the stream: the committed target domains, or the held-out shifts of "
                             "bench/heldout_shifts.py (written after the defaults were chosen), or its fresh ones "
                             "(written after the query anchor's weight was chosen on the held-out ones), or its "
                             "sealed ones (stop 33: only to check a choice made on the others), or its unseen ones "
                             "(stop 41: written after every default was chosen)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None,
                        help="default: bench/results/sweep_adapt.json (committed), heldout_adapt.json, "
                             "fresh_adapt.json or sealed_adapt.json")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = checkpoint_dir("tiny")
    config = adapt.AdaptBenchConfig(seeds=tuple(args.seeds), methods=("source-only", "cdcca"), ablations=False)
    if args.domains != "committed":
        import heldout_shifts  # bench/, beside this file

        config = dataclasses.replace(config, domains=heldout_shifts.register(args.domains))
    path = args.json or Path(f"bench/results/{'sweep' if args.domains == 'committed' else args.domains}_adapt.json")
    teacher = load_mllm(checkpoints / "teacher")
    tests = adapt.load_tests(teacher, config)
    report = json.loads(path.read_text()) if path.exists() else {"variants": VARIANTS, "runs": []}
    report["variants"] = VARIANTS
    report.setdefault("checkpoints", [])  # the checkpoints its runs were measured on (report.checkpoint_fingerprint)
    if (fingerprint := checkpoint_fingerprint(checkpoints)) not in report["checkpoints"]:
        report["checkpoints"].append(fingerprint)
    report["environment"] = environment()
    if "teacher" not in report:
        report["teacher"] = {d: evaluate(teacher, tests[d], progress=False)[0].accuracy for d in config.domains}
    for seed in args.seeds:
        for name in args.variants:
            run = run_variant(name, seed, checkpoints, teacher, tests, config)
            print(json.dumps(run), flush=True)
            report["runs"].append(run)
            report["summary"] = summarize(report["runs"], list(config.domains), report["teacher"])
            path.write_text(json.dumps(report, indent=1))
    columns = ["variant", "seeds", *config.domains, "visual_mean", "worst_drop"]
    print(format_table(report["summary"], columns, title="CD-CCA sweep: accuracy mean (worst seed)"))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
