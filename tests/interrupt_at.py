"""Run the edgedistill CLI and deliver a signal during a chosen training step or call: interruption tests with no timing.

    python interrupt_at.py SIGNAL WHERE N ARGS...

SIGNAL is INT, TERM or KILL; ARGS the ``edgedistill`` arguments. WHERE is a training loop (``teacher``,
``distill``, ``qat`` or ``baseline``), and N the 1-based count of that loop's steps in this process during which the signal is sent; or a
function or method as the module that calls it names it (``edgedistill.distill.train.class_tally``,
``edgedistill.distill.run_state.Checkpoints.save``), and N the call, at whose start the signal is sent.
In training, SIGINT and SIGTERM land on the loop's handler (it finishes the step and saves); elsewhere they stop the
process; SIGKILL ends it where it is.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

import edgedistill.pipeline.stages as stages
from edgedistill.cli import main
from edgedistill.distill.objectives import Objective


class Interrupting(Objective):
    def __init__(self, inner: Objective, sig: signal.Signals, step: int):
        self.inner, self.sig, self.step, self.steps = inner, sig, step, 0

    def begin_step(self, seed: int) -> None:
        self.inner.begin_step(seed)

    def begin_epoch(self, epoch: int) -> None:
        self.inner.begin_epoch(epoch)

    def end_epoch(self, epoch: int, whole: bool) -> None:
        self.inner.end_epoch(epoch, whole)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __call__(self, *args):
        self.steps += 1
        if self.steps == self.step:
            os.kill(os.getpid(), self.sig)
        return self.inner(*args)


def patch(sig: signal.Signals, label: str, step: int) -> None:
    fit = stages.fit

    def interrupted_fit(model, objective, train_set, test_set, cfg, loop, *rest, **kw):
        if loop.label == label:
            objective = Interrupting(objective, sig, step)
        return fit(model, objective, train_set, test_set, cfg, loop, *rest, **kw)

    stages.fit = interrupted_fit


def patch_call(sig: signal.Signals, dotted: str, call: int) -> None:
    """Send ``sig`` at the start of the ``call``-th call of ``dotted`` (a module attribute, or a class's method)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        break
    inner, calls = getattr(owner, parts[-1]), [0]

    @functools.wraps(inner)
    def interrupting(*a, **kw):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return inner(*a, **kw)

    setattr(owner, parts[-1], interrupting)


if __name__ == "__main__":
    name, where, n, *args = sys.argv[1:]
    sig = signal.Signals[f"SIG{name}"]
    if where in ("teacher", "distill", "qat", "baseline"):
        patch(sig, where, int(n))
    else:
        patch_call(sig, where, int(n))
    sys.argv = ["edgedistill", *args]
    main()
