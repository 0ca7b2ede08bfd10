"""The closed loop that holds a compute budget while training: measure what steps cost, re-choose r per epoch.

The plan stage predicts the cost of HE-DA (Energy KD paper, Knowledge-Based Systems 296 (2024) 111911: extra
mixed samples for r·N selected images) before training; a prediction taken on a few steps drifts from what a
whole run costs (other load on the machine, caches, thermal limits). During distillation this module

* estimates, from every step it sees, the cost of a plain step and of one extra sample (a least-squares line of
  step seconds against the step's number of extras, recent steps weighted more, so a machine that slows down is
  followed within an epoch) and the per-epoch cost outside the steps (evaluation, checkpoint);
* before every epoch and ``CHECKS_PER_EPOCH − 1`` times within it, chooses the largest r in the budget range whose
  predicted cost of the rest of the run fits what is left of the budget: ``max_minutes`` is wall time of the
  distill stage, ``max_overhead`` time over what the same run would cost without extras; r rises by at most
  ``MAX_RISE`` a choice and falls as far as needed, and a change smaller than ``DEADBAND`` is not made (from
  r = 0 back into the range only with that much room above the range's bottom), so r does not oscillate.
  Choosing within epochs matters on short schedules: a first epoch run at a misjudged r (the plan's few steps)
  is a third of a three-epoch run;
* when even r = 0 cannot fit, runs on at r = 0 and says by how much the budget will be overrun.

Pure Python: the clock and the step observations come from outside (see :class:`BudgetHook`), so the whole
loop is tested on a simulated clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from edgedistill.budget.cost import Costs, fits, fitting_fractions

MAX_RISE = 0.05  # per choice
DEADBAND = 0.02
CHECKS_PER_EPOCH = 4
HELD_TOLERANCE = 0.05  # a budget counts as held when the run ends within 5 % above it
#: weight a step's observation keeps per later step: an observation half a window old weighs half as much
HALF_LIFE_STEPS = 25
#: the run's first steps are not fed to the estimator: they carry one-time costs (allocations, the teacher runtime's
#: first calls), and a few of them with many extras made the early slope look several times too steep. (By position,
#: not per process, so that a resumed run makes exactly the choices of an uninterrupted one.)
UNOBSERVED_STEPS = 3


@dataclass(frozen=True)
class Goal:
    """Exactly one of ``max_minutes`` (distill-stage wall time) and ``max_overhead`` (e.g. 0.25 = +25 %)."""

    max_minutes: float | None
    max_overhead: float | None
    lo: float
    hi: float

    def allowed_seconds(self, baseline_total: float) -> float:
        """The whole run's allowance: fixed for minutes; ``(1 + overhead) ×`` the no-extras cost for overhead."""
        return 60.0 * self.max_minutes if self.max_minutes is not None else (1.0 + self.max_overhead) * baseline_total


@dataclass
class CostEstimator:
    """Step cost as a line in the number of extras, fitted to recent steps; epoch overhead as its latest value.

    With (nearly) the same number of extras in every step the slope cannot be told from the intercept; the
    plan's ratio of the two is kept then, and both scale with what the steps really take.
    """

    prior: Costs
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, Σw·e, Σw·e², Σw·t, Σw·e·t
    per_epoch: float | None = None

    def observe_step(self, seconds: float, extras: int) -> None:
        decay = 0.5 ** (1.0 / HALF_LIFE_STEPS)
        e = float(extras)
        self.sums = [s * decay + v for s, v in zip(self.sums, (1.0, e, e * e, seconds, e * seconds))]

    def observe_epoch(self, outside_steps_seconds: float) -> None:
        self.per_epoch = max(0.0, outside_steps_seconds)

    def costs(self) -> Costs:
        w, we, wee, wt, wet = self.sums
        per_epoch = self.prior.per_epoch if self.per_epoch is None else self.per_epoch
        if w <= 0:
            return Costs(self.prior.step, self.prior.per_extra, per_epoch)
        mean_e, mean_t = we / w, wt / w
        var_e = wee / w - mean_e**2
        if var_e > 1e-2 * max(mean_e, 1.0) ** 2:
            slope = max(0.0, (wet / w - mean_e * mean_t) / var_e)
            step = max(0.0, mean_t - slope * mean_e)
        else:
            ratio = self.prior.per_extra / self.prior.step if self.prior.step > 0 else 0.0
            step = mean_t / (1.0 + ratio * mean_e)
            slope = ratio * step
        return Costs(step, slope, per_epoch)


@dataclass(frozen=True)
class Decision:
    fraction: float
    predicted_total_seconds: float  # spent so far + the predicted rest at this fraction
    allowed_seconds: float
    feasible: bool


def choose(goal: Goal, costs: Costs, *, spent: float, baseline_spent: float, steps_left: int, epochs_left: int,
           extras_per_step_at_1: float, previous: float | None, max_rise: float = MAX_RISE) -> Decision:
    """The fraction for the rest of the run (see the module docstring). ``baseline_spent``: what the steps and
    epochs run so far would have cost without extras; ``steps_left`` / ``epochs_left``: the steps and the
    end-of-epoch work still to come; ``extras_per_step_at_1``: extras a step gets at r = 1 (the batch size)."""

    def rest(r: float) -> float:
        return costs.rest(steps_left, epochs_left, r * extras_per_step_at_1)

    allowed = goal.allowed_seconds(baseline_spent + rest(0.0))
    ok = fitting_fractions(goal.lo, goal.hi, lambda r: spent + rest(r), allowed)
    if previous == 0.0 and ok and ok[-1] < min(goal.lo + DEADBAND, goal.hi) - 1e-9:
        # Back from r = 0 into the range only with a deadband's room to spare: a budget that barely fits the range's
        # bottom would otherwise flip r between 0 and the bottom at every check as the timings wobble.
        ok = []
    if previous is not None:  # rise slowly; from r = 0 (below the range) straight back to its bottom
        ok = [r for r in ok if r <= max(previous + max_rise, goal.lo) + 1e-9]
    target = ok[-1] if ok else 0.0
    if previous is not None and previous in ok and abs(target - previous) < DEADBAND:
        target = previous
    return Decision(target, spent + rest(target), allowed, fits(spent + rest(target), allowed))


# ---------------------------------------------------------------- the training-loop side


@dataclass
class BudgetState:
    """What a checkpoint keeps of the controller, so that a resumed run goes on steering the same budget.
    ``segments``: ``[epoch, step, r]`` for every choice that set r (one at each epoch's start, more within)."""

    spent: float = 0.0
    baseline_spent: float = 0.0
    segments: list[list] = field(default_factory=list)
    predictions: list[float] = field(default_factory=list)

    def fractions(self, steps_per_epoch: int) -> list[float]:
        """Each epoch's r, averaged over its steps."""
        out: dict[int, float] = {}
        for (epoch, step, r), nxt in zip(self.segments, self.segments[1:] + [None]):
            end = nxt[1] if nxt is not None and nxt[0] == epoch else steps_per_epoch
            out[epoch] = out.get(epoch, 0.0) + r * (end - step) / steps_per_epoch
        return [round(out[e], 4) for e in sorted(out)]


class BudgetHook:
    """Steers a :class:`~edgedistill.distill.objectives.DistillObjective`'s HE-DA fraction from the training loop.

    The loop calls it around epochs, steps and checkpoints (``train.LoopHook``); ``clock`` (default
    ``time.perf_counter``) is its only source of time, so tests can simulate one. Time counts from the hook's
    creation (the distill stage creates it just before training) and, after a resume, goes on from the checkpoint.
    ``goal`` None keeps ``first_fraction`` (a fraction fixed by the recipe) and only measures. ``agree`` turns
    this process's choice into the one every rank uses (under DDP: rank 0's).
    """

    def __init__(self, objective, goal: Goal | None, prior: Costs, *, epochs: int, steps_per_epoch: int, batch_size: int,
                 first_fraction: float, clock: Callable[[], float] = time.perf_counter,
                 agree: Callable[[float], float] = lambda r: r):
        self.objective, self.goal, self.clock, self.agree = objective, goal, clock, agree
        self.epochs, self.steps_per_epoch, self.batch_size = epochs, steps_per_epoch, batch_size
        self.first_fraction = first_fraction
        self.check_every = max(1, math.ceil(steps_per_epoch / CHECKS_PER_EPOCH))
        self.estimator = CostEstimator(prior)
        self.state = BudgetState()
        self._mark = clock()
        self._open: tuple[float, float] | None = None  # (spent when the epoch began, its step seconds so far)
        self._step_start = 0.0
        self._at = (0, 0)  # (epoch, step) of the next step

    def _account(self) -> None:
        now = self.clock()
        self.state.spent += now - self._mark
        self._mark = now

    def _close_epoch(self) -> None:
        """Learn the epoch's cost outside its steps (evaluation, metrics, checkpoint) once all of it is spent."""
        self._account()
        if self._open is not None:
            began, steps = self._open
            self.estimator.observe_epoch(self.state.spent - began - steps)
            costs = self.estimator.costs()
            self.state.baseline_spent += self.steps_per_epoch * costs.step + costs.per_epoch
            self._open = None

    def _set(self, r: float) -> None:
        epoch, step = self._at
        self.state.segments.append([epoch, step, r])
        self.objective.set_fraction(r)

    def _choose(self) -> float:
        epoch, step = self._at
        s, costs = self.state, self.estimator.costs()
        d = choose(self.goal, costs, spent=s.spent, baseline_spent=s.baseline_spent + step * costs.step,
                   steps_left=(self.epochs - epoch) * self.steps_per_epoch - step, epochs_left=self.epochs - epoch,
                   extras_per_step_at_1=self.batch_size, previous=s.segments[-1][2])
        s.predictions.append(d.predicted_total_seconds)
        return self.agree(d.fraction)

    def begin_epoch(self, epoch: int, step: int = 0) -> None:
        """``step``: where the epoch starts (a run resumed mid-epoch starts past 0)."""
        self._close_epoch()
        s = self.state
        self._at = (epoch, step)
        if s.segments and s.segments[-1][0] == epoch:  # resumed mid-epoch: go on at the r it had
            self.objective.set_fraction(s.segments[-1][2])
        else:
            self._set(self.first_fraction if not s.segments or self.goal is None else self._choose())
        self._open = (s.spent, 0.0)

    def begin_step(self) -> None:
        epoch, step = self._at
        if self.goal is not None and step > 0 and step % self.check_every == 0:
            self._account()
            r = self._choose()
            if r != self.state.segments[-1][2]:
                self._set(r)
        self._step_start = self.clock()

    def end_step(self) -> None:
        seconds = self.clock() - self._step_start
        began, steps = self._open
        self._open = (began, steps + seconds)
        if self._at[0] > 0 or self._at[1] >= UNOBSERVED_STEPS:
            self.estimator.observe_step(seconds, self.objective.last_extras)
        self._at = (self._at[0], self._at[1] + 1)

    def end_epoch(self, epoch: int) -> dict:
        self._account()
        return {"fraction": self.state.fractions(self.steps_per_epoch)[epoch], "budget_spent_seconds": self.state.spent}

    def before_checkpoint(self) -> None:
        self._account()

    def end_run(self) -> None:
        self._close_epoch()

    def state_dict(self) -> dict:
        est = self.estimator
        return {**asdict(self.state), "estimator": {"sums": list(est.sums), "per_epoch": est.per_epoch}}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint of a run that had no budget to steer (--force onto fraction: auto)
            return
        self.state = BudgetState(state["spent"], state["baseline_spent"], [list(x) for x in state["segments"]], list(state["predictions"]))
        self.estimator.sums, self.estimator.per_epoch = list(state["estimator"]["sums"]), state["estimator"]["per_epoch"]
        self._mark = self.clock()

    def verdict(self) -> dict:
        """What happened, for budget.json: allowance, spent time, each epoch's r, and held / overran and why."""
        s, costs = self.state, self.estimator.costs()
        common = {"spent_seconds": s.spent, "fractions": s.fractions(self.steps_per_epoch), "segments": s.segments,
                  "measured_costs": asdict(costs)}
        if self.goal is None:
            return {**common, "allowed_seconds": None, "overrun": None, "held": None, "predicted_total_seconds": [],
                    "verdict": f"no budget: r fixed by the recipe at {self.first_fraction:g}"}
        allowed = self.goal.allowed_seconds(s.baseline_spent)
        over = s.spent / allowed - 1.0
        if over <= HELD_TOLERANCE:
            words = f"held: spent {s.spent:.0f} s of {allowed:.0f} s ({100 * over:+.1f}%)"
        else:
            zero = costs.run(self.epochs, self.steps_per_epoch, 0.0)
            why = (f"even r = 0 needs {zero / 60:.1f} min at the measured speed" if zero > allowed * (1 + HELD_TOLERANCE)
                   else "steps became slower than measured when r was chosen, too late to make up for it")
            words = f"overran by {100 * over:.1f}%: {why}"
        return {**common, "allowed_seconds": allowed, "overrun": over, "held": over <= HELD_TOLERANCE,
                "predicted_total_seconds": s.predictions, "verdict": words}
