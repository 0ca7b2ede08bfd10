"""The pipeline: open a run folder for a recipe, the stage table, and the chain that runs the stages in order."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from edgedistill import __version__
from edgedistill.base import fsio
from edgedistill.pipeline import deploy_stages, stages
from edgedistill.base.console import console
from edgedistill.pipeline.context import RunContext
from edgedistill.base.distributed import barrier, init_from_env
from edgedistill.base.errors import RunStateError
from edgedistill.pipeline.folder import RunFolder
from edgedistill.recipe.schema import Recipe, dump_recipe
from edgedistill.pipeline.stage_table import BY_NAME, STAGE_NAMES, free_sections


def open_run(recipe: Recipe, root: Path, *, resume: bool = False, force: bool = False, new_run: bool = False,
             stage: str | None = None, once: frozenset[str] = frozenset(), preflight: bool = True,
             command: str | None = None) -> RunContext:
    """Create or re-open the run folder ``root``; write recipe.yaml and env.json; refuse a changed recipe.

    ``new_run`` (the ``run`` command) refuses a folder that already holds a run unless ``resume``:
    finished work is never silently redone or overwritten. A recipe that changed only in sections ``stage``
    (the one stage this command runs) owns is taken, and saved. A change only in sections ``once`` is taken for
    this command alone and not saved: the command's own output records it, while the run's recipe.yaml must keep
    describing what the run's stages made (``validate --onnx`` with other timing settings). ``preflight`` loads
    the data and a file teacher before anything is written, so that a bad input leaves nothing behind.
    ``command`` (the CLI's own command line, default this process's) goes into env.json.
    """
    dist = init_from_env("cuda" if recipe.device.startswith("cuda") or (recipe.device == "auto" and torch.cuda.is_available()) else "cpu")
    run = RunFolder(root)
    saved = run / "recipe.yaml"
    # a folder whose run failed before finishing anything (bad input) holds nothing to protect: start afresh
    started = saved.exists() and run.has_work()
    diff: list[str] = []
    if started:
        if new_run and not resume:
            raise RunStateError(f"{run.root} already holds a run; add --resume to continue it, or --out DIR for a new one")
        old = yaml.safe_load(saved.read_text()) or {}
        diff = sorted(_diff_keys(old, recipe.to_dict()))
        free = free_sections(stage) if stage else frozenset()
        held = [k for k in diff if k.split(".")[0] not in free | once]
        if held and not force:
            raise RunStateError(
                f"{run.root}: the recipe differs from the one this run was started with ({_keys(held)}); "
                "use --force to continue anyway, or --out for a new run"
            )
        if diff and dist.is_main:
            why = ("continuing because of --force" if held else f"the {stage} stage redoes what they change" if stage
                   else "for this command only; the run's recipe.yaml keeps its own")
            console.print(f"[yellow]recipe changed ({_keys(diff)}); {why}[/]")
    ctx = RunContext(recipe, run, dist, resume=resume)
    if preflight:
        ctx.device, ctx.data  # noqa: B018 - bad data or a bad device fail here, before anything is written
        if not ctx.teacher_trained_here:
            ctx.teacher  # noqa: B018
    barrier(dist)  # every rank has looked at the folder before rank 0 writes into it
    if dist.is_main:
        if not started or any(k.split(".")[0] not in once for k in diff):
            fsio.write_text(saved, dump_recipe(recipe))
        fsio.write_json(run / "env.json", _with_history(run / "env.json", environment(ctx, command or shlex.join(sys.argv))))
    barrier(dist)
    return ctx


def _with_history(path: Path, now: dict[str, Any]) -> dict[str, Any]:
    """env.json keeps the environment and command that started the run; every later command is appended to
    its ``history`` (with the versions and device it ran with), so nothing about how the run was made is lost."""
    if not path.exists():
        return {**now, "history": []}
    env = json.loads(path.read_text())
    env.setdefault("history", []).append({k: now[k] for k in ("command", "started_at", "edgedistill", "code", *LIBRARIES, "device", "cpu_threads", "world_size")})
    return env


def _keys(diff: list[str], shown: int = 8) -> str:
    more = f" and {len(diff) - shown} more" if len(diff) > shown else ""
    return ", ".join(diff[:shown]) + more


def _diff_keys(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


#: the libraries whose versions can change a run's numbers (floating-point kernels, image decoding, export)
LIBRARIES = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "numpy", "pillow")


def environment(ctx: RunContext, command: str) -> dict[str, Any]:
    dev = ctx.device
    return {
        "edgedistill": __version__,
        "code": code_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **{name: metadata.version(name) for name in LIBRARIES},
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": ctx.dist.world,
        "command": command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def code_commit() -> str | None:
    """The git commit of the package's source when it runs from a checkout (``+dirty`` with uncommitted changes to
    tracked files), else None: with the versions, what tells a re-run's drift in a dependency from a change in the code."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git on the machine
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- the pipeline


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], dict]] = {
    name: getattr(stages, f"{name}_stage", None) or getattr(deploy_stages, f"{name}_stage") for name in STAGE_NAMES}


def run_stage(ctx: RunContext, name: str) -> dict:
    """Run one stage (again, if it had finished) and mark it done.

    Its marker and those of every later stage are removed first: they describe results built on the old
    output, so ``run --resume`` redoes them instead of keeping, e.g., an ONNX file of a replaced student.
    (Not after a plan, which only forecasts: the distill stage keeps the prediction it ran with in budget.json.)
    """
    fn = STAGE_FUNCTIONS[name]
    if ctx.dist.is_main:
        ctx.run.clear(list(STAGE_NAMES[STAGE_NAMES.index(name):]) if BY_NAME[name].invalidates_later else [name])
        console.rule(f"[bold]{name}")
    summary = fn(ctx) or {}
    if ctx.dist.is_main:
        ctx.run.mark_done(name, summary)
    barrier(ctx.dist)
    return summary


def run_all(ctx: RunContext) -> None:
    """Every stage in order; with a resumed run, finished stages are skipped."""
    for name in STAGE_NAMES:
        if ctx.resume and ctx.run.done(name):
            ctx.print(f"[dim]{name}: already done, skipped[/]")
            continue
        run_stage(ctx, name)
