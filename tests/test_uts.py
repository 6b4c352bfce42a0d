"""UTS: stage-1 entropy selection, stage-2 MC-dropout token variance, packing and the cloud-side unpack."""

import numpy as np
import pytest
import torch

from cdcca import wire
from cdcca.akd import DistillSample
from cdcca.data.digits_shift import load_domain
from cdcca.models.checkpoint import load_mllm
from cdcca.uts import (
    FramePrompt,
    UncertaintyTokenSampler,
    UplinkError,
    UTSConfig,
    by_frame,
    frame_prompts,
    pack_tokens,
    unpack_tokens,
    uploaded,
)  # fmt: skip


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().float(), b.flatten().argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.fixture(scope="module")
def stream():
    return load_domain("printed", "stream", limit=8) + load_domain("noisy_rotated", "stream", limit=8)


def test_threshold_mode_keeps_entropies_above_it(pair):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_mode="threshold", entropy_threshold=1.0))
    keep = sampler.keep_samples(torch.tensor([0.2, 1.5, 1.0, 3.0]))
    assert keep.tolist() == [False, True, False, True]


def test_top_fraction_mode_keeps_the_top_of_the_sliding_window(pair):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_mode="top_fraction", sample_fraction=0.25, window=8))
    sampler.keep_samples(torch.arange(8, dtype=torch.float32))  # fill the window with 0..7
    # in a window of 8 the top quarter is 2 samples: a value is kept when at most one is above it
    keep = sampler.keep_samples(torch.tensor([100.0, 0.5, 8.0]))  # 8.0: only 100 is above it
    assert keep.tolist() == [True, False, True]
    assert len(sampler._recent[""]) == 8  # the window slides


def test_each_prompt_kind_is_ranked_in_its_own_window(pair):
    # Prepare: captions always carry more entropy than yes/no questions
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_fraction=0.5, window=4, group_words=2))
    prompts = ["describe the image."] * 4 + ["is the digit odd?"] * 4
    entropies = torch.tensor([3.0, 3.1, 3.2, 3.3, 0.1, 0.4, 0.2, 0.3])
    # Execute
    keep = sampler.keep_samples(entropies, prompts)
    # Assert: the most uncertain of each kind pass, not just the captions
    assert keep[4:].sum() >= 2 and keep[:4].sum() >= 2
    assert sampler.prompt_kind("Is the  DIGIT even?") == "is the"
    assert set(sampler._recent) == {"describe the", "is the"}


def test_one_window_for_all_without_grouping(pair):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_fraction=0.5, window=8, group_words=0))
    keep = sampler.keep_samples(torch.tensor([3.0, 3.1, 3.2, 3.3, 0.1, 0.4, 0.2, 0.3]), ["a b"] * 4 + ["c d"] * 4)
    assert keep[4:].sum() == 0 and set(sampler._recent) == {""}


def test_deterministic_path_equals_the_encoder(pair, stream):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(mc_layers=1))
    scores = sampler.score(stream)
    with torch.no_grad():
        expected = student.visual_tokens(student.preprocess([s.image for s in stream]))
    torch.testing.assert_close(scores.visual_tokens, expected)
    assert len(scores.answers) == len(stream) and scores.sample_entropy.shape == (len(stream),)


def test_token_variance_is_not_a_function_of_magnitude(pair, stream):
    # The public code's bug: dropout applied to finished tokens gives var = x^2 p / (1 - p), a magnitude ranking.
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(mc_passes=16, mc_dropout=0.2))
    pixels = student.preprocess([s.image for s in stream])
    with torch.no_grad():
        front = sampler._front(pixels)
        variance = sampler.token_variance(front)  # (B, N)
        magnitude = sampler._deterministic_tail(front).pow(2).mean(-1)  # (B, N)
    closed_form = magnitude * 0.2 / 0.8
    assert _spearman(closed_form, magnitude) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(variance > 0)
    assert _spearman(variance, magnitude) < 0.9
    ratio = variance / magnitude
    assert float(ratio.std() / ratio.mean()) > 0.2  # far from proportional


def test_the_deterministic_centre_is_the_spread_of_the_same_passes_around_the_dropout_free_output(pair, stream):
    """The same seed draws the same passes in both modes: their mean squared deviation from the dropout-free tokens
    equals (M-1)/M of their sample variance plus the squared gap between their mean and those tokens."""
    _, student = pair
    pixels = student.preprocess([s.image for s in stream[:6]])
    spread_sampler, variance_sampler = (UncertaintyTokenSampler(student, UTSConfig(seed=4, mc_passes=5, mc_center=c))
                                        for c in ("deterministic", "mean"))  # fmt: skip
    with torch.no_grad():
        front = spread_sampler._front(pixels)
        center = spread_sampler._deterministic_tail(front)
        spread = spread_sampler.token_variance(front)  # computes the centre itself
        given = UncertaintyTokenSampler(student, UTSConfig(seed=4, mc_passes=5, mc_center="deterministic")
                                        ).token_variance(front, center)  # fmt: skip
        variance = variance_sampler.token_variance(front)
    torch.testing.assert_close(spread, given)
    gap = spread - 4 / 5 * variance  # = mean over channels of (pass mean - centre)^2 >= 0
    assert float(gap.min()) > -1e-6 * float(spread.max())
    assert 0 < float(gap.mean()) < float(spread.mean())


def test_mc_passes_are_reproducible_and_leave_the_encoder_deterministic(pair, stream):
    _, student = pair
    pixels = student.preprocess([s.image for s in stream[:4]])
    first = UncertaintyTokenSampler(student, UTSConfig(seed=3))
    second = UncertaintyTokenSampler(student, UTSConfig(seed=3))
    with torch.no_grad():
        torch.testing.assert_close(
            first.token_variance(first._front(pixels)), second.token_variance(second._front(pixels))
        )
        assert not student.blip2.vision_model.training
        torch.testing.assert_close(student.visual_tokens(pixels), student.visual_tokens(pixels))


@pytest.mark.parametrize(("config", "expected"), [
    (UTSConfig(token_mode="ratio", token_keep_ratio=0.25), [2, 2]),
    (UTSConfig(token_mode="threshold", token_threshold=0.35), [1, 3]),
])  # fmt: skip
def test_token_selection_rules(pair, config, expected):
    _, student = pair
    variance = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0], [0.9, 0.8, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0]])
    keep = UncertaintyTokenSampler(student, config).keep_tokens(variance)
    assert keep.sum(1).tolist() == expected
    assert keep[0, 3] and keep[1, 0]  # the most uncertain token is always among the kept


def test_select_packs_stage_one_survivors(pair, stream):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_mode="threshold", entropy_threshold=0.0))
    messages = sampler.select(stream, robot_id="r7", adapter_version=2, stamp_ns=5)
    # entropy > 0 for every sample, and one message per frame carries all of that frame's prompts, in order
    frames = [s.sample_id.rsplit("/", 1)[0] for s in stream]
    assert len(messages) == len(set(frames)) < len(stream)
    carried = [p for m in messages for p in frame_prompts(wire.decode(wire.UTS_TOKENS, wire.encode(m)))]
    assert [p.sample_id for p in carried] == [s.sample_id for s in stream]
    assert [p.prompt for p in carried] == [s.prompt for s in stream]
    for message in messages:
        assert {p.sample_id.rsplit("/", 1)[0] for p in frame_prompts(message)} == {message.sample_id.rsplit("/", 1)[0]}
    n = student.blip2.vision_model.embeddings.num_positions
    for message in messages:
        decoded = wire.decode(wire.UTS_TOKENS, wire.encode(message))
        assert decoded.robot_id == "r7" and decoded.adapter_version == 2 and decoded.num_tokens == n
        assert len(decoded.token_indices) == round(UTSConfig.token_keep_ratio * n) and decoded.encoding == 0
        assert np.all(np.diff(decoded.token_indices.astype(int)) > 0)


def test_stage_two_runs_once_per_frame_and_its_prompts_share_the_tokens(pair, stream):
    _, student = pair
    sampler = UncertaintyTokenSampler(student, UTSConfig(sample_mode="threshold", entropy_threshold=0.0))
    rows = []
    original = sampler.token_variance
    sampler.token_variance = lambda front, center=None: rows.append(len(front)) or original(front, center)
    scores = sampler.score(stream)
    frames = [s.sample_id.rsplit("/", 1)[0] for s in stream]
    assert sum(rows) == len(set(frames)) < len(stream)  # stage 2 scored each frame once
    for i, j in [(i, j) for i in range(len(stream)) for j in range(i) if frames[i] == frames[j]]:
        assert torch.equal(scores.keep_tokens[i], scores.keep_tokens[j])
        assert torch.equal(scores.token_variance[i], scores.token_variance[j])


def test_one_frame_travels_once_with_all_its_prompts():
    torch.manual_seed(0)
    tokens, keep = torch.randn(10, 6), torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    more = [FramePrompt("f/mc", "which digit?", "three", 0.5), FramePrompt("f/cap", "describe", "a digit", 2.25)]
    common = dict(robot_id="r", adapter_version=0, sample_id="f/vqa", prompt="is it a 3?", student_answer="yes",
                  sample_entropy=1.0)  # fmt: skip
    alone = wire.encode(pack_tokens(tokens, keep, torch.rand(10), **common))
    data = wire.encode(pack_tokens(tokens, keep, torch.rand(10), **common, more=more))
    decoded = wire.decode(wire.UTS_TOKENS, data)
    assert frame_prompts(decoded) == [FramePrompt("f/vqa", "is it a 3?", "yes", 1.0), *more]
    assert len(data) - len(alone) < 100  # two more prompts cost their text, not another copy of the tokens
    samples = DistillSample.from_uts(decoded)
    assert [s.sample_id for s in samples] == ["f/vqa", "f/mc", "f/cap"]
    assert {s.message_id for s in samples} == {"f/vqa"} and samples[2].prompt == "describe"
    assert all(torch.equal(s.tokens, samples[0].tokens) and torch.equal(s.token_mask, samples[0].token_mask)
               for s in samples)  # fmt: skip
    decoded.more_prompts = decoded.more_prompts[:1]  # arrays that are not aligned are refused, not guessed at
    with pytest.raises(ValueError, match="aligned"):
        frame_prompts(decoded)
    with pytest.raises(UplinkError, match="aligned"):
        DistillSample.from_uts(decoded)


def test_uploaded_takes_the_kept_prompts_or_every_prompt_of_their_frames():
    frames = ["a", "b", "a", "c", "b", "a"]
    keep = [False, True, False, False, False, True]
    assert uploaded(keep, frames) == [1, 5]
    assert uploaded(keep, frames, "frame") == [0, 1, 2, 4, 5]  # c had no uncertain prompt: it stays home
    with pytest.raises(ValueError, match="upload_prompts"):
        UTSConfig(upload_prompts="all")


def test_with_frame_prompts_a_confident_prompt_rides_along_with_its_frame(pair, stream):
    _, student = pair
    def select(upload_prompts):  # stage 1 keeps each frame's first prompt only
        sampler = UncertaintyTokenSampler(student, UTSConfig(upload_prompts=upload_prompts))
        sampler.keep_samples = lambda entropy, prompts=None: torch.tensor([i % 3 == 0 for i in range(len(entropy))])
        return sampler.select(stream)

    alone, along = select("uncertain"), select("frame")
    assert [len(frame_prompts(m)) for m in alone] == [1] * len(alone)
    assert [len(frame_prompts(m)) for m in along] == [3] * len(alone)  # the frame's other two prompts came too
    assert [m.sample_id for m in along] == [m.sample_id for m in alone]
    assert all(np.array_equal(a.token_indices, b.token_indices) for a, b in zip(alone, along))


def test_by_frame_groups_in_order():
    frames = ["a", "b", "a", "c", "b", "a"]
    assert by_frame([0, 1, 2, 4, 5], frames) == [[0, 2, 5], [1, 4]]
    assert by_frame([], frames) == []
    assert by_frame([0, 1, 2, 4, 5], frames, limit=2) == [[0, 2], [5], [1, 4]]  # a frame's prompts beyond the cap


def test_tokens_beyond_fp16_are_refused_when_packed_not_turned_into_an_upload_the_cloud_drops():
    tokens = torch.randn(4, 6)
    tokens[2, 3] = 7e4  # over float16's 65504: it would travel as inf
    keep = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    fields = dict(robot_id="r", sample_id="s", adapter_version=0, prompt="p", student_answer="a", sample_entropy=1.0)
    with pytest.raises(ValueError, match="7e\\+04 does not fit the fp16 encoding"):
        pack_tokens(tokens, keep, torch.rand(4), **fields, encoding="fp16")
    restored, _ = unpack_tokens(wire.decode(wire.UTS_TOKENS, wire.encode(
        pack_tokens(tokens, keep, torch.rand(4), **fields, encoding="int8"))))  # fmt: skip
    assert float(restored[0, 2, 3]) == pytest.approx(7e4, rel=1e-2)


@pytest.mark.parametrize(("encoding", "tolerance"), [("int8", None), ("fp16", 1e-2)])
def test_pack_unpack_round_trip(encoding, tolerance):
    torch.manual_seed(0)
    tokens = torch.randn(10, 6) * torch.linspace(0.1, 5, 10)[:, None]
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    message = pack_tokens(tokens, keep, torch.rand(10), robot_id="r", sample_id="s", adapter_version=0, prompt="p",
                          student_answer="a", sample_entropy=1.0, encoding=encoding)  # fmt: skip
    restored, mask = unpack_tokens(wire.decode(wire.UTS_TOKENS, wire.encode(message)))
    assert mask[0].bool().tolist() == keep.tolist()
    assert torch.all(restored[0, ~keep] == 0)
    error = (restored[0, keep] - tokens[keep]).abs()
    if encoding == "int8":  # rounding to the nearest of 255 levels: at most half a step of each token's scale
        step = tokens[keep].abs().amax(1, keepdim=True) / 127
        assert torch.all(error <= step / 2 + 1e-6)
    else:
        assert error.max() < tolerance * tokens.abs().max()


def _message(**changes):
    message = pack_tokens(torch.ones(4, 2), torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.ones(4),
                          robot_id="r", sample_id="s", adapter_version=0, prompt="p", student_answer="a",
                          sample_entropy=1.0)  # fmt: skip
    for key, value in changes.items():
        setattr(message, key, value)
    return message


@pytest.mark.parametrize(("changes", "match"), [
    ({"token_data": np.zeros(3, np.uint8)}, "int8 payload needs 4 bytes"),
    ({"token_indices": np.array([1, 0], np.uint16)}, "strictly ascending"),
    ({"token_indices": np.array([0, 9], np.uint16)}, "below 4"),
    ({"encoding": 7}, "unknown token encoding"),
    ({"token_variance": np.ones(3, np.float32)}, "3 variances for 2 tokens"),
    ({"scales": np.array([np.nan, 1.0], np.float32)}, "not finite"),
    ({"num_tokens": 0}, "must be positive"),
])  # fmt: skip
def test_unpack_rejects_inconsistent_messages(changes, match):
    with pytest.raises(UplinkError, match=match):
        unpack_tokens(_message(**changes))


def test_teacher_on_unpacked_int8_tokens_matches_full_tokens(pretrained_test_pair):
    # keep-ratio 1.0: the only difference is int8 quantisation on the wire
    teacher = load_mllm(pretrained_test_pair / "teacher")
    samples = [s for d in ("source", "printed", "colour_inverted") for s in load_domain(d, "test", limit=40)]
    with torch.no_grad():
        full = teacher.visual_tokens(teacher.preprocess([s.image for s in samples]))
    restored = []
    for i in range(len(samples)):
        keep = torch.ones(full.shape[1], dtype=torch.bool)
        message = pack_tokens(full[i], keep, torch.zeros(full.shape[1]), robot_id="r", sample_id=str(i),
                              adapter_version=0, prompt="", student_answer="", sample_entropy=0.0)  # fmt: skip
        tokens, mask = unpack_tokens(wire.decode(wire.UTS_TOKENS, wire.encode(message)))
        restored.append(tokens)
        assert mask.all()
    restored = torch.cat(restored)
    prompts = [s.prompt for s in samples]
    reference = teacher.generate(prompts, visual_tokens=full)
    received = teacher.generate(
        prompts, visual_tokens=restored, token_mask=torch.ones(full.shape[:2], dtype=torch.long)
    )
    agreement = np.mean([a == b for a, b in zip(reference.texts, received.texts)])
    assert agreement >= 0.99
    with torch.no_grad():
        gap = (teacher.query_outputs(full) - teacher.query_outputs(restored)).abs().max()
    assert gap < 0.05


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="sample_mode"):
        UTSConfig(sample_mode="sometimes")
    with pytest.raises(ValueError, match="token_keep_ratio"):
        UTSConfig(token_keep_ratio=0.0)
    with pytest.raises(ValueError, match="encoding"):
        UTSConfig(encoding="int4")
    with pytest.raises(ValueError, match="mc_passes"):
        UTSConfig(mc_passes=1)


# ------------------------------------------------------------------------------ issue 15: D2, Build 2
def _huge(num_tokens, token_dim):
    """A consistent ``UtsTokens`` of a few hundred bytes that claims a num_tokens x token_dim grid (no token kept)."""
    return _message(num_tokens=num_tokens, token_dim=token_dim, token_indices=np.zeros(0, np.uint16),
                    token_variance=np.zeros(0, np.float32), scales=np.zeros(0, np.float32),
                    token_data=np.zeros(0, np.uint8))  # fmt: skip


def test_unpack_refuses_a_grid_beyond_its_cap_before_allocating():
    # 4096 x 8192 = 32 M values (128 MiB) from a message of a few hundred bytes; 65535 x 65535 would be 16 GiB
    for num_tokens, token_dim in ((4096, 8192), (65535, 65535)):
        message = wire.decode(wire.UTS_TOKENS, wire.encode(_huge(num_tokens, token_dim)))
        assert len(wire.encode(message)) < 400
        with pytest.raises(UplinkError, match="exceed the receiver's cap") as error:
            unpack_tokens(message)
        assert error.value.reason == "oversized"
    with pytest.raises(UplinkError, match="cap of 7 values"):
        unpack_tokens(_message(), max_values=7)  # the caller may lower the cap


@pytest.mark.parametrize(("bounds", "reason", "match"), [
    ({"num_tokens": 5}, "token_grid", "4 tokens, but the receiver's vision encoder emits 5"),
    ({"token_dim": 3}, "token_dim", "width 2, but the receiver's vision encoder emits 3"),
    ({"num_tokens": 65535, "token_dim": 65535}, "token_grid", "4 tokens"),
])  # fmt: skip
def test_unpack_checks_the_receivers_token_grid(bounds, reason, match):
    with pytest.raises(UplinkError, match=match) as error:
        unpack_tokens(_message(), **bounds)
    assert error.value.reason == reason


def test_unpack_within_the_receivers_bounds_is_unchanged():
    tokens, mask = unpack_tokens(_message(), num_tokens=4, token_dim=2)
    assert tokens.shape == (1, 4, 2) and mask[0].tolist() == [1, 1, 0, 0]
    assert torch.equal(tokens[0, :2], torch.ones(2, 2)) and torch.all(tokens[0, 2:] == 0)
    with pytest.raises(UplinkError, match="65535 x 65535 tokens exceed") as error:
        unpack_tokens(_huge(65535, 65535), num_tokens=None, token_dim=65535)
    assert error.value.reason == "oversized"


def test_unpack_refuses_more_indices_than_tokens():
    message = _message(token_indices=np.arange(6, dtype=np.uint16), token_variance=np.ones(6, np.float32))
    with pytest.raises(UplinkError, match="6 token indices for 4 tokens"):
        unpack_tokens(message)
