"""The run folder (a public contract, see docs/run-folder.md) and the pipeline that chains the stages."""

from __future__ import annotations

import json
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from edgedistill import __version__, fsio
from edgedistill.console import console
from edgedistill.distributed import DistInfo, barrier, init_from_env
from edgedistill.errors import RunStateError
from edgedistill.recipe import Recipe, dump_recipe


class RunFolder:
    """``<out>/<recipe name>/``: artifacts, ``stages/<stage>.done`` markers and a lock file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def done(self, stage: str) -> bool:
        return (self.root / "stages" / f"{stage}.done").exists()

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        fsio.write_json(self.root / "stages" / f"{stage}.done", summary)

    def summary(self, stage: str) -> dict[str, Any]:
        path = self.root / "stages" / f"{stage}.done"
        return json.loads(path.read_text()) if path.exists() else {}

    def clear_from(self, stages: list[str]) -> None:
        for s in stages:
            (self.root / "stages" / f"{s}.done").unlink(missing_ok=True)

    def require(self, stage: str, file: str | None = None) -> Path | None:
        """The artifact of an earlier stage, or a clear error naming the command that makes it."""
        if not self.done(stage):
            raise RunStateError(f"{self.root}: stage '{stage}' has not finished; run 'edgedistill {stage} RECIPE' (or 'edgedistill run RECIPE --resume') first")
        return self.root / file if file else None

    @contextmanager
    def lock(self, take: bool = True) -> Iterator[None]:
        """One process per run folder: a second one is refused while the first is alive.

        Under torchrun only rank 0 takes it (``take``): the ranks of one job are one owner.
        """
        if not take:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        with _folder_mutex(self.root):  # check-and-take is one step, even for processes starting together
            pid = _read_pid(path) if path.exists() else None
            if pid and _alive(pid):
                raise RunStateError(
                    f"{path}: another edgedistill process (pid {pid}) is using this run folder; "
                    f"wait for it to finish (or delete {path.name} if pid {pid} is not edgedistill)"
                )
            fsio.write_text(path, str(os.getpid()))  # a stale lock (its owner died) is simply replaced
        try:
            yield
        finally:
            if _read_pid(path) == os.getpid():
                path.unlink(missing_ok=True)

    def has_work(self) -> bool:
        """A finished stage or a training checkpoint: what ``--resume`` would continue and a new run would overwrite."""
        return any((self.root / "stages").glob("*.done")) or any((self.root / "checkpoints").rglob("*.pt"))


@contextmanager
def _folder_mutex(root: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself for a short critical section (best effort where unsupported)."""
    try:
        import fcntl

        fd = os.open(root, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunContext:
    """Everything a stage receives: the recipe, the folder, the device, and lazily loaded shared inputs."""

    recipe: Recipe
    run: RunFolder
    dist: DistInfo = field(default_factory=DistInfo)
    resume: bool = False

    @cached_property
    def device(self) -> torch.device:
        from edgedistill.train import select_device

        return select_device(self.recipe.device, self.dist)

    @cached_property
    def data(self):
        from edgedistill.data import load_data

        return load_data(self.recipe.data, self.recipe.seed)

    @cached_property
    def teacher(self) -> torch.nn.Module:
        from edgedistill.stages import load_run_teacher

        return load_run_teacher(self)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    def train_set(self):
        """The augmented training split, as every training stage sees it."""
        from edgedistill.data import ImageDataset

        return ImageDataset(self.data.train, self.image_size, train=True, seed=self.recipe.seed, hflip=self.recipe.data.hflip)

    def print(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            console.print(*args, **kwargs)


def open_run(recipe: Recipe, out: Path, *, resume: bool = False, force: bool = False, new_run: bool = False) -> RunContext:
    """Create or re-open ``out/<recipe.name>``; write recipe.yaml and env.json; refuse a changed recipe.

    ``new_run`` (the ``run`` command) refuses a folder that already holds a run unless ``resume``:
    finished work is never silently redone or overwritten.
    """
    dist = init_from_env("cuda" if recipe.device.startswith("cuda") or (recipe.device == "auto" and torch.cuda.is_available()) else "cpu")
    run = RunFolder(Path(out) / recipe.name)
    saved = run / "recipe.yaml"
    # a folder whose run failed before finishing anything (bad input) holds nothing to protect: start afresh
    started = saved.exists() and run.has_work()
    if started:
        if new_run and not resume:
            raise RunStateError(f"{run.root} already holds a run; add --resume to continue it, or --out DIR for a new one")
        old = yaml.safe_load(saved.read_text()) or {}
        diff = sorted(_diff_keys(old, recipe.to_dict()))
        if diff and not force:
            raise RunStateError(
                f"{run.root}: the recipe differs from the one this run was started with ({_keys(diff)}); "
                "use --force to continue anyway, or --out for a new run"
            )
        if diff and force and dist.is_main:
            console.print(f"[yellow]recipe changed ({_keys(diff)}); continuing because of --force[/]")
    existed = started
    barrier(dist)  # every rank has looked at the folder before rank 0 writes into it
    if dist.is_main and (not existed or force):
        fsio.write_text(saved, dump_recipe(recipe))
    ctx = RunContext(recipe, run, dist, resume=resume)
    if dist.is_main:
        fsio.write_json(run / "env.json", environment(ctx))
    barrier(dist)
    return ctx


def _keys(diff: list[str], shown: int = 8) -> str:
    more = f" and {len(diff) - shown} more" if len(diff) > shown else ""
    return ", ".join(diff[:shown]) + more


def _diff_keys(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def environment(ctx: RunContext) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torchvision

    dev = ctx.device
    return {
        "edgedistill": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": ctx.dist.world,
        "command": " ".join(sys.argv),
    }


# ---------------------------------------------------------------- the pipeline


def pipeline() -> list[tuple[str, Callable[[RunContext], dict]]]:
    from edgedistill import stages

    return [
        ("teacher", stages.teacher_stage),
        ("score", stages.score_stage),
        ("plan", stages.plan_stage),
        ("distill", stages.distill_stage),
        ("export", stages.export_stage),
        ("validate", stages.validate_stage),
        ("report", stages.report_stage),
    ]


def run_stage(ctx: RunContext, name: str) -> dict:
    """Run one stage (again, if it had finished) and mark it done.

    Its marker and those of every later stage are removed first: they describe results built on the old
    output, so ``run --resume`` redoes them instead of keeping, e.g., an ONNX file of a replaced student.
    """
    fn = dict(pipeline())[name]
    if ctx.dist.is_main:
        names = [n for n, _ in pipeline()]
        ctx.run.clear_from(names[names.index(name):])
        console.rule(f"[bold]{name}")
    summary = fn(ctx) or {}
    if ctx.dist.is_main:
        ctx.run.mark_done(name, summary)
    barrier(ctx.dist)
    return summary


def run_all(ctx: RunContext) -> None:
    """Every stage in order; with a resumed run, finished stages are skipped."""
    for name, _ in pipeline():
        if ctx.resume and ctx.run.done(name):
            ctx.print(f"[dim]{name}: already done, skipped[/]")
            continue
        run_stage(ctx, name)
