"""Energy scoring math: exact to the brief's definitions, deterministic with ties."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgedistill.distill.energy import HIGH, LOW, MIDDLE, EnergyIndex, assign_groups, energy_from_logits, group_count


def naive_energy(row, t):
    m = max(v / t for v in row)
    return -t * (m + math.log(sum(math.exp(v / t - m) for v in row)))


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_energy_matches_naive_and_is_finite(t, scale):
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    e = energy_from_logits(z, t)
    assert torch.isfinite(e).all()
    for row, got in zip(z.tolist(), e.tolist()):
        assert got == pytest.approx(naive_energy(row, t), rel=1e-5, abs=1e-3)


def test_groups_follow_the_brief_definition():
    rng = np.random.default_rng(0)
    energy = rng.normal(size=103).astype(np.float32)
    r = 0.2
    groups, low, high = assign_groups(energy, r)
    k = int(r * len(energy))
    s = np.sort(energy)
    assert low == s[k - 1] and high == s[len(energy) - k]
    assert (groups == LOW).sum() == k and (groups == HIGH).sum() == k
    assert energy[groups == LOW].max() <= low and energy[groups == HIGH].min() >= high
    assert (groups == MIDDLE).sum() == len(energy) - 2 * k


def test_ties_are_split_by_dataset_order():
    energy = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 1.0], dtype=np.float32)
    groups, _, _ = assign_groups(energy, 0.25)  # k = 2
    assert groups.tolist() == [0, LOW, LOW, 0, 0, HIGH, HIGH, 0]


def test_zero_fraction_puts_everything_in_the_middle():
    groups, low, high = assign_groups(np.arange(10, dtype=np.float32), 0.0)
    assert (groups == 0).all() and low == -math.inf and high == math.inf


def test_group_count_is_robust_to_float_error():
    assert group_count(10, 0.3) == 3  # 0.3 * 10 = 2.9999999999999996 in floating point
    assert group_count(7, 0.5) == 3


def _index(energy, r=0.25, grouping="static", direction="paper", t=1.0):
    groups, low, high = assign_groups(energy, r)
    cfg = SimpleNamespace(temperature=t, grouping=grouping, direction=direction)
    return EnergyIndex.from_scores(energy, np.arange(len(energy)), groups, low, high, cfg), groups


def test_static_lookup_returns_score_stage_groups():
    energy = np.linspace(-5, 5, 8).astype(np.float32)
    idx, groups = _index(energy)
    g, q = idx.lookup(torch.tensor([0, 7, 3]), torch.zeros(3, 4))
    assert g.tolist() == [LOW, HIGH, 0]
    assert q.tolist() == pytest.approx([0 / 8, 7 / 8, 3 / 8])


def test_reversed_direction_swaps_groups():
    energy = np.linspace(-5, 5, 8).astype(np.float32)
    idx, _ = _index(energy, direction="reversed")
    g, q = idx.lookup(torch.tensor([0, 7]), torch.zeros(2, 4))
    assert g.tolist() == [HIGH, LOW]
    assert q[0] > q[1]


def test_dynamic_grouping_uses_live_teacher_energy():
    energy = np.linspace(-5, 5, 8).astype(np.float32)
    idx, _ = _index(energy, grouping="dynamic")
    # logits whose energy (T=1) is very low → confident → low group, whatever the index says
    confident = torch.tensor([[50.0, 0, 0, 0]])
    uncertain = torch.full((1, 4), -50.0)
    g1, _ = idx.lookup(torch.tensor([7]), confident)
    g2, _ = idx.lookup(torch.tensor([0]), uncertain)
    assert g1.tolist() == [LOW] and g2.tolist() == [HIGH]
