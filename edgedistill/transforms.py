"""Image transforms on uint8 CHW tensors: the training augmentation and the evaluation preprocessing.

Small images (CIFAR-like, at most ``SMALL_IMAGE`` pixels, and a model input that small) get the CIFAR recipe; larger
ones the Inception-style random-resized crop for training and resize-then-centre-crop for evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMALL_IMAGE = 64


def train_transform(img: torch.Tensor, size: int, small: bool, g: torch.Generator, hflip: bool) -> torch.Tensor:
    return (_small_train if small else _large_train)(img, size, g, hflip)


def _resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    if tuple(img.shape[1:]) == tuple(size):
        return img
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _small_train(img: torch.Tensor, size: int, g: torch.Generator, hflip: bool) -> torch.Tensor:
    """CIFAR recipe: resize, reflect-pad by size/8, random crop, horizontal flip."""
    img = _resize(img, size)
    pad = max(1, size // 8)
    padded = F.pad(img[None].float(), (pad, pad, pad, pad), mode="reflect")[0]
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    out = padded[:, top : top + size, left : left + size]
    # the coin is drawn even when unused, so hflip does not shift the rest of the sample's random stream
    if torch.rand(1, generator=g).item() < 0.5 and hflip:
        out = out.flip(-1)
    return out.to(torch.uint8)


def _large_train(img: torch.Tensor, size: int, g: torch.Generator, hflip: bool) -> torch.Tensor:
    """Inception-style random-resized crop (scale 0.25–1, ratio 3/4–4/3) and horizontal flip."""
    _, h, w = img.shape
    r = torch.rand(3, generator=g).tolist()
    for attempt in range(10):
        area = h * w * (0.25 + 0.75 * r[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[1])
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            break
        r = torch.rand(3, generator=g).tolist()
    else:
        ch = cw = min(h, w)
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    out = _resize(img[:, top : top + ch, left : left + cw], size)
    return out.flip(-1) if r[2] < 0.5 and hflip else out


def eval_transform(img: torch.Tensor, size: int, small: bool) -> torch.Tensor:
    """Small images: resize only. Larger: resize the short side to size/0.875, centre crop."""
    if small:
        return _resize(img, size)
    _, h, w = img.shape
    short = int(round(size / 0.875))
    scale = short / min(h, w)
    img = _resize(img, (max(size, round(h * scale)), max(size, round(w * scale))))
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return img[:, top : top + size, left : left + size]
