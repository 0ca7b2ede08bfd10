"""The budget controller on a simulated clock: no training, no wall-clock time, exact and deterministic."""

from __future__ import annotations

import math
from dataclasses import astuple

import pytest

from edgedistill.budget.controller import MAX_RISE, UNOBSERVED_STEPS, BudgetHook, CostEstimator, Goal, choose
from edgedistill.budget.cost import CostModel, Costs


class Machine:
    """A simulated machine: a step costs ``speed · (a + c · extras)`` seconds, an epoch ``speed · per_epoch`` more
    (evaluation, then the checkpoint); ``speed`` becomes ``slowdown`` once ``slow_from`` of all steps have run.
    ``a`` may be a function of the step's number in the run, for machines whose plain steps vary."""

    def __init__(self, a=0.1, c=0.002, per_epoch=1.0, slowdown=1.0, slow_from=1.0, checkpoint_share=0.2):
        self.a, self.c, self.per_epoch, self.slowdown, self.slow_from = a, c, per_epoch, slowdown, slow_from
        self.checkpoint_share = checkpoint_share
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def plain(self, k: int) -> float:
        return self.a(k) if callable(self.a) else self.a


class Objective:
    def __init__(self):
        self.fraction, self.last_extras = None, 0

    def set_fraction(self, r: float) -> None:
        self.fraction = r


def simulate(goal: Goal | None, machine: Machine, *, epochs=10, steps=50, batch=64, first=0.3, prior=None,
             stop_after: int | None = None, hook: BudgetHook | None = None, start_epoch: int = 0):
    """Run the loop's calls on the simulated clock; the number of extras varies from step to step, as HE-DA's does."""
    objective = hook.objective if hook else Objective()
    hook = hook or BudgetHook(objective, goal, prior or Costs(machine.plain(0), machine.c, machine.per_epoch), epochs=epochs,
                              steps_per_epoch=steps, batch_size=batch, first_fraction=first, clock=machine.clock)
    total = epochs * steps
    for epoch in range(start_epoch, epochs):
        hook.begin_epoch(epoch)
        for step in range(steps):
            k = epoch * steps + step
            speed = machine.slowdown if k >= machine.slow_from * total else 1.0
            hook.begin_step()
            objective.last_extras = round(objective.fraction * batch * (1 + 0.4 * math.sin(k)))
            machine.now += speed * (machine.plain(k) + machine.c * objective.last_extras)
            hook.end_step()
        machine.now += (1 - machine.checkpoint_share) * speed * machine.per_epoch  # evaluation
        hook.end_epoch(epoch)
        hook.before_checkpoint()
        machine.now += machine.checkpoint_share * speed * machine.per_epoch  # the checkpoint itself
        if stop_after is not None and epoch + 1 == stop_after:
            return hook
    hook.end_run()
    return hook


def run_seconds(machine: Machine, r: float, epochs=10, steps=50, batch=64) -> float:
    """What a whole run at a fixed r costs on the simulated machine (no slowdown)."""
    return epochs * (steps * (machine.a + machine.c * r * batch) + machine.per_epoch)


@pytest.mark.parametrize("minutes", [1.9, 2.1, 2.3])  # feasible: even at r = 0 the slowed run needs 1.6 min
def test_a_machine_twice_as_slow_from_40_percent_still_ends_within_5_percent_of_the_budget(minutes):
    machine = Machine(slowdown=2.0, slow_from=0.4)
    hook = simulate(Goal(minutes, None, 0.1, 0.5), machine)
    v = hook.verdict()
    assert abs(machine.now - 60 * minutes) <= 0.05 * 60 * minutes, (machine.now, v["fractions"])
    assert v["held"] and v["spent_seconds"] == pytest.approx(machine.now)
    assert v["fractions"][-1] < v["fractions"][3], "r came down after the slowdown"


def test_an_overhead_budget_is_held_against_the_same_run_without_extras():
    machine = Machine()
    hook = simulate(Goal(None, 0.25, 0.1, 0.5), machine, first=0.1)
    assert machine.now == pytest.approx(1.25 * run_seconds(machine, 0.0), rel=0.05)
    assert hook.verdict()["held"]


def test_an_infeasible_budget_drives_r_to_0_and_reports_the_overrun():
    machine = Machine()
    minutes = 0.8 * run_seconds(machine, 0.0) / 60
    v = simulate(Goal(minutes, None, 0.1, 0.5), machine).verdict()
    # r = 0 from the first check on: a quarter into the first epoch, once real steps showed the budget was lost
    assert v["segments"] == [[0, 0, 0.3], [0, 13, 0.0]] + [[e, 0, 0.0] for e in range(1, 10)]
    assert set(v["fractions"][1:]) == {0.0}
    assert not v["held"] and v["overrun"] > 0.2
    assert "overran by" in v["verdict"] and "even r = 0 needs" in v["verdict"]


@pytest.mark.parametrize("minutes, slowdown", [(1.0, 1.0), (1.9, 2.0), (2.4, 0.5), (5.0, 1.0)])
def test_r_stays_in_its_range_or_0_and_rises_slowly(minutes, slowdown):
    v = simulate(Goal(minutes, None, 0.15, 0.45), Machine(slowdown=slowdown, slow_from=0.3), first=0.15).verdict()
    rs = [r for _, _, r in v["segments"]]
    for before, after in zip(rs, rs[1:]):
        assert after == 0.0 or 0.15 <= after <= 0.45
        assert after <= before + MAX_RISE + 1e-9 or before == 0.0  # from 0 (below the range) back to its bottom


def test_the_choice_does_not_oscillate_on_a_steady_machine():
    v = simulate(Goal(2.0, None, 0.1, 0.5), Machine(), first=0.3).verdict()
    changes = sum(a != b for a, b in zip(v["fractions"], v["fractions"][1:]))
    direction = {math.copysign(1, b - a) for a, b in zip(v["fractions"], v["fractions"][1:]) if a != b}
    assert len(direction) <= 1, v["fractions"]  # it moves one way to its level, then stays
    assert changes <= 4


def test_a_resumed_controller_goes_on_exactly_as_an_uninterrupted_one():
    """What a resumed controller cannot count is the checkpoint write it resumed from (its state was taken before)
    and the time away: with checkpoints that take no time, it steers exactly as the uninterrupted run did."""
    goal = Goal(2.0, None, 0.1, 0.5)

    def machine():
        return Machine(slowdown=2.0, slow_from=0.4, checkpoint_share=0.0)

    whole_machine = machine()
    whole = simulate(goal, whole_machine).verdict()
    first = machine()
    saved = simulate(goal, first, stop_after=4).state_dict()
    again = machine()
    again.now = first.now + 1000.0  # the process restarts later: the time away is not the run's
    hook = BudgetHook(Objective(), goal, Costs(0.1, 0.002, 1.0), epochs=10, steps_per_epoch=50, batch_size=64,
                      first_fraction=0.3, clock=again.clock)
    hook.load_state_dict(saved)
    resumed = simulate(goal, again, hook=hook, start_epoch=4).verdict()
    assert resumed["segments"] == whole["segments"] and resumed["fractions"] == whole["fractions"]
    assert resumed["spent_seconds"] == pytest.approx(whole["spent_seconds"])


def test_without_a_goal_the_recipe_fraction_is_kept_and_the_time_measured():
    machine = Machine()
    v = simulate(None, machine, first=0.2).verdict()
    assert v["fractions"] == [0.2] * 10 and v["held"] is None and v["spent_seconds"] == pytest.approx(machine.now)


def test_the_estimator_recovers_the_step_costs_from_varying_extras():
    est = CostEstimator(Costs(1.0, 1.0, 1.0))
    for k in range(200):
        extras = 10 + (k * 7) % 20
        est.observe_step(0.05 + 0.003 * extras, extras)
    costs = est.costs()
    assert costs.step == pytest.approx(0.05, rel=1e-6) and costs.per_extra == pytest.approx(0.003, rel=1e-6)


def test_with_constant_extras_the_estimator_keeps_the_plans_ratio():
    est = CostEstimator(Costs(0.1, 0.002, 1.0))
    for _ in range(100):
        est.observe_step(2 * (0.1 + 0.002 * 20), 20)  # a machine twice as slow as planned
    costs = est.costs()
    assert costs.step == pytest.approx(0.2) and costs.per_extra == pytest.approx(0.004)


def test_choose_takes_the_largest_fitting_fraction_and_falls_to_0():
    costs = Costs(0.1, 0.002, 1.0)
    args = dict(spent=0.0, baseline_spent=0.0, steps_left=500, epochs_left=10, extras_per_step_at_1=64, previous=None)
    d = choose(Goal(None, 0.25, 0.1, 0.5), costs, **args)
    assert d.feasible and d.fraction == pytest.approx(0.23)  # 50·0.002·64·r ≤ 0.25 · 6  →  r ≤ 0.234
    assert choose(Goal(0.5, None, 0.1, 0.5), costs, **args).fraction == 0.0


def test_from_r_0_the_controller_can_come_back_to_the_bottom_of_the_range():
    costs = Costs(0.1, 0.002, 1.0)
    d = choose(Goal(10.0, None, 0.1, 0.5), costs, spent=0.0, baseline_spent=0.0, steps_left=250, epochs_left=5,
               extras_per_step_at_1=64, previous=0.0)
    assert d.fraction == 0.1  # plenty of budget left: back to the range, not stuck at 0 (0 + MAX_RISE is below it)


def test_from_r_0_the_controller_comes_back_only_with_a_deadbands_room_to_spare():
    costs = Costs(0.1, 0.002, 1.0)
    args = dict(spent=0.0, baseline_spent=0.0, steps_left=250, epochs_left=5, extras_per_step_at_1=64)
    at = {r: 250 * (0.1 + 0.002 * 64 * r) + 5 for r in (0.1, 0.11)}
    minutes = (at[0.1] + at[0.11]) / 2 / 60  # the range's bottom fits, a deadband above it does not
    assert choose(Goal(minutes, None, 0.1, 0.5), costs, previous=None, **args).fraction == 0.1
    assert choose(Goal(minutes, None, 0.1, 0.5), costs, previous=0.1, **args).fraction == 0.1
    assert choose(Goal(minutes, None, 0.1, 0.5), costs, previous=0.0, **args).fraction == 0.0


def test_a_budget_at_the_bottom_of_the_range_does_not_flip_r_under_timing_noise():
    """Steps that wobble ±15 % around a budget that just fits r = 0.1: r may drop to 0, but does not bounce back."""
    machine = Machine(a=lambda k: 0.1 * (1 + 0.15 * math.sin(1.7 * (k + 1))))
    minutes = run_seconds(Machine(), 0.1) / 60
    rs = [r for _, _, r in simulate(Goal(minutes, None, 0.1, 0.5), machine, first=0.1).verdict()["segments"]]
    returns = sum(before == 0.0 and after > 0.0 for before, after in zip(rs, rs[1:]))
    assert returns <= 1, rs


def test_the_runs_first_steps_do_not_enter_the_cost_estimate():
    """One-time costs of the first steps (allocations, the teacher runtime's first calls) are not step costs."""
    cold_start = Machine(a=lambda k: 3.0 if k < UNOBSERVED_STEPS else 0.1)
    warm, cold = (simulate(None, m, epochs=1, first=0.3, prior=Costs(0.1, 0.002, 1.0)) for m in (Machine(), cold_start))
    assert astuple(cold.estimator.costs()) == pytest.approx(astuple(warm.estimator.costs()))
    assert cold.verdict()["spent_seconds"] > warm.verdict()["spent_seconds"] + 8  # spent, all the same


def test_the_controller_starts_from_the_plans_cost_model():
    cm = CostModel(n_train=6400, batch_size=64, student_step_per_sample=0.001, teacher_per_sample=0.0005,
                   augment_per_sample=0.0001, fixed_per_step=0.01, eval_seconds=2.0)
    costs = cm.costs()
    assert costs == Costs(0.01 + 64 * 0.0015, 0.0016, 2.0)
    for r in (0.0, 0.3, 1.0):  # the same prediction in both forms: one cost model
        assert costs.run(5, cm.steps_per_epoch, r * cm.batch_size) == pytest.approx(60 * cm.total_minutes(r, 5))
