"""Health-checked updates (issue 15 D8, Build 6): a signed delta that breaks the student is rolled back by the robot
itself, ROLLED_BACK is published with the reason, and the cloud never sends that version again."""

import json
import math

import pytest
import torch

from cdcca import wire
from cdcca.data.digits_shift import load_domain
from cdcca.edge.adapter_slot import AdapterSlot, rolled_back_from
from cdcca.edge.backend import TorchBackend
from cdcca.edge.diagnostics import EdgeDiagnostics
from cdcca.edge.health import HealthCheck, HealthConfig
from cdcca.edge.onnx_backend import OnnxBackend
from cdcca.edge.onnx_export import export_onnx
from cdcca.edge.runtime import EdgeConfig, EdgeRuntime
from cdcca.envelope import VersionChain
from cdcca.models.checkpoint import load_adaptable_student
from tests.test_cloud_trainer import make_trainer, uploads  # noqa: F401  (the module fixture)

NAN = math.nan
GOOD = HealthConfig(answers=4, max_empty_fraction=0.5, entropy_ratio=2.0, entropy_margin=0.5)

# (name, answers of the new version as (text, entropy), the verdict's expected words or None, answers needed)
CASES = [
    ("healthy", [("7", 1.1), ("odd", 0.9), ("yes", 1.2), ("a 7", 1.0)], None, 4),
    ("nan_entropy_fails_at_once", [("7", 1.0), ("", NAN)], "non-finite entropy", 2),
    ("inf_entropy", [("7", math.inf)], "non-finite entropy", 1),
    ("mostly_empty", [("", 0.2), ("", 0.2), ("", 0.2), ("7", 1.0)], "3 of 4 answers of v1 are empty", 4),
    ("entropy_far_above_the_pre_swap_level", [("7", 3.0)] * 4, "mean answer entropy of v1 is 3.000", 4),
    ("entropy_a_little_above", [("7", 2.4)] * 4, None, 4),  # 2.4 <= 2 x 1.0 + 0.5
]


@pytest.mark.parametrize(("answers", "expected", "needed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_health_check_case_table(answers, expected, needed):
    health = HealthCheck(GOOD)
    assert health.observe(0, ["7"] * 8, [1.0] * 8) is None  # the pre-swap level: 1.0 nats
    health.start(1)
    verdicts = [health.observe(1, [text], [entropy]) for text, entropy in answers]
    assert all(v is None for v in verdicts[: needed - 1])
    if expected is None:
        assert verdicts[-1] is None and (health.passed, health.failed, health.probation) == (1, 0, None)
    else:
        assert expected in verdicts[needed - 1] and (health.passed, health.failed, health.probation) == (0, 1, None)


def test_answers_of_the_previous_version_in_flight_do_not_count_and_zero_answers_disables():
    health = HealthCheck(GOOD)
    health.start(1)
    assert health.observe(0, [""] * 8, [NAN] * 8) is None and health.probation == 1
    off = HealthCheck(HealthConfig(answers=0))
    off.start(1)
    assert off.observe(1, [""], [NAN]) is None and off.probation is None


@pytest.mark.parametrize(("field", "value"), [("answers", -1), ("max_empty_fraction", 1.5), ("entropy_ratio", 0.5),
                                              ("entropy_margin", -1.0), ("baseline_answers", 0)])  # fmt: skip
def test_health_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"HealthConfig.{field} must be"):
        HealthConfig(**{field: value})


class RecordingPort:
    """A port that keeps what the runtime publishes (topic, decoded message)."""

    def __init__(self) -> None:
        self.sent = []

    def publish(self, topic: str, data: bytes) -> None:
        kind = {"adapter_status": wire.ADAPTER_STATUS, "answer": wire.ANSWER}.get(topic)
        if kind is not None:
            self.sent.append((topic, wire.decode(kind, data)))

    def statuses(self) -> list:
        return [msg for topic, msg in self.sent if topic == "adapter_status"]


def _silencing(student, base: dict) -> dict:
    """A trainable set within the delta magnitude bound that makes the student say end-of-sequence first, every
    time: the LM's final norm gives up its input and points at the EOS embedding."""
    lm = student.blip2.language_model
    eos_row = lm.get_output_embeddings().weight[student.tokenizer.eos_token_id].detach()  # (H,)
    target = {k: v.clone() for k, v in base.items()}
    target["language_model.model.decoder.final_layer_norm.weight"].zero_()
    target["language_model.model.decoder.final_layer_norm.bias"].copy_(9.0 * torch.sign(eos_row))
    return target


def _v1_passed_and_a_silencing_v2(runtime, student, backend, signer):
    """Applies a healthy v1 and answers until it passes; returns v2 (it empties every answer, not applied), the
    frames and prompts asked, and v1's answers."""
    base = backend.slot.base if backend.name == "torch" else backend.base
    chain = VersionChain("r1", base)
    v1 = chain.make_delta({k: v + 0.01 for k, v in base.items()}, "fp16", signer)
    chain.record_applied(1)
    v2 = chain.make_delta(_silencing(student, base), "fp16", signer)
    samples = load_domain("source", "test", limit=3)[:3]
    images, prompts = [s.load_image() for s in samples], [s.prompt for s in samples]
    assert runtime.apply(v1).state == wire.APPLIED
    v1_answers = [a.answer for a in runtime.ask(images, prompts) + runtime.ask(images, prompts)]
    assert runtime.stats()["health_passed"] == 1
    return v2, images, prompts, v1_answers


def _student_and_backend(kind: str, checkpoints, trust, tmp_path):
    """The robot's torch student (UTS runs on its encoder) and a backend of ``kind`` on it, state in tmp_path."""
    student = load_adaptable_student(checkpoints)
    if kind == "torch":
        return student, TorchBackend(AdapterSlot(student, "r1", trust, tmp_path / "adapter"))
    export = export_onnx(load_adaptable_student(checkpoints), tmp_path / "student_onnx")
    return student, OnnxBackend(export, "r1", trust, state_dir=tmp_path / "adapter", threads=1)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_delta_that_silences_the_student_is_rolled_back_by_the_robot(kind, pretrained_test_pair, keys, tmp_path):
    # Prepare: a robot on v1 (healthy) with its answers as the pre-swap level; v2 empties every answer
    signer, trust = keys
    student, backend = _student_and_backend(kind, pretrained_test_pair, trust, tmp_path)
    port = RecordingPort()
    runtime = EdgeRuntime(backend, student, EdgeConfig(state_dir=tmp_path / "edge", health=HealthConfig(answers=6)),
                          port)  # fmt: skip
    diagnostics = EdgeDiagnostics(runtime)
    v2, images, prompts, v1_answers = _v1_passed_and_a_silencing_v2(runtime, student, backend, signer)
    assert all(v1_answers) and "health check" not in diagnostics.report().message

    # Execute: the signed, in-bound v2 is applied, and the robot keeps answering
    assert runtime.apply(v2).state == wire.APPLIED and runtime.stats()["health_probation"] == 2
    broken = runtime.ask(images, prompts)  # 3 of the 6 answers on probation
    assert [a.answer for a in broken] == ["", "", ""] and all(a.adapter_version == 2 for a in broken)
    assert backend.version == 2  # not decided yet
    runtime.ask(images, prompts)

    # Assert: rolled back by itself, ROLLED_BACK published with the reason, answering as before the swap
    status = port.statuses()[-1]
    assert (status.state, status.version, backend.version) == (wire.ROLLED_BACK, 1, 1)
    assert status.reason.startswith("rolled back from v2: health check: 6 of 6 answers of v2 are empty")
    assert rolled_back_from(status.reason) == 2
    stats = runtime.stats()
    assert (stats["health_rollbacks"], stats["health_probation"]) == (1, -1)
    report = diagnostics.report()
    assert "failed its health check" in report.message and report.values["health_rollbacks"] == "1"
    after = [a for a in runtime.ask(images, prompts) + runtime.ask(images, prompts)]
    assert [a.answer for a in after] == v1_answers and all(a.adapter_version == 1 for a in after)
    assert runtime.apply(v2).state == wire.REJECTED  # a resend of the bad version is a replay
    runtime.close()


def test_the_cloud_records_a_rollback_and_does_not_resend_that_version(pretrained_test_pair, uploads, keys,  # noqa: F811
                                                                        tmp_path):  # fmt: skip
    # Prepare: the cloud published v1; the robot applied it, then its health check rolled it back
    signer, trust = keys
    trainer = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    sent = []
    trainer._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    for msg in uploads[:4]:
        trainer.receive_tokens("r1", msg)
    trainer.step()
    assert [m.version for m in sent] == [1]
    slot = AdapterSlot(load_adaptable_student(pretrained_test_pair), "r1", trust)
    applied = slot.receive(sent[0])
    assert applied.state == wire.APPLIED
    trainer.receive_status("r1", applied)
    rolled = slot.rollback("health check: 6 of 6 answers of v1 are empty")

    # Execute
    trainer.receive_status("r1", rolled)
    trainer.receive_status("r1", rolled)  # repeated: recorded once
    trainer.receive_status("r1", slot._status(0, wire.APPLIED, "heartbeat", None))

    # Assert: recorded with the reason, counted once, and v1 is not offered again though the robot is behind
    assert trainer.counters.rollbacks == 1
    assert trainer.stats()["declined"] == {"r1": {"1": rolled.reason}}
    assert trainer.stats()["reported"]["r1"] == 0
    assert not trainer.resend_if_behind("r1") and [m.version for m in sent] == [1]
    assert trainer.counters.resends == 0

    # ... and a restarted cloud remembers it (the store keeps it): still not resent, not counted again
    trainer.close()
    restarted = make_trainer(pretrained_test_pair, signer, tmp_path / "cloud", round_size=4)
    restarted._send = lambda robot_id, robot, data: sent.append(wire.decode(wire.WEIGHT_DELTA, data))
    restarted.receive_status("r1", slot._status(0, wire.APPLIED, "heartbeat", None))
    restarted.receive_status("r1", rolled)
    assert restarted.stats()["declined"] == {"r1": {"1": rolled.reason}} and restarted.counters.rollbacks == 0
    assert restarted.stats()["reported"]["r1"] == 0
    assert not restarted.resend_if_behind("r1") and [m.version for m in sent] == [1]
    restarted.close()


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_prompt_the_model_cannot_take_costs_only_its_own_answer_and_is_no_verdict_on_the_adapter(
        kind, pretrained_test_pair, keys, tmp_path):  # fmt: skip
    # Prepare: a healthy v1 on probation; one prompt far longer than the model's positions
    signer, trust = keys
    student, backend = _student_and_backend(kind, pretrained_test_pair, trust, tmp_path)
    port = RecordingPort()
    runtime = EdgeRuntime(backend, student, EdgeConfig(state_dir=tmp_path / "edge", health=HealthConfig(answers=4)),
                          port)  # fmt: skip
    base = backend.slot.base if kind == "torch" else backend.base
    samples = load_domain("source", "test", limit=3)[:3]
    images, prompts = [s.load_image() for s in samples], [s.prompt for s in samples]
    runtime.ask(images, prompts)  # the level before the swap
    assert runtime.apply(VersionChain("r1", base).make_delta({k: v + 0.01 for k, v in base.items()}, "fp16",
                                                             signer)).state == wire.APPLIED  # fmt: skip
    too_long = "describe " + "the digit " * 200

    # Execute: a batch of three with the long prompt in the middle
    answers = runtime.ask(images, [prompts[0], too_long, prompts[2]])

    # Assert: the other two are answered by v1, the long one is an empty answer, counted; v1 is not rolled back
    assert [bool(a.answer) for a in answers] == [True, False, True] and math.isnan(answers[1].entropy)
    assert all(a.adapter_version == 1 for a in answers) and [a.sample_id for a in answers] == sorted(
        a.sample_id for a in answers)  # in the batch's order
    assert runtime.counters.failed_answers == 1 and runtime.counters.answers == 3 + 2
    runtime.ask([images[0]], [too_long])  # alone, too
    runtime.ask(images, prompts)
    assert backend.version == 1 and runtime.counters.health_rollbacks == 0
    assert runtime.stats()["health_passed"] == 1  # v1's four real answers passed
    assert not [s for s in port.statuses() if s.state == wire.ROLLED_BACK]
    runtime.close()


# ------------------------------------------------------------------------------------------ across a restart
def _record(tmp_path, **state) -> object:
    path = tmp_path / "health.json"
    path.write_text(json.dumps(state))
    return path


@pytest.mark.parametrize(
    ("saved", "running", "probation", "good"),
    [
        (None, 2, None, 2),  # no record yet (first start, or a robot from before the record): trusted as before
        ({"good": 1, "level": 1.0, "probation": 2}, 2, 2, 1),  # stopped during v2's probation: checked again
        ({"good": 1, "level": 1.0}, 2, 2, 1),  # stopped between persisting v2 and recording its swap
        ({"good": 1, "level": 1.0, "probation": 2}, 1, None, 1),  # stopped after rolling back to v1
        ({"good": 2, "level": 1.0}, 2, None, 2),  # stopped after v2 passed
        ({"good": 1, "level": 1.0}, 3, 3, 1),  # returned to v3 without a check (e.g. an older adapter state)
        ({"good": 4, "level": 1.0}, 0, None, 0),  # the base student is never on probation
        ("{not json", 3, 3, None),  # unreadable: checked, not trusted
    ],
    ids=["no_record", "on_probation", "swap_not_recorded", "rolled_back", "passed", "unchecked", "base", "unreadable"],
)
def test_a_restart_keeps_a_version_that_was_not_marked_good_on_probation(tmp_path, saved, running, probation, good):
    path = tmp_path / "health.json"
    if saved is not None:
        path.write_text(saved if isinstance(saved, str) else json.dumps(saved))
    health = HealthCheck.resume(GOOD, running, path)
    assert (health.probation, health.good) == (probation, good)
    record = json.loads(path.read_text())  # the record is there for the next start
    assert record["good"] == good and record.get("probation") == probation


def test_after_a_restart_the_version_on_probation_is_held_to_the_recorded_level(tmp_path):
    path = tmp_path / "health.json"
    before = HealthCheck.resume(GOOD, 1, path)
    before.observe(1, ["7"] * 8, [1.0] * 8)  # v1's level: 1.0 nats
    before.start(2)
    assert json.loads(path.read_text()) == {"good": 1, "level": 1.0, "failed": [], "probation": 2}

    after = HealthCheck.resume(GOOD, 2, path)  # the robot stopped before v2's verdict
    verdicts = [after.observe(2, ["7"], [3.0]) for _ in range(4)]
    assert "above 2.500 (2 x 1.000 before the swap + 0.5)" in verdicts[-1] and after.failed == 1
    assert json.loads(path.read_text())["failed"] == [2]

    passing = HealthCheck.resume(GOOD, 2, _record(tmp_path, good=1, level=1.0, probation=2))
    assert [passing.observe(2, ["7"], [1.5]) for _ in range(4)] == [None] * 4 and passing.passed == 1
    assert json.loads(path.read_text()) == {"good": 2, "level": 1.5, "failed": []}
    assert HealthCheck.resume(GOOD, 2, path).probation is None


def test_a_version_that_failed_before_a_restart_fails_at_its_first_answer(tmp_path):
    # v3 failed, and the robot could not persist its rollback (a full disk): it restarts on v3
    health = HealthCheck.resume(GOOD, 3, _record(tmp_path, good=1, level=1.0, failed=[3], probation=2))
    assert health.probation == 3
    assert health.observe(3, ["7"], [1.0]) == "v3 failed its health check already"


def test_an_unwritable_record_is_logged_and_counted_and_the_check_goes_on(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "health.json"  # its folder cannot be made
    health = HealthCheck.resume(GOOD, 3, blocked)
    health.start(4)
    assert health.record_failures == 2 and health.probation == 4  # the check itself goes on
    assert "cannot write the health record" in caplog.text


def test_a_start_with_the_check_off_begins_a_record_but_never_changes_one(tmp_path):
    path = _record(tmp_path, good=1, level=1.0, probation=2)
    off = HealthCheck.resume(HealthConfig(answers=0), 2, path)
    assert off.probation is None  # no check: nothing is on probation ...
    assert HealthCheck.resume(GOOD, 2, path).probation == 2  # ... and v2 is checked once the check is on again
    first = tmp_path / "first" / "health.json"  # a first start with the check off, in a folder not made yet
    HealthCheck.resume(HealthConfig(answers=0), 2, first)
    assert json.loads(first.read_text())["good"] == 2
    assert HealthCheck.resume(GOOD, 3, first).probation == 3  # v3 came while the check was off


def test_after_an_unreadable_record_no_version_is_taken_as_good_without_a_check(tmp_path):
    # v3 runs after an unreadable record and fails; its rollback is refused, so nothing is marked good
    health = HealthCheck.resume(GOOD, 3, _record(tmp_path))
    (tmp_path / "health.json").write_text("{not json")
    health = HealthCheck.resume(GOOD, 3, tmp_path / "health.json")
    assert health.observe(3, ["7"], [math.nan]) is not None and health.good is None
    health.observe(4, ["7"] * 4, [9.0] * 4)  # v4 answered between its swap and start(4)
    assert health.good is None


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_a_robot_restarted_during_a_probation_checks_the_version_again_and_rolls_it_back(
        kind, pretrained_test_pair, keys, tmp_path):  # fmt: skip
    # Prepare: v1 passed; v2 (it empties every answer) is applied and the robot stops before its verdict
    signer, trust = keys
    student, backend = _student_and_backend(kind, pretrained_test_pair, trust, tmp_path)
    config = EdgeConfig(state_dir=tmp_path / "edge", health=HealthConfig(answers=6))
    runtime = EdgeRuntime(backend, student, config, RecordingPort())
    assert json.loads((tmp_path / "adapter" / "health.json").read_text())["good"] == 0  # begun at the first start
    assert runtime.stats()["health_record_failures"] == 0
    v2, images, prompts, v1_answers = _v1_passed_and_a_silencing_v2(runtime, student, backend, signer)
    assert runtime.apply(v2).state == wire.APPLIED
    assert [a.answer for a in runtime.ask(images, prompts)] == ["", "", ""]  # 3 of 6: no verdict yet
    runtime.close()

    # Execute: the robot starts again on the same state
    student, backend = _student_and_backend(kind, pretrained_test_pair, trust, tmp_path)
    port = RecordingPort()
    runtime = EdgeRuntime(backend, student, config, port)
    assert backend.version == 2 and runtime.stats()["health_probation"] == 2
    assert EdgeDiagnostics(runtime).report().values["health_probation"] == "2"
    runtime.ask(images, prompts)
    runtime.ask(images, prompts)

    # Assert: v2 failed its check again and the robot went back to v1, which answers as it did
    status = port.statuses()[-1]
    assert (status.state, status.version, backend.version) == (wire.ROLLED_BACK, 1, 1)
    assert status.reason.startswith("rolled back from v2: health check: 6 of 6 answers of v2 are empty")
    assert [a.answer for a in runtime.ask(images, prompts) + runtime.ask(images, prompts)] == v1_answers
    runtime.close()

    # ... and the next start runs v1, marked good, with nothing on probation
    student, backend = _student_and_backend(kind, pretrained_test_pair, trust, tmp_path)
    runtime = EdgeRuntime(backend, student, config, RecordingPort())
    assert backend.version == 1 and runtime.health.probation is None and runtime.health.good == 1
    runtime.close()


def test_a_health_record_the_robot_cannot_write_shows_in_its_diagnostics(pretrained_test_pair, tmp_path):
    from tests.test_edge_port import FakeBackend

    backend = FakeBackend()
    (tmp_path / "adapter").write_text("")  # a file where the adapter state's folder should be
    backend.state_dir = tmp_path / "adapter"
    student = load_adaptable_student(pretrained_test_pair)  # UTS runs on its encoder
    runtime = EdgeRuntime(backend, student, EdgeConfig(state_dir=tmp_path / "edge"), RecordingPort())
    report = EdgeDiagnostics(runtime).report()
    assert report.level == 1 and "the health record could not be written" in report.message
    assert report.values["health_record_failures"] == "1" and report.values["health_probation"] == "none"
    assert EdgeDiagnostics(runtime).report().values["health_record_failures"] == "1"
    runtime.close()
