"""Quantisation-aware distillation (the qat stage, export.int8.method): the fake-quantised student, what a step changes,
the schedule, the stage's decisions, the int8 files made from it, and an exact resume inside it."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY
from test_resume import assert_same_weights, edgedistill, interrupted

from edgedistill.cli import cli
from edgedistill.deploy.targets import not_installed, qat_target, qat_weight_grid
from edgedistill.distill.qat import FakeQuantStudent, QatSchedule, quantizer
from edgedistill.models.students import build_student, zoo
from edgedistill.recipe.schema import validate_recipe

pytest.importorskip("torchao", reason="QAT needs torchao (pip install 'edgedistill[qat]')")
pytestmark = pytest.mark.usefixtures("isolated")

SIZE = 16
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm students need the timm extra")


def student(arch: str = "mobilenet_v3_small") -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_student(arch, 10, image_size=SIZE, width=0.5 if arch == "mobilenet_v3_small" else 1.0, small_input=True,
                        mean=(0.5,) * 3, std=(0.25,) * 3)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # BN statistics of the images it will see (not 0/1), so that folding them has something to get right
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for seed in range(4):
            net(images(32, seed=100 + seed))
    for m in bns:
        m.momentum = 0.1
    return net.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def observer_state(fake: FakeQuantStudent) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fake.graph.state_dict().items() if k.startswith("activation_post_process")
            and k.rsplit(".", 1)[-1] in ("scale", "zero_point", "min_val", "max_val")}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# timm's students: its BatchNormAct2d layers and their own eps go through the same rewrite; a BatchNorm weight of 0
# (RepViT starts its residual branches so): the rewrite divides by it
@pytest.mark.parametrize("arch, zero_bn", [("mobilenet_v3_small", False), ("mobilenet_v3_small", True),
                                           pytest.param("timm/lcnet_050", False, marks=needs_timm)],
                         ids=["mobilenet_v3_small", "a-bn-weight-of-0", "timm-lcnet_050"])
def test_the_float_state_is_the_students_own_and_without_fake_quantisation_it_computes_the_same(arch, zero_bn):
    from torchao.quantization.pt2e import disable_fake_quant

    net = student(arch)
    nudged = None
    if zero_bn:
        nudged, bn = [(f"{name}.weight", m) for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)][3]
        with torch.no_grad():
            bn.weight[: len(bn.weight) // 2] = 0
    fake = FakeQuantStudent(copy.deepcopy(net), (SIZE, SIZE), quantizer(True))
    state = fake.float_state()
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items() if k != nudged)
    if zero_bn:  # the zeros, and only they, moved off 0
        want = net.state_dict()[nudged]
        torch.testing.assert_close(state[nudged], torch.where(want == 0, 1e-6, want), atol=0, rtol=0)
    fake.graph.apply(disable_fake_quant)
    x = images(8)
    with torch.no_grad():
        want, got = net(x), fake.eval()(x)
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", zoo())  # timm's curated students too, with the timm extra
def test_every_student_trains_with_fake_quantisation(arch):
    """Every registered student traces, computes its own logits with fake quantisation off, and takes a finite QAT
    step with it on (minutes: -m slow)."""
    from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant

    net = build_student(arch, 10, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    fake = FakeQuantStudent(copy.deepcopy(net), (32, 32), quantizer(True))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fake.graph.apply(disable_fake_quant)
    with torch.no_grad():
        want, got = net(x), fake.eval()(x)
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=0)
    fake.graph.apply(enable_fake_quant)
    fake.calibrate(x.numpy())
    loss = torch.nn.functional.cross_entropy(fake.train()(x), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in fake.parameters() if p.grad is not None)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_a_qat_step_changes_only_what_it_should(per_channel):
    """Before the freezes a step moves the weights, BN's statistics and the observed ranges; after them, the weights alone."""
    fake = FakeQuantStudent(student(), (SIZE, SIZE), quantizer(per_channel))
    fake.calibrate(images(32, seed=1).numpy())
    keys = fake.float_state().keys()
    weights = {k for k in keys if "running" not in k and "num_batches" not in k and k not in ("mean", "std")}
    stats = {k for k in keys if "running" in k}
    optimizer = torch.optim.SGD(fake.parameters(), lr=1e-3)
    schedule = QatSchedule(fake, freeze_bn_after=1, freeze_observers_after=2)

    def step(epoch: int, seed: int) -> tuple[set[str], set[str]]:
        fake.train()
        schedule.begin_epoch(epoch)
        before, ranges = fake.float_state(), observer_state(fake)
        loss = torch.nn.functional.cross_entropy(fake(images(16, seed)), torch.arange(16) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return changed(before, fake.float_state()), changed(ranges, observer_state(fake))

    def most(moved: set[str]) -> bool:  # (an untrained net on random images quantises some layer's input to 0: no gradient there)
        return len(moved & weights) > 0.8 * len(weights)

    moved, ranges = step(0, seed=2)
    assert most(moved) and stats <= moved and ranges  # nothing frozen yet
    assert {"mean", "std"}.isdisjoint(moved)  # the student's normalisation is a constant
    moved, ranges = step(1, seed=3)
    assert fake.bn_frozen and most(moved) and not moved & stats and ranges
    moved, ranges = step(2, seed=4)
    assert most(moved) and not moved & stats and not ranges
    assert schedule.end_epoch(2) == {"bn_frozen": True, "observers_frozen": True}
    fake.eval()
    fake.train()  # switching modes does not undo the freeze
    before = fake.float_state()
    fake(images(16, seed=5))
    assert not changed(before, fake.float_state()) & stats


def run_quantizer(formats: list[str], per_channel: bool):
    """The QAT quantizer a run with ``formats`` trains against (as ``RunContext.fake_quant_student`` builds it)."""
    target = qat_target(formats)
    return quantizer(per_channel, qat_weight_grid(formats), None if target is None else target.quantizer(per_channel, qat=True))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("formats, grid", [(["fp32", "int8"], (-64, 64)), (["fp32", "int8", "executorch_int8"], (-64, 64)),
                                           (["executorch_int8", "fp32"], (-127, 127))],
                         ids=["onnx-only", "with-onnx-int8", "pt2e-only"])
def test_qat_rounds_weights_to_the_coarsest_grid_among_the_runs_int8_targets(formats, grid, per_channel):
    """ONNX Runtime's files use 7 of the 8 bits: with its target in the run, QAT trains against 129 levels, else 255."""
    if not_installed(formats):
        pytest.skip(f"{formats}: an extra is not installed")
    assert qat_weight_grid(formats) == grid and qat_weight_grid(["fp32", "fp16"]) is None
    fake = FakeQuantStudent(student(), (SIZE, SIZE), run_quantizer(formats, per_channel))
    fake.calibrate(images(32, seed=1).numpy())
    seen = []
    for rounder in fake.graph.modules():  # the weights' fake quantisers: the symmetric ones
        if getattr(rounder, "qscheme", None) in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
            rounder.register_forward_hook(lambda m, args, out: seen.append((m.scale.detach(), out.detach())))
    fake.eval()(images(2))
    assert seen
    for scale, rounded in seen:
        levels = rounded / scale.reshape(-1, *[1] * (rounded.dim() - 1))
        assert torch.allclose(levels, levels.round(), atol=1e-3)  # on the grid
        assert levels.round().abs().amax().item() == grid[1]  # and the largest weight on the grid's edge


@pytest.mark.skipif(bool(not_installed(["executorch_int8"])), reason="executorch_int8: its extra is not installed")
def test_qat_simulates_the_quantisation_points_of_the_executorch_file_when_it_is_shipped_first():
    """With ExecuTorch's int8 file first among the run's int8 targets, QAT trains against its XNNPACKQuantizer: its
    activation quantisers sit where that file has its own (torchao's x86 scheme, which QAT uses for ONNX Runtime's
    file, places fewer: on MobileNetV3-small 65 of XNNPACK's 109), so the ranges and weights QAT settles on are the
    ones the file rounds. (LiteRT's quantizer has no working QAT mode under torch 2.14.)"""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    formats = ["fp32", "executorch_int8", "int8"]
    target = qat_target(formats)
    assert target.name == "executorch_int8"
    assert qat_target(["fp32", "int8", "executorch_int8"]) is None and qat_target(["litert_int8", "executorch_int8"]) is None

    def activation_points(graph) -> int:  # quantisers of activations (asymmetric; weights' are symmetric), not their observers
        return sum(getattr(m, "qscheme", None) == torch.per_tensor_affine for m in graph.children())

    net = student().eval()
    fake = FakeQuantStudent(copy.deepcopy(net), (SIZE, SIZE), run_quantizer(formats, True))
    traced = torch.export.export(copy.deepcopy(net), (images(2),)).module()
    observed = prepare_pt2e(traced, target.quantizer(True))
    x86 = FakeQuantStudent(copy.deepcopy(net), (SIZE, SIZE), quantizer(True))
    assert activation_points(fake.graph) == activation_points(observed) > activation_points(x86.graph)


# ---------------------------------------------------------------- the recipe


@pytest.mark.parametrize("int8, formats, message", [
    ({"qat": {"epochs": 2}}, ["fp32", "int8"], "export.int8.qat: would be ignored: method is ptq"),
    ({"method": "qat", "qat": {"epochs": 2, "freeze_observers_after": 3}}, ["fp32", "int8"], "freeze_observers_after: 3 is beyond epochs=2"),
    ({"method": "sometimes"}, ["fp32", "int8"], "export.int8.method"),
    ({"method": "auto"}, ["fp32", "fp16"], "int8.method: auto trains for int8 files, and formats has none: add one of"),
])
def test_qat_settings_are_checked_when_the_recipe_loads(int8, formats, message):
    raw = copy.deepcopy(TINY)
    raw["export"] = {"formats": formats, "int8": int8}
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        validate_recipe(raw)


# ---------------------------------------------------------------- the stage

RECIPE = copy.deepcopy(TINY)
RECIPE["data"]["batch_size"] = 8  # 8 steps an epoch
RECIPE["teacher"]["runtime"] = "torch"
RECIPE["distill"].update(channels_last=False, compile=False)
# every int8 target this environment can build (the LiteRT one is tested in its own environment: docs/deploy.md)
INT8_TARGETS = ["int8", *(["executorch_int8"] if importlib.util.find_spec("executorch") else [])]
RECIPE["export"] = {"formats": ["fp32", *INT8_TARGETS], "int8": {"method": "qat", "qat": {"epochs": 2, "freeze_bn_after": 1, "freeze_observers_after": 1},
                                                          "held_out": 32, "calibration": {"samples": 16}}}
RECIPE["validate"] = {**RECIPE["validate"], "atol": 1e-3, "max_int8_drop": 100.0}
QAT_STEPS = 8


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(folder: Path, recipe: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "tiny.yaml"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """A folder with the recipe and ``runs/tiny`` distilled."""
    base = tmp_path_factory.mktemp("distilled")
    recipe = write(base, RECIPE)
    for stage in ("teacher", "score", "plan", "distill"):
        result = invoke(stage, recipe, "--out", base / "runs")
        assert result.exit_code == 0, result.output
    return base


@pytest.fixture(scope="module")
def qat_run(distilled, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("qat") / "w"
    shutil.copytree(distilled, work)
    proc = edgedistill(["run", "tiny.yaml", "--out", "runs", "--resume"], cwd=work)  # a process, as the interrupted one
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "tiny"


def test_method_qat_trains_and_every_int8_file_is_made_from_the_qat_student(qat_run):
    info = json.loads((qat_run / "qat.json").read_text())
    assert info["trained"] and info["reason"] == "export.int8.method: qat" and info["epochs"] == 2
    assert info["weight_grid"] == [-64, 64]  # ONNX Runtime's 7-bit weights: the coarsest of INT8_TARGETS
    plan = json.loads((qat_run / "plan.json").read_text())["qat"]  # what the budget reserves for it
    assert plan["epochs"] == 2 and plan["step_ratio"] > 0 and info["predicted_seconds"] == pytest.approx(60 * plan["predicted_minutes"])
    assert info["held_out_images"] == 32 and {"changed", "top1", "sqnr_db"} <= info["ptq"].keys() <= info["qat"].keys()
    rows = [json.loads(line) for line in (qat_run / "qat_metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"], r["bn_frozen"], r["observers_frozen"]) for r in rows] == [(1, "qat", False, False), (2, "qat", True, True)]
    distilled = torch.load(qat_run / "student.pt", weights_only=True)["model"]
    qat = torch.load(qat_run / "student.qat.pt", weights_only=True)["model"]
    assert qat.keys() == distilled.keys() and any(not torch.equal(qat[k], distilled[k]) for k in qat)
    export = json.loads((qat_run / "export.json").read_text())
    assert all(export["variants"][name]["qat"] is True for name in INT8_TARGETS) and "qat" not in export["variants"]["fp32"]
    validation = json.loads((qat_run / "validation.json").read_text())
    assert all(validation["variants"][name]["qat"] is True for name in INT8_TARGETS)  # (what to ship then says so: tests/test_recommend.py)


@pytest.mark.parametrize("limit, trains", [(100.0, False), (0.0, True)], ids=["ptq-fits", "ptq-misses"])
def test_method_auto_trains_only_when_post_training_int8_misses_the_limit(distilled, tmp_path, limit, trains):
    recipe = copy.deepcopy(RECIPE)
    recipe["export"]["int8"]["method"] = "auto"
    recipe["validate"]["max_int8_drop"] = limit
    work = tmp_path / "w"
    shutil.copytree(distilled, work)
    write(work, recipe)
    result = invoke("qat", work / "tiny.yaml", "--out", work / "runs")
    assert result.exit_code == 0, result.output
    run = work / "runs" / "tiny"
    info = json.loads((run / "qat.json").read_text())
    assert info["trained"] is trains and (run / "student.qat.pt").exists() is trains
    if trains:
        assert info["ptq"]["changed"] > 0 and "over validate.max_int8_drop 0" in info["reason"]
    else:
        assert "within validate.max_int8_drop 100" in info["reason"] and "qat: not needed" in result.output


def test_method_ptq_makes_nothing(distilled, tmp_path):
    recipe = copy.deepcopy(RECIPE)
    recipe["export"]["int8"] = {"held_out": 32, "calibration": {"samples": 16}}
    work = tmp_path / "w"
    shutil.copytree(distilled, work)
    write(work, recipe)
    result = invoke("qat", work / "tiny.yaml", "--out", work / "runs")
    assert result.exit_code == 0 and "int8 is post-training" in result.output
    assert not (work / "runs" / "tiny" / "qat.json").exists()


def test_an_interrupted_qat_stage_resumes_to_the_same_weights(distilled, qat_run, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(distilled, work)
    args = ["qat", "tiny.yaml", "--out", "runs"]
    proc = interrupted("INT", "qat", QAT_STEPS + 3, args, cwd=work)  # epoch 2 (BN and observers frozen), step 3
    assert proc.returncode == 130, proc.stderr[-3000:]
    run = work / "runs" / "tiny"
    ckpt = torch.load(run / "checkpoints" / "qat" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)
    resumed = edgedistill([*args, "--resume"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 2, step 3" in resumed.stderr
    assert_same_weights(torch.load(run / "student.qat.pt", weights_only=True)["model"],
                        torch.load(qat_run / "student.qat.pt", weights_only=True)["model"])
