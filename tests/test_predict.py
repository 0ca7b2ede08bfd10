"""A tiny quickstart-like run with student.arch: auto and a CE baseline, end to end; then ``edgedistill predict`` on its
test images reproduces the validated top-1 exactly, and its code is the code docs/deploy.md shows."""

from __future__ import annotations

import copy
import csv
import inspect
import io
import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY
from test_deploy import make_imagefolder, snippet_source

from edgedistill.deploy import pick as P
from edgedistill.deploy import predict as predict_module
from edgedistill.cli import cli

pytestmark = pytest.mark.usefixtures("isolated")
CLASSES = ["disc", "square", "triangle"]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """16-px shapes (source images 120×90 and 96×80), student chosen by size among three tiny candidates."""
    tmp = tmp_path_factory.mktemp("auto")
    root = tmp / "shapes"
    make_imagefolder(root, {"train": 8, "test": 6})
    raw = copy.deepcopy(TINY)
    raw["name"] = "shapes"
    raw["data"] = {"source": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 8, "eval_batch_size": 32}
    raw["student"] = {"arch": "auto", "target": {"max_size_mb": 1.0, "precision": "int8", "archs": ["mobilenet_v3_small", "shufflenet_v2_x0_5"]}}
    raw["distill"]["epochs"] = 1
    raw["export"] = {"formats": ["fp32", "int8"]}
    raw["validate"] = {**raw["validate"], "max_int8_drop": 100.0, "rounds": 3}
    raw["report"] = {"baseline": "ce"}
    recipe = tmp / "shapes.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "WIDTH_GRID", (0.35, 1.0))
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp / "runs")])
    assert result.exit_code == 0, result.output
    return {"run": tmp / "runs" / "shapes", "root": root, "recipe": recipe, "output": result.output, "tmp": tmp}


def test_the_run_picks_by_size_and_trains_the_choice(auto_run):
    run = auto_run["run"]
    choice = json.loads((run / "student_choice.json").read_text())
    # int8 files at 16 px: v3_small ×0.35 ≈ 0.3 MB, shufflenet x0.5 ≈ 0.7 MB, v3_small ×1 ≈ 1.6 MB; the limit is 1 MB
    sizes = {(r["arch"], r["width"]): r["size_mb"] for r in choice["candidates"]}
    assert sizes[("mobilenet_v3_small", 0.35)] < sizes[("shufflenet_v2_x0_5", 1.0)] < 1.0 < sizes[("mobilenet_v3_small", 1.0)]
    assert (choice["arch"], choice["width"]) == ("shufflenet_v2_x0_5", 1.0)
    assert (run / "student_choice.png").stat().st_size > 0
    assert "◀ chosen" in auto_run["output"]
    import torch

    state = torch.load(run / "student.pt", weights_only=False)["model"]
    assert any(k.startswith("net.conv1.") for k in state)  # a ShuffleNetV2 was trained


def test_validation_recommends_what_to_ship_and_the_report_tells_the_compression(auto_run):
    run = auto_run["run"]
    val = json.loads((run / "validation.json").read_text())
    kinds = [r["kind"] for r in val["recommendations"]]
    assert kinds == ["server", "edge"]
    output = " ".join(auto_run["output"].split())
    for rec in val["recommendations"]:
        assert rec["variant"] in ("fp32", "int8") and rec["line"].startswith(f"{rec['kind'].replace('server', 'server CPU').replace('edge', 'edge device')}: ship {rec['variant']}")
        assert " ".join(rec["line"].split())[:60] in output
    for r in val["variants"].values():
        assert len(r["latency_ms_samples"]) == 3 and r["latency_ms_interval"][0] <= r["latency_ms_p50"] <= r["latency_ms_interval"][1]
        assert r["speedup_vs_torch"]["n"] == 3
    assert val["variants"]["int8"]["latency_vs_fp32"]["n"] == 3
    assert val["models"]["teacher"]["macs"] > 0 and val["models"]["student"]["macs"] > 0
    baseline = json.loads((run / "baseline.json").read_text())
    assert baseline["loss"] == "ce" and 0 <= baseline["test_top1"] <= 100
    md = (run / "report.md").read_text()
    for text in ("## Student choice (student.arch: auto)", "## Compression: teacher vs student", "| MACs per image |",
                 "distillation added", "### What to ship", "![accuracy vs latency vs size of every variant](variants.png)"):
        assert text in md, text
    assert (run / "variants.png").stat().st_size > 0


def test_predict_reproduces_the_validated_top1_exactly(auto_run, tmp_path):
    run, root = auto_run["run"], auto_run["root"]
    val = json.loads((run / "validation.json").read_text())["variants"]
    for variant, model in (("fp32", "student.onnx"), ("int8", "student.int8.onnx")):
        correct, total = 0, 0
        for label, name in enumerate(CLASSES):
            out = CliRunner().invoke(cli, ["predict", str(run / model), str(root / "test" / name), "-k", "1", "--format", "csv"])
            assert out.exit_code == 0, out.output
            rows = list(csv.DictReader(io.StringIO(out.output)))
            correct += sum(r["class"] == name for r in rows)
            total += len(rows)
        assert total == 18 and round(100.0 * correct / total, 4) == val[variant]["test_top1"], variant


def test_predict_writes_json_and_refuses_bad_input(auto_run, tmp_path):
    run, root = auto_run["run"], auto_run["root"]
    image = next((root / "test" / "disc").iterdir())
    out_file = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["predict", str(run / "student.onnx"), str(image), "-k", "3", "--format", "json", "-o", str(out_file)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out_file.read_text())
    assert [r["rank"] for r in rows] == [1, 2, 3] and {r["class"] for r in rows} == set(CLASSES)
    assert sum(r["probability"] for r in rows) == pytest.approx(1.0, abs=1e-5)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["predict", str(run / "student.onnx"), str(empty)])
    assert res.exit_code == 2 and "no image files" in res.output
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    res = CliRunner().invoke(cli, ["predict", str(run / "student.onnx"), str(bad)])
    assert res.exit_code == 2 and "not a readable image" in res.output
    res = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
    assert res.exit_code == 2 and "not a loadable ONNX / ORT model" in res.output


def test_predict_is_the_code_the_deploy_docs_show():
    docs = snippet_source()
    for fn in (predict_module.preprocess, predict_module.classify):
        assert inspect.getsource(fn) in docs, fn.__name__


def test_nothing_fits_exits_2_and_leaves_nothing(auto_run, tmp_path):
    raw = yaml.safe_load(auto_run["recipe"].read_text())
    raw["student"]["target"] = {"max_size_mb": 0.01, "archs": ["shufflenet_v2_x0_5"]}
    raw["export"] = {"formats": ["fp32"]}
    raw["validate"].pop("max_int8_drop")
    recipe = tmp_path / "tight.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["pick", str(recipe), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert "none of the 1 candidates fits" in res.output and "the fastest, shufflenet_v2_x0_5, measured" in res.output
    assert not (tmp_path / "runs").exists()


def test_predict_walks_class_folders_prints_per_class_top1_and_goes_on_past_a_bad_image(auto_run, tmp_path):
    run, root = auto_run["run"], auto_run["root"]
    val = json.loads((run / "validation.json").read_text())["variants"]["fp32"]
    res = CliRunner().invoke(cli, ["predict", str(run / "student.onnx"), str(root / "test"), "-k", "1", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert f"top-1 by class folder: {val['test_top1']:.2f}% (" in res.output and "/18)" in res.output
    assert all(f"  {name}: " in res.output for name in CLASSES)

    images = tmp_path / "images"
    (images / "deeper").mkdir(parents=True)
    good = sorted((root / "test" / "disc").iterdir())[:2]
    (images / "a.png").write_bytes(good[0].read_bytes())
    (images / "deeper" / "c.png").write_bytes(good[1].read_bytes())
    (images / "b.png").write_bytes(good[0].read_bytes()[:40])  # truncated: its header reads, its pixels do not
    out_file = tmp_path / "p.csv"
    res = CliRunner().invoke(cli, ["predict", str(run / "student.onnx"), str(images), "-k", "2", "--format", "csv", "-o", str(out_file)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith(
        f"error: 1 of 3 images could not be classified (their rows say why): {images / 'b.png'}: not a readable image (")
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert [(r["image"], r["rank"]) for r in rows] == [(str(images / "a.png"), "1"), (str(images / "a.png"), "2"),
                                                      (str(images / "b.png"), ""), (str(images / "deeper" / "c.png"), "1"),
                                                      (str(images / "deeper" / "c.png"), "2")]
    assert rows[2]["error"].startswith("not a readable image") and rows[0]["error"] == "" and rows[0]["class"] in CLASSES
    assert "top-1 by class folder" not in res.output, "no class folders here: no per-class figures"
