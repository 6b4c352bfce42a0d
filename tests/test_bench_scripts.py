"""The research scripts under ``bench/`` that are not ``cdcca bench`` commands: what they compute from their
rounds, and the variants they build (their runs are the committed results, too slow for the suite)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cdcca.models.trainable import LoraSettings

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(fold: int, unquantized: float, steps: dict[str, tuple[float, float]]) -> dict:
    coded = {step: {"bits": bits, "loss": loss} for step, (bits, loss) in steps.items()}
    return {"seed": 0, "domain": "printed", "fold": fold, "draw": 0, "reference": 80.0,
            "loss_unquantized": unquantized, "steps": coded}  # fmt: skip


def test_subspace_folds_summary_pools_each_fold_and_step_over_its_rounds():
    folds = _script("subspace_folds")
    rows = [_round(10, 0.5, {"0.5": (0.45, 1.0), "1.0": (0.36, 3.0)}),
            _round(10, 0.1, {"0.5": (0.46, -0.2), "1.0": (0.35, 1.0)}),
            _round(8, 0.3, {"0.5": (0.53, 0.4)}),
            {**_round(8, 0.3, {"0.5": (0.51, 0.9)}), "fisher": False},
            {**_round(8, 0.3, {"0.5": (0.44, 0.2)}), "coder": "rans"}]  # fmt: skip

    summary = folds.summary(rows)

    assert [(r["fold"], r["fisher"], r["coder"], r["step"], r["rounds"]) for r in summary] == [
        (10, True, "zstd", 0.5, 2), (10, True, "zstd", 1.0, 2), (8, True, "zstd", 0.5, 1), (8, True, "rans", 0.5, 1),
        (8, False, "zstd", 0.5, 1)]  # fmt: skip (rows without a coder are stop 28's zstd ones)
    assert summary[4]["loss"] == 0.9 and summary[2]["loss"] == 0.4  # steps without Fisher refinement apart
    assert summary[3]["bits_max"] == 0.44 and summary[3]["loss"] == 0.2  # and each coder's rounds apart
    first = summary[0]
    assert first["bits_mean"] == pytest.approx(0.455) and first["bits_max"] == 0.46
    assert first["loss"] == pytest.approx(0.4) and first["worst_round"] == 1.0
    assert first["loss_before_quantizing"] == pytest.approx(0.3)
    assert summary[1]["loss"] == pytest.approx(2.0) and summary[1]["worst_round"] == 3.0


def test_sweep_adapt_lora_variants_are_valid_settings():
    sweep = _script("sweep_adapt")
    lora = {name: change["lora"] for name, change in sweep.VARIANTS.items() if "lora" in change}
    for change in lora.values():
        LoraSettings(**change)  # raises on a bad field or value
    # rank 16 became the default in stop 32: variants written before it ran at rank 8, and still do
    assert "default" not in lora and "pl-r16" not in lora and LoraSettings().rank == 16
    assert lora["pl"] == lora["anchor-query10"] == {"rank": 8, "alpha": 16}
    assert lora["anchor-query10-lora-r16"] == {"rank": 16, "alpha": 32} and lora["lora-r4"]["rank"] == 4
    assert lora["anchor-query10-lora-lm-ffn"]["rank"] == 8
    default = set(LoraSettings().qformer_modules)
    assert default < set(sweep.QFORMER_ALL)  # every linear the default adapts, and more
    assert set(LoraSettings().target_modules) < set(lora["anchor-query10-lora-lm-ffn"]["target_modules"])


def test_sweep_adapt_subspace_variant_trains_the_rounds_the_cloud_trains():
    from cdcca.akd import AKDConfig
    from cloud_trainer.service import CloudConfig

    sweep = _script("sweep_adapt")
    cloud = CloudConfig(akd=AKDConfig(steps=60)).akd  # the cloud's rounds under its default codec, from 60 steps

    settings = {"lr": AKDConfig().lr, **sweep.VARIANTS["subspace8"]["akd"]}

    assert (cloud.subspace_fold, cloud.steps, cloud.average_last, cloud.lr) == (
        settings["subspace_fold"], settings["steps"], settings["average_last"], settings["lr"])  # fmt: skip


def test_sweep_adapt_measured_the_rounds_the_cloud_trains_now():
    from cdcca.akd import AKDConfig
    from cdcca.models.trainable import LoraSettings
    from cloud_trainer.service import CloudConfig

    sweep = _script("sweep_adapt")
    cloud = CloudConfig(akd=AKDConfig(steps=60)).akd  # from bench adapt's 60 steps, under the default codec
    variant = sweep.VARIANTS["anchor-query3-subspace8-r16"]
    measured = AKDConfig(**{"steps": 60, **variant["akd"]})

    assert "lora" not in variant and LoraSettings().rank == 16  # the default adapters, as the cloud's
    for field in ("subspace_fold", "steps", "average_last", "lambda_anchor_query", "lr", "lambda_kl"):
        assert getattr(cloud, field) == pytest.approx(getattr(measured, field)), field


def test_sweep_adapt_variants_keep_the_round_they_were_written_for():
    from cdcca.akd import AKDConfig

    sweep = _script("sweep_adapt")
    rounds = {name: change["akd"] for name, change in sweep.VARIANTS.items() if "akd" in change}
    for settings in rounds.values():
        AKDConfig(**settings)  # raises on a bad field or value
    # the query anchor became the default in stop 31: variants written before it ran without it, and still do
    assert rounds["default"] == {} and AKDConfig().lambda_anchor_query == 10.0
    assert rounds["no-anchor-query"] == {"lambda_anchor_query": 0.0}
    assert rounds["kl-feat3"]["lambda_anchor_query"] == 0.0 and rounds["subspace8"]["lambda_anchor_query"] == 0.0
    assert rounds["anchor-query3"]["lambda_anchor_query"] == 3.0
    assert rounds["anchor-query10-subspace8"]["subspace_fold"] == 8


def test_held_out_shift_groups_render_shifted_images_of_the_benchmark_size():
    import sys

    import numpy as np

    from cdcca.data.digits_shift import DOMAINS, IMAGE_SIZE, load_domain

    sys.path.insert(0, str(BENCH))
    shifts = _script("heldout_shifts")
    names = ()
    try:
        names = shifts.register("fresh") + shifts.register("sealed") + shifts.register("unseen")
        assert shifts.register("fresh") == names[:3] and len(set(names)) == 9  # registering twice is harmless
        source = load_domain("source", "test", limit=2)[0].load_image()
        for name in names:
            assert DOMAINS[name].shifted_vision
            first, again = load_domain(name, "test", limit=2), load_domain(name, "test", limit=2)
            image = first[0].load_image()
            assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
            assert np.array_equal(image, again[0].load_image())  # seeded: the same split renders the same
            assert not np.array_equal(image, source)
        with pytest.raises(KeyError):
            shifts.register("nowhere")
        assert _script("sweep_adapt").SHIFT_GROUPS == tuple(shifts.GROUPS)  # every group can be swept
    finally:
        sys.path.remove(str(BENCH))
        for name in names:  # the rest of the suite sees the committed domains only
            DOMAINS.pop(name)


def test_round_time_per_step_mode_runs_the_teacher_on_every_batch(pair, monkeypatch):
    from cdcca.akd import AKDConfig, Distiller, DistillSample
    from cdcca.data.digits_shift import load_domain
    from cdcca.models.trainable import add_lora

    teacher, student = pair
    add_lora(student)
    distiller = Distiller(teacher, student, AKDConfig(steps=3, batch_size=4, fit_projections=False))
    calls = []
    forward = teacher.lm_forward
    monkeypatch.setattr(teacher, "lm_forward", lambda *a, **k: calls.append(len(a[1])) or forward(*a, **k))
    distiller.losses = _script("round_time")._drop_targets(distiller.losses)
    samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))

    distiller.run_round(samples)

    assert calls == [len(samples), 4, 4, 4]  # the round's one pass, then the teacher again at each of the 3 steps


def test_round_time_summary_compares_the_two_modes_on_the_same_rounds():
    timing = _script("round_time")

    def rounds(seconds: float, acc: float) -> list[dict]:
        return [{"domain": "printed", "seconds": seconds, "train_seconds": seconds - 1, "acc": acc}]

    runs = [
        {"mode": "per-round", "seed": 0, "rounds": rounds(4.0, 80.0), "source_drop": 0.5, "round_seconds": 4.0},
        {"mode": "per-step", "seed": 0, "rounds": rounds(6.0, 80.0), "source_drop": 0.5, "round_seconds": 6.0},
        {"mode": "per-round", "seed": 1, "rounds": rounds(5.0, 70.0), "source_drop": 1.5, "round_seconds": 5.0},
        {"mode": "per-step", "seed": 1, "rounds": rounds(7.0, 71.0), "source_drop": 1.0, "round_seconds": 7.0},
    ]

    report = timing.summarize(runs, ["printed"])

    per_round, per_step = report["summary"]
    assert (per_round["mode"], per_round["seeds"]) == ("per-round", 2)
    assert (per_round["round_s"], per_round["train_s"]) == (4.5, 3.5)
    assert (per_round["printed"], per_round["worst_drop"]) == (75.0, 1.5)
    assert (per_step["round_s"], per_step["printed"], per_step["worst_drop"]) == (6.5, 75.5, 1.0)
    assert report["round_speedup"] == pytest.approx(6.5 / 4.5, abs=0.01)


def test_token_information_masks_keep_the_count_by_each_rule():
    import torch

    info = _script("token_information")
    variance = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.8, 0.4]])

    top = info.masks(variance, "uts", 2, torch.Generator().manual_seed(0))
    low = info.masks(variance, "lowest", 1, torch.Generator().manual_seed(0))
    drawn = [info.masks(variance, "random", 2, torch.Generator().manual_seed(s)) for s in range(8)]

    assert top.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert low.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert all(int(m.sum(1).min()) == 2 == int(m.sum(1).max()) for m in drawn)
    assert len({tuple(m.flatten().tolist()) for m in drawn}) > 1  # the draw depends on the seed


def test_pretrain_speed_times_every_stage_and_scales_each_to_its_full_steps(tmp_path):
    speed = _script("pretrain_speed")
    per_step = speed.timed_run("fp32", 0.001, tmp_path / "run")  # one step of each stage of the tiny pair
    assert set(per_step) == {"vision", "teacher", "student"} and all(s > 0 for s in per_step.values())
    built = json.loads((tmp_path / "run" / "student" / "cdcca.json").read_text())["meta"]["pretrain"]
    assert built["precision"] == "fp32" and built["vision_steps"] == 1  # the precision and fraction asked for
    assert speed.full_seconds({"vision": 0.1, "teacher": 0.2, "student": 0.1}) == 100.0 + 100.0 + 30.0
    runs = [{"precision": "fp32", "per_step_s": {"vision": 0.2, "teacher": 0.5, "student": 0.2}},
            {"precision": "bf16", "per_step_s": {"vision": 0.1, "teacher": 0.4, "student": 0.2}},
            {"precision": "bf16", "per_step_s": {"vision": 0.1, "teacher": 0.3, "student": 0.2}},
            {"precision": "fp32", "per_step_s": {"vision": 0.2, "teacher": 0.5, "student": 0.2}}]  # fmt: skip

    rows = speed.summarize(runs)

    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["vision"]["fp32_full_s"] == 200.0 and by_stage["vision"]["speedup"] == 2.0  # 1000 steps
    assert by_stage["teacher"]["bf16_ms_per_step"] == 350.0 and by_stage["teacher"]["bf16_full_s"] == 175.0
    assert by_stage["total"]["fp32_full_s"] == 200.0 + 250.0 + 60.0
    assert by_stage["total"]["speedup"] == round(510.0 / (100.0 + 175.0 + 60.0), 2)
