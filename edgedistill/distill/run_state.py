"""Where training stands and what survives a stop: the position, ``last.pt`` / ``best.pt``, the metrics log that
a resumed run trims to its checkpoint, and the flag SIGINT / SIGTERM set so that the loop stops between steps."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from edgedistill.base import fsio
from edgedistill.base.console import console
from edgedistill.base.errors import InputError
from edgedistill.models.checkpoints import load_checkpoint, load_state

class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves, and raises :class:`Interrupted`."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    flag = StopFlag()

    def handler(signum, frame):
        if flag:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag.signal = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint…[/]")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Position:
    """Where training stands: the next epoch and step to run, and the best test top-1 so far."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "objective", "hook", "epoch", "step", "best_top1")


class Checkpoints:
    """``last.pt`` (everything needed to continue) and ``best.pt`` (the weights of the best epoch)."""

    def __init__(self, loop, parts: dict[str, Any], before_save: Callable[[], None]):
        self.dir, self.recipe, self.parts = loop.checkpoint_dir, loop.recipe, parts  # parts: objects with state_dict()
        self.before_save = before_save
        self.last = self.dir / "last.pt"

    def restore(self) -> Position:
        ckpt = load_checkpoint(self.last)
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise InputError(f"{self.last}: not a training checkpoint of this tool (missing {', '.join(missing)})")
        load_state(self.parts["model"], ckpt["model"], str(self.last))
        for name, part in self.parts.items():
            if name != "model":
                part.load_state_dict(ckpt[name])
        return Position(ckpt["epoch"], ckpt["step"], ckpt["best_top1"])

    def save(self, at: Position, top1: float | None = None) -> None:
        self.before_save()
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state.update(epoch=at.epoch, step=at.step, best_top1=at.best, recipe=self.recipe)
        with fsio.atomic_path(self.last) as tmp:
            torch.save(state, tmp)
        if top1 is not None and top1 >= at.best:
            with fsio.atomic_path(self.dir / "best.pt") as tmp:
                torch.save({"model": state["model"], "epoch": at.epoch, "test_top1": top1, "recipe": self.recipe}, tmp)


def trim_metrics(path: Path, upto_epoch: int) -> None:
    """Drop metric lines of epochs a resumed run will redo (written after the last checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["epoch"] <= upto_epoch]
    if len(keep) != len(lines):
        fsio.write_text(path, "".join(line + "\n" for line in keep))


def last_top1(path: Path) -> float:
    if not path.exists():
        return float("nan")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1]["test_top1"] if lines else float("nan")
