"""recipes/imagenet-energy-kd.yaml runs end to end on a tiny ImageNet-layout folder (1,000 class folders, train/ and
val/, JPEG files of assorted sizes) with a ResNet-50 teacher file in torchvision's own format: the recipe's data
layout, teacher loading and normalisation are the ones a user with ImageNet gets; only the size is cut down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from edgedistill.base.fsio import sha256

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000


def imagenet_layout(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            h, w = rng.integers(24, 48, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{split}_{c}.JPEG", quality=80)


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    imagenet_layout(tmp / "imagenet")
    torch.manual_seed(0)
    weights = tmp / "resnet50-0676ba61.pth"  # what torch.hub saves: a plain state_dict of 1,000 classes
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    sets = [f"data.root={tmp / 'imagenet'}", f"teacher.path={weights}", "device=cpu", "data.image_size=32",
            "data.train_limit=128", "data.test_limit=128", "data.batch_size=32", "data.eval_batch_size=64", "data.num_workers=0",
            "distill.epochs=1", "distill.schedule={name: constant}", "augment.profile_steps=1", "teacher.runtime=torch",
            "teacher.allow_weak=true", "validate.allow_weak=true", "export.formats=[fp32]",  # an untrained teacher is at chance
            "validate.rounds=3", "validate.seconds=0.1", "validate.parity_batches=[1, 2]"]
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgedistill", "run", str(ROOT / "recipes" / "imagenet-energy-kd.yaml"), "--out", str(tmp / "runs"), *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, weights, tmp / "runs" / "imagenet-energy-kd"


def test_the_imagenet_recipe_runs_on_the_imagenet_layout(imagenet_run):
    _, _, run = imagenet_run
    val = json.loads((run / "validation.json").read_text())
    assert val["settings"]["test_images"] == 128 and val["variants"]["fp32"]["passed"]
    assert json.loads((run / "energy.json").read_text())["groups"]["high"]["size"] > 0
    assert (run / "report.md").exists()


def test_the_teacher_is_torchvisions_own_file_with_its_normalisation(imagenet_run):
    _, weights, run = imagenet_run
    teacher = json.loads((run / "teacher.json").read_text())
    assert (teacher["source"], teacher["arch"], teacher["num_classes"]) == ("torchvision", "resnet50", CLASSES)
    assert teacher["file_sha256"] == sha256(weights)
    assert teacher["parameters"] == sum(p.numel() for p in torchvision.models.resnet50().parameters())
