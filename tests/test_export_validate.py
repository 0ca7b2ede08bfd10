"""Export (torch → ONNX fp32 / int8 / fp16 / edge) and ONNX Runtime validation.

Every registered student is exported once at 32 px (dynamo exporter, ~5–10 s each on 2 cores);
the other tests reuse mobilenet_v3_small's run folder. Untrained torchvision students output logits
of ~1e-10 (their classifiers start at std 0.01), which would make parity checks vacuous, so the
models here get BN statistics from a forward pass and a classifier that gives O(1)–O(10) logits.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgedistill import __version__
from edgedistill import export as E
from edgedistill.errors import GateFailed, InputError
from edgedistill.models import STUDENTS, build_student
from edgedistill.recipe import ExportConfig, ValidateConfig
from edgedistill.validate import check_gates, validate_onnx_file, validate_variants, validation_table

SIZE = 32
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)
CLASSES = {arch: 3 + i % 8 for i, arch in enumerate(STUDENTS)}  # 3–10 classes, varying by arch
MAIN = "mobilenet_v3_small"
FAST = dict(throughput_seconds=0.02)
# One thread: on a shared 2-core box, 2 OpenMP / ORT threads wait on each other's time slices (100x slower).
VCFG = ValidateConfig(parity_batches=[1, 3, 8], latency_runs=5, throughput_batch=8, threads=1)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


def make_student(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # parity sits near atol for some archs: the weights must not depend on test order
    net = build_student(arch, CLASSES[arch], image_size=SIZE, mean=MEAN, std=STD, small_input=True)
    return lively(net, seed)


def metadata_for(arch: str) -> dict[str, str]:
    return E.onnx_metadata([f"class{i}" for i in range(CLASSES[arch])], SIZE, MEAN, STD, "abc123")


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
    """mobilenet_v3_small through export_variants: fp32 + int8 + fp16 + edge, as the pipeline does."""
    out = tmp_path_factory.mktemp("run")
    model = make_student(MAIN)
    calib = images(24, seed=7)
    labels = np.arange(24) % CLASSES[MAIN]
    idx = E.class_balanced_sample(labels, 16, seed=0)
    cfg = ExportConfig(formats=["fp32", "int8", "fp16"], edge=True, calibration={"samples": 16, "method": "minmax"})
    paths = E.export_variants(model, out, cfg, image_size=SIZE, calibration_images=calib[idx], metadata=metadata_for(MAIN))
    summary = json.loads((out / "export.json").read_text())
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
            path = tmp_path_factory.mktemp(arch) / "student.onnx"
            info = E.export_onnx(model, path, image_size=SIZE, metadata=metadata_for(arch))
            info["caller_model_untouched"] = snapshot(model) == before
            _FP32[arch] = (model.eval(), path, info)
        return _FP32[arch]

    return get


# ---------------------------------------------------------------- fp32 export, every student


@pytest.mark.parametrize("arch", list(STUDENTS))
def test_every_student_exports_to_valid_dynamic_onnx(arch, fp32_export):
    model, path, info = fp32_export(arch)
    assert info["exporter"] == "dynamo" and info["fallback_reason"] is None
    if arch != MAIN:  # MAIN comes from export_variants (its summary has no such key)
        assert info["caller_model_untouched"]
        assert info["prepared"]["conv_bn_folded"] > 0 and info["prepared"]["inplace_disabled"] > 0
    assert info["opset"] >= 18

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # batch is the only dynamic axis
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert "BatchNormalization" not in info["op_types"]

    meta = E.read_metadata(path)
    assert json.loads(meta["class_names"]) == [f"class{i}" for i in range(CLASSES[arch])]
    assert json.loads(meta["input_size"]) == [3, SIZE, SIZE]
    assert json.loads(meta["mean"]) == pytest.approx(MEAN) and json.loads(meta["std"]) == pytest.approx(STD)
    assert "[0,1]" in meta["normalization"] and meta["recipe_digest"] == "abc123"
    assert meta["edgedistill_version"] == __version__

    for batch in (1, 3):
        x = images(batch, seed=batch)
        got, want = ort_out(path, x), torch_out(model, x)
        assert got.shape == (batch, CLASSES[arch])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_fallback_to_torchscript_exporter_is_logged_and_recorded(tmp_path, monkeypatch, caplog, fp32_export):
    model, _, _ = fp32_export(MAIN)

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo says no")

    monkeypatch.setattr(E, "_export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger="edgedistill"):
        info = E.export_onnx(model, tmp_path / "student.onnx", image_size=SIZE, metadata=metadata_for(MAIN))
    assert info["exporter"] == "torchscript" and "dynamo says no" in info["fallback_reason"]
    assert any("falling back" in r.getMessage() for r in caplog.records)
    proto = onnx.load(str(tmp_path / "student.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert E.read_metadata(tmp_path / "student.onnx")["recipe_digest"] == "abc123"
    x = images(3)
    np.testing.assert_allclose(ort_out(tmp_path / "student.onnx", x), torch_out(model, x), atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]  # no temp or external-data leftovers


def test_external_data_from_the_exporter_is_folded_into_one_file(tmp_path, monkeypatch, fp32_export):
    model, _, _ = fp32_export(MAIN)
    real_torchscript = E._export_torchscript

    def exporter_writing_external_data(net, example, out, opset, dynamic_batch):
        real_torchscript(net, example, out, opset, dynamic_batch)
        proto = onnx.load(str(out))
        onnx.save(proto, str(out), save_as_external_data=True, location="model.onnx.data", size_threshold=0)

    monkeypatch.setattr(E, "_export_dynamo", exporter_writing_external_data)
    E.export_onnx(model, tmp_path / "student.onnx", image_size=SIZE, metadata=metadata_for(MAIN))
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]
    proto = onnx.load(str(tmp_path / "student.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = images(2)
    np.testing.assert_allclose(ort_out(tmp_path / "student.onnx", x), torch_out(model, x), atol=1e-4, rtol=0)


def test_opset_below_18_is_refused(tmp_path, fp32_export):
    with pytest.raises(InputError, match="opset"):
        E.export_onnx(nn.Identity(), tmp_path / "x.onnx", image_size=SIZE, opset=17, metadata={})


# ---------------------------------------------------------------- variants


def test_export_variants_writes_int8_fp16_and_summary(main_run):
    d, paths, summary = main_run["dir"], main_run["paths"], main_run["summary"]
    assert {k: p.name for k, p in paths.items()} == {
        "fp32": "student.onnx", "int8": "student.int8.onnx", "fp16": "student.fp16.onnx"}
    assert summary["exporter"] == "dynamo" and summary["opset"] >= 18
    assert set(summary["variants"]) == {"fp32", "int8", "fp16"}
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
    meta = E.read_metadata(paths["int8"])
    assert json.loads(meta["quantization"])["format"] == "QDQ" and "class_names" in meta

    fp16 = onnx.load(str(paths["fp16"]))
    onnx.checker.check_model(fp16)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert "class_names" in E.read_metadata(paths["fp16"])

    x = images(3)
    want = torch_out(main_run["model"], x)
    for name in ("int8", "fp16"):
        got = ort_out(paths[name], x)
        assert got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(ort_out(paths["fp16"], x), want, atol=0.05, rtol=0)


def test_edge_artifacts(main_run):
    d, edge = main_run["dir"], main_run["summary"]["edge"]
    b1 = d / edge["b1_onnx"]
    dims = onnx.load(str(b1)).graph.input[0].type.tensor_type.shape.dim
    assert [x.dim_value for x in dims] == [1, 3, SIZE, SIZE]
    ort_file = d / edge["ort"]
    assert ort_file.suffix == ".ort" and ort_file.stat().st_size > 0
    assert (d / edge["required_operators_config"]).read_text().strip()
    x = images(1)
    np.testing.assert_allclose(ort_out(ort_file, x), torch_out(main_run["model"], x), atol=1e-4, rtol=0)
    for ep in ("nnapi", "coreml_mlprogram", "coreml_neuralnetwork"):
        u = edge["usability"][ep]
        assert 0 <= u["supported_nodes"] <= u["nodes"] and u["nodes"] > 0 and u["partitions"] >= 0


def test_usability_log_parser():
    text = ("3 partitions with a total of 115/143 nodes can be handled by the NNAPI EP.\n"
            "1 partitions with a total of 143/143 nodes can be handled by the CoreML MLProgram EP.\n")
    got = E.parse_usability_log(text)
    assert got["nnapi"] == {"nodes": 143, "supported_nodes": 115, "partitions": 3}
    assert got["coreml_mlprogram"]["supported_nodes"] == 143


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(method, fp32_export, tmp_path):
    _, path, _ = fp32_export("shufflenet_v2_x0_5")
    info = E.quantize_int8(path, tmp_path / "q.onnx", images(8, seed=3), method, batch_size=4)
    assert info["calibration"] == method
    out = ort_out(tmp_path / "q.onnx", images(2))
    assert out.shape == (2, CLASSES["shufflenet_v2_x0_5"]) and np.isfinite(out).all()


def test_bad_quantization_inputs_are_input_errors(fp32_export, tmp_path):
    _, path, _ = fp32_export(MAIN)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        E.quantize_int8(path, tmp_path / "q.onnx", images(4) * 255, "minmax")
    with pytest.raises(InputError, match="activation_type"):
        E.quantize_int8(path, tmp_path / "q.onnx", images(4), "minmax", activation_type="int4")
    with pytest.raises(InputError, match="method"):
        E.quantize_int8(path, tmp_path / "q.onnx", images(4), "kl")
    assert not (tmp_path / "q.onnx").exists()


def test_class_balanced_sample():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
    idx = E.class_balanced_sample(labels, 12, seed=3)
    assert len(idx) == 12 and len(set(idx.tolist())) == 12 and idx.dtype == np.int64
    assert np.bincount(labels[idx], minlength=3).tolist() == [4, 4, 4]
    assert np.array_equal(idx, E.class_balanced_sample(labels, 12, seed=3))
    assert not np.array_equal(idx, E.class_balanced_sample(labels, 12, seed=4))
    few = E.class_balanced_sample(labels, 30, seed=0)  # class 1 runs out after 5
    counts = np.bincount(labels[few], minlength=3)
    assert counts[1] == 5 and sorted([counts[0], counts[2]]) == [12, 13]
    assert sorted(E.class_balanced_sample(labels, 1000, seed=0).tolist()) == list(range(len(labels)))


# ---------------------------------------------------------------- validation


def _test_set(model, n=40):
    x = images(n, seed=11)
    return x, torch_out(model, x).argmax(1).astype(np.int64)  # torch top-1 is 100 %


def test_validation_passes_on_a_healthy_model(main_run):
    model, paths = main_run["model"], main_run["paths"]
    x, y = _test_set(model)
    # int8 of an untrained net on noise images is not a fair accuracy test: its gate is checked separately.
    cfg = VCFG.model_copy(update={"max_int8_drop": 100.0, "max_fp16_drop": 5.0})
    res = validate_variants(model, paths, x, y, cfg, **FAST)
    assert res["passed"], res
    assert res["torch_top1"] == 100.0 and res["torch_images_per_second"] > 0
    fp32 = res["variants"]["fp32"]
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0 and fp32["test_top1"] == 100.0
    assert set(fp32["parity"]) == {"1", "3", "8"}
    for name, r in res["variants"].items():
        for key in ("max_abs_diff", "top1_agreement", "test_top1", "latency_ms_p50", "images_per_second", "size_bytes"):
            assert r[key] is not None, (name, key)
        assert r["latency_ms_p90"] >= r["latency_ms_p50"] > 0 and r["failures"] == []
        assert r["delta_top1"] == pytest.approx(r["test_top1"] - 100.0)
    json.dumps(res, allow_nan=False)  # validation.json is strict JSON
    check_gates(res)  # does not raise
    _render(validation_table(res))


def test_corrupted_files_fail_their_variant_only(main_run, tmp_path):
    model, fp32 = main_run["model"], main_run["paths"]["fp32"]
    garbage = tmp_path / "student.int8.onnx"
    garbage.write_bytes(b"\x00not an onnx model\xff" * 100)
    truncated = tmp_path / "student.fp16.onnx"
    truncated.write_bytes(fp32.read_bytes()[: fp32.stat().st_size // 2])
    x, y = _test_set(model, n=16)
    res = validate_variants(model, {"fp32": fp32, "int8": garbage, "fp16": truncated}, x, y, VCFG, **FAST)
    assert res["variants"]["fp32"]["passed"] and not res["passed"]
    for name, file in (("int8", garbage), ("fp16", truncated)):
        r = res["variants"][name]
        assert not r["passed"] and r["failures"][0].startswith("not a loadable ONNX model")
        assert file.name in r["failures"][0] and r["size_bytes"] == file.stat().st_size
    with pytest.raises(GateFailed) as e:
        check_gates(res)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg
    assert "int8: not a loadable ONNX model" in msg and "fp16: not a loadable ONNX model" in msg and "fp32:" not in msg
    assert "❌" in _render(validation_table(res))


def test_perturbed_weights_fail_the_fp32_parity_gate(main_run):
    model = copy.deepcopy(main_run["model"])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.add_(0.5 * torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    x, y = _test_set(main_run["model"], n=16)
    res = validate_variants(model, {"fp32": main_run["paths"]["fp32"]}, x, y, VCFG, **FAST)
    r = res["variants"]["fp32"]
    assert not r["passed"] and r["max_abs_diff"] > VCFG.atol
    with pytest.raises(GateFailed) as e:
        check_gates(res)
    assert e.value.exit_code == 1
    assert "fp32" in str(e.value) and "max_abs_diff" in str(e.value) and "atol" in str(e.value)


def test_accuracy_drop_gates_name_variant_and_limit():
    res = {"variants": {
        "fp32": {"passed": True, "failures": []},
        "int8": {"passed": False, "failures": ["top-1 drop 3.20 points > max_int8_drop 1.0"]},
    }}
    with pytest.raises(GateFailed, match=r"int8: top-1 drop 3\.20 points > max_int8_drop 1\.0"):
        check_gates(res)

    from edgedistill.validate import _gate_failures

    cfg = ValidateConfig(max_int8_drop=1.0, max_fp16_drop=0.5)
    assert _gate_failures("int8", {"delta_top1": -3.2}, cfg) == ["top-1 drop 3.20 points > max_int8_drop 1.0"]
    assert _gate_failures("int8", {"delta_top1": -0.9}, cfg) == []
    assert _gate_failures("fp16", {"delta_top1": -0.6}, cfg) == ["top-1 drop 0.60 points > max_fp16_drop 0.5"]
    fails = _gate_failures("fp32", {"max_abs_diff": None, "top1_agreement": 0.5}, cfg)  # NaN outputs
    assert len(fails) == 2 and "max_abs_diff" in fails[0] and "top1_agreement" in fails[1]


def test_validate_onnx_file_without_torch_model(main_run):
    x, y = _test_set(main_run["model"], n=16)
    res = validate_onnx_file(main_run["paths"]["int8"], x, y, VCFG, **FAST)
    r = res["variants"]["student.int8.onnx"]
    assert res["passed"] and r["passed"] and r["max_abs_diff"] is None and r["delta_top1"] is None
    assert 0 <= r["test_top1"] <= 100 and r["latency_ms_p50"] > 0 and r["size_bytes"] > 0
    b1 = main_run["dir"] / "student.b1.onnx"  # a fixed batch-1 model is run image by image
    assert validate_onnx_file(b1, x, y, VCFG, **FAST)["variants"]["student.b1.onnx"]["test_top1"] == 100.0


def test_validation_refuses_bad_test_data(main_run):
    with pytest.raises(InputError, match="test labels"):
        validate_variants(main_run["model"], {}, images(4), np.zeros(3, dtype=np.int64), VCFG)
    with pytest.raises(InputError, match="test images"):
        validate_variants(main_run["model"], {}, images(4)[:, :1], np.zeros(4, dtype=np.int64), VCFG)


def _render(table) -> str:
    import io

    from rich.console import Console

    console = Console(width=160, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()
