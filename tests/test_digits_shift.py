"""The digits-shift benchmark: fixed splits, domains that really differ, well-formed samples."""

import numpy as np
import pytest

from cdcca.data.digits_shift import (
    DIGIT_WORDS,
    DOMAINS,
    IMAGE_SIZE,
    SHIFTED_VQA,
    SOURCE_VQA,
    TARGET_DOMAINS,
    _handwritten,
    corpus,
    load_domain,
    training_samples,
)
from cdcca.data.sample import TASKS, Sample


def test_splits_are_disjoint_and_cover_all_scans():
    # Prepare / Execute
    _, labels, splits = _handwritten()
    # Assert
    everything = np.concatenate(list(splits.values()))
    assert len(everything) == len(labels) == 1797
    assert len(set(everything.tolist())) == 1797
    assert set(splits["train"]).isdisjoint(splits["test"])


def test_stream_has_three_visual_shifts_and_a_language_shift():
    assert len(TARGET_DOMAINS) >= 4
    visual = [d for d in TARGET_DOMAINS if not DOMAINS[d].shifted_language]
    assert len(visual) >= 3
    assert any(DOMAINS[d].shifted_language for d in TARGET_DOMAINS)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_samples_are_well_formed(domain):
    samples = load_domain(domain, "test", limit=12)
    assert len(samples) == 12 * len(TASKS)
    assert {s.domain for s in samples} == {domain}
    assert {s.task for s in samples} == set(TASKS)
    assert len({s.sample_id for s in samples}) == len(samples)
    for s in samples:
        assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        if s.task == "mc":
            assert len(s.choices) == 4 and len(set(s.choices)) == 4
            assert s.choices[s.correct_idx] == s.target
        elif s.task == "vqa":
            assert len(s.answers) == 10 and s.target in s.answers
        else:
            assert len(s.references) == 3 and s.target in s.references


def test_load_domain_is_deterministic_and_seeded():
    first, again = load_domain("colour_inverted", "test", limit=5), load_domain("colour_inverted", "test", limit=5)
    other_seed = load_domain("colour_inverted", "test", limit=5, seed=1)
    assert all(np.array_equal(a.image, b.image) and a.prompt == b.prompt for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other_seed))


def test_visual_shifts_change_the_pixels():
    source = np.stack([s.image for s in load_domain("source", "test", limit=20, tasks=("vqa",))]).astype(float)
    colour = np.stack([s.image for s in load_domain("colour_inverted", "test", limit=20, tasks=("vqa",))]).astype(float)
    noisy = np.stack([s.image for s in load_domain("noisy_rotated", "test", limit=20, tasks=("vqa",))]).astype(float)
    # source: dark background, grey ink (all channels equal); colour: light background, coloured ink
    assert source[:, 0, 0].mean() < 10 and np.array_equal(source[..., 0], source[..., 1])
    assert colour[:, 0, 0].mean() > 200 and not np.array_equal(colour[..., 0], colour[..., 1])
    # noise lights up background pixels that are exactly black in the source
    assert (noisy[:, :3, :3] > 0).mean() > 0.3 > (source[:, :3, :3] > 0).mean()


def test_rephrased_domain_uses_only_new_phrasings():
    source_questions = {q for _, q in SOURCE_VQA}
    shifted = {s.prompt for s in load_domain("rephrased", "test", limit=40, tasks=("vqa",))}
    assert shifted <= {q for _, q in SHIFTED_VQA}
    assert shifted.isdisjoint(source_questions)


def test_identity_answers_mix_words_and_numerals():
    for s in load_domain("source", "test", limit=30, tasks=("vqa",)):
        if s.target in DIGIT_WORDS:
            assert s.answers.count(str(DIGIT_WORDS.index(s.target))) == 3


def test_training_distributions_differ():
    rng = np.random.default_rng(0)
    source = training_samples("source", 200, rng)
    broad = training_samples("broad", 200, np.random.default_rng(0))
    source_prompts = {s.prompt for s in source if s.task == "vqa"}
    assert source_prompts <= {q for _, q in SOURCE_VQA}
    assert {s.prompt for s in broad if s.task == "vqa"} & {q for _, q in SHIFTED_VQA}
    assert max(s.image[0, 0].mean() for s in broad) > 150 > max(s.image[0, 0].mean() for s in source)


def test_corpus_covers_every_prompt_and_target_word():
    from cdcca.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(corpus())
    samples = [s for d in DOMAINS for s in load_domain(d, "test", limit=10)]
    for s in samples:
        for text in (s.prompt, s.target):
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domain": "mars"}, "domain must be one of"),
        ({"domain": "source", "split": "dev"}, "split must be one of"),
        ({"domain": "source", "tasks": ("ocr",)}, "tasks must be drawn from"),
    ],
)
def test_load_domain_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_domain(**kwargs)


def test_sample_validates_fields():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="task must be one of"):
        Sample("x", "d", "ocr", "p", image=image)
    with pytest.raises(ValueError, match="needs an image"):
        Sample("x", "d", "vqa", "p")
    with pytest.raises(ValueError, match="correct_idx"):
        Sample("x", "d", "mc", "p", image=image, choices=["a", "b"], correct_idx=2)


def test_a_new_shift_is_a_few_lines():
    # Prepare: a new visual shift (teal ink, thinner strokes) and a new phrasing, none of it registered
    from cdcca.data.digits_shift import (
        DOMAINS as REGISTERED,
    )
    from cdcca.data.digits_shift import (
        DomainSpec,
        Phrasing,
        Rendered,
        to_rgb,
    )

    def teal_thin(ink, rng):
        return Rendered(to_rgb(ink**2, (0, 128, 128), (250, 250, 250)), ("a thin teal digit {d}",))

    asking = Phrasing("terse", vqa=(("identity", "digit?"),), mc="one of {0} {1} {2} {3}?", caption="caption?")
    spec = DomainSpec("teal_thin", transform=teal_thin, phrasing=asking)
    # Execute
    samples = load_domain(spec, "test", limit=4)
    # Assert
    assert "teal_thin" not in REGISTERED and spec.shifted_vision and spec.shifted_language
    assert {s.domain for s in samples} == {"teal_thin"} and len(samples) == 4 * len(TASKS)
    captions = [s for s in samples if s.task == "caption"]
    assert all(c.target.startswith("a thin teal digit ") and c.prompt == "caption?" for c in captions)
    assert samples[0].image[0, 0].tolist() == [250, 250, 250]
    assert np.array_equal(load_domain(spec, "test", limit=4)[0].image, samples[0].image)  # deterministic


def test_new_ink_colours_are_in_the_vocabulary():
    from cdcca.data.digits_shift import COLOUR_WORDS
    from cdcca.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(corpus())
    for colour in ("teal", "yellow", "pink", "grey", "navy"):
        assert colour in COLOUR_WORDS
        assert tokenizer.unk_token_id not in tokenizer(f"a {colour} digit seven")["input_ids"]


def test_registering_a_domain_makes_it_loadable_by_name(monkeypatch):
    from cdcca.data import digits_shift

    monkeypatch.setattr(digits_shift, "DOMAINS", dict(digits_shift.DOMAINS))
    spec = digits_shift.register_domain(digits_shift.DomainSpec("mirrored", transform=lambda ink, rng:
                                                                digits_shift.white_on_black(ink[:, ::-1])))
    assert load_domain("mirrored", "test", limit=1)[0].image[:, ::-1].tolist() == \
        load_domain("source", "test", limit=1)[0].image.tolist()  # fmt: skip
    with pytest.raises(ValueError, match="already registered"):
        digits_shift.register_domain(digits_shift.DomainSpec("mirrored"))
    assert spec.shifted_vision and not spec.shifted_language


SHIFTS_FILE = '''
from cdcca.data.digits_shift import DomainSpec, white_on_black

def upside_down(ink, rng):
    return white_on_black(ink[::-1])

SHIFTS = (DomainSpec("upside_down", transform=upside_down),)
OTHERS = [DomainSpec("upside_down_too", transform=upside_down)]
NOT_SHIFTS = ("just", "words")
'''


def test_shifts_declared_in_a_file_are_registered_in_order(monkeypatch, tmp_path):
    from cdcca.data import digits_shift

    monkeypatch.setattr(digits_shift, "DOMAINS", dict(digits_shift.DOMAINS))
    monkeypatch.setattr(digits_shift, "_LOADED_SHIFTS", {})
    path = tmp_path / "my_shifts.py"
    path.write_text(SHIFTS_FILE)

    names = digits_shift.load_shifts(str(path))

    assert names == ("upside_down",) and digits_shift.load_shifts(f"{path}:SHIFTS") == names  # loaded once
    assert digits_shift.load_shifts(f"{path}:OTHERS") == ("upside_down_too",)
    flipped = load_domain("upside_down", "test", limit=1)[0].image
    assert flipped[::-1].tolist() == load_domain("source", "test", limit=1)[0].image.tolist()
    with pytest.raises(ValueError, match="no sequence of DomainSpec called 'NOT_SHIFTS'; it has SHIFTS, OTHERS"):
        digits_shift.load_shifts(f"{path}:NOT_SHIFTS")
    with pytest.raises(ValueError, match="FILE.py"):
        digits_shift.load_shifts(str(tmp_path / "missing.py"))
