"""Every registered loss: contract, numerical safety, and agreement with naive float64 references.

The references below are written independently of ``edgedistill.distill.losses``: plain Python loops over samples,
float64, ``math.exp`` with max-subtraction.  No expected value is copied from a paper.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from edgedistill.distill import losses
from edgedistill.distill.losses import (
    LOSSES,
    MIN_TEMPERATURE,
    STD_EPS,
    LossBatch,
    graded_temperature,
    sample_temperature,
)

B, K = 7, 6
KD_LOSSES = [n for n in LOSSES.names() if n != "ce"]


# ---------------------------------------------------------------- naive references (float64, loops)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


def softmax(z: list[float], temp: float = 1.0) -> list[float]:
    m = max(v / temp for v in z)
    e = [math.exp(v / temp - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def zscore(z: list[float]) -> list[float]:
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / len(z))
    return [(v - mean) / (std + STD_EPS) for v in z]


def ref_ce(zs, target) -> float:
    if target is None:
        return 0.0
    return sum(-math.log(softmax(z)[int(y)]) for z, y in zip(zs, target)) / len(zs)


def ref_kd_term(zs, zt, temps) -> float:
    return sum(t * t * kl(softmax(b, t), softmax(a, t)) for a, b, t in zip(zs, zt, temps)) / len(zs)


def ref_kd(zs, zt, target, temps, ce_weight, kd_weight) -> float:
    return ce_weight * ref_ce(zs, target) + kd_weight * ref_kd_term(zs, zt, temps)


def ref_dkd(zs, zt, target, temps, alpha, beta, warm, ce_weight) -> tuple[float, float, float]:
    """Returns (loss, mean T²·TCKD, mean T²·NCKD)."""
    tck = nck = 0.0
    for i, (a, b, t) in enumerate(zip(zs, zt, temps)):
        y = int(target[i]) if target is not None else max(range(len(b)), key=lambda j: b[j])
        ps, pt = softmax(a, t), softmax(b, t)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        hs = softmax([v for j, v in enumerate(a) if j != y], t)
        ht = softmax([v for j, v in enumerate(b) if j != y], t)
        tck += t * t * kl(bt, bs)
        nck += t * t * kl(ht, hs)
    tck, nck = tck / len(zs), nck / len(zs)
    return ce_weight * ref_ce(zs, target) + warm * (alpha * tck + beta * nck), tck, nck


def ref_mlkd(zs, zt, target, temp_rows, ce_weight, kd_weight, batch_weight, class_weight) -> float:
    """temp_rows[k][i]: the k-th temperature of sample i."""
    n, c = len(zs), len(zs[0])
    inst = bc = cc = 0.0
    for temps in temp_rows:
        inst += ref_kd_term(zs, zt, temps)
        ps = [softmax(a, t) for a, t in zip(zs, temps)]
        pt = [softmax(b, t) for b, t in zip(zt, temps)]
        for i in range(n):
            for j in range(n):
                gs = sum(ps[i][k] * ps[j][k] for k in range(c))
                gt = sum(pt[i][k] * pt[j][k] for k in range(c))
                bc += (gt - gs) ** 2 / n
        for k in range(c):
            for m in range(c):
                ms = sum(ps[i][k] * ps[i][m] for i in range(n))
                mt = sum(pt[i][k] * pt[i][m] for i in range(n))
                cc += (mt - ms) ** 2 / c
    nk = len(temp_rows)
    return ce_weight * ref_ce(zs, target) + (kd_weight * inst + batch_weight * bc + class_weight * cc) / nk


# ---------------------------------------------------------------- fixtures


def make_batch(seed=0, scale=3.0, target=True, group=None, quantile=None, epoch=100.0, dtype=torch.float32, n=B, k=K):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, k, generator=g) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(n, k, generator=g) * scale).to(dtype).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g) if target else None
    return LossBatch(student, teacher, y, group, quantile, epoch)


def mixed_groups(n=B) -> torch.Tensor:
    return torch.tensor([(-1, 0, 1)[i % 3] for i in range(n)], dtype=torch.int8)


def num(x) -> float:
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def close(a, b, rel=2e-5):
    assert num(a) == pytest.approx(b, rel=rel, abs=1e-6)


# ---------------------------------------------------------------- contract, for every registered loss


@pytest.mark.parametrize("name", LOSSES.names())
def test_signature_contract(name):
    fn = LOSSES.get(name)
    params = list(inspect.signature(fn).parameters.values())
    assert params[0].name == "batch"
    hints = inspect.get_annotations(fn, eval_str=True)
    for p in params[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is not inspect.Parameter.empty, p.name
        assert p.name in hints, p.name
    if name != "ce":
        assert "standardize_logits" in hints and hints["standardize_logits"] is bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("name", LOSSES.names())
def test_finite_and_student_only_gradients(name, scale, dtype):
    batch = make_batch(seed=1, scale=scale, group=mixed_groups(), quantile=torch.rand(B), epoch=3.0, dtype=dtype)
    out = LOSSES.get(name)(batch)
    assert "loss" in out and out["loss"].dim() == 0 and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    for key, part in out.items():
        assert part.dim() == 0 and torch.isfinite(part), key
        if key != "loss":
            assert not part.requires_grad, key
    out["loss"].backward()
    assert batch.student.grad is not None and torch.isfinite(batch.student.grad.float()).all()
    assert batch.teacher.grad is None


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("name", KD_LOSSES)
def test_no_target_and_no_group(name, standardize):
    batch = make_batch(seed=2, target=False)
    out = LOSSES.get(name)(batch, standardize_logits=standardize)
    assert num(out["ce"]) == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(batch.student.grad).all()


def test_ce_without_target():
    batch = make_batch(target=False)
    assert num(LOSSES.get("ce")(batch)["loss"]) == 0.0


# ---------------------------------------------------------------- against the naive references


def test_ce_matches_reference():
    batch = make_batch(seed=3)
    close(LOSSES.get("ce")(batch)["loss"], ref_ce(rows(batch.student), batch.target))


@pytest.mark.parametrize("with_target", [True, False])
def test_kd_matches_reference(with_target):
    batch = make_batch(seed=4, target=with_target)
    zs, zt = rows(batch.student), rows(batch.teacher)
    out = LOSSES.get("kd")(batch, temperature=3.0, ce_weight=0.3, kd_weight=0.7)
    close(out["loss"], ref_kd(zs, zt, batch.target, [3.0] * B, 0.3, 0.7))
    close(out["kd"], ref_kd_term(zs, zt, [3.0] * B))


def test_energy_kd_per_group_temperature_matches_reference():
    group = mixed_groups()
    batch = make_batch(seed=5, group=group)
    zs, zt = rows(batch.student), rows(batch.teacher)
    # paper direction: low energy (-1) -> T + t_plus, high energy (1) -> T + t_minus
    explicit = {-1: 4.0 + 2.0, 0: 4.0, 1: 4.0 - 2.0}
    temps = [explicit[int(g)] for g in group]
    out = LOSSES.get("energy_kd")(batch)
    close(out["loss"], ref_kd(zs, zt, batch.target, temps, 0.1, 0.9))
    # other shifts, and the low group really is the smoother one
    out = LOSSES.get("energy_kd")(batch, temperature=3.0, t_plus=1.5, t_minus=-1.0)
    close(out["kd"], ref_kd_term(zs, zt, [{-1: 4.5, 0: 3.0, 1: 2.0}[int(g)] for g in group]))


def test_sample_temperature():
    t = sample_temperature(torch.tensor([-1, 0, 1, 0, -1], dtype=torch.int8), 4.0, 2.0, -2.0)
    assert t.dtype == torch.float32
    assert t.tolist() == [6.0, 4.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize(("plain", "energy"), [("kd", "energy_kd"), ("dkd", "energy_dkd"), ("mlkd", "energy_mlkd")])
def test_energy_variant_with_all_middle_equals_plain_exactly(plain, energy, standardize):
    batch = make_batch(seed=6, group=torch.zeros(B, dtype=torch.int8), epoch=7.0)
    a = LOSSES.get(plain)(batch, standardize_logits=standardize)
    b = LOSSES.get(energy)(batch, standardize_logits=standardize)
    c = LOSSES.get(energy)(LossBatch(batch.student, batch.teacher, batch.target, None, None, 7.0), standardize_logits=standardize)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("with_target", [True, False])
def test_dkd_matches_reference(with_target):
    batch = make_batch(seed=7, target=with_target, epoch=100.0)
    zs, zt = rows(batch.student), rows(batch.teacher)
    out = LOSSES.get("dkd")(batch, alpha=1.5, beta=6.0, temperature=3.0)
    loss, tck, nck = ref_dkd(zs, zt, batch.target, [3.0] * B, 1.5, 6.0, 1.0, 1.0)
    close(out["loss"], loss)
    close(out["tckd"], tck)
    close(out["nckd"], nck)


def test_energy_dkd_matches_reference():
    group = mixed_groups()
    batch = make_batch(seed=8, group=group, epoch=100.0)
    zs, zt = rows(batch.student), rows(batch.teacher)
    temps = [{-1: 6.0, 0: 4.0, 1: 2.0}[int(g)] for g in group]
    loss, _, _ = ref_dkd(zs, zt, batch.target, temps, 1.0, 8.0, 1.0, 1.0)
    close(LOSSES.get("energy_dkd")(batch)["loss"], loss)


@pytest.mark.parametrize("name", ["dkd", "energy_dkd"])
def test_dkd_warmup_scaling(name):
    fn = LOSSES.get(name)
    full = fn(make_batch(seed=9, group=mixed_groups(), epoch=20.0))
    quarter = fn(make_batch(seed=9, group=mixed_groups(), epoch=5.0))
    start = fn(make_batch(seed=9, group=mixed_groups(), epoch=0.0))
    later = fn(make_batch(seed=9, group=mixed_groups(), epoch=50.0))
    close(quarter["kd"], 0.25 * num(full["kd"]))
    close(quarter["loss"], num(full["ce"]) + 0.25 * num(full["kd"]))
    assert num(start["kd"]) == 0.0 and num(start["loss"]) == pytest.approx(num(start["ce"]))
    assert torch.equal(later["loss"], full["loss"])
    no_warmup = fn(make_batch(seed=9, group=mixed_groups(), epoch=0.0), warmup_epochs=0.0)
    assert torch.equal(no_warmup["loss"], full["loss"])


def test_mlkd_matches_reference():
    batch = make_batch(seed=10)
    zs, zt = rows(batch.student), rows(batch.teacher)
    temps = (1.5, 3.0, 5.0)
    out = LOSSES.get("mlkd")(batch, temperatures=temps, ce_weight=0.5, kd_weight=0.8, batch_weight=2.0, class_weight=3.0)
    expected = ref_mlkd(zs, zt, batch.target, [[t] * B for t in temps], 0.5, 0.8, 2.0, 3.0)
    close(out["loss"], expected)


def test_energy_mlkd_shifts_and_clamps_matches_reference():
    group = mixed_groups()
    batch = make_batch(seed=11, group=group)
    zs, zt = rows(batch.student), rows(batch.teacher)
    temps = (2.0, 3.0, 4.0)
    shift = {-1: 2.0, 0: 0.0, 1: -2.0}
    # the high group's 2 - 2 = 0 is clamped to MIN_TEMPERATURE
    temp_rows = [[max(t + shift[int(g)], MIN_TEMPERATURE) for g in group] for t in temps]
    assert temp_rows[0][2] == MIN_TEMPERATURE
    out = LOSSES.get("energy_mlkd")(batch, temperatures=temps)
    close(out["loss"], ref_mlkd(zs, zt, batch.target, temp_rows, 1.0, 1.0, 1.0, 1.0))


def test_graded_temperature_per_decile():
    decile_temps = [6.0 - 4.0 * d / 9 for d in range(10)]  # linear from t_max (decile 0) to t_min (decile 9)
    centres = torch.tensor([(d + 0.5) / 10 for d in range(10)])
    assert graded_temperature(centres, 2.0, 6.0).tolist() == pytest.approx(decile_temps, rel=1e-6)
    # the exact boundaries rank/N, as float32, fall in their own decile
    n = 1000
    q = torch.arange(n, dtype=torch.float32) / n
    got = graded_temperature(q, 2.0, 6.0)
    want = torch.tensor([decile_temps[(10 * i) // n] for i in range(n)], dtype=torch.float32)
    assert torch.allclose(got, want)


def test_graded_kd_matches_reference():
    # (quantile, its decile); 0.9 sits exactly on a boundary (float32 stores it as 0.89999998)
    cases = [(0.0, 0), (0.05, 0), (0.25, 2), (0.5, 5), (0.71, 7), (0.9, 9), (0.999, 9)]
    batch = make_batch(seed=12, quantile=torch.tensor([q for q, _ in cases]))
    zs, zt = rows(batch.student), rows(batch.teacher)
    temps = [7.0 - 5.0 * d / 9 for _, d in cases]  # t_min=2, t_max=7
    out = LOSSES.get("graded_kd")(batch, t_min=2.0, t_max=7.0, ce_weight=0.2, kd_weight=0.8)
    close(out["loss"], ref_kd(zs, zt, batch.target, temps, 0.2, 0.8))


def test_graded_kd_without_quantile_uses_middle_temperature():
    batch = make_batch(seed=13)
    zs, zt = rows(batch.student), rows(batch.teacher)
    out = LOSSES.get("graded_kd")(batch, t_min=2.0, t_max=6.0)
    close(out["loss"], ref_kd(zs, zt, batch.target, [4.0] * B, 0.1, 0.9))


@pytest.mark.parametrize("name", KD_LOSSES)
def test_standardized_matches_reference_on_zscored_logits(name):
    """With standardize_logits the loss equals the plain loss evaluated on z-scored logits (CE aside)."""
    batch = make_batch(seed=14, target=False, group=mixed_groups(), quantile=torch.rand(B), epoch=100.0)
    zs, zt = rows(batch.student), rows(batch.teacher)
    zs_std = torch.tensor([zscore(r) for r in zs], dtype=torch.float64)
    zt_std = torch.tensor([zscore(r) for r in zt], dtype=torch.float64)
    pre = LossBatch(zs_std.float(), zt_std.float(), None, batch.group, batch.quantile, batch.epoch)
    close(LOSSES.get(name)(batch, standardize_logits=True)["loss"], num(LOSSES.get(name)(pre)["loss"]), rel=1e-4)
    if name == "kd":  # and the z-scoring itself against the float64 reference
        close(LOSSES.get(name)(batch, standardize_logits=True)["loss"], 0.9 * ref_kd_term(rows(zs_std), rows(zt_std), [4.0] * B))


@pytest.mark.parametrize("name", KD_LOSSES)
def test_standardize_invariant_to_shift_and_positive_scale(name):
    batch = make_batch(seed=15, target=False, group=mixed_groups(), quantile=torch.rand(B), epoch=100.0)
    g = torch.Generator().manual_seed(16)
    shift = torch.randn(B, 1, generator=g) * 50
    scale = torch.rand(B, 1, generator=g) * 9 + 0.5
    moved = LossBatch(batch.student.detach() * scale + shift, batch.teacher, None, batch.group, batch.quantile, batch.epoch)
    fn = LOSSES.get(name)
    a = num(fn(batch, standardize_logits=True)["loss"])
    b = num(fn(moved, standardize_logits=True)["loss"])
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    # sanity: without standardisation the same move does change the loss
    assert num(fn(moved)["loss"]) != pytest.approx(num(fn(batch)["loss"]), rel=1e-3)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("kd", {"temperature": 0.0}),
        ("energy_kd", {"temperature": 2.0, "t_minus": -2.0}),
        ("energy_kd", {"temperature": 2.0, "t_plus": -3.0}),
        ("graded_kd", {"t_min": 0.0}),
        ("mlkd", {"temperatures": ()}),
        ("mlkd", {"temperatures": (2.0, -1.0)}),
    ],
)
def test_rejects_non_positive_temperatures(name, params):
    with pytest.raises(ValueError):
        LOSSES.get(name)(make_batch(), **params)


# ---------------------------------------------------------------- composition: divergence × temperature policy

#: the public parameters (recipes and docs/methods.md use them), in order, with their defaults
PUBLIC_PARAMS = {
    "ce": {},
    "kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize_logits": False},
    "energy_kd": {"temperature": 4.0, "t_plus": 2.0, "t_minus": -2.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize_logits": False},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0, "ce_weight": 1.0, "standardize_logits": False},
    "energy_dkd": {
        "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "t_plus": 2.0, "t_minus": -2.0, "warmup_epochs": 20.0, "ce_weight": 1.0,
        "standardize_logits": False,
    },
    "mlkd": {
        "temperatures": (2.0, 3.0, 4.0, 5.0, 6.0), "ce_weight": 1.0, "kd_weight": 1.0, "batch_weight": 1.0, "class_weight": 1.0,
        "standardize_logits": False,
    },
    "energy_mlkd": {
        "temperatures": (2.0, 3.0, 4.0, 5.0, 6.0), "t_plus": 2.0, "t_minus": -2.0, "ce_weight": 1.0, "kd_weight": 1.0,
        "batch_weight": 1.0, "class_weight": 1.0, "standardize_logits": False,
    },
    "graded_kd": {"t_min": 2.0, "t_max": 6.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize_logits": False},
}


def keyword_params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def test_registered_names_parameters_and_defaults_are_the_public_ones():
    assert LOSSES.names() == sorted(PUBLIC_PARAMS)
    for name, expected in PUBLIC_PARAMS.items():
        fn = LOSSES.get(name)
        assert {p.name: p.default for p in keyword_params(fn)} == expected, name
        assert list(inspect.signature(fn).parameters)[: 1 + len(expected)] == ["batch", *expected], name
        hints = inspect.get_annotations(fn, eval_str=True)
        for p in keyword_params(fn):
            assert hints[p.name] == (tuple[float, ...] if p.name == "temperatures" else type(p.default)), (name, p.name)


@pytest.mark.parametrize(("plain", "energy", "base"), [("kd", "energy_kd", "temperature"), ("dkd", "energy_dkd", "temperature"), ("mlkd", "energy_mlkd", "temperatures")])
def test_energy_signature_is_plain_signature_plus_shifts(plain, energy, base):
    """The energy variant adds exactly t_plus / t_minus after the base temperature; every other parameter is the
    plain loss's own (same kind, default and annotation), so the two cannot drift apart."""
    ours = keyword_params(LOSSES.get(plain))
    theirs = keyword_params(LOSSES.get(energy))
    at = [p.name for p in ours].index(base) + 1
    assert [p.name for p in theirs] == [p.name for p in ours[:at]] + ["t_plus", "t_minus"] + [p.name for p in ours[at:]]
    assert [p for p in theirs if p.name not in ("t_plus", "t_minus")] == ours
    assert keyword_params(LOSSES.get("energy_kd"))[1:3] == keyword_params(LOSSES.get(energy))[at : at + 2]


def test_each_loss_is_a_divergence_times_a_policy():
    """Every parameter of a composed loss is declared once: by its divergence or by its temperature policy."""
    pairs = {
        "kd": (losses.kd_divergence, losses.CONSTANT),
        "energy_kd": (losses.kd_divergence, losses.ENERGY),
        "graded_kd": (losses.kd_divergence, losses.GRADED),
        "dkd": (losses.dkd_divergence, losses.CONSTANT),
        "energy_dkd": (losses.dkd_divergence, losses.ENERGY),
        "mlkd": (losses.mlkd_divergence, losses.CONSTANT),
        "energy_mlkd": (losses.mlkd_divergence, losses.ENERGY),
    }
    for name, (divergence, policy) in pairs.items():
        own = keyword_params(divergence)
        adds = [p for p in keyword_params(policy.vector) if not (divergence.per_base and p.name == "temperature")]
        composed = keyword_params(LOSSES.get(name))
        assert sorted(composed, key=lambda p: p.name) == sorted(own + adds, key=lambda p: p.name), name


def test_composed_loss_equals_its_divergence_at_the_policy_temperatures():
    batch = make_batch(seed=17, group=mixed_groups(), quantile=torch.rand(B), epoch=4.0)
    t_vec = losses.GRADED.vector(batch, t_min=1.5, t_max=5.0)
    a = losses.kd_divergence(batch, t_vec, ce_weight=0.3, kd_weight=0.6)
    b = LOSSES.get("graded_kd")(batch, t_min=1.5, t_max=5.0, ce_weight=0.3, kd_weight=0.6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compose_rejects_a_policy_without_base_temperature_and_a_name_clash():
    with pytest.raises(TypeError):
        losses.compose("graded_mlkd", losses.mlkd_divergence, losses.GRADED, "no base temperature to grade")
    clash = losses.Policy(lambda batch, *, ce_weight=0.5: None)
    with pytest.raises(ValueError, match="duplicate"):
        losses.compose("clashing_kd", losses.kd_divergence, clash, "ce_weight declared twice")
    assert "graded_mlkd" not in LOSSES and "clashing_kd" not in LOSSES


@pytest.mark.parametrize("name", KD_LOSSES)
def test_composed_losses_reject_unknown_and_positional_params(name):
    with pytest.raises(TypeError):
        LOSSES.get(name)(make_batch(), not_a_param=1.0)
    with pytest.raises(TypeError):
        LOSSES.get(name)(make_batch(), 4.0)
