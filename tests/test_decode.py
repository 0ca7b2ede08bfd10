"""The image decoder: torchvision's and Pillow's give the same pixels, so the decoder a run used never changes what a
Pillow-only deployment sees; files torchvision cannot read go to Pillow, damaged files are named."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from edgedistill.base.errors import InputError
from edgedistill.data.loading import read_image


def photo() -> Image.Image:
    """Smooth content with detail (JPEG's subsampling and IDCT both matter), odd sizes."""
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((37, 53, 3)) * 255).astype(np.uint8)).resize((211, 157), Image.Resampling.BICUBIC)


FILES = {
    "rgb.jpg": lambda im: (im, "JPEG", {"quality": 90}),
    "progressive.jpg": lambda im: (im, "JPEG", {"quality": 90, "progressive": True}),
    "444.jpg": lambda im: (im, "JPEG", {"quality": 95, "subsampling": 0}),
    "grey.jpg": lambda im: (im.convert("L"), "JPEG", {}),
    "cmyk.jpg": lambda im: (im.convert("CMYK"), "JPEG", {}),
    "rgb.png": lambda im: (im, "PNG", {}),
    "rgba.png": lambda im: (im.convert("RGBA"), "PNG", {}),
    "palette.png": lambda im: (im.convert("P"), "PNG", {}),
    "grey-alpha.png": lambda im: (im.convert("LA"), "PNG", {}),
    "rgb.webp": lambda im: (im, "WEBP", {}),
    "palette.gif": lambda im: (im.convert("P"), "GIF", {}),
    "rgb.bmp": lambda im: (im, "BMP", {}),  # torchvision does not read BMP: Pillow does
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_same_pixels_as_pillow(tmp_path, name):
    im, fmt, kw = FILES[name](photo())
    path = tmp_path / name
    im.save(path, fmt, **kw)
    with Image.open(path) as f:
        expected = np.asarray(f.convert("RGB"))
    got = read_image(path)
    assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[:2])
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_first_frame_of_an_animation(tmp_path):
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "a.gif") as f:
        expected = np.asarray(f.convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "a.gif").permute(1, 2, 0).numpy(), expected)


def test_a_damaged_file_is_named(tmp_path):
    buf = io.BytesIO()
    photo().save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.jpg could not be decoded"):
        read_image(tmp_path / "cut.jpg")
