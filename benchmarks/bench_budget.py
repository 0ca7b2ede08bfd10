"""Does the budget hold? The distill stage's wall time against ``max_minutes`` on real CIFAR-100.

For each student: the teacher (the shared ResNet-56) and the energy score once; a plan at r = 0 gives P0, the
predicted minutes of the run without HE-DA; then three runs with ``fraction: auto`` and ``max_minutes`` at
1.1, 1.2 and 1.35 × P0 (binding: at r = 0.5 a run would need more), and one at 1.2 × P0 with a competing
CPU-bound process started halfway through. Every run goes through the CLI, as a user's would.

Reported per run: the budget, the distill stage's spent seconds (budget.json) and its wall time seen from
outside, |spent − budget| / budget, r per epoch, and the a-priori plan's plain epoch against the plain epoch the
controller measured. Also the time of ``edgedistill plan`` on a fresh folder (quickstart and CIFAR-100 recipe).

    python benchmarks/bench_budget.py            # needs ../shared; run it alone on the machine
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "budget"
RESULTS = ROOT / "benchmarks" / "results" / "budget.json"
DOC = ROOT / "docs" / "benchmarks" / "budget.md"
RECIPE = ROOT / "recipes" / "cifar100-energy-kd.yaml"
PROTOCOL = ["data.train_limit=8000", "data.test_limit=2000", "data.num_workers=0", "distill.epochs=3",
            "distill.schedule={name: cosine, warmup_epochs: 0.2}", "distill.optimizer.lr=0.05", "export.formats=[fp32]"]
STUDENTS = {"mobilenet_v2_w0.5": ["student.arch=mobilenet_v2", "student.width=0.5"],
            "shufflenet_v2_x0_5": ["student.arch=shufflenet_v2_x0_5", "student.dropout=0.2"]}
FACTORS = (1.1, 1.2, 1.35)  # between the cost of r = 0 and of r = 0.5 on both students: the budget binds
RANGE = (0.1, 0.5)


def edgedistill(*args, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgedistill", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"edgedistill {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def budget_overrides(minutes: float) -> list[str]:
    return sets(f"augment={{fraction: auto, budget: {{max_minutes: {minutes:.4f}, range: [{RANGE[0]}, {RANGE[1]}]}}, profile_steps: 10}}")


def prepare(name: str, student: list[str]) -> Path:
    base = CACHE / name / "base"
    if not (base / "stages" / "score.done").exists():
        shutil.rmtree(base, ignore_errors=True)
        edgedistill("teacher", RECIPE, "--out", base.parent, *sets(*PROTOCOL, *student, "name=base"))
        edgedistill("score", base)
    return base


def one_run(base: Path, tag: str, minutes: float, compete: bool) -> dict:
    run = base.parent / tag
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    edgedistill("plan", run, "--force", *budget_overrides(minutes))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill", "distill", str(run), "--force", *budget_overrides(minutes)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    competitor = None
    if compete:
        time.sleep(30 * minutes)  # half the budget
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    if competitor:
        competitor.kill()
    if proc.returncode != 0:
        sys.exit(f"distill {run} failed:\n{err[-3000:]}")
    budget = json.loads((run / "budget.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cm, costs = plan["cost_model"], budget["measured_costs"]
    steps = math.ceil(cm["n_train"] / cm["batch_size"])
    epochs = len(budget["fractions"])

    def run_at(r: float) -> float:  # the whole run at a fixed r, at the speed the controller measured
        return epochs * (steps * (costs["step"] + costs["per_extra"] * r * cm["batch_size"]) + costs["per_epoch"])

    return {
        "run": tag, "budget_seconds": 60 * minutes, "spent_seconds": budget["spent_seconds"], "wall_seconds": wall,
        "error": budget["spent_seconds"] / (60 * minutes) - 1, "fractions": budget["fractions"], "verdict": budget["verdict"],
        "planned_fraction": plan["fraction"], "test_top1": metrics[-1]["test_top1"], "competitor": compete,
        "planned_plain_epoch": plan["curve"][0]["epoch_seconds"], "measured_plain_epoch": steps * costs["step"] + costs["per_epoch"],
        "run_at_r0": run_at(0.0), "run_at_top": run_at(RANGE[1]),
        # a budget the controller can hit: more than the run costs at r = 0, less than at the top of the range
        "binding": run_at(0.0) <= 60 * minutes <= run_at(RANGE[1]),
    }


def plan_up_front_seconds() -> dict:
    out = {}
    for name, recipe in (("quickstart", ROOT / "recipes" / "quickstart.yaml"), ("cifar100-energy-kd", RECIPE)):
        fresh = CACHE / "fresh-plan"
        shutil.rmtree(fresh, ignore_errors=True)
        seconds, _ = edgedistill("plan", recipe, "--out", fresh)
        out[name] = round(seconds, 1)
    shutil.rmtree(CACHE / "fresh-plan", ignore_errors=True)
    return out


def pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def fractions(row: dict) -> str:
    return " ".join(f"{x:g}" for x in row["fractions"])


def write_doc(results: dict, seconds: float) -> None:
    """docs/benchmarks/budget.md: findings first, then the table, from the results."""
    rows = [(name, r) for name, res in results["runs"].items() for r in res["rows"]]
    quiet = [(name, r) for name, r in rows if not r["competitor"]]
    feasible = [(name, r) for name, r in quiet if r["binding"]]
    held = [(name, r) for name, r in feasible if abs(r["error"]) <= 0.05]
    plan_ok = sum(abs(r["planned_plain_epoch"] / r["measured_plain_epoch"] - 1) <= 0.10 for _, r in quiet)
    plan_err = [r["planned_plain_epoch"] / r["measured_plain_epoch"] - 1 for _, r in quiet]
    L = ["# Does the budget hold? (`benchmarks/bench_budget.py`)", "",
         f"Real CIFAR-100 (8,000 training images, 2,000 test images), 3 epochs, the shared ResNet-56 teacher, 2 CPU cores, "
         f"no other load except in the competitor runs; {seconds / 60:.0f} min in all. Budgets are `max_minutes` at "
         f"{', '.join(f'{f:g}' for f in FACTORS)} × P0, the plan's forecast of the same run without HE-DA, with `range: [0.1, 0.5]`; "
         "the competitor run starts a CPU-bound process halfway through a 1.2 × P0 run. The controller re-chooses r at "
         "the start of every epoch and three times within it.", "", "## Findings", "",
         f"- Without competition, **{len(held)} of {len(feasible)} feasible runs ended within ±5 % of their budget** "
         f"(spent − budget: {', '.join(pct(r['error']) for _, r in feasible)}). Feasible: at the speed the controller measured, "
         "the run costs less than the budget at r = 0 and more at the top of the range, so a choice of r can meet it."]
    L += [f"- {name} {r['run']} ended {pct(r['error'])} from its budget; its verdict: \"{r['verdict']}\"." for name, r in feasible if abs(r["error"]) > 0.05]
    L += [f"- {name} {r['run']} was not feasible as measured (the run costs {r['run_at_r0']:.0f} s at r = 0, {r['run_at_top']:.0f} s at "
          f"r = {RANGE[1]:g}; budget {r['budget_seconds']:.0f} s): it spent {pct(r['error'])}, \"{r['verdict']}\"." for name, r in quiet if not r["binding"]]
    L += [f"- The a-priori plan's plain epoch was within 10 % of the one the controller measured in **{plan_ok} of {len(quiet)} runs** "
          f"(plan − measured: {', '.join(pct(e) for e in plan_err)}). The measured plain step is the intercept of the controller's "
          "line of step time against extras; a CPU step is not linear in its batch, so with many extras the intercept takes up "
          "part of their cost and the comparison is cleanest in the runs with the least HE-DA (the lowest budgets).",
          "- With a CPU-bound competitor started halfway (on this 2-core machine it makes every step several times slower), "
          + "; ".join(f"{name}: spent {pct(r['error'])} against the budget, r per epoch {fractions(r)}: \"{r['verdict']}\""
                      for name, r in rows if r["competitor"]) + ".",
          "- `edgedistill plan` on a fresh folder (nothing trained or scored): "
          + ", ".join(f"{name} {sec:g} s" for name, sec in results["plan_up_front_seconds"].items()) + ".", "",
          "| student | run | budget s | run at r = 0 s | run at top s | spent s | spent − budget | r per epoch | plan: plain epoch s | measured plain epoch s | test top-1 |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    L += [f"| {name} | {r['run']} | {r['budget_seconds']:.0f} | {r['run_at_r0']:.0f} | {r['run_at_top']:.0f} | {r['spent_seconds']:.0f} | {100 * r['error']:+.1f}% | "
          f"{fractions(r)} | {r['planned_plain_epoch']:.1f} | {r['measured_plain_epoch']:.1f} | {r['test_top1']:.2f}% |"
          for name, r in rows]
    L += ["", "Reproduce: `python benchmarks/bench_budget.py` (alone on the machine); "
          "`--report-only` rewrites this page from `benchmarks/results/budget.json`.", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L))


def main() -> None:
    if "--report-only" in sys.argv:
        results = json.loads(RESULTS.read_text())
        write_doc(results, results["seconds"])
        return
    t0 = time.perf_counter()
    if not (ROOT.parent / "shared" / "data" / "cifar100-real").is_dir():
        sys.exit("needs ../shared (real CIFAR-100 data and teacher)")
    results = {"protocol": PROTOCOL, "plan_up_front_seconds": plan_up_front_seconds(), "runs": {}}
    for name, student in STUDENTS.items():
        base = prepare(name, student)
        edgedistill("plan", base, "--force", *sets("augment={fraction: 0.0, profile_steps: 10}"))
        p0 = json.loads((base / "plan.json").read_text())["curve"][0]["total_minutes"]
        rows = [one_run(base, f"x{f:g}", f * p0, compete=False) for f in FACTORS]
        rows.append(one_run(base, "x1.2-competitor", 1.2 * p0, compete=True))
        results["runs"][name] = {"p0_minutes": p0, "rows": rows}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = time.perf_counter() - t0
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(results, results["seconds"])
    print(f"plan on a fresh folder: {results['plan_up_front_seconds']}")
    print("| student | run | budget s | spent s | error | r per epoch | plan plain epoch s | measured plain epoch s |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, res in results["runs"].items():
        for r in res["rows"]:
            print(f"| {name} | {r['run']} | {r['budget_seconds']:.0f} | {r['spent_seconds']:.0f} | {100 * r['error']:+.1f}% | "
                  f"{' '.join(f'{x:g}' for x in r['fractions'])} | {r['planned_plain_epoch']:.1f} | {r['measured_plain_epoch']:.1f} |")


if __name__ == "__main__":
    main()
