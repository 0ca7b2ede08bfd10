"""ONNX Runtime vs PyTorch eager, and int8 vs fp32, for an exported student on the CPU.

Measures, at one batch size (default 32) and one thread count (default 2):

* ORT fp32 vs PyTorch eager throughput (images/s), side by side;
* int8 (static QDQ, per-channel) vs fp32: test top-1, size ratio, p50 latency ratio at batch 1;
* optionally fp16, int8 with int8 activations (S8S8) next to the default U8S8, and any other export target
  (``--formats``: e.g. the phone runtimes ExecuTorch and LiteRT, fp32 and int8, beside ONNX Runtime);

and prints a Markdown table. Either build a student (``--arch``, untrained unless ``--checkpoint``;
accuracies of an untrained model are chance level, only the speed and size columns mean something)
or point at an existing run folder (``--onnx-dir``; then PyTorch eager is measured only when
``--arch`` is given too).

On a shared, oversubscribed machine PyTorch's OpenMP threads spin-wait on each other and eager
throughput at 2 threads can collapse by 10x or more (ORT suffers less); the header prints the load
average, and ``--threads 1`` gives the steadiest comparison.

    python benchmarks/bench_export.py --arch mobilenet_v2 \\
        --data ../shared/data/cifar100-real/cifar100_train40k_test10k.npz --threads 2
    # every runtime side by side on a trained student (the venv that has both extras, docs/deploy.md):
    /work/venvs/litert/bin/python benchmarks/bench_export.py --arch shufflenet_v2_x0_5 --width 0.5 \\
        --checkpoint runs/cifar100-energy-kd/student.pt --formats fp32,int8,edge,executorch,executorch_int8,litert,litert_int8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgedistill.data.sources import limit_indices
from edgedistill.models.students import build_student
from edgedistill.models.checkpoints import load_checkpoint
from edgedistill.recipe.schema import ExportConfig, ValidateConfig  # noqa: E402
from edgedistill.deploy.targets import TARGETS, export_all, onnx_metadata, register  # noqa: E402
from edgedistill.deploy.targets.int8 import INT8_ACTIVATION_TYPE, Int8, quantize_int8  # noqa: E402
from edgedistill.data.loading import ArrayImages
from edgedistill.deploy.validate import validate_export, validate_onnx_file  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar100-real" / "cifar100_train40k_test10k.npz"


def load_npz(path: Path, num_test: int, num_calib: int, seed: int):
    """Class-balanced test subset and calibration images as (N, 3, H, W) float32 in [0, 1]."""
    with np.load(path) as d:
        y_test, y_train = d["y_test"].astype(np.int64), d["y_train"].astype(np.int64)
        ti = limit_indices(y_test, num_test, seed)
        ci = limit_indices(y_train, num_calib, seed + 1)
        x_test, x_cal = d["x_test"][ti], d["x_train"][ci]
        names = [str(c) for c in d["class_names"]] if "class_names" in d.files else None
    nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # noqa: E731
    num_classes = int(max(y_test.max(), y_train.max()) + 1)
    return nchw(x_test), y_test[ti], nchw(x_cal), names or [f"class{i}" for i in range(num_classes)]


def build(args, num_classes: int):
    """The student to measure: untrained, or with weights from a state_dict / ``student.pt``."""
    ck = load_checkpoint(args.checkpoint) if args.checkpoint else {}
    mean, std = ck.get("mean", CIFAR_MEAN), ck.get("std", CIFAR_STD)
    model = build_student(args.arch, num_classes, image_size=args.image_size, mean=mean, std=std, width=args.width)
    if args.checkpoint:
        state = ck.get("model", ck)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if hasattr(v, "shape")})
    return model.eval()


@register
class Int8S8S8(Int8):
    """int8 with int8 activations (S8S8), for comparison with the default U8S8: a target of this script only."""

    name = "int8-s8s8"
    files = ("student.int8-s8s8.onnx",)

    def build(self, ctx):
        calibration = ctx.calibration_images[: ctx.cfg.calibration.samples]
        return quantize_int8(ctx.file_of("fp32"), ctx.out_dir / self.files[0], calibration, ctx.cfg.calibration.method,
                             activation_type="qint8")


def fmt_size(n):
    return "–" if n is None else f"{n / 1e6:.2f} MB"


def fmt(v, spec):
    return "–" if v is None else spec.format(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model")
    src.add_argument("--arch", help="student to build (e.g. mobilenet_v2); needed for the PyTorch eager column")
    src.add_argument("--checkpoint", type=Path, help="student state_dict / student.pt to load into --arch")
    src.add_argument("--onnx-dir", type=Path, help="existing folder with student.onnx (+ student.int8.onnx …)")
    src.add_argument("--width", type=float, default=1.0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=".npz with x_train/y_train/x_test/y_test (NHWC uint8)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="throughput batch size")
    p.add_argument("--num-test", type=int, default=1000, help="class-balanced test images for top-1")
    p.add_argument("--calib", type=int, default=256, help="class-balanced calibration images for int8")
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per latency or throughput figure (validate.seconds)")
    p.add_argument("--formats", default="fp32,int8",
                   help="export targets to build, comma-separated; all runtimes side by side: "
                        "fp32,int8,edge,executorch,executorch_int8,litert,litert_int8 (needs both extras, see docs/deploy.md)")
    p.add_argument("--fp16", action="store_true", help="also build and measure the fp16 variant")
    p.add_argument("--s8s8", action="store_true", help="also quantize with int8 activations (S8S8) for comparison")
    p.add_argument("--out-dir", type=Path, help="keep the built variants here (default: a temp folder, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.arch and not args.onnx_dir:
        p.error("give --arch (build a student) or --onnx-dir (use exported files), or both")
    if not args.data.exists():
        p.error(f"--data {args.data} does not exist")

    t0 = time.perf_counter()
    x_test, y_test, x_cal, class_names = load_npz(args.data, args.num_test, args.calib, args.seed)
    if x_test.shape[2] != args.image_size:
        p.error(f"the data is {x_test.shape[2]} px; this script does not resize (use --image-size {x_test.shape[2]})")
    cfg = ValidateConfig(threads=args.threads, throughput_batch=args.batch, parity_batches=[1, args.batch],
                         latency_runs=args.latency_runs, seconds=args.seconds)
    tmp = None
    model = build(args, len(class_names)) if args.arch else None
    notes = []
    if args.onnx_dir:
        out = args.onnx_dir
        summary_file = out / "export.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
        else:
            summary = {"variants": {n: {"path": TARGETS.get(n).files[0]} for n in TARGETS if (out / TARGETS.get(n).files[0]).exists()}}
    else:
        out = args.out_dir or Path(tmp := tempfile.mkdtemp(prefix="bench-export-"))
        formats = args.formats.split(",") + ["int8-s8s8"] * args.s8s8 + ["fp16"] * args.fp16
        export_cfg = ExportConfig(formats=formats, int8={"calibration": {"samples": len(x_cal), "method": args.calib_method}})
        meta = onnx_metadata(class_names, args.image_size, CIFAR_MEAN, CIFAR_STD, "benchmark")
        summary = export_all(model, out, export_cfg, image_size=args.image_size, calibration_images=x_cal, metadata=meta)
        if "fp32" in summary["variants"]:
            notes.append(f"fp32 export: {summary['exporter']} exporter, opset {summary['opset']}, "
                         f"{summary['variants']['fp32']['seconds']:.1f} s")
        if "int8" in summary["variants"]:
            notes.append(f"int8 ({INT8_ACTIVATION_TYPE} activations, {args.calib_method}, {len(x_cal)} images): "
                         f"{summary['variants']['int8']['seconds']:.1f} s")
        notes += [f"{n} export: {i['seconds']:.1f} s" for n, i in summary["variants"].items() if n not in ("fp32", "int8")]

    if model is not None:
        res = validate_export(model, out, summary, ArrayImages(x_test, y_test), cfg)
    else:
        res = {"torch_top1": None, "torch_images_per_second": None, "variants": {}}
        for name, info in summary["variants"].items():
            res["variants"][name] = validate_onnx_file(out / info["path"], ArrayImages(x_test, y_test), cfg, name=name)["variants"][name]

    eager = res.get("torch_images_per_second")
    v = res["variants"]
    load = " · load avg {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    print(f"\n### {args.arch or args.onnx_dir} · {args.image_size} px · batch {args.batch} · {args.threads} threads · "
          f"{len(x_test)} test images · {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'untrained' if args.arch else 'exported files'}{load}\n")
    print("| variant | size | top-1 % | Δ top-1 vs fp32 | p50 ms (b=1) | img/s (b={}) | vs PyTorch eager | vs ORT fp32 |".format(args.batch))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    if eager:
        print(f"| PyTorch eager | – | {fmt(res['torch_top1'], '{:.2f}')} | – | – | {eager:,.0f} | 1.00x | – |")
    ref = v.get("fp32", {})
    for name, r in v.items():
        ips = r.get("images_per_second")
        d = (r["test_top1"] - ref["test_top1"]) if r.get("test_top1") is not None and ref.get("test_top1") is not None else None
        print(f"| {name} | {fmt_size(r.get('size_bytes'))} | {fmt(r.get('test_top1'), '{:.2f}')} | {fmt(d, '{:+.2f}')} | "
              f"{fmt(r.get('latency_ms_p50'), '{:.3f}')} | {fmt(ips, '{:,.0f}')} | "
              f"{fmt(ips / eager if ips and eager else None, '{:.2f}x')} | "
              f"{fmt(ips / ref['images_per_second'] if ips and ref.get('images_per_second') else None, '{:.2f}x')} |")
    for q in (n for n in v if n.startswith("int8")):
        r = v[q]
        if r.get("size_bytes") and ref.get("size_bytes") and r.get("latency_ms_p50") and ref.get("latency_ms_p50"):
            print(f"\n{q} vs fp32: size ratio {r['size_bytes'] / ref['size_bytes']:.2f}, "
                  f"p50 latency ratio {r['latency_ms_p50'] / ref['latency_ms_p50']:.2f}, "
                  f"top-1 {r['test_top1'] - ref['test_top1']:+.2f} points, "
                  f"agreement with PyTorch top-1 {fmt(r.get('top1_agreement'), '{:.3f}')}")
    if "fp32" in v and v["fp32"].get("max_abs_diff") is not None:
        print(f"fp32 parity: max |ORT − PyTorch| = {v['fp32']['max_abs_diff']:.2e}")
    for n in notes:
        print(f"- {n}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"- total {time.perf_counter() - t0:.0f} s" + ("" if tmp else f"; files in {out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
