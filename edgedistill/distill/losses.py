"""Distillation losses: each registered loss is a divergence at the temperatures a policy picks.

Contract (the training loop and the recipe layer rely on nothing else): every registered loss is a callable

    name(batch: LossBatch, *, param: type = default, ...) -> dict[str, Tensor]

* the keyword-only parameters, with their annotations and defaults as ``inspect.signature`` reports them, are
  exactly what a recipe may set under ``distill.loss``; they are type-checked when the recipe loads;
* the result holds ``"loss"`` (a scalar to minimise) and its named parts (detached scalars, for logging);
* ``batch.target is None`` means "no hard labels" (mixed HE-DA samples): the CE term is skipped.

Structure: a loss is a *divergence* (:func:`kd_divergence`, :func:`dkd_divergence`, :func:`mlkd_divergence`:
per-sample temperatures → the result above) × a *temperature policy* (:data:`CONSTANT`, :data:`ENERGY`,
:data:`GRADED`: batch → per-sample temperatures).  :func:`compose` registers a pair under its name with a
signature built from both, the policy's parameters where the temperature has always been: ``energy_kd`` is
``kd`` plus ``t_plus`` / ``t_minus`` by construction.  ``ce`` needs no teacher and is a plain function.

Conventions shared by every distillation loss here:

* all arithmetic is float32 (fp16 / bf16 logits are cast with ``.float()``), and every softmax goes through
  ``log_softmax`` / ``logsumexp``, so logits of magnitude ~1e4 still give finite losses and gradients;
* the teacher logits are detached inside: gradients reach the student only;
* energy groups follow the *paper* direction: ``-1`` (low energy, confident) → ``T + t_plus``,
  ``1`` (high energy, uncertain) → ``T + t_minus``, ``0`` → ``T``.  The training loop applies
  ``energy.direction: reversed`` by flipping ``batch.group`` / ``batch.quantile`` before the call, so no loss
  ever needs to know about it.  ``batch.group is None`` means "all middle".
* ``standardize_logits=True`` z-scores each logit vector (teacher and student) before the temperature softmax
  (Sun et al., CVPR 2024); the CE term always uses the raw student logits.

Equations, defaults and sources: ``docs/methods.md``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from edgedistill.base.registry import Registry


@dataclass(frozen=True)
class LossBatch:
    student: Tensor  # (B, K) student logits
    teacher: Tensor  # (B, K) teacher logits (no grad)
    target: Tensor | None  # (B,) int64 labels, or None for samples without a hard label
    group: Tensor | None = None  # (B,) int8: -1 confident (low energy), 0 middle, 1 uncertain (high energy)
    quantile: Tensor | None = None  # (B,) float in [0, 1): the sample's energy rank / N (0 = most confident)
    epoch: float = 0.0  # training progress in epochs (fractional), for warm-ups


LOSSES: Registry = Registry("loss")

#: added to the standard deviation in :func:`standardize`, so a constant logit vector maps to zeros, not NaN
STD_EPS = 1e-7
#: lowest temperature :func:`energy_mlkd` lets a shifted temperature reach (its base temperatures can be small)
MIN_TEMPERATURE = 0.5
#: number of energy bins in :func:`graded_kd`
N_GRADES = 10


# ---------------------------------------------------------------- pure helpers


def standardize(z: Tensor) -> Tensor:
    """Z-score each row: ``(z - mean) / (std + STD_EPS)`` with the population std (Sun et al., CVPR 2024).

    Invariant to adding a per-row constant and to multiplying a row by a positive factor.
    """
    z = z.float()
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=0)
    return (z - mean) / (std + STD_EPS)


def sample_temperature(group: Tensor, temperature: float, t_plus: float, t_minus: float) -> Tensor:
    """Per-sample KD temperature from the energy group (paper direction), as float32 ``(B,)``.

    ``-1`` (low energy) → ``temperature + t_plus``; ``1`` (high energy) → ``temperature + t_minus``;
    ``0`` → ``temperature``.  The sums are formed in Python, so a middle sample gets exactly ``temperature``.
    """
    t = torch.full(group.shape, float(temperature), dtype=torch.float32, device=group.device)
    t = t.masked_fill(group < 0, float(temperature + t_plus))
    return t.masked_fill(group > 0, float(temperature + t_minus))


def graded_temperature(quantile: Tensor, t_min: float, t_max: float, n_grades: int = N_GRADES) -> Tensor:
    """Per-sample temperature from the energy rank: ``n_grades`` equal bins of ``quantile``, temperatures spread
    linearly from ``t_max`` (bin 0, most confident) down to ``t_min`` (last bin, least confident).

    ``quantile`` is ``rank / N``; a tiny tolerance (1e-6) keeps float32 ranks such as ``7 / 10`` (stored as
    0.69999999) in the bin their exact value belongs to.
    """
    q = quantile.double()
    grade = torch.floor(q * n_grades + 1e-6).clamp(0, n_grades - 1)
    step = (float(t_max) - float(t_min)) / (n_grades - 1) if n_grades > 1 else 0.0
    return (float(t_max) - step * grade).float()


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q)`` per row from log-probabilities; a zero-probability entry of ``p`` contributes 0."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _kd_per_sample(zs: Tensor, zt: Tensor, t_vec: Tensor) -> Tensor:
    """``T_i² · KL(softmax(zt_i / T_i) ‖ softmax(zs_i / T_i))`` for each row i, float32 ``(B,)``."""
    t = t_vec.to(device=zs.device, dtype=torch.float32).unsqueeze(-1)
    log_ps = F.log_softmax(zs.float() / t, dim=-1)
    log_pt = F.log_softmax(zt.float() / t, dim=-1)
    return _kl_rows(log_pt, log_ps) * t.squeeze(-1) ** 2


def _dkd_per_sample(zs: Tensor, zt: Tensor, target: Tensor, t_vec: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(T_i²·TCKD_i, T_i²·NCKD_i)`` of DKD (Zhao et al., CVPR 2022), all in log space.

    TCKD compares the binary distributions ``[p_target, 1 - p_target]``; its logs are
    ``z_y/T - LSE(z/T)`` and ``LSE_{j≠y}(z_j/T) - LSE(z/T)``, never ``log(1 - p)``.
    NCKD compares the softmax over the non-target classes, obtained by masking the target with ``-inf``
    (a finite offset such as -1000 is not enough once logits reach ~1e4).
    """
    t = t_vec.to(device=zs.device, dtype=torch.float32).unsqueeze(-1)
    target = target.to(zs.device).long().unsqueeze(-1)
    mask = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, target, True)

    def parts(z: Tensor) -> tuple[Tensor, Tensor]:
        zt_ = z.float() / t
        lse_all = torch.logsumexp(zt_, dim=-1)
        non_target = zt_.masked_fill(mask, float("-inf"))
        log_b = torch.stack([zt_.gather(-1, target).squeeze(-1) - lse_all, torch.logsumexp(non_target, dim=-1) - lse_all], dim=-1)
        # the masked entry is -inf; replace it by 0 so that 0·(0 - 0) is what the KL sums there
        log_hat = F.log_softmax(non_target, dim=-1).masked_fill(mask, 0.0)
        return log_b, log_hat

    log_b_s, log_hat_s = parts(zs)
    log_b_t, log_hat_t = parts(zt)
    t2 = t.squeeze(-1) ** 2
    tckd = _kl_rows(log_b_t, log_b_s) * t2
    p_hat_t = log_hat_t.exp().masked_fill(mask, 0.0)
    nckd = (p_hat_t * (log_hat_t - log_hat_s)).sum(dim=-1) * t2
    return tckd, nckd


def _mlkd_terms(zs: Tensor, zt: Tensor, t_vecs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """MLKD's three terms (Jin, Wang, Lin, CVPR 2023), each averaged over the temperatures in ``t_vecs``.

    For each temperature (one ``(B,)`` vector, so it may differ per sample), with ``P`` the ``(B, C)`` softmax:
    instance = batch mean of ``T_i²·KL(p_t ‖ p_s)``;
    batch = ``‖P_t P_tᵀ - P_s P_sᵀ‖²_F / B``; class = ``‖P_tᵀ P_t - P_sᵀ P_s‖²_F / C``.
    """
    n, c = zs.shape
    inst = bc = cc = zs.new_zeros((), dtype=torch.float32)
    for t_vec in t_vecs:
        inst = inst + _kd_per_sample(zs, zt, t_vec).mean()
        t = t_vec.to(device=zs.device, dtype=torch.float32).unsqueeze(-1)
        ps = F.softmax(zs.float() / t, dim=-1)
        pt = F.softmax(zt.float() / t, dim=-1)
        bc = bc + (pt @ pt.T - ps @ ps.T).pow(2).sum() / n
        cc = cc + (pt.T @ pt - ps.T @ ps).pow(2).sum() / c
    k = len(t_vecs)
    return inst / k, bc / k, cc / k


# ---------------------------------------------------------------- divergences and their shared plumbing


def _logits(batch: LossBatch, standardize_logits: bool) -> tuple[Tensor, Tensor]:
    """Student and (detached) teacher logits as float32, z-scored when asked."""
    zs, zt = batch.student.float(), batch.teacher.detach().float()
    if standardize_logits:
        zs, zt = standardize(zs), standardize(zt)
    return zs, zt


def _ce(batch: LossBatch) -> Tensor:
    """CE on the raw student logits, or a graph-connected 0 when the batch has no hard labels."""
    if batch.target is None:
        return batch.student.float().sum() * 0.0
    return F.cross_entropy(batch.student.float(), batch.target.to(batch.student.device))


def _groups(batch: LossBatch) -> Tensor:
    if batch.group is None:
        return torch.zeros(batch.student.shape[0], dtype=torch.int8, device=batch.student.device)
    return batch.group.to(batch.student.device)


def _check_positive(**temps: float) -> None:
    for name, value in temps.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_temperatures(temperatures: tuple[float, ...]) -> None:
    if len(temperatures) == 0:
        raise ValueError("temperatures must not be empty")
    for t in temperatures:
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperatures must all be finite and > 0, got {tuple(temperatures)}")


def _full(batch: LossBatch, value: float) -> Tensor:
    return torch.full((batch.student.shape[0],), float(value), dtype=torch.float32, device=batch.student.device)


def _divergence(policy_after: str | None = None, per_base: bool = False):
    """Mark a divergence for :func:`compose`: the policy's parameters go after ``policy_after`` (first when None),
    so each loss keeps the parameter order recipes and docs were written against; a ``per_base`` divergence has
    base temperatures of its own and takes a map ``base T → (B,)`` instead of one ``(B,)`` vector."""
    def mark(fn):
        fn.policy_after, fn.per_base = policy_after, per_base
        return fn
    return mark


@_divergence()
def kd_divergence(
    batch: LossBatch, t_vec: Tensor, *, ce_weight: float = 0.1, kd_weight: float = 0.9, standardize_logits: bool = False
) -> dict[str, Tensor]:
    """KD (Hinton et al., 2015) at per-sample temperatures ``t_vec``:
    ``ce_weight·CE + kd_weight·mean_i T_i²·KL(softmax(z_t,i/T_i) ‖ softmax(z_s,i/T_i))``."""
    zs, zt = _logits(batch, standardize_logits)
    kd_term = _kd_per_sample(zs, zt, t_vec).mean()
    ce_term = _ce(batch)
    loss = ce_weight * ce_term + kd_weight * kd_term
    return {"loss": loss, "ce": ce_term.detach(), "kd": kd_term.detach()}


@_divergence(policy_after="beta")
def dkd_divergence(
    batch: LossBatch, t_vec: Tensor, *, alpha: float = 1.0, beta: float = 8.0, warmup_epochs: float = 20.0,
    ce_weight: float = 1.0, standardize_logits: bool = False,
) -> dict[str, Tensor]:
    """DKD (Zhao et al., CVPR 2022) at per-sample temperatures ``t_vec``:
    ``ce_weight·CE + min(epoch / warmup_epochs, 1)·(alpha·TCKD + beta·NCKD)``, each term batch-averaged with its
    ``T_i²``; TCKD is the KL between the binary target / non-target distributions, NCKD the KL among the
    non-target classes.  Without hard labels (``target is None``) the teacher's arg-max class is the target."""
    zs, zt = _logits(batch, standardize_logits)
    target = batch.target if batch.target is not None else zt.argmax(dim=-1)
    tckd, nckd = (part.mean() for part in _dkd_per_sample(zs, zt, target, t_vec))
    warm = min(float(batch.epoch) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    kd_term = warm * (alpha * tckd + beta * nckd)
    ce_term = _ce(batch)
    loss = ce_weight * ce_term + kd_term
    parts = {"ce": ce_term, "kd": kd_term, "tckd": tckd, "nckd": nckd}
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, "warmup": torch.tensor(warm, device=loss.device)}


@_divergence(policy_after="temperatures", per_base=True)
def mlkd_divergence(
    batch: LossBatch, t_of: Callable[[float], Tensor], *, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0),
    ce_weight: float = 1.0, kd_weight: float = 1.0, batch_weight: float = 1.0, class_weight: float = 1.0,
    standardize_logits: bool = False,
) -> dict[str, Tensor]:
    """MLKD (Jin, Wang, Lin, CVPR 2023), single view; ``t_of(T)`` gives the ``(B,)`` temperatures of base ``T``.
    Averaged over ``temperatures``: instance-level ``T²·KL`` (batch mean), batch-level ``‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B``
    and class-level ``‖P_tᵀ P_t − P_sᵀ P_s‖²_F / C``.  The paper's second (strongly augmented) view and its
    confidence masking are not part of this loss."""
    _check_temperatures(temperatures)
    zs, zt = _logits(batch, standardize_logits)
    inst, bc, cc = _mlkd_terms(zs, zt, [t_of(t) for t in temperatures])
    ce_term = _ce(batch)
    loss = ce_weight * ce_term + kd_weight * inst + batch_weight * bc + class_weight * cc
    return {"loss": loss, "ce": ce_term.detach(), "kd": inst.detach(), "batch_corr": bc.detach(), "class_corr": cc.detach()}


# ---------------------------------------------------------------- temperature policies


@dataclass(frozen=True)
class Policy:
    """``vector(batch, *, params)``: the ``(B,)`` float32 temperatures; its keyword parameters are the ones the
    policy adds to a loss.  ``per_base(batch, *, params but temperature)``: the map ``base T → (B,)`` for a
    divergence whose own base temperatures replace ``temperature`` (``None``: the policy has no base temperature)."""

    vector: Callable[..., Tensor]
    per_base: Callable[..., Callable[[float], Tensor]] | None = None


def constant_policy(batch: LossBatch, *, temperature: float = 4.0) -> Tensor:
    """Every sample at ``temperature``."""
    _check_positive(temperature=temperature)
    return _full(batch, temperature)


def energy_policy(batch: LossBatch, *, temperature: float = 4.0, t_plus: float = 2.0, t_minus: float = -2.0) -> Tensor:
    """Energy KD's temperature (Kim et al., Knowledge-Based Systems 296 (2024) 111911), paper direction:
    group ``-1`` → ``T + t_plus``, ``1`` → ``T + t_minus``, ``0`` (or no groups) → ``T``."""
    _check_positive(temperature=temperature, **{"temperature + t_plus": temperature + t_plus, "temperature + t_minus": temperature + t_minus})
    return sample_temperature(_groups(batch), temperature, t_plus, t_minus)


def _energy_per_base(batch: LossBatch, *, t_plus: float, t_minus: float) -> Callable[[float], Tensor]:
    # clamped, not rejected like energy_policy does: MLKD's default base temperature 2 plus the default t_minus = -2
    # is 0, and energy_mlkd must accept its own defaults
    shift = sample_temperature(_groups(batch), 0.0, t_plus, t_minus)
    return lambda t: (float(t) + shift).clamp(min=MIN_TEMPERATURE)


def graded_policy(batch: LossBatch, *, t_min: float = 2.0, t_max: float = 6.0) -> Tensor:
    """The Energy KD paper's temperature gradation: :func:`graded_temperature` of ``batch.quantile``, or the
    middle temperature ``(t_min + t_max) / 2`` for every sample when the batch has no quantiles."""
    _check_positive(t_min=t_min, t_max=t_max)
    if batch.quantile is None:
        return _full(batch, (t_min + t_max) / 2)
    return graded_temperature(batch.quantile.to(batch.student.device), t_min, t_max)


CONSTANT = Policy(constant_policy, per_base=lambda batch: partial(_full, batch))
ENERGY = Policy(energy_policy, per_base=_energy_per_base)
GRADED = Policy(graded_policy)


# ---------------------------------------------------------------- composition and the registered losses


def _keyword_params(fn: Callable) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is p.KEYWORD_ONLY]


def compose(name: str, divergence: Callable[..., dict[str, Tensor]], policy: Policy, doc: str) -> Callable[..., dict[str, Tensor]]:
    """Register ``name`` as ``divergence`` at the temperatures of ``policy``.  The recipe layer validates
    ``distill.loss`` against the registered callable's keyword-only parameters and annotations, so both are real,
    built from the divergence's and the policy's own declarations (a name clash raises)."""
    per_base = divergence.per_base
    if per_base and policy.per_base is None:
        raise TypeError(f"{name}: {divergence.__name__} needs base temperatures, which {policy.vector.__name__} has none of")
    own = _keyword_params(divergence)
    adds = [p for p in _keyword_params(policy.vector) if not (per_base and p.name == "temperature")]
    at = 0 if divergence.policy_after is None else 1 + [p.name for p in own].index(divergence.policy_after)
    head = inspect.signature(divergence, eval_str=True)
    sig = head.replace(parameters=[head.parameters["batch"], *own[:at], *adds, *own[at:]])
    temperatures = policy.per_base if per_base else policy.vector

    def loss(*args, **kwargs) -> dict[str, Tensor]:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()  # the caller's keywords are only the ones a recipe set
        kw = bound.arguments
        return divergence(kw["batch"], temperatures(kw["batch"], **{p.name: kw[p.name] for p in adds}), **{p.name: kw[p.name] for p in own})

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__, loss.__signature__ = doc, sig
    loss.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()} | {"return": sig.return_annotation}
    return LOSSES.register(name)(loss)


@LOSSES.register("ce")
def ce(batch: LossBatch) -> dict[str, Tensor]:
    """Cross-entropy on the hard labels only: the no-teacher baseline."""
    loss = F.cross_entropy(batch.student.float(), batch.target) if batch.target is not None else batch.student.sum() * 0
    return {"loss": loss, "ce": loss.detach()}


ce.uses_teacher = False  # the training objective then skips the teacher's forward pass


kd = compose("kd", kd_divergence, CONSTANT, """Classic knowledge distillation (Hinton, Vinyals, Dean, "Distilling
the Knowledge in a Neural Network", 2015): KD at one temperature ``T`` for every sample.  Default weights are those
of the Energy KD paper and its official code (0.1 / 0.9).""")

energy_kd = compose("energy_kd", kd_divergence, ENERGY, """Energy KD (Kim et al., "Maximizing Discrimination
Capability of Knowledge Distillation with Energy Function", Knowledge-Based Systems 296 (2024) 111911):
KD at the per-sample temperature of the teacher-energy group (paper direction): low energy → ``T + t_plus``,
high energy → ``T + t_minus``, middle → ``T``.  With every sample in the middle group it is :func:`kd`, bit for bit.""")

dkd = compose("dkd", dkd_divergence, CONSTANT, """Decoupled KD (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022) at one temperature ``T`` for every sample; see :func:`dkd_divergence`.""")

energy_dkd = compose("energy_dkd", dkd_divergence, ENERGY, """Energy DKD (Kim et al., Knowledge-Based Systems 296
(2024) 111911, on top of Zhao et al., CVPR 2022): :func:`dkd` at the per-sample temperature of :func:`energy_kd`.""")

mlkd = compose("mlkd", mlkd_divergence, CONSTANT, """Multi-level logit distillation, single view (Jin, Wang, Lin,
"Multi-Level Logit Distillation", CVPR 2023), each temperature the same for every sample; see :func:`mlkd_divergence`.""")

energy_mlkd = compose("energy_mlkd", mlkd_divergence, ENERGY, """Energy MLKD (Kim et al., Knowledge-Based Systems
296 (2024) 111911, on top of Jin, Wang, Lin, CVPR 2023): :func:`mlkd` with every temperature shifted per sample
by its energy group's shift (``t_plus`` for low energy, ``t_minus`` for high), then clamped to ``MIN_TEMPERATURE``.""")

graded_kd = compose("graded_kd", kd_divergence, GRADED, """Temperature gradation, the ablation of the Energy KD paper
(Kim et al., Knowledge-Based Systems 296 (2024) 111911): KD at :func:`graded_policy`'s per-sample temperature,
10 energy deciles linear from ``t_max`` (most confident) to ``t_min``; without quantiles ``(t_min + t_max) / 2``.""")
