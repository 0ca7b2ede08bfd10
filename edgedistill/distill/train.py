"""One training loop for every model and method.

The loop knows nothing about distillation: an *objective* turns a batch into a dict of losses
(see :mod:`edgedistill.distill.objectives`), and the loop does the rest: device placement, AMP,
channels_last, DDP, the learning-rate schedule, checkpoints, resume, graceful stop and metrics.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgedistill.base import fsio
from edgedistill.base.console import console, progress_bar
from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader, to_float
from edgedistill.base.devices import Precision
from edgedistill.base.distributed import DistInfo, all_sum, broadcast_flag
from edgedistill.base.errors import Interrupted, TrainingDiverged
from edgedistill.base.shots import class_counts, shot_top1
from edgedistill.distill.batchnorm import recalibrate
from edgedistill.distill.objectives import Objective
from edgedistill.distill.run_state import Checkpoints, Position, StopFlag, graceful_stop, last_top1, trim_metrics

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
    shot_groups: dict[str, list[int]] | None = None  # a long-tailed training split's classes by group (base.shots)




@dataclass
class FitResult:
    final_top1: float
    best_top1: float
    epochs: list[dict]


def prepare(model: nn.Module, cfg, loop: LoopConfig, device: torch.device, dist: DistInfo) -> tuple[nn.Module, nn.Module]:
    """``model`` on the device in the loop's layout (SyncBN, compiled, in place) and the module a step calls:
    ``model`` itself, or its DDP wrapper."""
    model.to(device)
    if loop.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if loop.compile:
        model.compile()  # in place: the state_dict keeps its keys, so checkpoints do not depend on it
    if not dist.enabled:
        return model, model
    return model, nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class _Trainer:
    """One fit's moving parts: the optimiser, schedule and scaler around the model, the step, the epoch's row."""

    def __init__(self, model: nn.Module, objective: Objective, train_set: ImageDataset, cfg, loop: LoopConfig,
                 device: torch.device, dist: DistInfo, hook: LoopHook):
        self.objective, self.train_set, self.cfg, self.loop, self.device, self.dist, self.hook = objective, train_set, cfg, loop, device, dist, hook
        self.precision = Precision.for_device(device, cfg.amp)
        self.model, self.train_model = prepare(model, cfg, loop, device, dist)
        self.sampler = EpochSampler(len(train_set), seed=loop.seed, shuffle=True, rank=dist.rank, world=dist.world)
        # one loader for the whole fit: its workers stay up from epoch to epoch, the sampler says which epoch it is
        self.loader = make_loader(train_set, loop.batch_size, self.sampler, num_workers=loop.num_workers, pin_memory=device.type == "cuda")
        self.steps = math.ceil(len(self.sampler.indices()) / loop.batch_size)
        total, s = self.steps * cfg.epochs, cfg.schedule
        warmup, milestones = int(round(s.warmup_epochs * self.steps)), [m * self.steps for m in s.milestones]
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: lr_factor(i, total, warmup, s.name, milestones, s.gamma))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.needs_scaler)
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "objective": objective, "hook": hook}
        self.checkpoints = Checkpoints(loop, parts, before_save=hook.before_checkpoint)
        # precise BN reads the training images as evaluation sees images: no crop, no flip
        self.bn_images = ImageDataset(train_set.split, train_set.size, train=False)

    def step(self, epoch: int, step: int, images, labels, indices, tally: "_Tally") -> dict:
        """One optimisation step, its randomness seeded by where it is (:func:`step_seed`); the step's losses."""
        self.hook.begin_step()
        seed = step_seed(self.loop.seed, epoch, step, self.dist.rank)
        torch.manual_seed(seed)
        self.objective.begin_step(seed)
        x = to_float(images, self.device, self.loop.channels_last)
        y = labels.to(self.device, non_blocking=True)
        with self.precision.autocast():
            losses, logits = self.objective(self.train_model, x, y, indices, epoch + step / self.steps)
        tally.add(losses, logits, y, step)
        if tally.due(step, self.steps):
            self.check(tally, epoch, losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.hook.end_step()
        return losses

    def check(self, tally: "_Tally", epoch: int, losses: dict) -> None:
        """Stop on the first non-finite loss, before anything a bad step spoiled is checkpointed."""
        if (bad := tally.first_bad_step()) is not None:
            raise _diverged(self.loop.label, epoch, bad, losses, self.checkpoints.last, self.precision)

    def epoch(self, epoch: int, skip: int, at: Position, stop: StopFlag, progress) -> tuple["_Tally", float]:
        """The epoch's steps from ``skip`` on; a stop between them checkpoints the position and raises Interrupted."""
        loop = self.loop
        self.sampler.set_epoch(epoch, start=skip * loop.batch_size)
        self.train_model.train()
        self.hook.begin_epoch(epoch, skip)
        self.objective.begin_epoch(epoch)
        task = progress.add_task(f"{loop.label} {epoch + 1}/{self.cfg.epochs}", total=self.steps, completed=skip, info="")
        tally, t0, losses = _Tally(self.device), time.perf_counter(), {}
        for step, (images, labels, indices) in enumerate(self.loader, start=skip):
            losses = self.step(epoch, step, images, labels, indices, tally)
            if tally.due(step, self.steps):
                seen, correct, sums = tally.read()
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=step + 1, info=f"loss {sums['loss'] / seen:.3f} · acc {100 * correct / seen:.1f}% · {rate:.0f} img/s")
            if broadcast_flag(self.dist, bool(stop)) and step + 1 < self.steps:
                self.check(tally, epoch, losses)
                if self.dist.is_main:
                    self.checkpoints.save(Position(epoch, step + 1, at.best))
                raise Interrupted(f"{loop.label}: stopped at epoch {epoch + 1} step {step + 1}; checkpoint saved to {self.checkpoints.last}")
        self.check(tally, epoch, losses)
        seconds = time.perf_counter() - t0
        self.objective.end_epoch(epoch, whole=skip == 0)
        progress.remove_task(task)
        return tally, seconds

    def row(self, epoch: int, tally: "_Tally", seconds: float, test: tuple[np.ndarray, np.ndarray]) -> dict:
        """The epoch's line in the metrics log (counts summed over ranks); ``test``: the evaluation's per-class
        (correct, seen), broken down by shot group for a long-tailed training split."""
        seen, correct, sums = tally.read()
        seen_all, correct_all, *loss_sums = all_sum(self.dist, seen, correct, *sums.values())
        groups = self.loop.shot_groups
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sums[0] / max(seen_all, 1) if loss_sums else float("nan"),
            "train_top1": 100.0 * correct_all / max(seen_all, 1),
            "test_top1": top1_percent(*test),
            **({"shot_top1": shot_top1(*test, groups)} if groups else {}),
            "epoch_seconds": seconds,
            "images_per_second": seen_all / max(seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
            "parts": {k: s / max(seen_all, 1) for k, s in zip(list(sums)[1:], loss_sums[1:])},
            "stage": self.loop.label,
            **self.hook.end_epoch(epoch),
        }


def fit(model: nn.Module, objective: Objective, train_set: ImageDataset, test_set: ImageDataset, cfg, loop: LoopConfig,
        device: torch.device, dist: DistInfo = DistInfo(), hook: LoopHook = LoopHook()) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` with ``objective``; re-estimate its BN statistics and evaluate it after
    every epoch, checkpoint, and resume if asked.

    ``objective(model, images, labels, indices, epoch) -> (losses, logits)``: ``losses["loss"]``
    is minimised; the other entries are logged. ``epoch`` is fractional for warm-ups.
    """
    t = _Trainer(model, objective, train_set, cfg, loop, device, dist, hook)
    at = t.checkpoints.restore() if loop.resume and t.checkpoints.last.exists() else Position()
    if dist.is_main:
        if at.epoch or at.step:
            where = f"epoch {at.epoch + 1}, step {at.step}" if at.step else f"epoch {at.epoch + 1}"
            console.print(f"[cyan]{loop.label}: resuming at {where} of {cfg.epochs}[/]")
        trim_metrics(loop.metrics_path, at.epoch)  # a fresh run starts a fresh log; a resumed one drops redone epochs
    history = []
    with graceful_stop() as stop, progress_bar(enabled=dist.is_main) as progress:
        for epoch in range(at.epoch, cfg.epochs):
            tally, seconds = t.epoch(epoch, at.step if epoch == at.epoch else 0, at, stop, progress)
            recalibrate(t.model, t.bn_images, loop.eval_batch_size, device, loop.channels_last, t.precision)
            row = t.row(epoch, tally, seconds, class_tally(t.model, test_set, loop.eval_batch_size, device, dist, t.precision, loop.channels_last))
            top1 = row["test_top1"]
            history.append(row)
            at = Position(epoch + 1, 0, max(at.best, top1))
            if dist.is_main:  # the line first: a kill before the checkpoint means a redone epoch, whose line resume trims
                fsio.append_line(loop.metrics_path, json.dumps(row))
                console.print(f"{loop.label} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} · test top-1 {top1:.2f}% "
                              f"· {seconds:.1f}s · {row['images_per_second']:.0f} img/s")
                t.checkpoints.save(at, top1)
            if broadcast_flag(dist, bool(stop)):
                raise Interrupted(f"{loop.label}: stopped after epoch {epoch + 1}; checkpoint saved to {t.checkpoints.last}")
    hook.end_run()
    final = history[-1]["test_top1"] if history else last_top1(loop.metrics_path)
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


def evaluate(model, test_set: ImageDataset, batch_size: int, device, dist: DistInfo = DistInfo(), precision: Precision | None = None, channels_last=False) -> float:
    """Top-1 (percent) on the test set; under DDP each rank scores a shard and counts are summed."""
    return top1_percent(*class_tally(model, test_set, batch_size, device, dist, precision, channels_last))


def top1_percent(correct: np.ndarray, seen: np.ndarray) -> float:
    return 100.0 * float(correct.sum()) / max(float(seen.sum()), 1.0)


@torch.no_grad()
def class_tally(model, test_set: ImageDataset, batch_size: int, device, dist: DistInfo = DistInfo(), precision: Precision | None = None,
                channels_last=False) -> tuple[np.ndarray, np.ndarray]:
    """Correct and seen test images per class (:func:`edgedistill.base.shots.class_counts`), summed over ranks."""
    was_training = model.training
    model.eval()
    sampler = EpochSampler(len(test_set), seed=0, shuffle=False, rank=dist.rank, world=dist.world, pad=False)
    loader = make_loader(test_set, batch_size, sampler)
    correct = seen = None
    with (precision.autocast() if precision else nullcontext()):
        for images, labels, _ in loader:
            logits = model(to_float(images, device, channels_last))
            c, s = class_counts(logits.argmax(1).cpu().numpy(), labels.numpy(), logits.shape[1])
            correct, seen = (c, s) if correct is None else (correct + c, seen + s)
    model.train(was_training)
    k = len(correct)
    summed = all_sum(dist, *correct.tolist(), *seen.tolist())
    return np.asarray(summed[:k], dtype=np.int64), np.asarray(summed[k:], dtype=np.int64)


