"""digits-shift: the embedded default benchmark, a source domain and a stream of shifted target domains.

The source domain is real handwritten digits (scikit-learn's bundled UCI ``load_digits``, 1,797 8x8 scans,
no download). The target stream shifts the *visual* side three ways and then the *language* side, the way
the paper's stream goes from VQAv2 to A-OKVQA (a question-domain shift):

==================  ==========================================================  ==================
domain              images                                                      phrasing
==================  ==========================================================  ==================
``source``          handwritten, white ink on black                             source templates
``colour_inverted`` handwritten, coloured ink on a light background              source templates
``printed``         digits rendered from a typeface (the source never saw type) source templates
``noisy_rotated``   handwritten, rotated 20-45 degrees, Gaussian noise          source templates
``rephrased``       handwritten, white ink on black                             new templates
==================  ==========================================================  ==================

Every image yields one sample per task: direct-answer VQA (which digit / odd or even / greater than
four), 4-way multiple choice, and a caption. Splits are fixed: handwritten scans are split once with a
fixed seed into ``train`` (pretraining only), ``stream`` (what the robot sees online) and ``test``.

Pretraining distributions (see :func:`training_samples`): the student sees only ``source``; the teacher
sees a broader distribution -- random colours, typeface digits, rotations, noise and both phrasing sets --
drawn from the ``train`` scans and fresh renders, as a large cloud model has seen more of the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdcca.data.sample import TASKS, Sample

IMAGE_SIZE = 24  # pixels per side of every rendered image
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_COLOURS = {  # named ink colours of the colour_inverted domain (RGB)
    "red": (200, 30, 30),
    "green": (30, 140, 40),
    "blue": (30, 60, 200),
    "purple": (120, 40, 160),
    "orange": (230, 120, 20),
    "brown": (120, 70, 30),
}
SPLITS = ("train", "stream", "test")
_SPLIT_SIZES = {"train": 1100, "stream": 350}  # test takes the remaining 347 scans
_SPLIT_SEED = 0

# Question templates: (kind, template). ``kind`` selects how the answer is derived from the digit.
SOURCE_VQA = (
    ("identity", "what digit is this?"),
    ("parity", "is the digit odd or even?"),
    ("greater", "is the digit greater than four?"),
)
SHIFTED_VQA = (
    ("identity", "which number can be seen in the picture?"),
    ("parity", "would you say the number in the picture is odd or even?"),
    ("greater", "is the number shown bigger than four?"),
)
SOURCE_MC = "which digit is shown? choices: {0}, {1}, {2}, {3}."
SHIFTED_MC = "pick the number that appears in the picture from {0}, {1}, {2} or {3}."
SOURCE_CAPTION = "describe the image."
SHIFTED_CAPTION = "write a short caption for this picture."

CAPTIONS = {  # reference captions per image style; {d} = digit word, {c} = ink colour name
    "handwritten": (
        "a handwritten digit {d}",
        "the number {d} written by hand",
        "a white handwritten {d} on a black background",
    ),
    "colour": ("a {c} digit {d} on a light background", "the number {d} drawn in {c}", "a {c} handwritten {d}"),
    "printed": ("a printed digit {d}", "the number {d} in a printed font", "a white printed {d} on a black background"),
    "noisy": (
        "a rotated handwritten digit {d} with noise",
        "the number {d} tilted in a noisy image",
        "a noisy picture of a rotated {d}",
    ),
}


@dataclass(frozen=True)
class DomainSpec:
    """How one domain renders images and phrases prompts.

    Args:
        name: domain name, the ``domain`` field of its samples.
        family: ``handwritten`` (UCI scans) or ``printed`` (typeface renders).
        colour: draw coloured ink on a light background instead of white on black.
        rotate_noise: rotate by 20-45 degrees either way and add Gaussian noise.
        shifted_language: use the new phrasing templates instead of the source ones.
    """

    name: str
    family: str = "handwritten"
    colour: bool = False
    rotate_noise: bool = False
    shifted_language: bool = False


DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in (
        DomainSpec("source"),
        DomainSpec("colour_inverted", colour=True),
        DomainSpec("printed", family="printed"),
        DomainSpec("noisy_rotated", rotate_noise=True),
        DomainSpec("rephrased", shifted_language=True),
    )
}
SOURCE_DOMAIN = "source"
TARGET_DOMAINS = tuple(name for name in DOMAINS if name != SOURCE_DOMAIN)


# ----------------------------------------------------------------------------------------------- images


@lru_cache(maxsize=1)
def _handwritten() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """UCI digit scans as ink intensity in [0, 1] at IMAGE_SIZE, their labels, and the fixed split indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), 1 = full ink
    ink = np.stack(
        [np.asarray(Image.fromarray(s, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for s in scans]
    ).clip(0.0, 1.0)  # (1797, 24, 24)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(scans))
    n_train, n_stream = _SPLIT_SIZES["train"], _SPLIT_SIZES["stream"]
    splits = {
        "train": order[:n_train],
        "stream": order[n_train : n_train + n_stream],
        "test": order[n_train + n_stream :],
    }
    return ink, digits.target.astype(np.int64), splits


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_printed(digit: int, rng: np.random.Generator) -> np.ndarray:
    """A typeface digit as ink intensity (IMAGE_SIZE, IMAGE_SIZE) with random size, stroke and offset."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    size = int(rng.integers(14, 21))
    font = _font(size)
    stroke = int(size <= 15 and rng.random() < 0.5)  # a bold stroke on large glyphs fills their holes
    text = str(digit)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (IMAGE_SIZE - (right - left)) / 2 - left + rng.uniform(-2.5, 2.5)
    y = (IMAGE_SIZE - (bottom - top)) / 2 - top + rng.uniform(-2.5, 2.5)
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def rotate_and_noise(ink: np.ndarray, angle: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate ink intensity by ``angle`` degrees and add Gaussian noise of ``noise_std``; result in [0, 1]."""
    rotated = np.asarray(Image.fromarray(ink, mode="F").rotate(angle, resample=Image.BILINEAR), dtype=np.float32)
    return (rotated + rng.normal(0.0, noise_std, rotated.shape).astype(np.float32)).clip(0.0, 1.0)


def to_rgb(ink: np.ndarray, ink_rgb=(255, 255, 255), background_rgb=(0, 0, 0)) -> np.ndarray:
    """Blend ink over background: (H, W) intensity -> (H, W, 3) uint8."""
    ink = ink[..., None]
    rgb = np.asarray(background_rgb, np.float32) * (1.0 - ink) + np.asarray(ink_rgb, np.float32) * ink
    return rgb.round().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- samples


def _vqa_answer(kind: str, digit: int) -> tuple[str, list[str]]:
    """Canonical answer and the 10 annotator answers of a VQA question about ``digit``."""
    if kind == "identity":
        word = DIGIT_WORDS[digit]
        return word, [word] * 7 + [str(digit)] * 3  # annotators mix words and numerals
    if kind == "parity":
        word = "odd" if digit % 2 else "even"
    elif kind == "greater":
        word = "yes" if digit > 4 else "no"
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return word, [word] * 10


def make_samples(
    image: np.ndarray,
    digit: int,
    style: str,
    colour_name: str,
    shifted_language: bool,
    domain: str,
    id_prefix: str,
    rng: np.random.Generator,
    tasks: tuple[str, ...] = TASKS,
) -> list[Sample]:
    """The samples (one per task) asked about one rendered image."""
    samples = []
    for task in tasks:
        sample_id = f"{id_prefix}/{task}"
        if task == "vqa":
            kind, question = (SHIFTED_VQA if shifted_language else SOURCE_VQA)[int(rng.integers(3))]
            target, answers = _vqa_answer(kind, digit)
            samples.append(Sample(sample_id, domain, task, question, image=image, answers=answers, target=target))
        elif task == "mc":
            distractors = rng.choice([d for d in range(10) if d != digit], size=3, replace=False)
            options = [digit, *distractors.tolist()]
            rng.shuffle(options)
            choices = [DIGIT_WORDS[d] for d in options]
            prompt = (SHIFTED_MC if shifted_language else SOURCE_MC).format(*choices)
            samples.append(
                Sample(
                    sample_id,
                    domain,
                    task,
                    prompt,
                    image=image,
                    choices=choices,
                    correct_idx=options.index(digit),
                    answers=[DIGIT_WORDS[digit]] * 10,
                    target=DIGIT_WORDS[digit],
                )
            )
        else:
            references = [ref.format(d=DIGIT_WORDS[digit], c=colour_name) for ref in CAPTIONS[style]]
            prompt = SHIFTED_CAPTION if shifted_language else SOURCE_CAPTION
            target = references[int(rng.integers(len(references)))]
            samples.append(Sample(sample_id, domain, task, prompt, image=image, references=references, target=target))
    return samples


def _render(spec: DomainSpec, ink: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """Apply a domain's visual shift to ink intensity -> (RGB image, caption style, ink colour name)."""
    style, colour_name = ("printed" if spec.family == "printed" else "handwritten"), ""
    if spec.rotate_noise:
        angle = float(rng.uniform(20, 45)) * (1 if rng.random() < 0.5 else -1)
        ink, style = rotate_and_noise(ink, angle, 0.2, rng), "noisy"
    if spec.colour:
        colour_name = list(INK_COLOURS)[int(rng.integers(len(INK_COLOURS)))]
        background = tuple(int(v) for v in rng.integers(215, 256, size=3))
        return to_rgb(ink, INK_COLOURS[colour_name], background), "colour", colour_name
    return to_rgb(ink), style, colour_name


def load_domain(
    domain: str, split: str = "test", limit: int | None = None, tasks: tuple[str, ...] = TASKS, seed: int = 0
) -> list[Sample]:
    """All samples of one domain and split, deterministic for a given ``seed``.

    Args:
        domain: one of :data:`DOMAINS`.
        split: ``train``, ``stream`` or ``test``.
        limit: keep only the first ``limit`` images (each yields one sample per task).
        tasks: which tasks to generate.
        seed: seed of the rendering randomness (colours, angles, fonts, question choice).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks must be drawn from {TASKS}, got {sorted(unknown)}")
    spec = DOMAINS[domain]
    ink_all, labels, splits = _handwritten()
    indices = splits[split] if limit is None else splits[split][:limit]
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain), SPLITS.index(split)])
    samples: list[Sample] = []
    for n, index in enumerate(indices):
        digit = int(labels[index])
        if spec.family == "printed":
            digit = int(rng.integers(10))
            ink = render_printed(digit, rng)
        else:
            ink = ink_all[index]
        image, style, colour_name = _render(spec, ink, rng)
        prefix = f"{domain}/{split}/{n:04d}"
        samples += make_samples(image, digit, style, colour_name, spec.shifted_language, domain, prefix, rng, tasks)
    return samples


STYLES = tuple(CAPTIONS)  # handwritten, colour, printed, noisy: the caption style of an image


@dataclass
class TrainingImage:
    """One random pretraining image and what is true about it."""

    image: np.ndarray  # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    digit: int
    style: str  # one of STYLES
    colour_name: str  # ink colour name for the colour style, else ""
    shifted_language: bool  # whether its prompts use the new phrasing set


def training_image(distribution: str, rng: np.random.Generator) -> TrainingImage:
    """A random image from the ``train`` scans (or a fresh typeface render) for pretraining.

    Args:
        distribution: ``source`` (the student's world: clean handwritten digits, source phrasing) or
            ``broad`` (the teacher's: coloured ink on light backgrounds, typeface digits, rotation, noise,
            both phrasing sets).
        rng: randomness; a fixed generator gives a fixed stream (this is what makes pretraining resumable).
    """
    if distribution not in ("source", "broad"):
        raise ValueError(f"distribution must be 'source' or 'broad', got {distribution!r}")
    ink_all, labels, splits = _handwritten()
    index = int(splits["train"][rng.integers(len(splits["train"]))])
    digit, ink = int(labels[index]), ink_all[index]
    if distribution == "source":
        return TrainingImage(to_rgb(ink), digit, "handwritten", "", False)
    style, colour_name = "handwritten", ""
    shifted = bool(rng.random() < 0.5)
    if rng.random() < 0.35:
        digit = int(rng.integers(10))
        ink, style = render_printed(digit, rng), "printed"
    if rng.random() < 0.35:
        ink, style = rotate_and_noise(ink, float(rng.uniform(-50, 50)), float(rng.uniform(0.0, 0.3)), rng), "noisy"
    if rng.random() < 0.35:
        colour_name = list(INK_COLOURS)[int(rng.integers(len(INK_COLOURS)))]
        jitter = rng.integers(-25, 26, size=3)
        ink_rgb = tuple(int(v) for v in np.clip(np.asarray(INK_COLOURS[colour_name]) + jitter, 0, 255))
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
        return TrainingImage(to_rgb(ink, ink_rgb, background), digit, "colour", colour_name, shifted)
    return TrainingImage(to_rgb(ink), digit, style, colour_name, shifted)


def training_samples(distribution: str, count: int, rng: np.random.Generator) -> list[Sample]:
    """``count`` random pretraining samples, each a fresh :func:`training_image` with a random task."""
    samples = []
    for n in range(count):
        task = TASKS[int(rng.integers(len(TASKS)))]
        item = training_image(distribution, rng)
        samples += make_samples(
            item.image,
            item.digit,
            item.style,
            item.colour_name,
            item.shifted_language,
            distribution,
            f"{distribution}/{n}",
            rng,
            (task,),
        )
    return samples


def corpus() -> list[str]:
    """Every text the benchmark can produce; the tokenizer's vocabulary is built from it."""
    texts = [q for _, q in SOURCE_VQA + SHIFTED_VQA] + [SOURCE_CAPTION, SHIFTED_CAPTION]
    texts += [SOURCE_MC.format(*DIGIT_WORDS[:4]), SHIFTED_MC.format(*DIGIT_WORDS[4:8])]
    texts += list(DIGIT_WORDS) + ["odd even yes no"] + [str(d) for d in range(10)]
    for refs in CAPTIONS.values():
        texts += [ref.format(d=word, c=colour) for ref in refs for word in DIGIT_WORDS for colour in INK_COLOURS]
    return texts
