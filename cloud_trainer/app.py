"""``cdcca cloud``: the cloud trainer as a process, serving robots over Zenoh until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cdcca.akd import DistillSample
from cdcca.data.digits_shift import SOURCE_DOMAIN, load_domain
from cdcca.envelope import Signer
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cloud_trainer.service import CloudConfig, CloudTrainer

log = logging.getLogger(__name__)
ANCHOR_IMAGES = 64  # source images kept as anchors (as ``cdcca bench adapt``)


def build_trainer(checkpoints: Path, key_file: Path, config: CloudConfig, link=None,
                  anchor_images: int = ANCHOR_IMAGES) -> CloudTrainer:  # fmt: skip
    """A trainer with the preset's teacher, a fresh LoRA student per robot and, for the embedded digits-shift
    pair, ``anchor_images`` images of the student's source domain as anchors (0: no forgetting guard)."""
    teacher = load_mllm(Path(checkpoints) / "teacher")
    signer = Signer.load(key_file)
    anchors = None
    if anchor_images > 0 and teacher.meta.get("preset"):  # the embedded pair: its pretraining data is at hand
        anchors = DistillSample.from_samples(teacher, load_domain(SOURCE_DOMAIN, "train", limit=anchor_images))
    return CloudTrainer(teacher, lambda: load_adaptable_student(checkpoints), signer, config, link, anchors=anchors)


def serve(trainer: CloudTrainer, stop: threading.Event) -> dict:
    log.info("cloud trainer serving (state %s)", trainer.config.state_dir)
    trainer.serve(stop)
    return trainer.stats()

