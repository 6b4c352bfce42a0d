"""The cloud trainer sidecar: receives uncertain visual tokens from robots, stores them durably, distills a
large teacher into a cloud copy of each robot's student, and publishes signed, compressed weight deltas.
Built on ``cdcca``; run it with ``cdcca cloud`` or ``python -m cloud_trainer`` (also under ``torchrun``)."""

from cloud_trainer.service import CloudConfig, CloudTrainer
from cloud_trainer.store import CloudStore

__all__ = ["CloudConfig", "CloudStore", "CloudTrainer"]
