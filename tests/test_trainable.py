"""The trainable set: LoRA on LM attention and the Q-Former's reading of visual tokens, query tokens, norms,
biases -- and nothing else."""

import pytest
import torch

from cdcca.models.trainable import (
    LoraSettings,
    add_lora,
    count_parameters,
    freeze_all_but_trainable,
    has_lora,
    trainable_parameters,
)


def test_lora_starts_as_identity(pair, few_samples):
    _, student = pair
    images, prompts = [s.image for s in few_samples], [s.prompt for s in few_samples]
    with torch.no_grad():
        before = student.lm_forward(student.encode_visual(images), prompts).logits
        add_lora(student)
        after = student.lm_forward(student.encode_visual(images), prompts).logits
    assert has_lora(student)
    torch.testing.assert_close(after, before)


def test_trainable_set_has_exactly_the_four_groups(pair):
    _, student = pair
    add_lora(student, LoraSettings(rank=4))
    names = trainable_parameters(student)
    lm_layers = student.blip2.config.text_config.num_hidden_layers
    qformer_layers = student.blip2.config.qformer_config.num_hidden_layers
    lm_lora = [n for n in names if "lora_" in n and n.startswith("language_model.")]
    qformer_lora = [n for n in names if "lora_" in n and n.startswith("qformer.")]
    assert len(lm_lora) == lm_layers * 2 * 2  # q_proj and v_proj, A and B each
    assert all(".self_attn." in n for n in lm_lora)
    assert len(qformer_lora) == qformer_layers * 4 * 2  # cross-attention query/value/output + query FFN output
    assert all(".crossattention." in n or ".output_query." in n for n in qformer_lora)
    assert len([n for n in names if "lora_" in n]) == len(lm_lora) + len(qformer_lora)
    assert "query_tokens" in names
    assert any("layer_norm" in n or "LayerNorm" in n or "layernorm" in n for n in names)
    assert "language_projection.bias" in names and "language_projection.weight" not in names
    assert not any(n.startswith("vision_model.") for n in names)
    assert not any(n.endswith("q_proj.base_layer.weight") or n.endswith("embed_tokens.weight") for n in names)


def test_qformer_lora_can_be_left_out(pair):
    _, student = pair
    add_lora(student, LoraSettings(qformer_modules=()))
    assert not any("lora_" in n for n in trainable_parameters(student) if n.startswith("qformer."))


def test_freeze_leaves_only_the_trainable_set_learnable(pair):
    _, student = pair
    add_lora(student)
    trainable = freeze_all_but_trainable(student)
    learnable = {n for n, p in student.blip2.named_parameters() if p.requires_grad}
    assert learnable == set(trainable)


def test_counts_add_up_and_are_a_small_fraction(pair):
    teacher, _ = pair
    add_lora(teacher)
    counts = count_parameters(teacher)
    assert counts["trainable"] == counts["lora"] + counts["query_tokens"] + counts["norms"] + counts["biases"]
    assert counts["query_tokens"] == teacher.blip2.query_tokens.numel()
    assert 0 < counts["trainable"] < 0.25 * counts["total"]


def test_lora_is_not_added_twice_and_settings_are_validated(pair):
    _, student = pair
    add_lora(student)
    with pytest.raises(ValueError, match="already carries"):
        add_lora(student)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSettings(rank=0)


def test_lora_initialisation_is_seeded_so_cloud_and_robot_share_the_base(tokenizer):
    from cdcca.models.checkpoint import build_pair
    from cdcca.models.presets import get_preset

    _, robot = build_pair(get_preset("test"), tokenizer, seed=0)
    _, cloud = build_pair(get_preset("test"), tokenizer, seed=0)
    torch.manual_seed(123)  # unrelated randomness before injection must not matter
    add_lora(robot)
    add_lora(cloud)
    robot_set, cloud_set = trainable_parameters(robot), trainable_parameters(cloud)
    assert all(torch.equal(robot_set[k], cloud_set[k]) for k in robot_set)
    other = trainable_parameters(add_lora(build_pair(get_preset("test"), tokenizer, seed=0)[1], LoraSettings(seed=1)))
    assert not all(torch.equal(other[k], robot_set[k]) for k in robot_set if "lora_A" in k)
