"""Data sources, subsets, students and teachers on tiny inputs.

* every registered data source: digits (bundled), npz, cifar10 / cifar100 (torchvision's on-disk pickle
  format, written here), imagefolder (PNGs written here), with grayscale / RGBA / palette conversion;
* the long-tail profile and the size limits;
* every registered student: forward + backward at 16 px, small-input stem on and off;
* every teacher source that loads a file (torchvision state_dict, TorchScript, torch.export .pt2, ONNX):
  (B, K) logits equal to the original model's, and frozen.

CIFAR: torchvision checks the md5 of every file against the official release, which synthetic files
cannot satisfy; ``synthetic_cifar_ok`` monkeypatches ``torchvision.datasets.cifar.check_integrity`` to
return True for those tests (and one test shows that, without it, the files are rejected cleanly).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from edgedistill.data.sources import DATA_SOURCES, Split, limit_indices, load_data, long_tail_indices
from edgedistill.data.loading import ImageDataset
from edgedistill.base.errors import InputError
from edgedistill.models import timm_zoo
from edgedistill.models.students import STUDENTS, Normalized, build_student, build_classifier
from edgedistill.models.teachers import TEACHERS, load_teacher
from edgedistill.recipe.schema import DataConfig, TeacherConfig


pytestmark = pytest.mark.usefixtures("isolated")


@contextlib.contextmanager
def logged_warnings():
    """Records of the 'edgedistill' logger (it does not propagate to the root, so caplog misses them)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger, handler = logging.getLogger("edgedistill"), Keep(logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(old_level or logging.WARNING, logging.WARNING))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def messages(records) -> str:
    return " | ".join(r.getMessage() for r in records)


# ---------------------------------------------------------------- data sources


def test_every_registered_source_is_tested_here():
    assert set(DATA_SOURCES.names()) == {"digits", "npz", "cifar10", "cifar100", "imagefolder"}


def test_digits():
    b = load_data(DataConfig(source="digits"))
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert len(b.train) + len(b.test) == 1797
    assert b.train.images.shape[1:] == (8, 8, 3) and b.train.images.dtype == np.uint8
    assert b.image_size == 8
    for c in range(10):  # the fixed 80/20 split is per class
        n_test, n_all = (b.test.labels == c).sum(), (b.test.labels == c).sum() + (b.train.labels == c).sum()
        assert n_test == n_all // 5
    assert all(0 < s for s in b.std) and all(0 <= m <= 1 for m in b.mean)


def write_npz(path: Path, x_train, y_train, x_test, y_test, **extra) -> Path:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def rgb(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_with_class_names(tmp_path):
    p = write_npz(tmp_path / "d.npz", rgb(12), np.arange(12) % 3, rgb(6, seed=1), np.arange(6) % 3, class_names=np.array(["a", "b", "c"]))
    b = load_data(DataConfig(source="npz", root=p))
    assert b.class_names == ["a", "b", "c"] and b.source == "npz"
    assert len(b.train) == 12 and len(b.test) == 6
    np.testing.assert_array_equal(b.train.images, np.load(p)["x_train"])


@pytest.mark.parametrize(
    "layout, make, warning",
    [
        ("grayscale NHW", lambda x: x[..., 0], "grayscale"),
        ("grayscale NHW1", lambda x: x[..., :1], "grayscale"),
        ("RGBA", lambda x: np.concatenate([x, np.full(x.shape[:3] + (1,), 255, np.uint8)], -1), "RGBA"),
        ("NCHW", lambda x: x.transpose(0, 3, 1, 2), None),
    ],
)
def test_npz_layouts_are_converted(layout, make, warning, tmp_path):
    x_train, x_test = rgb(8), rgb(4, seed=1)
    p = write_npz(tmp_path / "d.npz", make(x_train), np.arange(8) % 2, make(x_test), np.arange(4) % 2)
    with logged_warnings() as records:
        b = load_data(DataConfig(source="npz", root=p))
    assert b.train.images.shape == (8, 8, 8, 3) and b.train.images.dtype == np.uint8
    if warning:
        assert warning in messages(records)
    else:
        np.testing.assert_array_equal(b.train.images, x_train)
        assert not records
    if layout.startswith("grayscale"):
        np.testing.assert_array_equal(b.train.images[..., 0], b.train.images[..., 2])


# -- CIFAR in torchvision's format


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: Path, kind: str, n_train: int = 10, n_test: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The files torchvision.datasets.CIFAR10 / CIFAR100 read, with random 32x32 images; returns (x_train, x_test)."""
    rng = np.random.default_rng(0)
    k = 10 if kind == "cifar10" else 100
    x_train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    y_train, y_test = list(np.arange(n_train) % k), list(np.arange(n_test) % k)
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(chunks, start=1):
            _pickle(folder / f"data_batch_{i}", {"data": x_train[idx].reshape(len(idx), -1), "labels": [y_train[j] for j in idx]})
        _pickle(folder / "test_batch", {"data": x_test.reshape(n_test, -1), "labels": y_test})
        _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(k)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _pickle(folder / "train", {"data": x_train.reshape(n_train, -1), "fine_labels": y_train, "coarse_labels": [0] * n_train})
        _pickle(folder / "test", {"data": x_test.reshape(n_test, -1), "fine_labels": y_test, "coarse_labels": [0] * n_test})
        _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(k)], "coarse_label_names": ["c"]})
    return x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)


@pytest.fixture
def synthetic_cifar_ok(monkeypatch):
    """torchvision md5-checks every CIFAR file against the official release: accept our synthetic ones."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("kind, k, first", [("cifar10", 10, "class0"), ("cifar100", 100, "fine0")])
def test_cifar_sources(kind, k, first, tmp_path, synthetic_cifar_ok):
    x_train, x_test = write_cifar(tmp_path, kind)
    b = load_data(DataConfig(source=kind, root=tmp_path))
    assert b.num_classes == k and b.class_names[0] == first and b.source == kind
    np.testing.assert_array_equal(b.train.images, x_train)  # HWC, in file order over the batches
    np.testing.assert_array_equal(b.test.images, x_test)
    assert b.image_size == 32
    assert list(b.train.labels) == list(np.arange(10) % k)


def test_cifar_files_failing_torchvisions_check_are_an_input_error(tmp_path):
    write_cifar(tmp_path, "cifar10")  # no monkeypatch: the md5 check fails
    with pytest.raises(InputError, match="cannot read the CIFAR10 files.*corrupt"):
        load_data(DataConfig(source="cifar10", root=tmp_path))


def test_cifar_missing_files_are_named(tmp_path):
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(InputError, match=r"cifar-100-python lacks test \("):
        load_data(DataConfig(source="cifar100", root=tmp_path))


# -- imagefolder


def test_imagefolder_reads_converts_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("dog", "cat"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / split / c / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(tmp_path / "train" / "dog" / "palette.png")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"hidden files are skipped")
    with logged_warnings() as records:
        b = load_data(DataConfig(source="imagefolder", root=tmp_path, image_size=16))
    assert b.class_names == ["cat", "dog"]  # sorted folder names
    assert list(b.train.labels) == [0, 0, 1, 1, 1] and list(b.test.labels) == [0, 1]
    assert b.image_size == 16
    assert "3 images are not RGB" in messages(records)
    for train in (True, False):
        ds = ImageDataset(b.train, 16, train=train, seed=0)
        for i in range(len(ds)):
            img, label, index = ds[i]
            assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and index == i
    gray = ImageDataset(b.train, 16, train=False)[[Path(p).name for p in b.train.paths].index("gray.png")][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("size", [16, 96])  # the small-image (pad+crop) and the large-image (resized crop) recipe
def test_hflip_off_never_mirrors_and_keeps_the_crops(size):
    """A left-to-right ramp is never mirrored without hflip; with it, about half the samples are, and every
    unmirrored sample is the same crop either way (the random stream is not shifted)."""
    ramp = np.broadcast_to(np.linspace(0, 255, size).astype(np.uint8)[None, :, None], (size, size, 3))
    split = Split(np.zeros(64, np.int64), np.repeat(ramp[None], 64, axis=0))
    on, off = ImageDataset(split, size, train=True, seed=1), ImageDataset(split, size, train=True, seed=1, hflip=False)
    mirrored = 0
    for i in range(64):
        a, b = on[i][0].float(), off[i][0].float()
        assert b[:, :, : size // 2].mean() < b[:, :, size // 2 :].mean()  # the bright side stays on the right
        if torch.equal(a, b):
            continue
        assert torch.equal(a, b.flip(-1))
        mirrored += 1
    assert 16 < mirrored < 48


def _folder_with_bad_files(root: Path) -> None:
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    (root / "train" / "b" / "1.png").write_text("not an image")
    (root / "test" / "a" / "2.png").write_bytes(b"")


def test_an_unreadable_image_stops_the_load_naming_it_and_counting_the_rest(tmp_path):
    _folder_with_bad_files(tmp_path)
    with pytest.raises(InputError, match=r"train/b/1\.png is not a readable image .*data\.on_bad_image: skip") as e:
        load_data(DataConfig(source="imagefolder", root=tmp_path, image_size=8))
    assert "and 1 more" not in str(e.value)  # the test split's file belongs to the test split's scan
    (tmp_path / "train" / "a" / "0.png").write_text("not an image either")
    with pytest.raises(InputError, match=r"train/a/0\.png is not a readable image .*\(and 1 more in .*train\)"):
        load_data(DataConfig(source="imagefolder", root=tmp_path, image_size=8))


def test_on_bad_image_skip_leaves_the_files_out_and_lists_them(tmp_path):
    _folder_with_bad_files(tmp_path)
    b = load_data(DataConfig(source="imagefolder", root=tmp_path, image_size=8, on_bad_image="skip"))
    assert [s["path"] for s in b.skipped] == [str(tmp_path / "train" / "b" / "1.png"), str(tmp_path / "test" / "a" / "2.png")]
    assert all("not a readable image" in s["why"] for s in b.skipped)
    assert list(b.train.labels) == [0, 0, 0, 1, 1] and list(b.test.labels) == [0, 0, 1, 1, 1]
    assert str(tmp_path / "train" / "b" / "1.png") not in b.train.paths
    for i in range(len(b.train)):  # what is left reads
        assert ImageDataset(b.train, 8, train=False)[i][0].shape == (3, 8, 8)


def test_the_report_lists_the_skipped_files():
    from edgedistill.pipeline.report import _checks_section

    skipped = [{"path": f"/data/train/a/{i}.png", "why": "not a readable image"} for i in range(4)]
    table = "\n".join(_checks_section(None, None, None, skipped))
    assert "| unreadable images left out | 4 (`0.png`; `1.png`; `2.png` …; all in skipped_images.json) | ⚠️ data.on_bad_image: skip |" in table
    assert _checks_section(None, None, None, []) == []


def test_on_bad_image_is_refused_for_a_source_without_image_files():
    with pytest.raises(ValueError, match="on_bad_image: would be ignored: data source 'digits' reads no image files"):
        DataConfig(source="digits", on_bad_image="skip")


def test_the_parallel_header_check_finds_what_the_sequential_one_does(tmp_path, monkeypatch):
    from edgedistill.data import folder_scan

    _folder_with_bad_files(tmp_path)
    (tmp_path / "train" / "a" / "gray.png").unlink(missing_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "a" / "gray.png")
    paths, _ = folder_scan.list_split(tmp_path / "train", ["a", "b"])
    one = folder_scan.check_headers(paths, workers=1)
    monkeypatch.setattr(folder_scan, "CHUNK", 2)
    monkeypatch.setattr(folder_scan, "PARALLEL_FROM", 0)
    bad = paths.index(str(tmp_path / "train" / "b" / "1.png"))
    assert list(one[0]) == [bad] and one[1] == 1  # the text file; the grayscale image
    assert folder_scan.check_headers(paths, workers=2) == one


def test_imagefolder_default_image_size_is_224(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / "a" / "x.png")
    assert load_data(DataConfig(source="imagefolder", root=tmp_path)).image_size == 224


# ---------------------------------------------------------------- subsets


def balanced_npz(tmp_path, per_class=50, classes=10, per_class_test=5) -> Path:
    y_train = np.repeat(np.arange(classes), per_class)
    y_test = np.repeat(np.arange(classes), per_class_test)
    return write_npz(tmp_path / "bal.npz", rgb(len(y_train)), y_train, rgb(len(y_test), seed=1), y_test)


@pytest.mark.parametrize("imbalance", [10.0, 100.0])
def test_long_tail_profile(imbalance, tmp_path):
    p = balanced_npz(tmp_path)
    full = load_data(DataConfig(source="npz", root=p))
    lt = load_data(DataConfig(source="npz", root=p, long_tail={"imbalance": imbalance}), seed=3)
    counts = np.bincount(lt.train.labels, minlength=10)
    expected = [max(1, int(50 * imbalance ** (-c / 9))) for c in range(10)]
    assert counts.tolist() == expected
    assert counts[0] == 50 and counts[-1] == max(1, int(50 / imbalance))
    np.testing.assert_array_equal(lt.test.labels, full.test.labels)  # the test split is untouched
    np.testing.assert_array_equal(lt.test.images, full.test.images)
    assert any("long-tail" in n for n in lt.notes)
    # the split is data: the same images for every run seed, another cut with long_tail.seed
    other_run = load_data(DataConfig(source="npz", root=p, long_tail={"imbalance": imbalance}), seed=4)
    np.testing.assert_array_equal(other_run.train.images, lt.train.images)
    other_cut = load_data(DataConfig(source="npz", root=p, long_tail={"imbalance": imbalance, "seed": 1}), seed=3)
    assert np.bincount(other_cut.train.labels, minlength=10).tolist() == expected
    assert not np.array_equal(other_cut.train.images, lt.train.images)


def test_long_tail_keeps_images_of_their_class():
    labels = np.repeat(np.arange(4), 20)
    keep = long_tail_indices(labels, 4.0, 4, seed=0)
    assert np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [20, int(20 * 4 ** (-1 / 3)), int(20 * 4 ** (-2 / 3)), 5]


def test_limits_are_class_stratified(tmp_path):
    b = load_data(DataConfig(source="digits", train_limit=64, test_limit=30), seed=1)
    assert len(b.train) == 64 and len(b.test) == 30
    for split in (b.train, b.test):
        counts = np.bincount(split.labels, minlength=10)
        assert counts.max() - counts.min() <= 1
    assert limit_indices(np.arange(5) % 2, 10, seed=0).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- students


def _stem_stride(net: nn.Module) -> tuple[int, int]:
    inner = net.net
    conv = inner.conv1[0] if hasattr(inner, "conv1") else inner.features[0][0]
    return conv.stride


@pytest.mark.parametrize("small_input", [True, False], ids=["small-stem", "imagenet-stem"])
@pytest.mark.parametrize("arch", STUDENTS.names())
def test_student_forward_backward_at_16px(arch, small_input):
    torch.manual_seed(0)
    net = build_student(arch, 7, image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), small_input=small_input)
    assert _stem_stride(net) == ((1, 1) if small_input else (2, 2))
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4) % 7
    out = net.train()(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in params)
    assert any(p.grad.abs().sum() > 0 for _, p in params)
    assert net.eval()(x[:1]).shape == (1, 7)  # a single image in eval mode
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(m.momentum == 0.1 for m in bn)


def test_student_auto_stem_and_width():
    assert _stem_stride(build_student("mobilenet_v2", 3, image_size=32, mean=(0.5,) * 3, std=(0.2,) * 3)) == (1, 1)
    assert _stem_stride(build_student("mobilenet_v2", 3, image_size=96, mean=(0.5,) * 3, std=(0.2,) * 3)) == (2, 2)
    half = build_student("mobilenet_v2", 3, image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3, width=0.5)
    full = build_student("mobilenet_v2", 3, image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(InputError, match="student.width"):
        build_student("shufflenet_v2_x0_5", 3, image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3, width=0.5)


# ---------------------------------------------------------------- teachers

K, SIZE = 7, 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the data statistics a teacher trained here would get


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        return self.fc(self.body(x))


def lively(net: nn.Module) -> nn.Module:
    """Non-trivial BN running statistics, then eval mode."""
    torch.manual_seed(0)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 3, SIZE, SIZE) * 2)
    return net.eval()


def onnx_gap_gemm(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    """An ONNX classifier built by hand: global average pool → flatten → Gemm (dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])],
        [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what any ONNX Runtime ≥ 1.14 reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict:
    """source → (TeacherConfig kwargs, reference function x → logits)."""
    d = tmp_path_factory.mktemp("teachers")
    x = torch.rand(2, 3, SIZE, SIZE)
    out: dict = {}

    tv = lively(build_classifier("resnet18", K, image_size=SIZE))
    torch.save(tv.state_dict(), d / "resnet18.pt")
    out["torchvision"] = ({"arch": "resnet18", "path": d / "resnet18.pt"}, tv)

    cnn = lively(TinyCNN())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(cnn, x).save(str(d / "tiny.ts"))
    out["torchscript"] = ({"path": d / "tiny.ts"}, cnn)

    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(cnn, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, d / "tiny.pt2")
    out["export"] = ({"path": d / "tiny.pt2"}, cnn)

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(K, 3)), rng.normal(size=K)
    onnx_gap_gemm(d / "tiny.onnx", w, b)
    out["onnx"] = ({"path": d / "tiny.onnx"}, lambda t: t.mean((2, 3)) @ torch.from_numpy(w).float().T + torch.from_numpy(b).float())

    if timm_zoo.installed():  # normalised as its pretrained configuration says, unless the recipe says otherwise
        import timm

        net = lively(timm.create_model("lcnet_050", pretrained=False, num_classes=K))
        torch.save(net.state_dict(), d / "lcnet_050.pth")
        cfg = timm.get_pretrained_cfg("lcnet_050")
        out["timm"] = ({"arch": "lcnet_050", "path": d / "lcnet_050.pth"}, Normalized(net, cfg.mean, cfg.std))
    return out


def test_every_file_teacher_source_is_tested_here(teacher_files):
    assert set(TEACHERS.names()) - {"train"} - ({"timm"} if not timm_zoo.installed() else set()) == set(teacher_files)


@pytest.mark.parametrize("source", ["torchvision", "torchscript", "export", "onnx",
                                    *(["timm"] if timm_zoo.installed() else [])])
def test_teacher_sources_load_frozen_and_match_the_original(source, teacher_files):
    kwargs, reference = teacher_files[source]
    net = load_teacher(TeacherConfig(source=source, **kwargs), K, SIZE, MEAN, STD)
    x = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, expected = net(x), reference(x)
    assert logits.shape == (5, K) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # frozen: evaluation mode (BN running statistics) and no gradients
    assert not net.training
    if source != "export":  # an exported graph has no train/eval switch; its mode was fixed at export
        assert not any(m.training for m in net.modules())
    assert all(not p.requires_grad for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(net(x), logits), "deterministic: no dropout, no BN update"
    assert net(x[:1]).shape == (1, K)


def test_teacher_normalize_is_applied_inside(teacher_files):
    kwargs, cnn = teacher_files["torchscript"]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    net = load_teacher(TeacherConfig(source="torchscript", normalize={"mean": mean, "std": std}, **kwargs), K, SIZE, MEAN, STD)
    x = torch.rand(3, 3, SIZE, SIZE)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), cnn(normalized), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "module-prefix", "model-key"])
def test_torchvision_state_dict_wrappers(wrap, teacher_files, tmp_path):
    kwargs, tv = teacher_files["torchvision"]
    state = tv.state_dict()
    if wrap == "module-prefix":  # saved from DistributedDataParallel
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "model-key":  # an edgedistill / training-script checkpoint
        state = {"model": state, "epoch": 3}
    torch.save(state, tmp_path / "t.pt")
    net = load_teacher(TeacherConfig(source="torchvision", arch="resnet18", path=tmp_path / "t.pt"), K, SIZE, MEAN, STD)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(net(x), tv(x))


def test_load_state_names_the_file_on_a_mismatch():
    from edgedistill.models.checkpoints import load_state

    student = build_student("shufflenet_v2_x0_5", 3, image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3)
    other = build_student("mobilenet_v2", 3, image_size=16, mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(InputError, match=r"student.pt: does not fit .*missing key.*unexpected key"):
        load_state(student, other.state_dict(), "runs/x/student.pt")
    with pytest.raises(InputError, match="holds a list"):
        load_state(student, [1], "runs/x/student.pt")
    assert load_state(other, other.state_dict(), "ok") is other
