"""Pretraining: checkpoints are written, training lowers the loss, and an interrupted run resumes exactly."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import cdcca.pretrain as pretrain_module
from cdcca import cli
from cdcca.models.checkpoint import load_mllm
from cdcca.pretrain import (
    PretrainConfig,
    PretrainMismatch,
    load_optimizer,
    pretrain,
    resolve_precision,
    save_optimizer,
    stage_settings,
)
from cdcca.report import cpu


def test_pretrain_writes_a_loadable_pair_sharing_one_encoder(pretrained_test_pair):
    teacher, student = load_mllm(pretrained_test_pair / "teacher"), load_mllm(pretrained_test_pair / "student")
    for name, tensor in student.blip2.vision_model.state_dict().items():
        assert torch.equal(tensor, teacher.blip2.vision_model.state_dict()[name]), name
    assert teacher.meta["steps_done"] == 12 and student.meta["steps_done"] == 8
    assert not (pretrained_test_pair / "teacher.partial").exists()


def test_pretrain_reuses_finished_checkpoints_built_with_the_settings_asked_for(pretrained_test_pair):
    built = json.loads((pretrained_test_pair / "teacher" / "cdcca.json").read_text())["meta"]["pretrain"]
    same = {k: v for k, v in built.items() if k != "out_dir"}
    report = pretrain(PretrainConfig(**same, out_dir=pretrained_test_pair), progress=False)
    assert [(r["stage"], r.get("reused")) for r in report["stages"]] == [
        ("vision", True),
        ("teacher", True),
        ("student", True),
    ]
    # other settings are not silently ignored (`--preset test --out <a tiny pair>` reported the tiny pair built)
    with pytest.raises(PretrainMismatch, match=r"vision.safetensors was built with seed 0 \(asked 7\); teacher was "
                       r"built with seed 0 \(asked 7\); student was built with seed 0 \(asked 7\), student_steps 8 "
                       r"\(asked 5\); pass another --out, or delete vision.safetensors, vision.json, teacher and "
                       r"student from it"):  # fmt: skip
        pretrain(PretrainConfig(**{**same, "student_steps": 5, "seed": 7}, out_dir=pretrained_test_pair),
                 progress=False)  # fmt: skip
    with pytest.raises(PretrainMismatch, match=r"student was built with student_steps 8 \(asked 5\)"):
        pretrain(PretrainConfig(**{**same, "student_steps": 5}, out_dir=pretrained_test_pair), progress=False)


def test_training_reduces_the_loss(tmp_path):
    report = pretrain(
        PretrainConfig(
            preset="test",
            vision_steps=40,
            teacher_steps=60,
            student_steps=1,
            batch_size=32,
            lr=3e-3,
            out_dir=tmp_path,
            precision="fp32",
        ),
        progress=False,
    )
    vision = report["stages"][0]
    assert vision["stage"] == "vision" and vision["final_loss"] < 4.5  # from ln(10) + ln(4) + ln(7) = 5.6
    losses = json.loads((tmp_path / "teacher" / "cdcca.json").read_text())["meta"]
    assert losses["final_loss"] < 2.5  # from ~log(88) = 4.5 at initialisation


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    config = dict(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8, checkpoint_every=3,
                  precision="fp32")  # fmt: skip
    pretrain(PretrainConfig(**config, out_dir=tmp_path / "straight"), progress=False)

    _crash_at_the_fifth_batch(PretrainConfig(**config, out_dir=tmp_path / "resumed"), monkeypatch)
    assert json.loads((tmp_path / "resumed" / "teacher.partial" / "progress.json").read_text())["step"] == 3
    report = pretrain(PretrainConfig(**config, out_dir=tmp_path / "resumed"), progress=False)

    assert report["stages"][0] == {"stage": "vision", "reused": True}
    assert report["stages"][1]["resumed_from"] == 3
    straight = load_mllm(tmp_path / "straight" / "teacher").blip2.state_dict()
    resumed = load_mllm(tmp_path / "resumed" / "teacher").blip2.state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_the_foreach_optimizer_trains_the_weights_of_the_per_tensor_loop_bit_for_bit(tmp_path, monkeypatch):
    config = dict(preset="test", vision_steps=3, teacher_steps=4, student_steps=2, batch_size=8, precision="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the weights depend on the thread count: both runs on one, which each model records
    try:
        report = pretrain(PretrainConfig(**config, out_dir=tmp_path / "foreach"), progress=False)
        assert report["torch_threads"] == 1
        meta = load_mllm(tmp_path / "foreach" / "teacher").meta
        assert meta["torch_threads"] == 1 and meta["cpu"] == cpu()  # which kernels built it, too
        _pretrain_with_the_per_tensor_loop(config, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _pretrain_with_the_per_tensor_loop(config: dict, tmp_path, monkeypatch) -> None:
    made, adamw = [], torch.optim.AdamW

    def per_tensor_loop(params, **kwargs):
        made.append(kwargs.pop("foreach"))
        return adamw(params, **kwargs, foreach=False)

    monkeypatch.setattr(pretrain_module.torch.optim, "AdamW", per_tensor_loop)
    pretrain(PretrainConfig(**config, out_dir=tmp_path / "loop"), progress=False)
    assert made == [True, True, True]  # vision, teacher and student stages
    for model in ("teacher", "student"):
        ours = load_mllm(tmp_path / "foreach" / model).blip2.state_dict()
        for name, tensor in load_mllm(tmp_path / "loop" / model).blip2.state_dict().items():
            assert torch.equal(ours[name], tensor), (model, name)


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    save_optimizer(optimizer, tmp_path / "optimizer")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer(fresh, tmp_path / "optimizer")
    assert fresh.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(fresh.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert (tmp_path / "optimizer.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream


def test_bfloat16_autocast_trains_resumably_records_its_precision_and_is_not_reused_for_fp32(tmp_path, monkeypatch):
    # Prepare / Execute: a bf16 run, and the same run interrupted after the teacher's third step and resumed
    config = dict(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8, checkpoint_every=3,
                  precision="bf16")  # fmt: skip
    casts = []
    real_autocast = pretrain_module.torch.autocast

    def recording_autocast(*args, **kwargs):
        casts.append((kwargs["dtype"], kwargs["enabled"]))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(pretrain_module.torch, "autocast", recording_autocast)
    report = pretrain(PretrainConfig(**config, out_dir=tmp_path / "straight"), progress=False)
    monkeypatch.undo()
    _crash_at_the_fifth_batch(PretrainConfig(**config, out_dir=tmp_path / "resumed"), monkeypatch)
    pretrain(PretrainConfig(**config, out_dir=tmp_path / "resumed"), progress=False)
    # Assert: every step ran under bfloat16 autocast; the weights stay float32; a resumed run ends on the same
    # weights; the models record bf16, and a fp32 run on that folder is refused rather than given the bf16 pair
    assert casts == [(torch.bfloat16, True)] * (2 + 6 + 1) and report["precision"] == "bf16"
    straight = load_mllm(tmp_path / "straight" / "teacher")
    assert straight.meta["pretrain"]["precision"] == "bf16"
    assert {t.dtype for t in straight.blip2.state_dict().values() if t.is_floating_point()} == {torch.float32}
    resumed = load_mllm(tmp_path / "resumed" / "teacher").blip2.state_dict()
    for name, tensor in straight.blip2.state_dict().items():
        assert torch.equal(resumed[name], tensor), name
    with pytest.raises(PretrainMismatch, match=r"precision 'bf16' \(asked 'fp32'\)"):
        pretrain(PretrainConfig(**{**config, "precision": "fp32"}, out_dir=tmp_path / "straight"), progress=False)


def test_auto_precision_reuses_a_finished_pair_as_it_was_built_and_trains_its_student_alike(
    pretrained_test_pair, tmp_path, monkeypatch
):
    # Prepare: the float32 test pair without its student, on a CPU where "auto" means bfloat16
    out = tmp_path / "pair"
    shutil.copytree(pretrained_test_pair, out)
    shutil.rmtree(out / "student")
    built = load_mllm(out / "teacher").meta["pretrain"]
    settings = {k: v for k, v in built.items() if k not in ("out_dir", "precision")}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    casts, real_autocast = [], pretrain_module.torch.autocast

    def recording_autocast(*args, **kwargs):
        casts.append(kwargs["enabled"])
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(pretrain_module.torch, "autocast", recording_autocast)
    # Execute: the default precision (an upgrade that left a float32 pair in the cache)
    report = pretrain(PretrainConfig(**settings, out_dir=out), progress=False)
    # Assert: not refused; the teacher reused; the student trained without autocast and records float32; each
    # stage that ran says how long it took; asking bfloat16 by name still refuses the float32 pair
    assert PretrainConfig().precision == "auto" and built["precision"] == "fp32"
    assert report["precision"] == "fp32" and [s.get("reused") for s in report["stages"]] == [True, True, None]
    assert casts == [False] * settings["student_steps"] and report["stages"][2]["seconds"] > 0
    assert load_mllm(out / "student").meta["pretrain"]["precision"] == "fp32"
    with pytest.raises(PretrainMismatch, match=r"precision 'fp32' \(asked 'bf16'\)"):
        pretrain(PretrainConfig(**settings, precision="bf16", out_dir=out), progress=False)


def _on_a_cpu_where_auto_means_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"


def test_auto_resumes_an_interrupted_build_in_the_precision_it_was_started_in(tmp_path, monkeypatch):
    # Prepare: a float32 build stopped after the teacher's first snapshot, then a CPU where "auto" means bfloat16
    # (an upgrade of a machine whose `make demo` was interrupted under the old float32 default)
    config = dict(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8, checkpoint_every=3)
    pretrain(PretrainConfig(**config, precision="fp32", out_dir=tmp_path / "straight"), progress=False)
    _crash_at_the_fifth_batch(PretrainConfig(**config, precision="fp32", out_dir=tmp_path / "resumed"), monkeypatch)
    _on_a_cpu_where_auto_means_bf16(monkeypatch)
    # Execute / Assert: bfloat16 by name is refused before any work; the default goes on in float32, records it,
    # and ends on the weights of the uninterrupted float32 build
    with pytest.raises(PretrainMismatch, match=r"vision.safetensors was trained in 'fp32' \(asked 'bf16'\)"):
        pretrain(PretrainConfig(**config, precision="bf16", out_dir=tmp_path / "resumed"), progress=False)
    report = pretrain(PretrainConfig(**config, out_dir=tmp_path / "resumed"), progress=False)
    assert report["precision"] == "fp32" and report["stages"][1]["resumed_from"] == 3
    assert load_mllm(tmp_path / "resumed" / "teacher").meta["pretrain"]["precision"] == "fp32"
    straight = load_mllm(tmp_path / "straight" / "teacher").blip2.state_dict()
    for name, tensor in load_mllm(tmp_path / "resumed" / "teacher").blip2.state_dict().items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("record", ["recorded", "from before the record"])
def test_auto_goes_on_from_a_saved_encoder_in_its_precision(tmp_path, monkeypatch, record):
    # Prepare: a float32 build stopped at the teacher's first batch: only the encoder is saved
    config = PretrainConfig(preset="test", vision_steps=2, teacher_steps=2, student_steps=1, batch_size=8,
                            precision="fp32", out_dir=tmp_path)  # fmt: skip
    real_samples = pretrain_module.training_samples

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt("simulated power loss")

    monkeypatch.setattr(pretrain_module, "training_samples", power_cut)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, progress=False)
    monkeypatch.setattr(pretrain_module, "training_samples", real_samples)
    assert json.loads((tmp_path / "vision.json").read_text())["precision"] == "fp32"
    if record != "recorded":
        (tmp_path / "vision.json").unlink()  # an encoder saved before its precision was recorded was float32
    _on_a_cpu_where_auto_means_bf16(monkeypatch)
    # Execute / Assert
    said = "was trained in 'fp32'" if record == "recorded" else r"has no precision record \(taken as 'fp32'\)"
    with pytest.raises(PretrainMismatch, match=rf"vision.safetensors {said} \(asked 'bf16'\)"):
        pretrain(replace(config, precision="bf16"), progress=False)
    report = pretrain(replace(config, precision="auto"), progress=False)
    assert report["precision"] == "fp32" and report["stages"][0] == {"stage": "vision", "reused": True}
    assert load_mllm(tmp_path / "teacher").meta["pretrain"]["precision"] == "fp32"


def test_a_model_from_before_the_precision_record_counts_as_float32(pretrained_test_pair, tmp_path, monkeypatch):
    # Prepare: the float32 test pair as releases before bfloat16 wrote it (no precision), and one older still (no
    # pretraining record at all) without its student
    old, older = tmp_path / "old", tmp_path / "older"
    for out in (old, older):
        shutil.copytree(pretrained_test_pair, out)
    settings = {
        k: v for k, v in load_mllm(old / "teacher").meta["pretrain"].items() if k not in ("out_dir", "precision")
    }
    for out, role in ((old, "teacher"), (old, "student"), (older, "teacher")):
        saved = json.loads((out / role / "cdcca.json").read_text())
        saved["meta"]["pretrain"].pop("precision")
        if out == older:
            saved["meta"].pop("pretrain")
        (out / role / "cdcca.json").write_text(json.dumps(saved))
    shutil.rmtree(older / "student")
    _on_a_cpu_where_auto_means_bf16(monkeypatch)
    # Execute / Assert: bfloat16 by name refuses the old pair; "auto" trains the older one's student in float32
    with pytest.raises(PretrainMismatch, match=r"precision 'fp32' \(asked 'bf16'\)"):
        pretrain(PretrainConfig(**settings, precision="bf16", out_dir=old), progress=False)
    report = pretrain(PretrainConfig(**settings, out_dir=older), progress=False)
    assert report["precision"] == "fp32" and report["stages"][2]["stage"] == "student"
    assert load_mllm(older / "student").meta["pretrain"]["precision"] == "fp32"


@pytest.mark.parametrize("record", ['{"step": 3, "losses": [], "pre', '{"step": 3, "losses": [], "precision": "fp16"}'],
                         ids=["damaged", "unknown"])  # fmt: skip
def test_a_snapshot_whose_precision_cannot_be_read_is_named_with_the_way_on(tmp_path, monkeypatch, record):
    # Prepare: a teacher snapshot whose record was cut mid-write, or names a precision this version does not know
    config = dict(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8, checkpoint_every=3)
    _crash_at_the_fifth_batch(PretrainConfig(**config, precision="fp32", out_dir=tmp_path), monkeypatch)
    (tmp_path / "teacher.partial" / "progress.json").write_text(record)
    # Execute / Assert: one message naming the file and what to delete, under "auto" and by name
    for precision in ("auto", "fp32"):
        with pytest.raises(
            PretrainMismatch, match=r"teacher.partial/progress.json .*; delete .*teacher.partial to start"
        ):
            pretrain(PretrainConfig(**config, precision=precision, out_dir=tmp_path), progress=False)


def test_a_teacher_snapshot_without_its_encoder_still_decides_the_precision(tmp_path, monkeypatch):
    # Prepare: a float32 teacher snapshot whose saved encoder was deleted by hand
    config = dict(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8, checkpoint_every=3)
    _crash_at_the_fifth_batch(PretrainConfig(**config, precision="fp32", out_dir=tmp_path), monkeypatch)
    (tmp_path / "vision.safetensors").unlink()
    _on_a_cpu_where_auto_means_bf16(monkeypatch)
    # Execute / Assert: bfloat16 by name is refused; "auto" trains the encoder again and resumes, all in float32
    with pytest.raises(PretrainMismatch, match=r"teacher.partial was trained in 'fp32' \(asked 'bf16'\)"):
        pretrain(PretrainConfig(**config, precision="bf16", out_dir=tmp_path), progress=False)
    report = pretrain(PretrainConfig(**config, out_dir=tmp_path), progress=False)
    assert report["precision"] == "fp32" and report["stages"][1]["resumed_from"] == 3
    assert json.loads((tmp_path / "vision.json").read_text())["precision"] == "fp32"


# (what the interrupted build left, the change asked for, what is named, what is to be deleted, a harmless change)
SETTINGS_CASES = {
    "teacher snapshot": ("teacher.partial", dict(lr=2e-3), r"teacher.partial was started with lr 0.001 \(asked 0.002\)",
                         "teacher.partial", dict(student_steps=2, checkpoint_every=5)),
    "encoder": ("vision.safetensors", dict(vision_steps=3), r"vision.safetensors was built with vision_steps 2 "
                r"\(asked 3\)", "vision.safetensors and vision.json", dict(teacher_steps=7, lr=2e-3)),
    # what was built on the encoder is named with it (it was named only once the encoder was gone)
    "encoder and teacher snapshot": ("both", dict(vision_steps=3), r"vision.safetensors was built with vision_steps 2 "
                                     r"\(asked 3\); teacher.partial was started with vision_steps 2 \(asked 3\)",
                                     "vision.safetensors, vision.json and teacher.partial", dict(student_steps=2)),
    # the finished teacher's difference, not only the student snapshot's (whose deletion alone led to the teacher's)
    "teacher and student snapshot": ("student.partial", dict(teacher_steps=2), r"teacher was built with teacher_steps "
                                     r"1 \(asked 2\); student.partial was started with teacher_steps 1 \(asked 2\)",
                                     "teacher and student.partial", dict(checkpoint_every=5)),
}  # fmt: skip


@pytest.mark.parametrize("case", SETTINGS_CASES)
def test_work_done_with_other_settings_is_refused_before_any_work_naming_all_to_delete(tmp_path, monkeypatch, case):
    # Prepare: a build stopped after the teacher's first snapshot (the encoder saved, the teacher at step 3), or at
    # the teacher's start (the encoder saved, no snapshot), or after the student's first snapshot
    left, changed, said, delete, harmless = SETTINGS_CASES[case]
    steps = (
        dict(teacher_steps=1, student_steps=6) if left == "student.partial" else dict(teacher_steps=6, student_steps=1)
    )
    config = PretrainConfig(preset="test", vision_steps=2, **steps, batch_size=8, checkpoint_every=3,
                            precision="fp32", out_dir=tmp_path)  # fmt: skip
    _crash_at_the_fifth_batch(config, monkeypatch)
    assert (tmp_path / ("teacher.partial" if left != "student.partial" else "student.partial")).is_dir()
    if left == "vision.safetensors":
        shutil.rmtree(tmp_path / "teacher.partial")
    if left == "teacher.partial":
        recorded = json.loads((tmp_path / left / "progress.json").read_text())["settings"]
        assert recorded["lr"] == 1e-3 and "student_steps" not in recorded and "out_dir" not in recorded
    monkeypatch.setattr(pretrain_module, "training_image", _no_work)
    monkeypatch.setattr(pretrain_module, "training_samples", _no_work)
    # Execute / Assert: each setting the work's weights depend on is named, with all that is to go, before any work...
    with pytest.raises(PretrainMismatch, match=rf"{said}; pass another --out, or delete {delete} from it to build"):
        pretrain(replace(config, **changed), progress=False)
    # ...and settings they do not depend on pass every check (the stage's first batch is drawn)
    with pytest.raises(RuntimeError, match="no work expected"):
        pretrain(replace(config, **harmless), progress=False)


def test_an_encoder_from_before_its_settings_record_is_named_with_its_teacher(pretrained_test_pair, tmp_path):
    # Prepare: the test pair with its encoder's record as builds before the settings record wrote it
    out = tmp_path / "pair"
    shutil.copytree(pretrained_test_pair, out)
    record = json.loads((out / "vision.json").read_text())
    (out / "vision.json").write_text(json.dumps({"precision": record["precision"]}))
    settings = {k: v for k, v in load_mllm(out / "teacher").meta["pretrain"].items() if k != "out_dir"}
    # Execute / Assert: the encoder was built with its teacher's settings, so it goes with it (else a rebuild would
    # reuse the seed-0 encoder under a record of seed 1)
    with pytest.raises(PretrainMismatch, match=r"vision.safetensors was built with seed 0 \(asked 1\); teacher was "
                       r"built with .*; pass another --out, or delete vision.safetensors, vision.json, teacher and "
                       r"student from it"):  # fmt: skip
        pretrain(PretrainConfig(**{**settings, "seed": 1}, out_dir=out), progress=False)  # fmt: skip


def test_a_snapshot_trained_on_another_encoder_starts_its_stage_again(tmp_path, monkeypatch, caplog, capsys):
    # Prepare: a build stopped in the student's stage (its snapshot at step 3), whose snapshot then holds another
    # encoder than the teacher's, as one left by a build whose teacher was then built again on other threads
    config = dict(preset="test", vision_steps=2, teacher_steps=1, student_steps=6, batch_size=8, checkpoint_every=3,
                  precision="fp32")  # fmt: skip
    pretrain(PretrainConfig(**config, out_dir=tmp_path / "straight"), progress=False)
    out, intact = tmp_path / "stale", tmp_path / "intact"
    _crash_at_the_fifth_batch(PretrainConfig(**config, out_dir=out), monkeypatch)
    shutil.copytree(out, intact)
    snapshot = out / "student.partial" / "weights.safetensors"
    weights = load_file(str(snapshot))
    name = next(n for n in weights if n.startswith("vision_model."))
    weights[name] = weights[name] + 0.5
    save_file(weights, str(snapshot))
    # Execute
    with caplog.at_level("WARNING", logger="cdcca.pretrain"):
        capsys.readouterr()
        code = cli.main(["pretrain", "--preset", "test", "--vision-steps", "2", "--teacher-steps", "1",
                         "--student-steps", "6", "--batch-size", "8", "--precision", "fp32", "--out", str(out),
                         "--json", str(tmp_path / "report.json")])  # fmt: skip
        printed = capsys.readouterr().out
        report = json.loads((tmp_path / "report.json").read_text())
        resumed = pretrain(PretrainConfig(**config, out_dir=intact), progress=False)["stages"][2]
    assert code == 0 and "student: snapshot discarded, the stage started again" in printed  # the CLI says so too
    # Assert: the intact snapshot resumed; the other's stage started again, on the teacher's encoder, and both end on
    # the straight build's weights
    assert resumed["resumed_from"] == 3 and "discarded" not in resumed
    student = report["stages"][2]
    assert (
        student["resumed_from"] == 0 and "student.partial was trained on another image encoder" in student["discarded"]
    )
    assert "trained on another image encoder" in caplog.text
    teacher, built = load_mllm(out / "teacher"), load_mllm(out / "student")
    for key, tensor in built.blip2.vision_model.state_dict().items():
        assert torch.equal(tensor, teacher.blip2.vision_model.state_dict()[key]), key
    straight = load_mllm(tmp_path / "straight" / "student").blip2.state_dict()
    for model in (built, load_mllm(intact / "student")):
        for key, tensor in model.blip2.state_dict().items():
            torch.testing.assert_close(tensor, straight[key], rtol=0, atol=1e-6, msg=key)


def test_a_snapshot_a_finished_model_makes_unused_is_not_judged(pretrained_test_pair, tmp_path):
    # Prepare: the finished test pair, with snapshots of other settings left beside its teacher and its student
    out = tmp_path / "pair"
    shutil.copytree(pretrained_test_pair, out)
    settings = {k: v for k, v in load_mllm(out / "student").meta["pretrain"].items() if k != "out_dir"}
    for stage in ("teacher", "student"):
        other = stage_settings(PretrainConfig(**{**settings, "lr": 2e-3}), stage)
        (out / f"{stage}.partial").mkdir()
        (out / f"{stage}.partial" / "progress.json").write_text(
            json.dumps({"step": 3, "losses": [], "precision": settings["precision"], "settings": other})
        )
    # Execute / Assert: the pair is reused as it is; asked for other settings, only what differs in use is named
    report = pretrain(PretrainConfig(**settings, out_dir=out), progress=False)
    assert [r.get("reused") for r in report["stages"]] == [True, True, True]
    with pytest.raises(
        PretrainMismatch,
        match=r"student was built with student_steps 8 \(asked 9\); student.partial "
        r"was started with lr 0.002 \(asked 0.001\), student_steps 8 \(asked "
        r"9\); pass another --out, or delete student and student.partial from",
    ):
        pretrain(PretrainConfig(**{**settings, "student_steps": 9}, out_dir=out), progress=False)  # fmt: skip


def test_an_encoder_from_before_its_settings_record_is_judged_by_its_teacher_snapshot(tmp_path, monkeypatch):
    # Prepare: a build stopped after the teacher's first snapshot, its encoder's record as older builds wrote it
    config = PretrainConfig(preset="test", vision_steps=2, teacher_steps=6, student_steps=1, batch_size=8,
                            checkpoint_every=3, precision="fp32", out_dir=tmp_path)  # fmt: skip
    _crash_at_the_fifth_batch(config, monkeypatch)
    (tmp_path / "vision.json").write_text(json.dumps({"precision": "fp32"}))
    # Execute / Assert: both are named (deleting the snapshot alone let a seed-1 build reuse the seed-0 encoder)
    with pytest.raises(
        PretrainMismatch,
        match=r"vision.safetensors was built with seed 0 \(asked 1\); teacher.partial "
        r"was started with seed 0 \(asked 1\); pass another --out, or delete "
        r"vision.safetensors, vision.json and teacher.partial from it",
    ):
        pretrain(replace(config, seed=1), progress=False)  # fmt: skip


def test_a_finished_student_on_another_encoder_than_its_rebuilt_teacher_is_refused(pretrained_test_pair, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    # Prepare: the test pair with its teacher deleted, its student as it was, and a copy whose student's encoder
    # differs (as one trained before the encoder was built again on other threads)
    same, other = tmp_path / "same", tmp_path / "other"
    for out in (same, other):
        shutil.copytree(pretrained_test_pair, out)
        shutil.rmtree(out / "teacher")
    weights = load_file(str(other / "student" / "model.safetensors"))
    name = next(n for n in weights if n.startswith("vision_model."))
    save_file({**weights, name: weights[name] + 0.5}, str(other / "student" / "model.safetensors"))
    settings = {k: v for k, v in load_mllm(same / "student").meta["pretrain"].items() if k != "out_dir"}
    # Execute / Assert: the same encoder: the teacher is built again beside the student, which is reused...
    report = pretrain(PretrainConfig(**settings, out_dir=same), progress=False)
    assert [r["stage"] for r in report["stages"] if not r.get("reused")] == ["teacher"]
    # ...another: refused before the teacher's first step, naming what to delete
    monkeypatch.setattr(pretrain_module, "training_samples", _no_work)
    with pytest.raises(
        PretrainMismatch,
        match=r"student was trained on another image encoder than this build's .*; "
        r"delete .*student to train it again",
    ):
        pretrain(PretrainConfig(**settings, out_dir=other), progress=False)  # fmt: skip


def _no_work(*args, **kwargs):
    raise RuntimeError("no work expected")


def _crash_at_the_fifth_batch(config: PretrainConfig, monkeypatch) -> None:
    """Run ``config`` until the fifth batch of answering samples is drawn (a power cut there)."""
    real_samples, calls = pretrain_module.training_samples, {"n": 0}

    def crash_at_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated power loss")
        return real_samples(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "training_samples", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, progress=False)
    monkeypatch.setattr(pretrain_module, "training_samples", real_samples)


@pytest.mark.parametrize("cpu", [(True, False), (False, True), (False, False)], ids=["amx", "avx512-bf16", "neither"])
def test_auto_precision_is_bf16_only_where_the_cpu_has_bfloat16_matrix_units(cpu, monkeypatch):
    amx, avx512_bf16 = cpu
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto") == ("bf16" if amx or avx512_bf16 else "fp32")
    assert (resolve_precision("fp32"), resolve_precision("bf16")) == ("fp32", "bf16")


@pytest.mark.parametrize(("field", "value"), [("teacher_steps", 0), ("batch_size", 0), ("lr", 0.0), ("preset", "xl"),
                                              ("precision", "fp16")])  # fmt: skip
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field if field != "preset" else "preset must be one of"):
        PretrainConfig(**{field: value})
