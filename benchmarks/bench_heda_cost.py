"""HE-DA cost: measured epoch time at several r next to the planner's prediction.

Runs the real stages (teacher → score → plan's cost measurement) on a recipe, then trains one epoch of the
student per r with the real distillation objective and compares the measured training time with the cost
model's prediction. Everything runs in one process, one after the other, so the ratios are comparable.

    python benchmarks/bench_heda_cost.py recipes/cifar100-energy-kd.yaml \
        --set data.train_limit=4000 --set data.test_limit=500 --rs 0 0.1 0.3 0.5 1.0

Writes ``benchmarks/results/heda_cost.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from edgedistill.base import fsio
from edgedistill.distill.objectives import Augmenter
from edgedistill.pipeline.planning import measure_cost
from edgedistill.recipe.schema import load_recipe
from edgedistill.pipeline.run import open_run, run_stage
from edgedistill.distill.train import LoopConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rs", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 1.0])
    ap.add_argument("--out", default="benchmarks/cache")
    ap.add_argument("--results", default="benchmarks/results/heda_cost.json")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe, args.overrides + ["distill.epochs=1", "distill.schedule={name: constant}", "export.formats=[fp32]"])
    ctx = open_run(recipe, Path(args.out) / recipe.name, resume=True, force=True)
    for stage in ("teacher", "score"):
        if not ctx.run.done(stage):
            run_stage(ctx, stage)
    cost = measure_cost(ctx)
    rows = []
    for r in args.rs:
        objective = ctx.objective(fraction=r if r < 1 else 0.0)
        if r >= 1:  # r = 1 is ordinary full-data augmentation: every sample gets a mixed copy
            objective.augmenter = Augmenter(recipe.augment.method, recipe.augment.alpha, "all", 1.0)
        tag = f"r{r:g}"
        loop = LoopConfig(ctx.run / "bench" / tag, ctx.run / "bench" / f"{tag}.jsonl", recipe.data.batch_size, recipe.data.eval_batch_size, recipe.seed)
        (ctx.run / "bench" / f"{tag}.jsonl").unlink(missing_ok=True)
        result = fit(
            ctx.build_student(), objective, ctx.train_set(), ctx.test_set(), recipe.distill, loop, ctx.device,
        )
        measured = result.epochs[0]["epoch_seconds"]
        predicted = cost.epoch_seconds(r) - cost.eval_seconds
        rows.append({"r": r, "measured_seconds": measured, "predicted_seconds": predicted, "error": (predicted - measured) / measured})
    base = rows[0]["measured_seconds"] if rows and rows[0]["r"] == 0 else None
    for row in rows:
        row["measured_overhead"] = row["measured_seconds"] / base - 1 if base else None
        row["predicted_overhead"] = cost.overhead(row["r"])
    report = {
        "recipe": str(args.recipe), "overrides": args.overrides, "device": str(ctx.device),
        "machine": f"{platform.machine()} · {torch.get_num_threads()} threads", "n_train": len(ctx.data.train),
        "cost_model": cost.__dict__, "rows": rows, "command": " ".join(sys.argv),
    }
    fsio.write_json(args.results, report)
    print(f"\n{len(ctx.data.train)} training images, {ctx.device}, batch {recipe.data.batch_size}\n")
    print("| r | measured epoch s | predicted epoch s | error | measured overhead | predicted overhead |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        mo = f"{100 * row['measured_overhead']:+.1f}%" if row["measured_overhead"] is not None else "–"
        print(f"| {row['r']:g} | {row['measured_seconds']:.1f} | {row['predicted_seconds']:.1f} | {100 * row['error']:+.1f}% | {mo} | {100 * row['predicted_overhead']:+.1f}% |")


if __name__ == "__main__":
    main()
