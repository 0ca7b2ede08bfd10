"""Data sources: where the images come from (a registry of them), the splits they give, and the subsets a
recipe cuts from them (long tail, size limits).

Every source yields uint8 RGB images, in memory or as file paths read on demand (:mod:`edgedistill.data.loading`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from edgedistill.base.errors import InputError
from edgedistill.base.fsio import path_problem
from edgedistill.base.registry import Registry
from edgedistill.data.folder_scan import check_headers, list_split

log = logging.getLogger("edgedistill")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    """One split: images as a uint8 array (N, H, W, 3) in memory, or as file paths read on demand."""

    labels: np.ndarray  # int64 (N,)
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> "Split":
        return Split(
            labels=self.labels[keep],
            images=None if self.images is None else self.images[keep],
            paths=None if self.paths is None else [self.paths[i] for i in keep],
        )


@dataclass
class DataBundle:
    train: Split
    test: Split
    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "why"} of the files left out (data.on_bad_image: skip)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DataSource:
    """``load(cfg)``; ``root``: what data.root must be ("file", "folder", None: no files are read), ``what``: in words;
    ``image_files``: it reads one image file per sample (``data.on_bad_image`` means something to it)."""

    load: Callable[..., DataBundle]
    root: Literal["file", "folder"] | None = None
    what: str = ""
    image_files: bool = False


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{what}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def to_rgb_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """(N,H,W) grayscale, (N,H,W,1|3|4) or (N,3,H,W) → uint8 (N,H,W,3); conversions are logged."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise InputError(f"{what}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        log.warning("%s: grayscale images, converted to RGB", what)
        return np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected images of shape (N, H, W, 3), got {x.shape}")
    if x.shape[-1] == 1:
        log.warning("%s: grayscale images, converted to RGB", what)
        return np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        log.warning("%s: RGBA images, alpha channel dropped", what)
        return np.ascontiguousarray(x[..., :3])
    return x


def _stats(images: np.ndarray, limit: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = images[:limit].reshape(-1, 3).astype(np.float64) / 255.0
    std = np.maximum(sample.std(0), 1e-3)
    return tuple(float(v) for v in sample.mean(0)), tuple(float(v) for v in std)


def _array_bundle(x_train, y_train, x_test, y_test, class_names, what: str, source: str) -> DataBundle:
    x_train, x_test = to_rgb_uint8(x_train, f"{what} x_train"), to_rgb_uint8(x_test, f"{what} x_test")
    if len(x_train) == 0 or len(x_test) == 0:
        raise InputError(f"{what}: empty split (train {len(x_train)}, test {len(x_test)} images)")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(f"{what}: train images are {x_train.shape[1:3]} but test images are {x_test.shape[1:3]}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise InputError(f"{what}: {len(x_train)}/{len(x_test)} images but {len(y_train)}/{len(y_test)} labels")
    if class_names is None:
        class_names = [str(i) for i in range(int(max(np.max(y_train), np.max(y_test))) + 1)]
    k = len(class_names)
    train = Split(_check_labels(y_train, k, f"{what} y_train"), images=x_train)
    test = Split(_check_labels(y_test, k, f"{what} y_test"), images=x_test)
    mean, std = _stats(x_train)
    return DataBundle(train, test, [str(c) for c in class_names], x_train.shape[1], mean, std, source)


def _digits(cfg) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), as RGB, split 80/20 per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("data.source 'digits' needs scikit-learn: pip install 'edgedistill[demo]'") from None
    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(12345)  # a fixed split, independent of the recipe's seed
    test_mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_mask[idx[: len(idx) // 5]] = True
    x = np.repeat(x[..., None], 3, axis=-1)
    return _array_bundle(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], [str(i) for i in range(10)], "digits", "digits")


def _npz(cfg) -> DataBundle:
    """One .npz with x_train, y_train, x_test, y_test (uint8 NHWC, int labels) and optional class_names."""
    import zipfile

    path = _need_root(cfg)
    if not zipfile.is_zipfile(path):
        raise InputError(f"data.root: {path} is not a .npz file, or is truncated (no zip directory found; expected numpy.savez output with x_train, y_train, x_test, y_test)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise InputError(f"data.root: {path} lacks {', '.join(missing)} (has {', '.join(z.files) or 'no arrays'})")
            arrays = {k: z[k] for k in z.files}
    except InputError:
        raise
    except Exception as e:  # truncated member (BadZipFile, EOFError), object arrays (ValueError), ...
        raise InputError(f"data.root: {path} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    names = arrays.get("class_names")
    return _array_bundle(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        None if names is None else [str(n) for n in names], f"data.root {path}", "npz",
    )


def _cifar(cls_name: str):
    def load(cfg) -> DataBundle:
        import torchvision

        root = _need_root(cfg)
        cls = getattr(torchvision.datasets, cls_name)
        folder = root / cls.base_folder
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise InputError(
                f"data.root: {folder} lacks {', '.join(missing)} (torchvision's {cls_name} python files; "
                "edgedistill never downloads data)"
            )
        try:
            tr = cls(str(root), train=True, download=False)
            te = cls(str(root), train=False, download=False)
        except Exception as e:  # torchvision checks each file's md5, then unpickles it
            raise InputError(
                f"data.root: {folder}: torchvision cannot read the {cls_name} files ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "they are corrupt or not the original release"
            ) from None
        return _array_bundle(tr.data, np.array(tr.targets), te.data, np.array(te.targets), tr.classes, f"data.root {root}", cls_name.lower())

    return load


def _imagefolder(cfg) -> DataBundle:
    """``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` (or ``root/val/``, as ImageNet is laid out);
    classes from the train folder, sorted. Every file's header is checked now (:mod:`edgedistill.data.folder_scan`):
    one Pillow cannot open stops the run, or with ``data.on_bad_image: skip`` is left out and listed."""
    root = _need_root(cfg)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes:
        raise InputError(f"data.root: {root / 'train'} has no class folders")
    test = root / "test" if (root / "test").is_dir() or not (root / "val").is_dir() else root / "val"  # val/: ImageNet's layout
    skipped: list[dict] = []
    train, test = (_checked_split(d, classes, cfg.on_bad_image, skipped) for d in (root / "train", test))
    return DataBundle(train, test, classes, cfg.image_size or 224, IMAGENET_MEAN, IMAGENET_STD, "imagefolder", skipped=skipped)


def _checked_split(split_dir: Path, classes: list[str], on_bad_image: str, skipped: list[dict]) -> Split:
    paths, labels = list_split(split_dir, classes)
    bad, not_rgb = check_headers(paths)
    if bad and on_bad_image == "error":
        i = min(bad)
        more = f" (and {len(bad) - 1} more in {split_dir})" if len(bad) > 1 else ""
        raise InputError(f"data.root: {paths[i]} is {bad[i]}{more}; remove it, or set data.on_bad_image: skip to leave such files out")
    if not_rgb:
        log.warning("%s: %d images are not RGB (grayscale, RGBA, palette) and are converted to RGB", split_dir, not_rgb)
    skipped += [{"path": paths[i], "why": why} for i, why in sorted(bad.items())]
    keep = np.array([i for i in range(len(paths)) if i not in bad], dtype=np.int64)
    if not len(keep):
        raise InputError(f"data.root: {split_dir} has no readable image")
    return Split(labels[keep], paths=[paths[i] for i in keep])


def _need_root(cfg) -> Path:
    """``data.root``, checked again: the recipe checked it when it loaded, but the files may have moved since."""
    spec = DATA_SOURCES.get(cfg.source)
    if problem := f"data source '{cfg.source}' needs {spec.what}" if cfg.root is None else path_problem(cfg.root, spec.root, spec.what):
        raise InputError(f"data.root: {problem}")
    return Path(cfg.root).expanduser()


DATA_SOURCES.register("digits")(DataSource(_digits))
DATA_SOURCES.register("npz")(DataSource(_npz, "file", "a .npz file"))
DATA_SOURCES.register("cifar10")(DataSource(_cifar("CIFAR10"), "folder", "a folder holding torchvision's CIFAR-10 files (cifar-10-batches-py/)"))
DATA_SOURCES.register("cifar100")(DataSource(_cifar("CIFAR100"), "folder", "a folder holding torchvision's CIFAR-100 files (cifar-100-python/)"))
DATA_SOURCES.register("imagefolder")(DataSource(_imagefolder, "folder", "a folder with train/ and test/ (or val/) class folders", image_files=True))


def long_tail_indices(labels: np.ndarray, imbalance: float, num_classes: int, seed: int) -> np.ndarray:
    """CIFAR-LT profile (Cui et al., CVPR 2019): class c keeps n_max·imbalance^(−c/(C−1)) images."""
    rng = np.random.default_rng(seed)
    n_max = np.bincount(labels, minlength=num_classes).max()
    keep = []
    for c in range(num_classes):
        n_c = max(1, int(n_max * imbalance ** (-c / max(num_classes - 1, 1))))
        keep.append(rng.permutation(np.flatnonzero(labels == c))[:n_c])
    return np.sort(np.concatenate(keep))


def limit_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of about ``n`` samples (round-robin over classes)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.sort(np.array(order[:n], dtype=np.int64))


def load_data(cfg, seed: int = 0) -> DataBundle:
    """Load ``cfg.source`` and apply the long-tail profile and size limits of the recipe."""
    bundle = DATA_SOURCES.get(cfg.source).load(cfg)
    if cfg.image_size:
        bundle.image_size = cfg.image_size
    if cfg.long_tail.imbalance > 1:
        bundle.train = bundle.train.subset(long_tail_indices(bundle.train.labels, cfg.long_tail.imbalance, bundle.num_classes, cfg.long_tail.seed))
        bundle.notes.append(f"long-tail training split, imbalance {cfg.long_tail.imbalance:g}: {len(bundle.train)} images")
    if cfg.train_limit:
        bundle.train = bundle.train.subset(limit_indices(bundle.train.labels, cfg.train_limit, seed))
    if cfg.test_limit:
        bundle.test = bundle.test.subset(limit_indices(bundle.test.labels, cfg.test_limit, seed))
    return bundle
