"""No silent failure: a teacher or a file at chance level stops the run or fails a gate, energy groups that cannot be
told apart are reported, and the files of a run picked for a device target meet it or fail naming the figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_cli import invoke, write_recipe
from test_export_validate import SIZE, TINY_META, VCFG, images, summary_of, tiny_model, torch_out
from test_recommend import VARIANTS

from edgedistill.base.chance import GAP_SHARE, SIGMAS, chance_bar
from edgedistill.deploy.promises import target_check
from edgedistill.deploy.recommend import recommend
from edgedistill.deploy.targets import export_all
from edgedistill.data.loading import ArrayImages
from edgedistill.deploy.validate import validate_export
from edgedistill.distill.energy import GROUP_GAP, assign_groups, groups_apart
from edgedistill.recipe.deploy import DeviceTarget, ExportConfig

pytestmark = pytest.mark.usefixtures("isolated")


# ---------------------------------------------------------------- the chance level (pure)


def test_the_chance_level_is_the_majority_share_and_the_bar_the_larger_margin():
    balanced = np.arange(400) % 10
    c = chance_bar(balanced, 10)
    assert c.guess == 10.0 and c.images == 400 and c.classes == 10
    p = 0.1
    assert c.bar == round(100 * max(p + SIGMAS * math.sqrt(p * (1 - p) / 400), p + GAP_SHARE * (1 - p)), 2)
    # unbalanced: always answering the big class scores far more than 1/classes
    skewed = np.array([0] * 70 + list(range(1, 31)))
    s = chance_bar(skewed, 31)
    assert s.guess == 70.0 and s.bar > 70.0 and not s.clears(70.0) and s.clears(s.bar)
    # few images: the noise of the guess sets the bar (three standard errors), not the gap share
    few = chance_bar(np.arange(20) % 2, 2)
    assert few.bar == round(100 * (0.5 + SIGMAS * math.sqrt(0.25 / 20)), 2)
    assert "at chance level" in c.why(9.5) and "10.00%" in c.why(9.5) and f"{c.bar:.2f}%" in c.why(9.5)


def test_energy_groups_apart_only_when_their_medians_differ_by_a_tenth_of_t():
    uniform = np.full(100, -math.log(100)) + np.random.default_rng(0).normal(0, 1e-4, 100)
    groups, _, _ = assign_groups(uniform, 0.2)
    assert not groups_apart(uniform, groups, temperature=1.0)
    spread_out = np.linspace(-12.0, -2.0, 100)
    groups, _, _ = assign_groups(spread_out, 0.2)
    assert groups_apart(spread_out, groups, temperature=1.0)
    # the gap is in units of T: the same energies are too close at a high temperature
    assert not groups_apart(spread_out, groups, temperature=(10.0 * 0.8) / GROUP_GAP + 1)
    none, _, _ = assign_groups(uniform, 0.0)
    assert groups_apart(uniform, none, temperature=1.0), "no extreme groups: nothing to tell apart"


# ---------------------------------------------------------------- the teacher and the score stage, through the CLI


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A randomly initialised torchvision teacher file: the one a user gets by saving the wrong state_dict."""
    from edgedistill.models.students import build_classifier

    path = tmp_path_factory.mktemp("teacher") / "random_resnet18.pt"
    torch.manual_seed(0)
    torch.save(build_classifier("resnet18", 10, image_size=8).state_dict(), path)
    return path


def test_a_teacher_at_chance_stops_with_exit_2_naming_the_figures_and_the_key(tmp_path, random_teacher):
    recipe = write_recipe(tmp_path, teacher={"source": "torchvision", "arch": "resnet18", "path": str(random_teacher)})
    result = invoke("teacher", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: teacher: test top-1 ") and "is at chance level: always answering the most frequent class" in line
    assert "32 test images (10 classes)" in line and "set teacher.allow_weak: true to go on" in line
    assert not (tmp_path / "runs" / "tiny" / "teacher.json").exists()

    result = invoke("teacher", recipe, "--out", tmp_path / "runs", "--set", "teacher.allow_weak=true")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "runs" / "tiny" / "teacher.json").read_text())
    assert info["chance"]["images"] == 32 and info["chance"]["classes"] == 10
    assert info["chance"]["guess"] < info["chance"]["bar"] and info["test_top1"] < info["chance"]["bar"]


class Constant(torch.nn.Module):
    """A teacher that learnt nothing: the same logits for every image, so every energy is the same."""

    def forward(self, x):
        return torch.zeros(x.shape[0], 10) + torch.arange(10.0) * 1e-3


def test_degenerate_energies_are_reported_by_the_score_stage(tmp_path, caplog):
    path = tmp_path / "constant.pt"
    torch.jit.script(Constant()).save(str(path))
    recipe = write_recipe(tmp_path, teacher={"source": "torchscript", "path": str(path), "allow_weak": True})
    assert invoke("teacher", recipe, "--out", tmp_path / "runs").exit_code == 0
    result = invoke("score", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "the low- and high-energy groups cannot be told apart" in result.output
    assert json.loads((tmp_path / "runs" / "tiny" / "energy.json").read_text())["groups_apart"] is False


# ---------------------------------------------------------------- files at chance level, files against the target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model's fp32 and int8 files, and test images it classifies confidently."""
    out = tmp_path_factory.mktemp("exported")
    model = tiny_model()
    cfg = ExportConfig(formats=["fp32", "int8"], int8={"calibration": {"samples": 16}})
    summary = export_all(model, out, cfg, image_size=SIZE, calibration_images=images(16, seed=7), metadata=TINY_META)
    x = images(64, seed=21)
    return model, out, summary, x, torch_out(model, x).argmax(1).astype(np.int64)


def test_a_file_at_chance_fails_its_gate_unless_weak_models_are_allowed(exported):
    model, out, summary, x, pred = exported
    wrong = (pred + 1) % 5  # labels the model never gets right: 0 % top-1
    res = validate_export(model, out, summary_of(fp32="student.onnx"), ArrayImages(x, wrong), VCFG)
    row = res["variants"]["fp32"]
    assert not row["passed"] and any("is at chance level" in f and "validate.allow_weak" in f for f in row["failures"])
    assert res["chance"] == chance_bar(wrong, 5).to_dict()
    assert res["recommendations"][0]["variant"] is None, "a file that failed a gate is never recommended"
    weak = validate_export(model, out, summary_of(fp32="student.onnx"), ArrayImages(x, wrong), VCFG.model_copy(update={"allow_weak": True}))
    assert weak["variants"]["fp32"]["passed"]
    right = validate_export(model, out, summary_of(fp32="student.onnx"), ArrayImages(x, pred), VCFG)
    assert right["variants"]["fp32"]["passed"], right["variants"]["fp32"]["failures"]


def test_files_of_the_targets_precision_meet_it_or_fail_naming_the_file_and_the_figure(exported):
    model, out, summary, x, pred = exported
    int8_mb = summary["variants"]["int8"]["size_bytes"] / 1e6
    over = DeviceTarget(max_size_mb=round(int8_mb * 0.9, 4), precision="int8")
    res = validate_export(model, out, summary, ArrayImages(x, pred), VCFG, device_target=over)
    int8, fp32 = res["variants"]["int8"], res["variants"]["fp32"]
    assert not int8["passed"] and f"student.int8.onnx is {int8_mb:.3f} MB, over student.target.max_size_mb {over.max_size_mb:g}" in int8["failures"]
    assert fp32["passed"] and fp32["target"] == {"meets": False, "failures": [],
                                                 "why": "student.onnx is fp32; student.target.precision is int8"}
    assert res["target"] == over.model_dump()
    for rec in res["recommendations"]:  # the fp32 file passed, but it is not what the target asked for
        assert rec["variant"] is None and "nothing to ship that meets student.target (int8, ≤ " in rec["line"]
        assert "student.onnx is fp32" in rec["line"]

    fits = DeviceTarget(max_size_mb=round(int8_mb * 1.1, 4), precision="int8")
    res = validate_export(model, out, summary, ArrayImages(x, pred), VCFG, device_target=fits)
    assert res["variants"]["int8"]["passed"] and res["variants"]["int8"]["target"]["meets"]
    assert {rec["variant"] for rec in res["recommendations"]} == {"int8"}


def test_latency_is_held_to_the_target_only_when_validation_timed_it_the_targets_way():
    row = {"path": "student.onnx", "precision": "fp32", "size_bytes": 1_000_000, "latency_ms_p50": 2.5}
    slow = target_check(row, DeviceTarget(max_latency_ms=2.0), threads=1)
    assert slow["failures"] == ["student.onnx takes 2.5 ms per image at batch 1 (median), over student.target.max_latency_ms 2"]
    assert target_check(row, DeviceTarget(max_latency_ms=3.0), threads=1)["meets"]
    other = target_check(row, DeviceTarget(max_latency_ms=2.0, threads=4), threads=1)
    assert other["meets"] and "latency not checked" in other["why"] and "set validate.threads: 4" in other["why"]


def test_recommendations_without_a_target_are_unchanged():
    assert recommend(VARIANTS, note=lambda n: "") == recommend(VARIANTS, note=lambda n: "", target=None)
