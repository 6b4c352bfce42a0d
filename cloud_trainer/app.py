"""``cdcca cloud``: the cloud trainer as a process, serving robots over Zenoh until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cdcca.envelope import Signer
from cdcca.models.checkpoint import load_adaptable_student, load_mllm
from cloud_trainer.service import CloudConfig, CloudTrainer

log = logging.getLogger(__name__)


def build_trainer(checkpoints: Path, key_file: Path, config: CloudConfig, link=None) -> CloudTrainer:
    """A trainer with the preset's teacher and a fresh LoRA student per robot."""
    teacher = load_mllm(Path(checkpoints) / "teacher")
    signer = Signer.load(key_file)
    return CloudTrainer(teacher, lambda: load_adaptable_student(checkpoints), signer, config, link)


def serve(trainer: CloudTrainer, stop: threading.Event) -> dict:
    log.info("cloud trainer serving (state %s)", trainer.config.state_dir)
    trainer.serve(stop)
    return trainer.stats()

