"""The cost of HE-DA and the choice of its fraction ``r`` under a compute budget. Pure Python, no torch.

HE-DA (Energy KD paper, Knowledge-Based Systems 296 (2024) 111911) adds one extra mixed sample per selected
sample, so an epoch processes ``(1 + r)·N`` samples instead of N; the paper's best accuracy is at r = 0.4–0.5,
and the cost grows linearly with r. This module predicts that cost from *measured* components and picks the
largest r in a range whose prediction fits the user's budget.

The model (per rank; with ``world_size`` ranks each processes ``n_train / world_size`` samples an epoch and
the global batch is ``batch_size · world_size``)::

    steps            = ceil(n_train / (batch_size · world_size))
    epoch_seconds(r) = steps · fixed_per_step
                     + (n_train / world_size) · (student_step_per_sample + teacher_per_sample)
                     + (r · n_train / world_size) · (student_step_per_sample + teacher_per_sample + augment_per_sample)
                     + eval_seconds

An ordinary sample costs the teacher's forward pass and the student's step; an extra mixed sample costs the
same plus building it. Selecting r·N samples is true for every selection mode (``high``, ``low``, ``mixed`` =
r/2 + r/2); ordinary full-data augmentation (``all``) is r = 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

DEFAULT_CURVE_RS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)
GRID_STEP = 0.01  # the fractions the plan and the controller choose from: lo, lo + 0.01, …, hi
_REL_TOL = 1e-9  # a prediction fits its allowance up to rounding: prediction <= allowed · (1 + _REL_TOL)


def fits(prediction: float, allowed: float) -> bool:
    """Whether a predicted cost is within what the budget allows (the one tolerance of the package)."""
    return prediction <= allowed * (1.0 + _REL_TOL) + 1e-12


def fraction_grid(lo: float, hi: float, step: float = GRID_STEP) -> list[float]:
    """``lo, lo + step, …`` up to ``hi`` (inclusive, and ``hi`` itself always last), rounded to 1e-10."""
    n = math.floor((hi - lo) / step + 1e-9)
    grid = [round(lo + k * step, 10) for k in range(n + 1)]
    return [r for r in grid if r < hi - 1e-12] + [hi]


def fitting_fractions(lo: float, hi: float, predict: Callable[[float], float], allowed: float) -> list[float]:
    """Every fraction of :func:`fraction_grid` whose ``predict(r)`` fits ``allowed``, in rising order: the one
    search of the package (the plan takes the last; the controller filters them further first)."""
    return [r for r in fraction_grid(lo, hi) if fits(predict(r), allowed)]


@dataclass(frozen=True)
class Costs:
    """The cost model as the controller steers by it: seconds of a step without extras, seconds one extra mixed
    sample adds to its step, and seconds an epoch spends outside its steps (evaluation, checkpoint)."""

    step: float
    per_extra: float
    per_epoch: float

    def run(self, epochs: int, steps_per_epoch: int, extras_per_step: float) -> float:
        return self.rest(epochs * steps_per_epoch, epochs, extras_per_step)

    def rest(self, steps: int, epochs: int, extras_per_step: float) -> float:
        """``steps`` steps and the end-of-epoch work of ``epochs`` epochs."""
        return steps * (self.step + self.per_extra * extras_per_step) + epochs * self.per_epoch


@dataclass(frozen=True)
class CostModel:
    """Measured cost components, in seconds (per rank). The recipe and the plan's measurement guarantee
    positive sizes and finite, non-negative costs (the intercept alone may be negative)."""

    n_train: int
    batch_size: int
    student_step_per_sample: float  # student forward + backward + its share of the optimizer step
    teacher_per_sample: float  # teacher forward
    augment_per_sample: float  # building one mixed sample
    # The per-step intercept: data loading and other per-step overhead. It is negative when a bigger batch costs
    # more per sample than a smaller one (on CPUs it can), which is what keeps both measured steps exact.
    fixed_per_step: float
    eval_seconds: float = 0.0  # test evaluation per epoch, as measured for this layout (not divided by world_size)
    world_size: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / (self.batch_size * self.world_size))

    def extra_samples(self, r: float) -> float:
        """HE-DA extra (mixed) samples per epoch over all ranks: ``r · n_train`` (r = 1 for selection ``all``)."""
        return r * self.n_train

    def costs(self) -> Costs:
        """The same model per step: what the controller starts from before it has timed a step of its own.
        (Exact for one rank; under DDP each rank's step is the same batch, so the per-step form holds too.)"""
        per_sample = self.student_step_per_sample + self.teacher_per_sample
        return Costs(step=self.fixed_per_step + self.batch_size * per_sample,
                     per_extra=per_sample + self.augment_per_sample, per_epoch=self.eval_seconds)

    def epoch_seconds(self, r: float) -> float:
        """Predicted wall time of one epoch (per rank) with fraction ``r``."""
        per_rank = self.n_train / self.world_size
        plain = self.student_step_per_sample + self.teacher_per_sample
        extra = plain + self.augment_per_sample
        return (
            self.steps_per_epoch * self.fixed_per_step
            + per_rank * plain
            + self.extra_samples(r) / self.world_size * extra
            + self.eval_seconds
        )

    def overhead(self, r: float) -> float:
        """Extra time relative to no augmentation: ``epoch_seconds(r) / epoch_seconds(0) − 1``."""
        return self.epoch_seconds(r) / self.epoch_seconds(0.0) - 1.0

    def total_minutes(self, r: float, epochs: int) -> float:
        """Predicted training time in minutes for ``epochs`` epochs."""
        return epochs * self.epoch_seconds(r) / 60.0


@dataclass(frozen=True)
class Choice:
    """The fraction chosen under a budget.

    ``fraction`` is None when even the bottom of the range does not fit; the ``predicted_*`` values are then
    those of the bottom of the range (what the cheapest allowed setting would cost).
    """

    fraction: float | None
    reason: str
    predicted_epoch_seconds: float
    predicted_overhead: float
    predicted_total_minutes: float


def choose_fraction(cost: CostModel, *, epochs: int, max_overhead: float | None = None, max_minutes: float | None = None,
                    lo: float = 0.1, hi: float = 0.5) -> Choice:
    """The largest r of :func:`fraction_grid` ``(lo, hi)`` whose prediction fits the budget: ``max_overhead``
    (extra time relative to no augmentation, e.g. 0.15 = +15 %) or else ``max_minutes`` (total training time;
    the recipe gives exactly one). A larger budget only adds fractions to those that fit, so the chosen r never
    decreases when the budget grows."""
    if max_overhead is not None:
        budget, kind, predict = max_overhead, "overhead", cost.overhead
    else:
        budget, kind = max_minutes, "minutes"
        predict = lambda r: cost.total_minutes(r, epochs)  # noqa: E731
    fitting = fitting_fractions(lo, hi, predict, budget)
    chosen = fitting[-1] if fitting else None
    at = lo if chosen is None else chosen
    shown = _fmt(kind)
    if chosen is None:
        reason = (
            f"no fraction in [{lo:g}, {hi:g}] fits: even r={lo:g} is predicted at {shown(predict(lo))} "
            f"> max_{kind} {shown(budget)}"
        )
    else:
        nxt = next((r for r in fraction_grid(lo, hi) if r > chosen), None)
        why = "the top of the range" if nxt is None else f"r={nxt:g} would need {shown(predict(nxt))}"
        reason = (
            f"r={chosen:g}: the largest fraction in [{lo:g}, {hi:g}] (step {GRID_STEP:g}) predicted within "
            f"max_{kind} {shown(budget)} ({shown(predict(chosen))}; {why})"
        )
    return Choice(
        fraction=chosen,
        reason=reason,
        predicted_epoch_seconds=cost.epoch_seconds(at),
        predicted_overhead=cost.overhead(at),
        predicted_total_minutes=cost.total_minutes(at, epochs),
    )


def curve(cost: CostModel, epochs: int, rs=DEFAULT_CURVE_RS) -> list[dict]:
    """Predicted cost at a few fractions, for reports: rows of r, epoch_seconds, overhead, total_minutes."""
    return [
        {
            "r": float(r),
            "epoch_seconds": cost.epoch_seconds(r),
            "overhead": cost.overhead(r),
            "total_minutes": cost.total_minutes(r, epochs),
        }
        for r in rs
    ]


def from_step_timings(
    n_train: int,
    batch_size: int,
    plain_step_seconds: float,
    extra_step_seconds: float,
    extras_per_step: int,
    augment_seconds_per_sample: float,
    teacher_seconds_per_sample: float,
    eval_seconds: float = 0.0,
    world_size: int = 1,
) -> CostModel:
    """A :class:`CostModel` from two kinds of timed training step (per rank, seconds per step).

    * ``plain_step_seconds`` — an ordinary distillation step on ``batch_size`` samples (teacher forward,
      student forward/backward, optimizer step, data loading), no extra samples: ``P = fixed + B·(s + t)``;
    * ``extra_step_seconds`` — the same step with ``extras_per_step`` extra mixed samples (teacher and student
      run on them too): ``X = P + e·(s + t + a)``;
    * ``teacher_seconds_per_sample`` (t) and ``augment_seconds_per_sample`` (a) are timed on their own.

    The marginal cost of an extra sample is measured by difference, ``m = (X − P) / e``; the student's share
    is what the teacher and the augmentation leave of it, ``s = m − t − a``; the per-step intercept is what
    the samples leave of the plain step, ``fixed = P − B·(s + t)``. The model then reproduces both measured
    steps exactly, and is their straight line in between. ``fixed`` is negative when the bigger step costs
    more per sample than the plain one (CPU caches); clamping it would inflate the plain epoch and so shrink
    every predicted overhead. Timing noise can push ``s`` below 0; it is then clamped to 0 with a warning
    (the extra step is then no longer exact; time more steps).
    """
    t, a = float(teacher_seconds_per_sample), float(augment_seconds_per_sample)
    marginal = (extra_step_seconds - plain_step_seconds) / extras_per_step
    student = marginal - t - a
    if student < 0:
        warnings.warn(
            f"timed extra samples cost {marginal:.3g} s each, less than teacher + augmentation "
            f"({t + a:.3g} s); student step cost clamped to 0",
            stacklevel=2,
        )
        student = 0.0
    return CostModel(
        n_train=n_train,
        batch_size=batch_size,
        student_step_per_sample=student,
        teacher_per_sample=t,
        augment_per_sample=a,
        fixed_per_step=plain_step_seconds - batch_size * (student + t),
        eval_seconds=float(eval_seconds),
        world_size=world_size,
    )


def _fmt(kind: str):
    if kind == "overhead":
        return lambda v: f"{100 * v:+.1f}%"
    return lambda v: f"{v:.1f} min"
