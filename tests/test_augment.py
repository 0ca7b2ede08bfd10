"""Selective CutMix / MixUp (HE-DA): selection, contract of every registered augmentation, seeding, Beta sampler."""

from __future__ import annotations

import math

import pytest
import torch

from edgedistill.distill.augment import AUGMENTS, MixResult, cutmix, mixed_targets, mixup, sample_beta, selection_mask

METHODS = AUGMENTS.names()
DEFAULT_ALPHA = {"cutmix": 1.0, "mixup": 0.2}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 16, c: int = 3, h: int = 12, w: int = 10, seed: int = 123) -> torch.Tensor:
    # continuous random values: a pixel equal to a source's pixel came from that source
    return torch.randn(b, c, h, w, generator=gen(seed))


def some_mask(b: int = 16, seed: int = 7) -> torch.Tensor:
    m = torch.rand(b, generator=gen(seed)) < 0.5
    m[:2] = True  # at least two selected
    return m


# ---------------------------------------------------------------- selection_mask


def ranks(n: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) / n).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [10, 100, 1000, 20_000])
def test_selection_counts_and_members(n, dtype):
    q = ranks(n, dtype)
    for k in range(0, 51):
        r = k / 100
        if abs(r * n - round(r * n)) > 1e-9 or abs(r * n / 2 - round(r * n / 2)) > 1e-9:
            continue  # only fractions that split N exactly
        rn = round(r * n)
        high, low, mixed = (selection_mask(q, s, r) for s in ("high", "low", "mixed"))
        assert high.dtype == torch.bool and high.shape == q.shape
        assert torch.equal(torch.nonzero(high).squeeze(1), torch.arange(n - rn, n)), (n, r)
        assert torch.equal(torch.nonzero(low).squeeze(1), torch.arange(0, rn)), (n, r)
        want_mixed = torch.cat([torch.arange(0, rn // 2), torch.arange(n - rn // 2, n)])
        assert torch.equal(torch.nonzero(mixed).squeeze(1), want_mixed), (n, r)
        assert int(mixed[: n // 2].sum()) == int(mixed[n // 2 :].sum()) == rn // 2
        assert bool(selection_mask(q, "all", r).all())


def test_selection_zero_fraction_and_all():
    q = ranks(37)
    for s in ("high", "low", "mixed"):
        assert not selection_mask(q, s, 0.0).any()
    assert selection_mask(q, "all", 0.0).all()
    assert selection_mask(q, "high", 1.0).all() and selection_mask(q, "low", 1.0).all()


# ---------------------------------------------------------------- contract of every registered augmentation


def test_registry_names():
    assert {"cutmix", "mixup"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_touches_only_masked_samples(name):
    x, mask = batch(), some_mask()
    before = x.clone()
    res = AUGMENTS.get(name)(x, mask, generator=gen(1))
    assert torch.equal(x, before), "x must not be modified in place"
    m = int(mask.sum())
    assert isinstance(res, MixResult) and len(res) == m
    assert res.images.shape == (m, *x.shape[1:]) and res.images.dtype == x.dtype
    assert res.index_a.dtype == res.index_b.dtype == torch.int64 and res.lam.shape == (m,)
    selected = torch.nonzero(mask).squeeze(1)
    assert torch.equal(res.index_a, selected), "source a is each selected sample, in batch order"
    assert torch.equal(torch.sort(res.index_b).values, selected), "partners: a permutation of the subset"
    assert bool(mask[res.index_a].all() and mask[res.index_b].all())
    assert bool(((res.lam >= 0) & (res.lam <= 1)).all())


@pytest.mark.parametrize("name", METHODS)
def test_seed_repeats_and_differs(name):
    fn = AUGMENTS.get(name)
    x, mask = batch(b=32), some_mask(b=32)
    a, b, c = (fn(x, mask, generator=gen(s)) for s in (5, 5, 6))
    for f in ("images", "index_a", "index_b", "lam"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.lam, c.lam)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("name", METHODS)
def test_global_rng_untouched(name):
    x, mask = batch(), some_mask()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    AUGMENTS.get(name)(x, mask, generator=gen(2))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", METHODS)
def test_default_alpha(name):
    fn = AUGMENTS.get(name)
    x, mask = batch(), some_mask()
    a = fn(x, mask, generator=gen(3))
    b = fn(x, mask, generator=gen(3), alpha=DEFAULT_ALPHA[name])
    assert torch.equal(a.images, b.images) and torch.equal(a.lam, b.lam)


@pytest.mark.parametrize("name", METHODS)
def test_empty_mask(name):
    x = batch(b=6)
    g = gen(4)
    state = g.get_state()
    res = AUGMENTS.get(name)(x, torch.zeros(6, dtype=torch.bool), generator=g)
    assert len(res) == 0
    assert res.images.shape == (0, *x.shape[1:]) and res.images.dtype == x.dtype
    assert res.index_a.shape == res.index_b.shape == res.lam.shape == (0,)
    assert res.index_a.dtype == torch.int64
    assert torch.equal(g.get_state(), state), "nothing drawn for an empty mask"
    assert mixed_targets(torch.arange(6), res, 6).shape == (0, 6)


@pytest.mark.parametrize("name", METHODS)
def test_bad_arguments(name):
    fn = AUGMENTS.get(name)
    x = batch(b=4)
    with pytest.raises(ValueError, match="mask"):
        fn(x, torch.ones(4), generator=gen())
    with pytest.raises(ValueError, match="mask"):
        fn(x, torch.ones(5, dtype=torch.bool), generator=gen())
    with pytest.raises(ValueError, match="generator"):
        fn(x, torch.ones(4, dtype=torch.bool), generator=None)


@pytest.mark.parametrize("name", METHODS)
def test_soft_labels_consistent(name):
    x, mask = batch(b=32), some_mask(b=32)
    y = torch.randint(5, (32,), generator=gen(9))
    res = AUGMENTS.get(name)(x, mask, generator=gen(8))
    soft = mixed_targets(y, res, 5)
    assert soft.shape == (len(res), 5)
    assert torch.allclose(soft.sum(1), torch.ones(len(res)))
    ya, yb = y[res.index_a], y[res.index_b]
    rows = torch.arange(len(res))
    diff = ya != yb
    assert torch.allclose(soft[rows[diff], ya[diff]], res.lam[diff])
    assert torch.allclose(soft[rows[diff], yb[diff]], 1 - res.lam[diff])
    assert torch.allclose(soft[rows[~diff], ya[~diff]], torch.ones(int((~diff).sum())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_matches_cpu(name):
    fn = AUGMENTS.get(name)
    x, mask = batch(), some_mask()
    cpu = fn(x, mask, generator=gen(11))
    gpu = fn(x.cuda(), mask.cuda(), generator=gen(11))
    assert gpu.images.is_cuda and gpu.index_a.is_cuda and gpu.lam.is_cuda
    assert torch.equal(cpu.index_b, gpu.index_b.cpu()) and torch.equal(cpu.lam, gpu.lam.cpu())
    assert torch.allclose(cpu.images, gpu.images.cpu(), atol=1e-6)


# ---------------------------------------------------------------- CutMix


def test_cutmix_pixels_match_lambda():
    """Every pixel comes from a or b; the share from b is exactly 1 − λ; an empty box leaves a untouched."""
    x = batch(b=64, h=16, w=13)
    mask = torch.ones(64, dtype=torch.bool)
    res = cutmix(x, mask, generator=gen(21), alpha=0.2)  # U-shaped Beta: many empty and many large boxes
    xa, xb = x[res.index_a], x[res.index_b]
    from_a, from_b = res.images == xa, res.images == xb
    assert bool((from_a | from_b).all())
    distinct = res.index_a != res.index_b
    assert int(distinct.sum()) > 30
    share_b = (from_b & ~from_a).flatten(1).float().mean(1)
    assert torch.allclose(share_b[distinct], 1 - res.lam[distinct], atol=1e-6)
    # the pasted region is one box, the same for every channel
    pasted = (from_b & ~from_a)[distinct]
    assert torch.equal(pasted, pasted[:, :1].expand_as(pasted))
    empty = res.lam == 1
    assert int(empty.sum()) > 0 and int((res.lam < 1).sum()) > 0
    assert torch.equal(res.images[empty], xa[empty])


def test_cutmix_selected_subset_partners_stay_inside():
    x = batch(b=40)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[3, 17, 29]] = True
    for seed in range(20):
        res = cutmix(x, mask, generator=gen(seed))
        assert set(res.index_b.tolist()) == {3, 17, 29}


def reference_cutmix(x: torch.Tensor, g: torch.Generator, alpha: float):
    """Ordinary CutMix on every sample of the batch, written plainly, one sample at a time (same draws)."""
    B, _, H, W = x.shape
    perm = torch.randperm(B, generator=g)
    lam = sample_beta(alpha, B, generator=g)
    cx = torch.randint(W, (B,), generator=g)
    cy = torch.randint(H, (B,), generator=g)
    out, lams = x.clone(), []
    for i in range(B):
        ratio = math.sqrt(1.0 - float(lam[i]))
        cut_w, cut_h = int(W * ratio), int(H * ratio)
        x1, x2 = min(max(int(cx[i]) - cut_w // 2, 0), W), min(max(int(cx[i]) + cut_w // 2, 0), W)
        y1, y2 = min(max(int(cy[i]) - cut_h // 2, 0), H), min(max(int(cy[i]) + cut_h // 2, 0), H)
        out[i, :, y1:y2, x1:x2] = x[perm[i], :, y1:y2, x1:x2]
        lams.append(1.0 - (x2 - x1) * (y2 - y1) / (W * H))
    return out, perm, torch.tensor(lams)


@pytest.mark.parametrize("alpha", [1.0, 0.2, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cutmix_all_equals_ordinary_cutmix(alpha, seed):
    x = batch(b=24, h=17, w=11)
    mask = selection_mask(torch.rand(24, generator=gen(99)), "all", 0.3)
    res = cutmix(x, mask, generator=gen(seed), alpha=alpha)
    ref, perm, lam = reference_cutmix(x, gen(seed), alpha)
    assert torch.equal(res.index_a, torch.arange(24))
    assert torch.equal(res.index_b, perm)
    assert torch.equal(res.images, ref)
    assert torch.allclose(res.lam.double(), lam.double(), atol=1e-7)


# ---------------------------------------------------------------- MixUp


def test_mixup_convex_combination():
    x, mask = batch(b=32), some_mask(b=32)
    res = mixup(x, mask, generator=gen(31))
    lam = res.lam.view(-1, 1, 1, 1)
    want = lam * x[res.index_a] + (1 - lam) * x[res.index_b]
    assert torch.allclose(res.images, want, atol=1e-6)
    lo = torch.minimum(x[res.index_a], x[res.index_b]) - 1e-6
    hi = torch.maximum(x[res.index_a], x[res.index_b]) + 1e-6
    assert bool(((res.images >= lo) & (res.images <= hi)).all())


def test_mixup_half_precision_keeps_dtype():
    x, mask = batch().half(), some_mask()
    res = mixup(x, mask, generator=gen(32))
    assert res.images.dtype == torch.float16 and res.lam.dtype == torch.float32
    want = res.lam.view(-1, 1, 1, 1) * x[res.index_a].float() + (1 - res.lam.view(-1, 1, 1, 1)) * x[res.index_b].float()
    assert torch.allclose(res.images.float(), want, atol=2e-3)


# ---------------------------------------------------------------- Beta sampler


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_beta_moments(alpha):
    lam = sample_beta(alpha, 100_000, generator=gen(2024))
    assert lam.dtype == torch.float64 and lam.shape == (100_000,)
    assert bool(((lam >= 0) & (lam <= 1)).all())
    want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Var Beta(α, α)
    assert abs(float(lam.mean()) - 0.5) < 0.005
    assert abs(float(lam.var()) - want_var) < 0.05 * want_var


def test_beta_uniform_at_alpha_one():
    lam = sample_beta(1.0, 100_000, generator=gen(7))
    hist = torch.histc(lam.float(), bins=10, min=0, max=1) / lam.numel()
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.006)


def test_beta_tiny_alpha_is_finite_and_seeded():
    a = sample_beta(0.01, 10_000, generator=gen(1))
    assert bool(torch.isfinite(a).all() and ((a >= 0) & (a <= 1)).all())
    assert float(((a < 0.01) | (a > 0.99)).float().mean()) > 0.9  # mass at the ends
    assert torch.equal(a, sample_beta(0.01, 10_000, generator=gen(1)))
    assert sample_beta(1.0, 0, generator=gen()).shape == (0,)
