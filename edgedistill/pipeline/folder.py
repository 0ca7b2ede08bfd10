"""The run folder ``<out>/<recipe name>/``: artifacts, ``stages/<stage>.done`` markers and the lock.

Its files are a public contract (docs/run-folder.md). This module knows where things live and whether a
stage has finished; it knows nothing about what the stages do.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgedistill.base import fsio
from edgedistill.base.errors import RunStateError

LOCK_FILE = ".lock"


NOTHING_MADE = "nothing_made"
SKIPPED_FILE = "skipped_images.json"  # the image files data.on_bad_image: skip left out


class RunFolder:
    def __init__(self, root: Path):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def _marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.done"

    def done(self, stage: str) -> bool:
        return self._marker(stage).exists()

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        fsio.write_json(self._marker(stage), summary)

    def summary(self, stage: str) -> dict[str, Any]:
        path = self._marker(stage)
        return json.loads(path.read_text()) if path.exists() else {}

    def clear(self, stages: list[str]) -> None:
        for s in stages:
            self._marker(s).unlink(missing_ok=True)

    def require(self, stage: str, file: str | None = None) -> Path | None:
        """The artifact of an earlier stage, or a clear error naming the command that makes it."""
        if not self.done(stage):
            raise RunStateError(
                f"{self.root}: stage '{stage}' has not finished; run 'edgedistill {stage} {self.root}' "
                f"(or 'edgedistill run {self.root} --resume') first"
            )
        return self.root / file if file else None

    def has_work(self) -> bool:
        """A finished stage that made something, or a training checkpoint: what ``--resume`` would continue and a new
        run would overwrite. (A stage with nothing to do, e.g. ``pick`` for a student the recipe fixes, says
        ``NOTHING_MADE`` in its summary.)"""
        made = any(not self.summary(m.name.removesuffix(".done")).get(NOTHING_MADE) for m in (self.root / "stages").glob("*.done"))
        return made or any((self.root / "checkpoints").rglob("*.pt"))

    @contextmanager
    def lock(self, take: bool = True) -> Iterator[None]:
        """One process per run folder: an exclusive ``flock`` held for the whole command.

        The kernel drops the lock when its holder dies, so a killed run never leaves a stale lock behind.
        Under torchrun only rank 0 takes it (``take``): the ranks of one job are one owner.
        """
        if not take:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = _acquire(path)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # for the message a second process prints
            yield
        finally:
            path.unlink(missing_ok=True)  # unlinked while still held: see _acquire
            os.close(fd)


def _acquire(path: Path) -> int:
    """An exclusive, non-blocking flock on ``path``.

    The holder unlinks the file on release, so a process that opened the old file just before may win a
    lock on a file no longer in the folder; it checks that the path still names the locked file, and retries.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, fsio.file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunStateError(
                f"{path}: another edgedistill process (pid {holder}) is using this run folder; wait for it to finish"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
