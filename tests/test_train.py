"""The training loop: resume (at an epoch boundary and mid-epoch) gives the weights of an uninterrupted run;
the distillation objective calls the teacher only for losses that read it."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from interrupt_at import Interrupting

from edgedistill.data.loading import ImageDataset
from edgedistill.data.sources import Split
from edgedistill.distill.energy import EnergyIndex
from edgedistill.base.errors import Interrupted, TrainingDiverged
from edgedistill.distill.losses import LOSSES
from edgedistill.models.students import build_student
from edgedistill.distill.objectives import (
    Augmenter,
    CrossEntropyObjective,
    DistillObjective,
    Objective,
)
from edgedistill.recipe.schema import EnergyConfig, TrainConfig
from edgedistill.distill.train import LoopConfig, class_tally, fit, lr_factor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_data(n=48, size=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 80, size=(n, size, size, 3)).astype(np.uint8)
    for c in range(classes):  # a learnable signal: one bright channel per class
        x[y == c, :, :, c] += 150
    return Split(y.astype(np.int64), images=x)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_student("shufflenet_v2_x0_5", 3, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)


CFG = TrainConfig(epochs=3, optimizer={"lr": 0.02}, schedule={"name": "cosine", "warmup_epochs": 1})


def train(tmp, epochs=3, resume=False, objective=None, model=None, num_workers=0):
    cfg = CFG.model_copy(update={"epochs": epochs})
    split = tiny_data()
    loop = LoopConfig(tmp / "ckpt", tmp / "metrics.jsonl", batch_size=16, eval_batch_size=32, seed=3, resume=resume, num_workers=num_workers)
    model = model or tiny_model()
    result = fit(model, objective or CrossEntropyObjective(), ImageDataset(split, 16, True, seed=3), ImageDataset(split, 16, False), cfg, loop, torch.device("cpu"))
    return model, result


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def batch_loss(model) -> float:
    """Cross-entropy on all the (unaugmented) training images, BN in batch-statistics mode."""
    split = tiny_data()
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255
    model.train()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), torch.from_numpy(split.labels)))


def test_training_learns_and_writes_metrics(tmp_path):
    before = batch_loss(tiny_model())
    model, result = train(tmp_path, epochs=8)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert {"epoch", "train_loss", "test_top1", "epoch_seconds", "images_per_second", "lr"} <= rows[0].keys()
    assert batch_loss(model) < 0.8 * before
    assert (tmp_path / "ckpt" / "last.pt").exists() and (tmp_path / "ckpt" / "best.pt").exists()


def test_same_seed_same_weights(tmp_path):
    a, _ = train(tmp_path / "a")
    b, _ = train(tmp_path / "b")
    assert same_weights(a, b)


def test_evaluation_counts_per_class_without_building_a_graph():
    """Every epoch's evaluation goes through class_tally: no autograd graph (memory, time), and counts per class."""
    seen_grad = []

    class Spy(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            seen_grad.append(torch.is_grad_enabled())
            return self.net(x)

    split = tiny_data()
    correct, seen = class_tally(Spy(tiny_model()), ImageDataset(split, 16, False), 32, torch.device("cpu"))
    assert seen_grad and not any(seen_grad)
    assert seen.tolist() == np.bincount(split.labels, minlength=3).tolist() and (correct <= seen).all()


def test_loader_workers_that_live_across_epochs_change_nothing(tmp_path):
    """The epoch travels with each index (EpochSampler), so persistent workers draw every epoch's crops and flips
    as the main process does: the weights after 3 epochs are the same with 0 or 2 workers."""
    a, _ = train(tmp_path / "a")
    b, _ = train(tmp_path / "b", num_workers=2)
    assert same_weights(a, b)


def test_resume_at_epoch_boundary_matches_uninterrupted(tmp_path):
    full, _ = train(tmp_path / "full", epochs=3)
    # the first run trains 2 of 3 epochs (its schedule is built for 3: stop it with the flag after epoch 2)
    cfg_epochs = 3

    class StopAfter(Objective):
        def __init__(self, steps):
            self.steps, self.inner = steps, CrossEntropyObjective()

        def __call__(self, *args):
            self.steps -= 1
            if self.steps == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return self.inner(*args)

    with pytest.raises(Interrupted):
        train(tmp_path / "part", epochs=cfg_epochs, objective=StopAfter(2 * 3))  # 3 steps an epoch: stop at the end of epoch 2
    resumed, _ = train(tmp_path / "part", epochs=cfg_epochs, resume=True, model=tiny_model(seed=99))
    assert same_weights(full, resumed)
    rows = [json.loads(line)["epoch"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    full, _ = train(tmp_path / "full")

    class StopAt(Objective):
        def __init__(self):
            self.calls, self.inner = 0, CrossEntropyObjective()

        def __call__(self, *args):
            self.calls += 1
            if self.calls == 5:  # epoch 2, step 2 of 3
                os.kill(os.getpid(), signal.SIGINT)
            return self.inner(*args)

    with pytest.raises(Interrupted, match="step"):
        train(tmp_path / "part", objective=StopAt())
    ckpt = torch.load(tmp_path / "part" / "ckpt" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    resumed, _ = train(tmp_path / "part", resume=True, model=tiny_model(seed=5))
    assert same_weights(full, resumed)


def dropout_student(seed=0):
    """MobileNetV2 with heavy dropout: a resume that replays a step with other random draws shows in the weights."""
    torch.manual_seed(seed)
    return build_student("mobilenet_v2", 3, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, width=0.25, dropout=0.5)


def heda_objective() -> DistillObjective:
    """Energy KD with CutMix extras on the upper half of the energy ranking (every batch mixes some samples)."""
    n = len(tiny_data())
    energy = np.random.default_rng(1).normal(size=n).astype(np.float32)
    groups = np.zeros(n, np.int8)
    order = np.argsort(energy)
    groups[order[: n // 5]], groups[order[-(n // 5):]] = -1, 1
    index = EnergyIndex.from_scores(energy, np.arange(n), groups, float(energy[order[n // 5 - 1]]), float(energy[order[-(n // 5)]]), EnergyConfig())
    teacher = tiny_model(seed=7).eval()
    return DistillObjective(teacher, LOSSES.get("energy_kd"), {}, index, Augmenter("cutmix", None, "high", 0.5))


@pytest.mark.parametrize("call", [1, 2, 4, 6, 8])  # 3 steps an epoch: mid-epoch, at an epoch's end, in the last epoch
def test_resume_at_any_step_with_heda_and_dropout_is_bit_exact(tmp_path, call):
    full, _ = train(tmp_path / "full", objective=heda_objective(), model=dropout_student())
    with pytest.raises(Interrupted):
        train(tmp_path / "part", objective=Interrupting(heda_objective(), signal.SIGINT, call), model=dropout_student())
    ckpt = torch.load(tmp_path / "part" / "ckpt" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == divmod(call, 3)
    resumed, _ = train(tmp_path / "part", resume=True, objective=heda_objective(), model=dropout_student(seed=5))
    assert same_weights(full, resumed)


def test_the_step_seed_decides_the_heda_draws_and_dropout(tmp_path, monkeypatch):
    """Guards the test above against passing vacuously: with the same data order but other step seeds (other
    dropout masks and CutMix draws) the weights differ, so a resume that replayed a step's draws wrongly would show."""
    import edgedistill.distill.train as train_module

    a, _ = train(tmp_path / "a", objective=heda_objective(), model=dropout_student())
    seed_of = train_module.step_seed
    monkeypatch.setattr(train_module, "step_seed", lambda *args: seed_of(*args) + 12345)
    b, _ = train(tmp_path / "b", objective=heda_objective(), model=dropout_student())
    assert not same_weights(a, b)


def test_non_finite_loss_stops_with_the_parts(tmp_path):
    class Bad(Objective):
        def __call__(self, model, x, y, idx, epoch):
            logits = model(x)
            return {"loss": logits.sum() * float("nan"), "kd": torch.tensor(1.0)}, logits

    with pytest.raises(TrainingDiverged, match="non-finite loss.*kd=1"):
        train(tmp_path, objective=Bad())


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", [], 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", [], 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", [], 0.1) == pytest.approx(0.0)
    assert lr_factor(55, 100, 0, "multistep", [50, 80], 0.1) == pytest.approx(0.1)
    assert lr_factor(85, 100, 0, "multistep", [50, 80], 0.1) == pytest.approx(0.01)


class CountingTeacher(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.calls, self.classes = 0, classes

    def forward(self, x):
        self.calls += 1
        return torch.randn(len(x), self.classes)


@pytest.mark.parametrize("loss, teacher_calls", [("ce", 0), ("kd", 1), ("energy_kd", 1)])
def test_teacher_runs_only_for_losses_that_read_it(loss, teacher_calls):
    """The no-teacher baseline must not pay for a teacher forward pass; every distillation loss must get one."""
    energy = np.linspace(-5, 5, 8).astype(np.float32)
    index = EnergyIndex.from_scores(energy, np.arange(8), np.array([-1, -1, 0, 0, 0, 0, 1, 1]), -3.0, 3.0, EnergyConfig())
    teacher = CountingTeacher(3)
    objective = DistillObjective(teacher, LOSSES.get(loss), {}, index)
    model = tiny_model()
    x = torch.rand(8, 3, 16, 16)
    losses, logits = objective(model, x, torch.arange(8) % 3, torch.arange(8), 0.0)
    losses["loss"].backward()
    assert teacher.calls == teacher_calls and logits.shape == (8, 3) and torch.isfinite(losses["loss"])
