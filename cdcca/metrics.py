"""Benchmark metrics: VQA accuracy, A-OKVQA multiple choice and direct answer, BLEU-4 and CIDEr-D.

* VQA accuracy follows the official VQAv2 evaluation (Antol et al. 2015; Goyal et al. 2017): answers are
  normalised (punctuation, number words to digits, articles dropped, contractions restored), and an answer
  scores ``min(1, #matching annotators / 3)`` averaged over the 10 leave-one-annotator-out subsets.
  One deliberate difference: the official script skips normalisation when all ten annotators agree; here
  both sides are always normalised, so ``"Two."`` and ``"2"`` score the same in every case.
* A-OKVQA (Schwenk et al. 2022): MC accuracy is exact agreement with the correct choice; DA accuracy is
  ``min(1, #matching direct answers / 3)``.
* BLEU-4 and CIDEr-D use the ``pycocoevalcap`` scorers (the COCO caption evaluation code). Captions are
  tokenised here in the manner of its PTB tokenizer (lower case, punctuation removed), so no Java is needed.
"""

from __future__ import annotations

import re
from itertools import combinations

_CONTRACTIONS = {
    contraction.replace("'", ""): contraction
    for contraction in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
        "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am "
        "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've "
        "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
        "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
        "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
        "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
        "who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
        "y'all'd've you'd you'd've you'll you're you've"
    ).split()
}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # "1,000"


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        # a mark attached to a word is deleted ("yes!" -> "yes"); one standing between words becomes a space
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The VQA answer normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against its (usually 10) annotator answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    predicted = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    if len(truth) == 1:
        return float(predicted == truth[0])
    subsets = list(combinations(range(len(truth)), len(truth) - 1))
    scores = [min(1.0, sum(truth[i] == predicted for i in subset) / 3.0) for subset in subsets]
    return sum(scores) / len(scores)


def aokvqa_mc_accuracy(prediction: str | int, choices: list[str], correct_idx: int) -> float:
    """1.0 if the prediction (a choice index, or text equal to a choice after normalisation) is the right one."""
    if not 0 <= correct_idx < len(choices):
        raise ValueError(f"correct_idx={correct_idx} is not an index into {len(choices)} choices")
    if isinstance(prediction, int):
        return float(prediction == correct_idx)
    return float(normalize_answer(prediction) == normalize_answer(choices[correct_idx]))


def aokvqa_da_accuracy(prediction: str, direct_answers: list[str]) -> float:
    """A-OKVQA direct-answer accuracy: ``min(1, #direct answers equal to the prediction / 3)``."""
    if not direct_answers:
        raise ValueError("aokvqa_da_accuracy needs at least one direct answer")
    predicted = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == predicted for a in direct_answers) / 3.0)


def tokenize_caption(caption: str) -> str:
    """Lower case, punctuation removed, single spaces (what the COCO PTB tokenizer produces for plain text)."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", caption.lower()).split())


def _caption_inputs(predictions: dict[str, str], references: dict[str, list[str]]):
    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"predictions and references must cover the same ids; mismatched: {sorted(missing)[:5]}")
    if not predictions:
        raise ValueError("no captions to score")
    refs = {key: [tokenize_caption(r) for r in references[key]] for key in predictions}
    preds = {key: [tokenize_caption(predictions[key])] for key in predictions}
    return refs, preds


def bleu4(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) via pycocoevalcap, in [0, 1]."""
    from pycocoevalcap.bleu.bleu import Bleu

    refs, preds = _caption_inputs(predictions, references)
    scores, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    return float(scores[3])


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015) via pycocoevalcap; 10.0 for captions equal to all references."""
    from pycocoevalcap.cider.cider import Cider

    refs, preds = _caption_inputs(predictions, references)
    score, _ = Cider().compute_score(refs, preds)
    return float(score)
