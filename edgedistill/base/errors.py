"""Every error the user can cause, and the one table that maps them to exit codes.

Stages raise these; only :mod:`edgedistill.cli` turns them into a message and an exit code,
so the codes live here and nowhere else.
"""

from __future__ import annotations

import re

OK = 0
GATE_FAILED = 1
BAD_INPUT = 2
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
