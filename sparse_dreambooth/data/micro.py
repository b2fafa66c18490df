"""The micro subjects as training subjects: their "photos" rendered once into the cache.

The instances live in `sparse_dreambooth.micro.subjects`; here they become image folders that the
rest of the package reads like any subject's. Users name them "micro/<name>"; "demo" is an alias
of one of them (the toy robot), so commands written for the earlier demo subject keep working.
"""

from __future__ import annotations

import contextlib
import pathlib

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder, cache_dir

MICRO_PREFIX = "micro/"
DEMO_SUBJECT = "demo"
DEMO_ALIAS_OF = "robot_toy"
# Bump when the world's drawing or the subjects' photo plan changes, so stale caches are not reused.
_CACHE_DIR_NAME = "micro-subjects-v1"


def micro_subject_dir(name: str) -> pathlib.Path:
    """The folder with a micro subject's photos (PNG), rendering them the first time.

    The photos are drawn from fixed seeds by `micro.subjects.subject_photos`, so they are the same
    on every machine with the same numpy and Pillow. They are written once to
    `$SPARSE_DB_CACHE/micro-subjects-v1/<name>` (default `~/.cache/sparse-dreambooth/...`),
    atomically: a half-written folder is never visible.

    Args:
        name: A micro subject's name without the "micro/" prefix, e.g. "teal_dog".

    Raises:
        UserError: No micro subject has that name, or the cache folder cannot be written.
    """
    from sparse_dreambooth.micro.subjects import subject_photos

    target = cache_dir() / _CACHE_DIR_NAME / name
    if target.is_dir():
        return target
    photos = subject_photos(name)  # raises the unknown-name error before anything is written
    with contextlib.ExitStack() as stack:
        try:  # another process may be rendering them too: the first to finish wins
            staging = stack.enter_context(atomic_folder(target, replace=False))
        except OSError as error:
            raise UserError(
                f"cannot write the micro subject {name!r} to {target.parent} ({error}); "
                "set SPARSE_DB_CACHE to a writable folder"
            ) from error
        for index, photo in enumerate(photos):
            photo.save(staging / f"{index:02d}.png")
    return target
