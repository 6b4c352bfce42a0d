"""Shared fixtures: the ``test`` preset built once per session (tiny, offline, seconds)."""

import pytest
import torch

from cdcca.data.digits_shift import corpus, load_domain
from cdcca.models.checkpoint import build_pair
from cdcca.models.presets import get_preset
from cdcca.models.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(corpus())


@pytest.fixture()
def pair(tokenizer):
    """A fresh, untrained (teacher, student) of the ``test`` preset sharing one vision encoder."""
    teacher, student = build_pair(get_preset("test"), tokenizer, seed=0)
    return teacher.eval(), student.eval()


@pytest.fixture(scope="session")
def few_samples():
    return load_domain("source", "test", limit=4) + load_domain("rephrased", "test", limit=2)


@pytest.fixture(scope="session")
def pretrained_test_pair(tmp_path_factory):
    """The ``test`` preset after a short ``cdcca pretrain`` (directory with teacher/ and student/)."""
    from cdcca.pretrain import PretrainConfig, pretrain

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("checkpoints")
    pretrain(
        PretrainConfig(
            preset="test",
            vision_steps=4,
            teacher_steps=12,
            student_steps=8,
            batch_size=16,
            checkpoint_every=5,
            out_dir=out,
        ),
        progress=False,
    )
    return out
