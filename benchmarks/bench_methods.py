"""Does Energy KD earn its keep on real CIFAR-100, and what does it cost? Measured where students actually learn.

Every configuration (student × method × seed) is one real run of the pipeline's own stages in its own run folder
under ``benchmarks/cache/methods/<protocol>/``, named by a hash of its overrides. A finished stage is never redone
and an interrupted one resumes exactly from its checkpoint. A finished run's numbers are also written to
``benchmarks/records/methods/<protocol>/<id>.json``, which is committed: the cache is hours of CPU but lives only
in one checkout, so the grid is made across sessions and clones, and a configuration with a record is not trained
again. The work comes in three parts, because accuracy does not depend on the machine's load and timings do:

    python benchmarks/bench_methods.py train [--seed N] [--only TEXT]   # accuracy runs; may run beside other work
    python benchmarks/bench_methods.py costs     # alone on the machine: step costs of every method, plan vs measured
    python benchmarks/bench_methods.py deploy    # alone: export + validate the best student of each architecture
    python benchmarks/bench_methods.py report    # docs/benchmarks.md and docs/benchmarks/results.json from the cache
    python benchmarks/bench_methods.py verify ID # re-run one recorded configuration and name the first thing that differs

``--protocol cpu`` (default) is the full CIFAR-100-real train half (40k) and test half (10k), 12 epochs;
``--protocol gpu`` the paper's 240-epoch schedule; ``--protocol lt`` the long-tailed split (CIFAR-LT profile, imbalance
100) with a teacher trained on it alone; ``--protocol smoke`` checks this script in minutes.

Within a protocol, the runs of one seed see the same data order and the same augmented views (a function of seed,
epoch and index), so a method's difference to KD at the same seed is a paired comparison. Their teacher logits on
the clean views are therefore the same too: the first run of a seed records them (``distill.teacher_cache``) and the
others replay them exactly, which halves what the grid costs on a CPU. HE-DA's mixed extras always go through the
teacher. The teacher and energy scores do not depend on the seed or the method; they are computed once per
protocol and copied into each run folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgedistill.base import fsio
from edgedistill.pipeline.context import RunContext  # noqa: E402
from edgedistill.base.distributed import DistInfo  # noqa: E402
from edgedistill.base.errors import Interrupted  # noqa: E402
from edgedistill.pipeline.folder import RunFolder  # noqa: E402
from edgedistill.models.macs import model_stats  # noqa: E402
from edgedistill.models.students import build_student
from edgedistill.pipeline.planning import StepBench, measure_cost  # noqa: E402
from edgedistill.base.plots import png, pyplot  # noqa: E402
from edgedistill.recipe.schema import Recipe, load_recipe  # noqa: E402
from edgedistill.pipeline.run import LIBRARIES, open_run, run_stage  # noqa: E402
from edgedistill.distill.train import evaluate  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "cifar100-energy-kd.yaml"
CACHE = ROOT / "benchmarks" / "cache" / "methods"
RECORDS = ROOT / "benchmarks" / "records" / "methods"
DOCS = ROOT / "docs"

STUDENTS = {
    "shufflenet_v2_x0_5": ["student.arch=shufflenet_v2_x0_5"],
    "mobilenet_v2_w0.5": ["student.arch=mobilenet_v2", "student.width=0.5"],
    "mobilenet_v3_small": ["student.arch=mobilenet_v3_small"],
    # timm's (the timm extra; issue #33): the MobileNet of 2024, and PP-LCNet, designed for CPU latency
    "timm_mobilenetv4_conv_small": ["student.arch=timm/mobilenetv4_conv_small"],
    "timm_lcnet_100": ["student.arch=timm/lcnet_100"],
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

    def recipe_overrides(self, epochs: int) -> list[str]:
        return list(self.overrides) + ([f"distill.loss={_dkd(self.dkd, epochs)}"] if self.dkd else [])


METHODS = {
    "kd": Method("KD", (f"distill.loss={KD}",)),
    "energy_kd": Method("Energy KD (paper direction)", (f"distill.loss={ENERGY_KD}",)),
    "energy_kd_reversed": Method("Energy KD (reversed, authors' code)", (f"distill.loss={ENERGY_KD}", "energy.direction=reversed")),
    "ce": Method("no teacher (CE)", ("distill.loss={name: ce}",)),
    "kd_heda_0.5": Method("KD + HE-DA, r = 0.5", (f"distill.loss={KD}", "augment.selection=high", "augment.fraction=0.5")),
    "kd_cutmix_all": Method("KD + CutMix on all data", (f"distill.loss={KD}", "augment.selection=all")),
    "dkd": Method("DKD", dkd="dkd"),
    "energy_dkd": Method("Energy DKD", dkd="energy_dkd"),
    "energy_kd_heda_0.5": Method("Energy KD + HE-DA, r = 0.5", (f"distill.loss={ENERGY_KD}", "augment.selection=high", "augment.fraction=0.5")),
}
REFERENCE = "kd"  # every method is compared with KD at the same seed
# Two questions the grid asks besides "does it beat KD" (ShuffleNetV2 ×0.5, same seeds): which way the
# per-sample temperature should go, and whether mixing only the uncertain half is worth mixing everything.
HEAD_TO_HEAD = (
    ("energy_kd", "energy_kd_reversed", "Paper vs code direction",
     "Energy KD in the paper's direction − the reversed one of the authors' code"),
    ("kd_heda_0.5", "kd_cutmix_all", "Mixing the uncertain half vs mixing everything",
     "KD + HE-DA r = 0.5 − KD + CutMix on all data"),
)
HEDA = {"kd": 0.0, "kd_heda_0.5": 0.5, "kd_cutmix_all": 1.0}  # the plain-KD family by HE-DA fraction

# (student, method, seeds) in the order the runs of a seed are made: KD first (it records the teacher's logits
# that the later runs of the seed replay), then the comparisons the findings rest on, then the rest. HE-DA and
# CutMix have three seeds, not two: with two, CutMix's gain over KD (+2.28, +2.67) missed p < 0.05, which needs t > 12.7.
GRID = (
    ("shufflenet_v2_x0_5", "kd", 3), ("shufflenet_v2_x0_5", "energy_kd", 3), ("shufflenet_v2_x0_5", "energy_kd_reversed", 3),
    ("shufflenet_v2_x0_5", "ce", 3), ("mobilenet_v2_w0.5", "kd", 2), ("mobilenet_v2_w0.5", "energy_kd", 2),
    ("shufflenet_v2_x0_5", "kd_heda_0.5", 3), ("shufflenet_v2_x0_5", "kd_cutmix_all", 3),
    ("shufflenet_v2_x0_5", "dkd", 1), ("shufflenet_v2_x0_5", "energy_dkd", 1),
)


# The long-tail grid (ShuffleNetV2 ×0.5, three seeds): the balanced grid's questions asked again where the paper
# claims the most (CutMix on all data for "HE-DA vs mixing everything"), plus HE-DA under Energy KD.
GRID_LT = tuple(("shufflenet_v2_x0_5", m, 3) for m in ("kd", "energy_kd", "energy_kd_reversed", "ce", "kd_heda_0.5", "kd_cutmix_all",
                                                       "energy_kd_heda_0.5"))
# A teacher that saw only the long-tailed split (the paper's setting: one trained on the balanced set would know the
# tail the students' data lacks), trained by the pipeline's own teacher stage once per protocol.
LT_TEACHER = ("teacher={source: train, arch: resnet56, train: {epochs: 60, "
              "optimizer: {name: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}, schedule: {name: cosine, warmup_epochs: 2}}}")


@dataclass(frozen=True)
class Protocol:
    overrides: tuple[str, ...]
    epochs: int
    grid: tuple[tuple[str, str, int], ...]
    words: str

    def methods(self) -> dict[str, list[str]]:
        """Each student's methods."""
        out: dict[str, list[str]] = {}
        for student, method, _ in self.grid:
            out.setdefault(student, []).append(method)
        return out  # the schedule in one phrase, for the docs


# Fixed rather than measured: the teacher's runtime and the student's layout and compilation, so that no timing
# taken under the grid's own load decides anything about a run (docs/reliability.md).
FIXED = ("teacher.runtime=onnxruntime", "distill.channels_last=true", "distill.compile=false", "data.num_workers=0")
PROTOCOLS = {
    "cpu": Protocol(
        FIXED + ("data.batch_size=64", "distill.epochs=12", "distill.schedule={name: cosine, warmup_epochs: 1.8}",
                 "distill.optimizer={name: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"),
        12, GRID, "the full train half (40,000 images) and test half (10,000), 12 epochs, batch 64, SGD 0.05 with "
                  "Nesterov momentum 0.9 and weight decay 5e-4, cosine schedule after 1.8 warm-up epochs"),
    "gpu": Protocol((), 240, GRID, "the recipe as is: the paper's 240 epochs, SGD 0.01, steps at 150/180/210, batch 64"),
    # CIFAR-100-real's train half cut to the CIFAR-LT profile (imbalance 100: 400 down to 4 images a class, 8,668 in
    # all), the balanced test half; 40 epochs, so that the students are past their fast-learning phase on 8.5k images
    "lt": Protocol(
        (LT_TEACHER, *FIXED, "data.long_tail.imbalance=100", "data.batch_size=64", "distill.epochs=40",
         "distill.schedule={name: cosine, warmup_epochs: 2}",
         "distill.optimizer={name: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"),
        40, GRID_LT, "the train half cut to the CIFAR-LT profile with imbalance 100 (8,668 images, 400 down to 4 a class) "
                     "and the balanced test half (10,000), a ResNet-56 teacher trained on the long-tailed split only (60 "
                     "epochs), students 40 epochs, batch 64, SGD 0.05 with Nesterov momentum 0.9 and weight decay 5e-4, "
                     "cosine schedule after 2 warm-up epochs"),
    # the cpu protocol for timm's students, one seed to start: do they move the accuracy/latency frontier of
    # the cpu grid's ShuffleNetV2 ×0.5? (docs/benchmarks/zoo.md)
    "zoo": Protocol(
        FIXED + ("data.batch_size=64", "distill.epochs=12", "distill.schedule={name: cosine, warmup_epochs: 1.8}",
                 "distill.optimizer={name: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"),
        12, tuple((s, m, 1) for s in ("timm_mobilenetv4_conv_small", "timm_lcnet_100") for m in ("kd", "energy_kd")),
        "the cpu protocol (12 epochs on the full train half) for timm students"),
    # the students whose int8 benchmarks/bench_int8.py takes apart (post-training, fallback, QAT by loss; docs/benchmarks/int8.md)
    "int8": Protocol(
        FIXED + ("data.batch_size=64", "distill.epochs=12", "distill.schedule={name: cosine, warmup_epochs: 1.8}",
                 "distill.optimizer={name: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"),
        12, (("mobilenet_v3_small", "energy_kd", 1), ("mobilenet_v2_w0.5", "energy_kd", 1)),
        "the cpu protocol (12 epochs on the full train half), Energy KD, for int8"),
    # checks this script end to end in minutes; its numbers mean nothing
    "smoke": Protocol(
        FIXED + ("data.train_limit=512", "data.test_limit=500", "data.batch_size=64", "distill.epochs=1", "distill.schedule={name: constant}",
                 "augment.profile_steps=2", "validate.rounds=3", "validate.seconds=0.2"),
        1, (("shufflenet_v2_x0_5", "kd", 2), ("shufflenet_v2_x0_5", "energy_kd", 2), ("shufflenet_v2_x0_5", "ce", 1),
            ("mobilenet_v2_w0.5", "kd", 1), ("shufflenet_v2_x0_5", "kd_heda_0.5", 1)), "a smoke test"),
}
TRAIN_STAGES = ("teacher", "score", "plan", "distill")
COST_STEPS, COST_PASSES = 10, 2  # timed steps per method: the profile batches, taken in turns, twice over


@dataclass(frozen=True)
class Config:
    student: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.student}-{self.method}-s{self.seed}"


def grid(protocol: str) -> list[Config]:
    """Seed by seed, each in the grid's order."""
    g = PROTOCOLS[protocol].grid
    return [Config(s, m, seed) for seed in range(max(n for *_, n in g)) for s, m, n in g if seed < n]


def recipe_for(cfg: Config, protocol: str, *extra: str) -> Recipe:
    """The configuration's recipe; ``extra`` overrides change neither its folder's name nor anything it computes."""
    p = PROTOCOLS[protocol]
    overrides = [*p.overrides, *STUDENTS[cfg.student], *METHODS[cfg.method].recipe_overrides(p.epochs), f"seed={cfg.seed}"]
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]
    return load_recipe(BASE_RECIPE, [*overrides, f"name={cfg.id}-{key}", f"distill.teacher_cache={CACHE / protocol / 'teacher-logits'}", *extra])


def folder(cfg: Config, protocol: str) -> Path:
    return CACHE / protocol / recipe_for(cfg, protocol).name


# ---------------------------------------------------------------- train (accuracy; load does not matter)


def shared_scores(protocol: str) -> Path:
    """A run folder with the teacher and energy stages done, for every configuration of the protocol to start from.
    Neither depends on the student, the loss, HE-DA or the seed (scoring reads the training images in a fixed order
    through the evaluation transform)."""
    base = CACHE / protocol / "teacher-and-scores"
    if RunFolder(base).done("score"):  # not opened again: a second worker would find it locked
        return base
    recipe = recipe_for(Config(next(iter(STUDENTS)), REFERENCE, 0), protocol, "name=teacher-and-scores")
    ctx = open_run(recipe, base, resume=True)
    for stage in ("teacher", "score"):
        if not ctx.run.done(stage):
            run_stage(ctx, stage)
    return base


def teacher_card(protocol: str) -> dict | None:
    """The card of a teacher the protocol trains itself (``lt``): its schedule, test top-1 overall and by shot group,
    per-epoch curve and digests, written beside the records from the shared run folder once it has finished."""
    base, path = CACHE / protocol / "teacher-and-scores", RECORDS / protocol / "teacher.json"
    if RunFolder(base).done("teacher") and (base / "teacher_metrics.jsonl").exists():
        t, epochs = json.loads((base / "teacher.json").read_text()), _jsonl(base / "teacher_metrics.jsonl")
        recipe = recipe_for(Config(next(iter(STUDENTS)), REFERENCE, 0), protocol)
        tc, o = recipe.teacher.train, recipe.teacher.train.optimizer
        schedule = (f"{tc.epochs} epochs, batch {recipe.data.batch_size}, SGD {o.lr:g}{' Nesterov' if o.nesterov else ''} momentum "
                    f"{o.momentum:g}, weight decay {o.weight_decay:g}, {tc.schedule.name} schedule after {tc.schedule.warmup_epochs:g} warm-up epochs")
        fsio.write_json(path, {"arch": t["arch"], "schedule": schedule, "test_top1": t["test_top1"], "shot_top1": t.get("shot_top1"),
                               "top1_by_epoch": [e["test_top1"] for e in epochs], "train_minutes": sum(e["epoch_seconds"] for e in epochs) / 60,
                               "file_sha256": t["file_sha256"], "probe": t["probe"]})
    return json.loads(path.read_text()) if path.exists() else None


def train(cfg: Config, protocol: str, base: Path, stages: tuple[str, ...] = TRAIN_STAGES, root: Path | None = None, *extra: str) -> None:
    """Train one configuration in its run folder (``root``: elsewhere, with ``extra`` overrides, as ``verify`` does)."""
    root = root or folder(cfg, protocol)
    if not root.exists():  # copied whole, then renamed: a folder is there complete or not at all
        tmp = root.with_name(f".{root.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("recipe.yaml", "env.json"))
        tmp.rename(root)
    ctx = open_run(recipe_for(cfg, protocol, *extra), root, resume=True)
    for stage in stages:
        if not ctx.run.done(stage):
            run_stage(ctx, stage)


# ---------------------------------------------------------------- costs (alone on the machine)


def context(cfg: Config, protocol: str, *extra: str) -> RunContext:
    """The finished run's context with ``extra`` overrides, for measuring only: nothing is written to its folder."""
    return RunContext(recipe_for(cfg, protocol, *extra), RunFolder(folder(cfg, protocol)), DistInfo(), resume=True)


def measure_costs(protocol: str) -> dict:
    """Per student, one full distillation step of every method with the teacher live (no logit cache), all on the
    same batches in turns, so that the machine's drift falls on them alike; an epoch is its steps plus one
    evaluation of the test set. For the HE-DA rows, also the plan stage's forecast of the same epoch, measured now."""
    out = {}
    live = ("distill.teacher_cache=null", f"augment.profile_steps={COST_STEPS}")
    base = shared_scores(protocol)
    for student, methods in PROTOCOLS[protocol].methods().items():
        for m in methods:  # a fresh checkout has records but no run folders: only the plan is needed here
            train(Config(student, m, 0), protocol, base, stages=("teacher", "score", "plan"))
        ctxs = {m: context(Config(student, m, 0), protocol, *live) for m in methods}
        ref = ctxs[REFERENCE]
        bench = StepBench(ref)
        cl = ref.recipe.distill.channels_last is True
        nets = {m: bench.student(cl) for m in methods}
        objectives = {m: c.objective(c.read_json("plan.json")["fraction"]) for m, c in ctxs.items()}
        for o in objectives.values():
            o.augmenter.seed(0)
        seconds = bench.timed(*(bench.stepper(nets[m], objectives[m], cl) for m in methods), passes=COST_PASSES)
        t = time.perf_counter()
        evaluate(nets[REFERENCE], ref.test_set(), ref.recipe.data.eval_batch_size, ref.device, channels_last=cl)
        eval_seconds = time.perf_counter() - t
        n = len(ref.data.train)
        rows = {}
        for m, step in zip(methods, seconds):
            train_seconds = bench.steps_per_epoch * (step + bench.load_per_step)
            rows[m] = {"step_ms": 1e3 * step, "epoch_seconds": train_seconds + eval_seconds, "images_per_second": n / train_seconds}
        speed = {"channels_last": {"use": cl}, "compile": {"use": False}}
        for m in set(HEDA) & set(methods):
            cost = measure_cost(ctxs[m], speed, bench)
            rows[m]["planned_epoch_seconds"] = cost.epoch_seconds(HEDA[m])
        out[student] = {"methods": rows, "eval_seconds": eval_seconds, "steps_per_epoch": bench.steps_per_epoch, "n_train": n}
    return out


# ---------------------------------------------------------------- deploy (alone on the machine)


def best_runs(rows: list[dict]) -> dict[str, dict]:
    """Each student's run with the highest final top-1: the one deployed."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["student"] not in best or r["test_top1"] > best[r["student"]]["test_top1"]:
            best[r["student"]] = r
    return best


def ensure_distilled(cfg: Config, protocol: str) -> None:
    """A configuration known only from its record (a fresh clone or machine: the cache is not committed) is trained
    again; the same seed gives the same data order and initialisation, and the retrained top-1 is printed next to
    the recorded one (``verify`` compares them epoch by epoch)."""
    if RunFolder(folder(cfg, protocol)).done("distill"):
        return
    print(f"{cfg.id}: its run folder is not in this checkout's cache; training it again", flush=True)
    train(cfg, protocol, shared_scores(protocol))
    recorded = json.loads(record_path(cfg, protocol).read_text())["test_top1"] if record_path(cfg, protocol).exists() else None
    print(f"{cfg.id}: retrained top-1 {collect(cfg, protocol)['test_top1']:.2f} %, recorded "
          + (f"{recorded:.2f} %" if recorded is not None else "nothing"), flush=True)


def deploy(protocol: str, rows: list[dict]) -> None:
    """Export and validate the best run of each student (highest final test top-1), on the full test split, training
    again a best run known only from its record."""
    for student, best in best_runs(rows).items():
        cfg = Config(student, best["method"], best["seed"])
        ensure_distilled(cfg, protocol)
        ctx = open_run(recipe_for(cfg, protocol), folder(cfg, protocol), resume=True)
        for stage in ("export", "validate"):
            if not ctx.run.done(stage):
                run_stage(ctx, stage)
        save_record(cfg, protocol)


# ---------------------------------------------------------------- collecting


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(cfg: Config, protocol: str, root: Path | None = None) -> dict | None:
    """One configuration's numbers from its run folder, or None while its training is unfinished; with what made
    them: the library versions and code commit of the command that finished training, and the teacher's digests."""
    run = RunFolder(root or folder(cfg, protocol))
    if not run.done("distill"):
        return None
    epochs = _jsonl(run / "metrics.jsonl")
    plan = json.loads((run / "plan.json").read_text())
    env = json.loads((run / "env.json").read_text())
    finished = datetime.fromtimestamp((run.root / "stages" / "distill.done").stat().st_mtime, timezone.utc)
    # the command that finished training: a run resumed with another thread count lists it in env.json's history
    trained_by = [c for c in (env, *env["history"]) if datetime.fromisoformat(c["started_at"]) <= finished][-1]
    teacher = json.loads((run / "teacher.json").read_text())
    row = {
        "id": cfg.id, "student": cfg.student, "method": cfg.method, "seed": cfg.seed, "run": str(run.root.relative_to(ROOT)),
        "teacher_top1": run.summary("teacher").get("test_top1"), "test_top1": epochs[-1]["test_top1"],
        "best_top1": max(e["test_top1"] for e in epochs), "top1_by_epoch": [e["test_top1"] for e in epochs],
        "train_seconds": sum(e["epoch_seconds"] for e in epochs), "fraction": plan["fraction"],
        "n_train": plan["cost_model"]["n_train"], "test_limit": recipe_for(cfg, protocol).data.test_limit,
        "cpu_threads": trained_by["cpu_threads"],  # the reduction order, so a re-run to compare must use as many (benchmarks/README.md)
        "started_at": env["started_at"],
        "finished_at": finished.isoformat(timespec="seconds"),
        "environment": {k: trained_by.get(k) for k in ("code", *LIBRARIES)},
        "teacher": {k: v for k, v in teacher.items() if k in ("file_sha256", "probe")},
    }
    if epochs[-1].get("shot_top1"):
        row["shot_top1"], row["shot_top1_by_epoch"] = epochs[-1]["shot_top1"], [e["shot_top1"] for e in epochs]
        row["teacher_shot_top1"] = teacher.get("shot_top1")
    if run.done("validate"):
        row["validation"] = json.loads((run / "validation.json").read_text())
    return row


def record_path(cfg: Config, protocol: str) -> Path:
    return RECORDS / protocol / f"{cfg.id}.json"


def save_record(cfg: Config, protocol: str) -> dict | None:
    row = collect(cfg, protocol)
    if row:
        fsio.write_json(record_path(cfg, protocol), row)
    return row


def finished(cfg: Config, protocol: str) -> dict | None:
    """The configuration's numbers: from its run folder where this checkout has it (the record is brought up to
    date), else from its record if that was made under the same overrides (the run folder's name hashes them)."""
    if RunFolder(folder(cfg, protocol)).done("distill"):
        return save_record(cfg, protocol)
    path = record_path(cfg, protocol)
    row = json.loads(path.read_text()) if path.exists() else None
    return row if row and Path(row["run"]).name == folder(cfg, protocol).name else None


def finished_rows(protocol: str) -> list[dict]:
    return [r for c in grid(protocol) if (r := finished(c, protocol))]


# ---------------------------------------------------------------- verify (a stranger's re-run of one record)


def verify(record_id: str, protocol: str, epochs: int | None = None) -> int:
    """Train the recorded configuration again in a folder of its own, with the record's thread count and a teacher
    logit cache of its own (the teacher runs live), and compare: the environment first (code commit, library
    versions), then the teacher's file and logit digests, then top-1 epoch by epoch. Prints the first item that
    differs; 0 when the re-run retraces the record to the last digit, 1 otherwise.

    ``epochs``: stop after that many epochs and compare those (the first difference shows in the first epochs; the
    folder stays resumable, so a later, longer verify goes on from there)."""
    path = RECORDS / protocol / f"{record_id}.json"
    if not path.exists():
        print(f"no record {path}", file=sys.stderr)
        return 2
    record = json.loads(path.read_text())
    cfg = Config(record["student"], record["method"], record["seed"])
    torch.set_num_threads(record["cpu_threads"])
    work = CACHE / protocol / "verify"
    root = work / folder(cfg, protocol).name
    total = len(record["top1_by_epoch"])
    wanted = min(epochs or total, total)
    if len(_jsonl(root / "metrics.jsonl")) < wanted:
        with interrupt_after(root / "metrics.jsonl", wanted) if wanted < total else nullcontext():
            try:
                train(cfg, protocol, shared_scores(protocol), TRAIN_STAGES, root, f"distill.teacher_cache={work / 'teacher-logits'}")
            except Interrupted:
                pass  # stopped after the epochs asked for
    run = RunFolder(root)
    env, teacher = json.loads((run / "env.json").read_text()), json.loads((run / "teacher.json").read_text())
    now = [e["test_top1"] for e in _jsonl(run / "metrics.jsonl")][:wanted]
    # every command that trained the re-run (a longer verify resumes a shorter one's folder) against the record's
    items = [(f"environment.{k}", v, c.get(k)) for c in (env, *env["history"]) for k, v in record.get("environment", {}).items()]
    items += [(f"teacher.{k}", v, teacher.get(k)) for k, v in record.get("teacher", {}).items()]
    differing: list[tuple] = []
    for name, a, b in items:  # each item once, as the first command that differs has it
        if a != b and name not in {n for n, *_ in differing}:
            differing.append((name, a, b))
    compared = list(enumerate(zip(record["top1_by_epoch"], now), 1))
    print("| epoch | recorded top-1 | re-run top-1 | difference |\n| ---: | ---: | ---: | ---: |")
    for e, (a, b) in compared:
        print(f"| {e} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    differing += [(f"epoch {e} test top-1", a, b) for e, (a, b) in compared if a != b][:1]
    if "environment" not in record:
        print("the record holds no environment (made before records carried one): only the epochs can be compared")
    if not differing:
        print(f"{record_id}: the re-run retraces the record to the last digit ({len(compared)} of {len(record['top1_by_epoch'])} epochs)")
        return 0
    name, a, b = differing[0]
    print(f"{record_id}: first difference: {name}: recorded {a}, now {b}"
          + (f" (and {len(differing) - 1} more: {', '.join(n for n, *_ in differing[1:])})" if len(differing) > 1 else ""))
    return 1


@contextmanager
def interrupt_after(metrics: Path, epochs: int):
    """Send this process SIGINT once ``metrics`` holds ``epochs`` lines: the training loop finishes its step,
    checkpoints and raises Interrupted. Where in the next epoch the signal lands does not matter: the epochs
    compared are finished and logged by then."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            if len(_jsonl(metrics)) >= epochs:
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


# ---------------------------------------------------------------- statistics


def summarize(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per student and method: the final top-1 and the per-epoch curve of every seed, the finals' mean and std."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        s = out.setdefault(r["student"], {}).setdefault(r["method"], {"top1": {}, "curves": {}})
        s["top1"][r["seed"]], s["curves"][r["seed"]] = r["test_top1"], r["top1_by_epoch"]
    for methods in out.values():
        for s in methods.values():
            v = list(s["top1"].values())
            s.update(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else None, n=len(v))
    return out


ALPHA = 0.05


def paired(summary: dict, student: str, method: str, reference: str = REFERENCE) -> dict | None:
    """``method`` − ``reference`` (KD) at the same seeds: the differences, their mean and std, and a two-sided paired t-test.

    The rule: a difference is real when the paired t-test over the seeds gives p < 0.05. Pairing removes what a
    seed does to every method alike (initialisation, data order, augmented views); with one seed there is no
    estimate of the remaining noise, and no call is made."""
    a, b = summary.get(student, {}).get(reference), summary.get(student, {}).get(method)
    if not a or not b:
        return None
    seeds = sorted(set(a["top1"]) & set(b["top1"]))
    d = [b["top1"][s] - a["top1"][s] for s in seeds]
    out = {"seeds": seeds, "diffs": d, "mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else None}
    if len(d) < 2:
        return {**out, "p": None, "verdict": "one seed: not judged"}
    if out["std"] > 0:
        p = float(stats.ttest_rel([b["top1"][s] for s in seeds], [a["top1"][s] for s in seeds]).pvalue)
    else:  # the same difference at every seed: no noise left to test against
        p = 1.0 if out["mean"] == 0 else 0.0
    versus = METHODS[reference].label
    verdict = (f"better than {versus}" if out["mean"] > 0 else f"worse than {versus}") if p < ALPHA else "not called real"
    return {**out, "p": p, "verdict": verdict}


def fmt_acc(s: dict) -> str:
    return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")


def fmt_p(p: float) -> str:
    """``p = …`` to two decimals, or three where two would round onto the threshold or to zero and hide what p is."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if round(p, 2) in (ALPHA, 0) else f"p = {p:.2f}"


def fmt_paired(p: dict) -> str:
    spread = f" ± {p['std']:.2f}" if p["std"] is not None else ""
    pv = f", {fmt_p(p['p'])}" if p["p"] is not None else ""
    n = len(p["diffs"])
    return f"{p['mean']:+.2f}{spread} ({n} seed{'s' if n > 1 else ''}{pv}): {p['verdict']}"


def lead_over_time(summary: dict) -> list[str]:
    """Each method's paired difference to KD half-way through training and at the end (ShuffleNetV2 ×0.5, where
    the grid has most methods): whether a teacher signal's lead builds up or fades as the learning rate falls."""
    ms = summary.get("shufflenet_v2_x0_5", {})
    kd = ms.get(REFERENCE, {}).get("curves", {})
    rows = []
    for m, s in ms.items():
        seeds = sorted(set(s["curves"]) & set(kd)) if m != REFERENCE else []
        if seeds:
            half = len(kd[seeds[0]]) // 2 - 1
            rows.append((m, *(statistics.fmean(s["curves"][k][e] - kd[k][e] for k in seeds) for e in (half, -1))))
    if not rows:
        return []
    fading = [m for m, mid, end in rows if abs(end) < abs(mid)]
    return [f"- **Leads over KD by the end of training** (shufflenet_v2_x0_5, epoch {half + 1} → final, points, same seeds): "
            + "; ".join(f"{METHODS[m].label} {mid:+.2f} → {end:+.2f}" for m, mid, end in rows)
            + f". {len(fading)} of {len(rows)} differences are smaller at the end than half-way"
            + (": much of what these methods change is how fast the student learns, and a longer schedule may shrink the "
               "differences further" if 2 * len(fading) > len(rows) else ": most differences hold or grow as the learning rate falls")
            + " (see the curves under Accuracy)."]


def short_call(p: dict) -> str:
    """The rule's call on a paired difference, in a few words."""
    if p["p"] is None:
        return "one seed, not yet judged"
    n = len(p["diffs"])
    return f"{fmt_p(p['p'])} over {n} seeds: " + ("not a difference the rule calls real" if p["p"] >= ALPHA
                                                   else "a real gain" if p["mean"] > 0 else "a real loss")


def in_words(p: dict) -> str:
    """A paired difference as a sentence: its mean, every seed's difference, and the call the rule makes."""
    n = len(p["diffs"])
    seeds = ", ".join(f"s{seed} {d:+.2f}" for seed, d in zip(p["seeds"], p["diffs"]))
    if p["p"] is None:
        return f"{p['mean']:+.2f} points with one seed; not judged until a second seed is in"
    call = f"real: {p['verdict']}" if p["p"] < ALPHA else "not called real by the rule below"
    return f"{p['mean']:+.2f} points on average (per seed: {seeds}); {fmt_p(p['p'])} over {n} seeds, {call}"


# ---------------------------------------------------------------- writing


def plots(summary: dict, costs: dict, out: Path) -> list[str]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    methods = [m for m in METHODS if any(m in summary[s] for s in summary)]
    width = 0.8 / max(len(summary), 1)
    for k, student in enumerate(summary):
        shown = [(i, m) for i, m in enumerate(methods) if m in summary[student]]
        xs = [i + k * width for i, _ in shown]
        axes[0].bar(xs, [summary[student][m]["mean"] for _, m in shown], width, yerr=[summary[student][m]["std"] or 0 for _, m in shown],
                    capsize=3, label=student)
        if student in costs:
            c = costs[student]["methods"]
            axes[1].bar(xs, [c[m]["images_per_second"] if m in c else 0 for _, m in shown], width, label=student)
    for ax, title in zip(axes, ("final test top-1 (%), mean ± std over seeds", "training images/s, teacher live (quiet machine)")):
        ax.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels([METHODS[m].label for m in methods], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if ax.has_data():
            ax.legend(fontsize=8)
    lo = min(s["mean"] for st in summary.values() for s in st.values())
    axes[0].set_ylim(max(0, lo - 10), None)
    fig.tight_layout()
    fsio.write_bytes(out / "accuracy_cost.png", png(fig))

    fig, axes = plt.subplots(len(summary), 2, figsize=(14, 4 * len(summary)), dpi=110, squeeze=False)
    for (left, right), (student, ms) in zip(axes, summary.items()):
        kd = ms.get(REFERENCE, {}).get("curves", {})
        for m, s in ms.items():
            curves = list(s["curves"].values())
            epochs = range(1, len(curves[0]) + 1)
            color = f"C{list(METHODS).index(m)}"  # one colour per method in every panel
            left.plot(epochs, [statistics.fmean(c) for c in zip(*curves)], color=color, label=f"{METHODS[m].label} ({len(curves)})")
            seeds = sorted(set(s["curves"]) & set(kd)) if m != REFERENCE else []
            if seeds:  # paired by seed, as in the tables
                right.plot(epochs, [statistics.fmean(s["curves"][k][e] - kd[k][e] for k in seeds) for e in range(len(epochs))],
                           color=color, label=f"{METHODS[m].label} ({len(seeds)})")
        left.set_title(f"{student}: test top-1 (%) by epoch, mean over seeds", fontsize=10)
        right.set_title(f"{student}: − KD at the same seed (points) by epoch", fontsize=10)
        right.axhline(0, color="black", lw=0.8)
        for ax in (left, right):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        left.legend(fontsize=7)
        if right.has_data():  # outside: the differences fill the panel, and the no-teacher curve runs along its floor
            right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fsio.write_bytes(out / "curves.png", png(fig))
    return ["accuracy_cost.png", "curves.png"]


def student_sizes(protocol: str) -> dict[str, dict]:
    """Parameters and MACs per image of each student in the grid, at CIFAR-100's 100 classes and 32 px."""
    sizes = {}
    for cfg in grid(protocol):
        if cfg.student not in sizes:
            s = recipe_for(cfg, protocol).student
            net = build_student(s.arch, 100, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, width=s.width, small_input=s.small_input)
            sizes[cfg.student] = model_stats(net, 32)
    return sizes


def in_short(summary: dict, costs: dict) -> str:
    """The answer to the page's question in a few sentences, from the ShuffleNetV2 ×0.5 runs (where the grid has
    every method): what Energy KD adds to KD and at what cost, and which method trains the best student."""
    ms = summary.get("shufflenet_v2_x0_5", {})
    step = {m: x["step_ms"] for m, x in costs.get("shufflenet_v2_x0_5", {}).get("methods", {}).items()}

    def extra_cost(m: str) -> str:
        return f", for {100 * (step[m] / step[REFERENCE] - 1):+.0f} % time per step" if m in step and REFERENCE in step else ""

    out = []
    energy = paired(summary, "shufflenet_v2_x0_5", "energy_kd")
    if energy:
        out.append(f"On ShuffleNetV2 ×0.5 after 12 epochs, Energy KD's per-sample temperature moves plain KD's top-1 by "
                   f"{energy['mean']:+.2f} points{extra_cost('energy_kd')} ({short_call(energy)}).")
    direction = paired(summary, "shufflenet_v2_x0_5", "energy_kd", reference="energy_kd_reversed")
    if direction:
        out.append(f"The paper's temperature direction scores {direction['mean']:+.2f} points against the reversed one of the "
                   f"authors' code ({short_call(direction)}).")
    if ms:
        best = max(ms, key=lambda m: ms[m]["mean"])
        vs = paired(summary, "shufflenet_v2_x0_5", best) if best != REFERENCE else None
        out.append(f"The best method on mean top-1 is {METHODS[best].label}: {fmt_acc(ms[best])} %"
                   + (f", {vs['mean']:+.2f} points over KD ({short_call(vs)})" if vs else "") + f"{extra_cost(best)}.")
    heda, mix = (paired(summary, "shufflenet_v2_x0_5", m) for m in ("kd_heda_0.5", "kd_cutmix_all"))
    if heda and mix and mix["mean"] > 0 and {"kd_heda_0.5", "kd_cutmix_all", REFERENCE} <= set(step):
        gain = heda["mean"] / mix["mean"]
        cost = (step["kd_heda_0.5"] - step[REFERENCE]) / (step["kd_cutmix_all"] - step[REFERENCE])
        selective = paired(summary, "shufflenet_v2_x0_5", "kd_heda_0.5", reference="kd_cutmix_all")
        out.append(f"Mixing only the uncertain half (HE-DA, r = 0.5) buys {100 * gain:.0f} % of what mixing every sample gains over KD "
                   f"for {100 * cost:.0f} % of its extra time (the two differ by {selective['mean']:+.2f} points; "
                   f"{short_call(selective)}).")
    return "**In short.** " + " ".join(out) if out else ""


def findings(summary: dict, costs: dict, teacher: float | None, sizes: dict[str, dict]) -> list[str]:
    short = in_short(summary, costs)
    L = [short, ""] if short else []
    ranges = {st: [v for s in ms.values() for v in s["top1"].values()] for st, ms in summary.items()}
    shuffle = summary.get("shufflenet_v2_x0_5", {})
    below = {m: [f"s{seed} {v:.2f} %" for seed, v in s["top1"].items() if v < 55] for m, s in shuffle.items()}
    below = {m: runs for m, runs in below.items() if runs}
    passing = ("" if not shuffle else "Every ShuffleNetV2 ×0.5 run passes 55 %." if not below
               else "ShuffleNetV2 ×0.5 runs below 55 %: " + "; ".join(f"{METHODS[m].label} {', '.join(r)}" for m, r in below.items()) + "."
               + (" Only the no-teacher baseline stays below: it learns from the labels alone in the same 12 epochs, "
                  "and that gap is what the teacher adds." if set(below) == {"ce"} else ""))
    L.append("- **The students learn here.** Final test top-1: "
             + "; ".join(f"{st} {min(v):.2f}" + (f"–{max(v):.2f}" if max(v) > min(v) else "") + " %" for st, v in ranges.items())
             + (f" (the teacher: {teacher:.2f} %)" if teacher is not None else "") + ". " + passing)
    kd = {st: statistics.fmean(ms[REFERENCE]["top1"].values()) for st, ms in summary.items() if REFERENCE in ms}
    if len(kd) > 1:
        best = max(kd, key=kd.get)
        L.append("- **The students differ.** Under KD, " + "; ".join(
            f"{st} ends {kd[best] - kd[st]:.2f} points below {best}" for st in kd if st != best)
            + ". At 32 px: " + "; ".join(f"{st} {sizes[st]['parameters'] / 1e6:.2f} M parameters, {sizes[st]['macs'] / 1e6:.1f} M MACs"
                                       for st in kd)
            + ". Whether more capacity per image or a longer schedule would close the gap is not measured here.")
    for student in summary:
        for method in METHODS:
            p = paired(summary, student, method) if method != REFERENCE else None
            if p:
                label = METHODS[method].label
                L.append(f"- **{label[:1].upper() + label[1:]} vs KD** ({student}): {in_words(p)}.")
    L += lead_over_time(summary)
    for method, reference, title, words in HEAD_TO_HEAD:
        p = paired(summary, "shufflenet_v2_x0_5", method, reference=reference)
        if p:
            L.append(f"- **{title}** (ShuffleNetV2 ×0.5, {words}, same seeds): {in_words(p)}.")
    for student, c in costs.items():
        m = c["methods"]
        parts = [f"{METHODS[a].label} {100 * (m[a]['step_ms'] / m[b]['step_ms'] - 1):+.1f} % over {METHODS[b].label}"
                 for a, b in (("energy_kd", "kd"), ("energy_dkd", "dkd"), ("ce", "kd"), ("kd_heda_0.5", "kd"), ("kd_cutmix_all", "kd")) if a in m and b in m]
        if parts:
            L.append(f"- Cost of a step ({student}, teacher live, quiet machine): {'; '.join(parts)}.")
    return L


def strict_words(summary: dict) -> str:
    """The comparisons the rule leaves uncalled although every seed moves the same way: what two or three seeds
    cannot settle, named so that a reader does not take "not real" for "no effect"."""
    same_sign = [(st, m, p) for st in summary for m in METHODS if m != REFERENCE
                 for p in [paired(summary, st, m)] if p and p["p"] is not None and p["p"] >= ALPHA
                 and (all(d > 0 for d in p["diffs"]) or all(d < 0 for d in p["diffs"]))]
    if not same_sign:
        return ""
    return (" The rule is strict with few seeds: " + "; ".join(
        f"{METHODS[m].label} − KD ({st}) has the same sign at every seed ({', '.join(f'{d:+.2f}' for d in p['diffs'])}) "
        f"and still gets {fmt_p(p['p'])}" for st, m, p in same_sign) + ".")


# How a protocol's recorded runs were made, beyond what the records hold: the page says why their epoch times
# are not costs.
HOW_RUN = {
    "cpu": ("; the one-thread runs two at a time, beside test suites and editing; four runs were paused while timing "
            "benchmarks had the machine, and their epoch times include the pause: DKD s0 for 30 min, KD s1 for 5, "
            "Energy KD reversed s2 and KD + CutMix s1 for 3 each"),
}


def threads_words(rows: list[dict]) -> str:
    """How many runs used how many CPU threads (the thread count sets the order of floating-point sums)."""
    counts = sorted(Counter(r["cpu_threads"] for r in rows).items())
    return ", ".join(f"{n} run{'s' if n > 1 else ''} with {t} thread{'s' if t > 1 else ''}" for t, n in counts)


def write_docs(rows: list[dict], costs: dict, protocol: str, meta: dict) -> None:
    summary = summarize(rows)
    figures = plots(summary, costs, DOCS / "benchmarks")
    p = PROTOCOLS[protocol]
    teacher = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None), None)
    students = list(summary)
    limit = rows[0]["test_limit"]
    test_phrase = "all 10,000 test images" if limit is None else f"a class-balanced {limit:,}-image subset of the test images"
    missing = [c.id for c in grid(protocol) if not any(r["id"] == c.id for r in rows)]
    L = ["# Benchmarks on real CIFAR-100", ""]
    L += [f"Protocol `{protocol}`: {p.words}, on top of `recipes/cifar100-energy-kd.yaml` (teacher: the shared ResNet-56, "
          f"data: `../shared/data/cifar100-real`). Generated by `python benchmarks/bench_methods.py report"
          f"{'' if protocol == 'cpu' else ' --protocol ' + protocol}` on {time.strftime('%Y-%m-%d')}; machine: {meta['machine']}. "
          f"{len(rows)} finished runs, {sum(r['train_seconds'] for r in rows) / 3600:.1f} h of distillation epochs in all "
          f"({meta['span']}). The accuracy runs shared the machine with other work ({threads_words(rows)}"
          f"{HOW_RUN.get(protocol, '')}), so their epoch times are not cost figures."
          + (" The cost columns were measured separately, alone on the machine." if costs else ""), ""]
    if missing:
        L += [f"**In progress: {len(rows)} of {len(rows) + len(missing)} runs finished.** Not yet run: {', '.join(missing)}. "
              "The findings below cover the finished runs only.", ""]
    L += ["## Findings", ""]
    L += findings(summary, costs, teacher, student_sizes(protocol))
    L += ["", "How a difference is called real: each method is paired with KD at the same seed (same initialisation, "
          "data order and augmented views), and the difference counts when a two-sided paired t-test over the seeds "
          f"gives p < {ALPHA}. With two or three seeds that needs a consistent difference (t > 12.7 with two, > 4.3 with "
          "three); one-seed rows are shown, not judged. The rule is applied to each comparison on its own, with no correction "
          f"for how many are made ({sum(m != REFERENCE for _, m, _ in PROTOCOLS[protocol].grid)} against KD, plus the {len(HEAD_TO_HEAD)} head-to-head ones): a p just under {ALPHA} "
          "is one seed-set's evidence, and more seeds are what would firm it up." + strict_words(summary), ""]

    L += ["## Accuracy", "", f"Final-epoch test top-1 (%) on {test_phrase}: mean ± std over seeds, each seed, and the "
          "paired difference to KD (mean ± std over seeds).", ""]
    L.append("| student | method | top-1 | per seed | − KD, paired |")
    L.append("| --- | --- | ---: | --- | --- |")
    for student in students:
        for m in METHODS:
            if m in summary[student]:
                s = summary[student][m]
                pr = paired(summary, student, m) if m != REFERENCE else None
                L.append(f"| {student} | {METHODS[m].label} | {fmt_acc(s)} | {', '.join(f's{k} {v:.2f}' for k, v in sorted(s['top1'].items()))} | "
                         f"{fmt_paired(pr) if pr else '–'} |")
    L += ["", f"![accuracy and cost](benchmarks/{figures[0]})", "",
          "Test top-1 after every epoch, mean over the seeds run (their number in brackets):", "",
          f"![learning curves](benchmarks/{figures[1]})", ""]

    L += ["## Cost", "", "One full distillation step of each method with the teacher live (ONNX Runtime, no logit cache), all on the "
          f"same {COST_STEPS} batches in turns, {COST_PASSES} passes, median; an epoch is its steps plus one evaluation of the test "
          "set. Measured alone on the machine, with the accuracy runs paused. For the HE-DA rows, the plan stage's forecast of the same "
          "epoch, measured in the same session.", ""]
    L.append("| student | method | step ms | epoch s | img/s | plan: epoch s | plan − measured |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for student, c in costs.items():
        for m, x in c["methods"].items():
            planned = x.get("planned_epoch_seconds")
            L.append(f"| {student} | {METHODS[m].label} | {x['step_ms']:.0f} | {x['epoch_seconds']:.0f} | {x['images_per_second']:.0f} | "
                     + (f"{planned:.0f} | {100 * (planned / x['epoch_seconds'] - 1):+.1f} % |" if planned else "– | – |"))
    if not costs:
        L.append("| – | not measured yet (`bench_methods.py costs`) | | | | | |")
    L.append("")

    best = best_runs(rows)
    validated = [r for r in best.values() if r.get("validation")]
    L += ["## Deployment", "", "The best run of each student (highest final top-1), exported and validated by the pipeline itself "
          f"(ONNX Runtime on the CPU, {test_phrase}; median [central 95 %] over interleaved rounds), and the line it prints on what to ship.", ""]
    L.append("| student | run | variant | size MB | top-1 % | Δ vs PyTorch | batch-1 ms | img/s | status |")
    L.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in validated:
        v = r["validation"]
        for name, x in v["variants"].items():
            interval = x["latency_ms_interval"]
            L.append(f"| {r['student']} | {METHODS[r['method']].label}, s{r['seed']} | {name} | {x['size_bytes'] / 1e6:.2f} | {x['test_top1']:.2f} | "
                     f"{x['delta_top1']:+.2f} | {x['latency_ms_p50']:.3f} [{interval[0]:.3f}–{interval[1]:.3f}] | {x['images_per_second']:,.0f} | "
                     f"{'✅' if x['passed'] else '❌ ' + '; '.join(x['failures'])} |")
    for r in best.values():
        if not r.get("validation"):
            L.append(f"| {r['student']} | {METHODS[r['method']].label}, s{r['seed']} | not validated yet (`bench_methods.py deploy`) | | | | | | |")
    L += [""] + [f"- {r['student']}: {rec['line']}" for r in validated for rec in r["validation"].get("recommendations", [])]
    L += ["", "## What the 240-epoch GPU protocol would add", "", gpu_words(costs, protocol), "",
          "## Other benchmarks", "",
          "- Budget control (`benchmarks/bench_budget.py`): [benchmarks/budget.md](benchmarks/budget.md).",
          "- Step speed (`benchmarks/bench_speed.py`): [benchmarks/speed.md](benchmarks/speed.md).",
          "- Choosing the student for a device (`benchmarks/bench_pick.py`): [benchmarks/pick.md](benchmarks/pick.md).", "",
          "## Reproduce", "", "```bash",
          *(f"python benchmarks/bench_methods.py {part}{'' if protocol == 'cpu' else ' --protocol ' + protocol}" for part in ("train", "costs", "deploy", "report")),
          "```", "", "Runs are cached per configuration under `benchmarks/cache/methods/`; `train` resumes where it stopped and may "
          "run in chunks (`--seed N`, `--only TEXT`). Each finished run's numbers are committed under `benchmarks/records/methods/`, "
          "so a fresh clone regenerates this page and trains only what is missing. The raw numbers are in "
          "[`benchmarks/results.json`](benchmarks/results.json).", ""]
    fsio.write_text(DOCS / "benchmarks.md", "\n".join(L))
    fsio.write_json(DOCS / "benchmarks" / "results.json", {"protocol": protocol, **meta, "rows": rows, "summary": summary, "costs": costs,
                                                          "paired": {st: {m: paired(summary, st, m) for m in summary[st] if m != REFERENCE} for st in summary},
                                                          "head_to_head": {f"{a} - {b}": paired(summary, "shufflenet_v2_x0_5", a, reference=b)
                                                                           for a, b, _, _ in HEAD_TO_HEAD}})


def gpu_words(costs: dict, protocol: str) -> str:
    """What ``--protocol gpu`` would settle that 12 epochs cannot, and what it would cost on this machine."""
    text = ("`--protocol gpu` runs the same grid with the paper's schedule: 240 epochs, SGD 0.01, steps at 150/180/210. "
            "Twelve epochs stop the students well short of what they can reach: the curves climb until the learning rate "
            "reaches zero, and the teacher is still several points ahead. So these runs measure how much each teacher signal "
            "helps a student that underfits. The paper's claims concern converged students, where what the per-sample temperature changes is what is learnt in the last, "
            "low-learning-rate epochs. The GPU protocol would test those claims at the paper's scale, give the converged gap "
            "between the two temperature directions, and show whether the augmentation rows keep their lead when overfitting, "
            "not underfitting, is what limits the student.")
    if protocol != "cpu" or not costs:
        return text
    gpu = PROTOCOLS["gpu"]
    hours = sum(costs[st]["methods"][m]["epoch_seconds"] * gpu.epochs * seeds for st, m, seeds in gpu.grid
                if m in costs.get(st, {}).get("methods", {})) / 3600
    return text + (f" From the measured costs above, its {sum(n for *_, n in gpu.grid)} runs would take about {hours:,.0f} h "
                   f"({hours / 24:.0f} days) on this 2-core CPU; it is meant for a GPU.")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")


def span(rows: list[dict]) -> str:
    """When the accuracy runs were made, from their run folders."""
    starts = [datetime.fromisoformat(r["started_at"]) for r in rows]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in rows]
    return f"runs made between {min(starts):%Y-%m-%d %H:%M} and {max(ends):%Y-%m-%d %H:%M} UTC"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("train", "costs", "deploy", "report", "verify"))
    ap.add_argument("id", nargs="?", help="verify: the id of the record to re-run (e.g. shufflenet_v2_x0_5-energy_kd-s0)")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument("--seed", type=int, action="append", default=[], help="train: only these seeds (repeatable)")
    ap.add_argument("--only", action="append", default=[], help="train: only configurations whose id contains this (repeatable)")
    ap.add_argument("--epochs", type=int, help="verify: stop after this many epochs and compare those (default: all)")
    args = ap.parse_args()
    costs_path = RECORDS / args.protocol / "costs.json"
    if args.part == "verify":
        return verify(args.id, args.protocol, args.epochs) if args.id else ap.error("verify needs a record id")
    if args.part == "train":
        configs = [c for c in grid(args.protocol) if (not args.seed or c.seed in args.seed) and (not args.only or any(o in c.id for o in args.only))]
        todo = [c for c in configs if not finished(c, args.protocol)]
        print(f"{len(configs) - len(todo)} of {len(configs)} configurations already finished", flush=True)
        base = shared_scores(args.protocol) if todo else None
        teacher_card(args.protocol)
        for i, cfg in enumerate(todo, 1):
            print(f"\n=== [{i}/{len(todo)}] {cfg.id}", flush=True)
            train(cfg, args.protocol, base)
            save_record(cfg, args.protocol)
        return 0
    rows = finished_rows(args.protocol)
    if args.part == "costs":
        t = time.perf_counter()
        fsio.write_json(costs_path, {**measure_costs(args.protocol), "_seconds": time.perf_counter() - t})
    elif args.part == "deploy":
        deploy(args.protocol, rows)
        rows = finished_rows(args.protocol)
    if not rows:
        print(f"no finished runs under {CACHE / args.protocol} or {RECORDS / args.protocol}; docs/benchmarks.md left as it is", file=sys.stderr)
        return 1
    costs = json.loads(costs_path.read_text()) if costs_path.exists() else {}
    costs = {k: v for k, v in costs.items() if not k.startswith("_")}
    meta = {"machine": machine(), "span": span(rows)}
    if args.protocol == "lt":
        from longtail_report import write_longtail_docs

        write_longtail_docs(rows, costs, meta, teacher_card("lt"))
        page = DOCS / "benchmarks-longtail.md"
    else:
        write_docs(rows, costs, args.protocol, meta)
        page = DOCS / "benchmarks.md"
    missing = [c.id for c in grid(args.protocol) if not any(r["id"] == c.id for r in rows)]
    print(f"wrote {page} ({len(rows)} runs" + (f"; not yet run: {', '.join(missing)})" if missing else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
