"""Deployment preprocessing: the ONNX metadata records the exact evaluation preprocessing, and the snippet in
docs/deploy.md, run verbatim, reproduces validation's inputs pixel for pixel and its fp32 top-1 exactly."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY
from PIL import Image, ImageDraw

from edgedistill.cli import cli
from edgedistill.data.loading import ImageDataset, eval_arrays
from edgedistill.data.sources import Split, load_data
from edgedistill.recipe.schema import DataConfig
from edgedistill.deploy.targets import onnx_metadata, read_metadata
from edgedistill.data.transforms import CROP_RATIO, SMALL_IMAGE, _resize, eval_preprocessing, eval_transform

DEPLOY_MD = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"

pytestmark = pytest.mark.usefixtures("isolated")


def snippet_source() -> str:
    """The fenced python block right after the ``<!-- deploy-snippet`` marker in docs/deploy.md, verbatim."""
    m = re.search(r"<!-- deploy-snippet[^\n]*-->\n```python\n(.*?)\n```", DEPLOY_MD.read_text(), re.DOTALL)
    assert m, "docs/deploy.md lost its <!-- deploy-snippet --> block"
    return m.group(1)


def snippet() -> dict:
    namespace = {"__name__": "deploy_snippet"}  # not "__main__": define, do not run the command line part
    exec(compile(snippet_source(), str(DEPLOY_MD), "exec"), namespace)  # noqa: S102 - the documented code itself
    return namespace


def meta_for(size) -> dict[str, str]:
    return onnx_metadata(["a", "b"], size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "digest")


# ---------------------------------------------------------------- the description


@pytest.mark.parametrize("size", [8, 16, 32, SMALL_IMAGE])
def test_small_inputs_resize_exactly(size):
    p = eval_preprocessing(size)
    assert p["resize"] == "exact" and p["resize_to"] == [size, size] and p["crop"] == "none"
    assert p["interpolation"] == "bilinear" and "Pillow" in p["resampler"]


@pytest.mark.parametrize("size, shorter", [(SMALL_IMAGE + 1, 74), (72, 82), (96, 110), (224, 256), ((72, 96), 110)])
def test_larger_inputs_resize_the_shorter_side_and_centre_crop(size, shorter):
    p = eval_preprocessing(size)
    h, w = size if isinstance(size, tuple) else (size, size)
    assert p["resize"] == "shorter_side" and p["shorter_side"] == shorter == round(max(h, w) / CROP_RATIO)
    assert p["crop"] == "center" and p["crop_size"] == [h, w] and p["crop_ratio"] == 0.875
    assert json.loads(json.dumps(p)) == p  # JSON-ready


def test_small_can_be_forced_either_way():
    assert eval_preprocessing(224, small=True)["resize"] == "exact"
    assert eval_preprocessing(32, small=False)["resize"] == "shorter_side"


@pytest.mark.parametrize("size", [16, 72, 224])
def test_metadata_records_the_preprocessing(size):
    meta = meta_for(size)
    assert json.loads(meta["preprocessing"]) == eval_preprocessing(size)
    assert all(isinstance(v, str) for v in meta.values())


def test_eval_rule_depends_on_the_model_input_only():
    """A large source image evaluated at a small model size is resized to H×W (no crop), as the metadata says."""
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
    split = Split(np.zeros(1, np.int64), images=big[None])
    got = ImageDataset(split, 32, train=False)[0][0]
    assert torch.equal(got, _resize(torch.from_numpy(big).permute(2, 0, 1), 32))
    assert torch.equal(got, eval_transform(torch.from_numpy(big).permute(2, 0, 1), 32))


def test_resize_is_pillow_bilinear():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for h, w in [(16, 16), (80, 100), (37, 20)]:
        want = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
        got = _resize(torch.from_numpy(img).permute(2, 0, 1), (h, w)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- the snippet, image by image


SOURCES = [(10, 12), (32, 32), (64, 48), (90, 120), (120, 90), (73, 73), (300, 200), (50, 200), (257, 256)]  # (h, w)


@pytest.mark.parametrize("size", [8, 16, 32, 64, 65, 72, 96, 224])
def test_snippet_preprocess_equals_validation_pixel_for_pixel(tmp_path, size):
    """Up- and downscaling, square and not, both rules; grayscale and palette files too."""
    rng = np.random.default_rng(size)
    paths = []
    for k, (h, w) in enumerate(SOURCES):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if k == 1:
            im = im.convert("L")
        elif k == 2:
            im = im.convert("P")
        paths.append(tmp_path / f"{k}.png")
        im.save(paths[-1])
    want, _ = eval_arrays(Split(np.zeros(len(paths), np.int64), paths=paths), size)
    got = np.stack([snippet()["preprocess"](p, meta_for(size)) for p in paths])
    assert got.dtype == np.float32 and got.shape == (len(paths), 3, size, size)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- end to end


COLORS = [(220, 40, 40), (40, 180, 60), (50, 70, 220)]


def shape_image(label: int, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Class 0 a red disc, 1 a green square, 2 a blue triangle, at a random place on a noisy background."""
    bg = rng.integers(90, 170, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    r = int(rng.integers(min(w, h) // 6, min(w, h) // 3))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    color = tuple(int(c + v) for c, v in zip(COLORS[label], rng.integers(-25, 26, 3)))
    if label == 0:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif label == 1:
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return im


def make_imagefolder(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(["disc", "square", "triangle"]):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                w, h = (96, 80) if i % 2 else (120, 90)  # neither square nor the model size: the crop matters
                shape_image(label, w, h, rng).save(root / split / name / f"{i:02d}.png")


def test_documented_snippet_reproduces_the_validated_fp32_top1(tmp_path, monkeypatch):
    """A 72-px ImageFolder run (images 120×90 and 96×80: the shorter-side resize and the centre crop both act),
    then the docs snippet, verbatim, on the test images: the same input tensors and the same fp32 top-1."""
    root = tmp_path / "shapes"
    make_imagefolder(root, {"train": 12, "test": 8})
    raw = copy.deepcopy(TINY)
    raw["name"] = "shapes"
    raw["data"] = {"source": "imagefolder", "root": str(root), "image_size": 72, "batch_size": 4, "eval_batch_size": 32}
    for section in (raw["teacher"]["train"], raw["distill"]):  # enough steps to beat chance (about 80 %)
        section["epochs"], section["optimizer"] = 6, {"lr": 0.02}
    raw["validate"] = {"latency_runs": 2, "threads": 1, "parity_batches": [1, 2], "throughput_batch": 32, "rounds": 3, "seconds": 0.05}
    recipe = tmp_path / "shapes.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").rglob("validation.json")).parent  # the run folder, wherever --out places it
    validated = json.loads((run / "validation.json").read_text())["variants"]["fp32"]["test_top1"]
    meta = read_metadata(run / "student.onnx")
    assert json.loads(meta["preprocessing"]) == eval_preprocessing(72) and eval_preprocessing(72)["resize"] == "shorter_side"

    classes = sorted(p.name for p in (root / "train").iterdir())
    paths = [p for c in classes for p in sorted((root / "test" / c).iterdir())]
    labels = np.array([classes.index(p.parent.name) for p in paths])
    code = snippet()
    # the snippet's inputs are validation's, bit for bit (validation used load_data → eval_arrays on the same files)
    want, want_labels = eval_arrays(load_data(DataConfig(source="imagefolder", root=root, image_size=72)).test, 72)
    np.testing.assert_array_equal(want_labels, labels)
    np.testing.assert_array_equal(np.stack([code["preprocess"](p, meta) for p in paths]), want)

    monkeypatch.chdir(run)  # the snippet's default model is "student.onnx" in the current folder
    logits, names = code["classify"](paths)
    assert names == classes
    correct = int((np.asarray(logits).argmax(1) == labels).sum())
    assert round(100.0 * correct / len(paths), 4) == validated, (correct, len(paths), validated)
