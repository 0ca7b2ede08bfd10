"""How long does loading an image folder's layout take before anything starts? (issue #32)

Generates a folder of ``--files`` small JPEGs (100 classes; train/ and test/ split 99:1), then times the
``imagefolder`` source's load (listing every file and checking every header) in a fresh process per repetition,
with the package of ``--checkout`` (this one by default, or another checkout for a before/after). A second
process's torch threads would slow the check: run it alone::

    python benchmarks/bench_scan.py --folder /tmp/scan100k                        # this checkout
    python benchmarks/bench_scan.py --folder /tmp/scan100k --checkout /tmp/before  # another one, same folder
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 100
TIMED = """
import time
from edgedistill.data.sources import load_data
from edgedistill.recipe.schema import DataConfig
t = time.perf_counter()
b = load_data(DataConfig(source="imagefolder", root={root!r}, image_size=32))
print(time.perf_counter() - t, len(b.train) + len(b.test))
"""


def make_folder(root: Path, files: int) -> None:
    """``files`` copies of one 16×16 JPEG, 99 % in train/ and 1 % in test/, over 100 class folders (made once)."""
    from PIL import Image

    if (root / ".complete").exists():
        return
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    per_class = files // CLASSES
    for split, n in (("train", per_class - per_class // 100), ("test", per_class // 100)):
        for c in range(CLASSES):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    (root / ".complete").touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkout", type=Path, default=ROOT)
    args = ap.parse_args()
    make_folder(args.folder, args.files)
    code = TIMED.format(root=str(args.folder.resolve()))
    runs = []
    for _ in range(args.repeats):  # a fresh process each time; the page cache is warm after the first
        out = subprocess.run([sys.executable, "-c", code], cwd=args.checkout.resolve(), capture_output=True, text=True, check=True)
        seconds, n = out.stdout.split()
        runs.append(float(seconds))
    print(f"{int(n):,} files, code {args.checkout}: load {statistics.median(runs):.2f} s (median of {len(runs)}: "
          + ", ".join(f"{s:.2f}" for s in runs) + ")")


if __name__ == "__main__":
    main()
