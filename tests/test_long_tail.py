"""Long-tailed training splits: shot groups by training count, top-1 per group in training, validation and the
report, and the CIFAR ResNets that are the CIFAR-LT literature's teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedistill.base.shots import class_counts, shot_groups, shot_top1
from edgedistill.data.sources import long_tail_indices
from edgedistill.models.cifar_resnet import DEPTHS
from edgedistill.models.students import build_classifier
from edgedistill.pipeline.report import _long_tail_section


def test_groups_split_at_more_than_100_and_fewer_than_20_training_images():
    counts = {0: 101, 1: 100, 2: 20, 3: 19, 4: 1, 5: 0}
    labels = np.repeat(list(counts), list(counts.values()))
    assert shot_groups(labels, 6) == {"many": [0], "medium": [1, 2], "few": [3, 4, 5]}


def test_a_split_in_one_group_is_not_long_tailed():
    assert shot_groups(np.repeat(np.arange(10), 400), 10) is None  # balanced CIFAR-100's 400 a class
    assert shot_groups(np.repeat(np.arange(10), 5), 10) is None  # all few-shot: no tail to tell apart


def test_the_cifar_lt_profile_at_imbalance_100_has_all_three_groups():
    labels = np.repeat(np.arange(100), 400)
    kept = labels[long_tail_indices(labels, 100, 100, seed=0)]
    groups = shot_groups(kept, 100)
    counts = np.bincount(kept, minlength=100)
    assert counts[0] == 400 and counts[-1] == 4 and 8_000 < len(kept) < 9_000
    assert all(groups[g] for g in ("many", "medium", "few"))
    assert groups["many"] == list(range(len(groups["many"])))  # the head is the first classes, the tail the last


def test_group_top1_counts_images_not_classes():
    # class 0 (many): 9 of 10 right; class 1 (few): 0 of 2; class 2 (few): 2 of 2
    labels = np.array([0] * 10 + [1, 1, 2, 2])
    predicted = np.array([0] * 9 + [1] + [0, 0, 2, 2])
    correct, seen = class_counts(predicted, labels, 3)
    assert correct.tolist() == [9, 0, 2] and seen.tolist() == [10, 2, 2]
    assert shot_top1(correct, seen, {"many": [0], "medium": [], "few": [1, 2]}) == {"many": 90.0, "medium": None, "few": 50.0}


def test_counts_add_up_over_batches():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    whole = class_counts(predicted, labels, 7)
    parts = [class_counts(predicted[i:i + 64], labels[i:i + 64], 7) for i in range(0, 500, 64)]
    assert np.array_equal(sum(c for c, _ in parts), whole[0]) and np.array_equal(sum(s for _, s in parts), whole[1])


def test_the_report_shows_groups_only_for_a_long_tailed_run():
    shots = {"many": 70.0, "medium": 40.0, "few": 10.0}
    val = {"shot_classes": {"many": 35, "medium": 35, "few": 30},
           "variants": {"fp32": {"path": "student.onnx", "test_top1": 41.5, "shot_top1": shots}}}
    lines = _long_tail_section({"test_top1": 45.0, "shot_top1": shots}, [{"test_top1": 41.5, "shot_top1": shots}], val)
    table = "\n".join(lines)
    assert "| model | overall | many (35 classes) | medium (35 classes) | few (30 classes) |" in table
    assert "| `student.onnx` | 41.50% | 70.00% | 40.00% | 10.00% |" in table and "| teacher | 45.00% |" in table
    assert _long_tail_section({"test_top1": 45.0}, [{"test_top1": 41.5}], {"variants": {}}) == []


@pytest.mark.parametrize("name", list(DEPTHS))
def test_cifar_resnets_have_the_papers_depth_and_size(name):
    net = build_classifier(name, 100, image_size=32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == int(name.removeprefix("resnet"))  # 6n + 2 layers: 3×3 convs plus the classifier
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    if name == "resnet56":  # the shared teacher's architecture: 0.86 M parameters (../shared/teachers/README.md)
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 0.86
