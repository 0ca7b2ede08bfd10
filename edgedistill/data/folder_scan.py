"""Reading an image folder's layout before anything starts: one split's files by class, and a check that each one
opens as an image, so that a bad file stops the run at load time (or is skipped) instead of in the middle of
training.

Listing uses ``os.scandir`` (the file type comes with the directory entry: no ``stat`` per file) and keeps paths as
strings; the check reads each file's header with Pillow, in parallel processes for large folders. A file whose header
opens but whose data is truncated is still found only when it is decoded, and named then.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from edgedistill.base.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CHUNK = 2048  # files a worker checks at a time
PARALLEL_FROM = 8192  # below this many files, starting processes costs more than it saves


def list_split(split_dir: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """The image files of ``split_dir/<class>/`` in class order, sorted within a class, and their labels."""
    if not split_dir.is_dir():
        raise InputError(f"data.root: {split_dir} is missing (expected class folders inside)")
    with os.scandir(split_dir) as entries:
        extra = sorted(e.name for e in entries if e.is_dir() and e.name not in classes)
    if extra:
        raise InputError(f"data.root: {split_dir} has class folders not in train/: {', '.join(extra[:5])}")
    paths: list[str] = []
    counts = []
    for name in classes:
        folder = split_dir / name
        files = _files(folder) if folder.is_dir() else []
        if not files:
            raise InputError(f"data.root: {folder} has no images")
        paths += files
        counts.append(len(files))
    return paths, np.repeat(np.arange(len(classes), dtype=np.int64), counts)


def _files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
    for name in names:
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"data.root: {folder / name} is not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def check_headers(paths: list[str], workers: int | None = None) -> tuple[dict[int, str], int]:
    """``({index: why}, not_rgb)``: the files Pillow cannot open as an image, and how many are not RGB (grayscale,
    RGBA, palette: converted when read)."""
    chunks = [(i, paths[i:i + CHUNK]) for i in range(0, len(paths), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))  # sched_getaffinity is Linux-only
    if len(paths) < PARALLEL_FROM or workers < 2:
        results = [_check_chunk(c) for c in chunks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_check_chunk, chunks))
    bad: dict[int, str] = {}
    for b, _ in results:
        bad |= b
    return bad, sum(n for _, n in results)


def _check_chunk(chunk: tuple[int, list[str]]) -> tuple[dict[int, str], int]:
    from PIL import Image, UnidentifiedImageError

    start, paths = chunk
    bad, not_rgb = {}, 0
    for i, p in enumerate(paths, start):
        try:
            with Image.open(p) as im:  # the header only
                not_rgb += im.mode != "RGB"
        except (UnidentifiedImageError, OSError) as e:
            bad[i] = f"not a readable image ({e})"
    return bad, not_rgb
