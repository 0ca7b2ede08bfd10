"""From a split to batches: the dataset that decodes and transforms one image, the seeded sampler, the loader.

A sample is ``(image uint8 CHW, label, dataset index)``. Training transforms draw their randomness from a
generator seeded by ``(seed, epoch, index)``, so an epoch's augmented images depend on nothing else: not the
worker count, not a resume, not the rank under DDP.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from edgedistill.base.errors import InputError
from edgedistill.data.sources import Split
from edgedistill.data.transforms import SMALL_IMAGE, eval_transform, train_transform

def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class ImageDataset(Dataset):
    """Images of one split at ``size`` pixels; random crop (and horizontal flip, unless ``hflip`` is off:
    digits, text and signs are not mirror-symmetric) when ``train``.

    An item is an index, or ``(epoch, index)`` as :class:`EpochSampler` yields them: the epoch travels with the
    index, so loader workers hold no epoch of their own and can live across epochs (``persistent_workers``)."""

    def __init__(self, split: Split, size: int, train: bool, seed: int = 0, hflip: bool = True):
        self.split, self.size, self.train, self.seed, self.hflip = split, size, train, seed, hflip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        img = self._read(i)  # uint8 (3, H, W)
        if self.train:
            small = max(img.shape[1:]) <= SMALL_IMAGE and self.size <= SMALL_IMAGE
            img = train_transform(img, self.size, small, sample_generator(self.seed, epoch, i), self.hflip)
        else:  # decided by the model input size alone: what the ONNX metadata records (transforms.eval_preprocessing)
            img = eval_transform(img, self.size)
        return img, int(self.split.labels[i]), i

    def _read(self, i: int) -> torch.Tensor:
        if self.split.images is not None:
            return torch.from_numpy(self.split.images[i]).permute(2, 0, 1)
        return read_image(self.split.paths[i])


def read_image(path) -> torch.Tensor:
    """A file as uint8 RGB (3, H, W); the first frame of an animated one.

    torchvision's decoder (libjpeg-turbo, libpng, libwebp) reads it when it can: the fastest installed, 1.1-1.6x
    Pillow's images per second through the loader at 224 px, where TorchCodec, which supersedes it from torchvision
    0.29 on, measured between the two (docs/benchmarks/input.md). Its pixels are Pillow's
    ``convert("RGB")`` ones for every format it reads (tests/test_decode.py), so a deployment that decodes with Pillow
    sees what validation saw. Pillow reads the rest (BMP, TIFF, ...) and names a damaged file."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # the 0.29 deprecation notice: torchvision <= 0.29.1 is what this tool installs
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(str(path), mode=ImageReadMode.RGB)
        return img[0] if img.ndim == 4 else img
    except RuntimeError:
        pass  # a format it does not read, or a damaged file: Pillow reads it or names it
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise InputError(f"data.root: {path} could not be decoded ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """A permutation of the dataset fixed by ``(seed, epoch)``, sharded over ranks, resumable mid-epoch; it yields
    ``(epoch, index)``, the key :class:`ImageDataset` draws a sample's augmentation from.

    Every rank sees ``ceil(N / world)`` indices (the permutation is padded by wrapping, as
    DistributedSampler does), so all ranks run the same number of steps. ``start`` skips the
    first samples of this rank's shard: a resumed epoch continues exactly where it stopped.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world: int = 1, pad: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            per_rank = math.ceil(self.n / self.world)
            order = (order * (per_rank * self.world // max(self.n, 1) + 1))[: per_rank * self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        return ((self.epoch, i) for i in self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


def make_loader(dataset: ImageDataset, batch_size: int, sampler: Sampler, *, num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,  # the epoch comes with each index (EpochSampler), not from the workers' dataset
    )


def to_float(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW on the host → float32 [0, 1] on ``device`` (transfer the 4x smaller uint8)."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_arrays(split: Split, size: int, limit: int | None = None, indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation-transformed images as float32 (N, 3, size, size) in [0, 1] plus labels, for ONNX work."""
    ds = ImageDataset(split, size, train=False)
    idx = list(indices) if indices is not None else list(range(len(ds) if limit is None else min(limit, len(ds))))
    x = np.stack([ds[i][0].numpy() for i in idx]).astype(np.float32) / 255.0 if idx else np.zeros((0, 3, size, size), np.float32)
    return x, split.labels[idx]


# ---------------------------------------------------------------- evaluation images for the runtimes, chunk by chunk


class TestImages(Protocol):
    """Evaluation images as float32 (N, 3, H, W) RGB in [0, 1] with their labels, read a chunk at a time, so that
    what runs them (validation in every runtime) holds one chunk, not the split: at 224 px a float image is 0.6 MB."""

    labels: np.ndarray  # int64 (N,): small, held whole

    def __len__(self) -> int: ...

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` images (cycling when there are fewer): parity and timing inputs."""

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every image once, in order, as (images, labels) chunks."""


class SplitImages:
    """A split's evaluation-transformed images, decoded chunk by chunk (the :class:`TestImages` of a run)."""

    def __init__(self, split: Split, size: int, chunk: int = 256):
        self.dataset, self.chunk = ImageDataset(split, size, train=False), chunk
        self.labels = split.labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def _images(self, idx) -> np.ndarray:
        return np.stack([self.dataset[int(i)][0].numpy() for i in idx]).astype(np.float32) / 255.0

    def head(self, n: int) -> np.ndarray:
        return self._images(np.arange(n) % len(self))

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self), self.chunk):
            idx = np.arange(i, min(i + self.chunk, len(self)))
            yield self._images(idx), self.labels[idx]


class ArrayImages:
    """Images already in memory as a float32 (N, 3, H, W) array (tests, benchmarks), as :class:`TestImages`."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, chunk: int = 256):
        self.x, self.labels, self.chunk = x, np.asarray(labels), chunk

    def __len__(self) -> int:
        return len(self.x)

    def head(self, n: int) -> np.ndarray:
        return np.ascontiguousarray(self.x[np.arange(n) % len(self.x)])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self.x), self.chunk):
            yield self.x[i:i + self.chunk], self.labels[i:i + self.chunk]
