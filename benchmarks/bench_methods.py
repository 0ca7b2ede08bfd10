"""Does Energy KD earn its keep, and what does it cost? Accuracy, cost and deployment on real CIFAR-100.

Every configuration (student × method × seed) is one real run of the pipeline's own stages (teacher → score →
plan → distill, plus export → validate for the deployment rows), in its own run folder under
``benchmarks/cache/methods/<protocol>/`` named by a hash of its overrides. A finished stage is never redone
and an interrupted one resumes from its checkpoint, so the benchmark can be run in chunks: stop it, re-run it.

    python benchmarks/bench_methods.py                          # CPU protocol, everything (about 2 h on 2 cores)
    python benchmarks/bench_methods.py --only mobilenet_v2      # one chunk (substring of the configuration id)
    python benchmarks/bench_methods.py --report-only            # rebuild docs/benchmarks.md from the cache
    python benchmarks/bench_methods.py --protocol gpu           # the paper's 240-epoch schedule

Writes ``docs/benchmarks.md``, its plots in ``docs/benchmarks/`` and the raw results as
``docs/benchmarks/results.json``. Run it alone: other processes on a small CPU distort every timing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgedistill import fsio  # noqa: E402
from edgedistill.data import EpochSampler, make_loader, to_float  # noqa: E402
from edgedistill.losses import LOSSES  # noqa: E402
from edgedistill.objectives import Augmenter, DistillObjective  # noqa: E402
from edgedistill.plots import png, pyplot  # noqa: E402
from edgedistill.recipe import Recipe, load_recipe  # noqa: E402
from edgedistill.context import RunContext  # noqa: E402
from edgedistill.folder import RunFolder  # noqa: E402
from edgedistill.run import open_run, run_stage  # noqa: E402
from edgedistill.train import build_optimizer  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "cifar100-energy-kd.yaml"
CACHE = ROOT / "benchmarks" / "cache" / "methods"
DOCS = ROOT / "docs"

# The CPU protocol: 40 training images per class for 3 epochs, a class-balanced fifth of the test split,
# a short cosine schedule. It is sized so that the whole grid (24 runs) takes about 2 hours on 2 cores; the GPU
# protocol is the recipe itself (the paper's 240 epochs on the full splits).
PROTOCOLS = {
    "cpu": {
        "overrides": [
            "data.train_limit=4000", "data.test_limit=2000", "data.num_workers=0", "augment.profile_steps=3",
            "distill.epochs=3", "distill.schedule={name: cosine, warmup_epochs: 0.2}", "distill.optimizer.lr=0.05",
        ],
        "epochs": 3,
    },
    "gpu": {"overrides": [], "epochs": 240},
    # checks this script end to end in minutes; its numbers mean nothing
    "smoke": {"overrides": ["data.train_limit=500", "data.test_limit=500", "data.batch_size=100", "data.num_workers=0", "distill.epochs=1",
                            "distill.schedule={name: constant}", "augment.profile_steps=1"], "epochs": 1},
}

STUDENTS = {
    "mobilenet_v2": ["student.arch=mobilenet_v2", "student.small_input=true"],
    "shufflenet_v2": ["student.arch=shufflenet_v2_x1_0", "student.small_input=true"],
}

KD = "{name: kd, temperature: 4, ce_weight: 0.1, kd_weight: 0.9}"
ENERGY_KD = "{name: energy_kd, temperature: 4, t_plus: 2, t_minus: -2, ce_weight: 0.1, kd_weight: 0.9}"


def _dkd(name: str, epochs: int) -> str:
    # DKD's loss warm-up is 20 of 240 epochs in its paper; keep that share of a shorter schedule
    extra = ", t_plus: 2, t_minus: -2" if name == "energy_dkd" else ""
    return f"{{name: {name}, alpha: 1, beta: 8, temperature: 4, ce_weight: 1, warmup_epochs: {20 / 240 * epochs:g}{extra}}}"


@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...] = ()
    dkd: str | None = None  # a DKD-family loss, whose warm-up depends on the protocol's length
    seeds: tuple[int, ...] = (0,)

    def recipe_overrides(self, epochs: int) -> list[str]:
        return list(self.overrides) + ([f"distill.loss={_dkd(self.dkd, epochs)}"] if self.dkd else [])


METHODS = {
    "ce": Method("no teacher (CE)", ("distill.loss={name: ce}",)),
    "kd": Method("KD", (f"distill.loss={KD}",), seeds=(0, 1)),
    "energy_kd": Method("Energy KD (paper direction)", (f"distill.loss={ENERGY_KD}",), seeds=(0, 1)),
    "energy_kd_reversed": Method("Energy KD (reversed)", (f"distill.loss={ENERGY_KD}", "energy.direction=reversed"), seeds=(0, 1)),
    "dkd": Method("DKD", dkd="dkd"),
    "energy_dkd": Method("Energy DKD", dkd="energy_dkd"),
    "kd_cutmix_all": Method("KD + CutMix on all data", (f"distill.loss={KD}", "augment.selection=all")),
    "kd_heda_0.2": Method("KD + HE-DA, r = 0.2", (f"distill.loss={KD}", "augment.selection=high", "augment.fraction=0.2")),
    "kd_heda_0.5": Method("KD + HE-DA, r = 0.5", (f"distill.loss={KD}", "augment.selection=high", "augment.fraction=0.5")),
}
DEPLOY_METHOD = "energy_kd"  # its seed-0 students are exported and validated
TRAIN_STAGES = ("teacher", "score", "plan", "distill")
DEPLOY_STAGES = ("export", "validate")


@dataclass(frozen=True)
class Config:
    student: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.student}-{self.method}-s{self.seed}"

    @property
    def deploy(self) -> bool:
        return self.method == DEPLOY_METHOD and self.seed == 0

    def overrides(self, protocol: str) -> list[str]:
        p = PROTOCOLS[protocol]
        out = p["overrides"] + STUDENTS[self.student] + METHODS[self.method].recipe_overrides(p["epochs"]) + [f"seed={self.seed}"]
        return out + ["export.formats=[fp32, int8, fp16]"]


def grid() -> list[Config]:
    # seed 0 of every configuration first, so a partial run already covers the whole table
    configs = [Config(s, m, seed) for s in STUDENTS for m, meth in METHODS.items() for seed in meth.seeds]
    return sorted(configs, key=lambda c: (c.seed, list(STUDENTS).index(c.student)))


def config_recipe(cfg: Config, protocol: str, *extra: str) -> Recipe:
    overrides = cfg.overrides(protocol)
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]
    return load_recipe(BASE_RECIPE, overrides + [f"name={cfg.id}-{key}", *extra])


def open_config(cfg: Config, protocol: str) -> RunContext:
    recipe = config_recipe(cfg, protocol)
    return open_run(recipe, CACHE / protocol / recipe.name, resume=True)


def run_config(cfg: Config, protocol: str) -> None:
    ctx = open_config(cfg, protocol)
    for stage in TRAIN_STAGES:
        if not ctx.run.done(stage):
            run_stage(ctx, stage)
    if cfg.deploy:
        # A shipped model is judged on the whole test split, not the protocol's subset that keeps per-epoch
        # evaluation cheap. Export and validate read nothing else that differs, so the same folder serves.
        full = RunContext(config_recipe(cfg, protocol, "data.test_limit=null"), ctx.run, ctx.dist, resume=True)
        validation = ctx.run / "validation.json"
        if validation.exists() and json.loads(validation.read_text())["settings"]["test_images"] != len(full.data.test):
            ctx.run.clear(["validate"])
        for stage in DEPLOY_STAGES:
            if not ctx.run.done(stage):
                run_stage(full, stage)


# ---------------------------------------------------------------- collecting


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(cfg: Config, protocol: str) -> dict | None:
    """One configuration's numbers from its run folder, or None while its training is unfinished."""
    recipe = config_recipe(cfg, protocol)
    run = RunFolder(CACHE / protocol / recipe.name)
    if not run.done("distill"):
        return None
    epochs = _jsonl(run / "metrics.jsonl")
    plan = json.loads((run / "plan.json").read_text())
    cost = plan["cost_model"]
    per_sample = cost["student_step_per_sample"] + cost["teacher_per_sample"] + cost["fixed_per_step"] / cost["batch_size"]
    row = {
        "id": cfg.id, "student": cfg.student, "method": cfg.method, "seed": cfg.seed, "run": str(run.root.relative_to(ROOT)),
        "teacher_top1": run.summary("teacher").get("test_top1"), "test_top1": epochs[-1]["test_top1"], "best_top1": max(e["test_top1"] for e in epochs),
        "epoch_seconds": statistics.median(e["epoch_seconds"] for e in epochs), "train_seconds": sum(e["epoch_seconds"] for e in epochs),
        "images_per_second": statistics.median(e["images_per_second"] for e in epochs),
        "n_train": cost["n_train"], "test_limit": recipe.data.test_limit, "fraction": plan["fraction"], "predicted_train_seconds": plan["predicted_train_seconds"],
        # the plan's own r = 0 prediction, so that the predicted overhead carries none of another run's noise
        "predicted_train_overhead": plan["predicted_train_seconds"] / (plan["curve"][0]["epoch_seconds"] - cost["eval_seconds"]) - 1,
        "teacher_share": cost["teacher_per_sample"] / per_sample, "plan_curve": plan["curve"], "eval_seconds": cost["eval_seconds"],
    }
    if run.done("validate"):
        row["validation"] = json.loads((run / "validation.json").read_text())
    return row


# ---------------------------------------------------------------- loss overhead, side by side


def loss_overhead(ctx: RunContext, names: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of one full distillation step per loss, the losses interleaved step by step on the same
    batches so that machine noise falls on all of them alike."""
    torch.manual_seed(0)
    train = ctx.train_set()
    loader = make_loader(train, ctx.recipe.data.batch_size, EpochSampler(len(train), seed=0, shuffle=True), num_workers=0)
    batches = list(itertools.islice(loader, rounds + 2))
    student = ctx.build_student().to(ctx.device).train()
    optimizer = build_optimizer(student, ctx.recipe.distill.optimizer)
    energy = ctx.energy_index()
    no_augment = Augmenter(ctx.recipe.augment.method, None, "high", 0.0)
    objectives = {n: DistillObjective(ctx.teacher, LOSSES.get(n), {}, energy, no_augment) for n in names}
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, (images, labels, indices) in enumerate(batches):
        x = to_float(images, ctx.device, False)
        labels = labels.to(ctx.device)
        for n in names:
            sync()
            t = time.perf_counter()
            losses, _ = objectives[n](student, x, labels, indices, 1.0)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            sync()
            if i >= 2:  # the first two rounds warm up allocators and kernels
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


# ---------------------------------------------------------------- writing


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per student and method: mean ± std of the final top-1 over seeds, and median cost."""
    out: dict[str, dict[str, dict]] = {}
    for (student, method), group in itertools.groupby(sorted(rows, key=lambda r: (r["student"], r["method"])), key=lambda r: (r["student"], r["method"])):
        group = list(group)
        m, s = mean_std([r["test_top1"] for r in group])
        out.setdefault(student, {})[method] = {
            "top1_mean": m, "top1_std": s, "seeds": [r["seed"] for r in group], "top1": [r["test_top1"] for r in group],
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in group),
            "images_per_second": statistics.median(r["images_per_second"] for r in group),
        }
    return out


HEDA_METHODS = ("kd", "kd_heda_0.2", "kd_heda_0.5", "kd_cutmix_all")  # r = 0, 0.2, 0.5 and 1


def heda_points(rows: list[dict], summary: dict, student: str) -> list[dict]:
    """Training seconds per epoch against r (seed 0): measured next to each run's own plan-stage prediction.

    r = 0 is plain KD, measured as the mean over its seeds; an overhead is relative to that measurement, and a
    predicted overhead to the same plan's own r = 0 estimate, so no run's prediction carries another's noise.
    """
    if "kd" not in summary.get(student, {}):
        return []
    base = summary[student]["kd"]["epoch_seconds"]
    runs = sorted((r for r in rows if r["student"] == student and r["seed"] == 0 and r["method"] in HEDA_METHODS), key=lambda r: r["fraction"] or 0)
    points = []
    for r in runs:
        measured = base if r["method"] == "kd" else r["epoch_seconds"]
        points.append({"r": r["fraction"] or 0.0, "measured": measured, "predicted": r["predicted_train_seconds"],
                       "measured_overhead": measured / base - 1, "predicted_overhead": r["predicted_train_overhead"]})
    return points


def fmt_acc(s: dict) -> str:
    return f"{s['top1_mean']:.2f}" + (f" ± {s['top1_std']:.2f}" if s["top1_std"] is not None else "")


VERDICT_WORDS = {"noise": "within noise", "unknown": "no noise estimate"}  # "better" and "worse" say themselves


def seed_noise(summary: dict, student: str) -> float | None:
    """The seed-to-seed spread of a student: the largest std among its multi-seed methods."""
    stds = [s["top1_std"] for s in summary[student].values() if s["top1_std"] is not None]
    return max(stds) if stds else None


def compare(summary: dict, student: str, a: str, b: str) -> tuple[str, str] | None:
    """Method b against method a as one plain sentence, and its verdict: "better" or "worse" when the
    difference exceeds twice the student's seed noise, else "noise" (or "unknown" without a noise estimate)."""
    sa, sb = summary.get(student, {}).get(a), summary.get(student, {}).get(b)
    if not sa or not sb:
        return None
    d = sb["top1_mean"] - sa["top1_mean"]
    noise = seed_noise(summary, student)
    if noise is None:
        verdict, words = "unknown", "one seed each, no noise estimate"
    elif abs(d) <= 2 * noise:
        verdict, words = "noise", f"within seed noise, std up to {noise:.2f}"
    else:
        verdict = "better" if d > 0 else "worse"
        words = f"{verdict} by more than twice the seed std of {noise:.2f}"
    return f"{METHODS[b].label} vs {METHODS[a].label}: {sb['top1_mean']:.2f} vs {sa['top1_mean']:.2f} % ({d:+.2f} points, {words})", verdict


def plots(rows: list[dict], summary: dict, out: Path) -> list[str]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    methods = [m for m in METHODS if any(m in summary[s] for s in summary)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    width = 0.8 / max(len(summary), 1)
    for k, student in enumerate(summary):
        xs = [i + k * width for i, m in enumerate(methods) if m in summary[student]]
        ss = [summary[student][m] for m in methods if m in summary[student]]
        axes[0].bar(xs, [s["top1_mean"] for s in ss], width, yerr=[s["top1_std"] or 0 for s in ss], capsize=3, label=student)
        axes[1].bar(xs, [s["images_per_second"] for s in ss], width, label=student)
    for ax, title in zip(axes, ("test top-1 (%), mean ± std over seeds", "training images/s (original images)")):
        ax.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels([METHODS[m].label for m in methods], rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fsio.write_bytes(out / "accuracy_cost.png", png(fig))
    names.append("accuracy_cost.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for student in summary:
        pts = heda_points(rows, summary, student)
        if not pts:
            continue
        line = ax.plot([p["r"] for p in pts], [p["measured"] for p in pts], "o-", label=f"{student}: measured")[0]
        ax.plot([p["r"] for p in pts], [p["predicted"] for p in pts], "x--", color=line.get_color(), label=f"{student}: plan stage")
    ax.set_xlabel("HE-DA fraction r (1 = CutMix on all data)")
    ax.set_ylabel("training seconds per epoch")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fsio.write_bytes(out / "heda_cost.png", png(fig))
    names.append("heda_cost.png")
    return names


def write_docs(rows: list[dict], overhead: dict, protocol: str, command: str) -> None:
    summary = summarize(rows)
    figures = plots(rows, summary, DOCS / "benchmarks")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    limit = rows[0]["test_limit"] if rows else None
    test_phrase = f"a class-balanced {limit:,}-image subset of the 10,000 test images" if limit else "all 10,000 test images"
    L: list[str] = ["# Benchmarks on real CIFAR-100", ""]
    L += [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({machine}); "
          f"{len(rows)} finished runs, {sum(r['train_seconds'] for r in rows) / 3600:.1f} h of distillation epochs in all. Protocol `{protocol}`: `{' '.join(PROTOCOLS[protocol]['overrides']) or 'the recipe as is'}` on top of "
          f"`recipes/cifar100-energy-kd.yaml` (teacher: the shared ResNet-56, data: `../shared/data/cifar100-real`; {test_phrase}).", ""]

    L += ["## Findings", ""]
    tops = [m["top1_mean"] for st in summary.values() for m in st.values()]
    teacher = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None), None)
    L.append(f"In plain words: the students reach {min(tops):.1f}–{max(tops):.1f} % top-1 here"
             + (f" (the teacher: {teacher:.2f} %)" if teacher is not None else "")
             + ", so this protocol ranks the methods early in training, not at convergence where the paper measures them. "
             "A difference counts only when it is more than twice the seed-to-seed spread.")
    L.append("")
    verdicts = {st: (compare(summary, st, "kd", "energy_kd") or ("", "unknown"))[1] for st in summary}
    won = [st for st, v in verdicts.items() if v == "better"]
    L.append("Energy KD (paper direction) " + (f"beats KD beyond seed noise on {', '.join(won)}" if won else "does not beat KD beyond seed noise on any student")
             + f" ({'; '.join(f'{st}: {VERDICT_WORDS.get(v, v)}' for st, v in verdicts.items())}).")
    L.append("")
    for student in summary:
        L.append(f"**{student}**")
        L.append("")
        for a, b in (("kd", "energy_kd"), ("kd", "energy_kd_reversed"), ("energy_kd_reversed", "energy_kd"), ("ce", "kd"), ("dkd", "energy_dkd"),
                     ("kd", "kd_heda_0.2"), ("kd", "kd_heda_0.5"), ("kd_cutmix_all", "kd_heda_0.5")):
            found = compare(summary, student, a, b)
            if found:
                L.append(f"- {found[0]}.")
        L.append("")
    if overhead:
        for student, o in overhead.items():
            parts = [f"{e} {100 * (o[e] / o[b] - 1):+.1f} % over {b}" for b, e in (("kd", "energy_kd"), ("dkd", "energy_dkd")) if b in o and e in o]
            L.append(f"- Cost of the energy-aware losses ({student}, full steps interleaved on the same batches): {'; '.join(parts)} (goal: ≤ 3 %).")
    for student in summary:
        pts = {p["r"]: p for p in heda_points(rows, summary, student)}
        if pts.keys() - {0.0}:
            costs = ", ".join(f"r = {r:g} {100 * p['measured_overhead']:+.0f} % (planned {100 * p['predicted_overhead']:+.0f} %)"
                              for r, p in sorted(pts.items()) if r)
            L.append(f"- Training time per epoch over plain KD ({student}; r = 1 is CutMix on all data): {costs}.")
    shares = [f"{r['student']} {100 * r['teacher_share']:.0f} %" for r in rows if r["method"] == "kd" and r["seed"] == 0]
    if shares:
        L.append(f"- The teacher's forward pass is {', '.join(shares)} of a plain KD step (the plan stage's measurement).")
    L.append("")

    L += ["## Accuracy", "", f"Final-epoch test top-1 (%) on {test_phrase}; mean ± std over seeds where there are several.", ""]
    students = list(summary)
    L.append("| method | " + " | ".join(f"{s} top-1" for s in students) + " | seeds |")
    L.append("| --- | " + " | ".join("---:" for _ in students) + " | ---: |")
    for m, meth in METHODS.items():
        cells = [fmt_acc(summary[s][m]) if m in summary[s] else "–" for s in students]
        if any(c != "–" for c in cells):
            seeds = max(len(summary[s][m]["seeds"]) for s in students if m in summary[s])
            L.append(f"| {meth.label} | " + " | ".join(cells) + f" | {seeds} |")
    L += ["", f"![accuracy and cost](benchmarks/{figures[0]})", ""]

    L += ["## Cost", "", "Median over epochs of each run; images/s counts the original training images (HE-DA's mixed copies are extra work on top).", ""]
    L.append("| method | " + " | ".join(f"{s} epoch s | {s} img/s" for s in students) + " |")
    L.append("| --- | " + " | ".join("---: | ---:" for _ in students) + " |")
    for m, meth in METHODS.items():
        cells = [f"{summary[s][m]['epoch_seconds']:.1f} | {summary[s][m]['images_per_second']:.0f}" if m in summary[s] else "– | –" for s in students]
        if any(c != "– | –" for c in cells):
            L.append(f"| {meth.label} | " + " | ".join(cells) + " |")
    L += ["", "HE-DA overhead against r: measured training seconds per epoch (seed 0; r = 0 is plain KD, mean over its seeds) "
          "next to the plan stage's prediction for the same run, whose overhead is relative to its own r = 0 estimate:", ""]
    L.append("| student | r | measured s | predicted s | measured overhead | predicted overhead |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for student in students:
        for p in heda_points(rows, summary, student):
            L.append(f"| {student} | {p['r']:g} | {p['measured']:.1f} | {p['predicted']:.1f} | {100 * p['measured_overhead']:+.1f} % | {100 * p['predicted_overhead']:+.1f} % |")
    L.append("")
    same_cost = ("kd", "energy_kd", "energy_kd_reversed")  # equal work per step (see the interleaved timing below)
    for student in students:
        secs = [r["epoch_seconds"] for r in rows if r["student"] == student and r["method"] in same_cost]
        if len(secs) > 1:
            L.append(f"Read the measured columns with the drift of this machine in mind: the {len(secs)} {student} runs of KD and "
                     f"Energy KD, which do the same work per step, took {min(secs):.1f}–{max(secs):.1f} s per epoch "
                     f"(±{50 * (max(secs) / min(secs) - 1):.0f} %).")
    L += ["", f"![HE-DA cost](benchmarks/{figures[1]})", ""]
    if overhead:
        L += ["Energy-aware losses, one full distillation step each, interleaved on the same batches (median seconds):", ""]
        L.append("| student | " + " | ".join(next(iter(overhead.values()))) + " |")
        L.append("| --- | " + " | ".join("---:" for _ in next(iter(overhead.values()))) + " |")
        for student, o in overhead.items():
            L.append(f"| {student} | " + " | ".join(f"{v:.3f}" for v in o.values()) + " |")
        L.append("")

    validated = [r for r in rows if r.get("validation")]
    n_test = {r["validation"]["settings"]["test_images"] for r in validated}
    L += ["## Deployment", "", f"The seed-0 {METHODS[DEPLOY_METHOD].label} students, exported and validated by the pipeline "
          f"(ONNX Runtime on the CPU, {' / '.join(f'{n:,}' for n in sorted(n_test))} test images; parity at batches 1, 7 and 32, "
          f"latency at batch 1, throughput at batch 32 with the validate stage's fixed thread count).", ""]
    L.append("| student | variant | size MB | max abs diff | top-1 agreement | top-1 % | Δ vs PyTorch | p50 ms | img/s | × PyTorch eager | status |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in validated:
        v = r["validation"]
        eager = v.get("torch_images_per_second")
        L.append(f"| {r['student']} | PyTorch eager | – | – | – | {v['torch_top1']:.2f} | – | – | {eager:,.0f} | 1.00 | |")
        for name, x in v["variants"].items():
            ratio = f"{x['images_per_second'] / eager:.2f}" if eager else "–"
            L.append(f"| {r['student']} | {name} | {x['size_bytes'] / 2**20:.2f} | {x['max_abs_diff']:.1e} | {x['top1_agreement']:.4f} | {x['test_top1']:.2f} | {x['delta_top1']:+.2f} | "
                     f"{x['latency_ms_p50']:.2f} | {x['images_per_second']:,.0f} | {ratio} | {'✅' if x['passed'] else '❌ ' + '; '.join(x['failures'])} |")
    L += ["", "## Budget control", "", "Whether `fraction: auto` holds a `max_minutes` budget, measured by `benchmarks/bench_budget.py`: "
          "[benchmarks/budget.md](benchmarks/budget.md).", "", "## Step speed", "",
          "The distillation step before and after each speed-up (teacher runtime, channels_last, fused SGD, the teacher-logit "
          "cache), measured by `benchmarks/bench_speed.py`: [benchmarks/speed.md](benchmarks/speed.md).", "",
          "## Choosing the student for a device", "", "Three latency targets, three students, each validated under its target, "
          "measured by `benchmarks/bench_pick.py`: [benchmarks/pick.md](benchmarks/pick.md).", ""]
    L += ["", "## Reproduce", "", "```bash", command, "```", "",
          "Runs are cached per configuration under `benchmarks/cache/methods/`; re-running resumes. `--protocol gpu` uses the paper's "
          "240-epoch schedule (SGD 0.01, steps at 150/180/210, batch 64) on whatever GPU is present. The raw numbers are in "
          "[`benchmarks/results.json`](benchmarks/results.json).", ""]
    fsio.write_text(DOCS / "benchmarks.md", "\n".join(L))
    fsio.write_json(DOCS / "benchmarks" / "results.json", {"protocol": protocol, "machine": machine, "command": command,
                                                          "rows": rows, "summary": summary, "loss_step_seconds": overhead})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument("--only", action="append", default=[], help="run only configurations whose id contains this (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="write the docs from the cached runs; train nothing")
    ap.add_argument("--overhead-rounds", type=int, default=40, help="interleaved steps per loss for the loss-overhead timing (0: skip)")
    args = ap.parse_args()
    configs = [c for c in grid() if not args.only or any(o in c.id for o in args.only)]
    if not args.report_only:
        for i, cfg in enumerate(configs, 1):
            print(f"\n=== [{i}/{len(configs)}] {cfg.id}", flush=True)
            run_config(cfg, args.protocol)
    overhead = {}
    if args.overhead_rounds:
        for student in STUDENTS:
            cfg = Config(student, DEPLOY_METHOD, 0)
            if RunFolder(CACHE / args.protocol / config_recipe(cfg, args.protocol).name).done("score"):
                overhead[student] = loss_overhead(open_config(cfg, args.protocol), ["kd", "energy_kd", "dkd", "energy_dkd"], args.overhead_rounds)
    rows = [r for c in grid() if (r := collect(c, args.protocol))]
    if not rows:
        print(f"no finished runs under {CACHE / args.protocol}; docs/benchmarks.md left as it is", file=sys.stderr)
        return 1
    command = "python benchmarks/bench_methods.py" + (f" --protocol {args.protocol}" if args.protocol != "cpu" else "")
    write_docs(rows, overhead, args.protocol, command)
    print(f"wrote {DOCS / 'benchmarks.md'} ({len(rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
