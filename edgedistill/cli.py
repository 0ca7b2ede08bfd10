"""Command line: parses arguments, calls the pipeline, and owns every exit code. No logic lives here.

Importing it loads neither torch nor the pipeline: each command imports what it needs when it runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.markup import escape

from edgedistill import __version__
from edgedistill.base.console import console, setup_logging, stdout
from edgedistill.base.errors import (BAD_INPUT, GATE_FAILED, INTERRUPTED, OUT_OF_RESOURCES, EdgeDistillError, InputError,
                                     RunStateError, user_error)
from edgedistill.pipeline.folder import RunFolder
from edgedistill.pipeline.stage_table import BY_NAME, STAGE_NAMES, STAGES, StageSpec

DEFAULT_OUT = Path("runs")
RECIPE = click.argument("recipe", metavar="RECIPE|RUN", type=click.Path(path_type=Path))
TARGET_HELP = "RECIPE|RUN: a recipe file, or the run folder a recipe made (its recipe.yaml is used)."
RESUME_HELP = {
    "run": "Continue an interrupted run: skip finished stages, continue training from its last checkpoint.",
    "teacher": "Continue the teacher's interrupted training from its last checkpoint.",
    "distill": "Continue the student's interrupted training from checkpoints/last.pt.",
    "qat": "Continue the interrupted quantisation-aware training from checkpoints/qat/last.pt.",
    "baseline": "Continue the baseline student's interrupted training from checkpoints/baseline/last.pt.",
}


def common(trains: str | None = None):
    """Options every pipeline command takes; ``--resume`` only where there is training to continue."""

    def decorate(fn):
        @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable).")
        @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Parent folder of the run folder (default: runs). Only with a recipe file.")
        @click.option("--force", is_flag=True, help="Accept a recipe that differs from the one the run started with.")
        @click.option("--debug", is_flag=True, help="Show tracebacks.")
        @functools.wraps(fn)
        def wrapper(*args, debug: bool, **kwargs):
            setup_logging(debug)
            try:
                with _sigterm_interrupts():
                    return fn(*args, **kwargs)
            except KeyboardInterrupt:
                if debug:
                    raise
                console.print(f"[red]interrupted[/]\n  resume with: {_resume_command()}", highlight=False, soft_wrap=True)
                sys.exit(INTERRUPTED)
            except Exception as e:
                _exit_for(e, debug)

        return click.option("--resume", is_flag=True, help=RESUME_HELP[trains])(wrapper) if trains else wrapper

    return decorate


def _exit_for(e: Exception, debug: bool) -> NoReturn:
    """Print the one-line message an exception stands for and exit with its code; a bug keeps its traceback."""
    err = user_error(e)
    if err is None:
        raise e
    if debug:
        console.print_exception()
    label = "failed" if err.exit_code == GATE_FAILED else "interrupted" if err.exit_code == INTERRUPTED else "error"
    # the message is text, not markup: "pip install 'edgedistill[litert]'" must keep its brackets
    console.print(f"[red]{label}:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
    if err.exit_code in (INTERRUPTED, OUT_OF_RESOURCES) and _resumable():
        console.print(f"  resume with: {_resume_command()}", highlight=False, soft_wrap=True)
    sys.exit(err.exit_code)


def _argv() -> list[str]:
    ctx = click.get_current_context(silent=True)
    return list(ctx.meta.get(ARGV_KEY, sys.argv[1:])) if ctx else sys.argv[1:]


def _resumable() -> bool:
    """Whether the command running has a run folder to continue (``predict`` has none)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and any(p.name in ("resume", "overrides") for p in ctx.command.params)


def _resume_command() -> str:
    """The command line that continues this one, shell-quoted: the same arguments, plus ``--resume`` where the
    command has training to continue (a stage that does not train simply runs again)."""
    ctx = click.get_current_context(silent=True)
    argv = _argv()
    trains = ctx is not None and any(p.name == "resume" for p in ctx.command.params)
    return shlex.join(["edgedistill", *argv, *(["--resume"] if trains and "--resume" not in argv else [])])


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM outside training behaves like Ctrl-C (training installs its own graceful handler).

    Not under torchrun: there the agent terminates its workers, and a Python handler would only run once a
    worker blocked in C++ (a rendezvous, a collective) returns, i.e. SIGTERM could no longer stop it.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- opening a run


def _locate(target: Path, out: Path | None) -> tuple[Path, Path | None]:
    """The recipe file and, when ``target`` is a run folder, that folder (its own recipe.yaml is the recipe)."""
    if not target.is_dir():
        return target, None
    if not (target / "recipe.yaml").is_file():
        raise InputError(f"{target}: a folder without recipe.yaml; give a recipe file or a run folder")
    if out is not None:
        raise InputError(f"--out: {target} is a run folder already; --out only places the run folder of a recipe file")
    return target / "recipe.yaml", target


def _check_needs(stage: StageSpec, run: RunFolder, target: Path) -> None:
    """The stages this one needs have finished: checked before anything is created or written."""
    if stage.name == "report" and not any(run.done(s) for s in STAGE_NAMES):
        raise RunStateError(f"{run.root}: nothing to report yet: no stage has finished; run 'edgedistill run {target}' first")
    for need in stage.needs:
        if not run.done(need):
            raise RunStateError(
                f"{run.root}: stage '{need}' has not finished; run 'edgedistill {need} {target}' "
                f"(or 'edgedistill run {target} --resume') first"
            )


@contextlib.contextmanager
def _opened(target: Path, overrides, out: Path | None, force: bool, *, resume: bool = False, stage: StageSpec | None = None,
            once: frozenset[str] = frozenset(), new_run: bool = False):
    """Load the recipe, check that ``stage`` (if any) can start, take the run folder's lock, open the run.

    ``new_run``: the whole pipeline, which refuses a folder holding a run unless resumed. A run folder this command creates is removed again if the
    command fails on bad input before any work is saved: nothing is left where nothing was made.
    """
    from edgedistill.recipe.schema import load_recipe
    from edgedistill.pipeline.run import open_run

    recipe_path, root = _locate(target, out)
    recipe = load_recipe(recipe_path, list(overrides))
    run = RunFolder(root or (out or DEFAULT_OUT) / recipe.name)
    if stage is not None:
        _check_needs(stage, run, target)
    created = next((p for p in reversed([run.root, *run.root.parents]) if not p.exists()), None)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the lock for the job
    try:
        with run.lock(take=main_rank):
            yield open_run(recipe, run.root, resume=resume, force=force, new_run=new_run, stage=stage and stage.name, once=once,
                           preflight=stage is None or stage.reads_inputs, command=shlex.join(["edgedistill", *_argv()]))
    except EdgeDistillError as e:
        if e.exit_code == BAD_INPUT and created is not None and main_rank and not run.has_work():
            shutil.rmtree(created, ignore_errors=True)
        raise


def _raise_gates(ctx) -> None:
    """Exit 1 when the validated models failed a gate (after the report is written)."""
    path = ctx.run / "validation.json"
    if ctx.dist.is_main and ctx.run.done("validate") and path.exists():
        from edgedistill.deploy.validate import check_gates

        check_gates(json.loads(path.read_text()))


# ---------------------------------------------------------------- commands


ARGV_KEY = "edgedistill.argv"


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)  # for the resume command printed after an interruption
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgedistill")
def cli():
    """Distill a big image classifier into a small edge model with Energy KD, export it and validate it."""


@cli.command(help=f"Run the whole pipeline: {' → '.join(STAGE_NAMES)}.\n\n{TARGET_HELP}")
@RECIPE
@common(trains="run")
def run(recipe: Path, overrides, out: Path | None, force: bool, resume: bool):
    from edgedistill.pipeline.run import run_all

    with _opened(recipe, overrides, out, force, resume=resume, new_run=True) as ctx:
        run_all(ctx)
    if ctx.dist.is_main:
        console.print(f"[green]done:[/] {ctx.run.root}")
    _raise_gates(ctx)


def _stage_command(stage: StageSpec) -> None:
    @cli.command(stage.name, help=f"{stage.help}\n\n{TARGET_HELP}")
    @RECIPE
    @common(stage.name if stage.trains else None)
    def command(recipe: Path, overrides, out: Path | None, force: bool, resume: bool = False):
        from edgedistill.pipeline.run import run_stage

        with _opened(recipe, overrides, out, force, resume=resume, stage=stage) as ctx:
            run_stage(ctx, stage.name)
        _raise_gates(ctx)


for _stage in STAGES:
    if _stage.name != "validate":  # validate has an option of its own, below
        _stage_command(_stage)


@cli.command(help=f"{BY_NAME['validate'].help}\n\n{TARGET_HELP}")
@RECIPE
@click.option("--onnx", "onnx_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Validate this ONNX or ORT file (repeatable) on the recipe's test data instead of the run's exports: accuracy, latency, size.")
@common()
def validate(recipe: Path, onnx_files, overrides, out: Path | None, force: bool):
    from edgedistill.pipeline.run import run_stage
    from edgedistill.pipeline.deploy_stages import validate_files

    # checking given files redoes nothing of the run's: other validate settings serve this command alone
    with _opened(recipe, overrides, out, force, stage=None if onnx_files else BY_NAME["validate"],
                 once=frozenset(BY_NAME["validate"].owns) if onnx_files else frozenset()) as ctx:
        if onnx_files:
            validate_files(ctx, list(onnx_files))
            return
        run_stage(ctx, "validate")
    _raise_gates(ctx)


@cli.command("list")
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True, help="Input size the students' MACs are counted at.")
@click.option("--num-classes", type=click.IntRange(2), default=100, show_default=True, help="Classes of the students' classifier.")
def list_registered(image_size: int, num_classes: int):
    """List the registered data sources, students, teachers, losses, augmentations and export targets, and every student
    student.arch: auto considers (each width it tries; timm's curated ones with the timm extra) with its parameters,
    MACs per image and whether it takes a stride-1 stem for small images (on stdout)."""
    from rich.table import Table

    from edgedistill.distill.augment import AUGMENTS
    from edgedistill.data.sources import DATA_SOURCES
    from edgedistill.distill.losses import LOSSES
    from edgedistill.models.macs import model_stats
    from edgedistill.models.students import STUDENTS, allows_small_stem, build_student, zoo
    from edgedistill.models.teachers import TEACHERS
    from edgedistill.deploy.pick import candidate_specs, label
    from edgedistill.deploy.targets import TARGETS

    table = Table(title="edgedistill registries")
    table.add_column("kind")
    table.add_column("names")
    for reg in (DATA_SOURCES, STUDENTS, TEACHERS, LOSSES, AUGMENTS, TARGETS):
        table.add_row(reg.kind, ", ".join([*reg.names(), *reg.families()]))
    stdout.print(table)
    sizes = Table(title=f"students at {image_size}×{image_size} px, {num_classes} classes, as exported (small-input stem: auto)")
    sizes.add_column("student", no_wrap=True)
    for col in ("parameters", "MACs per image", "stride-1 stem"):
        sizes.add_column(col, justify="right")
    for arch, width in candidate_specs(zoo()):
        net = build_student(arch, num_classes, image_size=image_size, mean=(0.5,) * 3, std=(0.25,) * 3, width=width).eval()
        stats = model_stats(net, image_size)
        stem = "yes" if allows_small_stem(arch) else "no"
        sizes.add_row(label({"arch": arch, "width": width}), f"{stats['parameters'] / 1e6:.2f} M", f"{stats['macs'] / 1e6:.1f} M", stem)
    stdout.print(sizes)


@cli.command(help="Top-k classes of an image, or of every image in a folder, under an exported model (.onnx or .ort), each "
                  "image prepared as the model's 'preprocessing' metadata records: the code docs/deploy.md shows.")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", metavar="IMAGE|FOLDER", type=click.Path(exists=True, path_type=Path))
@click.option("--top-k", "-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True, help="Images per inference call (a fixed-batch model uses its own).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to this file instead of stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def predict(model: Path, images: Path, top_k: int, fmt: str, batch: int, output: Path | None, debug: bool):
    setup_logging(debug)
    try:
        from edgedistill.deploy import predict as p

        p.run(model, images, top_k=top_k, batch=batch, fmt=fmt, output=output, say=lambda line: console.print(line, highlight=False))
    except Exception as e:
        _exit_for(e, debug)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        console.print("[red]error:[/] aborted")
        sys.exit(INTERRUPTED)
    except click.ClickException as e:
        e.show(file=sys.stderr)
        sys.exit(BAD_INPUT)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
