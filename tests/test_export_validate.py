"""Export targets (fp32 / int8 / fp16 / edge, and any registered later) and their validation.

Every registered student is exported once at 32 px (dynamo exporter, ~5–10 s each on 2 cores); every
registered export target is built for a tiny CNN; the other tests reuse mobilenet_v3_small's run folder.
Untrained torchvision students output logits of ~1e-10 (their classifiers start at std 0.01), which would
make parity checks vacuous, so the models here get BN statistics from a forward pass and a classifier
that gives O(1)–O(10) logits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgedistill import __version__
from edgedistill.data.sources import limit_indices
from edgedistill.base import parity
from edgedistill.base.errors import GateFailed, InputError, RecipeError
from edgedistill.base.fsio import atomic_path
from edgedistill.base.timing import spread
from edgedistill.models.students import build_student, zoo
from edgedistill.recipe.schema import validate_recipe
from edgedistill.recipe.deploy import ExportConfig, ValidateConfig
from edgedistill.pipeline.report import _validation_section
from edgedistill.deploy.targets import (TARGETS, OrtRunner, Target, build_order, export_all, not_installed, onnx_metadata, parity_gate,
                                        read_metadata, register)
from edgedistill.models import onnx_export
from edgedistill.deploy.targets.edge import make_batch_fixed
from edgedistill.deploy.targets.int8 import quantize_int8
from edgedistill.data.loading import ArrayImages
from edgedistill.deploy.validate import check_gates, validate_export, validate_onnx_file
from edgedistill.deploy.validate_view import validation_table

SIZE = 32
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)
CLASSES = {arch: 3 + i % 8 for i, arch in enumerate(zoo())}  # 3–10 classes, varying by arch
MAIN = "mobilenet_v3_small"
REPARAMETERIZED = {"timm/repvit_m0_9", "timm/mobileone_s0", "timm/fastvit_t8"}  # fused for inference before export
# One thread: on a shared 2-core box, 2 OpenMP / ORT threads wait on each other's time slices (100x slower).
VCFG = ValidateConfig(parity_batches=[1, 3, 8], latency_runs=5, throughput_batch=8, threads=1, seconds=0.02)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lively(model: nn.Module, seed: int = 0, logit_scale: float = 8.0) -> nn.Module:
    """Give an untrained student real BN statistics and a classifier with O(1+) logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the warm-up passes
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
        model.train()
        model(torch.rand(16, 3, SIZE, SIZE, generator=g))
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        z = model(torch.rand(16, 3, SIZE, SIZE, generator=g))
        scale = logit_scale / float(z.abs().max())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model


def tiny_model(seed: int = 0) -> nn.Module:
    """Two conv-BN-ReLU blocks and a classifier: every target builds it in a few seconds."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )
    return lively(net, seed)


TINY_META = onnx_metadata([f"c{i}" for i in range(5)], SIZE, MEAN, STD, "tiny")


def make_student(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # parity sits near atol for some archs: the weights must not depend on test order
    net = build_student(arch, CLASSES[arch], image_size=SIZE, mean=MEAN, std=STD, small_input=True)
    return lively(net, seed)


def metadata_for(arch: str) -> dict[str, str]:
    return onnx_metadata([f"class{i}" for i in range(CLASSES[arch])], SIZE, MEAN, STD, "abc123")


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def ort_out(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def snapshot(model: nn.Module) -> tuple:
    """Everything export could change on the caller's model: weights, modes, in-place flags, module types."""
    return (
        {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()},
        [(type(m).__name__, m.training, getattr(m, "inplace", None)) for m in model.modules()],
        str(next(model.parameters()).device),
    )


# ---------------------------------------------------------------- shared exports


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """mobilenet_v3_small through export_all: fp32 + int8 + fp16 + edge, as the pipeline does."""
    out = tmp_path_factory.mktemp("run")
    model = make_student(MAIN)
    calib = images(24, seed=7)
    labels = np.arange(24) % CLASSES[MAIN]
    idx = limit_indices(labels, 16, seed=0)  # how the export stage picks calibration images
    cfg = ExportConfig(formats=["fp32", "int8", "fp16", "edge"], int8={"calibration": {"samples": 16, "method": "minmax"}})
    summary = export_all(model, out, cfg, image_size=SIZE, calibration_images=calib[idx], metadata=metadata_for(MAIN))
    paths = {name: out / info["path"] for name, info in summary["variants"].items()}
    return {"model": model, "dir": out, "paths": paths, "summary": summary}


_FP32: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, main_run):
    """arch → (model, fp32 path, info); each student is exported once per test session."""

    def get(arch: str):
        if arch == MAIN:
            return main_run["model"], main_run["paths"]["fp32"], main_run["summary"]["variants"]["fp32"]
        if arch not in _FP32:
            model = make_student(arch).train()  # export must neither switch it to eval nor fold its BN
            before = snapshot(model)
            path = tmp_path_factory.mktemp(arch.replace("/", "-")) / "student.onnx"
            info = onnx_export.export_onnx(model, path, image_size=SIZE, metadata=metadata_for(arch))
            info["caller_model_untouched"] = snapshot(model) == before
            _FP32[arch] = (model.eval(), path, info)
        return _FP32[arch]

    return get


def summary_of(**files: str) -> dict:
    """A minimal export.json: variant → the file validation runs."""
    return {"variants": {name: {"path": f} for name, f in files.items()}}


# ---------------------------------------------------------------- every registered target


def confident_test_set(model: nn.Module, margin: float, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Images whose PyTorch top-1 leads by more than ``margin``: a lossy target within its tolerance keeps it."""
    x = images(400, seed=21)
    z = torch_out(model, x)
    top2 = np.sort(z, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > margin)[:n]
    assert len(keep) >= 8, "the tiny model has too few confident images"
    return x[keep], z[keep].argmax(1).astype(np.int64)


@pytest.mark.parametrize("name", TARGETS.names())
def test_every_registered_target_builds_runs_and_passes_its_gate(name, tmp_path):
    if not_installed([name]):  # a target of an optional extra (tests/test_targets_runtimes.py says how to run it)
        pytest.skip(not_installed([name])[0])
    target = TARGETS.get(name)
    model = tiny_model()
    cfg = ExportConfig(formats=build_order([name]), int8={"calibration": {"samples": 16}})
    summary = export_all(model, tmp_path, cfg, image_size=SIZE, calibration_images=images(16, seed=7), metadata=TINY_META)
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads(json.dumps(summary))
    info = summary["variants"][name]
    assert info["path"] == target.files[0] and info["files"] == list(target.files)
    for f in target.files:
        assert (tmp_path / f).stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind

    tol = target.tolerance(VCFG)
    x, y = confident_test_set(model, margin=2 * tol + 1e-3)
    runner = target.open(tmp_path / info["path"], 1)
    assert runner.incompatible(x.shape[1:]) is None
    got = runner.run(x, batch=8)
    assert got.shape == (len(x), 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_out(model, x), atol=tol, rtol=0)

    res = validate_export(model, tmp_path, summary, ArrayImages(x, y), VCFG)
    row = res["variants"][name]
    assert row["passed"], row["failures"]
    assert row["path"] == target.files[0] and row["max_abs_diff"] <= tol and target.gate(row, VCFG) == []


class Pt2(Target):
    """A target that is not ONNX: a torch.export program, run by PyTorch."""

    name = "test_pt2"
    files = ("student.test.pt2",)
    packages = ("torch",)
    format_name = "torch.export program"
    runtime_name = "PyTorch"

    def build(self, ctx):
        net = copy.deepcopy(ctx.model).eval()
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(net, (torch.rand(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
        with atomic_path(ctx.out_dir / self.files[0]) as tmp:
            torch.export.save(program, tmp)
        return {"nodes": len(program.graph.nodes)}

    def open(self, path, threads):
        return Pt2Runner(torch.export.load(path).module())


class Pt2Runner:
    calls = 0

    def __init__(self, module):
        self.module = module

    def incompatible(self, chw):
        return None if tuple(chw) == (3, SIZE, SIZE) else f"expects 3x{SIZE}x{SIZE}"

    def run(self, x, batch):
        Pt2Runner.calls += 1
        with torch.no_grad():
            return np.concatenate([self.module(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


@pytest.fixture
def pt2_target():
    register(Pt2)
    try:
        yield TARGETS.get(Pt2.name)
    finally:
        TARGETS._items.pop(Pt2.name)  # the registry has no public removal: later tests see the real targets only


def test_a_new_target_is_built_validated_and_reported_with_no_other_change(pt2_target, tmp_path):
    model = tiny_model()
    cfg = validate_recipe({"export": {"formats": [Pt2.name, "fp32"]}}).export  # the recipe accepts it
    summary = export_all(model, tmp_path, cfg, image_size=SIZE, calibration_images=None, metadata=TINY_META)
    written = json.loads((tmp_path / "export.json").read_text())
    assert list(written["variants"]) == [Pt2.name, "fp32"]
    assert written["variants"][Pt2.name]["files"] == ["student.test.pt2"] and written["variants"][Pt2.name]["nodes"] > 0
    assert written["versions"]["torch"] == torch.__version__

    x, y = confident_test_set(model, margin=0.01)
    Pt2Runner.calls = 0
    res = validate_export(model, tmp_path, summary, ArrayImages(x, y), VCFG)
    row = res["variants"][Pt2.name]
    assert res["passed"] and row["passed"] and Pt2Runner.calls > 0  # run by its own runner
    assert row["max_abs_diff"] <= VCFG.atol and row["top1_agreement"] == 1.0 and row["test_top1"] == 100.0
    assert_timing_matches_samples(row)
    assert_file_row(row, tmp_path / "student.test.pt2", written["variants"][Pt2.name])
    md = "\n".join(_validation_section(res, summary))
    assert f"| {Pt2.name} | `student.test.pt2` |" in md and "| fp32 | `student.onnx` |" in md

    (tmp_path / "student.test.pt2").write_bytes(b"garbage")
    res = validate_export(model, tmp_path, summary, ArrayImages(x, y), VCFG)
    assert res["variants"]["fp32"]["passed"] and not res["passed"]
    assert res["variants"][Pt2.name]["failures"][0].startswith("not a loadable torch.export program: student.test.pt2")


def test_a_target_that_refuses_the_network_is_recorded_and_the_others_are_built(tmp_path, monkeypatch):
    """fp32 refuses (an operator its exporter cannot take): int8, built from it, is not tried; ExecuTorch-free
    edge targets aside, the test target is built and validated; validation fails the refused ones with the reason."""
    def refuse(*args, **kwargs):
        raise InputError("student.onnx: ONNX export failed (UnsupportedOperator: aten::weird_op)")

    register(Pt2)
    try:
        monkeypatch.setattr(TARGETS.get("fp32"), "build", refuse)
        model = tiny_model()
        cfg = validate_recipe({"export": {"formats": ["fp32", "int8", Pt2.name]}}).export
        calibration = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
        summary = export_all(model, tmp_path, cfg, image_size=SIZE, calibration_images=calibration, metadata=TINY_META)
        assert list(summary["variants"]) == [Pt2.name]
        assert summary["failed"] == {"fp32": "student.onnx: ONNX export failed (UnsupportedOperator: aten::weird_op)",
                                     "int8": "needs fp32, which failed"}
        assert json.loads((tmp_path / "export.json").read_text())["failed"] == summary["failed"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "student.test.pt2"]

        x, y = confident_test_set(model, margin=0.01)
        res = validate_export(model, tmp_path, summary, ArrayImages(x, y), VCFG)
        assert res["variants"][Pt2.name]["passed"] and not res["passed"]
        assert res["variants"]["fp32"]["failures"] == ["export failed: student.onnx: ONNX export failed (UnsupportedOperator: aten::weird_op)"]
        assert res["variants"]["int8"]["failures"] == ["export failed: needs fp32, which failed"]
        assert all(r["variant"] == Pt2.name for r in res["recommendations"] if r.get("variant"))
        with pytest.raises(GateFailed, match="fp32: export failed"):
            check_gates(res)
    finally:
        TARGETS._items.pop(Pt2.name)


def test_the_validation_table_counts_sizes_as_the_size_limit_does():
    """In decimal units, as student.target.max_size_mb and the ship line count them: an 837,120-byte int8 file is
    0.84 MB there, so the table must not call it 817.5 KB."""
    from edgedistill.deploy.validate_view import _fmt_size

    assert [_fmt_size(n) for n in (512, 837_120, 999_940, 999_950, 3_490_000, 2.5e9, None)] == [
        "512 B", "837.1 kB", "999.9 kB", "1.0 MB", "3.5 MB", "2.5 GB", "–"]


def test_export_formats_are_checked_against_the_registry():
    for formats, expected in (
        (["fp32", "int4"], "export.formats: unknown export target 'int4' (did you mean 'int8'?); known: " + ", ".join(TARGETS.names())),
        (["edge"], "export.formats: fp32 is required by edge"),
        (["fp16", "int8"], "fp32 is required by fp16; fp32 is required by int8"),
        (["fp32", "fp32"], "export.formats: duplicates"),
    ):
        with pytest.raises(RecipeError) as e:
            validate_recipe({"export": {"formats": formats}})
        assert expected in str(e.value)
    assert build_order(["edge", "int8", "fp32"]) == ["fp32", "edge", "int8"]
    assert validate_recipe({"export": {"formats": ["fp32", "edge"]}}).export.formats == ["fp32", "edge"]


def test_int8_without_calibration_images_fails_before_anything_is_built(tmp_path):
    with pytest.raises(InputError, match="int8 needs calibration images"):
        export_all(nn.Identity(), tmp_path, ExportConfig(formats=["fp32", "int8"]), image_size=SIZE,
                   calibration_images=None, metadata=TINY_META)
    with pytest.raises(InputError, match=r"calibration images: images are 8x8"):
        export_all(nn.Identity(), tmp_path, ExportConfig(formats=["fp32", "int8"]), image_size=SIZE,
                   calibration_images=np.zeros((4, 3, 8, 8), np.float32), metadata=TINY_META)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fp32 export, every student


@pytest.mark.parametrize("arch", zoo())  # timm's curated students too, with the timm extra
def test_every_student_exports_to_valid_dynamic_onnx(arch, fp32_export):
    model, path, info = fp32_export(arch)
    assert info["exporter"] == "dynamo"
    if arch != MAIN:  # MAIN's model was exported by export_all
        assert info["caller_model_untouched"]
    assert info["prepared"]["inplace_disabled"] > 0
    assert info["opset"] >= 18
    if not arch.startswith("timm/"):  # timm's BatchNormAct2d is folded by the ONNX optimizer, not before export
        assert info["prepared"]["conv_bn_folded"] > 0 and "BatchNormalization" not in info["op_types"]
    assert info["prepared"]["reparameterized"] > 0 if arch in REPARAMETERIZED else info["prepared"]["reparameterized"] == 0

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # batch is the only dynamic axis
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]

    meta = read_metadata(path)
    assert json.loads(meta["class_names"]) == [f"class{i}" for i in range(CLASSES[arch])]
    assert json.loads(meta["input_size"]) == [3, SIZE, SIZE]
    assert json.loads(meta["mean"]) == pytest.approx(MEAN) and json.loads(meta["std"]) == pytest.approx(STD)
    assert "[0,1]" in meta["normalization"] and meta["recipe_digest"] == "abc123"
    assert meta["edgedistill_version"] == __version__

    for batch in (1, 3):
        x = images(batch, seed=batch)
        got, want = ort_out(path, x), torch_out(model, x)
        assert got.shape == (batch, CLASSES[arch])
        # validation's own bar: float32 rounding grows with the logits (lcnet_050: 1.5e-4 on logits of 10, untrained)
        np.testing.assert_allclose(got, want, atol=parity.tolerance(VCFG.atol, float(np.abs(want).max())), rtol=0)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_an_exporter_failure_is_one_input_error_line(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo says no.\nTraceback (most recent call last): ...")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    with pytest.raises(InputError) as e:
        onnx_export.export_onnx(tiny_model(), tmp_path / "student.onnx", image_size=SIZE, metadata=TINY_META)
    msg = str(e.value)
    assert msg == "student.onnx: ONNX export failed (RuntimeError: dynamo says no)"
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_cannot_be_copied_is_an_input_error(tmp_path):
    model = tiny_model()
    model.stream = (i for i in range(3))  # generators cannot be deep-copied
    with pytest.raises(InputError, match=r"student\.onnx: the model cannot be copied for export \(TypeError"):
        onnx_export.export_onnx(model, tmp_path / "student.onnx", image_size=SIZE, metadata=TINY_META)


def test_external_data_from_the_exporter_is_folded_into_one_file(tmp_path, monkeypatch):
    real_dynamo = onnx_export._export_dynamo
    model = tiny_model()

    def exporter_writing_external_data(net, example, out, opset, dynamic_batch):
        real_dynamo(net, example, out, opset, dynamic_batch)
        proto = onnx.load(str(out))
        onnx.save(proto, str(out), save_as_external_data=True, location="model.onnx.data", size_threshold=0)

    monkeypatch.setattr(onnx_export, "_export_dynamo", exporter_writing_external_data)
    onnx_export.export_onnx(model, tmp_path / "student.onnx", image_size=SIZE, metadata=TINY_META)
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]
    proto = onnx.load(str(tmp_path / "student.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = images(2)
    np.testing.assert_allclose(ort_out(tmp_path / "student.onnx", x), torch_out(model, x), atol=1e-4, rtol=0)


def test_export_all_writes_int8_fp16_and_summary(main_run):
    d, paths, summary = main_run["dir"], main_run["paths"], main_run["summary"]
    assert {k: p.name for k, p in paths.items()} == {
        "fp32": "student.onnx", "int8": "student.int8.onnx", "fp16": "student.fp16.onnx", "edge": "student.b1.ort"}
    assert summary["exporter"] == "dynamo" and summary["opset"] >= 18
    assert summary["input"]["name"] == "input" and summary["input"]["shape"][1:] == [3, SIZE, SIZE]
    assert summary["output"] == {"name": "logits", "shape": ["batch", CLASSES[MAIN]]}
    assert set(summary["versions"]) == {"edgedistill", "torch", "onnx", "onnxruntime"}
    assert list(summary["variants"]) == ["fp32", "int8", "fp16", "edge"]
    for name, p in paths.items():
        assert summary["variants"][name]["size_bytes"] == p.stat().st_size
    assert paths["int8"].stat().st_size < 0.5 * paths["fp32"].stat().st_size
    assert paths["fp16"].stat().st_size < 0.6 * paths["fp32"].stat().st_size
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left behind

    int8 = onnx.load(str(paths["int8"]))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert summary["variants"]["int8"]["calibration_samples"] == 16
    assert summary["variants"]["int8"]["activations"] == "QUInt8" and summary["variants"]["int8"]["weights"] == "QInt8"
    meta = read_metadata(paths["int8"])
    assert json.loads(meta["quantization"])["format"] == "QDQ" and "class_names" in meta

    fp16 = onnx.load(str(paths["fp16"]))
    onnx.checker.check_model(fp16)  # includes: nodes in topological order
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert "class_names" in read_metadata(paths["fp16"]) and "fp16" in read_metadata(paths["fp16"])["precision"]

    x = images(3)
    want = torch_out(main_run["model"], x)
    for name in ("int8", "fp16"):
        got = ort_out(paths[name], x)
        assert got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(ort_out(paths["fp16"], x), want, atol=0.05, rtol=0)


def test_edge_artifacts(main_run):
    d, edge = main_run["dir"], main_run["summary"]["variants"]["edge"]
    assert edge["files"] == ["student.b1.ort", "student.b1.onnx", "student.b1.required_operators.config"]
    b1 = d / edge["b1_onnx"]
    dims = onnx.load(str(b1)).graph.input[0].type.tensor_type.shape.dim
    assert [x.dim_value for x in dims] == [1, 3, SIZE, SIZE]
    assert read_metadata(b1)["batch"] == "1" and read_metadata(b1)["recipe_digest"] == "abc123"
    ort_file = d / edge["ort"]
    assert ort_file.suffix == ".ort" and ort_file.stat().st_size == edge["ort_size_bytes"] > 0
    assert (d / edge["required_operators_config"]).read_text().strip()
    x = images(1)
    np.testing.assert_allclose(ort_out(ort_file, x), torch_out(main_run["model"], x), atol=1e-4, rtol=0)
    for ep in ("nnapi", "coreml_mlprogram", "coreml_neuralnetwork"):
        u = edge["usability"][ep]
        assert 0 <= u["supported_nodes"] <= u["nodes"] and u["nodes"] > 0 and u["partitions"] >= 0
        assert u["suitability"] in ("YES", "MAYBE", "NO") and isinstance(u["unsupported_ops"], list)


def test_make_batch_fixed_keeps_metadata(main_run, tmp_path):
    make_batch_fixed(main_run["paths"]["fp32"], tmp_path / "b4.onnx", (4, 3, SIZE, SIZE))
    assert read_metadata(tmp_path / "b4.onnx")["batch"] == "4"
    assert ort_out(tmp_path / "b4.onnx", images(4)).shape == (4, CLASSES[MAIN])


def test_percentile_calibration(fp32_export, tmp_path):
    # (entropy: tests/test_int8_fallback.py, on a model small enough for its search, which runs in Python)
    _, path, _ = fp32_export("shufflenet_v2_x0_5")
    info = quantize_int8(path, tmp_path / "q.onnx", images(8, seed=3), "percentile", batch_size=4)
    assert info["calibration"] == "percentile"
    out = ort_out(tmp_path / "q.onnx", images(2))
    assert out.shape == (2, CLASSES["shufflenet_v2_x0_5"]) and np.isfinite(out).all()


def test_bad_quantization_inputs_are_input_errors(fp32_export, tmp_path):
    _, path, _ = fp32_export(MAIN)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        quantize_int8(path, tmp_path / "q.onnx", images(4) * 255, "minmax")
    with pytest.raises(InputError, match="activation_type"):
        quantize_int8(path, tmp_path / "q.onnx", images(4), "minmax", activation_type="int4")
    with pytest.raises(InputError, match="method"):
        quantize_int8(path, tmp_path / "q.onnx", images(4), "kl")
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- validation


def assert_timing_matches_samples(row: dict, prefix: str = "") -> None:
    """Each figure is its stored samples' median and its interval their central 95 %, to the digit, whatever the
    machine's speed (figures to 1e-4 ms / 0.01 img/s)."""
    figures = [(f"{prefix}images_per_second", f"{prefix}images_per_second", 2)]
    if f"{prefix}latency_ms_p50" in row:
        figures.insert(0, (f"{prefix}latency_ms_p50", f"{prefix}latency_ms", 4))
    for key, stem, digits in figures:
        samples = row[f"{stem}_samples"]
        s = spread(samples, digits)
        assert row[key] == round(statistics.median(samples), digits) == s["median"], key
        assert row[f"{stem}_interval"] == [s["lo"], s["hi"]], key
        lo, hi = row[f"{stem}_interval"]
        assert round(min(samples), digits) <= lo <= row[key] <= hi <= round(max(samples), digits), key


def assert_file_row(row: dict, path, built: dict | None = None) -> None:
    """``size_bytes`` is the file's size on disk; export.json's ``size_bytes`` and ``sha256`` are its size and digest."""
    data = path.read_bytes()
    assert row["size_bytes"] == path.stat().st_size == len(data)
    if built is not None:
        assert built["size_bytes"] == len(data) and built["sha256"] == hashlib.sha256(data).hexdigest()


def assert_top1_is_a_share(top1: float, n: int) -> None:
    """A top-1 is k of the n test images, in percent (to 4 decimals)."""
    k = round(top1 * n / 100)
    assert 0 <= k <= n and top1 == round(100.0 * k / n, 4), (top1, n)


def _test_set(model, n=40):
    x = images(n, seed=11)
    return x, torch_out(model, x).argmax(1).astype(np.int64)  # torch top-1 is 100 %


def test_validation_passes_on_a_healthy_model(main_run):
    model, d, summary = main_run["model"], main_run["dir"], main_run["summary"]
    x, y = _test_set(model)
    # int8 of an untrained net on noise images is not a fair accuracy test: its gate is checked separately.
    cfg = VCFG.model_copy(update={"max_int8_drop": 100.0, "max_fp16_drop": 5.0})
    res = validate_export(model, d, summary, ArrayImages(x, y), cfg)
    assert res["passed"], res
    assert list(res["variants"]) == ["fp32", "int8", "fp16", "edge"]
    assert res["torch_top1"] == 100.0
    assert_timing_matches_samples(res, prefix="torch_")
    for name in ("fp32", "edge"):  # parity-gated
        r = res["variants"][name]
        assert r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0 and r["test_top1"] == 100.0
        assert set(r["parity"]) == {"1", "3", "8"}
    assert res["variants"]["edge"]["path"] == "student.b1.ort"
    for name, r in res["variants"].items():
        assert_file_row(r, d / r["path"], summary["variants"][name])
        assert_timing_matches_samples(r)
        assert_top1_is_a_share(r["test_top1"], len(y))
        assert r["max_abs_diff"] == max(p["max_abs_diff"] for p in r["parity"].values())  # the worst parity batch
        agree = sum(p["top1_agreement"] * int(b) for b, p in r["parity"].items()) / sum(map(int, r["parity"]))
        assert r["top1_agreement"] == pytest.approx(agree) and r["failures"] == []
        assert len(r["latency_ms_samples"]) == len(r["images_per_second_samples"]) == VCFG.rounds
        assert r["speedup_vs_torch"]["n"] == VCFG.rounds and r["deploy_to"] == list(TARGETS.get(name).deploy_to)
        assert r["delta_top1"] == pytest.approx(r["test_top1"] - 100.0)
    assert {rec["kind"] for rec in res["recommendations"]} == {"server", "edge"}
    json.dumps(res, allow_nan=False)  # validation.json is strict JSON
    check_gates(res)  # does not raise
    _render(validation_table(res))
    md = "\n".join(_validation_section(res, summary))
    for name in res["variants"]:
        assert f"| {name} | `{res['variants'][name]['path']}` |" in md
    assert "### edge: NNAPI / CoreML coverage" in md and "| nnapi |" in md and "`student.b1.required_operators.config`" in md


def test_corrupted_or_missing_files_fail_their_variant_only(main_run, tmp_path):
    model, fp32 = main_run["model"], main_run["paths"]["fp32"]
    (tmp_path / "student.onnx").write_bytes(fp32.read_bytes())
    garbage = tmp_path / "student.int8.onnx"
    garbage.write_bytes(b"\x00not an onnx model\xff" * 100)
    truncated = tmp_path / "student.fp16.onnx"
    truncated.write_bytes(fp32.read_bytes()[: fp32.stat().st_size // 2])
    summary = summary_of(fp32="student.onnx", int8=garbage.name, fp16=truncated.name, edge="student.b1.ort")
    x, y = _test_set(model, n=16)
    res = validate_export(model, tmp_path, summary, ArrayImages(x, y), VCFG)
    assert res["variants"]["fp32"]["passed"] and not res["passed"]
    for name, file in (("int8", garbage), ("fp16", truncated)):
        r = res["variants"][name]
        assert not r["passed"] and r["failures"][0].startswith("not a loadable ONNX model")
        assert file.name in r["failures"][0] and r["size_bytes"] == file.stat().st_size
    assert res["variants"]["edge"]["failures"] == [f"file not found: {tmp_path / 'student.b1.ort'}"]
    with pytest.raises(GateFailed) as e:
        check_gates(res)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg
    assert "int8: not a loadable ONNX model" in msg and "fp16: not a loadable ONNX model" in msg and "fp32:" not in msg
    assert "❌" in _render(validation_table(res))


def test_perturbed_weights_fail_the_parity_gates(main_run):
    model = copy.deepcopy(main_run["model"])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.add_(0.5 * torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    x, y = _test_set(main_run["model"], n=16)
    res = validate_export(model, main_run["dir"], summary_of(fp32="student.onnx", edge="student.b1.ort"), ArrayImages(x, y), VCFG)
    for name in ("fp32", "edge"):
        r = res["variants"][name]
        assert not r["passed"] and r["max_abs_diff"] > VCFG.atol
    with pytest.raises(GateFailed) as e:
        check_gates(res)
    assert e.value.exit_code == 1
    assert "fp32" in str(e.value) and "max_abs_diff" in str(e.value) and "atol" in str(e.value)


def test_the_parity_bar_is_absolute_for_small_logits_and_relative_for_large_ones():
    row = {"max_abs_diff": 3e-4, "top1_agreement": 1.0, "logit_scale": 5.0}
    assert parity_gate(row, VCFG) == []  # 3e-4 on logits of 5: rounding (the bar is 5e-4)
    assert parity_gate({**row, "logit_scale": 2.0}, VCFG) == [
        "max_abs_diff 0.0003 > atol 0.0002 (0.0001 × the largest |logit|, 2) vs PyTorch"]
    assert parity_gate({**row, "logit_scale": 0.5}, VCFG) == ["max_abs_diff 0.0003 > atol 0.0001 vs PyTorch"]
    assert parity_gate({**row, "max_abs_diff": None, "top1_agreement": 0.5}, VCFG) == [
        "max_abs_diff nan/inf vs PyTorch (atol 0.0001)", f"top1_agreement 0.5000 < 1.0 on parity batches {list(VCFG.parity_batches)}"]


def test_accuracy_drop_gates_name_variant_and_limit():
    res = {"variants": {
        "fp32": {"passed": True, "failures": []},
        "int8": {"passed": False, "failures": ["top-1 drop 3.20 points > max_int8_drop 1.0"]},
    }}
    with pytest.raises(GateFailed, match=r"int8: top-1 drop 3\.20 points > max_int8_drop 1\.0"):
        check_gates(res)

    cfg = ValidateConfig(max_int8_drop=1.0, max_fp16_drop=0.5)
    int8, fp16, fp32 = (TARGETS.get(n) for n in ("int8", "fp16", "fp32"))
    assert int8.gate({"delta_top1": -3.2}, cfg) == ["top-1 drop 3.20 points > max_int8_drop 1.0"]
    assert int8.gate({"delta_top1": -0.9}, cfg) == []
    assert fp16.gate({"delta_top1": -0.6}, cfg) == ["top-1 drop 0.60 points > max_fp16_drop 0.5"]
    fails = fp32.gate({"max_abs_diff": None, "top1_agreement": 0.5}, cfg)  # NaN outputs
    assert len(fails) == 2 and "max_abs_diff" in fails[0] and "top1_agreement" in fails[1]
    assert TARGETS.get("edge").gate({"max_abs_diff": 1e-6, "top1_agreement": 1.0, "logit_scale": 8.0}, cfg) == []


def test_timed_sessions_stop_spinning_between_calls(main_run):
    """Validation and the pick time several sessions in turns; threads left spinning by the last one would take the
    cores from the one being timed (batch-1 latency measured ~3x too high in turns on a 2-core machine)."""
    session = OrtRunner.load(main_run["paths"]["fp32"], threads=2).session
    assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


def test_validate_onnx_file_without_torch_model(main_run):
    x, y = _test_set(main_run["model"], n=16)
    res = validate_onnx_file(main_run["paths"]["int8"], ArrayImages(x, y), VCFG)
    r = res["variants"]["student.int8.onnx"]
    assert res["passed"] and r["passed"] and r["max_abs_diff"] is None and r["delta_top1"] is None
    predicted = OrtRunner.load(main_run["paths"]["int8"], threads=VCFG.threads).run(x, batch=VCFG.throughput_batch).argmax(1)
    assert r["test_top1"] == round(100.0 * float((predicted == y).mean()), 4)  # exactly the share it gets right
    assert_timing_matches_samples(r)
    assert_file_row(r, main_run["paths"]["int8"], main_run["summary"]["variants"]["int8"])
    for fixed_batch_1 in ("student.b1.onnx", "student.b1.ort"):  # run image by image
        res = validate_onnx_file(main_run["dir"] / fixed_batch_1, ArrayImages(x, y), VCFG)
        assert res["variants"][fixed_batch_1]["test_top1"] == 100.0


def test_validate_seconds_and_rounds_set_the_timing(main_run, monkeypatch):
    """``validate.seconds`` is each figure's timed length over all rounds: every round times it for its share."""
    import edgedistill.deploy.validate as validate_module

    seen = []
    real = validate_module.interleaved
    monkeypatch.setattr(validate_module, "interleaved", lambda calls, **kw: seen.append(kw) or real(calls, **kw))
    x, y = _test_set(main_run["model"], n=8)
    cfg = VCFG.model_copy(update={"seconds": 0.06, "rounds": 3})
    res = validate_onnx_file(main_run["paths"]["fp32"], ArrayImages(x, y), cfg)
    assert [(kw["rounds"], kw["min_seconds"]) for kw in seen] == [(3, pytest.approx(0.02))]
    assert res["settings"]["seconds"] == 0.06 and len(res["variants"]["student.onnx"]["latency_ms_samples"]) == 3


def test_validation_refuses_bad_test_data(main_run):
    with pytest.raises(InputError, match="test labels"):
        validate_export(main_run["model"], main_run["dir"], {}, ArrayImages(images(4), np.zeros(3, dtype=np.int64)), VCFG)
    with pytest.raises(InputError, match="test images"):
        validate_export(main_run["model"], main_run["dir"], {}, ArrayImages(images(4)[:, :1], np.zeros(4, dtype=np.int64)), VCFG)


def _render(table) -> str:
    import io

    from rich.console import Console

    console = Console(width=160, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


class Watched(ArrayImages):
    """Test images that remember the largest array they handed out: validation must never ask for the whole set."""

    def __init__(self, x, labels, chunk):
        super().__init__(x, labels, chunk)
        self.largest = 0

    def head(self, n):
        self.largest = max(self.largest, n)
        return super().head(n)

    def chunks(self):
        for x, y in super().chunks():
            self.largest = max(self.largest, len(x))
            yield x, y


def test_validation_streams_the_test_images_chunk_by_chunk(main_run):
    """Peak memory cannot depend on the number of test images: no array larger than a chunk (or a parity / timing
    batch) is ever made, and the figures are those of the whole set at once."""
    x, y = _test_set(main_run["model"], n=40)
    y = y.copy()
    y[::3] = (y[::3] + 1) % 5  # some wrong answers, so that the counts add up across chunks for real
    watched = Watched(x, y, chunk=6)
    res = validate_export(main_run["model"], main_run["dir"], summary_of(fp32="student.onnx", int8="student.int8.onnx"), watched, VCFG)
    assert watched.largest == max(6, *VCFG.parity_batches, VCFG.throughput_batch) < len(x)
    whole = ArrayImages(x, y, chunk=len(x))
    at_once = validate_export(main_run["model"], main_run["dir"], summary_of(fp32="student.onnx", int8="student.int8.onnx"), whole, VCFG)
    assert res["torch_top1"] == at_once["torch_top1"] == round(100.0 * float((torch_out(main_run["model"], x).argmax(1) == y).mean()), 4)
    for name in ("fp32", "int8"):
        assert res["variants"][name]["test_top1"] == at_once["variants"][name]["test_top1"]
