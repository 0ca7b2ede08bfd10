"""The phone-runtime targets: ExecuTorch (``executorch``, ``executorch_int8``) and LiteRT (``litert``, ``litert_int8``).

Each runtime's tests are skipped, with the reason, when its extra is not installed. CI installs the executorch extra;
the litert extra cannot share an environment with it (see docs/deploy.md), so its tests run in a venv of their own:

    python -m venv --system-site-packages /work/venvs/litert
    /work/venvs/litert/bin/pip install -e '.[test,litert]'
    /work/venvs/litert/bin/python -m pytest -q tests/test_targets_runtimes.py

(``tests/test_export_validate.py`` also builds, runs and gates every installed target on the tiny model.)
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from test_export_validate import SIZE, TINY_META, VCFG, _render, confident_test_set, images, tiny_model, torch_out
from torch import nn

from edgedistill.base.errors import GateFailed, InputError, RecipeError
from edgedistill.recipe.schema import ExportConfig, validate_recipe
from edgedistill.pipeline.report import _validation_section
from edgedistill.deploy.targets import TARGETS, export_all, not_installed
from edgedistill.data.loading import ArrayImages
from edgedistill.deploy.validate import check_gates, validate_export
from edgedistill.deploy.validate_view import validation_table

# extra → (module that proves it is installed, its fp32 target, its int8 target, module with read_metadata)
RUNTIMES = {
    "executorch": ("executorch.runtime", "executorch", "executorch_int8", "edgedistill.deploy.targets.executorch"),
    "litert": ("ai_edge_litert.interpreter", "litert", "litert_int8", "edgedistill.deploy.targets.litert"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(RUNTIMES))
def built(request, tmp_path_factory):
    """The tiny model exported to the runtime's fp32 and int8 files, as the pipeline does."""
    module, fp32, int8, meta_module = RUNTIMES[request.param]
    pytest.importorskip(module, reason=f"the '{request.param}' extra is not installed: pip install -e '.[{request.param}]'")
    out = tmp_path_factory.mktemp(request.param)
    model = tiny_model()
    cfg = ExportConfig(formats=[fp32, int8], int8={"calibration": {"samples": 16}})
    summary = export_all(model, out, cfg, image_size=SIZE, calibration_images=images(16, seed=7), metadata=TINY_META)
    read_metadata = __import__(meta_module, fromlist=["read_metadata"]).read_metadata
    return {"extra": request.param, "fp32": fp32, "int8": int8, "model": model, "dir": out, "summary": summary,
            "read_metadata": read_metadata}


def test_files_carry_the_metadata_in_the_runtime(built):
    out, summary = built["dir"], built["summary"]
    assert json.loads((out / "export.json").read_text())["variants"] == json.loads(json.dumps(summary["variants"]))
    for name in (built["fp32"], built["int8"]):
        info = summary["variants"][name]
        assert info["batch"] == 1 and info["size_bytes"] == (out / info["path"]).stat().st_size > 0
        meta = built["read_metadata"](out / info["path"])
        assert json.loads(meta["class_names"]) == [f"c{i}" for i in range(5)] and meta["num_classes"] == "5"
        assert json.loads(meta["input_size"]) == [3, SIZE, SIZE] and meta["batch"] == "1"
        assert json.loads(meta["preprocessing"]) == json.loads(TINY_META["preprocessing"])
        assert meta["recipe_digest"] == "tiny" and meta["normalization"] == TINY_META["normalization"]
        assert ("quantization" in meta) == (name == built["int8"])
    assert json.loads(built["read_metadata"](out / summary["variants"][built["int8"]]["path"])["quantization"])[
        "calibration_samples"] == 16
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert list(summary["versions"]) == ["edgedistill", *dict.fromkeys(
        p for n in (built["fp32"], built["int8"]) for p in TARGETS.get(n).packages)]


def test_runners_match_pytorch_and_validation_reports_them(built):
    model, out, summary = built["model"], built["dir"], built["summary"]
    fp32, int8 = TARGETS.get(built["fp32"]), TARGETS.get(built["int8"])
    x, y = confident_test_set(model, margin=2 * int8.tolerance(VCFG) + 1e-3)
    for target in (fp32, int8):
        runner = target.open(out / target.files[0], 1)
        assert runner.incompatible(x.shape[1:]) is None
        assert "test images are [3, 16, 16]" in runner.incompatible((3, 16, 16))
        got = runner.run(x, batch=8)
        assert got.shape == (len(x), 5) and got.dtype == np.float32
        np.testing.assert_allclose(got, torch_out(model, x), atol=target.tolerance(VCFG), rtol=0)
        assert (got.argmax(1) == y).all()

    res = validate_export(model, out, summary, ArrayImages(x, y), VCFG)
    assert res["passed"], res
    for name in (built["fp32"], built["int8"]):
        r = res["variants"][name]
        assert r["passed"] and r["test_top1"] == 100.0 and r["delta_top1"] == 0.0 and r["size_bytes"] > 0
        assert r["latency_ms_p50"] > 0 and r["images_per_second"] > 0
    assert res["variants"][built["fp32"]]["max_abs_diff"] <= VCFG.atol
    md = "\n".join(_validation_section(res, summary))
    text = _render(validation_table(res))
    for name in (built["fp32"], built["int8"]):
        assert f"| {name} | `{TARGETS.get(name).files[0]}` |" in md and name in text


def test_a_different_model_fails_both_gates(built):
    model, out, summary = built["model"], built["dir"], built["summary"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        last = [m for m in other.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.copy_(torch.roll(last.weight, 1, dims=0))  # the logits of the files, one class over
        last.bias.copy_(torch.roll(last.bias, 1, dims=0))
    x, _ = confident_test_set(model, margin=0.1)
    y = torch_out(other, x).argmax(1)  # PyTorch (the other model) is right on every image, the files on none
    res = validate_export(other, out, summary, ArrayImages(x, y), VCFG)
    fp32, int8 = res["variants"][built["fp32"]], res["variants"][built["int8"]]
    assert not fp32["passed"] and fp32["max_abs_diff"] > VCFG.atol and "max_abs_diff" in fp32["failures"][0]
    assert not int8["passed"] and int8["delta_top1"] == -100.0
    drop, chance = int8["failures"]  # right on no image: below chance too
    assert drop == f"top-1 drop 100.00 points > max_int8_drop {VCFG.max_int8_drop}" and "top-1 0.00% is at chance level" in chance
    with pytest.raises(GateFailed) as e:
        check_gates(res)
    assert e.value.exit_code == 1 and f"{built['int8']}: top-1 drop" in str(e.value) and "\n" not in str(e.value)


def test_a_broken_file_fails_to_load_and_fails_its_variant_only(built, tmp_path):
    model, target = built["model"], TARGETS.get(built["fp32"])
    (tmp_path / target.files[0]).write_bytes(b"\x00not a model\xff" * 64)
    x, y = confident_test_set(model, margin=0.1)
    res = validate_export(model, tmp_path, {"variants": {target.name: {"path": target.files[0]}}}, ArrayImages(x, y), VCFG)
    r = res["variants"][target.name]
    assert not res["passed"] and r["failures"][0].startswith(f"not a loadable {target.format_name}: {target.files[0]}")


@pytest.mark.parametrize("name", [n for names in RUNTIMES.values() for n in names[1:3]])
def test_a_target_whose_extra_is_missing_fails_at_recipe_load_naming_the_extra(name, monkeypatch):
    target = TARGETS.get(name)
    expected = f"install the extra '{target.extra}' (pip install 'edgedistill[{target.extra}]')"
    if not_installed([name]):  # the real thing, where the extra is absent
        with pytest.raises(RecipeError, match=re.escape(expected)):
            validate_recipe({"export": {"formats": ["fp32", name]}})
    monkeypatch.setattr(target, "packages", (*target.packages, "edgedistill_no_such_module"))
    with pytest.raises(RecipeError) as e:
        validate_recipe({"export": {"formats": ["fp32", name]}})
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert f"export.formats: {name} needs " in msg and "edgedistill_no_such_module" in msg and msg.endswith(expected)
    with pytest.raises(Exception, match=re.escape(expected)):  # export code builds ExportConfig alone: same check
        ExportConfig(formats=[name])


@pytest.mark.parametrize("extra", list(RUNTIMES))
def test_int8_needs_calibration_images_before_anything_is_built(extra, tmp_path):
    module, fp32, int8, _ = RUNTIMES[extra]
    pytest.importorskip(module, reason=f"the '{extra}' extra is not installed: pip install -e '.[{extra}]'")
    with pytest.raises(InputError, match=f"export.formats: {int8} needs calibration images"):
        export_all(tiny_model(), tmp_path, ExportConfig(formats=[fp32, int8]), image_size=SIZE,
                   calibration_images=None, metadata=TINY_META)
    assert list(tmp_path.iterdir()) == []
