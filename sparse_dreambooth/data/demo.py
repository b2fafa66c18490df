"""The synthetic demo subject: one toy robot on four different backgrounds, drawn offline.

It needs no download and is the same on every machine with the same numpy and Pillow.
"""

from __future__ import annotations

import contextlib
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder, cache_dir

# Bump the version when the drawing changes, so caches of the old pictures are not reused.
_DEMO_DIR_NAME = "demo-subject-v1"
_DEMO_SEED = 2024
# (height, width): square, portrait and landscape, so the crop conditioning gets exercised too.
_DEMO_IMAGE_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1024, 1024))
DEMO_IMAGE_COUNT = len(_DEMO_IMAGE_SIZES)
# The subject's identity stays fixed across images; only the scene around it is random.
_TOY_BODY = (230, 110, 40)
_TOY_HEAD = (40, 160, 170)
_TOY_DETAIL = (250, 210, 50)
_TOY_DARK = (30, 30, 35)


def _disc(draw: ImageDraw.ImageDraw, x: float, y: float, radius: float, colour: tuple[int, int, int]) -> None:
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def _draw_toy(draw: ImageDraw.ImageDraw, centre_x: float, floor_y: float, size: float, facing_left: bool) -> None:
    """Draw the toy robot standing on `floor_y`, about `size` pixels tall."""
    for wheel_x in (centre_x - 0.18 * size, centre_x + 0.18 * size):
        _disc(draw, wheel_x, floor_y - 0.1 * size, 0.1 * size, _TOY_DARK)
    body_top = floor_y - 0.55 * size
    draw.rounded_rectangle(
        (centre_x - 0.275 * size, body_top, centre_x + 0.275 * size, body_top + 0.45 * size),
        radius=0.08 * size,
        fill=_TOY_BODY,
    )
    draw.rectangle(
        (centre_x - 0.12 * size, body_top + 0.12 * size, centre_x + 0.12 * size, body_top + 0.25 * size),
        fill=_TOY_DETAIL,
    )
    head_radius = 0.2 * size
    head_y = body_top - 0.9 * head_radius
    antenna_y = head_y - 1.5 * head_radius
    draw.line((centre_x, head_y, centre_x, antenna_y), fill=_TOY_DARK, width=max(2, int(0.02 * size)))
    _disc(draw, centre_x, antenna_y, 0.05 * size, _TOY_DETAIL)
    _disc(draw, centre_x, head_y, head_radius, _TOY_HEAD)
    # The eyes sit off-centre so the toy visibly faces one way, which makes flips detectable.
    gaze = -0.06 * size if facing_left else 0.06 * size
    for eye_x in (centre_x - 0.08 * size + gaze, centre_x + 0.08 * size + gaze):
        _disc(draw, eye_x, head_y, 0.05 * size, (255, 255, 255))
        _disc(draw, eye_x, head_y, 0.025 * size, _TOY_DARK)


def _draw_demo_image(index: int, height: int, width: int) -> Image.Image:
    """One demo picture: the toy on a random wall-and-floor scene seeded by (_DEMO_SEED, index)."""
    rng = np.random.default_rng((_DEMO_SEED, index))
    wall_top, wall_bottom, floor = (rng.integers(40, 256, size=3) for _ in range(3))
    horizon = int(height * rng.uniform(0.55, 0.75))
    blend = np.linspace(0.0, 1.0, height)[:, None, None]
    canvas = np.broadcast_to((1 - blend) * wall_top + blend * wall_bottom, (height, width, 3)).copy()
    canvas[horizon:] = floor
    image = Image.fromarray(canvas.astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # background clutter, kept above the floor line
        x, y = rng.uniform(0, width), rng.uniform(0, horizon * 0.8)
        radius = rng.uniform(0.03, 0.12) * min(height, width)
        colour = tuple(int(channel) for channel in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
        shape((x - radius, y - radius, x + radius, y + radius), fill=colour)

    toy_size = rng.uniform(0.45, 0.65) * min(height, width)
    centre_x = rng.uniform(0.35, 0.65) * width
    floor_y = horizon + rng.uniform(0.05, 0.2) * (height - horizon)
    _draw_toy(draw, centre_x, floor_y, toy_size, facing_left=bool(rng.integers(0, 2)))
    return image


def demo_subject_dir() -> pathlib.Path:
    """The folder with the demo subject's images, drawing them the first time.

    The demo subject (class "toy", kind "object") is drawn by this code from fixed seeds, so it is
    the same on every machine with the same numpy and Pillow and needs no download. It is written
    once to `$SPARSE_DB_CACHE/demo-subject-v1` (default `~/.cache/sparse-dreambooth/...`, XDG
    aware), atomically: a half-written folder is never visible.

    Raises:
        UserError: The cache folder cannot be written.
    """
    target = cache_dir() / _DEMO_DIR_NAME
    if target.is_dir():
        return target
    with contextlib.ExitStack() as stack:
        try:  # another process may be drawing them too: the first to finish wins
            staging = stack.enter_context(atomic_folder(target, replace=False))
        except OSError as error:
            raise UserError(
                f"cannot write the demo subject to {target.parent} ({error}); set SPARSE_DB_CACHE to a writable folder"
            ) from error
        for index, (height, width) in enumerate(_DEMO_IMAGE_SIZES):
            _draw_demo_image(index, height, width).save(staging / f"{index:02d}.png")
    return target
