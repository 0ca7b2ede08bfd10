"""SIGINT anywhere, then ``--resume``: is the resumed student bit-equal to the uninterrupted one? (issue #31)

The default suite interrupts at chosen steps and chosen calls (tests/interrupt_at.py), with no timing. This script
does what a user does instead: it sends SIGINT at wall-clock moments spread over a real run's distillation, export
and validation, wherever they land (a step, the precise-BN pass, the evaluation, a checkpoint write, a stage change),
resumes each run, and compares every tensor of the resumed ``student.pt`` with the uninterrupted run's.

1. A reference run of the recipe, uninterrupted, with the times its stages finished (polled from the run folder).
2. Its folder as it stood before distillation (teacher, score and plan done), and a second reference resumed from
   that copy: it must equal the first (nothing of the earlier stages' process may reach the student).
3. ``--points`` moments, spread evenly from the student's first checkpoint to the end of validation.
4. For each: ``run --resume`` on a fresh copy of that folder, SIGINT that long after its first student checkpoint,
   the printed resume command, and the comparison with the first reference. A table (markdown) on stdout and a
   JSON record.

    python benchmarks/sigint_sweep.py --out /tmp/sweep            # 20 points on the issue's recipe (~40 min on 2 cores)
    python benchmarks/sigint_sweep.py --out /tmp/sweep --points 3  # a smoke run
    python benchmarks/sigint_sweep.py --out /tmp/sweep --points 6 --after distill  # export and validation only
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the recipe: a dropout student, HE-DA at a fixed r, fp32 export
OVERRIDES = ["student.arch=mobilenet_v2", "student.width=0.35", "student.dropout=0.2", "augment.fraction=0.3", "augment.budget=null",
             "export.formats=[fp32]"]
POLL = 0.02
MARKS = ("distill", "export", "validate")


def command(out: Path, *extra: str) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return [sys.executable, "-m", "edgedistill", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), *sets, *extra]


def default_sigint() -> None:
    """In the child: SIGINT at its default. A sweep started in the background by a shell has SIGINT ignored, and its
    children would inherit that: outside training (where the loop installs its own handler) the signal would land on
    nothing and the point would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path: Path, proc: subprocess.Popen) -> float | None:
    """Seconds until ``path`` exists (None if the process ended first)."""
    t0 = time.perf_counter()
    while not path.exists():
        if proc.poll() is not None:
            return None
        time.sleep(POLL)
    return time.perf_counter() - t0


def reference(out: Path) -> dict:
    run = out / "quickstart"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = wait_for(run / "checkpoints" / "last.pt", proc)
    t0 = time.perf_counter()
    done = {}
    for mark in MARKS:
        if wait_for(run / "stages" / f"{mark}.done", proc) is None and not (run / "stages" / f"{mark}.done").exists():
            raise SystemExit(f"reference run ended before {mark}: {proc.stderr.read()[-2000:]}")
        done[mark] = round(time.perf_counter() - t0, 2)
    if proc.wait() != 0:
        raise SystemExit(f"reference run failed: {proc.stderr.read()[-2000:]}")
    return {"first_checkpoint_s": round(first, 2), "done_after_first_checkpoint_s": done}


#: what distillation and the stages after it write: removed from the copy the points start from
AFTER_PLAN = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "student.pt", "student.onnx", "export.json",
              "validation.json", "budget.json", "report.md", "training.png", "variants.png",
              *[f"stages/{s}.done" for s in ("distill", "export", "validate", "baseline", "report")])


def before_distill(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for name in AFTER_PLAN:
        (to / name).unlink(missing_ok=True)
    return to


def differing(a: Path, b: Path) -> tuple[int, int]:
    x, y = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    return sum(not torch.equal(x[k], y[k]) for k in x), len(x)


def one_point(out: Path, prepared: Path, delay: float, ref_student: Path) -> dict:
    run = before_distill(prepared, out / "quickstart")
    proc = subprocess.Popen(command(out, "--resume"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    if wait_for(run / "checkpoints" / "last.pt", proc) is None:
        return {"delay_s": delay, "error": "ended before the first checkpoint"}
    time.sleep(delay)
    landed = next((m for m in MARKS if not (run / "stages" / f"{m}.done").exists()), "report")
    proc.send_signal(signal.SIGINT)
    first_rc = proc.wait()
    said = [line for line in proc.stderr.read().splitlines() if "stopped" in line or "interrupted" in line]
    resumed = subprocess.run(command(out, "--resume"), capture_output=True, text=True)
    row = {"delay_s": delay, "stage": landed, "first_rc": first_rc, "said": said[-1].strip() if said else "",
           "resume_rc": resumed.returncode}
    if (run / "student.pt").exists():
        row["differing"], row["tensors"] = differing(run / "student.pt", ref_student)
    else:
        row["error"] = resumed.stderr[-500:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--after", choices=MARKS[:-1], help="spread the points from this stage's end instead (in the "
                        "reference run) to the end of validation: the short stages after a long distillation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ref = reference(args.out / "reference")
    ref_student = args.out / "reference" / "quickstart" / "student.pt"
    prepared = before_distill(args.out / "reference" / "quickstart", args.out / "prepared" / "quickstart")
    again = before_distill(prepared, args.out / "again" / "quickstart")
    if subprocess.run(command(again.parent, "--resume"), capture_output=True).returncode != 0:
        raise SystemExit("the second reference failed")
    ref["second_reference_differing"] = differing(again / "student.pt", ref_student)[0]
    print(f"second reference (resumed before distill): {ref['second_reference_differing']} tensors differ", file=sys.stderr)
    done = ref["done_after_first_checkpoint_s"]
    start = done[args.after] if args.after else 0.0
    delays = [round(start + (done["validate"] - start) * (i + 0.5) / args.points, 2) for i in range(args.points)]
    rows = []
    for i, delay in enumerate(delays):
        rows.append(one_point(args.out / f"p{i:02d}", prepared, delay, ref_student))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    record = {"overrides": OVERRIDES, "reference": ref, "points": rows}
    (args.out / "sigint_sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| SIGINT after the first student checkpoint | stage it landed in | what the run said | exit | resume exit | tensors that differ |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        diff = f"{r['differing']} of {r['tensors']}" if "differing" in r else r.get("error", "?")
        print(f"| {r['delay_s']:.2f} s | {r.get('stage', '?')} | {r.get('said', '')} | {r.get('first_rc', '?')} | "
              f"{r.get('resume_rc', '?')} | {diff} |")


if __name__ == "__main__":
    main()
