"""One training image as the training loop needs it: upright RGB pixels cut to a square (or to
its aspect-ratio bucket), plus the SDXL micro-conditioning that says how it was cut.

torch is imported only inside `prepare_image`, so the data commands need not load it.
"""

from __future__ import annotations

import os
import pathlib
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sparse_dreambooth.data.buckets import nearest_bucket
from sparse_dreambooth.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PreparedImage:
    """One training image and the SDXL micro-conditioning that describes how it was cut.

    Attributes:
        pixels: (3, height, width) float32 in [-1, 1], `target_size`.
        original_size: (height, width) of the upright image before resizing.
        crop_top_left: (top, left) of the crop in the resized image, as SDXL's add_time_ids want.
        target_size: (height, width) of the crop: (resolution, resolution), or the image's bucket.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def upright_rgb(path: pathlib.Path) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to 8-bit RGB."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a decoded copy: a truncated file fails right here
        if image.mode.startswith("I"):  # "I;16", "I;16B", ... (16-bit files) and "I" (32-bit int)
            # Pillow clips these to 0..255 when converting to RGB, turning most 16-bit photos white.
            levels = np.asarray(image.convert("I"), dtype=np.float64)
            image = Image.fromarray(np.round(np.clip(levels, 0, 65535) / 257).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            # Transparent areas go white, the usual backdrop of cut-out product photos; a plain
            # convert("RGB") would expose whatever colour the invisible pixels happen to hold.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from error


def _resized_size(width: int, height: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(width, height) scaled to just cover the target, rounded down as torchvision's Resize does.

    For a square target the shorter side lands on it. `max` keeps a float's rounding from leaving
    the scaled side one pixel short of the target.
    """
    if target_width * height >= target_height * width:  # the width reaches its target last
        return target_width, max(target_height, int(target_width * height / width))
    return max(target_width, int(target_height * width / height)), target_height


def prepare_image(
    path: str | os.PathLike,
    resolution: int,
    flip: bool = False,
    center_crop: bool = True,
    rng: random.Random | None = None,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> PreparedImage:
    """Load one training image the way diffusers' SDXL DreamBooth script does.

    EXIF orientation is applied, the image is converted to RGB, its shorter side is resized to
    `resolution` (Lanczos, the script's default), a `resolution` square is cropped (centred, or at
    a random offset drawn from `rng`), and the crop is mirrored if `flip`. With `buckets` the crop
    is instead the bucket nearest the image's aspect ratio (data/buckets.py), and the image is
    resized to just cover it.

    With `flip` the recorded crop_top_left is the left edge of the crop in the mirrored resized
    image, `resized_width - left - crop_width`, which is what the diffusers script records since it
    flips before cropping (huggingface/diffusers#6547); the older `resolution - left` was a bug.

    Args:
        path: The image file.
        resolution: Side of the square output, e.g. 1024 for SDXL (without `buckets`).
        flip: Mirror the crop horizontally (the caller draws this from its own seeded RNG).
        center_crop: Crop the centre; False crops at a random offset drawn from `rng`.
        rng: Seeded random source for the random crop; required when `center_crop` is False.
        buckets: (height, width) sizes, e.g. `bucket_sizes(1024)`: crop to the one nearest the image's
            aspect ratio instead of the square.

    Returns:
        The pixels and the SDXL micro-conditioning for this image.

    Raises:
        UserError: The file cannot be read or decoded (missing, not an image, truncated).
        ValueError: `resolution` is not positive, or a random crop is asked for without `rng`.

    A warning is issued when the image is smaller than its crop and has to be upscaled.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if not center_crop and rng is None:
        raise ValueError("a random crop needs rng, a seeded random.Random")
    import torch  # here rather than at the top, so the data commands need not load torch

    path = pathlib.Path(path)
    image = upright_rgb(path)
    width, height = image.size
    crop_height, crop_width = nearest_bucket(height, width, buckets) if buckets else (resolution, resolution)
    resized_width, resized_height = _resized_size(width, height, crop_height, crop_width)
    if resized_width > width or resized_height > height:
        size = f"resolution {resolution}" if not buckets else f"size {crop_width}x{crop_height}"
        warnings.warn(
            f"{path} is {width}x{height}, smaller than the training {size}; it is upscaled and will look soft",
            stacklevel=2,
        )
    image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)

    if center_crop:
        top = int(round((resized_height - crop_height) / 2.0))
        left = int(round((resized_width - crop_width) / 2.0))
    else:
        top = rng.randint(0, resized_height - crop_height)
        left = rng.randint(0, resized_width - crop_width)
    image = image.crop((left, top, left + crop_width, top + crop_height))
    crop_top_left = (top, left)
    if flip:
        image = ImageOps.mirror(image)
        crop_top_left = (top, resized_width - left - crop_width)

    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).contiguous()
    return PreparedImage(
        pixels=pixels / 127.5 - 1.0,
        original_size=(height, width),
        crop_top_left=crop_top_left,
        target_size=(crop_height, crop_width),
    )
