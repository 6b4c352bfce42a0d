"""Answering a fixed test set from its stored visual tokens (cdcca.evaluate.EncodedSamples)."""

import pytest
import torch

from cdcca.data.digits_shift import load_domain
from cdcca.evaluate import EncodedSamples, encode_samples, evaluate, predict


def _count_encoder_calls(model) -> list[int]:
    calls = [0]
    model.blip2.vision_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def samples():
    return load_domain("printed", "test", limit=5) + load_domain("source", "test", limit=2)  # 21 samples


def test_stored_tokens_give_the_answers_of_encoding_the_frames_for_every_model_sharing_the_encoder(pair, samples):
    teacher, student = pair
    with torch.no_grad():  # an untrained student answers the same to everything: make the frames matter
        student.blip2.query_tokens.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    encoded = encode_samples(teacher, samples, batch_size=8)
    assert list(encoded) == samples and encoded.tokens.shape[0] == len(samples)
    calls = _count_encoder_calls(teacher)  # the student runs the same module
    for model in (teacher, student):
        plain = predict(model, samples, batch_size=8, progress=False)
        before = calls[0]
        assert predict(model, encoded, batch_size=8, progress=False) == plain
        assert calls[0] == before  # answered without encoding a frame
    assert evaluate(student, encoded, batch_size=8, progress=False) == evaluate(student, samples, batch_size=8,
                                                                                 progress=False)  # fmt: skip


def test_tokens_are_used_only_by_a_model_of_that_encoder_at_their_batch_size(pair, tokenizer, samples):
    from cdcca.models.checkpoint import build_pair
    from cdcca.models.presets import get_preset

    teacher, _ = pair
    encoded = encode_samples(teacher, samples, batch_size=8)
    stale = EncodedSamples(samples, encoded.encoder, torch.zeros_like(encoded.tokens), batch_size=8)
    other, _ = build_pair(get_preset("test"), tokenizer, seed=1)  # its own encoder module
    other.eval()
    calls = _count_encoder_calls(other)
    assert predict(other, stale, batch_size=8, progress=False) == predict(other, samples, batch_size=8, progress=False)
    assert calls[0] == 2 * 3  # both runs encoded their 3 batches: the zeros were never read
    calls = _count_encoder_calls(teacher)
    predict(teacher, stale, batch_size=4, progress=False)  # another batch size: encodes the frames
    assert calls[0] == 6


def test_encoded_samples_refuse_tokens_that_do_not_match_the_samples(pair, samples):
    teacher, _ = pair
    encoded = encode_samples(teacher, samples, batch_size=8)
    with pytest.raises(ValueError, match="20 token rows for 21 samples"):
        EncodedSamples(samples, encoded.encoder, encoded.tokens[:20], batch_size=8)


def test_a_set_changed_after_encoding_is_answered_from_its_frames(pair, samples):
    teacher, _ = pair
    encoded = encode_samples(teacher, samples[:-1], batch_size=8)
    encoded.append(samples[-1])  # the tokens no longer line up with the samples
    calls = _count_encoder_calls(teacher)
    assert predict(teacher, encoded, batch_size=8, progress=False) == predict(teacher, samples, batch_size=8,
                                                                               progress=False)  # fmt: skip
    assert calls[0] == 2 * 3
