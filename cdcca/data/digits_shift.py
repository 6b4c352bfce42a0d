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

A domain is a :class:`DomainSpec`: where its glyphs come from (scans or a typeface), an image transform
(ink intensity -> :class:`Rendered` RGB image + reference captions) and a :class:`Phrasing` (prompt
templates). A new shift is a few lines::

    blurred = DomainSpec("blurred", transform=lambda ink, rng: white_on_black(box_blur(ink)))
    samples = load_domain(blurred, "test")        # or register_domain(blurred), then load_domain("blurred")

Every image yields one sample per task: direct-answer VQA (which digit / odd or even / greater than
four), 4-way multiple choice, and a caption. Splits are fixed: handwritten scans are split once with a
fixed seed into ``train`` (pretraining only), ``stream`` (what the robot sees online) and ``test``.

Pretraining distributions (see :func:`training_samples`): the student sees only ``source``; the teacher
sees a broader distribution -- random colours, typeface digits, rotations, noise and both phrasing sets --
drawn from the ``train`` scans and fresh renders, as a large cloud model has seen more of the world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdcca.data.sample import TASKS, Sample

IMAGE_SIZE = 24  # pixels per side of every rendered image
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_COLOURS = {  # named ink colours of the colour_inverted domain and the teacher's broad distribution (RGB)
    "red": (200, 30, 30),
    "green": (30, 140, 40),
    "blue": (30, 60, 200),
    "purple": (120, 40, 160),
    "orange": (230, 120, 20),
    "brown": (120, 70, 30),
}
# colour names a new domain may put in its captions: all are in the tokenizer's vocabulary (see corpus())
COLOUR_WORDS = (*INK_COLOURS, "black", "white", "grey", "gray", "yellow", "pink", "cyan", "magenta", "teal",
                "navy", "olive", "maroon", "gold", "silver", "violet", "lime", "turquoise", "beige", "dark",
                "light", "pale", "bright")  # fmt: skip
SPLITS = ("train", "stream", "test")
_SPLIT_SIZES = {"train": 1100, "stream": 350}  # test takes the remaining 347 scans
_SPLIT_SEED = 0
VQA_KINDS = ("identity", "parity", "greater")


# ---------------------------------------------------------------------------------------------- phrasing


@dataclass(frozen=True)
class Phrasing:
    """A set of prompt templates: how the robot's users ask.

    Args:
        name: short name (``source``, ``shifted``...).
        vqa: ``(kind, question)`` pairs; ``kind`` is one of :data:`VQA_KINDS` and decides the answer.
        mc: multiple-choice template with four ``{}`` slots for the options.
        caption: the caption instruction.
    """

    name: str
    vqa: tuple[tuple[str, str], ...]
    mc: str
    caption: str

    def __post_init__(self) -> None:
        kinds = {kind for kind, _ in self.vqa}
        if not self.vqa or not kinds <= set(VQA_KINDS):
            raise ValueError(f"Phrasing.vqa needs (kind, question) pairs with kinds from {VQA_KINDS}, got {kinds}")
        if self.mc.count("{") != 4:
            raise ValueError(f"Phrasing.mc needs exactly four {{}} option slots, got {self.mc!r}")

    def texts(self) -> list[str]:
        """Every prompt this phrasing can produce (options filled with digit words), for the vocabulary."""
        return [q for _, q in self.vqa] + [self.caption, self.mc.format(*DIGIT_WORDS[:4]),
                                           self.mc.format(*DIGIT_WORDS[4:8])]  # fmt: skip


SOURCE_PHRASING = Phrasing(
    "source",
    vqa=(
        ("identity", "what digit is this?"),
        ("parity", "is the digit odd or even?"),
        ("greater", "is the digit greater than four?"),
    ),
    mc="which digit is shown? choices: {0}, {1}, {2}, {3}.",
    caption="describe the image.",
)
SHIFTED_PHRASING = Phrasing(
    "shifted",
    vqa=(
        ("identity", "which number can be seen in the picture?"),
        ("parity", "would you say the number in the picture is odd or even?"),
        ("greater", "is the number shown bigger than four?"),
    ),
    mc="pick the number that appears in the picture from {0}, {1}, {2} or {3}.",
    caption="write a short caption for this picture.",
)
SOURCE_VQA, SHIFTED_VQA = SOURCE_PHRASING.vqa, SHIFTED_PHRASING.vqa

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


# ----------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Rendered:
    """One image as a domain renders it.

    Attributes:
        image: (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB.
        captions: reference caption templates, ``{d}`` standing for the digit word.
    """

    image: np.ndarray
    captions: tuple[str, ...]


ImageTransform = Callable[[np.ndarray, np.random.Generator], Rendered]  # ink (H, W) in [0, 1] -> Rendered


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


def white_on_black(ink: np.ndarray, rng: np.random.Generator | None = None) -> Rendered:
    """The source look: white ink on black, handwritten captions."""
    return Rendered(to_rgb(ink), CAPTIONS["handwritten"])


def typeface(ink: np.ndarray, rng: np.random.Generator | None = None) -> Rendered:
    """Typeface glyphs (see :func:`render_printed`) as white on black, printed captions."""
    return Rendered(to_rgb(ink), CAPTIONS["printed"])


def coloured_ink(ink: np.ndarray, rng: np.random.Generator) -> Rendered:
    """One of :data:`INK_COLOURS` on a random light background; captions name the colour."""
    colour = list(INK_COLOURS)[int(rng.integers(len(INK_COLOURS)))]
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    captions = tuple(c.replace("{c}", colour) for c in CAPTIONS["colour"])
    return Rendered(to_rgb(ink, INK_COLOURS[colour], background), captions)


def rotated_noisy(ink: np.ndarray, rng: np.random.Generator) -> Rendered:
    """Rotated 20-45 degrees either way, Gaussian noise of 0.2, white on black."""
    angle = float(rng.uniform(20, 45)) * (1 if rng.random() < 0.5 else -1)
    return Rendered(to_rgb(rotate_and_noise(ink, angle, 0.2, rng)), CAPTIONS["noisy"])


# ---------------------------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class DomainSpec:
    """How one domain renders images and phrases prompts.

    Args:
        name: domain name, the ``domain`` field of its samples.
        transform: ink intensity (H, W) in [0, 1] + randomness -> :class:`Rendered`; the visual shift.
        phrasing: prompt templates; the language shift.
        glyphs: ``handwritten`` (the split's UCI scans) or ``printed`` (typeface renders of random digits).
    """

    name: str
    transform: ImageTransform = field(default=white_on_black, compare=False)
    phrasing: Phrasing = SOURCE_PHRASING
    glyphs: str = "handwritten"

    def __post_init__(self) -> None:
        if self.glyphs not in ("handwritten", "printed"):
            raise ValueError(f"DomainSpec.glyphs must be 'handwritten' or 'printed', got {self.glyphs!r}")

    @property
    def shifted_language(self) -> bool:
        """Whether its prompts differ from the source phrasing."""
        return self.phrasing != SOURCE_PHRASING

    @property
    def shifted_vision(self) -> bool:
        """Whether its images differ from the source look."""
        return self.glyphs != "handwritten" or self.transform is not white_on_black


DOMAINS: dict[str, DomainSpec] = {}


def register_domain(spec: DomainSpec) -> DomainSpec:
    """Make ``spec`` loadable by name (``load_domain``, the CLI's ``--domains``); names are unique."""
    if spec.name in DOMAINS and DOMAINS[spec.name] is not spec:
        raise ValueError(f"a domain called {spec.name!r} is already registered")
    DOMAINS[spec.name] = spec
    return spec


for _spec in (
    DomainSpec("source"),
    DomainSpec("colour_inverted", transform=coloured_ink),
    DomainSpec("printed", transform=typeface, glyphs="printed"),
    DomainSpec("noisy_rotated", transform=rotated_noisy),
    DomainSpec("rephrased", phrasing=SHIFTED_PHRASING),
):
    register_domain(_spec)
SOURCE_DOMAIN = "source"
TARGET_DOMAINS = tuple(name for name in DOMAINS if name != SOURCE_DOMAIN)
VISUAL_DOMAINS = tuple(name for name in TARGET_DOMAINS if DOMAINS[name].shifted_vision)
_LOADED_SHIFTS: dict[tuple[str, str], tuple[str, ...]] = {}


def load_shifts(spec: str) -> tuple[str, ...]:
    """Register the shifts a Python file declares and return their names in order: ``spec`` is ``FILE.py:NAME``,
    ``NAME`` a sequence of :class:`DomainSpec` in that file (``FILE.py`` alone reads ``SHIFTS``). What ``cdcca bench
    adapt --shifts`` runs the whole benchmark on; ``bench/heldout_shifts.py`` declares ``HELDOUT``, ``FRESH`` and
    ``SEALED`` this way. Loading the same ``spec`` again returns the names registered the first time.

    The file is executed, so pass only a file you trust (as with any Python file you run)."""
    import importlib.util

    path_text, _, attribute = spec.rpartition(":") if ":" in spec else (spec, "", "")
    path, attribute = Path(path_text), attribute or "SHIFTS"
    key = (str(path.resolve()), attribute)
    if key in _LOADED_SHIFTS:
        return _LOADED_SHIFTS[key]
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"--shifts wants FILE.py[:NAME] naming a Python file that declares DomainSpecs, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location(f"cdcca_shifts_{abs(hash(key))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: a syntax error or a raise in it is theirs to fix, not a crash of ours
        raise ValueError(f"--shifts {path} failed to load: {type(err).__name__}: {err}") from err
    specs = getattr(module, attribute, None)
    if not specs or not isinstance(specs, (list, tuple)) or not all(isinstance(s, DomainSpec) for s in specs):
        found = [name for name, value in vars(module).items() if isinstance(value, (list, tuple)) and value
                 and all(isinstance(v, DomainSpec) for v in value)]  # fmt: skip
        raise ValueError(f"{path} has no sequence of DomainSpec called {attribute!r}"
                         + (f"; it has {', '.join(found)}" if found else ""))  # fmt: skip
    names = tuple(register_domain(s).name for s in specs)
    _LOADED_SHIFTS[key] = names
    return names


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
    rendered: Rendered,
    digit: int,
    phrasing: Phrasing,
    domain: str,
    id_prefix: str,
    rng: np.random.Generator,
    tasks: tuple[str, ...] = TASKS,
) -> list[Sample]:
    """The samples (one per task) asked about one rendered image of ``digit``."""
    samples, image = [], rendered.image
    for task in tasks:
        sample_id = f"{id_prefix}/{task}"
        if task == "vqa":
            kind, question = phrasing.vqa[int(rng.integers(len(phrasing.vqa)))]
            target, answers = _vqa_answer(kind, digit)
            samples.append(Sample(sample_id, domain, task, question, image=image, answers=answers, target=target))
        elif task == "mc":
            distractors = rng.choice([d for d in range(10) if d != digit], size=3, replace=False)
            options = [digit, *distractors.tolist()]
            rng.shuffle(options)
            choices = [DIGIT_WORDS[d] for d in options]
            samples.append(
                Sample(sample_id, domain, task, phrasing.mc.format(*choices), image=image, choices=choices,
                       correct_idx=options.index(digit), answers=[DIGIT_WORDS[digit]] * 10,
                       target=DIGIT_WORDS[digit])
            )  # fmt: skip
        else:
            references = [ref.format(d=DIGIT_WORDS[digit]) for ref in rendered.captions]
            target = references[int(rng.integers(len(references)))]
            samples.append(
                Sample(sample_id, domain, task, phrasing.caption, image=image, references=references, target=target)
            )
    return samples


def render(spec: DomainSpec, index: int, rng: np.random.Generator) -> tuple[Rendered, int]:
    """The image of handwritten scan ``index`` (or of a random typeface digit) in ``spec``'s look, and its digit."""
    ink_all, labels = _handwritten()[:2]
    if spec.glyphs == "printed":
        digit = int(rng.integers(10))
        ink = render_printed(digit, rng)
    else:
        digit, ink = int(labels[index]), ink_all[index]
    rendered = spec.transform(ink, rng)
    if rendered.image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or rendered.image.dtype != np.uint8:
        raise ValueError(f"domain {spec.name!r}: its transform must return a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) uint8 "
                         f"image, got {rendered.image.dtype} {rendered.image.shape}")  # fmt: skip
    return rendered, digit


def load_domain(
    domain: str | DomainSpec,
    split: str = "test",
    limit: int | None = None,
    tasks: tuple[str, ...] = TASKS,
    seed: int = 0,
) -> list[Sample]:
    """All samples of one domain and split, deterministic for a given ``seed``.

    Args:
        domain: a registered domain name (:data:`DOMAINS`) or a :class:`DomainSpec`.
        split: ``train``, ``stream`` or ``test``.
        limit: keep only the first ``limit`` images (each yields one sample per task).
        tasks: which tasks to generate.
        seed: seed of the rendering randomness (colours, angles, fonts, question choice).
    """
    if isinstance(domain, DomainSpec):
        spec = domain
    elif domain in DOMAINS:
        spec = DOMAINS[domain]
    else:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)} or a DomainSpec, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks must be drawn from {TASKS}, got {sorted(unknown)}")
    splits = _handwritten()[2]
    indices = splits[split] if limit is None else splits[split][:limit]
    # registered domains keep their historical seeds; others are keyed by a stable hash of the name
    key = list(DOMAINS).index(spec.name) if spec.name in DOMAINS else int.from_bytes(spec.name.encode()[:8], "little")
    rng = np.random.default_rng([seed, key, SPLITS.index(split)])
    samples: list[Sample] = []
    for n, index in enumerate(indices):
        rendered, digit = render(spec, int(index), rng)
        samples += make_samples(rendered, digit, spec.phrasing, spec.name, f"{spec.name}/{split}/{n:04d}", rng, tasks)
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
        captions = tuple(c.replace("{c}", item.colour_name) for c in CAPTIONS[item.style])
        phrasing = SHIFTED_PHRASING if item.shifted_language else SOURCE_PHRASING
        samples += make_samples(Rendered(item.image, captions), item.digit, phrasing, distribution,
                                f"{distribution}/{n}", rng, (task,))  # fmt: skip
    return samples


def corpus() -> list[str]:
    """Every text the benchmark can produce, plus colour and shift words new domains may use in captions;
    the tokenizer's vocabulary is built from it."""
    phrasings = {SOURCE_PHRASING, SHIFTED_PHRASING} | {spec.phrasing for spec in DOMAINS.values()}
    texts = [text for phrasing in sorted(phrasings, key=lambda p: p.name) for text in phrasing.texts()]
    texts += list(DIGIT_WORDS) + ["odd even yes no"] + [str(d) for d in range(10)] + list(COLOUR_WORDS)
    texts += ["blurred blurry faded tilted rotated upside down small large thin thick bold dim noisy dotted",
              "a an the of in on with by picture photo image scan drawn written printed digit number"]  # fmt: skip
    for refs in CAPTIONS.values():
        texts += [ref.format(d=word, c=colour) for ref in refs for word in DIGIT_WORDS for colour in INK_COLOURS]
    return texts
