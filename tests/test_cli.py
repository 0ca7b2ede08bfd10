"""The command line itself: commands, help, exit codes, where messages go, a whole tiny run in-process.

Bad inputs, interruption and resume are in test_reliability.py.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY

from edgedistill import __version__
from edgedistill import cli as cli_module
from edgedistill.cli import cli, main
from edgedistill.pipeline.folder import RunFolder

STAGES = ["pick", "teacher", "score", "plan", "distill", "qat", "export", "validate", "baseline", "report"]


pytestmark = pytest.mark.usefixtures("isolated")


def write_recipe(folder: Path, name: str = "tiny", filename: str | None = None, **sections) -> Path:
    raw = copy.deepcopy(TINY)
    raw["name"] = name
    raw.update(sections)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``edgedistill ARGS`` through :func:`edgedistill.cli.main` (what the console script calls)."""
    monkeypatch.setattr(sys, "argv", ["edgedistill", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


# ---------------------------------------------------------------- commands and help


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ["run", "list", "predict", *STAGES]:
        assert f"  {name}" in result.output


def test_every_pipeline_command_takes_the_common_options_and_resume_only_where_it_trains():
    for name in ["run", *STAGES]:
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        for option in ("--set", "--out", "--force", "--debug"):
            assert option in result.output, (name, option)
        assert ("--resume" in result.output) == (name in ("run", "teacher", "distill", "qat", "baseline")), name
        assert "RECIPE|RUN" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_list_shows_the_registries():
    result = invoke("list")
    assert result.exit_code == 0
    for word in ("digits", "imagefolder", "shufflenet_v2_x0_5", "onnx", "energy_kd", "cutmix"):
        assert word in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["bogus"], "No such command 'bogus'"),
        (["run"], "Missing argument 'RECIPE|RUN'"),
        (["run", "x.yaml", "--bogus"], "--bogus"),
        (["run", "x.yaml", "--set"], "requires an argument"),
    ],
)
def test_usage_errors_exit_2_through_main(args, expected, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert expected in err and "Traceback" not in err + out


def test_main_help_exits_0(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "--help")
    assert code == 0 and "Usage" in out


def test_main_maps_a_bad_recipe_to_2(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "plan", tmp_path / "missing.yaml", "--out", tmp_path)
    assert code == 2 and "recipe file not found" in err and out == ""


# ---------------------------------------------------------------- interruption plumbing (in-process)


def test_interrupt_prints_the_exact_quoted_resume_command(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "with space", filename="my recipe.yaml")

    def interrupted(ctx, name):
        raise KeyboardInterrupt

    monkeypatch.setattr("edgedistill.pipeline.run.run_stage", interrupted)
    result = invoke("teacher", recipe, "--out", tmp_path / "runs", "--set", "seed=3")
    assert result.exit_code == 130
    expected = f"resume with: edgedistill teacher '{recipe}' --out {tmp_path / 'runs'} --set seed=3 --resume"
    assert expected in result.output
    assert not (tmp_path / "runs" / "tiny" / ".lock").exists()


def test_sigterm_outside_training_is_an_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with cli_module._sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)  # runs the Python handler before it returns
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- a whole tiny run, in-process


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(base)
    result = invoke("run", recipe, "--out", base / "runs")
    assert result.exit_code == 0, result.output
    assert "done:" in result.output
    assert result.stdout.strip() == "", "stdout stays clean for scripts: messages go to stderr"
    return recipe, base / "runs" / "tiny"


RUN_FOLDER_FILES = [
    "recipe.yaml", "env.json", "teacher.json", "teacher.pt", "teacher.onnx", "teacher_metrics.jsonl", "checkpoints/teacher/last.pt",
    "energy.npz", "energy.json", "energy_hist.png", "energy_gallery.png", "plan.json", "checkpoints/last.pt",
    "checkpoints/best.pt", "metrics.jsonl", "student.pt", "student.onnx", "export.json", "validation.json",
    "report.md", "training.png", *[f"stages/{s}.done" for s in STAGES],
]


def test_run_leaves_the_documented_run_folder(finished):
    recipe, run = finished
    missing = [f for f in RUN_FOLDER_FILES if not (run / f).exists()]
    assert not missing
    assert not (run / ".lock").exists()
    assert not list(run.rglob(".*.tmp")), "no temp files are left behind"
    for marker in (run / "stages").glob("*.done"):
        json.loads(marker.read_text())
    assert yaml.safe_load((run / "recipe.yaml").read_text())["distill"]["epochs"] == 2  # the resolved recipe
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_the_run_records_its_speed_decisions(finished):
    """The teacher's runtime (every CPU candidate measured, the choice faithful to the eager teacher) and the
    student's layout and compilation, as the plan measured them on the CPU."""
    _, run = finished
    runtime = json.loads((run / "teacher.json").read_text())["runtime"]
    measured = {(c["runtime"], c["channels_last"]): c for c in runtime["candidates"]}
    assert set(measured) == {("torch", False), ("torch", True), ("onnxruntime", False)}
    chosen = measured[(runtime["runtime"], runtime["channels_last"])]
    assert chosen["max_abs_diff"] <= runtime["parity_tolerance"]  # (which one is fastest: tests/test_speed.py, on given timings)
    speed = json.loads((run / "plan.json").read_text())["speed"]
    assert set(speed["channels_last"]["ms_per_step"]) == {"nchw", "channels_last"} and isinstance(speed["channels_last"]["use"], bool)
    assert speed["compile"]["use"] is False and "too short" in speed["compile"]["why"]


def test_resume_of_a_finished_run_skips_every_stage(finished, tmp_path):
    recipe, run = finished
    copy_run = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy_run)
    before = (copy_run / "student.pt").read_bytes()
    result = invoke("run", recipe, "--out", tmp_path / "runs", "--resume")
    assert result.exit_code == 0, result.output
    for stage in STAGES:
        assert f"{stage}: already done, skipped" in result.output
    assert (copy_run / "student.pt").read_bytes() == before


def test_a_failed_gate_exits_1(finished, tmp_path):
    recipe, run = finished
    shutil.copytree(run, tmp_path / "runs" / "tiny")
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--set", "validate.atol=1e-30")
    assert result.exit_code == 1, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("failed:") and "fp32" in last
    assert "Traceback" not in result.output


def test_a_stage_takes_a_change_to_its_own_recipe_section_without_force(finished, tmp_path):
    """Validating again with other timing settings is what ``validate`` is for, and it redoes all they change; a
    change to a section the stage does not own still needs --force, even beside one it owns."""
    recipe, run = finished
    copy_run = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy_run)
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--set", "validate.rounds=2", "--set", "distill.epochs=3")
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert result.exit_code == 2 and "recipe differs" in last and "distill.epochs" in last and "validate.rounds" not in last
    result = invoke("report", recipe, "--out", tmp_path / "runs", "--set", "validate.rounds=2")
    assert result.exit_code == 2 and "validate.rounds" in result.output, "report comes after validate: it would report old figures"

    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--set", "validate.rounds=2")
    assert result.exit_code == 0, result.output
    assert "recipe changed (validate.rounds)" in " ".join(result.output.split())
    assert yaml.safe_load((copy_run / "recipe.yaml").read_text())["validate"]["rounds"] == 2
    assert json.loads((copy_run / "validation.json").read_text())["settings"]["rounds"] == 2


@pytest.mark.parametrize("selection, loss", [("high", "energy_kd"), ("all", "energy_kd"), ("high", "ce")])
def test_plan_times_plain_steps_without_extras_and_extra_steps_at_the_runs_r(finished, tmp_path, monkeypatch, selection, loss):
    """The cost model rests on the plain-vs-extra difference; 'all' (which ignores the fraction) once let the
    'plain' steps mix every sample too, and the planner then predicted a small part of the real overhead.
    The no-teacher baseline is neither run through the teacher nor charged for it."""
    from edgedistill.pipeline.context import RunContext
    from edgedistill.pipeline.planning import UNTIMED_BATCHES, measure_cost
    from edgedistill.recipe.schema import load_recipe
    from edgedistill.pipeline.run import open_run

    recipe, run = finished
    shutil.copytree(run, tmp_path / "tiny")
    # the whole augment section: with selection 'all' a fraction would be ignored, and is refused
    augment = f"{{selection: {selection}, profile_steps: 2{', fraction: 0.2' if selection != 'all' else ''}}}"
    overrides = [f"augment={augment}", f"distill.loss={{name: {loss}}}"]
    recipe = load_recipe(recipe, overrides)
    ctx = open_run(recipe, tmp_path / recipe.name, resume=True, force=True)
    sizes: list[int] = []
    build = RunContext.build_student

    def recording(ctx):
        model = build(ctx)
        model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])) if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setattr(RunContext, "build_student", recording)
    teacher_calls = []
    from edgedistill.distill.objectives import DistillObjective

    run_teacher = DistillObjective._teacher  # the teacher in whatever runtime the teacher stage chose

    def counted(objective, x):
        teacher_calls.append(len(x))
        return run_teacher(objective, x)

    monkeypatch.setattr(DistillObjective, "_teacher", counted)
    measure_cost(ctx)
    b = TINY["data"]["batch_size"]
    steps = UNTIMED_BATCHES + 2
    plain, extra = [n for n in sizes if n == b], [n for n in sizes if n != b]  # each step saw every profile batch
    assert len(sizes) == 2 * steps and len(plain) == len(extra) == steps
    # the extras are timed at the run's r: 0.2 of the batch here (energies evenly spread), one per sample for 'all'
    assert extra == [2 * b] * steps if selection == "all" else all(b < n <= b + b // 2 for n in extra), extra
    assert (len(teacher_calls) > 0) == (loss != "ce")


def test_report_rerenders(finished, tmp_path):
    recipe, run = finished
    shutil.copytree(run, tmp_path / "runs" / "tiny")
    (tmp_path / "runs" / "tiny" / "report.md").unlink()
    result = invoke("report", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "tiny" / "report.md").exists()


def test_validate_given_onnx_files(finished, tmp_path):
    recipe, run = finished
    shutil.copytree(run, tmp_path / "runs" / "tiny")
    good = tmp_path / "runs" / "tiny" / "student.onnx"
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a model")
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--onnx", good)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "runs" / "tiny" / "validation.files.json").read_text())
    assert saved["passed"] and saved["variants"]["student.onnx"]["test_top1"] is not None
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--onnx", good, "--onnx", bad)
    last = result.output.splitlines()[-1]
    assert result.exit_code == 2 and "garbage.onnx" in last and "not a loadable ONNX model" in last, "a file that is no model is bad input"
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--onnx", tmp_path / "nope.onnx")
    assert result.exit_code == 2 and "nope.onnx" in result.output

    # other timing settings serve this check alone: the run's recipe.yaml still describes its own validation.json
    before = (tmp_path / "runs" / "tiny" / "recipe.yaml").read_text()
    rounds = yaml.safe_load(before)["validate"]["rounds"] + 1
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--onnx", good, "--set", f"validate.rounds={rounds}")
    assert result.exit_code == 0, result.output
    assert "for this command only" in " ".join(result.output.split())
    assert json.loads((tmp_path / "runs" / "tiny" / "validation.files.json").read_text())["settings"]["rounds"] == rounds
    assert (tmp_path / "runs" / "tiny" / "recipe.yaml").read_text() == before
    result = invoke("validate", recipe, "--out", tmp_path / "runs", "--onnx", good, "--set", "distill.epochs=3")
    assert result.exit_code == 2 and "distill.epochs" in result.output, "only the validate section is this command's to change"


# ---------------------------------------------------------------- scriptability: run folders, prerequisites, history


def test_list_writes_its_table_to_stdout():
    result = invoke("list")
    assert result.exit_code == 0 and "shufflenet_v2_x0_5" in result.stdout and "fp32" in result.stdout


def test_a_stage_command_takes_the_run_folder_and_keeps_the_command_history(finished, tmp_path):
    _, run = finished
    copy_run = tmp_path / "elsewhere" / "renamed"  # the folder is the run, whatever its name
    shutil.copytree(run, copy_run)
    first = json.loads((copy_run / "env.json").read_text())
    result = invoke("report", copy_run)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs").exists() and not Path("runs", "tiny", "report.md").exists()
    env = json.loads((copy_run / "env.json").read_text())
    assert env["command"] == first["command"], "the command that made the run is kept"
    assert [h["command"].split()[1:2] for h in env["history"]][-1] == ["report"]
    assert invoke("report", copy_run, "--out", tmp_path).exit_code == 2, "--out with a run folder is a contradiction"


@pytest.mark.parametrize("stage, missing", [("score", "teacher"), ("distill", "score"), ("export", "distill"), ("validate", "export")])
def test_a_stage_whose_input_is_missing_creates_nothing(stage, missing, tmp_path):
    recipe = write_recipe(tmp_path)
    result = invoke(stage, recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert f"stage '{missing}' has not finished" in last and f"'edgedistill {missing} {recipe}'" in last
    assert not (tmp_path / "runs").exists()


def test_report_on_a_folder_with_nothing_finished_is_refused_and_leaves_no_marker(tmp_path):
    recipe = write_recipe(tmp_path)
    result = invoke("report", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and "nothing to report yet" in result.output
    assert not (tmp_path / "runs").exists()
    # the refused report blocks nothing: the run starts normally afterwards
    assert not RunFolder(tmp_path / "runs" / "tiny").has_work()


def test_a_run_that_fails_on_bad_data_leaves_no_folder(tmp_path):
    recipe = write_recipe(tmp_path, data={"source": "npz", "root": str(tmp_path / "missing.npz")})
    result = invoke("run", recipe, "--out", tmp_path / "out" / "runs")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the budget: plan up front, steer while training


def test_plan_answers_on_a_fresh_folder_without_training_anything(tmp_path):
    recipe = write_recipe(tmp_path, augment={"fraction": "auto", "budget": {"max_minutes": 0.001}, "profile_steps": 1})
    result = invoke("plan", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    plan = json.loads((run / "plan.json").read_text())
    assert not (run / "teacher.json").exists() and not (run / "energy.npz").exists() and not (run / "checkpoints").exists()
    # a thousandth of a minute: nothing fits, not even plain distillation, and the plan says how many epochs would
    assert plan["fraction"] == 0.0 and plan["epochs_that_fit"] == 0 and "0 epochs would fit" in " ".join(result.output.split())


def test_a_what_if_plan_on_a_finished_run_deletes_no_marker(finished, tmp_path):
    _, run = finished
    copy_run = tmp_path / "tiny"
    shutil.copytree(run, copy_run)
    result = invoke("plan", copy_run, "--set", "augment.profile_steps=1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (copy_run / "stages").glob("*.done")) == sorted(f"{s}.done" for s in STAGES)


def test_distill_with_a_budget_steers_r_and_says_what_happened(finished, tmp_path):
    _, run = finished
    copy_run = tmp_path / "tiny"
    shutil.copytree(run, copy_run)
    overrides = ["--set", "augment={fraction: auto, budget: {max_overhead: 0.3, range: [0.1, 0.4]}, profile_steps: 1}", "--force"]
    assert invoke("plan", copy_run, *overrides).exit_code == 0
    result = invoke("distill", copy_run, *overrides)
    assert result.exit_code == 0, result.output
    budget = json.loads((copy_run / "budget.json").read_text())
    rows = [json.loads(line) for line in (copy_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["fraction"] for row in rows] == budget["fractions"] and len(rows) == TINY["distill"]["epochs"]
    # every choice stays in the range or at 0 (an epoch's mean may fall between, when r fell to 0 within it)
    assert all(r == 0.0 or 0.1 <= r <= 0.4 for _, _, r in budget["segments"])
    assert [e for e, step, _ in budget["segments"] if step == 0] == list(range(TINY["distill"]["epochs"]))
    # the verdict is the one the recorded figures call for, in those figures, whatever the machine's speed
    over = budget["spent_seconds"] / budget["allowed_seconds"] - 1
    assert budget["held"] == (over <= 0.05) and budget["overrun"] == pytest.approx(over)
    if budget["held"]:
        assert budget["verdict"].startswith(f"held: spent {budget['spent_seconds']:.0f} s of {budget['allowed_seconds']:.0f} s ({100 * over:+.1f}%)")
    else:
        assert budget["verdict"].startswith(f"overran by {100 * over:.1f}%")
    assert budget["prediction"]["fraction"] == json.loads((copy_run / "plan.json").read_text())["fraction"]
    assert "budget:" in result.output
    assert invoke("report", copy_run).exit_code == 0
    assert "## Budget (distillation)" in (copy_run / "report.md").read_text()


def test_a_fixed_fraction_is_kept_and_reported_as_no_budget(finished):
    _, run = finished
    budget = json.loads((run / "budget.json").read_text())
    assert budget["fractions"] == [TINY["augment"]["fraction"]] * TINY["distill"]["epochs"]
    assert budget["verdict"].startswith("no budget")
