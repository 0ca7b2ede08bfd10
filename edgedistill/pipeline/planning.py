"""Time real distillation steps on this device and turn them into a cost model.

The pure cost model and the choice of ``r`` live in :mod:`edgedistill.budget.cost`; this module only measures.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time

import numpy as np
import torch

from edgedistill.budget.cost import CostModel, from_step_timings
from edgedistill.pipeline.context import RunContext
from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader, to_float
from edgedistill.distill.objectives import Augmenter, CrossEntropyObjective
from edgedistill.base.devices import Precision, preset, synchronizer
from edgedistill.base.timing import interleaved
from edgedistill.distill.train import build_optimizer, evaluate

UNTIMED_BATCHES = 2  # the first batches of every timed function: allocation, kernel selection
# On the CPU, compilation (about a minute for a mobile student) is only tried for runs at least this long: its
# measurement then costs the plan a few per cent of the run, and compiling rarely gains more than that here.
COMPILE_WORTH_TRYING_SECONDS = 60 * 60


def compile_pays(step_seconds: float, compiled_step_seconds: float, compile_seconds: float, total_steps: int) -> bool:
    """Whether compiling repays itself over the run, with a margin of 2: evaluation and the shorter last batch of
    an epoch compile their own graphs, which the measured compilation (training steps) does not include."""
    return (step_seconds - compiled_step_seconds) * total_steps > 2 * compile_seconds


class StepBench:
    """Real distillation steps on a few fixed batches of the training data, for timing."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.device = ctx, ctx.device
        self.precision = Precision.for_device(ctx.device, ctx.recipe.distill.amp)
        train = ctx.train_set()
        sampler = EpochSampler(len(train), seed=ctx.recipe.seed, shuffle=True, rank=ctx.dist.rank, world=ctx.dist.world)
        loader = make_loader(train, ctx.recipe.data.batch_size, sampler, num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda")
        n_batches = UNTIMED_BATCHES + ctx.recipe.augment.profile_steps
        t0 = time.perf_counter()
        self.batches = list(itertools.islice(itertools.cycle(loader) if len(loader) < n_batches else loader, n_batches))
        self.load_per_step = (time.perf_counter() - t0) / len(self.batches)
        self.batch_size = len(self.batches[0][1])
        self.steps_per_epoch = math.ceil(len(sampler.indices()) / ctx.recipe.data.batch_size)

    def student(self, channels_last: bool, compiled: bool = False) -> torch.nn.Module:
        net = self.ctx.build_student().to(self.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compiled:
            net.compile()
        return net.train()

    def stepper(self, student, objective, channels_last: bool, precision: Precision | None = None):
        """One optimisation step of ``student`` on a batch, in distillation's precision unless ``precision`` is given."""
        optimizer = build_optimizer(student, self.ctx.recipe.distill.optimizer)
        precision = precision or self.precision

        def step(images, labels, indices):
            x = to_float(images, self.device, channels_last)
            with precision.autocast():
                losses, _ = objective(student, x, labels.to(self.device), indices, 0.0)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

        return step

    def timed(self, *fns, passes: int = 1) -> list[float]:
        """Median seconds per step of each function, interleaved (:func:`~edgedistill.base.timing.interleaved`):
        one round per profile batch (``passes`` times over them), every function on that round's batch.

        Taking turns exposes every function to the same background load, and the median drops the odd step
        that a noisy (shared) machine stalls: the differences between the functions are what the plan rests on.
        """
        def fed(fn):
            batches = itertools.chain(self.batches[:UNTIMED_BATCHES], itertools.cycle(self.batches[UNTIMED_BATCHES:]))
            return lambda: fn(*next(batches))

        samples = interleaved({i: fed(fn) for i, fn in enumerate(fns)}, rounds=passes * (len(self.batches) - UNTIMED_BATCHES),
                              warmup=UNTIMED_BATCHES, sync=synchronizer(self.device))
        return [statistics.median(samples[i]) for i in range(len(fns))]


LAYOUT_ROUNDS = 3  # the layout is decided on the student's own steps, over this many passes of the profile batches


def decide_layout(ctx: RunContext, bench: StepBench) -> dict:
    """``distill.channels_last``: as the recipe fixes it; ``auto``: on for CUDA, and on the CPU the faster layout of
    the student's own steps (cross-entropy, no teacher: the layout changes only the student, and without the
    teacher's time in every sample the difference stands out of the noise), the same batches, in turns."""
    fixed = preset(ctx.recipe.distill.channels_last, ctx.device)
    if fixed is not None:
        return fixed
    steps = [bench.stepper(bench.student(layout), CrossEntropyObjective(), layout) for layout in (False, True)]
    nchw, cl = bench.timed(*steps, passes=LAYOUT_ROUNDS)
    return {"use": cl < nchw, "ms_per_step": {"nchw": 1e3 * nchw, "channels_last": 1e3 * cl},
            "why": f"{'faster' if cl < nchw else 'slower'} for this student ({1e3 * cl:.0f} vs {1e3 * nchw:.0f} ms a step)"}


def decide_compile(ctx: RunContext, bench: StepBench, channels_last: bool, planned_seconds: float | None) -> dict:
    """``distill.compile``: as the recipe fixes it; ``auto``: on for CUDA; on the CPU, when the planned run
    (``planned_seconds``, None before it is known) is long enough to try, compiled against eager steps, and on
    when the gain over the run repays the measured compilation."""
    fixed = preset(ctx.recipe.distill.compile, ctx.device)
    if fixed is not None:
        return fixed
    if planned_seconds is None or planned_seconds < COMPILE_WORTH_TRYING_SECONDS:
        return {"use": False, "why": f"the run is too short to repay compilation (~{(planned_seconds or 0) / 60:.0f} min planned)"}
    plain, total_steps = ctx.timing_objective(None), bench.steps_per_epoch * ctx.recipe.distill.epochs
    eager = bench.stepper(bench.student(channels_last), plain, channels_last)
    compiled = bench.stepper(bench.student(channels_last, compiled=True), plain, channels_last)
    t0 = time.perf_counter()
    compiled(*bench.batches[0])
    compile_seconds = time.perf_counter() - t0
    eager_s, compiled_s = bench.timed(eager, compiled)
    use = compile_pays(eager_s, compiled_s, compile_seconds, total_steps)
    return {"use": use, "ms_per_step": {"eager": 1e3 * eager_s, "compiled": 1e3 * compiled_s}, "compile_seconds": compile_seconds,
            "why": "repays its compilation" if use else "does not repay its compilation"}


def measure_plan(ctx: RunContext) -> tuple[dict, CostModel, dict | None]:
    """The plan's measurements: how the student runs fastest, then what steps cost so, then what the qat stage will
    cost (:func:`measure_qat`). Compilation measured on the CPU needs the run's length, so the cost is measured first
    and again if compiling is chosen."""
    bench = StepBench(ctx)
    speed = {"channels_last": decide_layout(ctx, bench)}
    layout = speed["channels_last"]["use"]
    if preset(ctx.recipe.distill.compile, ctx.device) is None:
        cost = measure_cost(ctx, {**speed, "compile": {"use": False}}, bench)
        speed["compile"] = decide_compile(ctx, bench, layout, 60 * cost.total_minutes(0.0, ctx.recipe.distill.epochs))
        cost = measure_cost(ctx, speed, bench) if speed["compile"]["use"] else cost
    else:
        speed["compile"] = decide_compile(ctx, bench, layout, None)
        cost = measure_cost(ctx, speed, bench)
    return speed, cost, measure_qat(ctx, cost, bench)


def measure_qat(ctx: RunContext, cost: CostModel, bench: StepBench) -> dict | None:
    """With ``export.int8.method: qat`` or ``auto``, what the qat stage's epochs will cost: a step of the fake-quantised
    student (in float32, as the stage runs it) timed in turns with a distillation step (the ratio), applied to the
    predicted epoch at the highest HE-DA fraction the run may use. ``auto`` is charged too: the budget must hold when
    it does train. None with ``ptq``."""
    int8, a = ctx.recipe.export.int8, ctx.recipe.augment
    if int8.method == "ptq":
        return None
    plain = ctx.timing_objective(None)
    fake = ctx.fake_quant_student(ctx.build_student())[0].to(ctx.device)
    float_step, fake_step = bench.timed(bench.stepper(bench.student(False), plain, False),
                                        bench.stepper(fake.train(), plain, False, Precision.for_device(ctx.device, False)))
    r = 1.0 if a.selection == "all" else a.budget.range[1] if a.fraction == "auto" else float(a.fraction)
    ratio = fake_step / float_step
    return {"epochs": int8.qat.epochs, "step_ratio": ratio, "fraction": r,
            "predicted_minutes": int8.qat.epochs * cost.epoch_seconds(r) * ratio / 60.0}


def measure_cost(ctx: RunContext, speed: dict | None = None, bench: StepBench | None = None) -> CostModel:
    """Time ``augment.profile_steps`` real steps without and with one extra mixed sample per sample, in turns, with
    the student as distillation will run it (``speed``: the layout and compilation :func:`measure_plan` decided; default: eager, NCHW).

    Nothing needs to be trained or scored first: a step costs the same with untrained weights and any energies.
    """
    bench = bench or StepBench(ctx)
    channels_last = bool(speed and speed["channels_last"]["use"])
    student = bench.student(channels_last, compiled=bool(speed and speed["compile"]["use"]))
    # plain: no extras whatever the selection mode ('all' ignores the fraction); extra: as many extras as the run will
    # mix at the top of what it may choose (a step's cost is not linear in its batch on a CPU: timing the extras at
    # another r, e.g. one per sample, misjudges what one costs at the r the run uses)
    a = ctx.recipe.augment
    plain = ctx.timing_objective(None)
    extra = ctx.timing_objective(Augmenter(a.method, a.alpha, *_timed_selection(ctx)))
    extra.augmenter.seed(ctx.recipe.seed)
    extras: list[int] = []
    extra_step = bench.stepper(student, extra, channels_last)

    def counted(*batch):
        extra_step(*batch)
        extras.append(extra.last_extras)

    plain_step, extra_step_seconds = (s + bench.load_per_step for s in bench.timed(bench.stepper(student, plain, channels_last), counted))
    # the no-teacher baseline never runs the teacher, so its steps must not be charged for one
    teacher = plain.teacher if plain.uses_teacher else (lambda x: x)
    device = ctx.device
    with torch.no_grad():
        teacher_step, augment_step = bench.timed(
            lambda images, *_: teacher(to_float(images, device, channels_last)),
            # quantile 1: every sample selected, whatever the mode, so the time is per mixed sample
            lambda images, *_: extra.augmenter(to_float(images, device, channels_last), torch.ones(len(images))),
        )
    eval_seconds = _eval_seconds(ctx, student, bench.precision)
    return from_step_timings(
        n_train=len(ctx.data.train), batch_size=bench.batch_size, plain_step_seconds=plain_step, extra_step_seconds=extra_step_seconds,
        extras_per_step=max(1, round(statistics.median(extras))), augment_seconds_per_sample=augment_step / bench.batch_size,
        teacher_seconds_per_sample=teacher_step / bench.batch_size, eval_seconds=eval_seconds, world_size=ctx.dist.world,
    )


def _timed_selection(ctx: RunContext) -> tuple[str, float]:
    """(selection, r) of the timed extra steps: the top of the budget range for ``auto``, the recipe's r when it is
    fixed, one extra per sample for ``all`` (and for r = 0, which mixes nothing but is priced all the same)."""
    a = ctx.recipe.augment
    if a.fraction == "auto":
        return "high", a.budget.range[1]
    return ("high", float(a.fraction)) if a.selection != "all" and a.fraction > 0 else ("all", 1.0)


def _eval_seconds(ctx: RunContext, student, precision) -> float:
    """Time the test evaluation on a slice and scale it to the full test set."""
    test = ctx.data.test
    n = min(len(test), 2 * ctx.recipe.data.eval_batch_size)
    head = ImageDataset(test.subset(np.arange(n)), ctx.image_size, train=False)
    t = time.perf_counter()
    evaluate(student, head, ctx.recipe.data.eval_batch_size, ctx.device, precision=precision)
    return (time.perf_counter() - t) * len(test) / max(n, 1) / ctx.dist.world
