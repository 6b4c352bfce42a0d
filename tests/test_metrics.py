"""Metrics against hand-computed values, including the official VQA normalisation examples."""

import pytest

from cdcca.metrics import (
    aokvqa_da_accuracy,
    aokvqa_mc_accuracy,
    bleu4,
    cider,
    normalize_answer,
    tokenize_caption,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # number words become digits
        ("ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),  # articles dropped
        ("The Cat", "cat"),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("yes.", "yes"),  # trailing period stripped
        ("3.5", "3.5"),  # decimal point kept
        ("1,000", "1000"),  # thousands separator dropped
        ("yes!", "yes"),  # attached punctuation deleted
        ("black/white", "black white"),  # punctuation between words becomes a space
        ("  Red \n", "red"),
    ],
)
def test_normalize_answer_matches_official_examples(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets with 1 match (1/3) and 1 subset with none: 9/30
        (2, 0.6),  # 8 subsets x 2/3 + 2 subsets x 1/3 = 6/10
        (3, 0.9),  # 7 subsets x 1 + 3 subsets x 2/3 = 9/10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out_average(matches, expected):
    answers = ["two"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("The two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("three", ["2"] * 10) == 0.0


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_aokvqa_mc_accuracy_text_and_index():
    choices = ["red", "blue", "green", "a dog"]
    assert aokvqa_mc_accuracy("blue", choices, 1) == 1.0
    assert aokvqa_mc_accuracy("Dog", choices, 3) == 1.0
    assert aokvqa_mc_accuracy("red", choices, 1) == 0.0
    assert aokvqa_mc_accuracy(1, choices, 1) == 1.0
    assert aokvqa_mc_accuracy(2, choices, 1) == 0.0
    with pytest.raises(ValueError, match="correct_idx"):
        aokvqa_mc_accuracy("red", choices, 4)


def test_aokvqa_da_accuracy_counts_matches_over_three():
    answers = ["dog", "dog", "puppy", "cat", "dog", "dog", "cat", "cat", "puppy", "animal"]
    assert aokvqa_da_accuracy("dogs", answers) == 0.0
    assert aokvqa_da_accuracy("a dog", answers) == 1.0  # 4 matches, capped at 1
    assert aokvqa_da_accuracy("puppy", answers) == pytest.approx(2 / 3)
    assert aokvqa_da_accuracy("animal", answers) == pytest.approx(1 / 3)


def test_tokenize_caption_lowercases_and_strips_punctuation():
    assert tokenize_caption("A Dog, on the GRASS.") == "a dog on the grass"


def test_bleu4_hand_computed():
    # candidate "the cat sat on the mat" vs reference "the cat sat on a mat" (same length: no brevity penalty)
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    score = bleu4({"1": "the cat sat on the mat"}, {"1": ["the cat sat on a mat"]})
    assert score == pytest.approx(expected, rel=1e-6)


def test_bleu4_perfect_and_disjoint():
    refs = {"1": ["a white handwritten digit seven"], "2": ["a printed number three on black"]}
    assert bleu4(
        {"1": "a white handwritten digit seven", "2": "a printed number three on black"}, refs
    ) == pytest.approx(1.0)
    assert bleu4({"1": "x y z w v", "2": "x y z w v q"}, refs) < 1e-6


def test_cider_is_ten_for_exact_captions_and_zero_for_disjoint():
    refs = {
        "1": ["a white handwritten seven", "a white handwritten seven"],
        "2": ["a red printed three", "a red printed three"],
        "3": ["the number five tilted", "the number five tilted"],
    }
    exact = {"1": "a white handwritten seven", "2": "a red printed three", "3": "the number five tilted"}
    assert cider(exact, refs) == pytest.approx(10.0, rel=1e-6)
    assert cider({"1": "zebra", "2": "zebra", "3": "zebra"}, refs) == 0.0


def test_cider_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        cider({"1": "a"}, {"2": ["a"]})
