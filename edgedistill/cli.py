"""Command line: parses arguments, calls the pipeline, and owns every exit code. No logic lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import click

from edgedistill import __version__
from edgedistill.console import console, setup_logging
from edgedistill.errors import BAD_INPUT, INTERRUPTED, EdgeDistillError, GateFailed

RECIPE = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))


def common(fn):
    """Options every pipeline command takes."""

    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable).")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True, help="Parent folder of the run folder.")
    @click.option("--resume", is_flag=True, help="Continue an interrupted run: skip finished stages, continue training from checkpoints/last.pt.")
    @click.option("--force", is_flag=True, help="Accept a recipe that differs from the one the run started with.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool, **kwargs):
        setup_logging(debug)
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except EdgeDistillError as e:
            _fail(e, debug)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            console.print(f"[red]interrupted[/]\n  resume with: {_resume_command()}", highlight=False, soft_wrap=True)
            sys.exit(INTERRUPTED)
        except OSError as e:
            if debug or not e.filename:
                raise
            # a file the user pointed at (or --out) cannot be read or written: bad input, one line
            console.print(f"[red]error:[/] {e.filename}: {e.strerror or e}", highlight=False, soft_wrap=True)
            sys.exit(BAD_INPUT)

    return wrapper


def _fail(e: EdgeDistillError, debug: bool) -> None:
    if debug:
        console.print_exception()
    label = "failed" if isinstance(e, GateFailed) else "interrupted" if e.exit_code == INTERRUPTED else "error"
    console.print(f"[red]{label}:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    if e.exit_code == INTERRUPTED:
        console.print(f"  resume with: {_resume_command()}", highlight=False, soft_wrap=True)


def _resume_command() -> str:
    """The command line that continues this one: the same arguments plus ``--resume``, shell-quoted."""
    ctx = click.get_current_context(silent=True)
    argv = list(ctx.meta.get(ARGV_KEY, sys.argv[1:])) if ctx else sys.argv[1:]
    return shlex.join(["edgedistill", *argv, *([] if "--resume" in argv else ["--resume"])])


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


@contextlib.contextmanager
def _opened(recipe_path: Path, overrides, out: Path, resume: bool, force: bool, new_run: bool = False):
    """Load the recipe, take the run folder's lock, then open the run (nothing is written before the lock)."""
    from edgedistill.folder import RunFolder
    from edgedistill.recipe import load_recipe
    from edgedistill.run import open_run

    recipe = load_recipe(recipe_path, list(overrides))
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the lock for the job
    with RunFolder(Path(out) / recipe.name).lock(take=main_rank):
        yield open_run(recipe, out, resume=resume, force=force, new_run=new_run)


def _stage_command(name: str, help: str):
    @cli.command(name, help=help)
    @RECIPE
    @common
    def command(recipe: Path, overrides, out: Path, resume: bool, force: bool):
        from edgedistill.run import run_stage

        with _opened(recipe, overrides, out, resume, force) as ctx:
            run_stage(ctx, name)
        _raise_gates(ctx)

    return command


def _raise_gates(ctx) -> None:
    """Exit 1 when the validated models failed a gate (after the report is written)."""
    path = ctx.run / "validation.json"
    if ctx.dist.is_main and ctx.run.done("validate") and path.exists():
        from edgedistill.validate import check_gates

        check_gates(json.loads(path.read_text()))


ARGV_KEY = "edgedistill.argv"


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)  # for the resume command printed after an interruption
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgedistill")
def cli():
    """Distill a big image classifier into a small edge model with Energy KD, export it to ONNX and validate it."""


@cli.command()
@RECIPE
@common
def run(recipe: Path, overrides, out: Path, resume: bool, force: bool):
    """Run the whole pipeline: teacher → score → plan → distill → export → validate → report."""
    from edgedistill.run import run_all

    with _opened(recipe, overrides, out, resume, force, new_run=True) as ctx:
        run_all(ctx)
    if ctx.dist.is_main:
        console.print(f"[green]done:[/] {ctx.run.root}")
    _raise_gates(ctx)


_stage_command("teacher", "Load (or train) the teacher and measure its test accuracy.")
_stage_command("score", "Score every training image with the teacher's energy; write energy.npz and plots.")
_stage_command("plan", "Measure the training cost and pick the HE-DA fraction that fits the budget; write plan.json.")
_stage_command("distill", "Distill the student (use --resume to continue from checkpoints/last.pt).")
_stage_command("export", "Export the student to ONNX (fp32, int8, fp16, edge).")


@cli.command()
@RECIPE
@click.option("--onnx", "onnx_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Validate this ONNX file (repeatable) on the recipe's test data instead of the run's exports: accuracy, latency, size.")
@common
def validate(recipe: Path, onnx_files, overrides, out: Path, resume: bool, force: bool):
    """Validate the exported models in ONNX Runtime: parity, accuracy, latency, size."""
    from edgedistill.run import run_stage
    from edgedistill.stages import validate_files

    with _opened(recipe, overrides, out, resume, force) as ctx:
        if onnx_files:
            validate_files(ctx, list(onnx_files))
            return
        run_stage(ctx, "validate")
    _raise_gates(ctx)
_stage_command("report", "Write report.md with tables and plots.")


@cli.command("list")
def list_registered():
    """List the registered data sources, models, losses and augmentations."""
    from rich.table import Table

    from edgedistill.augment import AUGMENTS
    from edgedistill.data import DATA_SOURCES
    from edgedistill.losses import LOSSES
    from edgedistill.models import STUDENTS, TEACHERS

    table = Table(title="edgedistill registries")
    table.add_column("kind")
    table.add_column("names")
    for reg in (DATA_SOURCES, STUDENTS, TEACHERS, LOSSES, AUGMENTS):
        table.add_row(reg.kind, ", ".join(reg.names()))
    console.print(table)


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
