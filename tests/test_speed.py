"""Speed without changing results: the teacher in its fastest runtime gives the eager teacher's logits, the
teacher-logit cache replays a run bit for bit, and the speed decisions (layout, compilation, loader workers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import dropout_student, heda_objective, same_weights, tiny_data, train

from edgedistill.pipeline.context import loader_workers, resolve
from edgedistill.base.errors import InputError
from edgedistill.models.students import Normalized, build_classifier
from edgedistill.models.teachers import freeze
from edgedistill.pipeline.planning import compile_pays
from edgedistill.distill.teacher_cache import LogitCache
from edgedistill.distill.teacher_runtime import PARITY_ATOL, Measured, build_runtime, candidates, choose_runtime, pick

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the teacher's runtime


def test_pick_takes_the_fastest_faithful_runtime():
    measured = [
        Measured("torch", False, seconds=0.050, max_abs_diff=0.0),
        Measured("torch", True, seconds=0.040, max_abs_diff=2e-6),
        Measured("onnxruntime", False, seconds=0.030, max_abs_diff=3e-4),  # fastest, but not the teacher's logits
        Measured("compile", False, problem="no C++ compiler"),
    ]
    assert (pick(measured, logit_scale=0.8).name, pick(measured, logit_scale=0.8).channels_last) == ("torch", True)
    with pytest.raises(InputError, match=r"teacher.runtime: no runtime.*onnxruntime: max \|Δ\| 0.0003 > 0.0001; compile: no C\+\+ compiler"):
        pick([measured[2], measured[3]], logit_scale=0.8)


def test_the_parity_bar_grows_with_the_teachers_logits():
    """float32 rounding grows with the logits summed: 3e-4 on logits of 5 is rounding (bar 5e-4), on logits of 2 it is not."""
    fast = Measured("onnxruntime", False, seconds=0.030, max_abs_diff=3e-4)
    slow = Measured("torch", False, seconds=0.050, max_abs_diff=0.0)
    assert pick([fast, slow], logit_scale=5.0) is fast
    assert pick([fast, slow], logit_scale=2.0) is slow
    with pytest.raises(InputError, match=r"> 0.0002 \(0.0001 × the largest \|logit\|, 2\)"):
        pick([fast], logit_scale=2.0)


def test_candidates_per_device_and_recipe():
    assert candidates("auto", CPU, onnx_only=False) == [("torch", False), ("torch", True), ("onnxruntime", False)]
    assert candidates("auto", CUDA, onnx_only=False) == [("torch", False), ("torch", True), ("compile", False), ("compile", True)]
    assert candidates("onnxruntime", CPU, onnx_only=False) == [("onnxruntime", False)]
    assert candidates("torch", CUDA, onnx_only=False) == [("torch", False)]  # named: fixed, no timing decides it
    assert candidates("auto", CUDA, onnx_only=True) == [("onnxruntime", False)]  # only ONNX Runtime runs an ONNX file


def small_teacher():
    torch.manual_seed(0)
    net = Normalized(build_classifier("resnet18", 10, image_size=16, small_input=True), (0.5,) * 3, (0.25,) * 3)
    for m in net.modules():  # BN statistics away from 0/1, so that folding them has something to get right
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return freeze(net)


def test_every_runtime_candidate_gives_the_eager_teachers_logits(tmp_path):
    net = small_teacher()
    fast, record = choose_runtime(net, wanted="auto", device=CPU, batch=8, image_size=16, onnx_path=None, export_to=tmp_path / "teacher.onnx")
    assert {(c["runtime"], c["channels_last"]) for c in record["candidates"]} == {("torch", False), ("torch", True), ("onnxruntime", False)}
    assert record["parity_tolerance"] == PARITY_ATOL * max(1.0, record["logit_scale"])
    assert all(c["problem"] is None and c["max_abs_diff"] <= record["parity_tolerance"] for c in record["candidates"]), record["candidates"]
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # another batch size than the one measured
    with torch.no_grad():
        eager = net(x)
    for c in record["candidates"]:  # (whichever won: the export is there for the onnxruntime candidate)
        out = build_runtime(net, {**record, **c, "onnx": str(tmp_path / "teacher.onnx")}, CPU)(x)
        assert (out - eager).abs().max() <= PARITY_ATOL * max(1.0, float(eager.abs().max())), c
    rebuilt = build_runtime(net, json.loads(json.dumps(record)), CPU)  # what a later stage does from teacher.json
    assert torch.equal(rebuilt(x), fast(x))


def test_the_fast_teachers_logits_can_enter_a_loss_that_is_backpropagated():
    """The torch runtime runs under inference_mode; its output must still be a normal tensor a loss can save."""
    net = small_teacher()
    fast = build_runtime(net, {"runtime": "torch", "channels_last": True}, CPU)
    x = torch.rand(4, 3, 16, 16)
    student = torch.nn.Linear(3 * 16 * 16, 10)
    loss = torch.nn.functional.kl_div(student(x.flatten(1)).log_softmax(1), fast(x).softmax(1), reduction="batchmean")
    loss.backward()
    assert student.weight.grad is not None and torch.isfinite(loss)


def test_a_runtime_that_fails_is_recorded_not_fatal(tmp_path):
    class Untraceable(torch.nn.Module):  # exports to ONNX fail on a Python-side branch on the values
        def forward(self, x):
            return x.flatten(1)[:, :10] * (2.0 if float(x.sum()) > 0 else 1.0)

    net = freeze(Untraceable())
    fast, record = choose_runtime(net, wanted="auto", device=CPU, batch=4, image_size=8, onnx_path=None, export_to=tmp_path / "t.onnx")
    by_name = {c["runtime"]: c for c in record["candidates"]}
    assert record["runtime"] == "torch" and by_name["onnxruntime"]["problem"]


# ---------------------------------------------------------------- the teacher-logit cache


class CountingTeacher(torch.nn.Module):
    """The heda objective's teacher, counting the images it is run on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


def cached_objective(folder, key=None):
    objective = heda_objective()
    objective.teacher = CountingTeacher(objective.teacher)
    if folder is not None:
        objective.cache = LogitCache(folder, key or {"teacher": "t", "seed": 3}, n_train=len(tiny_data()), num_classes=3)
        objective.cache.open()
    return objective


def test_a_replayed_run_is_bit_identical_to_a_live_one_and_skips_the_teacher_on_clean_views(tmp_path):
    live_obj, cold_obj, warm_obj = cached_objective(None), cached_objective(tmp_path / "cache"), cached_objective(tmp_path / "cache")
    live, _ = train(tmp_path / "live", objective=live_obj, model=dropout_student())
    cold, _ = train(tmp_path / "cold", objective=cold_obj, model=dropout_student())
    assert cold_obj.cache.hits == 0 and len(cold_obj.cache.cached_epochs(3)) == 3
    warm, _ = train(tmp_path / "warm", objective=warm_obj, model=dropout_student())
    assert same_weights(live, cold) and same_weights(live, warm)
    n_clean = 3 * len(tiny_data())  # 3 epochs of the 48 images
    assert cold_obj.teacher.images > n_clean  # clean views and HE-DA extras
    assert warm_obj.cache.misses == 0 and warm_obj.teacher.images == cold_obj.teacher.images - n_clean  # extras only


def test_another_key_gets_its_own_folder_and_a_mismatched_or_damaged_cache_is_rebuilt(tmp_path):
    first = cached_objective(tmp_path / "cache", {"teacher": "t", "seed": 3})
    train(tmp_path / "a", objective=first, model=dropout_student())
    other = cached_objective(tmp_path / "cache", {"teacher": "t", "seed": 4})  # e.g. another seed or teacher
    assert other.cache.dir != first.cache.dir and other.cache.cached_epochs(3) == []

    (first.cache.dir / "meta.json").write_text(json.dumps({"format": 1, "teacher": "someone else's"}))
    rebuilt = cached_objective(tmp_path / "cache", {"teacher": "t", "seed": 3})
    assert rebuilt.cache.cached_epochs(3) == []  # the folder was emptied, not replayed

    train(tmp_path / "b", objective=rebuilt, model=dropout_student())
    rebuilt.cache.epoch_file(1).write_bytes(b"not an npz")
    again = cached_objective(tmp_path / "cache", {"teacher": "t", "seed": 3})
    b2, _ = train(tmp_path / "c", objective=again, model=dropout_student())
    assert again.cache.misses == 3  # epoch 1's three steps ran live …
    with np.load(again.cache.epoch_file(1)) as z:  # … and rewrote the file
        assert z["logits"].shape == (len(tiny_data()), 3)


def test_a_partly_run_epoch_is_not_stored(tmp_path):
    import signal

    from interrupt_at import Interrupting

    from edgedistill.base.errors import Interrupted

    objective = cached_objective(tmp_path / "cache")
    with pytest.raises(Interrupted):
        train(tmp_path / "part", objective=Interrupting(objective, signal.SIGINT, 4), model=dropout_student())
    assert objective.cache.cached_epochs(3) == [0]  # epoch 0 ran whole; epoch 1 stopped after its first step
    resumed = cached_objective(tmp_path / "cache")
    train(tmp_path / "part", resume=True, objective=resumed, model=dropout_student())
    assert resumed.cache.cached_epochs(3) == [0, 2]  # the resumed epoch 1 ran only in part here


# ---------------------------------------------------------------- decisions


def test_compile_pays_only_when_the_run_repays_it_twice():
    assert compile_pays(0.100, 0.090, compile_seconds=60, total_steps=20_000)  # saves 200 s against 2 × 60 s
    assert not compile_pays(0.100, 0.090, compile_seconds=60, total_steps=10_000)  # saves 100 s < 120 s
    assert not compile_pays(0.100, 0.110, compile_seconds=1, total_steps=10**6)  # slower compiled


def test_loader_workers_and_layout_defaults():
    assert loader_workers(3, CUDA, 1, in_memory=True) == 3
    assert loader_workers("auto", CPU, 1, in_memory=True) == 0
    assert 1 <= loader_workers("auto", CPU, 1, in_memory=False) <= 4
    assert 1 <= loader_workers("auto", CUDA, 1, in_memory=True) <= 8
    assert resolve("auto", "channels_last", CUDA, None) and not resolve("auto", "channels_last", CPU, None)
    assert resolve("auto", "compile", CPU, {"compile": {"use": True}})
    assert not resolve(False, "compile", CUDA, {"compile": {"use": True}})
