"""Image transforms on uint8 CHW tensors: the training augmentation and the evaluation preprocessing.

Small images (CIFAR-like, at most ``SMALL_IMAGE`` pixels, and a model input that small) get the CIFAR recipe for
training; larger ones the Inception-style random-resized crop. Evaluation is decided by the model input size alone
(:func:`eval_preprocessing`): at most ``SMALL_IMAGE`` pixels, resize to exactly H×W; larger, resize the shorter
side to ``round(size / CROP_RATIO)`` and centre-crop. That description is what every exported ONNX file records
under ``preprocessing``, and :func:`eval_transform` computes from it, so they cannot drift apart.

Every resize, training and evaluation alike, is Pillow's bilinear ``Image.resize`` on RGB uint8 (antialiased
when shrinking), so a deployment that only has Pillow and numpy reproduces the validated inputs bit for bit
(see docs/deploy.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SMALL_IMAGE = 64
CROP_RATIO = 0.875
INTERPOLATION = "bilinear"
RESAMPLER = "Pillow Image.resize, Image.Resampling.BILINEAR, on RGB uint8"
INPUT_NOTE = "RGB uint8 / 255 -> float32 in [0, 1], NCHW"


def hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size: expected an int or (height, width), got {image_size}")
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def train_transform(img: torch.Tensor, size: int, small: bool, g: torch.Generator, hflip: bool) -> torch.Tensor:
    return (_small_train if small else _large_train)(img, size, g, hflip)


def _resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) → uint8 (3, *size) with Pillow's bilinear filter (the one resampler of the tool)."""
    from PIL import Image

    size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if tuple(img.shape[1:]) == size:
        return img
    hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    out = np.asarray(Image.fromarray(hwc, "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


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


# ---------------------------------------------------------------- evaluation


def _hw(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def eval_is_small(size) -> bool:
    """The evaluation rule depends on the model input only: at most ``SMALL_IMAGE`` px → resize, no crop."""
    return max(_hw(size)) <= SMALL_IMAGE


def eval_preprocessing(size, small: bool | None = None) -> dict:
    """The exact evaluation preprocessing for a model input of ``size`` (int, or (H, W)) as a JSON-ready dict.

    ``small`` (default: :func:`eval_is_small`) picks the rule::

        {"resize": "exact", "resize_to": [H, W], "crop": "none", ...}
        {"resize": "shorter_side", "shorter_side": S, "crop": "center", "crop_size": [H, W], "crop_ratio": 0.875, ...}

    with ``S = round(max(H, W) / crop_ratio)``. Shorter side: ``scale = S / min(h, w)`` (float), the image
    (h × w) is resized to ``(max(H, round(h·scale)), max(W, round(w·scale)))`` (Python ``round``: half to
    even), then rows ``(h' − H) // 2`` and columns ``(w' − W) // 2`` start the crop. Both rules share
    ``interpolation``, ``resampler`` and ``input`` (how the uint8 pixels become the model input).
    """
    h, w = _hw(size)
    small = eval_is_small((h, w)) if small is None else bool(small)
    common = {"interpolation": INTERPOLATION, "resampler": RESAMPLER, "input": INPUT_NOTE}
    if small:
        return {"resize": "exact", "resize_to": [h, w], "crop": "none", **common}
    return {
        "resize": "shorter_side",
        "shorter_side": round(max(h, w) / CROP_RATIO),
        "crop": "center",
        "crop_size": [h, w],
        "crop_ratio": CROP_RATIO,
        **common,
    }


def apply_preprocessing(img: torch.Tensor, spec: dict) -> torch.Tensor:
    """Apply an :func:`eval_preprocessing` description to a uint8 (3, h, w) image."""
    if spec["resize"] == "exact":
        return _resize(img, tuple(spec["resize_to"]))
    if spec["resize"] != "shorter_side" or spec["crop"] != "center":
        raise ValueError(f"unknown preprocessing {spec['resize']!r} / {spec['crop']!r}")
    ch, cw = spec["crop_size"]
    _, h, w = img.shape
    scale = spec["shorter_side"] / min(h, w)
    img = _resize(img, (max(ch, round(h * scale)), max(cw, round(w * scale))))
    top, left = (img.shape[1] - ch) // 2, (img.shape[2] - cw) // 2
    return img[:, top : top + ch, left : left + cw]


def eval_transform(img: torch.Tensor, size, small: bool | None = None) -> torch.Tensor:
    """Small model input: resize only. Larger: resize the short side to size/0.875, centre crop."""
    return apply_preprocessing(img, eval_preprocessing(size, small))
