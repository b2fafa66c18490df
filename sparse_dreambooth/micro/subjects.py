"""The micro subjects: named instances of micro-world classes that the pretrained model never saw.

Each has colours and a marking outside what `world.random_instance` draws (the markings in
`world.SUBJECT_MARKINGS` never occur in pretraining), so the base model cannot draw them from
their class name alone and personalisation is visible. Users name them as "micro/<name>".
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from sparse_dreambooth.errors import UserError, did_you_mean
from sparse_dreambooth.micro.world import Instance, Scene, render

PHOTO_COUNT = 5

MICRO_SUBJECTS: dict[str, Instance] = {
    "teal_dog": Instance(
        "dog", body=(40, 170, 160), accent=(250, 140, 40), marking="stars", marking_colour=(255, 230, 80),
        width=1.1, ears="floppy", pattern_seed=1,
    ),
    "mint_dog": Instance(
        "dog", body=(150, 230, 190), accent=(60, 60, 160), marking="checks", marking_colour=(60, 60, 160),
        height=1.08, ears="pointy", pattern_seed=2,
    ),
    "lilac_cat": Instance(
        "cat", body=(185, 150, 225), accent=(90, 200, 120), marking="zigzag", marking_colour=(70, 40, 110),
        pattern_seed=3,
    ),
    "lilac_bear": Instance(
        "stuffed animal", body=(175, 140, 220), accent=(250, 235, 120), marking="hearts",
        marking_colour=(220, 40, 90), pattern_seed=4,
    ),
    "checked_backpack": Instance(
        "backpack", body=(240, 60, 160), accent=(250, 240, 245), marking="checks", marking_colour=(30, 30, 30),
        width=1.1, pattern_seed=5,
    ),
    "heart_teapot": Instance(
        "teapot", body=(160, 235, 215), accent=(220, 40, 60), marking="hearts", marking_colour=(220, 40, 60),
        pattern_seed=6,
    ),
    "ringed_vase": Instance(
        "vase", body=(30, 170, 200), accent=(240, 190, 40), marking="rings", marking_colour=(250, 150, 30),
        height=1.1, pattern_seed=7,
    ),
    "star_can": Instance(
        "can", body=(120, 20, 60), accent=(250, 250, 250), marking="stars", marking_colour=(240, 240, 60),
        pattern_seed=8,
    ),
    "zigzag_boot": Instance(
        "boot", body=(150, 210, 40), accent=(200, 30, 140), marking="zigzag", marking_colour=(200, 30, 140),
        pattern_seed=9,
    ),
    # The colours of the offline demo subject's toy robot (data.py).
    "robot_toy": Instance(
        "toy", body=(230, 110, 40), accent=(40, 160, 170), marking="stars", marking_colour=(250, 210, 50),
        pattern_seed=10,
    ),
}  # fmt: skip


def subject_photos(name: str) -> list[Image.Image]:
    """`PHOTO_COUNT` "photos" of the subject: each pose, scale, position and plain background differs.

    Deterministic: the same name always gives the same pictures.

    Args:
        name: A key of `MICRO_SUBJECTS` (without the "micro/" prefix).

    Raises:
        UserError: No micro subject has that name.
    """
    if name not in MICRO_SUBJECTS:
        raise UserError(
            f"unknown micro subject {name!r}{did_you_mean(name, MICRO_SUBJECTS)}; "
            f"known: {', '.join(sorted(MICRO_SUBJECTS))}"
        )
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    scales = rng.permutation(np.linspace(0.55, 0.8, PHOTO_COUNT))
    photos = []
    for index in range(PHOTO_COUNT):
        scene = Scene(
            instance=MICRO_SUBJECTS[name],
            context=None,
            attribute=None,
            facing=1 if index % 2 == 0 else -1,
            scale=float(scales[index]),
            x=float(rng.uniform(0.38, 0.62)),
            ground=float(rng.uniform(0.86, 0.95)),
            detail_seed=int(rng.integers(2**31)),
        )
        photos.append(render(scene))
    return photos
