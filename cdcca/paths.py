"""Where CD-CCA keeps what it builds (``$CDCCA_CACHE`` if set, else ``~/.cache/cdcca``), and how a small file is
replaced without a reader ever seeing half of it."""

from __future__ import annotations

import os
from pathlib import Path

from cdcca.errors import CdccaError


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


LOCK_FILE = ".lock"


class FolderInUse(CdccaError, OSError):
    """A state folder another live process holds (:class:`FolderLock`)."""


class FolderLock:
    """An exclusive hold on a state folder for as long as this process keeps it: two robots (or two clouds) on one
    folder would write one adapter state and answer one uplink queue's acks each as their own.

    ``flock`` on ``<folder>/.lock``, which names the holder's pid; the kernel drops the hold when the process ends,
    however it ends, so a crash leaves nothing to clean up. The file is never deleted (deleting it would let a
    second process lock a new file while the first still holds the old one)."""

    def __init__(self, folder: Path, hint: str = "pass another --state folder", name: str = LOCK_FILE) -> None:
        """Take the hold, or raise :class:`FolderInUse` naming the holder's pid.

        Args:
            folder: the state folder (made if missing).
            hint: what the refused one can do instead, the end of the error's sentence.
            name: the lock file's name (several cloud workers share a folder, each under ``.lock-<worker id>``).
        """
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            who = "this process" if holder == str(os.getpid()) else "another process"  # a build never closed
            raise FolderInUse(f"{folder} is in use by {who} (pid {holder}); stop that one first, or {hint}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let another process take the folder (closing the file drops the ``flock``)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
