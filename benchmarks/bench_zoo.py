"""The student zoo, timm's curated edge models beside torchvision's: size, speed, and which export targets take each
(issue #33). Three steps, each writing JSON under ``--out``; the table (markdown) comes from what they wrote::

    python benchmarks/bench_zoo.py targets --out /tmp/zoo            # any load: export + parity in every installed target
    python benchmarks/bench_zoo.py latency --out /tmp/zoo            # ALONE: ONNX Runtime batch-1 latency, fp32 and int8
    python benchmarks/bench_zoo.py table --out /tmp/zoo > docs/benchmarks/zoo.md

The phone runtimes need their extras: run ``targets`` with the interpreter that has them (the LiteRT venv of
docs/deploy.md has both) to fill their columns. Students are untrained but realistic for export: BatchNorm statistics
from a few passes over random images and a classifier scaled to logits of spread 4, so that parity means what it
does for a trained model (an untrained MobileOne otherwise puts out logits of 1e8). Parity: max |logit − PyTorch|
within the target's own tolerance on the validation parity batches (1, 3, 8 images), and the same top-1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgedistill.base import fsio  # noqa: E402
from edgedistill.base.errors import InputError, first_line  # noqa: E402
from edgedistill.base.timing import interleaved, spread  # noqa: E402
from edgedistill.data.loading import ArrayImages  # noqa: E402
from edgedistill.deploy.targets import TARGETS, OrtRunner, export_all, not_installed, onnx_metadata  # noqa: E402
from edgedistill.deploy.validate import validate_export  # noqa: E402
from edgedistill.models import timm_zoo  # noqa: E402
from edgedistill.models.macs import model_stats  # noqa: E402
from edgedistill.models.students import build_student  # noqa: E402
from edgedistill.recipe.schema import ExportConfig, ValidateConfig  # noqa: E402

TORCHVISION = [("mobilenet_v2", 0.5), ("mobilenet_v2", 1.0), ("mobilenet_v3_small", 1.0), ("mobilenet_v3_large", 1.0),
               ("shufflenet_v2_x0_5", 1.0), ("shufflenet_v2_x1_0", 1.0)]
# the curated timm students, and MobileNetV4-hybrid, which the search leaves out for its parity (docs/students.md)
STUDENTS = TORCHVISION + [(timm_zoo.PREFIX + n, 1.0) for n in timm_zoo.CURATED] + [("timm/mobilenetv4_hybrid_medium", 1.0)]
FORMATS = ["fp32", "int8", "fp16", "edge", "executorch", "executorch_int8", "litert", "litert_int8"]
CLASSES, MEAN, STD = 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LOSSY = ("fp16", "int8")
RELATIVE_TOLERANCE = 1e-4  # max |logit - PyTorch logit| / max |PyTorch logit|: float rounding through ~50 layers
VCFG = ValidateConfig(parity_batches=[1, 3, 8], latency_runs=3, throughput_batch=8, threads=1, seconds=0.01, rounds=1)


def key(arch: str, width: float, size: int) -> str:
    return f"{arch.replace('/', '-')}-w{width:g}-{size}px"


def realistic(arch: str, width: float, size: int, seed: int = 0) -> nn.Module:
    """The student with BatchNorm statistics of random images and logits of spread ~4 (see the module docstring)."""
    torch.manual_seed(seed)
    net = build_student(arch, CLASSES, image_size=size, mean=MEAN, std=STD, width=width)
    x = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes
    with torch.no_grad():
        net.train()
        for _ in range(4):
            net(x)
        net.eval()
        head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        scale = 4.0 / float(net(x).std().clamp_min(1e-12))
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)
    return net


def targets(out: Path, sizes: list[int]) -> None:
    formats = [f for f in FORMATS if not not_installed([f])]
    print(f"formats installed here: {formats}", flush=True)
    for size in sizes:
        for arch, width in STUDENTS:
            done = out / "targets" / f"{key(arch, width, size)}.json"
            if done.exists():  # a student's row is written once it is complete: an interrupted matrix goes on
                continue
            net = realistic(arch, width, size)
            rng = np.random.default_rng(0)
            calibration = rng.random((32, 3, size, size), dtype=np.float32)
            test = ArrayImages(rng.random((16, 3, size, size), dtype=np.float32), np.arange(16) % CLASSES)
            meta = onnx_metadata([f"c{i}" for i in range(CLASSES)], size, MEAN, STD, "0" * 16)
            row = {"arch": arch, "width": width, "size": size, **model_stats(net, size), "targets": {}}
            with torch.no_grad():
                logit_scale = float(net(torch.from_numpy(test.x)).abs().max())
            for fmt in formats:
                target = TARGETS.get(fmt)
                with tempfile.TemporaryDirectory(prefix="zoo-") as td:
                    try:
                        summary = export_all(net, Path(td), ExportConfig(formats=[*target.requires, fmt]), image_size=size,
                                             calibration_images=calibration, metadata=meta)
                        if fmt in summary["failed"]:  # the target refused the network: its reason is the finding
                            raise InputError(summary["failed"][fmt])
                        v = validate_export(net, Path(td), {"variants": {fmt: summary["variants"][fmt]}}, test, VCFG)["variants"][fmt]
                        cell = {"precision": target.precision, "runs": v.get("error") is None and v["max_abs_diff"] is not None, "error": v.get("error"),
                                "relative_diff": v["max_abs_diff"] / logit_scale if v["max_abs_diff"] is not None else None,
                                "top1_agreement": v["top1_agreement"], "size_mb": round(summary["variants"][fmt]["size_bytes"] / 1e6, 3)}
                        # fp32 targets: PyTorch's logits up to float rounding; lossy ones (fp16, int8): a file that
                        # runs (their gate is a top-1 drop, which needs a trained student and real images)
                        cell["passed"] = cell["runs"] and (target.precision in LOSSY or
                                                           (cell["relative_diff"] <= RELATIVE_TOLERANCE and cell["top1_agreement"] == 1.0))
                    except Exception as e:  # noqa: BLE001 - what a target refuses is the finding
                        cell = {"runs": False, "passed": False, "error": f"{type(e).__name__}: {first_line(e, 300)}"}
                        traceback.print_exc(limit=1)
                row["targets"][fmt] = cell
                print(f"{key(arch, width, size)} {fmt}: {cell}", flush=True)
            done.parent.mkdir(parents=True, exist_ok=True)
            fsio.write_text(done, json.dumps(row, indent=1))


def latency(out: Path, sizes: list[int], rounds: int, seconds: float) -> None:
    """ONNX Runtime batch-1 latency of every student's fp32 and int8 file at each size, 1 thread, interleaved rounds
    over all of a size's files (so that a change of load touches them alike)."""
    from edgedistill.deploy.targets.int8 import quantize_int8
    from edgedistill.models.onnx_export import export_onnx

    torch.set_num_threads(1)
    for size in sizes:
        runners, rows = {}, {}
        with tempfile.TemporaryDirectory(prefix="zoo-") as td:
            for arch, width in STUDENTS:
                net = realistic(arch, width, size)
                k = key(arch, width, size)
                fp32, int8 = Path(td) / f"{k}.onnx", Path(td) / f"{k}.int8.onnx"
                export_onnx(net, fp32, image_size=size, metadata={})
                quantize_int8(fp32, int8, np.random.default_rng(0).random((32, 3, size, size), dtype=np.float32), "minmax")
                runners[(k, "fp32")], runners[(k, "int8")] = OrtRunner.load(fp32, 1), OrtRunner.load(int8, 1)
                rows[k] = {"arch": arch, "width": width, "size": size, **model_stats(net, size)}
                print(f"exported {k}", flush=True)
            x = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
            samples = interleaved({name: (lambda r=r: r.run_once(x)) for name, r in runners.items()}, rounds=rounds,
                                  min_seconds=seconds, warmup=5)
        for (k, precision), s in samples.items():
            rows[k][f"{precision}_ms"] = spread([1000.0 * v for v in s])
        (out / "latency").mkdir(parents=True, exist_ok=True)
        (out / "latency" / f"{size}px.json").write_text(json.dumps(
            {"machine": platform.processor() or platform.machine(), "rounds": rounds, "round_seconds": seconds,
             "torch": torch.__version__, "rows": list(rows.values())}, indent=1))


def table(out: Path) -> None:
    lat = {}
    for f in sorted((out / "latency").glob("*.json")):
        for r in json.loads(f.read_text())["rows"]:
            lat[key(r["arch"], r["width"], r["size"])] = r
    tgt = {f.stem: json.loads(f.read_text()) for f in sorted((out / "targets").glob("*.json"))}
    sizes = sorted({r["size"] for r in lat.values()} | {r["size"] for r in tgt.values()})
    formats = [f for f in FORMATS if any(f in r["targets"] for r in tgt.values())]
    for size in sizes:
        print(f"\n### {size} × {size} px, {CLASSES} classes\n")
        print("| student | params | MACs | ORT fp32 ms | ORT int8 ms | " + " | ".join(formats) + " |")
        print("| --- | ---: | ---: | ---: | ---: | " + " | ".join(":-:" for _ in formats) + " |")
        for arch, width in STUDENTS:
            k = key(arch, width, size)
            r, t = lat.get(k), tgt.get(k)
            base = r or t
            if base is None:
                continue
            ms = [f"{r[p]['median']:.2f}" if r else "" for p in ("fp32_ms", "int8_ms")] if r else ["", ""]
            cells = [cell_text(t["targets"][f]) if t and f in t["targets"] else "" for f in formats]
            name = arch if width == 1.0 else f"{arch} ×{width:g}"
            print(f"| {name} | {base['parameters'] / 1e6:.2f} M | {base['macs'] / 1e6:.1f} M | {ms[0]} | {ms[1]} | " + " | ".join(cells) + " |")
    fails = [(k, f, v["error"] or f"relative logit difference {v['relative_diff']:.2g}, top-1 agreement {v['top1_agreement']:.3f}")
             for k, t in tgt.items() for f, v in t["targets"].items() if not v["passed"]]
    if fails:
        print("\nWhat failed, and why:\n")
        for k, f, why in fails:
            print(f"- {k}, {f}: {why}")


def cell_text(cell: dict) -> str:
    """✓ and the figure that says so: relative logit difference (float targets) or top-1 agreement (int8)."""
    if not cell["runs"]:
        return "✗ export" if "size_mb" not in cell else "✗ runtime"
    figure = f"agree {cell['top1_agreement']:.2f}" if cell["precision"] in LOSSY else f"{cell['relative_diff']:.0e}"
    return ("✓ " if cell["passed"] else "✗ ") + figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["targets", "latency", "table"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="minimum seconds of calls per file per round")
    ap.add_argument("--only", nargs="+", help="students whose name contains one of these (a smoke run)")
    args = ap.parse_args()
    if args.only:
        STUDENTS[:] = [(a, w) for a, w in STUDENTS if any(o in a for o in args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    {"targets": lambda: targets(args.out, args.sizes), "latency": lambda: latency(args.out, args.sizes, args.rounds, args.seconds),
     "table": lambda: table(args.out)}[args.step]()


if __name__ == "__main__":
    main()
