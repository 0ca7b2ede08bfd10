"""Cost model of HE-DA and the choice of r under a budget (pure Python)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest

from edgedistill.budget.cost import GRID_STEP, Choice, CostModel, choose_fraction, curve, fraction_grid, from_step_timings

EPOCHS = 40


def model(**kw) -> CostModel:
    base = dict(
        n_train=50_000,
        batch_size=128,
        student_step_per_sample=1.0e-3,
        teacher_per_sample=4.0e-4,
        augment_per_sample=1.0e-4,
        fixed_per_step=0.02,
        eval_seconds=3.0,
    )
    base.update(kw)
    return CostModel(**base)


def test_no_torch_at_import():
    code = "import sys, edgedistill.budget.cost; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_epoch_seconds_by_hand():
    c = model()
    steps = math.ceil(50_000 / 128)  # 391
    plain = steps * 0.02 + 50_000 * (1.0e-3 + 4.0e-4) + 3.0
    assert c.steps_per_epoch == steps
    assert c.epoch_seconds(0) == pytest.approx(plain)
    extra = 0.3 * 50_000 * (1.0e-3 + 4.0e-4 + 1.0e-4)
    assert c.epoch_seconds(0.3) == pytest.approx(plain + extra)
    assert c.overhead(0) == 0
    assert c.overhead(0.3) == pytest.approx(extra / plain)
    assert c.total_minutes(0.3, EPOCHS) == pytest.approx(EPOCHS * (plain + extra) / 60)
    assert c.extra_samples(0.3) == pytest.approx(15_000)
    assert c.extra_samples(1.0) == 50_000  # selection 'all'


def test_world_size_halves_per_rank_time():
    one, two = model(eval_seconds=0.0), model(eval_seconds=0.0, world_size=2)
    for r in (0.0, 0.1, 0.37, 0.5, 1.0):
        assert two.epoch_seconds(r) == pytest.approx(one.epoch_seconds(r) / 2, rel=1e-3)  # 391 vs 196 steps
    exact1, exact2 = model(n_train=51_200, eval_seconds=0.0), model(n_train=51_200, eval_seconds=0.0, world_size=2)
    for r in (0.0, 0.25, 0.5):
        assert exact2.epoch_seconds(r) == pytest.approx(exact1.epoch_seconds(r) / 2, rel=1e-12)
        assert exact2.overhead(r) == pytest.approx(exact1.overhead(r), rel=1e-12)
    assert exact2.steps_per_epoch == 200 and exact1.steps_per_epoch == 400


def _check_choice(c: CostModel, ch: Choice, *, predict, budget, lo, hi, step=GRID_STEP):
    grid = fraction_grid(lo, hi)
    if ch.fraction is None:
        assert predict(lo) > budget
        return
    r = ch.fraction
    assert lo <= r <= hi and r in grid
    assert predict(r) <= budget * (1 + 1e-9)
    if r != hi:
        assert predict(min(r + step, hi)) > budget  # the next grid point does not fit
    assert ch.predicted_overhead == pytest.approx(c.overhead(r))
    assert ch.predicted_epoch_seconds == pytest.approx(c.epoch_seconds(r))
    assert ch.predicted_total_minutes == pytest.approx(c.total_minutes(r, EPOCHS))


@pytest.mark.parametrize("lo,hi", [(0.1, 0.5), (0.0, 1.0), (0.2, 0.455), (0.3, 0.3)])
def test_overhead_budget_sweep_monotone_and_exact(lo, hi):
    c = model()
    assert c.overhead(1.0) < 1.2
    prev = -math.inf
    for k in range(0, 601):
        budget = k * 0.002  # 0 … +120 %
        ch = choose_fraction(c, epochs=EPOCHS, max_overhead=budget, lo=lo, hi=hi)
        _check_choice(c, ch, predict=c.overhead, budget=budget, lo=lo, hi=hi)
        now = -math.inf if ch.fraction is None else ch.fraction
        assert now >= prev
        prev = now
    assert prev == hi  # a large enough budget reaches the top of the range


def test_minutes_budget_sweep_monotone_and_exact():
    c = model()
    predict = lambda r: c.total_minutes(r, EPOCHS)  # noqa: E731
    prev = -math.inf
    lo_m, hi_m = predict(0.0), predict(0.6)
    for k in range(301):
        budget = lo_m + (hi_m - lo_m) * k / 300
        ch = choose_fraction(c, epochs=EPOCHS, max_minutes=budget)
        _check_choice(c, ch, predict=predict, budget=budget, lo=0.1, hi=0.5)
        now = -math.inf if ch.fraction is None else ch.fraction
        assert now >= prev
        prev = now
    assert prev == 0.5


def test_budget_exactly_at_a_grid_point():
    c = model()
    for r in (0.1, 0.23, 0.37, 0.5):
        assert choose_fraction(c, epochs=EPOCHS, max_overhead=c.overhead(r)).fraction == r
        assert choose_fraction(c, epochs=EPOCHS, max_minutes=c.total_minutes(r, EPOCHS)).fraction == r
        below = choose_fraction(c, epochs=EPOCHS, max_overhead=c.overhead(r) * (1 - 1e-6)).fraction
        assert below == (None if r == 0.1 else round(r - 0.01, 10))


def test_nothing_fits():
    c = model()
    ch = choose_fraction(c, epochs=EPOCHS, max_overhead=c.overhead(0.1) * 0.5)
    assert ch.fraction is None
    assert "r=0.1" in ch.reason and "no fraction" in ch.reason
    assert ch.predicted_overhead == pytest.approx(c.overhead(0.1))
    ch = choose_fraction(c, epochs=EPOCHS, max_minutes=1.0)
    assert ch.fraction is None and "min" in ch.reason
    assert ch.predicted_total_minutes == pytest.approx(c.total_minutes(0.1, EPOCHS))


def test_reason_names_the_choice():
    c = model()
    ch = choose_fraction(c, epochs=EPOCHS, max_overhead=c.overhead(0.3) + 1e-4)
    assert ch.fraction == 0.3 and "r=0.3" in ch.reason and "r=0.31" in ch.reason
    top = choose_fraction(c, epochs=EPOCHS, max_overhead=10.0)
    assert top.fraction == 0.5 and "top of the range" in top.reason


def test_fraction_grid():
    assert fraction_grid(0.1, 0.5, 0.01)[:3] == [0.1, 0.11, 0.12]
    assert len(fraction_grid(0.1, 0.5, 0.01)) == 41 and fraction_grid(0.1, 0.5, 0.01)[-1] == 0.5
    assert fraction_grid(0.2, 0.45, 0.1) == [0.2, 0.3, 0.4, 0.45]
    assert fraction_grid(0.3, 0.3) == [0.3] and fraction_grid(0.2, 0.235) == [0.2, 0.21, 0.22, 0.23, 0.235]


def test_curve_rows():
    c = model()
    rows = curve(c, EPOCHS)
    assert [row["r"] for row in rows] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]
    for row in rows:
        assert set(row) == {"r", "epoch_seconds", "overhead", "total_minutes"}
        assert row["epoch_seconds"] == pytest.approx(c.epoch_seconds(row["r"]))
        assert row["overhead"] == pytest.approx(c.overhead(row["r"]))
        assert row["total_minutes"] == pytest.approx(c.total_minutes(row["r"], EPOCHS))
    assert [row["r"] for row in curve(c, EPOCHS, rs=(0.25,))] == [0.25]


def test_from_step_timings_reproduces_the_steps():
    true = model(eval_seconds=5.0, world_size=2)
    B, e = true.batch_size, 32
    plain = true.fixed_per_step + B * (true.student_step_per_sample + true.teacher_per_sample)
    extra = plain + e * (true.student_step_per_sample + true.teacher_per_sample + true.augment_per_sample)
    fit = from_step_timings(
        n_train=true.n_train,
        batch_size=B,
        plain_step_seconds=plain,
        extra_step_seconds=extra,
        extras_per_step=e,
        augment_seconds_per_sample=true.augment_per_sample,
        teacher_seconds_per_sample=true.teacher_per_sample,
        eval_seconds=5.0,
        world_size=2,
    )
    for f in ("student_step_per_sample", "teacher_per_sample", "augment_per_sample", "fixed_per_step"):
        assert getattr(fit, f) == pytest.approx(getattr(true, f), rel=1e-9, abs=1e-15), f
    assert (fit.n_train, fit.batch_size, fit.world_size, fit.eval_seconds) == (50_000, B, 2, 5.0)
    for r in (0.0, 0.2, 0.5, 1.0):
        assert fit.epoch_seconds(r) == pytest.approx(true.epoch_seconds(r), rel=1e-9)


def test_from_step_timings_clamps_noise_with_a_warning():
    with pytest.warns(UserWarning, match="student step cost clamped"):
        c = from_step_timings(1000, 10, 0.1, 0.1001, 10, 1e-4, 1e-4)
    assert c.student_step_per_sample == 0.0
    assert c.epoch_seconds(0) == pytest.approx(100 * 0.1)  # the plain step still holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_step_timings(1000, 10, 0.1, 0.12, 10, 1e-4, 1e-4)


def test_from_step_timings_keeps_both_steps_when_extras_cost_more_per_sample():
    """A doubled batch costing more than twice the plain one (CPU caches) gives a negative per-step intercept,
    not a clamp: the plain epoch and the all-extras epoch both stay as measured."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = from_step_timings(1000, 10, plain_step_seconds=0.8, extra_step_seconds=2.0, extras_per_step=10,
                              augment_seconds_per_sample=1e-3, teacher_seconds_per_sample=0.02)
    assert c.fixed_per_step == pytest.approx(0.8 - 10 * (0.12 - 1e-3))
    assert c.fixed_per_step < 0
    assert c.epoch_seconds(0) == pytest.approx(100 * 0.8)
    assert c.epoch_seconds(1) == pytest.approx(100 * 2.0)
    assert c.overhead(0.5) == pytest.approx(0.75)


def test_the_qat_stages_predicted_minutes_come_out_of_max_minutes():
    from edgedistill.pipeline.stages import distill_minutes

    assert distill_minutes(10.0, {"predicted_minutes": 2.5}) == 7.5
    assert distill_minutes(10.0, None) == 10.0  # post-training int8: nothing reserved
    assert distill_minutes(None, {"predicted_minutes": 2.5}) is None  # no minutes budget: nothing to take from
