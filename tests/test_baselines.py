"""Baselines: each method's own update rule on hand-checkable cases, what a round may change, and that no
round reads labels."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from cdcca.baselines.cotta import CoTTA, CoTTAConfig, augment_image
from cdcca.baselines.cwd import CWD, CWDConfig, channel_distill_loss
from cdcca.baselines.pkd import PKD, PKDConfig, pearson_distill_loss
from cdcca.baselines.tent import Tent, TentConfig, norm_parameters
from cdcca.data.digits_shift import load_domain
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import TowerSizes, get_preset
from cdcca.models.trainable import add_lora, trainable_parameters

# name -> (method, config for a quick round); batches of 6 samples, 2 steps, short answers
METHODS = {
    "tent": (Tent, TentConfig(steps=2, batch_size=6, lr=0.05, max_answer_tokens=3)),
    "cotta": (CoTTA, CoTTAConfig(steps=2, batch_size=6, lr=0.05, num_augmentations=2, max_answer_tokens=3)),
    "pkd": (PKD, PKDConfig(steps=2, batch_size=6, lr=0.05)),
    "cwd": (CWD, CWDConfig(steps=2, batch_size=6, lr=0.05)),
}


@pytest.fixture(scope="module")
def stream():
    return load_domain("printed", "stream", limit=8)  # 24 samples: 8 images x (vqa, mc, caption)


@pytest.fixture()
def lora_pair(pair):
    teacher, student = pair
    return teacher, add_lora(student)


def update_set(name: str, student) -> set[str]:
    return set(norm_parameters(student) if name == "tent" else trainable_parameters(student))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.blip2.named_parameters()}


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("config_cls", "bad", "field"),
    [
        (TentConfig, {"lr": 0.0}, "lr"),
        (TentConfig, {"steps": 0}, "steps"),
        (TentConfig, {"max_answer_tokens": 0}, "max_answer_tokens"),
        (CoTTAConfig, {"batch_size": 0}, "batch_size"),
        (CoTTAConfig, {"ema_momentum": 1.5}, "ema_momentum"),
        (CoTTAConfig, {"restore_probability": -0.1}, "restore_probability"),
        (CoTTAConfig, {"confidence_threshold": 2.0}, "confidence_threshold"),
        (CoTTAConfig, {"num_augmentations": 0}, "num_augmentations"),
        (PKDConfig, {"lr": -1.0}, "lr"),
        (PKDConfig, {"eps": 0.0}, "eps"),
        (PKDConfig, {"lambda_task": 0.0, "lambda_feature": 0.0}, "lambda_task"),
        (CWDConfig, {"steps": 0}, "steps"),
        (CWDConfig, {"temperature": 0.0}, "temperature"),
    ],
)
def test_config_errors_name_the_field(config_cls, bad, field):
    with pytest.raises(ValueError, match=re.escape(f"{config_cls.__name__}.{field} must")
                       if field != "lambda_task" else "lambda_task, lambda_feature >= 0, not both 0"):  # fmt: skip
        config_cls(**bad)


@pytest.mark.parametrize("method_cls", [PKD, CWD])
def test_feature_distillation_needs_the_teacher(lora_pair, method_cls):
    _, student = lora_pair
    with pytest.raises(ValueError, match="teacher"):
        method_cls(student)


# ----------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", list(METHODS))
def test_a_round_changes_only_the_update_set(lora_pair, stream, name):
    teacher, student = lora_pair
    method_cls, config = METHODS[name]
    method = method_cls(student, teacher, config)
    allowed = update_set(name, student)
    student_before, teacher_before = snapshot(student), snapshot(teacher)

    result = method.adapt(stream[:12])

    student_after, teacher_after = dict(student.blip2.named_parameters()), dict(teacher.blip2.named_parameters())
    frozen = [n for n in student_before if n not in allowed]
    assert [n for n in frozen if not torch.equal(student_after[n], student_before[n])] == []
    assert [n for n in teacher_before if not torch.equal(teacher_after[n], teacher_before[n])] == []  # + vision
    assert any(not torch.equal(student_after[n], student_before[n]) for n in allowed)
    assert not any(n.startswith("vision_model.") for n in allowed)
    assert not student.training and not student.blip2.vision_model.training
    assert result.steps == 2 and result.samples_used <= 12 and math.isfinite(result.loss)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_round_never_reads_labels(tokenizer, stream, name):
    garbage = [
        dataclasses.replace(
            s,
            target="zebra",
            answers=["zebra"] * len(s.answers),
            references=["a zebra"] * len(s.references),
            correct_idx=(s.correct_idx + 1) % len(s.choices) if s.choices else -1,
        )
        for s in stream[:12]
    ]
    results, weights = [], []
    for samples in (stream[:12], garbage):
        teacher, student = build_pair(get_preset("test"), tokenizer, seed=0)
        add_lora(student)
        method_cls, config = METHODS[name]
        results.append(method_cls(student, teacher.eval(), config).adapt(samples))
        weights.append(snapshot(student))

    assert results[0].loss == results[1].loss
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


# ------------------------------------------------------------------------------------------------- TENT


def test_tent_updates_exactly_the_qformer_and_lm_layernorms(lora_pair):
    _, student = lora_pair

    norms = norm_parameters(student)

    # test preset: Q-Former (top layernorm + self-attention, cross-attention, query-output LNs) and OPT
    # (self-attention LN, final LN of the layer, final LN of the decoder); weight and bias each
    assert len(norms) == 14
    assert all(n.endswith((".weight", ".bias")) and not n.startswith("vision_model.") for n in norms)
    assert {n.split(".")[0] for n in norms} == {"qformer", "language_model"}


def test_tent_lowers_the_answer_entropy_on_the_batch(lora_pair, stream):
    _, student = lora_pair
    batch = stream[:6]
    tent = Tent(student, config=TentConfig(steps=3, batch_size=6, lr=0.1, max_answer_tokens=3))

    def entropy() -> float:  # measured by the model's own greedy decoding, independently of Tent.loss
        answers = student.generate([s.prompt for s in batch], images=[s.image for s in batch], max_new_tokens=3)
        return float(answers.sample_entropy.mean())

    before = entropy()
    tent.adapt(batch)
    after = entropy()

    assert after < before - 5e-3


# ------------------------------------------------------------------------------------------------ CoTTA


def test_cotta_ema_update_follows_the_momentum_formula(lora_pair):
    _, student = lora_pair
    cotta = CoTTA(student, config=CoTTAConfig(ema_momentum=0.9))
    queries = student.blip2.query_tokens
    ema_before = cotta.ema["query_tokens"].clone()
    with torch.no_grad():
        queries.add_(1.0)  # the student moved by 1 from where the EMA (= source) is

    cotta.update_ema()

    torch.testing.assert_close(cotta.ema["query_tokens"], 0.9 * ema_before + 0.1 * queries.detach())
    torch.testing.assert_close(cotta.ema["query_tokens"] - ema_before, torch.full_like(ema_before, 0.1))


def test_cotta_stochastic_restore_returns_elements_to_the_source(lora_pair):
    _, student = lora_pair
    cotta = CoTTA(student)
    with torch.no_grad():
        for param in cotta.trainable.values():
            param.add_(1.0)

    cotta.stochastic_restore(0.0)
    kept = all(torch.equal(p, cotta.source[n] + 1.0) for n, p in cotta.trainable.items())
    cotta.stochastic_restore(0.5)
    restored = sum(int((p == cotta.source[n]).sum()) for n, p in cotta.trainable.items())
    total = sum(p.numel() for p in cotta.trainable.values())
    half_restored = restored / total
    cotta.stochastic_restore(1.0)

    assert kept
    assert 0.45 < half_restored < 0.55
    assert all(torch.equal(p, cotta.source[n]) for n, p in cotta.trainable.items())


def test_cotta_confident_samples_skip_augmentation(lora_pair, stream):
    _, student = lora_pair
    images, prompts = [s.image for s in stream[:6]], [s.prompt for s in stream[:6]]
    plain = CoTTA(student, config=CoTTAConfig(confidence_threshold=0.0, num_augmentations=2, max_answer_tokens=3))
    reference = plain.pseudo_targets(images, prompts)
    ordered = reference.confidence.sort().values
    threshold = float(ordered[2] + ordered[3]) / 2  # three samples below, three above
    split = CoTTA(student, config=CoTTAConfig(confidence_threshold=threshold, num_augmentations=2, max_answer_tokens=3))

    pseudo = split.pseudo_targets(images, prompts, rng=np.random.default_rng(0))

    assert plain.augmented_samples == 0 and not reference.augmented.any()
    assert pseudo.augmented.tolist() == (reference.confidence < threshold).tolist()
    assert split.augmented_samples == 3
    confident_positions = ~pseudo.augmented[pseudo.owner]
    assert torch.equal(pseudo.targets[confident_positions], reference.targets[confident_positions])
    assert not torch.allclose(pseudo.targets[~confident_positions], reference.targets[~confident_positions])
    torch.testing.assert_close(pseudo.targets.sum(-1), torch.ones(len(pseudo.owner)))


# ------------------------------------------------------------------------------------- feature distillation


def _task_loss(student, tokens, prompts, labels) -> float:
    student.eval()
    with torch.no_grad():
        soft_prompt = student.blip2.language_projection(student.query_outputs(tokens))
        return float(student.lm_forward(soft_prompt, prompts, labels).loss)


@pytest.mark.parametrize("method_cls", [PKD, CWD])
def test_feature_distillation_trains_the_task_loss_on_the_teachers_answers(lora_pair, stream, method_cls):
    # Prepare: the task term alone, so what the round lowers is the cross-entropy on the teacher's answers
    teacher, student = lora_pair
    config_cls = PKDConfig if method_cls is PKD else CWDConfig
    method = method_cls(student, teacher, config_cls(steps=6, batch_size=6, lr=0.05, lambda_feature=0.0))
    samples = stream[:6]
    prompts = [s.prompt for s in samples]
    with torch.no_grad():
        tokens = student.visual_tokens(student.preprocess([s.load_image() for s in samples]))
        labels = teacher.eval().generate(prompts, visual_tokens=tokens).texts
    assert method._pseudo_labels(tokens, prompts, batch_size=4) == labels  # batched as the teacher answers alone
    before = _task_loss(student, tokens, prompts, labels)

    method.adapt(samples)

    assert _task_loss(student, tokens, prompts, labels) < before


def test_feature_distillation_without_the_task_term_never_asks_the_teacher_to_answer(lora_pair, stream, monkeypatch):
    teacher, student = lora_pair
    method = PKD(student, teacher, PKDConfig(steps=2, batch_size=6, lr=0.05, lambda_task=0.0))

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher generated answers for a feature-only round")

    monkeypatch.setattr(teacher, "generate", refuse)
    result = method.adapt(stream[:6])
    assert result.steps == 2 and math.isfinite(result.loss)


def test_cotta_views_shift_and_rescale_but_never_mirror():
    """A mirrored digit is another symbol: every view is the frame shifted by at most 2 px and rescaled."""
    image = np.zeros((12, 12, 3), np.uint8)
    image[2:10, 3] = 200  # a vertical stroke near the left edge: a mirror would put it near the right
    rng = np.random.default_rng(0)
    for _ in range(50):
        view = augment_image(image, rng)
        column = int(np.argmax(view[6, :, 0]))
        assert view.shape == image.shape and view.dtype == np.uint8
        assert 1 <= column <= 5 and view[6, column, 0] >= 0.8 * 200 - 1  # shifted, brightened or dimmed, not flipped


# ------------------------------------------------------------------------------------------------- PKD


def test_pkd_loss_is_one_minus_pearson_on_a_hand_case():
    student = torch.tensor([[[1.0, 2.0], [2.0, 0.0], [3.0, 1.0]]])  # (B=1, Q=3, C=2)
    teacher = torch.tensor([[[2.0, 1.0], [4.0, 3.0], [7.0, 2.0]]])
    # channel 0: deviations (-1, 0, 1) and (-7/3, -1/3, 8/3): r = 5 / (sqrt(2) * sqrt(114) / 3) = 15 / sqrt(228)
    # channel 1: deviations (1, -1, 0) and (-1, 1, 0): r = -1
    expected = ((1 - 15 / math.sqrt(228)) + (1 - (-1))) / 2

    loss = pearson_distill_loss(student, teacher)

    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_pkd_loss_ignores_positive_affine_maps_per_channel():
    teacher = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))  # (B, Q, C)
    scale, shift = torch.linspace(0.5, 3.0, 8), torch.linspace(-2.0, 2.0, 8)

    same_pattern = pearson_distill_loss(teacher * scale + shift, teacher)
    mirrored = pearson_distill_loss(-teacher, teacher)

    assert float(same_pattern) == pytest.approx(0.0, abs=1e-5)
    assert float(mirrored) == pytest.approx(2.0, abs=1e-5)


def test_pkd_projects_the_student_when_widths_differ(tokenizer, stream):
    base = get_preset("test")
    wider_teacher = dataclasses.replace(base, teacher=TowerSizes(2, 48, 2, 4, 48, 2, 2))
    teacher, student = build_pair(wider_teacher, tokenizer, seed=0)
    # the feature term alone, whose value (mean 1 - Pearson r) is bounded by 2
    pkd = PKD(add_lora(student), teacher.eval(), PKDConfig(steps=2, batch_size=6, lr=0.05, lambda_task=0.0))
    projection_before = pkd.projection.weight.detach().clone()

    result = pkd.adapt(stream[:6])

    assert (pkd.projection.in_features, pkd.projection.out_features) == (32, 48)
    assert not torch.equal(pkd.projection.weight, projection_before)
    assert 0.0 <= result.loss <= 2.0


# ------------------------------------------------------------------------------------------------- CWD


def test_cwd_loss_vanishes_for_identical_features():
    features = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))

    assert float(channel_distill_loss(features, features.clone(), temperature=4.0)) == pytest.approx(0.0, abs=1e-7)


def test_cwd_loss_is_the_scaled_channel_kl_on_a_hand_case():
    student = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [2.0, 3.0]]])  # (B=1, Q=3, C=2)
    teacher = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [3.0, 0.0]]])
    tau = 2.0

    def softmax(values):
        exps = [math.exp(v / tau) for v in values]
        return [e / sum(exps) for e in exps]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    channels = [(teacher[0, :, c].tolist(), student[0, :, c].tolist()) for c in range(2)]
    expected = tau**2 * sum(kl(softmax(t), softmax(s)) for t, s in channels) / 2

    loss = channel_distill_loss(student, teacher, temperature=tau)

    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1  # the case is not trivially zero
