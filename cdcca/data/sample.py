"""One question (or caption request) about one image: the unit every part of CD-CCA passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("vqa", "mc", "caption")


@dataclass
class Sample:
    """A prompt about an image plus everything needed to score an answer to it.

    Args:
        sample_id: unique, stable id (benchmark samples encode domain, split, task and index).
        domain: the domain the image and phrasing come from (``source``, ``printed``, ...).
        task: ``vqa`` (direct answer), ``mc`` (multiple choice) or ``caption``.
        prompt: the text the model is asked (question, or caption instruction).
        image: RGB uint8 array of shape (H, W, 3); ``None`` when the sample points at ``image_path``.
        image_path: file the image is read from lazily (real datasets); ``None`` for in-memory images.
        answers: ground-truth direct answers (VQA-style, usually 10 of them); empty for captions.
        choices: the options of a multiple-choice question; empty otherwise.
        correct_idx: index of the right option in ``choices``; ``-1`` when not multiple choice.
        references: reference captions; empty unless ``task == "caption"``.
        target: the single canonical answer used as the training label.
    """

    sample_id: str
    domain: str
    task: str
    prompt: str
    image: np.ndarray | None = None
    image_path: str | None = None
    answers: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    correct_idx: int = -1
    references: list[str] = field(default_factory=list)
    target: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Sample.task must be one of {TASKS}, got {self.task!r}")
        if self.image is None and self.image_path is None:
            raise ValueError(f"Sample {self.sample_id!r} needs an image or an image_path")
        if self.task == "mc" and not (0 <= self.correct_idx < len(self.choices)):
            raise ValueError(
                f"Sample {self.sample_id!r}: correct_idx={self.correct_idx} is not an index into "
                f"{len(self.choices)} choices"
            )

    def load_image(self) -> np.ndarray:
        """The image as an RGB uint8 array (H, W, 3), read from disk on first use."""
        if self.image is None:
            from PIL import Image

            path = Path(self.image_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {path} of sample {self.sample_id!r} does not exist; point the loader's "
                    "images directory at the folder holding the dataset's images"
                )
            with Image.open(path) as img:
                self.image = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return self.image
