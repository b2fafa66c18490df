"""Training subjects and their images: the DreamBooth dataset, the user's photos, a synthetic demo.

A *subject* is a handful of photos of one thing plus its class name ("dog", "backpack"). The
DreamBooth protocol (Ruiz et al. 2023) has 30 of them, 9 "live" (the cats and dogs) and 21
"objects"; each kind has its own 25 evaluation prompts. This module finds subjects (the real
dataset, a folder of the user's photos, or a demo subject drawn offline), turns one image into
the tensor and SDXL micro-conditioning the training loop needs, and downloads the dataset safely.

torch is imported only inside `prepare_image`, so listing and downloading stay fast.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import json
import logging
import os
import pathlib
import random
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from sparse_dreambooth import __version__
from sparse_dreambooth.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DATASET_URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
LIVE_CLASSES = ("cat", "dog")  # the protocol's 9 live subjects are the cats and dogs
DEMO_SUBJECT = "demo"
DEMO_CLASS = "toy"
SUBJECT_KINDS = ("object", "live")
PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# The 25 evaluation prompts of each kind, as in the dataset's prompts_and_classes.txt (a test checks
# they match), so demo and custom subjects are evaluated the same way without the dataset at hand.
OBJECT_PROMPT_TEMPLATES = (
    "a {token} {class_name} in the jungle",
    "a {token} {class_name} in the snow",
    "a {token} {class_name} on the beach",
    "a {token} {class_name} on a cobblestone street",
    "a {token} {class_name} on top of pink fabric",
    "a {token} {class_name} on top of a wooden floor",
    "a {token} {class_name} with a city in the background",
    "a {token} {class_name} with a mountain in the background",
    "a {token} {class_name} with a blue house in the background",
    "a {token} {class_name} on top of a purple rug in a forest",
    "a {token} {class_name} with a wheat field in the background",
    "a {token} {class_name} with a tree and autumn leaves in the background",
    "a {token} {class_name} with the Eiffel Tower in the background",
    "a {token} {class_name} floating on top of water",
    "a {token} {class_name} floating in an ocean of milk",
    "a {token} {class_name} on top of green grass with sunflowers around it",
    "a {token} {class_name} on top of a mirror",
    "a {token} {class_name} on top of the sidewalk in a crowded street",
    "a {token} {class_name} on top of a dirt road",
    "a {token} {class_name} on top of a white rug",
    "a red {token} {class_name}",
    "a purple {token} {class_name}",
    "a shiny {token} {class_name}",
    "a wet {token} {class_name}",
    "a cube shaped {token} {class_name}",
)
LIVE_PROMPT_TEMPLATES = (
    "a {token} {class_name} in the jungle",
    "a {token} {class_name} in the snow",
    "a {token} {class_name} on the beach",
    "a {token} {class_name} on a cobblestone street",
    "a {token} {class_name} on top of pink fabric",
    "a {token} {class_name} on top of a wooden floor",
    "a {token} {class_name} with a city in the background",
    "a {token} {class_name} with a mountain in the background",
    "a {token} {class_name} with a blue house in the background",
    "a {token} {class_name} on top of a purple rug in a forest",
    "a {token} {class_name} wearing a red hat",
    "a {token} {class_name} wearing a santa hat",
    "a {token} {class_name} wearing a rainbow scarf",
    "a {token} {class_name} wearing a black top hat and a monocle",
    "a {token} {class_name} in a chef outfit",
    "a {token} {class_name} in a firefighter outfit",
    "a {token} {class_name} in a police outfit",
    "a {token} {class_name} wearing pink glasses",
    "a {token} {class_name} wearing a yellow shirt",
    "a {token} {class_name} in a purple wizard outfit",
    "a red {token} {class_name}",
    "a purple {token} {class_name}",
    "a shiny {token} {class_name}",
    "a wet {token} {class_name}",
    "a cube shaped {token} {class_name}",
)


@dataclass(frozen=True)
class Subject:
    """One subject to personalise the model on.

    Attributes:
        name: Folder name, e.g. "dog6"; "demo" for the synthetic subject.
        class_name: The coarse class the prompts use, e.g. "dog" in "a zjw dog".
        kind: "live" (cats and dogs) or "object"; picks the evaluation prompt list.
        image_paths: The subject's photos, sorted by file name.
    """

    name: str
    class_name: str
    kind: str
    image_paths: tuple[pathlib.Path, ...]

    def __post_init__(self) -> None:
        if self.kind not in SUBJECT_KINDS:
            raise ValueError(f"kind must be one of {SUBJECT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class PreparedImage:
    """One training image and the SDXL micro-conditioning that describes how it was cut.

    Attributes:
        pixels: (3, resolution, resolution) float32 in [-1, 1].
        original_size: (height, width) of the upright image before resizing.
        crop_top_left: (top, left) of the crop in the resized image, as SDXL's add_time_ids want.
        target_size: (resolution, resolution).
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Finding subjects


def resolve_data_root(cli_value: str | None) -> pathlib.Path:
    """Where the DreamBooth dataset lives.

    Args:
        cli_value: The `--data-root` option, or None when it was not given.

    Returns:
        `cli_value` if given, else `$SPARSE_DB_DATA`, else
        `$XDG_DATA_HOME/sparse-dreambooth/dreambooth` (`~/.local/share/...` when XDG_DATA_HOME is
        unset). The folder need not exist yet.
    """
    if cli_value:
        return pathlib.Path(cli_value).expanduser()
    from_environment = os.environ.get("SPARSE_DB_DATA")
    if from_environment:
        return pathlib.Path(from_environment).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or pathlib.Path.home() / ".local" / "share"
    return pathlib.Path(data_home) / "sparse-dreambooth" / "dreambooth"


def _missing_dataset_message(root: pathlib.Path) -> str:
    return (
        f"the DreamBooth dataset is not at {root} (no {PROMPTS_FILE} there); fetch it with "
        "`sparse-db data download` (add --data-root DIR to choose where), or point --data-root or "
        "$SPARSE_DB_DATA at the dataset/ folder of a copy you already have"
    )


_SECTION_HEADING = re.compile(r"^(Classes|Prompts|Object Prompts|Live Subject Prompts)\s*$", re.MULTILINE)
_CLASS_LINE = re.compile(r"^(\w+)\s*,\s*(.+?)\s*$")
# The file writes each prompt as Python source: 'a {0} {1} in the jungle'.format(unique_token, class_token)
_TEMPLATE_LINE = re.compile(r"'([^']*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)")


def read_prompts_and_classes(root: str | os.PathLike) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse the dataset's prompts_and_classes.txt (by pattern; the Python in it is never run).

    Args:
        root: The dataset folder.

    Returns:
        ({subject: class name}, object prompt templates, live prompt templates); templates are
        format strings with `{token}` and `{class_name}`, e.g. "a {token} {class_name} in the snow".

    Raises:
        UserError: The file is missing or does not have the expected sections.
    """
    path = pathlib.Path(root).expanduser() / PROMPTS_FILE
    if not path.is_file():
        raise UserError(_missing_dataset_message(path.parent))
    text = path.read_text(encoding="utf-8")

    headings = list(_SECTION_HEADING.finditer(text))
    sections = {
        heading.group(1): text[heading.end() : following.start() if following else len(text)]
        for heading, following in zip(headings, [*headings[1:], None], strict=False)
    }

    classes = {}
    for line in sections.get("Classes", "").splitlines():
        match = _CLASS_LINE.match(line.strip())
        if match and match.group(1) != "subject_name":  # skip the "subject_name,class" header
            classes[match.group(1)] = match.group(2)

    def templates(section: str) -> list[str]:
        found = _TEMPLATE_LINE.findall(sections.get(section, ""))
        return [template.replace("{0}", "{token}").replace("{1}", "{class_name}") for template in found]

    object_templates = templates("Object Prompts")
    live_templates = templates("Live Subject Prompts")
    if not (classes and object_templates and live_templates):
        raise UserError(
            f"{path} does not look like DreamBooth's {PROMPTS_FILE}: expected a 'Classes' table and "
            "'Object Prompts' and 'Live Subject Prompts' lists; download the dataset again"
        )
    return classes, object_templates, live_templates


def _kind_of(class_name: str) -> str:
    return "live" if class_name in LIVE_CLASSES else "object"


def _image_files(folder: pathlib.Path) -> tuple[pathlib.Path, ...]:
    if not folder.is_dir():
        return ()
    return tuple(
        sorted(
            path
            for path in folder.iterdir()
            # Hidden files such as macOS's "._00.jpg" carry an image suffix but are not images.
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
        )
    )


def list_subjects(root: str | os.PathLike) -> list[Subject]:
    """The dataset's subjects present under `root`, sorted by name (the demo subject is not among them).

    A copy holding only some subjects' folders (such as the tests' small fixture) lists just those;
    `prompts_and_classes.txt` may still name all 30.

    Args:
        root: The dataset folder.

    Raises:
        UserError: The dataset is missing, has no subject folder at all, or a subject's folder has
            no images.
    """
    root = pathlib.Path(root).expanduser()
    classes, _, _ = read_prompts_and_classes(root)
    subjects = []
    for name in sorted(classes):
        if not (root / name).exists():
            continue
        images = _image_files(root / name)
        if not images:
            raise UserError(
                f"subject folder {root / name} is missing or has no images, so the dataset at {root} "
                "is incomplete; delete it and run `sparse-db data download` again"
            )
        subjects.append(Subject(name, classes[name], _kind_of(classes[name]), images))
    if not subjects:
        raise UserError(
            f"the dataset at {root} has {PROMPTS_FILE} but none of its subject folders; "
            "delete it and run `sparse-db data download` again"
        )
    return subjects


def get_subject(root: str | os.PathLike | None, name: str) -> Subject:
    """Look a subject up by name.

    Args:
        root: The dataset folder; unused (may be None) for the demo subject.
        name: A DreamBooth subject ("dog6") or "demo" for the synthetic offline subject.

    Raises:
        UserError: The dataset is missing (for a non-demo name) or has no subject of that name.
    """
    if name == DEMO_SUBJECT:
        return Subject(DEMO_SUBJECT, DEMO_CLASS, "object", _image_files(demo_subject_dir()))
    if root is None:
        raise UserError(_missing_dataset_message(resolve_data_root(None)))
    subjects = {subject.name: subject for subject in list_subjects(root)}
    if name not in subjects and name in read_prompts_and_classes(root)[0]:
        raise UserError(
            f"subject {name!r} is not in the partial copy of the dataset at {root} (it holds "
            f"{', '.join(subjects)}); fetch all 30 with `sparse-db data download`"
        )
    if name not in subjects:
        raise UserError(
            f"unknown subject {name!r}; known subjects: {', '.join([DEMO_SUBJECT, *subjects])} "
            "(the DreamBooth ones are fetched by `sparse-db data download`)"
        )
    return subjects[name]


def find_subject(
    name: str | None,
    data_root: str | None = None,
    instance_dir: str | os.PathLike | None = None,
    class_name: str | None = None,
) -> Subject:
    """The subject a command names: the user's own photos when `instance_dir` is given, else the
    DreamBooth subject (or "demo") called `name`, looked up under `resolve_data_root(data_root)`."""
    if instance_dir is not None:
        if not class_name:
            raise UserError("--instance-dir needs --class-name, e.g. --class-name dog")
        return custom_subject(instance_dir, class_name)
    return get_subject(resolve_data_root(data_root), name)


def custom_subject(instance_dir: str | os.PathLike, class_name: str, kind: str | None = None) -> Subject:
    """A subject made of the user's own photos.

    Args:
        instance_dir: Folder with the photos (jpg, png, webp, bmp, tif; hidden files are ignored,
            other files are skipped with a warning).
        class_name: What the photos show, e.g. "dog" or "backpack".
        kind: "live" or "object". Default: "live" for the classes in `LIVE_CLASSES`, else "object".

    Raises:
        UserError: The folder does not exist or holds no images, the class is empty, or the kind
            is not one of `SUBJECT_KINDS`.
    """
    folder = pathlib.Path(instance_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"instance folder {folder} does not exist or is not a folder")
    class_name = class_name.strip()
    if not class_name:
        raise UserError("the class name is empty; give what the photos show, e.g. 'dog' or 'backpack'")
    kind = kind or _kind_of(class_name)
    if kind not in SUBJECT_KINDS:
        raise UserError(f"kind must be one of {', '.join(SUBJECT_KINDS)}, got {kind!r}")
    images = _image_files(folder)
    if not images:
        raise UserError(f"no images ({', '.join('*' + suffix for suffix in IMAGE_SUFFIXES)}) in {folder}")
    skipped = sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path not in images
    )
    if skipped:
        warnings.warn(f"skipping {len(skipped)} non-image file(s) in {folder}: {', '.join(skipped[:5])}", stacklevel=2)
    return Subject(folder.resolve().name, class_name, kind, images)


def evaluation_prompts(subject: Subject, token: str = "zjw", root: str | os.PathLike | None = None) -> list[str]:
    """The 25 DreamBooth evaluation prompts of the subject's kind, e.g. "a zjw dog in the jungle".

    Args:
        subject: The subject; its kind picks the object or live list.
        token: The rare token the adapter binds to the subject.
        root: Dataset folder to read the templates from; None uses the built-in copies.
    """
    if root is None:
        object_templates, live_templates = OBJECT_PROMPT_TEMPLATES, LIVE_PROMPT_TEMPLATES
    else:
        _, object_templates, live_templates = read_prompts_and_classes(root)
    templates = live_templates if subject.kind == "live" else object_templates
    return [template.format(token=token, class_name=subject.class_name) for template in templates]


def instance_prompt(subject: Subject, token: str = "zjw") -> str:
    """The training prompt, "a {token} {class}" as in the paper's setup, e.g. "a zjw dog"."""
    return f"a {token} {subject.class_name}"


# ---------------------------------------------------------------------------------------------
# The synthetic demo subject: one toy robot on four different backgrounds, drawn offline.

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


def _cache_home() -> pathlib.Path:
    from_environment = os.environ.get("SPARSE_DB_CACHE")
    if from_environment:
        return pathlib.Path(from_environment).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home) / "sparse-dreambooth"


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
    target = _cache_home() / _DEMO_DIR_NAME
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as error:
        raise UserError(
            f"cannot write the demo subject to {target.parent} ({error}); set SPARSE_DB_CACHE to a writable folder"
        ) from error
    try:
        for index, (height, width) in enumerate(_DEMO_IMAGE_SIZES):
            _draw_demo_image(index, height, width).save(staging / f"{index:02d}.png")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # anything but "another process finished first" is a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Preparing one image


def _upright_rgb(path: pathlib.Path) -> Image.Image:
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


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `resolution`, rounded down as torchvision's Resize does."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def prepare_image(
    path: str | os.PathLike,
    resolution: int,
    flip: bool = False,
    center_crop: bool = True,
    rng: random.Random | None = None,
) -> PreparedImage:
    """Load one training image the way diffusers' SDXL DreamBooth script does.

    EXIF orientation is applied, the image is converted to RGB, its shorter side is resized to
    `resolution` (Lanczos, the script's default), a `resolution` square is cropped (centred, or at
    a random offset drawn from `rng`), and the crop is mirrored if `flip`.

    With `flip` the recorded crop_top_left is the left edge of the crop in the mirrored resized
    image, `resized_width - left - resolution`, which is what the diffusers script records since it
    flips before cropping (huggingface/diffusers#6547); the older `resolution - left` was a bug.

    Args:
        path: The image file.
        resolution: Side of the square output, e.g. 1024 for SDXL.
        flip: Mirror the crop horizontally (the caller draws this from its own seeded RNG).
        center_crop: Crop the centre; False crops at a random offset drawn from `rng`.
        rng: Seeded random source for the random crop; required when `center_crop` is False.

    Returns:
        The pixels and the SDXL micro-conditioning for this image.

    Raises:
        UserError: The file cannot be read or decoded (missing, not an image, truncated).
        ValueError: `resolution` is not positive, or a random crop is asked for without `rng`.

    A warning is issued when the image is smaller than `resolution` and has to be upscaled.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if not center_crop and rng is None:
        raise ValueError("a random crop needs rng, a seeded random.Random")
    import torch  # here rather than at the top, so the data commands need not load torch

    path = pathlib.Path(path)
    image = _upright_rgb(path)
    width, height = image.size
    if min(width, height) < resolution:
        warnings.warn(
            f"{path} is {width}x{height}, smaller than the training resolution {resolution}; it is "
            "upscaled and will look soft",
            stacklevel=2,
        )
    resized_width, resized_height = _resized_size(width, height, resolution)
    image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)

    if center_crop:
        top = int(round((resized_height - resolution) / 2.0))
        left = int(round((resized_width - resolution) / 2.0))
    else:
        top = rng.randint(0, resized_height - resolution)
        left = rng.randint(0, resized_width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    crop_top_left = (top, left)
    if flip:
        image = ImageOps.mirror(image)
        crop_top_left = (top, resized_width - left - resolution)

    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).contiguous()
    return PreparedImage(
        pixels=pixels / 127.5 - 1.0,
        original_size=(height, width),
        crop_top_left=crop_top_left,
        target_size=(resolution, resolution),
    )


# ---------------------------------------------------------------------------------------------
# Downloading the dataset

_DOWNLOAD_CHUNK_BYTES = 1 << 20
_NETWORK_TIMEOUT_SECONDS = 60


def _packaged_manifest() -> dict[str, str]:
    """sha256 of every file of the dataset, keyed by path relative to the dataset folder."""
    text = importlib.resources.files("sparse_dreambooth").joinpath("dreambooth_manifest.json").read_text()
    return json.loads(text)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_license_text(relative: str) -> bool:
    """The repository's top-level LICENSE*, copied in beside the data for attribution."""
    return "/" not in relative and relative.upper().startswith("LICENSE")


def _manifest_problems(folder: pathlib.Path, manifest: dict[str, str]) -> list[str]:
    """One line for each manifest file that is missing from `folder` or has another checksum.

    Only a warning for the license text: no code reads it, and its name and bytes upstream are
    the one part of the manifest not checked against GitHub's archive itself. The data (images,
    prompts_and_classes.txt, the photographers' credits in references_and_licenses.txt) must match.
    """
    problems = []
    for relative, expected in sorted(manifest.items()):
        path = folder / relative
        if not path.is_file():
            problem = f"{relative} is missing"
        elif _sha256(path) != expected:
            problem = f"{relative} has the wrong sha256"
        else:
            continue
        if _is_license_text(relative):
            warnings.warn(f"{problem}; the dataset is CC BY 4.0, credits in references_and_licenses.txt", stacklevel=2)
        else:
            problems.append(problem)
    return problems


def _summarise(problems: list[str]) -> str:
    shown = "; ".join(problems[:3])
    return shown + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")


def _manual_download_hint(url: str) -> str:
    return f"download {url} by hand, unzip it and pass its dataset/ folder as --data-root (or set SPARSE_DB_DATA)"


def _fetch(url: str, destination: pathlib.Path, progress: bool) -> None:
    """Stream `url` into `destination`, failing with a UserError on any network problem."""

    def failure(reason: object) -> UserError:
        return UserError(f"could not download {url} ({reason}); {_manual_download_hint(url)}")

    request = urllib.request.Request(url, headers={"User-Agent": f"sparse-dreambooth/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=_NETWORK_TIMEOUT_SECONDS) as response:
            length_header = response.headers.get("Content-Length")  # absent when the server streams
            expected_bytes = int(length_header) if length_header else None
            received_bytes = 0
            bar = tqdm(total=expected_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
            with bar, open(destination, "wb") as file:
                while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                    file.write(chunk)
                    received_bytes += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise failure(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise failure(error.reason) from error
    except (http.client.HTTPException, OSError) as error:
        raise failure(error) from error
    if expected_bytes is not None and received_bytes != expected_bytes:
        raise failure(f"the connection closed after {received_bytes} of {expected_bytes} bytes")


def _refuse_unsafe_member(member: zipfile.ZipInfo) -> None:
    name = member.filename
    absolute = name.startswith(("/", "\\")) or pathlib.PureWindowsPath(name).drive
    climbs_out = ".." in pathlib.PurePosixPath(name.replace("\\", "/")).parts
    is_symlink = stat.S_ISLNK(member.external_attr >> 16)
    if absolute or climbs_out or is_symlink:
        raise UserError(
            f"refusing the archive: member {name!r} is an absolute path, climbs out with '..' or is a "
            "symbolic link, so it could write outside the dataset folder"
        )


def _unpack_dataset(archive: pathlib.Path, staging: pathlib.Path, url: str) -> None:
    """Unpack the archive's `<top>/dataset/` folder, plus `<top>/LICENSE*`, into `staging`.

    Every member is checked before anything is written, so a hostile archive writes nothing.
    """
    try:
        with zipfile.ZipFile(archive) as zip_file:
            members = zip_file.infolist()
            for member in members:
                _refuse_unsafe_member(member)

            placements = []  # (member, path parts inside the dataset folder)
            top_folders = set()
            for member in members:
                parts = pathlib.PurePosixPath(member.filename).parts
                if len(parts) >= 3 and parts[1] == "dataset":
                    placements.append((member, parts[2:]))
                    top_folders.add(parts[0])
                elif len(parts) == 2 and parts[1].upper().startswith("LICENSE") and not member.is_dir():
                    placements.append((member, parts[1:]))
            if len(top_folders) != 1:
                raise UserError(
                    f"{url} does not hold exactly one <folder>/dataset/ folder (found {len(top_folders)}); "
                    "is it the google/dreambooth archive?"
                )

            staging.mkdir()
            for member, relative_parts in placements:
                target = staging.joinpath(*relative_parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zip_file.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UserError(
            f"the download from {url} is not a valid zip archive ({error}); try again, or {_manual_download_hint(url)}"
        ) from error


def download_dataset(
    root: str | os.PathLike,
    url: str = DATASET_URL,
    manifest: dict[str, str] | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Download, verify and unpack the DreamBooth dataset into `root`.

    The zip is streamed to a temporary file next to `root` and its `*/dataset/` folder is unpacked
    into a temporary folder there (members that are absolute, contain '..' or are symbolic links
    make the whole archive refused). Every file in the manifest is checked by sha256, and only then
    is the folder renamed to `root`: an interrupted or refused download leaves nothing at `root`.
    If `root` already holds a dataset that passes the check, nothing is downloaded.

    Args:
        root: Where the dataset goes; its parent must be writable. Must not exist, or be empty,
            or already hold the dataset.
        url: The zip to fetch (https:// or file://), laid out as `<top>/dataset/...`.
        manifest: {path relative to the dataset folder: sha256}; None uses the packaged
            dreambooth_manifest.json, {} checks nothing.
        progress: Show a progress bar on stderr.

    Returns:
        `root`.

    Raises:
        UserError: Network failure, a bad or unsafe archive, a missing file or checksum mismatch,
            or a `root` that holds something else.
    """
    root = pathlib.Path(root).expanduser()
    manifest = _packaged_manifest() if manifest is None else manifest

    if root.is_dir() and (root / PROMPTS_FILE).is_file():
        problems = _manifest_problems(root, manifest)
        if problems:
            raise UserError(
                f"{root} holds a dataset that fails the checksum test: {_summarise(problems)}; "
                "delete it and run `sparse-db data download` again"
            )
        logger.info("The DreamBooth dataset is already at %s and passes the checksum test.", root)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root} exists and is not a DreamBooth dataset; remove it or choose another --data-root")

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch_holder = tempfile.TemporaryDirectory(prefix=f".{root.name}.download-", dir=root.parent)
    except OSError as error:
        raise UserError(f"cannot write next to {root} ({error}); choose another --data-root") from error
    with scratch_holder as scratch_name:
        scratch = pathlib.Path(scratch_name)
        archive, staging = scratch / "dreambooth.zip", scratch / "dataset"
        _fetch(url, archive, progress)
        _unpack_dataset(archive, staging, url)
        problems = _manifest_problems(staging, manifest)
        if problems:
            raise UserError(
                f"the archive from {url} does not match the expected files: {_summarise(problems)}; "
                f"nothing was written to {root}. The download may be corrupt (try again) or the "
                "upstream dataset changed"
            )
        if root.is_dir():
            root.rmdir()  # an empty folder, checked above; rename cannot replace it on every OS
        staging.rename(root)
    return root
