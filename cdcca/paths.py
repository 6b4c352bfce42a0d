"""Where CD-CCA keeps what it builds (``$CDCCA_CACHE`` if set, else ``~/.cache/cdcca``), and how a small file is
replaced without a reader ever seeing half of it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache (checkpoints, reports)."""
    return Path(os.environ.get("CDCCA_CACHE", Path.home() / ".cache" / "cdcca")).expanduser()


def checkpoint_dir(preset: str) -> Path:
    """Directory holding ``teacher/`` and ``student/`` of a preset built by ``cdcca pretrain``."""
    return cache_dir() / "checkpoints" / preset


def write_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Replace ``path`` with ``text``: written beside it, then renamed over it (readers see the old or the new file,
    never half of one). ``durable``: also fsync the file and its folder, so the new content survives a power cut."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names last written in ``folder`` (a rename, a link) survive a power cut."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
