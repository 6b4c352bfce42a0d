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
            precision="fp32",  # the same pair on every CPU (bfloat16 autocast is used only where it is fast)
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def exported(pretrained_test_pair, tmp_path_factory):
    """The pretrained ``test`` student with LoRA and its ONNX export."""
    from cdcca.edge.onnx_export import export_onnx
    from cdcca.models.checkpoint import load_mllm
    from cdcca.models.trainable import add_lora

    student = add_lora(load_mllm(pretrained_test_pair / "student")).eval()
    return student, export_onnx(student, tmp_path_factory.mktemp("onnx") / "student_onnx")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A cloud signing key and a robot trust store that trusts it (files that define their own win)."""
    from cdcca.envelope import Signer, TrustStore, generate_key

    private, public = generate_key(tmp_path_factory.mktemp("keys"), "cloud")
    trust = TrustStore()
    trust.add("cloud", public.read_text())
    return Signer.load(private), trust


@pytest.fixture(scope="module")
def trust_dir(tmp_path_factory):
    """A robot trust store folder holding one cloud key (the robot refuses to start without one)."""
    from cdcca.envelope import generate_key, trust_key

    _, public = generate_key(tmp_path_factory.mktemp("keys"), "cloud-1")
    store = tmp_path_factory.mktemp("trust")
    trust_key(public, store)
    return store
