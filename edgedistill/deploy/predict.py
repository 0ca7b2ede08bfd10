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
FIELDS = ("image", "rank", "class", "index", "probability")


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
    """``target`` itself, or the image files directly in the folder ``target`` (sorted by name)."""
    target = Path(target)
    if target.is_file():
        return [target]
    files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{target}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def model_batch(model: Path, batch: int) -> int:
    """``batch``, or the model's own batch size when its input has a fixed one (the batch-1 edge files); checks
    on the way that the file loads and records its preprocessing."""
    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - what ORT says about the file is the message
        raise InputError(f"{model}: not a loadable ONNX / ORT model ({first_line(e)})") from None
    missing = [k for k in ("preprocessing", "class_names") if k not in sess.get_modelmeta().custom_metadata_map]
    if missing:
        raise InputError(f"{model}: no {' / '.join(missing)} metadata; predict takes the files edgedistill exports")
    first = sess.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else batch


def predict(model: Path, target: Path, *, top_k: int = 5, batch: int = 32) -> list[dict]:
    """One row per image and rank: ``{"image", "rank", "class", "index", "probability"}``."""
    files = image_files(target)
    batch = model_batch(model, batch)
    for f in files:
        try:
            Image.open(f).verify()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{f}: not a readable image ({first_line(e)})") from None
    logits, classes = classify([str(f) for f in files], model=str(model), batch=batch)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    rows = []
    for f, p in zip(files, probs):
        for rank, i in enumerate(np.argsort(-p, kind="stable")[:top_k], start=1):
            rows.append({"image": str(f), "rank": rank, "class": classes[i], "index": int(i), "probability": round(float(p[i]), 6)})
    return rows


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
        lines.setdefault(r["image"], []).append(f"{r['class']} {r['probability']:.3f}")
    return "".join(f"{image}  {'  '.join(top)}\n" for image, top in lines.items())


def write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(Path(output), text)
