"""One training loop for every model and method.

The loop knows nothing about distillation: an *objective* turns a batch into a dict of losses
(see :mod:`edgedistill.distill.objectives`), and the loop does the rest: device placement, AMP,
channels_last, DDP, the learning-rate schedule, checkpoints, resume, graceful stop and metrics.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from edgedistill.base import fsio
from edgedistill.base.console import console, progress_bar
from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader, to_float
from edgedistill.base.devices import Precision
from edgedistill.base.distributed import DistInfo, all_sum, broadcast_flag
from edgedistill.base.errors import InputError, Interrupted, TrainingDiverged
from edgedistill.models.checkpoints import load_checkpoint, load_state
from edgedistill.distill.objectives import Objective

# ---------------------------------------------------------------- schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, milestones_steps: list[int], gamma: float) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones_steps)
    return 1.0


def build_optimizer(model: nn.Module, cfg, fused: bool = True) -> torch.optim.Optimizer:
    # No weight decay on BN/bias parameters: the common practice for small mobile networks.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of a loop over ~200 small tensors (2-3 % of a mobile student's step)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


# ---------------------------------------------------------------- graceful stop


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


# ---------------------------------------------------------------- randomness


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The seed of one training step. Every random draw of a step (dropout, HE-DA partners, boxes and λ) comes
    from it, so a step's randomness depends on nothing but where it is: an interrupted run, resumed at any step,
    repeats exactly what the uninterrupted run did. (Data augmentation is seeded per sample, in data.py.)"""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank) % 2**63


# ---------------------------------------------------------------- the loop


class LoopHook:
    """Something that watches the loop and may steer the objective between steps (the budget controller,
    ``controller.BudgetHook``); its state goes into the checkpoint. This one does nothing."""

    def begin_epoch(self, epoch: int, step: int = 0) -> None: ...
    def begin_step(self) -> None: ...
    def end_step(self) -> None: ...
    def end_epoch(self, epoch: int) -> dict:
        return {}  # fields for the epoch's metrics line
    def before_checkpoint(self) -> None: ...
    def end_run(self) -> None: ...
    def state_dict(self) -> dict:
        return {}
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopConfig:
    """What the loop needs beyond the recipe's TrainConfig: where to write and how to feed."""

    checkpoint_dir: Path
    metrics_path: Path
    batch_size: int
    eval_batch_size: int
    seed: int
    num_workers: int = 0
    resume: bool = False
    recipe: dict | None = None
    label: str = "train"  # shown in the progress bar and stored in the metrics
    channels_last: bool = False  # the student's memory layout (decided by the caller: see context.RunContext.loop)
    compile: bool = False  # torch.compile the model in place


@dataclass
class FitResult:
    final_top1: float
    best_top1: float
    epochs: list[dict]


@dataclass
class _Position:
    """Where training stands: the next epoch and step to run, and the best test top-1 so far."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "objective", "hook", "epoch", "step", "best_top1")


class _Checkpoints:
    """``last.pt`` (everything needed to continue) and ``best.pt`` (the weights of the best epoch)."""

    def __init__(self, loop: LoopConfig, parts: dict[str, Any], before_save: Callable[[], None]):
        self.dir, self.recipe, self.parts = loop.checkpoint_dir, loop.recipe, parts  # parts: objects with state_dict()
        self.before_save = before_save
        self.last = self.dir / "last.pt"

    def restore(self) -> _Position:
        ckpt = load_checkpoint(self.last)
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise InputError(f"{self.last}: not a training checkpoint of this tool (missing {', '.join(missing)})")
        load_state(self.parts["model"], ckpt["model"], str(self.last))
        for name, part in self.parts.items():
            if name != "model":
                part.load_state_dict(ckpt[name])
        return _Position(ckpt["epoch"], ckpt["step"], ckpt["best_top1"])

    def save(self, at: _Position, top1: float | None = None) -> None:
        self.before_save()
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state.update(epoch=at.epoch, step=at.step, best_top1=at.best, recipe=self.recipe)
        with fsio.atomic_path(self.last) as tmp:
            torch.save(state, tmp)
        if top1 is not None and top1 >= at.best:
            with fsio.atomic_path(self.dir / "best.pt") as tmp:
                torch.save({"model": state["model"], "epoch": at.epoch, "test_top1": top1, "recipe": self.recipe}, tmp)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fit(
    model: nn.Module,
    objective: Objective,
    train_set: ImageDataset,
    test_set: ImageDataset,
    cfg,
    loop: LoopConfig,
    device: torch.device,
    dist: DistInfo = DistInfo(),
    hook: LoopHook = LoopHook(),
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` with ``objective``; checkpoint every epoch; resume if asked.

    ``objective(model, images, labels, indices, epoch) -> (losses, logits)``: ``losses["loss"]``
    is minimised; the other entries are logged. ``epoch`` is fractional for warm-ups.
    """
    precision = Precision.for_device(device, cfg.amp)
    channels_last = loop.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if loop.compile:
        model.compile()  # in place: the state_dict keeps its keys, so checkpoints do not depend on it
    train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model

    sampler = EpochSampler(len(train_set), seed=loop.seed, shuffle=True, rank=dist.rank, world=dist.world)
    steps_per_epoch = math.ceil(len(sampler.indices()) / loop.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    milestones = [m * steps_per_epoch for m in cfg.schedule.milestones]
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.schedule.name, milestones, cfg.schedule.gamma)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "objective": objective, "hook": hook}
    checkpoints = _Checkpoints(loop, parts, before_save=hook.before_checkpoint)

    at = checkpoints.restore() if loop.resume and checkpoints.last.exists() else _Position()
    if dist.is_main:
        if at.epoch or at.step:
            where = f"epoch {at.epoch + 1}, step {at.step}" if at.step else f"epoch {at.epoch + 1}"
            console.print(f"[cyan]{loop.label}: resuming at {where} of {cfg.epochs}[/]")
        _trim_metrics(loop.metrics_path, at.epoch)  # a fresh run starts a fresh log; a resumed one drops redone epochs

    history = []
    with graceful_stop() as stop, progress_bar(enabled=dist.is_main) as progress:
        for epoch in range(at.epoch, cfg.epochs):
            skip = at.step if epoch == at.epoch else 0
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch, start=skip * loop.batch_size)
            loader = make_loader(train_set, loop.batch_size, sampler, num_workers=loop.num_workers, pin_memory=device.type == "cuda")
            train_model.train()
            hook.begin_epoch(epoch, skip)
            objective.begin_epoch(epoch)
            task = progress.add_task(f"{loop.label} {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=skip, info="")
            tally = _Tally(device)
            t0 = time.perf_counter()
            for step, (images, labels, indices) in enumerate(loader, start=skip):
                hook.begin_step()
                seed = step_seed(loop.seed, epoch, step, dist.rank)
                torch.manual_seed(seed)
                objective.begin_step(seed)
                x = to_float(images, device, channels_last)
                y = labels.to(device, non_blocking=True)
                with precision.autocast():
                    losses, logits = objective(train_model, x, y, indices, epoch + step / steps_per_epoch)
                loss = losses["loss"]
                tally.add(losses, logits, y, step)
                if tally.due(step, steps_per_epoch) and (bad := tally.first_bad_step()) is not None:
                    raise _diverged(loop.label, epoch, bad, losses, checkpoints.last, precision)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                hook.end_step()

                if tally.due(step, steps_per_epoch):
                    seen, correct, sums = tally.read()
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, completed=step + 1,
                                    info=f"loss {sums['loss'] / seen:.3f} · acc {100 * correct / seen:.1f}% · {rate:.0f} img/s")
                if broadcast_flag(dist, bool(stop)) and step + 1 < steps_per_epoch:
                    if (bad := tally.first_bad_step()) is not None:  # never checkpoint weights a bad step spoiled
                        raise _diverged(loop.label, epoch, bad, losses, checkpoints.last, precision)
                    if dist.is_main:
                        checkpoints.save(_Position(epoch, step + 1, at.best))
                    raise Interrupted(f"{loop.label}: stopped at epoch {epoch + 1} step {step + 1}; checkpoint saved to {checkpoints.last}")
            if (bad := tally.first_bad_step()) is not None:
                raise _diverged(loop.label, epoch, bad, losses, checkpoints.last, precision)
            seen, correct, sums = tally.read()
            epoch_seconds = time.perf_counter() - t0
            objective.end_epoch(epoch, whole=skip == 0)
            progress.remove_task(task)

            top1 = evaluate(model, test_set, loop.eval_batch_size, device, dist, precision, channels_last)
            seen_all, correct_all, *loss_sums = all_sum(dist, seen, correct, *sums.values())
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sums[0] / max(seen_all, 1) if loss_sums else float("nan"),
                "train_top1": 100.0 * correct_all / max(seen_all, 1),
                "test_top1": top1,
                "epoch_seconds": epoch_seconds,
                "images_per_second": seen_all / max(epoch_seconds, 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
                "parts": {k: s / max(seen_all, 1) for k, s in zip(list(sums)[1:], loss_sums[1:])},
                "stage": loop.label,
                **hook.end_epoch(epoch),
            }
            history.append(row)
            at = _Position(epoch + 1, 0, max(at.best, top1))
            if dist.is_main:  # the line first: a kill before the checkpoint means a redone epoch, whose line resume trims
                fsio.append_line(loop.metrics_path, json.dumps(row))
                console.print(
                    f"{loop.label} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} · test top-1 {top1:.2f}% "
                    f"· {epoch_seconds:.1f}s · {row['images_per_second']:.0f} img/s"
                )
                checkpoints.save(at, top1)
            if broadcast_flag(dist, bool(stop)):
                raise Interrupted(f"{loop.label}: stopped after epoch {epoch + 1}; checkpoint saved to {checkpoints.last}")
    hook.end_run()
    final = history[-1]["test_top1"] if history else _last_top1(loop.metrics_path)
    return FitResult(final_top1=final, best_top1=at.best, epochs=history)


class _Tally:
    """The epoch's running sums (images, correct, each loss × images) kept on the device, so that the hot loop does
    not wait for the GPU at every step: on CUDA they are read every ``READ_EVERY`` steps (the progress bar, the
    divergence check) and at the end of the epoch; on the CPU, where a read costs nothing, at every step. The first
    step with a non-finite loss is remembered and reported at the next read: the loop raises before anything the
    bad step spoiled is checkpointed."""

    READ_EVERY = 25

    def __init__(self, device: torch.device):
        self.device = device
        self.seen = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor, step: int) -> None:
        n = len(y)
        self.seen += n
        self.correct += (logits.detach().argmax(1) == y).sum()
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double() * n
        first_bad = (self.bad_step < 0) & ~torch.isfinite(losses["loss"].detach())
        self.bad_step = torch.where(first_bad, step, self.bad_step)

    def due(self, step: int, steps: int) -> bool:
        return self.device.type != "cuda" or (step + 1) % self.READ_EVERY == 0 or step + 1 == steps

    def first_bad_step(self) -> int | None:
        bad = int(self.bad_step)
        return None if bad < 0 else bad

    def read(self) -> tuple[int, int, dict[str, float]]:
        return int(self.seen), int(self.correct), {k: float(v) for k, v in self.sums.items()}


def _diverged(label: str, epoch: int, step: int, losses: dict, last: Path, precision: Precision) -> TrainingDiverged:
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    return TrainingDiverged(
        f"{label}: non-finite loss at epoch {epoch + 1} step {step} ({parts}); "
        + (f"the last good checkpoint is kept at {last}" if last.exists() else "no checkpoint was written yet")
        + " — lower the learning rate" + (" or disable amp" if precision.dtype else "")
    )


@torch.no_grad()
def evaluate(model, test_set: ImageDataset, batch_size: int, device, dist: DistInfo = DistInfo(), precision: Precision | None = None, channels_last=False) -> float:
    """Top-1 (percent) on the test set; under DDP each rank scores a shard and counts are summed."""
    was_training = model.training
    model.eval()
    sampler = EpochSampler(len(test_set), seed=0, shuffle=False, rank=dist.rank, world=dist.world, pad=False)
    loader = make_loader(test_set, batch_size, sampler)
    correct = total = 0
    with (precision.autocast() if precision else nullcontext()):
        for images, labels, _ in loader:
            logits = model(to_float(images, device, channels_last))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    model.train(was_training)
    correct, total = all_sum(dist, correct, total)
    return 100.0 * correct / max(total, 1)


def _trim_metrics(path: Path, upto_epoch: int) -> None:
    """Drop metric lines of epochs a resumed run will redo (written after the last checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["epoch"] <= upto_epoch]
    if len(keep) != len(lines):
        fsio.write_text(path, "".join(line + "\n" for line in keep))


def _last_top1(path: Path) -> float:
    if not path.exists():
        return float("nan")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1]["test_top1"] if lines else float("nan")
