"""What to ship (pure): per deployment kind, the fastest variant meant for it that passed; a smaller one measured
slower here is named with its per-round ratio and its target's note; any target's kinds work, by name alone."""

from __future__ import annotations

from edgedistill.deploy.recommend import recommend


def v(path, mb, top1, ms, ips, deploy_to=("server", "edge"), passed=True):
    return {"path": path, "size_bytes": int(mb * 1e6), "test_top1": top1, "passed": passed, "deploy_to": list(deploy_to),
            "latency_ms_samples": ms, "images_per_second_samples": ips}


NOTES = {"int8": "a quarter of the size; fast where the CPU has int8 kernels", "tiny": "runs on the NPU"}
VARIANTS = {
    "fp32": v("student.onnx", 2.4, 60.1, [0.22, 0.20, 0.24], [8000, 8200, 8100]),
    "int8": v("student.int8.onnx", 0.6, 59.8, [0.46, 0.40, 0.50], [4500, 4600, 4550]),
    "mobile": v("student.b1.ort", 2.4, 60.1, [0.21, 0.30, 0.23], [7000, 7100, 7050], deploy_to=("edge",)),
    "tiny": v("student.tiny", 0.3, 58.0, [0.90, 0.80, 1.00], [900, 950, 1000], deploy_to=("edge", "npu")),
    "broken": v("student.x", 0.1, 10.0, [0.01] * 3, [99999] * 3, passed=False),
}


def test_one_line_per_kind_with_the_fastest_that_passed():
    recs = recommend(VARIANTS, note=NOTES.get)
    assert [r["kind"] for r in recs] == ["server", "edge", "npu"]
    server, edge, npu = recs
    assert server["variant"] == "fp32" and server["criterion"] == "images_per_second_samples"  # highest median img/s
    # central 95 % of 8000, 8100, 8200: 2.5 % of the two gaps of 100 in from each end
    assert server["line"].startswith("server CPU: ship fp32 (student.onnx): 2.40 MB, 60.10% top-1, 8,100 [8,005–8,195] img/s")
    assert edge["variant"] == "fp32" and edge["figure"]["median"] == 0.22  # mobile's median is 0.23
    assert npu["variant"] == "tiny" and npu["line"].startswith("npu: ship tiny")


def test_a_smaller_variant_slower_here_is_named_with_its_per_round_ratio_and_why():
    server = recommend(VARIANTS, note=NOTES.get)[0]
    [int8] = server["slower_here"]
    # per round: 8000/4500, 8200/4600, 8100/4550
    assert int8["variant"] == "int8" and int8["smaller_by"] == 4.0
    assert int8["slower_by"]["median"] == round(8100 / 4550, 4) and int8["slower_by"]["n"] == 3
    assert "int8 is 4.0× smaller but 1.78 [1.78–1.78]× slower on this machine" in server["line"]
    assert NOTES["int8"] in server["line"]


def test_a_smaller_variant_as_fast_is_not_called_slower():
    variants = {"fp32": VARIANTS["fp32"], "int8": v("student.int8.onnx", 0.6, 60.0, [0.2] * 3, [8200, 8300, 8250])}
    server = recommend(variants, note=NOTES.get)[0]
    assert server["variant"] == "int8" and server["slower_here"] == [] and "slower" not in server["line"]


def test_a_kind_with_nothing_that_passed_says_so():
    recs = recommend({"fp32": v("student.onnx", 2.4, 60.0, [0.2] * 3, [1] * 3, passed=False)}, note=NOTES.get)
    assert [r["variant"] for r in recs] == [None, None]
    assert recs[0]["line"] == "server CPU: nothing to ship: no variant meant for it (fp32) passed its gates"


def test_the_registered_targets_say_where_they_pay_off():
    from edgedistill.deploy.targets import TARGETS

    for name in TARGETS:
        t = TARGETS.get(name)
        assert t.deploy_to and set(t.deploy_to) <= {"server", "edge"}, name
    assert "kernels" in TARGETS.get("int8").device_note() and TARGETS.get("fp16").deploy_to == ("edge",)


def test_one_formatter_for_a_median_and_its_spread_as_validation_stores_it():
    from edgedistill.base.timing import fmt_spread, spread_of

    row = {"latency_ms_p50": 0.2153, "latency_ms_interval": [0.2101, 0.2249], "images_per_second": 8123.4,
           "images_per_second_interval": [8000.2, 8200.9], "torch_images_per_second": 5000.0}
    assert fmt_spread(spread_of(row, "latency_ms")) == "0.215 [0.21–0.225]"
    assert fmt_spread(spread_of(row, "images_per_second"), "{:,.0f}") == "8,123 [8,000–8,201]"
    assert fmt_spread(spread_of(row, "torch_images_per_second"), "{:,.0f}") == "5,000"  # no interval: the median alone
    assert spread_of(row, "missing") is None and fmt_spread(None) == "–"
    # a row that also holds a spread dict under the bare key reads the flat ``_p50`` figure
    assert spread_of({"latency_ms": {"median": 1}, "latency_ms_p50": 2, "latency_ms_interval": [1, 3]}, "latency_ms") == \
        {"median": 2, "lo": 1, "hi": 3}


def test_an_int8_file_with_layers_in_float_says_how_many():
    rows = {"int8": {**v("student.int8.onnx", 1.1, 59.9, [0.3] * 3, [5000] * 3), "float_layers": ["a", "b", "c"]}}
    [server, edge] = recommend(rows, note=NOTES.get)
    assert server["line"].startswith("server CPU: ship int8 (student.int8.onnx, 3 layers kept in float to hold its accuracy): 1.10 MB")
    assert "kept in float" not in recommend({"int8": v("student.int8.onnx", 0.6, 59.8, [0.3] * 3, [5000] * 3)})[0]["line"]


def test_an_int8_file_made_after_quantisation_aware_training_says_so():
    rows = {"int8": {**v("student.int8.onnx", 0.6, 60.1, [0.3] * 3, [5000] * 3), "qat": True, "float_layers": ["a"]}}
    [server, _] = recommend(rows, note=NOTES.get)
    assert server["line"].startswith("server CPU: ship int8 (student.int8.onnx, quantisation-aware trained, 1 layer kept in float")
