"""Does the teacher (and its energy) help a quantised student recover, and by how much over post-training int8?

On CIFAR-100-real, each student of ``bench_methods.py --protocol int8`` (12 epochs of Energy KD on the full train
half: MobileNetV3-small and MobileNetV2 ×0.5) is taken to int8 in every way the pipeline offers, per channel and per
tensor, and every file is validated in its own runtime (ONNX Runtime, ExecuTorch, LiteRT) on the test half:

* ``ptq``: post-training int8, no fallback;
* ``ptq_fallback``: post-training int8 with the automatic float fallback (``validate.max_int8_drop`` 1 point);
* ``qat_ce``, ``qat_kd``, ``qat_energy_kd``: the qat stage (3 epochs) with cross-entropy alone, KD, Energy KD, two seeds,
  no fallback (what QAT recovers by itself); its weights rounded to ONNX Runtime's 7-bit grid, the coarsest of the
  three targets, with ONNX Runtime's file first in ``formats`` (QAT simulates torchao's x86 scheme, U8S8 like it);
* ``qat_kd_xnnpack``, ``qat_energy_kd_xnnpack``: the same with ExecuTorch's file first, so that QAT trains against
  its XNNPACKQuantizer (one seed): which scheme to train against, and what each file gains or loses by it.

Each variant is its own copy of the distilled run folder with the stages from qat on redone, so the students are the
same file. A variant's numbers go to ``benchmarks/records/int8/<id>.json`` (committed; a recorded variant is not run
again) and the table to ``docs/benchmarks/int8.md``:

    python benchmarks/bench_methods.py train --protocol int8   # the distilled students (hours of CPU)
    python benchmarks/bench_int8.py run [--only TEXT]            # every variant (needs the three runtimes: see docs/deploy.md);
                                                                 # a student known only from its record is trained again first
    python benchmarks/bench_int8.py calibration                  # ONNX Runtime's calibration methods, auto among them
    python benchmarks/bench_int8.py table
    python benchmarks/bench_int8.py run --protocol smoke         # this script end to end on the smoke students (minutes)

Accuracy does not depend on the machine's load; the seconds a variant took do, and are shown as measured beside
whatever else ran (the record says so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_methods as bm  # noqa: E402
from edgedistill.base import fsio  # noqa: E402
from edgedistill.pipeline.folder import RunFolder  # noqa: E402
from edgedistill.pipeline.run import open_run, run_stage  # noqa: E402

DOC = ROOT / "docs" / "benchmarks" / "int8.md"
TARGETS = ("int8", "executorch_int8", "litert_int8")
STAGES = ("qat", "export", "validate")
# accuracy is what is compared: validation times each file briefly
QUICK_VALIDATION = ("validate.rounds=3", "validate.seconds=0.5", "validate.latency_runs=5")
# QAT's rows without the float fallback: what quantisation-aware training recovers by itself (fallback has its own row)
QAT_ALONE = ("export.int8.method=qat", "export.int8.fallback=false")
FORMATS = f"export.formats=[fp32, {', '.join(TARGETS)}]"  # ONNX Runtime's file first: QAT uses the x86 scheme (U8S8, as it)
ET_FIRST = "export.formats=[fp32, executorch_int8, int8, litert_int8]"
VARIANTS = {
    "ptq": ("post-training", ("export.int8.method=ptq", "export.int8.fallback=false"), 1),
    "ptq_fallback": ("post-training + float fallback", ("export.int8.method=ptq", "export.int8.fallback=true"), 1),
    "qat_ce": ("QAT, cross-entropy", (*QAT_ALONE, "distill.loss={name: ce}"), 2),
    "qat_kd": ("QAT, KD", (*QAT_ALONE, f"distill.loss={bm.KD}"), 2),
    "qat_energy_kd": ("QAT, Energy KD", (*QAT_ALONE, f"distill.loss={bm.ENERGY_KD}"), 2),
    # ExecuTorch's file first: QAT then trains against its XNNPACKQuantizer instead of the x86 scheme (qat_target)
    "qat_kd_xnnpack": ("QAT, KD, ExecuTorch's quantizer", (*QAT_ALONE, f"distill.loss={bm.KD}", ET_FIRST), 1),
    "qat_energy_kd_xnnpack": ("QAT, Energy KD, ExecuTorch's quantizer", (*QAT_ALONE, f"distill.loss={bm.ENERGY_KD}", ET_FIRST), 1),
}
GRANULARITIES = ("per_channel", "per_tensor")
CALIBRATIONS = ("minmax", "entropy", "percentile", "auto")  # ONNX Runtime's calibration.method


def cache(protocol: str) -> Path:
    return bm.CACHE.parent / "int8" / protocol


def records_dir(protocol: str) -> Path:
    return ROOT / "benchmarks" / "records" / "int8" / protocol


def variants(protocol: str) -> list[tuple[bm.Config, str, str, int]]:
    """(distilled student's configuration, granularity, variant, seed), QAT's first seeds before its second; a
    student's first method in the protocol's grid."""
    first = {s: m for s, m, _ in reversed(bm.PROTOCOLS[protocol].grid)}
    students = [bm.Config(s, m, 0) for s, m in reversed(first.items())]
    return [(c, g, v, seed) for seed in range(2) for c in students for g in GRANULARITIES for v, (*_, seeds) in VARIANTS.items()
            if seed < seeds]


def calibration_variants(protocol: str) -> list[tuple[bm.Config, str, str]]:
    students = dict.fromkeys(c for c, *_ in variants(protocol))
    return [(c, g, m) for c in students for g in GRANULARITIES for m in CALIBRATIONS]


def variant_id(cfg: bm.Config, granularity: str, variant: str, seed: int) -> str:
    return f"{cfg.student}-{granularity}-{variant}-s{seed}"


def redo(protocol: str, cfg: bm.Config, vid: str, overrides: tuple[str, ...]) -> Path:
    """Copy the distilled run folder (teacher to distill) to the variant's, and redo qat, export and validate there
    with ``overrides``. Returns the variant's folder."""
    root = cache(protocol) / vid
    if not root.exists():
        tmp = root.with_name(f".{vid}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bm.folder(cfg, protocol), tmp,
                        ignore=shutil.ignore_patterns(*[f"{s}.done" for s in (*STAGES, "baseline", "report")], "checkpoints"))
        tmp.rename(root)
    ctx = open_run(bm.recipe_for(cfg, protocol, *overrides, *QUICK_VALIDATION), root, resume=True, force=True)
    for stage in STAGES:
        if not ctx.run.done(stage):
            run_stage(ctx, stage)
    return root


def run_variant(protocol: str, cfg: bm.Config, granularity: str, variant: str, seed: int) -> dict:
    vid = variant_id(cfg, granularity, variant, seed)
    root = redo(protocol, cfg, vid, (f"export.int8.granularity={granularity}", FORMATS, *VARIANTS[variant][1], f"seed={seed}"))
    return collect(root, vid, cfg, granularity, variant, seed)


def run_calibration(protocol: str, cfg: bm.Config, granularity: str, method: str) -> dict:
    """The ONNX Runtime int8 file post-training with one ``calibration.method`` (the PT2E targets use their own
    observers): its test top-1, its held-out judgement, and for ``auto`` what it chose and why."""
    vid = f"{cfg.student}-{granularity}-calibration_{method}"
    root = redo(protocol, cfg, vid, ("export.int8.method=ptq", "export.int8.fallback=false", f"export.int8.granularity={granularity}",
                                     f"export.int8.calibration.method={method}", "export.formats=[fp32, int8]"))
    run = RunFolder(root)
    validation, export = (json.loads((run / f).read_text()) for f in ("validation.json", "export.json"))
    info, row = export["variants"]["int8"], validation["variants"]["int8"]
    return {"id": vid, "student": cfg.student, "granularity": granularity, "method": method, "fp32_top1": validation["torch_top1"],
            "top1": row["test_top1"], "delta": row["delta_top1"], "held_out": info.get("held_out", {}).get("int8"),
            "calibration_auto": info.get("calibration_auto"), "export_seconds": info["seconds"], **environment(run, export),
            "seconds_note": "measured beside other work: an upper bound"}


def environment(run: RunFolder, export: dict) -> dict:
    env = json.loads((run / "env.json").read_text())
    latest = (env, *env["history"])[-1]  # the command that redid qat, export and validate
    return {"environment": {k: latest.get(k) for k in ("code", *bm.LIBRARIES)}, "export_versions": export["versions"]}


def collect(root: Path, vid: str, cfg: bm.Config, granularity: str, variant: str, seed: int) -> dict:
    run = RunFolder(root)
    validation, export = (json.loads((run / f).read_text()) for f in ("validation.json", "export.json"))
    qat = json.loads((run / "qat.json").read_text()) if (run / "qat.json").exists() else None
    rows = validation["variants"]
    return {
        "id": vid, "student": cfg.student, "granularity": granularity, "variant": variant, "seed": seed,
        "fp32_top1": validation["torch_top1"],
        "top1": {t: rows[t]["test_top1"] for t in TARGETS}, "delta": {t: rows[t]["delta_top1"] for t in TARGETS},
        "passed": {t: rows[t]["passed"] for t in TARGETS},
        "float_layers": {t: len(export["variants"][t].get("float_layers", [])) for t in TARGETS if t in export["variants"]},
        "size_mb": {t: rows[t]["size_bytes"] / 1e6 for t in TARGETS},
        "export_seconds": {t: export["variants"][t]["seconds"] for t in TARGETS if t in export["variants"]},
        "qat_seconds": qat["seconds"] if qat and qat["trained"] else None,
        "qat_simulated_top1": qat["test_top1_simulated"] if qat and qat["trained"] else None,
        "qat_weight_grid": qat.get("weight_grid") if qat and qat["trained"] else None,
        "qat_quantizer": qat.get("quantizer") if qat and qat["trained"] else None,
        **environment(run, export),
        "seconds_note": "measured beside other work: an upper bound",
    }


def table(records: list[dict], planned: int) -> str:
    by = {(r["student"], r["granularity"], r["variant"]): [] for r in records}
    for r in records:
        by[(r["student"], r["granularity"], r["variant"])].append(r)
    lines = ["# int8 that keeps its accuracy: post-training, fallback and quantisation-aware distillation", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             *([f"**Status**: {len(records)} of {planned} variants recorded; the others are still to run, and their rows come as they are recorded.", ""]
               if len(records) < planned else []),
             "| student | weights | int8 by | seeds | ONNX Runtime | ExecuTorch | LiteRT | layers in float (ORT / ET / LiteRT) | MB (ORT / ET / LiteRT) | QAT min |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for (student, granularity, variant), rs in by.items():
        def cell(t: str) -> str:
            tops = [r["top1"][t] for r in rs]
            mean, delta = sum(tops) / len(tops), sum(r["delta"][t] for r in rs) / len(rs)
            return f"{mean:.2f}% ({delta:+.2f})"
        floats = " / ".join(str(rs[0]["float_layers"].get(t, "–")) for t in TARGETS)
        sizes = " / ".join(f"{rs[0]['size_mb'][t]:.2f}" for t in TARGETS)
        qat = [r["qat_seconds"] for r in rs if r["qat_seconds"]]
        minutes = f"{sum(qat) / len(qat) / 60:.1f}" if qat else "–"
        lines.append(f"| {student} (fp32 {rs[0]['fp32_top1']:.2f}%) | {granularity} | {VARIANTS[variant][0]} | {len(rs)} | "
                     + " | ".join(cell(t) for t in TARGETS) + f" | {floats} | {sizes} | {minutes} |")
    lines += ["", "Cells: mean test top-1 of the int8 file in its runtime (its change against the fp32 student in PyTorch)."]
    return "\n".join(lines) + "\n"


def calibration_table(records: list[dict]) -> str:
    if not records:
        return ""
    by = {(r["student"], r["granularity"]): {} for r in records}
    for r in records:
        by[(r["student"], r["granularity"])][r["method"]] = r
    lines = ["", "## ONNX Runtime's calibration, post-training (`bench_int8.py calibration`)", "",
             "The ONNX Runtime int8 file of each student with each `export.int8.calibration.method`, no fallback (the PT2E "
             "targets use their own observers). Test top-1, and in brackets the held-out answers it changed (what `auto` "
             "judges on: 1,000 training images that do not calibrate).", "",
             "| student | weights | " + " | ".join(CALIBRATIONS) + " | auto chose |", "| --- | --- | " + "---: | " * len(CALIBRATIONS) + "--- |"]
    for (student, granularity), rs in by.items():
        cells = [f"{rs[m]['top1']:.2f}%" + (f" ({rs[m]['held_out']['changed']:.1f})" if rs[m]["held_out"] else "") if m in rs else "–"
                 for m in CALIBRATIONS]
        chose = rs["auto"]["calibration_auto"]["chosen"] if "auto" in rs else "–"
        lines.append(f"| {student} (fp32 {next(iter(rs.values()))['fp32_top1']:.2f}%) | {granularity} | " + " | ".join(cells) + f" | {chose} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("run", "calibration", "table"))
    ap.add_argument("--only", action="append", default=[], help="run, calibration: only variants whose id contains this (repeatable)")
    ap.add_argument("--protocol", choices=("int8", "smoke"), default="int8")
    args = ap.parse_args()
    records = records_dir(args.protocol)
    if args.part == "run":
        for cfg, granularity, variant, seed in variants(args.protocol):
            vid = variant_id(cfg, granularity, variant, seed)
            path = records / f"{vid}.json"
            if path.exists() or (args.only and not any(o in vid for o in args.only)):
                continue
            bm.ensure_distilled(cfg, args.protocol)
            fsio.write_json(path, run_variant(args.protocol, cfg, granularity, variant, seed))
            print(f"{vid}: recorded")
    if args.part == "calibration":
        for cfg, granularity, method in calibration_variants(args.protocol):
            path = records / "calibration" / f"{cfg.student}-{granularity}-calibration_{method}.json"
            if not path.exists() and (not args.only or any(o in path.stem for o in args.only)):
                bm.ensure_distilled(cfg, args.protocol)
                fsio.write_json(path, run_calibration(args.protocol, cfg, granularity, method))
                print(f"{path.stem}: recorded")
    calibrations = [json.loads(p.read_text()) for p in sorted(records.glob("calibration/*.json"))]
    records = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    if records and args.protocol == "int8":
        fsio.write_text(DOC, table(records, len(variants(args.protocol))) + calibration_table(calibrations))
        print(f"wrote {DOC} ({len(records)} variants, {len(calibrations)} calibrations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
