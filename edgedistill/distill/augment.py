"""Selective CutMix / MixUp for HE-DA (high-energy data augmentation).

HE-DA (Energy KD paper, Knowledge-Based Systems 296 (2024) 111911, §"HE-DA") builds *extra* mixed samples
from a chosen subset of the batch, on top of the ordinary batch: by default the high-energy (uncertain)
samples. The teacher is run on the mixed images and the student learns them with the KD loss only.

Contract (the training loop relies on nothing else)::

    @AUGMENTS.register("name")
    def name(x, mask, *, generator, alpha=None) -> MixResult

* ``x`` (B, C, H, W) is the ordinary batch, ``mask`` (B,) bool the samples selected to be mixed
  (see :func:`selection_mask`); ``x`` is never modified, the mixed samples are new tensors;
* one mixed sample is produced per selected sample: ``MixResult.images`` (M, C, H, W) with M = mask.sum();
  its source ``a`` is the selected sample itself and its partner ``b`` another selected sample, picked by a
  random permutation *within the selected subset* (the choice of the authors' HE-DA code);
* every random draw comes from ``generator`` (a CPU ``torch.Generator``), never from the global RNG, so a
  seed repeats exactly whatever device ``x`` lives on; the draws are made on the CPU and moved to x.device;
* M = 0 (empty mask) is fine: empty tensors of the right shapes, and nothing is drawn from the generator.

Draw order (documented because the tests rebuild it by hand): ``randperm(M)`` for the partners, then the M
mixing weights λ (:func:`sample_beta`), then, for CutMix only, the M box centres x (``randint(W)``) and the M
box centres y (``randint(H)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor

from edgedistill.base.registry import Registry

AUGMENTS: Registry = Registry("augmentation")


# ---------------------------------------------------------------- which samples


def selection_mask(quantile: Tensor, selection: str, fraction: float) -> Tensor:
    """Boolean mask of the samples HE-DA mixes.

    ``quantile`` holds each sample's energy rank / N over the training set (0 = lowest energy = the most
    confident sample), so with N training samples and ``r = fraction``:

    * ``high``  — ``quantile >= 1 − r``: the r·N highest-energy samples (the paper's HE-DA);
    * ``low``   — ``quantile < r``: the r·N lowest-energy samples (ablation);
    * ``mixed`` — ``quantile < r/2`` or ``quantile >= 1 − r/2``: half low, half high (ablation);
    * ``all``   — every sample; ``fraction`` is ignored (ordinary full-data augmentation).

    ``r = 0`` selects nothing (except for ``all``). The comparisons use a tolerance of one machine epsilon of
    ``quantile``'s dtype so that a rank exactly on a boundary (``rank/N == 1 − r``) lands in the high group
    and not in the low one even after float rounding; ranks are 1/N apart, far more than that tolerance
    (float32 resolves N up to several million).
    """
    r = float(fraction)  # selection and fraction are the recipe's, validated when it loaded
    if selection == "all":
        return torch.ones_like(quantile, dtype=torch.bool)
    if r == 0.0:
        return torch.zeros_like(quantile, dtype=torch.bool)
    tol = torch.finfo(quantile.dtype).eps
    if selection == "high":
        return quantile >= 1.0 - r - tol
    if selection == "low":
        return quantile < r - tol
    return (quantile < r / 2 - tol) | (quantile >= 1.0 - r / 2 - tol)


# ---------------------------------------------------------------- result


@dataclass
class MixResult:
    """The extra mixed samples of one batch.

    ``images`` (M, C, H, W): the mixed samples; ``index_a`` / ``index_b`` (M,) int64: batch indices of the two
    sources of each mixed sample (``a`` is the selected sample itself, ``b`` its partner); ``lam`` (M,)
    float32: the weight of source ``a`` — for CutMix the fraction of the image's pixels that still come from
    ``a`` (computed from the clipped box), for MixUp the blending weight.
    """

    images: Tensor
    index_a: Tensor
    index_b: Tensor
    lam: Tensor

    def __len__(self) -> int:
        return int(self.index_a.numel())

    @classmethod
    def empty(cls, x: Tensor) -> "MixResult":
        """M = 0: no sample selected."""
        idx = torch.empty(0, dtype=torch.int64, device=x.device)
        return cls(
            images=x.new_empty((0, *x.shape[1:])),
            index_a=idx,
            index_b=idx.clone(),
            lam=torch.empty(0, dtype=torch.float32, device=x.device),
        )


def mixed_targets(y: Tensor, result: MixResult, num_classes: int) -> Tensor:
    """Soft labels (M, K) of the mixed samples: ``λ·onehot(y_a) + (1 − λ)·onehot(y_b)``.

    For reporting and tests: HE-DA itself learns the mixed samples from the teacher, without hard labels.
    """
    ia, ib = result.index_a.to(y.device), result.index_b.to(y.device)
    lam = result.lam.to(y.device, torch.float32)[:, None]
    ya = F.one_hot(y[ia].long(), num_classes).float()
    yb = F.one_hot(y[ib].long(), num_classes).float()
    return lam * ya + (1.0 - lam) * yb


# ---------------------------------------------------------------- seeded Beta sampler


def sample_beta(alpha: float, n: int, *, generator: torch.Generator, max_rounds: int = 64) -> Tensor:
    """``n`` draws of λ ~ Beta(α, α) (float64, on the CPU) using only ``generator``.

    ``torch.distributions.Beta`` and ``torch._standard_gamma`` take no generator, so the sampler is built from
    seeded normals and uniforms:

    * Beta as a ratio of Gammas: with ``G1, G2 ~ Gamma(α)`` independent, ``G1 / (G1 + G2) ~ Beta(α, α)``;
    * ``Gamma(α + 1)`` by Marsaglia & Tsang's rejection method ("A simple method for generating gamma
      variables", ACM TOMS 26(3), 2000), valid for shape ≥ 1 and accepting > 95 % of proposals; vectorised:
      every round draws a proposal for each sample still pending, until none is (a few rounds);
    * the boost to shapes below 1: ``Gamma(α) = Gamma(α + 1) · U^(1/α)`` (same paper), used for every α so
      that one code path serves all α > 0;
    * everything in log space, ``λ = sigmoid(log G1 − log G2)``, so that small α (where ``U^(1/α)``
      underflows) still gives λ in [0, 1] instead of 0/0.
    """
    log_g = _log_gamma_sample(float(alpha), 2 * n, generator, max_rounds)
    return torch.sigmoid(log_g[:n] - log_g[n:])


def _log_gamma_sample(shape: float, n: int, generator: torch.Generator, max_rounds: int) -> Tensor:
    """log of ``n`` Gamma(shape, 1) draws, float64 on the CPU (Marsaglia–Tsang on shape + 1, then the boost)."""
    kw = dict(dtype=torch.float64, device="cpu", generator=generator)
    d = shape + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    log_v = torch.zeros(n, dtype=torch.float64)
    pending = torch.arange(n)
    for _ in range(max_rounds):
        if pending.numel() == 0:
            break
        m = pending.numel()
        z = torch.randn(m, **kw)
        u = torch.rand(m, **kw)
        t = 1.0 + c * z
        ok = t > 0
        v = torch.where(ok, t, torch.ones_like(t)) ** 3
        accept = ok & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v))
        log_v[pending[accept]] = torch.log(d * v[accept])
        pending = pending[~accept]
    if pending.numel():  # probability ≈ 0.05^max_rounds: never in practice
        raise RuntimeError(f"Gamma({shape + 1}) rejection sampler did not converge in {max_rounds} rounds")
    u = torch.rand(n, **kw).clamp_min(torch.finfo(torch.float64).tiny)
    return log_v + torch.log(u) / shape


# ---------------------------------------------------------------- the augmentations


def _check(x: Tensor, mask: Tensor, generator: torch.Generator, alpha: float | None, default: float, name: str):
    if mask.dtype != torch.bool or mask.shape != x.shape[:1]:
        raise ValueError(f"{name}: mask must be a bool tensor of shape ({x.shape[0]},), got {mask.dtype} {tuple(mask.shape)}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"{name}: generator must be a CPU torch.Generator (draws are made on the CPU, then moved)")
    return default if alpha is None else float(alpha)  # augment.alpha > 0 is the recipe's to check


def _partners(mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Batch indices (CPU int64) of the selected samples and of their partners: a permutation of the subset.

    A permutation may map a sample to itself; that mixed sample then equals the original (as in ordinary
    CutMix/MixUp, which also permute without excluding fixed points).
    """
    index_a = torch.nonzero(mask.detach().cpu(), as_tuple=False).squeeze(1)
    perm = torch.randperm(index_a.numel(), generator=generator)
    return index_a, index_a[perm]


@AUGMENTS.register("cutmix")
def cutmix(x: Tensor, mask: Tensor, *, generator: torch.Generator, alpha: float | None = None) -> MixResult:
    """CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
    Features", ICCV 2019) on the selected samples, default α = 1.

    Per mixed sample: λ ~ Beta(α, α); with ``w = ⌊W·√(1−λ)⌋`` and ``h = ⌊H·√(1−λ)⌋`` (area ≈ (1−λ)·W·H) and a
    centre ``(cx, cy)`` drawn uniformly over the pixels, the box ``[cx − w//2, cx + w//2) × [cy − h//2,
    cy + h//2)`` clipped to the image (as in the CutMix authors' code) is pasted from partner ``b`` into sample
    ``a``; λ is then re-computed from the clipped box as the fraction of pixels still from ``a``.
    """
    alpha = _check(x, mask, generator, alpha, 1.0, "cutmix")
    if x.dim() != 4:
        raise ValueError(f"cutmix: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    index_a, index_b = _partners(mask, generator)
    m = index_a.numel()
    if m == 0:
        return MixResult.empty(x)
    H, W = x.shape[-2:]
    lam0 = sample_beta(alpha, m, generator=generator)
    cx = torch.randint(W, (m,), generator=generator)
    cy = torch.randint(H, (m,), generator=generator)
    cut = torch.sqrt(1.0 - lam0)
    cut_w = torch.floor(W * cut).long()
    cut_h = torch.floor(H * cut).long()
    x1, x2 = (cx - cut_w // 2).clamp(0, W), (cx + cut_w // 2).clamp(0, W)
    y1, y2 = (cy - cut_h // 2).clamp(0, H), (cy + cut_h // 2).clamp(0, H)
    lam = 1.0 - ((x2 - x1) * (y2 - y1)).double() / (W * H)

    dev = x.device
    rows = torch.arange(H, device=dev)[None, :, None]
    cols = torch.arange(W, device=dev)[None, None, :]
    y1, y2, x1, x2 = (t.to(dev)[:, None, None] for t in (y1, y2, x1, x2))
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # (M, H, W)
    ia, ib = index_a.to(dev), index_b.to(dev)
    images = torch.where(box[:, None], x[ib], x[ia])
    return MixResult(images=images, index_a=ia, index_b=ib, lam=lam.to(dev, torch.float32))


@AUGMENTS.register("mixup")
def mixup(x: Tensor, mask: Tensor, *, generator: torch.Generator, alpha: float | None = None) -> MixResult:
    """MixUp (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) on the selected samples,
    default α = 0.2: ``x = λ·x_a + (1 − λ)·x_b`` with λ ~ Beta(α, α) per mixed sample."""
    alpha = _check(x, mask, generator, alpha, 0.2, "mixup")
    if x.dim() < 2:
        raise ValueError(f"mixup: expected a batch (B, ...), got shape {tuple(x.shape)}")
    index_a, index_b = _partners(mask, generator)
    m = index_a.numel()
    if m == 0:
        return MixResult.empty(x)
    lam = sample_beta(alpha, m, generator=generator).to(x.device, torch.float32)
    ia, ib = index_a.to(x.device), index_b.to(x.device)
    ct = torch.promote_types(x.dtype, torch.float32)  # blend half-precision images in float32
    w = lam.to(ct).view(-1, *([1] * (x.dim() - 1)))
    images = (w * x[ia].to(ct) + (1.0 - w) * x[ib].to(ct)).to(x.dtype)
    return MixResult(images=images, index_a=ia, index_b=ib, lam=lam)

