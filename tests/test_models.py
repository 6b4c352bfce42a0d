"""The BLIP-2 teacher/student family: sizes, shared encoder, generation, masking, checkpoints."""

import json

import numpy as np
import pytest
import torch

from cdcca.errors import CheckpointError, ModelNotFoundError
from cdcca.models.checkpoint import load_mllm, save_mllm, share_vision_encoder
from cdcca.models.presets import PRESETS, Preset, TowerSizes, get_preset


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_test_preset_is_well_under_a_million_parameters(pair, role):
    model = dict(zip(("teacher", "student"), pair))[role]
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_student_is_smaller_with_half_the_qformer_layers(pair):
    teacher, student = pair
    assert len(student.blip2.qformer.encoder.layer) * 2 == len(teacher.blip2.qformer.encoder.layer)
    assert student.blip2.config.text_config.hidden_size < teacher.blip2.config.text_config.hidden_size
    for preset in PRESETS.values():
        assert preset.student.qformer_layers * 2 == preset.teacher.qformer_layers


def test_pair_shares_one_frozen_vision_encoder(pair, few_samples):
    teacher, student = pair
    assert student.blip2.vision_model is teacher.blip2.vision_model
    assert not any(p.requires_grad for p in teacher.blip2.vision_model.parameters())
    pixels = teacher.preprocess([s.image for s in few_samples])
    assert torch.equal(teacher.visual_tokens(pixels), student.visual_tokens(pixels))


def test_generate_returns_answers_and_entropies(pair, few_samples):
    _, student = pair
    generation = student.generate(
        [s.prompt for s in few_samples], images=[s.image for s in few_samples], max_new_tokens=5
    )
    batch = len(few_samples)
    assert len(generation.texts) == batch and all(isinstance(t, str) for t in generation.texts)
    assert generation.token_ids.shape[0] == batch and generation.token_ids.shape[1] <= 5
    assert generation.token_entropy.shape == generation.token_mask.shape == generation.token_ids.shape
    vocab = len(student.tokenizer)
    assert torch.all(generation.sample_entropy > 0) and torch.all(generation.sample_entropy <= np.log(vocab) + 1e-4)


def test_padding_does_not_change_a_sample_answer(pair, few_samples):
    # a short prompt batched with a long one is left-padded; OPT positions come from the mask
    _, student = pair
    short, long_ = few_samples[0], next(s for s in few_samples if s.task == "mc")
    alone = student.lm_forward(student.encode_visual([short.image]), [short.prompt], [short.target])
    both = student.lm_forward(
        student.encode_visual([short.image, long_.image]), [short.prompt, long_.prompt], [short.target, long_.target]
    )
    n = alone.logits.shape[1] - student.num_query_tokens
    torch.testing.assert_close(both.logits[0, -n:], alone.logits[0, -n:], rtol=1e-4, atol=1e-4)


def test_token_mask_hides_visual_tokens_from_the_queries(pair, few_samples):
    teacher, _ = pair
    tokens = teacher.visual_tokens(teacher.preprocess([few_samples[0].image]))  # (1, N, D)
    mask = torch.zeros(tokens.shape[:2], dtype=torch.long)
    mask[:, :3] = 1
    changed = tokens.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])
    torch.testing.assert_close(teacher.query_outputs(tokens, mask), teacher.query_outputs(changed, mask))
    assert not torch.allclose(teacher.query_outputs(tokens), teacher.query_outputs(changed))


def test_loss_is_answer_cross_entropy_and_backpropagates(pair, few_samples):
    teacher, _ = pair
    teacher.train()
    loss = teacher.loss(
        [s.image for s in few_samples], [s.prompt for s in few_samples], [s.target for s in few_samples]
    )
    loss.backward()
    # an untrained model is near uniform over the vocabulary
    assert abs(float(loss.detach()) - np.log(len(teacher.tokenizer))) < 1.0
    assert teacher.blip2.query_tokens.grad is not None and teacher.blip2.query_tokens.grad.abs().sum() > 0


def test_preprocess_rejects_non_rgb_uint8(pair):
    teacher, _ = pair
    with pytest.raises(ValueError, match="RGB uint8"):
        teacher.preprocess([np.zeros((24, 24), np.uint8)])
    with pytest.raises(ValueError, match="RGB uint8"):
        teacher.preprocess([np.zeros((24, 24, 3), np.float32)])
    resized = teacher.preprocess([np.zeros((48, 40, 3), np.uint8)])
    assert resized.shape == (1, 3, 24, 24)


def test_checkpoint_round_trip_is_exact(pair, few_samples, tmp_path):
    _, student = pair
    save_mllm(student, tmp_path / "student")
    loaded = load_mllm(tmp_path / "student")
    images, prompts = [s.image for s in few_samples], [s.prompt for s in few_samples]
    with torch.no_grad():
        expected = student.lm_forward(student.encode_visual(images), prompts).logits
        actual = loaded.lm_forward(loaded.encode_visual(images), prompts).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "student" / "cdcca.json").read_text())["meta"]["role"] == "student"
    assert loaded.tokenizer.get_vocab() == student.tokenizer.get_vocab()


def test_share_vision_encoder_refuses_encoders_of_different_pairs(tokenizer):
    from cdcca.models.checkpoint import build_pair

    teacher, _ = build_pair(get_preset("test"), tokenizer, seed=0)
    _, stranger = build_pair(get_preset("test"), tokenizer, seed=1)
    with pytest.raises(CheckpointError, match="vision encoders differ"):
        share_vision_encoder(teacher, stranger)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("Salesforce/blip2-opt-2.7b", "huggingface-cli download Salesforce/blip2-opt-2.7b"),
        ("/nonexistent/checkpoint", "Run `cdcca pretrain`"),
    ],
)
def test_missing_model_error_says_what_to_do(path, message):
    with pytest.raises(ModelNotFoundError, match=message.replace("`", ".").replace("/", ".")):
        load_mllm(path)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_mllm(tmp_path)


def test_real_blip2_directory_loads_with_its_own_tokenizer_and_processor(pair, tmp_path):
    # a BLIP-2 checkpoint laid out as on the hub: no cdcca.json, a preprocessor_config.json instead
    teacher, _ = pair
    teacher.blip2.save_pretrained(tmp_path)
    teacher.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
        )
    )
    loaded = load_mllm(tmp_path)
    assert loaded.image_spec.mean == (0.48145466, 0.4578275, 0.40821073)
    assert loaded.meta["role"] == "external"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TowerSizes(2, 30, 4, 4, 32, 1, 2), "qformer_heads=4 must divide"),
        (lambda: TowerSizes(0, 32, 2, 4, 32, 1, 2), "qformer_layers must be >= 1"),
        (lambda: Preset("x", 24, 5, 32, 1, 2, 0.1, PRESETS["test"].teacher, PRESETS["test"].student), "patch_size=5"),
        (lambda: Preset("x", 24, 8, 32, 1, 2, 0.1, PRESETS["test"].teacher, PRESETS["test"].teacher), "half of"),
        (lambda: get_preset("huge"), "preset must be one of"),
    ],
)
def test_config_validation_names_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()
