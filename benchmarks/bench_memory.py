"""Does peak memory depend on the number of images? ``edgedistill validate`` on a 224-px image folder with few and
with many test images, each in a process of its own, its peak resident memory measured by ``/usr/bin/time`` (issue #32).

The folder is CIFAR-100-real's test half (``../shared``) upsampled to 256-px JPEGs (quality 90), laid out as
``test/<class>/``, with two training images a class in ``train/``; the model a MobileNetV2 ×0.5 for 100 classes at
224 px, untrained (memory does not depend on the weights). ``--checkout`` runs another checkout's code on the same
folder and model, for a before/after::

    python benchmarks/bench_memory.py --out /tmp/mem                          # 1,500 and 6,000 test images
    python benchmarks/bench_memory.py --out /tmp/mem --checkout /tmp/before   # the same with that checkout's package
    python benchmarks/bench_memory.py --out /tmp/mem --run                    # a whole run: 2,000 train, 6,000 test images

Memory does not depend on the machine's load: this may run beside other work (its seconds then mean little).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NPZ = ROOT.parent / "shared" / "data" / "cifar100-real" / "cifar100_train40k_test10k.npz"
SIDE = 256  # what the JPEGs are stored at; the recipe resizes and centre-crops to 224


def make_folder(out: Path, n_test: int, train_per_class: int = 2) -> Path:
    """``out/folder`` with the first ``n_test`` test images and ``train_per_class`` training images a class (made once;
    another number of training images makes another folder)."""
    from PIL import Image

    folder = out / ("folder" if train_per_class == 2 else f"folder-{train_per_class}")
    if (folder / ".complete").exists():
        return folder
    d = np.load(NPZ)
    names = [str(n) for n in d["class_names"]]
    picks = {"test": (d["x_test"][:n_test], d["y_test"][:n_test])}
    train_idx = np.concatenate([np.flatnonzero(d["y_train"] == c)[:train_per_class] for c in range(len(names))])
    picks["train"] = (d["x_train"][train_idx], d["y_train"][train_idx])
    for split, (x, y) in picks.items():
        for i, (img, label) in enumerate(zip(x, y)):
            target = folder / split / names[label]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(target / f"{i:05d}.jpg", quality=90)
    (folder / ".complete").touch()
    return folder


def make_model(out: Path, classes: int) -> Path:
    from edgedistill.models.onnx_export import export_onnx
    from edgedistill.models.students import build_student

    path = out / "mobilenet_v2_w0.5_224.onnx"
    if not path.exists():
        net = build_student("mobilenet_v2", classes, image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3, width=0.5).eval()
        export_onnx(net, path, image_size=224, metadata={})
    return path


def peak_rss(checkout: Path, recipe: Path, model: Path, n_test: int, out: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of ``edgedistill validate`` on ``n_test`` test images, run from ``checkout``."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "edgedistill", "validate", str(recipe), "--onnx", str(model),
           "--out", str(out / f"runs-{n_test}"), "--set", f"data.test_limit={n_test}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"validate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) / 1e6, seconds


RUN_RECIPE = """name: run224
device: cpu
seed: 0
data: {{source: imagefolder, root: {folder}, image_size: 224, batch_size: 32, eval_batch_size: 100, num_workers: 2}}
teacher:
  source: train
  arch: mobilenet_v3_small
  allow_weak: true  # two epochs from scratch on 20 images a class: near chance, and this measures memory
  train: {{epochs: 2, optimizer: {{name: sgd, lr: 0.05, weight_decay: 5.0e-4}}, schedule: {{name: cosine, warmup_epochs: 0}}}}
student: {{arch: mobilenet_v3_small, width: 0.5}}
distill:
  epochs: 2
  optimizer: {{name: sgd, lr: 0.05, weight_decay: 5.0e-4}}
  schedule: {{name: cosine, warmup_epochs: 0}}
augment: {{method: cutmix, selection: high, fraction: 0.2}}
export: {{formats: [fp32, int8], int8: {{calibration: {{samples: 256}}}}}}
validate: {{rounds: 3, seconds: 1, allow_weak: true}}
"""


def whole_run(out: Path, train_per_class: int, n_test: int) -> None:
    """Peak RSS and time per stage of a whole ``edgedistill run`` at 224 px (teacher trained here, two epochs each)."""
    folder = make_folder(out, n_test, train_per_class)
    recipe = out / "run224.yaml"
    recipe.write_text(RUN_RECIPE.format(folder=folder))
    t = time.perf_counter()
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "edgedistill", "run", str(recipe), "--out", str(out / "runs-whole"),
           "--force"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-3000:])
    print(f"exit {proc.returncode}; peak RSS {int(proc.stderr.strip().splitlines()[-1]) / 1e6:.2f} GB; "
          f"{time.perf_counter() - t:.0f} s; {train_per_class * 100:,} train and {n_test:,} test images at 224 px")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1500, 6000])
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose package runs validate")
    ap.add_argument("--run", action="store_true", help="a whole run instead: 20 training images a class, 6,000 test images")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run:
        return whole_run(args.out, 20, 6000)
    folder = make_folder(args.out, max(args.sizes))
    model = make_model(args.out, 100)
    recipe = args.out / "mem224.yaml"
    recipe.write_text(f"name: mem224\ndevice: cpu\ndata: {{source: imagefolder, root: {folder}, image_size: 224, "
                      f"eval_batch_size: 100, num_workers: 0}}\nvalidate: {{rounds: 3, seconds: 1}}\n")
    print(f"| test images | peak RSS | seconds |  (code: {args.checkout}, {os.cpu_count()} cores)\n| ---: | ---: | ---: |")
    for n in args.sizes:
        gb, s = peak_rss(args.checkout.resolve(), recipe, model, n, args.out)
        print(f"| {n:,} | {gb:.2f} GB | {s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
