"""Files: atomic writes, and the check that a path a user gives is the kind of thing a key needs.

Every artifact goes to a temp file in the same folder, then is renamed.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written one, even after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgedistill.base.errors import disk_full, no_space


def file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); an artifact is shared like any file the user writes
    # (a model that a serving account cannot read is not deployable). Windows has no fchmod, nor the need.
    if hasattr(os, "fchmod"):
        os.fchmod(fd, file_mode())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if disk_full(e):  # the writer (torch.save, onnx, a runtime) may not say which file it was writing
            raise no_space(path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def append_line(path, line: str) -> None:
    """Append one line, rewriting the file atomically (jsonl logs are small: one line an epoch)."""
    path = Path(path)
    old = path.read_text("utf-8") if path.exists() else ""
    write_text(path, old + line.rstrip("\n") + "\n")


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_problem(path: str | Path, kind: str, what: str) -> str | None:
    """Why ``path`` is not the ``kind`` ("file" or "folder") a key needs (``what``, in words), or None."""
    path = Path(path).expanduser()
    if not path.exists():
        return f"{path} not found (expected {what})"
    if path.is_dir() != (kind == "folder"):
        return f"{path} is a {'folder' if path.is_dir() else 'file'}, expected {what}"
    return None


def _jsonable(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
