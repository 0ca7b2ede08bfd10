"""Every error the user can cause, and the one table that maps them to exit codes.

Stages raise these; only :mod:`edgedistill.cli` turns them into a message and an exit code,
so the codes live here and nowhere else.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

OK = 0
GATE_FAILED = 1
BAD_INPUT = 2
OUT_OF_RESOURCES = 3
INTERRUPTED = 130


class EdgeDistillError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code = BAD_INPUT

    def __init__(self, message: object = "", *args):
        super().__init__(_unwrap_worker_message(str(message)), *args)


def _unwrap_worker_message(msg: str) -> str:
    """A DataLoader worker re-raises our error in the main process as ``type(e)(traceback text)``;
    keep only the original one-line message (the last line: ``edgedistill.base.errors.X: message``)."""
    if not (msg.startswith("Caught ") and "\nOriginal Traceback" in msg):
        return msg
    last = [line for line in msg.splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.startswith("edgedistill.base.errors.") else last


class RecipeError(EdgeDistillError):
    """The recipe (or a --set override) is invalid. The message names the key path."""


class InputError(EdgeDistillError):
    """A file, data set, model or device given by the user is unusable."""


class RunStateError(EdgeDistillError):
    """The run folder is not in a state the command can work from (missing stage, lock, changed recipe)."""


class TrainingDiverged(EdgeDistillError):
    """The loss became non-finite; the last good checkpoint is kept."""

    exit_code = GATE_FAILED


class GateFailed(EdgeDistillError):
    """A quality gate (parity, accuracy drop) failed."""

    exit_code = GATE_FAILED


class ResourceExhausted(EdgeDistillError):
    """The disk or the memory ran out. Nothing half-written is left; ``--resume`` continues once it is back."""

    exit_code = OUT_OF_RESOURCES


class Interrupted(EdgeDistillError):
    """SIGINT / SIGTERM: state was saved and the run can be resumed."""

    exit_code = INTERRUPTED


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CPP_FRAME = re.compile(r"/\S+\.(?:cc|cpp|h):\d+ [\w:~<>]+\([^()]*\)\s*")  # ONNX Runtime's "file.cc:256 ns::Fn(args) "
_TORCHSCRIPT_HEAD = "The following operation failed in the TorchScript interpreter"


def first_line(e: BaseException, limit: int = 300) -> str:
    """The informative head of an exception message, for one-line errors: its first line, first sentence,
    at most ``limit`` characters, without ANSI colour codes or ONNX Runtime's C++ source locations.

    TorchScript interpreter errors start with a boilerplate line; their cause is on the last line.
    An empty message gives the exception's type name.
    """
    lines = [line.strip() for line in _CPP_FRAME.sub("", _ANSI.sub("", str(e))).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[-1] if lines[0].startswith(_TORCHSCRIPT_HEAD) else lines[0]
    text = text.removeprefix("RuntimeError: ")
    return text.partition(". ")[0].rstrip(".")[:limit]


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# torch.save reports a short write as a bare RuntimeError from its zip writer, without errno or path
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")
_OUT_OF_MEMORY = ("out of memory", "DefaultCPUAllocator: can't allocate memory", "Failed to allocate memory")


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed because its file system is full (or over quota)."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_SHORT_WRITE)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: host memory, or a CUDA device's (``torch.OutOfMemoryError``
    is a RuntimeError whose message says so)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _OUT_OF_MEMORY))


def no_space(path: str | Path) -> ResourceExhausted:
    """The error for a write to ``path`` that found its disk full, with the space left there."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path.cwd())
    free_mb = shutil.disk_usage(folder).free / 1e6
    return ResourceExhausted(f"{path}: no space left to write it ({free_mb:.1f} MB free on its file system); "
                             "free some space (or give --out on another disk)")


def user_error(e: BaseException) -> EdgeDistillError | None:
    """The user-facing error a library's exception stands for, or None when it is a bug (shown as a traceback).

    The one translation from resources running out (and files the user named) to exit codes; stages raise what
    they raise and never catch these themselves.
    """
    if isinstance(e, EdgeDistillError):
        return e
    if disk_full(e):
        filename = getattr(e, "filename", None)
        return no_space(filename) if filename else ResourceExhausted(
            f"no space left on a disk the run writes to ({first_line(e)}); free some space")
    if out_of_memory(e):
        return ResourceExhausted(f"out of memory ({first_line(e)}); lower data.batch_size (training) or "
                                 "data.eval_batch_size (scoring, evaluation, export checks) with --set")
    if isinstance(e, OSError) and e.filename:
        # a file the user pointed at (or --out) cannot be read or written
        return InputError(f"{e.filename}: {e.strerror or e}")
    return None
