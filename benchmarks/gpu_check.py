"""What works on a CUDA machine, in under 10 minutes (issue #32; grown from ../shared/gpu/check.sh).

Run from the repository root on the GPU machine (nothing is installed: ``PYTHONPATH`` is the checkout)::

    python3 benchmarks/gpu_check.py --out /tmp/gpu-out                  # every step
    python3 benchmarks/gpu_check.py --out /tmp/gpu-out --device cpu     # the same plumbing on a CPU (a smoke test)

Steps: the quickstart on the device; a 224-px image-folder run with AMP, channels_last and torch.compile (the
teacher's runtime chosen on the device, ``teacher.json`` says which); the input pipeline's images per second
(decode + augment with the run's loader workers) against the student step's, from that run; SIGINT during
distillation and ``--resume`` to the end; DDP over NCCL on every GPU present (torchrun); a timm student when timm is
installed. It prints a table (step, exit code, seconds, what it measured), writes ``gpu_check.json`` and
``gpu_check.log`` under ``--out``, and exits 1 when any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ED = [sys.executable, "-m", "edgedistill"]


def folder(root: Path, train: int = 2000, test: int = 500, classes: int = 10) -> Path:
    """A 224-px folder of random-content 256-px JPEGs (real data does not travel)."""
    import numpy as np
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=85)
    (root / ".complete").touch()
    return root


def recipe_224(path: Path, data: Path, device: str, student: str = "mobilenet_v2") -> Path:
    """The 224-px run. Its teacher learns at 0.01: at the default 0.1 one epoch on random-content images diverged (loss
    9.3) to logits so large that float rounding alone put every teacher runtime over the 1e-4 parity."""
    cuda = device == "cuda"
    path.write_text(f"""name: gpu224
device: {device}
data: {{source: imagefolder, root: {data}, image_size: 224, batch_size: {128 if cuda else 16}}}
teacher: {{source: train, arch: resnet18, allow_weak: true,
          train: {{epochs: 1, amp: {str(cuda).lower()}, optimizer: {{name: sgd, lr: 0.01, weight_decay: 5.0e-4}}}}}}
student: {{arch: {student}}}
distill: {{epochs: 2, amp: {str(cuda).lower()}, channels_last: {str(cuda).lower()}, compile: {str(cuda).lower()}}}
augment: {{fraction: 0.3}}
export: {{formats: [fp32, int8]}}
validate: {{rounds: 3, seconds: 0.5, allow_weak: true}}
""")
    return path


def loader_rate(recipe: Path, seconds: float = 20.0) -> float:
    """Images per second of the run's own training loader (decode + augment, its workers), nothing else running."""
    sys.path.insert(0, str(ROOT))
    from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader
    from edgedistill.data.sources import load_data
    from edgedistill.pipeline.context import loader_workers
    from edgedistill.recipe.schema import load_recipe

    import torch

    r = load_recipe(recipe)
    split = load_data(r.data).train
    device = torch.device(r.device)
    workers = loader_workers(r.data.num_workers, device, 1, in_memory=False)
    loader = make_loader(ImageDataset(split, 224, train=True, seed=0), r.data.batch_size,
                         EpochSampler(len(split), seed=0, shuffle=True), num_workers=workers, pin_memory=device.type == "cuda")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for images, *_ in loader:
            n += len(images)
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def interrupted_resume(out: Path, device: str, log) -> int:
    """SIGINT once the student's first checkpoint exists, then ``--resume`` to the end; the resume's exit code."""
    cmd = [*ED, "run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--set", f"device={device}",
           "--set", "distill.epochs=12"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = out / "quickstart" / "checkpoints" / "last.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    print(f"interrupted: rc={proc.wait()}", file=log, flush=True)
    return subprocess.run([*cmd, "--resume"], stdout=log, stderr=log).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-out"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    out, work = args.out, args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    rows: list[dict] = []
    with open(out / "gpu_check.log", "w") as log:

        def step(name: str, run) -> None:
            print(f"=== {name}", file=log, flush=True)
            t0 = time.perf_counter()
            try:
                rc, measured = run()
            except Exception as e:  # noqa: BLE001 - a failed step is a finding, the others still run
                print(f"{type(e).__name__}: {e}", file=log, flush=True)
                rc, measured = 1, {}
            rows.append({"step": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), **measured})
            print(f"{name}: rc={rc} {measured}", flush=True)

        def ed(*a: str) -> tuple[int, dict]:
            return subprocess.run([*ED, *a], stdout=log, stderr=log).returncode, {}

        import torch

        print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
              f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}", file=log, flush=True)
        data = folder(work / "folder", *((2000, 500) if args.device == "cuda" else (200, 50)))  # the CPU smoke: small
        r224 = recipe_224(work / "r224.yaml", data, args.device)
        step("quickstart", lambda: ed("run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(work / "q"), "--set", f"device={args.device}"))

        def run_224() -> tuple[int, dict]:
            rc, _ = ed("run", str(r224), "--out", str(work / "f"))
            run = work / "f" / "gpu224"
            step_ips = [json.loads(line)["images_per_second"] for line in open(run / "metrics.jsonl")]
            runtime = json.loads((run / "teacher.json").read_text())["runtime"]["runtime"]
            return rc, {"step_img_s": step_ips, "teacher_runtime": runtime}

        step("folder224-amp-channels_last-compile", run_224)
        step("input-pipeline-224", lambda: (0, {"loader_img_s": round(loader_rate(r224))}))
        step("sigint-resume", lambda: (interrupted_resume(work / "i", args.device, log), {}))
        gpus = torch.cuda.device_count() if args.device == "cuda" else 2
        step(f"ddp-{'nccl' if args.device == 'cuda' else 'gloo'}-{gpus}", lambda: (subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "edgedistill", "run",
             str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(work / "d"), "--set", f"device={args.device}"],
            stdout=log, stderr=log).returncode, {}))
        try:
            import timm  # noqa: F401
        except ImportError:
            print("timm not installed: no timm step", file=log)
        else:
            step("timm-mobilenetv4-quickstart", lambda: ed("run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(work / "t"),
                                                          "--set", f"device={args.device}", "--set", "student.arch=timm/mobilenetv4_conv_small"))
    (out / "gpu_check.json").write_text(json.dumps({"device": args.device, "steps": rows}, indent=1))
    print(f"\n{'step':38} {'rc':>3} {'s':>7}  measured")
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("step", "rc", "seconds")}
        print(f"{r['step']:38} {r['rc']:>3} {r['seconds']:>7.1f}  {extra or ''}")
    loader = next((r["loader_img_s"] for r in rows if "loader_img_s" in r), None)
    steps = next((r["step_img_s"] for r in rows if "step_img_s" in r), None)
    if loader and steps:
        print(f"input pipeline {loader} img/s against the student step's {max(steps):.0f}: "
              + ("the pipeline keeps up" if loader > max(steps) else "the PIPELINE is the limit"))
    sys.exit(1 if any(r["rc"] for r in rows) else 0)


if __name__ == "__main__":
    main()
