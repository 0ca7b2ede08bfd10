"""Interrupted runs resume exactly: a signal delivered during a chosen training step (no timing, see
interrupt_at.py), in a real process, then the resume; the final weights equal those of an uninterrupted run.

The student is a MobileNetV2 with dropout and HE-DA is on, so a resumed step that drew other random numbers
(dropout masks, CutMix partners, boxes, λ) would show in the weights.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY

from edgedistill.cli import cli

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "240"}

# 64 training images in batches of 8: 8 steps an epoch; the teacher trains 2 epochs, the student 3.
RECIPE = copy.deepcopy(TINY)
RECIPE["data"]["batch_size"] = 8
RECIPE["teacher"]["train"]["epochs"] = 2
RECIPE["student"] = {"arch": "mobilenet_v2", "width": 0.35, "dropout": 0.3}
RECIPE["distill"]["epochs"] = 3
# Batches of 8 for a tiny net under Energy KD's T² scale: lr 0.05 sat on the edge of stability (NaN in epoch 2
# after a fresh install of the same torch). What is tested is that a resume repeats the steps exactly, not learning.
RECIPE["distill"]["optimizer"] = {"lr": 0.01}
RECIPE["augment"] = {"fraction": 0.3, "profile_steps": 1}
# The reference is a separate run: what `auto` would decide by timing (and so differently under another load) is fixed.
RECIPE["teacher"]["runtime"] = "torch"
RECIPE["distill"].update(channels_last=False, compile=False)
# Export parity is not what these tests check: a student's logits of O(10) may differ from ONNX Runtime's by 1e-4.
RECIPE["validate"] = {**RECIPE["validate"], "atol": 1e-3}
STEPS_PER_EPOCH = 8

pytestmark = pytest.mark.usefixtures("isolated")


def write_recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return folder / "tiny.yaml"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def interrupted(sig: str, label: str, step: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # SIGINT at its default in the child whatever this worker process inherited: a child started with SIGINT ignored
    # (as a shell starts background jobs) keeps ignoring it outside training, and export and validation finish
    return subprocess.run([sys.executable, str(HERE / "interrupt_at.py"), sig, label, str(step), *args],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def edgedistill(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def metrics_epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the distill stage (default suite)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder with the recipe and ``runs/tiny`` after teacher, score and plan."""
    base = tmp_path_factory.mktemp("prepared")
    recipe = write_recipe(base)
    for stage in ("teacher", "score", "plan"):
        result = invoke(stage, recipe, "--out", base / "runs")
        assert result.exit_code == 0, result.output
    return base


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("reference") / "w"
    shutil.copytree(prepared, work)
    proc = edgedistill(["distill", "tiny.yaml", "--out", "runs"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return student(work / "runs" / "tiny")


def test_sigint_mid_epoch_saves_exits_130_and_the_printed_command_resumes_bit_exactly(prepared, reference, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(prepared, work)
    run, args = work / "runs" / "tiny", ["distill", "tiny.yaml", "--out", "runs"]
    proc = interrupted("INT", "distill", STEPS_PER_EPOCH + 5, args, cwd=work)  # epoch 2, step 5 of 8
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SIGINT: finishing this step" in proc.stderr
    command = shlex.join(["edgedistill", *args, "--resume"])
    assert f"resume with: {command}" in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 5)
    assert not (run / "stages" / "distill.done").exists() and not (run / ".lock").exists()
    resumed = edgedistill(shlex.split(command)[1:], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2, step 5" in resumed.stderr
    assert_same_weights(student(run), reference)
    assert metrics_epochs(run / "metrics.jsonl") == [1, 2, 3]


def test_sigkill_mid_step_loses_at_most_the_epoch_and_resumes_bit_exactly(prepared, reference, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(prepared, work)
    run, args = work / "runs" / "tiny", ["distill", "tiny.yaml", "--out", "runs"]
    proc = interrupted("KILL", "distill", 2 * STEPS_PER_EPOCH + 3, args, cwd=work)  # epoch 3, step 3
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # complete: written atomically
    assert (ckpt["epoch"], ckpt["step"]) == (2, 0)
    assert metrics_epochs(run / "metrics.jsonl") == [1, 2]
    assert not list(run.rglob(".*.tmp"))
    resumed = edgedistill([*args, "--resume"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(student(run), reference)
    assert metrics_epochs(run / "metrics.jsonl") == [1, 2, 3]


# Windows between the steps, where a user's Ctrl-C lands as often as in one: the precise-BN pass and the evaluation
# after an epoch, the checkpoint write, the start of an epoch (its loader), and, outside training, export and
# validation. (call, which call in this process, where the resume must start: (epoch, step) of last.pt)
WINDOWS = [
    ("edgedistill.distill.train.recalibrate", 2, (2, 0)),
    ("edgedistill.distill.train.class_tally", 1, (1, 0)),
    ("edgedistill.distill.run_state.Checkpoints.save", 2, (2, 0)),
    ("edgedistill.distill.train.EpochSampler.set_epoch", 2, (1, 1)),  # the start of the 2nd epoch
    ("edgedistill.pipeline.deploy_stages.export_all", 1, (3, 0)),
    ("edgedistill.pipeline.deploy_stages.validate_export", 1, (3, 0)),
]


@pytest.mark.parametrize("call, n, resumes_at", WINDOWS, ids=[w[0].rsplit(".", 1)[-1] for w in WINDOWS])
def test_sigint_between_steps_resumes_bit_exactly(call, n, resumes_at, prepared, reference, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(prepared, work)
    run, args = work / "runs" / "tiny", ["run", "tiny.yaml", "--out", "runs", "--resume"]
    proc = interrupted("INT", call, n, args, cwd=work)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resume with: edgedistill run tiny.yaml --out runs --resume" in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == resumes_at
    resumed = edgedistill(args, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(student(run), reference)
    assert metrics_epochs(run / "metrics.jsonl") == [1, 2, 3]


# ---------------------------------------------------------------- the whole pipeline, ten steps, two signals (slow)

# (stage, step counted from the start of that stage's training): teacher mid-epoch and at its very end, the
# student's first step, mid-epoch, at and just after an epoch's end, and its last step.
POINTS = [("teacher", 3), ("teacher", 8), ("teacher", 16), ("distill", 1), ("distill", 4), ("distill", 8),
          ("distill", 9), ("distill", 13), ("distill", 20), ("distill", 24)]


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("pipeline")
    write_recipe(work)
    proc = edgedistill(["run", "tiny.yaml", "--out", "runs"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return student(work / "runs" / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["INT", "KILL"])
@pytest.mark.parametrize("label, step", POINTS, ids=[f"{label}-{step}" for label, step in POINTS])
def test_a_run_interrupted_at_any_step_resumes_to_the_same_weights(sig, label, step, pipeline_reference, tmp_path):
    write_recipe(tmp_path)
    args = ["run", "tiny.yaml", "--out", "runs"]
    proc = interrupted(sig, label, step, args, cwd=tmp_path)
    assert proc.returncode == (130 if sig == "INT" else -signal.SIGKILL), proc.stderr[-3000:]
    resumed = edgedistill([*args, "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(student(tmp_path / "runs" / "tiny"), pipeline_reference)
