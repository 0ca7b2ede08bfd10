"""``edgedistill predict``: the top-k classes of image files under an exported model, each image prepared the way
the model's ``preprocessing`` metadata records (the way validation prepared the test images).

:func:`preprocess` and :func:`classify` are the code docs/deploy.md shows for deployment, character for character
(``tests/test_predict.py`` checks it), so the command and a deployment that copies the docs compute the same thing.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from edgedistill.base.errors import InputError, first_line
from edgedistill.base.fsio import write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIELDS = ("image", "rank", "class", "index", "probability", "error")


def preprocess(path, meta):
    """One image file -> float32 (3, H, W), RGB in [0, 1]: exactly what validation fed the model."""
    p = json.loads(meta["preprocessing"])
    img = Image.open(path).convert("RGB")
    if p["resize"] == "exact":  # inputs of at most 64 px: resize to H x W
        h, w = p["resize_to"]
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    else:  # "shorter_side": resize the shorter side to p["shorter_side"], then a "center" crop
        h, w = p["crop_size"]
        scale = p["shorter_side"] / min(img.height, img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.Resampling.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # no mean/std: inside the model


def classify(paths, model="student.onnx", batch=32):
    """Logits (N, num_classes) of the image files, and the class names."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    logits = [sess.run(["logits"], {"input": np.stack([preprocess(p, meta) for p in paths[i:i + batch]])})[0]
              for i in range(0, len(paths), batch)]
    return np.concatenate(logits), json.loads(meta["class_names"])


# ---------------------------------------------------------------- the command


def image_files(target: Path) -> list[Path]:
    """``target`` itself, or the image files in the folder ``target`` and its sub-folders (sorted by path)."""
    target = Path(target)
    if target.is_file():
        return [target]
    files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{target}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or its sub-folders")
    return files


def open_model(model: Path, batch: int) -> tuple[int, list[str]]:
    """``batch`` (or the model's own batch size when its input has a fixed one: the batch-1 edge files) and the
    model's class names; checks on the way that the file loads and records its preprocessing."""
    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - what ORT says about the file is the message
        raise InputError(f"{model}: not a loadable ONNX / ORT model ({first_line(e)})") from None
    meta = sess.get_modelmeta().custom_metadata_map
    missing = [k for k in ("preprocessing", "class_names") if k not in meta]
    if missing:
        raise InputError(f"{model}: no {' / '.join(missing)} metadata; predict takes the files edgedistill exports")
    first = sess.get_inputs()[0].shape[0]
    return (first if isinstance(first, int) and first > 0 else batch), json.loads(meta["class_names"])


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None. A full decode: a truncated file passes PIL's header check."""
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"not a readable image ({first_line(e)})"
    return None


def predict(model: Path, target: Path, *, top_k: int = 5, batch: int = 32) -> list[dict]:
    """One row per image and rank: ``{"image", "rank", "class", "index", "probability"}``; an image that cannot be
    read is one row ``{"image", "error"}``, and the others are classified all the same."""
    files = image_files(target)
    batch, _ = open_model(model, batch)
    errors = {f: why for f in files if (why := unreadable(f))}
    good = [f for f in files if f not in errors]
    rows = [] if not good else _ranked(good, model, batch, top_k)
    rows += [{"image": str(f), "error": why} for f, why in errors.items()]
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: (order[r["image"]], r.get("rank", 0)))


def _ranked(files: list[Path], model: Path, batch: int, top_k: int) -> list[dict]:
    logits, classes = classify([str(f) for f in files], model=str(model), batch=batch)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return [{"image": str(f), "rank": rank, "class": classes[i], "index": int(i), "probability": round(float(p[i]), 6)}
            for f, p in zip(files, probs) for rank, i in enumerate(np.argsort(-p, kind="stable")[:top_k], start=1)]


def folder_top1(rows: list[dict], target: Path, classes: list[str]) -> dict[str, tuple[int, int]] | None:
    """Per class, (right, images) of the top-1 answers when ``target`` is laid out as class folders (every image in
    a first-level sub-folder named after one of the model's classes); None otherwise."""
    target = Path(target)
    if target.is_file():
        return None
    top1 = [r for r in rows if r.get("rank") == 1]
    labels = [Path(r["image"]).relative_to(target).parts for r in top1]
    if not top1 or any(len(parts) < 2 or parts[0] not in classes for parts in labels):
        return None
    counts: dict[str, tuple[int, int]] = {}
    for r, parts in zip(top1, labels):
        right, total = counts.get(parts[0], (0, 0))
        counts[parts[0]] = (right + (r["class"] == parts[0]), total + 1)
    return dict(sorted(counts.items()))


def summary_lines(counts: dict[str, tuple[int, int]]) -> list[str]:
    right, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    return ([f"top-1 by class folder: {100 * right / total:.2f}% ({right}/{total})"]
            + [f"  {name}: {100 * r / n:.2f}% ({r}/{n})" for name, (r, n) in counts.items()])


def run(model: Path, target: Path, *, top_k: int, batch: int, fmt: str, output: Path | None, say) -> None:
    """The command: write the rows, ``say`` (a line printer for the terminal) the per-class top-1 when the images
    sit in class folders, and end with an :class:`InputError` when some image could not be classified (exit 2,
    after the others' rows are written)."""
    rows = predict(model, target, top_k=top_k, batch=batch)
    write(render(rows, fmt), output)
    counts = folder_top1(rows, target, open_model(model, batch)[1])
    for line in summary_lines(counts) if counts else ():
        say(line)
    failed = [r for r in rows if "error" in r]
    if failed:
        images = len({r["image"] for r in rows})
        raise InputError(f"{len(failed)} of {images} images could not be classified (their rows say why): "
                         f"{failed[0]['image']}: {failed[0]['error']}")


def render(rows: list[dict], fmt: str) -> str:
    """``csv`` (a header and one line per row), ``json`` (a list of rows) or ``table`` (one line per image)."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    lines: dict[str, list[str]] = {}
    for r in rows:
        lines.setdefault(r["image"], []).append(f"error: {r['error']}" if "error" in r else f"{r['class']} {r['probability']:.3f}")
    return "".join(f"{image}  {'  '.join(top)}\n" for image, top in lines.items())


def write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(Path(output), text)
