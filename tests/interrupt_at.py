"""Run the edgedistill CLI and deliver a signal during a chosen training step: interruption tests with no timing.

    python interrupt_at.py SIGNAL LABEL STEP ARGS...

SIGNAL is INT, TERM or KILL; LABEL the training loop it concerns (``teacher`` or ``distill``); STEP the 1-based
count of that loop's steps in this process during which the signal is sent; ARGS the ``edgedistill`` arguments.
SIGINT and SIGTERM land on the loop's handler (it finishes the step and saves); SIGKILL ends the process mid-step.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    name, label, step, *args = sys.argv[1:]
    patch(signal.Signals[f"SIG{name}"], label, int(step))
    sys.argv = ["edgedistill", *args]
    main()
