"""int8 that keeps its accuracy: the held-out judgement, per-layer sensitivity and float fallback (issue #34), exactly on
made-up logits, then through ONNX Runtime on a tiny model with one layer made fragile on purpose."""

import copy
import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
import torch
from torch import nn

from edgedistill.data.loading import ArrayImages
from edgedistill.deploy.int8_fallback import Int8Fit, Judgement, closest, judge, rank, smallest_fitting
from edgedistill.deploy.int8_view import sensitivity_lines, sensitivity_plot
from edgedistill.deploy.targets import export_all, not_installed, onnx_metadata, read_metadata
from edgedistill.deploy.validate import validate_export
from edgedistill.distill.energy import spread_by_energy
from edgedistill.recipe.deploy import ExportConfig, ValidateConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- pure parts


def test_judge_counts_changed_answers_accuracy_and_sqnr():
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.0, 2.0]])  # one answer flips; noise 2² + 1² = 5
    j = judge(logits, reference, labels=np.array([0, 1, 1, 1]))
    assert j.changed == 25.0 and j.top1 == 100.0  # the flip happens to be right: changed bounds the drop, not the gain
    assert j.sqnr_db == pytest.approx(10 * math.log10(16 / 5))
    assert judge(reference, reference, np.zeros(4, int)).sqnr_db == math.inf


def test_rank_puts_the_noisiest_layer_first_then_the_one_changing_most():
    alone = [judge(np.array([[1.0, 0.0]]) * s, np.array([[1.0, 0.0]]), np.array([0])) for s in (1.0, 0.5, 0.9)]
    assert rank(["a", "b", "c"], alone) == [1, 2, 0]


def test_closest_takes_fewest_changed_answers_then_highest_sqnr_then_the_first_named():
    j = lambda changed, sqnr: Judgement(changed, 50.0, sqnr)  # noqa: E731
    assert closest({"a": j(2.0, 40.0), "b": j(1.0, 20.0), "c": j(1.5, 50.0)}) == "b"
    assert closest({"a": j(1.0, 20.0), "b": j(1.0, 30.0), "c": j(1.0, 25.0)}) == "b"
    assert closest({"a": j(1.0, math.inf), "b": j(1.0, math.inf)}) == "a"


@pytest.mark.parametrize("n", [1, 7, 20, 64])
def test_smallest_fitting_finds_the_least_k_in_about_2_log2_k_builds(n):
    for true_k in range(1, n + 1):
        calls = []
        found = smallest_fitting(n, lambda k: calls.append(k) or k >= true_k)
        assert found == true_k
        assert len(calls) <= 2 * math.ceil(math.log2(true_k + 1)) + 1
        assert all(1 <= k <= n for k in calls)
    assert smallest_fitting(n, lambda k: False) is None


def fake_fit(fragile=("c",), layers=("a", "b", "c", "d", "e")):
    """A model whose int8 file changes half the answers unless the ``fragile`` layers stay in float."""
    reference = np.tile(np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), (50, 1))
    labels = reference.argmax(1)
    broken = np.roll(reference, 1, axis=0) * 0.9 + 0.1
    calls = {"build": [], "only": []}

    def build(float_layers):
        calls["build"].append(sorted(float_layers))
        return reference + 0.01 if set(fragile) <= float_layers else broken

    def only(layer):
        calls["only"].append(layer)
        return broken if layer in fragile else reference + 0.01

    return Int8Fit(list(layers), build, only, reference, labels), calls


def test_fallback_keeps_the_fragile_layer_in_float_and_the_last_build_is_the_file():
    fit, calls = fake_fit()
    r = fit.run(limit=1.0, fallback=True, sensitivity=False)
    assert r["int8"]["changed"] == 100.0 and r["sensitivity"][0]["layer"] == "c"
    assert r["float_layers"] == ["c"] and r["fits"] and r["fallback"]["changed"] == 0.0
    assert calls["only"] == ["a", "b", "c", "d", "e"] and calls["build"][0] == [] and calls["build"][-1] == ["c"]


def test_no_fallback_leaves_the_plain_file_and_an_unasked_sensitivity_is_not_computed():
    fit, calls = fake_fit()
    r = fit.run(limit=1.0, fallback=False, sensitivity=True)
    assert r["float_layers"] == [] and not r["fits"] and r["sensitivity"][0]["layer"] == "c"
    assert calls["build"] == [[]]  # the plain file is the one that stays
    fit, calls = fake_fit(fragile=())
    r = fit.run(limit=1.0, fallback=True, sensitivity=False)
    assert r["fits"] and "sensitivity" not in r and calls["only"] == []


def test_when_nothing_fits_every_layer_is_kept_in_float_and_the_record_says_it_does_not_fit():
    fit, _ = fake_fit(fragile=("c", "zz"))  # "zz" is no layer: no choice fixes it
    r = fit.run(limit=1.0, fallback=True, sensitivity=False)
    assert r["float_layers"] == [row["layer"] for row in r["sensitivity"]] and not r["fits"]
    assert "still over the limit" in "\n".join(sensitivity_lines({"int8": r}))


def test_energy_calibration_spreads_over_the_ranking():
    energy = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 6.0, 7.0])  # ranking: 5, 1, 3, 2, 4, 0, 6, 7
    assert spread_by_energy(energy, 4).tolist() == [0, 1, 2, 7]  # ranks 0.5·2=1, 3, 5, 7 → indices 1, 2, 0, 7
    assert spread_by_energy(energy, 8).tolist() == list(range(8)) and spread_by_energy(energy, 20).tolist() == list(range(8))


# ---------------------------------------------------------------- through ONNX Runtime

SIZE = 8


def quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes: which quadrant of an 8x8 image is brighter."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5, torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        x[i, :, (q // 2) * 4:(q // 2) * 4 + 4, (q % 2) * 4:(q % 2) * 4 + 4] += 0.5
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def trained_model() -> nn.Module:
    """A two-conv classifier trained on the quadrant task."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * SIZE * SIZE, 4))
    x, y = (torch.from_numpy(a) for a in quadrant_images(512, 0))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def fragile_model(trained_model) -> nn.Module:
    """The trained classifier whose second conv has one output channel at +5000 that nothing reads: the float
    model does not care, but 8-bit activations of that tensor lose everything else in it."""
    net = copy.deepcopy(trained_model)
    with torch.no_grad():
        net[2].bias[0] = 5000.0
        net[5].weight.view(4, 8, SIZE * SIZE)[:, 0] = 0.0
    return net.eval()


# the layers that read or write the outlier tensor: the second conv (and its ReLU, for PT2E) and the linear
FRAGILE = {"int8": {"node_conv2d_1", "node_linear"}, "executorch_int8": {"2+3", "5"}, "litert_int8": {"2+3", "5"}}
INT8_TARGETS = [pytest.param(t, marks=pytest.mark.skipif(bool(not_installed([t])), reason=f"{t}: its extra is not installed"))
                for t in FRAGILE]


def export(model, out, target="int8", **int8) -> dict:
    calibration, _ = quadrant_images(64, 1)
    held = ArrayImages(*quadrant_images(200, 2))
    cfg = ExportConfig(formats=["fp32", target] if target == "int8" else [target], int8=int8)
    meta = onnx_metadata([f"c{i}" for i in range(4)], SIZE, (0.0,) * 3, (1.0,) * 3, "frag")
    return export_all(model, out, cfg, image_size=SIZE, calibration_images=calibration, metadata=meta, held_out=held,
                      max_int8_drop=1.0)


def validate(model, out, summary) -> dict:
    cfg = ValidateConfig(parity_batches=[1, 3], latency_runs=2, throughput_batch=8, threads=1, seconds=0.01, rounds=1)
    return validate_export(model, out, summary, ArrayImages(*quadrant_images(300, 3)), cfg)


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_sensitivity_finds_the_fragile_layer_and_fallback_brings_the_gate_back(fragile_model, tmp_path, target):
    summary = export(fragile_model, tmp_path / "plain", target, fallback=False, sensitivity=True)
    plain = summary["variants"][target]["held_out"]
    assert plain["int8"]["changed"] > 10 and plain["float_layers"] == []
    # the layers on the outlier tensor come first, far below the others in SQNR
    fragile = [r for r in plain["sensitivity"] if r["layer"] in FRAGILE[target]]
    assert plain["sensitivity"][:len(fragile)] == fragile and fragile[0]["sqnr_db"] < 10
    assert all(r["sqnr_db"] > 30 for r in plain["sensitivity"][len(fragile):])
    assert not validate(fragile_model, tmp_path / "plain", summary)["variants"][target]["passed"]

    summary = export(fragile_model, tmp_path / "fitted", target)
    info = summary["variants"][target]
    fitted = info["held_out"]
    assert fitted["fits"] and fitted["fallback"]["changed"] <= 1.0 and set(fitted["float_layers"]) <= FRAGILE[target]
    assert info["float_layers"] == sorted(fitted["float_layers"])
    res = validate(fragile_model, tmp_path / "fitted", summary)
    row = res["variants"][target]
    assert row["passed"] and -row["delta_top1"] <= 1.0 and row["float_layers"] == info["float_layers"]
    # (what to ship names the layers kept in float: tests/test_recommend.py; here fp32 may be the faster file)
    assert sensitivity_plot({target: plain})[:4] == b"\x89PNG"


@pytest.mark.skipif(bool(not_installed(["executorch_int8"])), reason="executorch_int8: its extra is not installed")
def test_a_layer_xnnpack_refuses_in_int8_stays_in_float_and_the_program_loads(trained_model, tmp_path):
    """One output channel of the second conv with weights of 1e6 behind a bias that keeps it below 0 (ReLU reads 0):
    its weight scale makes the requantisation scale far above XNNPACK's 256, and ExecuTorch could not load the program."""
    net = copy.deepcopy(trained_model)
    with torch.no_grad():
        net[2].weight[0], net[2].bias[0] = 1e6, -1e9
    summary = export(net, tmp_path, "executorch_int8")
    row = validate(net, tmp_path, summary)["variants"]["executorch_int8"]
    assert row["passed"], row  # it loads, and int8 elsewhere keeps the answers
    settings = summary["variants"]["executorch_int8"]["quantization"]
    assert list(settings["runtime_refused"]) == ["2+3"] and settings["runtime_refused"]["2+3"] >= 256
    assert "2+3" in settings["float_layers"]


def test_the_onnx_file_records_the_layers_it_keeps_in_float(fragile_model, tmp_path):
    info = export(fragile_model, tmp_path)["variants"]["int8"]
    assert json.loads(read_metadata(tmp_path / "student.int8.onnx")["quantization"])["float_layers"] == info["float_layers"] != []


def test_entropy_calibration_clips_an_outlier_minmax_keeps_and_auto_keeps_the_closer_file(fragile_model, tmp_path):
    """ONNX Runtime's entropy calibration, as quantize_static runs it, is MinMax to the last digit (128 bins for 128
    levels); with the histogram it needs, it clips the +5000 channel's range and keeps the rest of that tensor. ``auto``
    judges every method's file on the held-out images and keeps the one changing the fewest answers."""
    def built(method: str) -> tuple[dict, dict[str, float]]:
        info = export(fragile_model, tmp_path / method, fallback=False, calibration={"method": method})["variants"]["int8"]
        graph = onnx.load(str(tmp_path / method / "student.int8.onnx")).graph
        init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return info, {n.input[0]: float(init[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear" and init[n.input[1]].size == 1}

    (_, minmax), (_, entropy), (auto, chosen) = built("minmax"), built("entropy"), built("auto")
    assert minmax.keys() == entropy.keys()
    outlier = max(minmax, key=minmax.get)  # the second conv's output, whose range the +5000 channel sets
    assert minmax[outlier] > 5000 / 256 and entropy[outlier] < minmax[outlier] / 4

    judged = auto["calibration_auto"]["judged"]
    assert list(judged) == ["minmax", "entropy", "percentile"]
    assert judged["minmax"]["changed"] > 10  # the outlier's range costs minmax the answers the fallback test sees
    best = auto["calibration_auto"]["chosen"]
    assert auto["calibration"] == best and judged[best]["changed"] == min(j["changed"] for j in judged.values())
    assert auto["held_out"]["int8"]["changed"] == judged[best]["changed"]  # the file that stays is the one judged
    # percentile (99.999 %) still reaches into the outlier channel, an eighth of that tensor: entropy's clipping wins
    assert best == "entropy" and chosen == entropy


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_per_tensor_weights_are_what_the_file_says(fragile_model, tmp_path, target):
    info = export(fragile_model, tmp_path, target, granularity="per_tensor", fallback=False)["variants"][target]
    settings = info if target == "int8" else info["quantization"]
    assert settings["per_channel"] is False
