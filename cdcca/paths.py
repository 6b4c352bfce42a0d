"""Where CD-CCA keeps what it builds: ``$CDCCA_CACHE`` if set, else ``~/.cache/cdcca``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache (checkpoints, reports)."""
    return Path(os.environ.get("CDCCA_CACHE", Path.home() / ".cache" / "cdcca")).expanduser()


def checkpoint_dir(preset: str) -> Path:
    """Directory holding ``teacher/`` and ``student/`` of a preset built by ``cdcca pretrain``."""
    return cache_dir() / "checkpoints" / preset
