"""Training subjects: the DreamBooth dataset's 30, a folder of the user's photos, or a micro subject.

A *subject* is a handful of photos of one thing plus its class name ("dog", "backpack"). The
DreamBooth protocol (Ruiz et al. 2023) has 30 of them, 9 "live" (the cats and dogs) and 21
"objects"; each kind has its own 25 evaluation prompts. The micro subjects ("micro/teal_dog", ...)
are rendered offline for `--model micro`; "demo" is an alias of "micro/robot_toy".
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from dataclasses import dataclass

from sparse_dreambooth.data.captions import METADATA_FILE, SIDECAR_SUFFIX
from sparse_dreambooth.data.micro import DEMO_ALIAS_OF, DEMO_SUBJECT, MICRO_PREFIX, micro_subject_dir
from sparse_dreambooth.errors import UserError, did_you_mean

LIVE_CLASSES = ("cat", "dog")  # the protocol's 9 live subjects are the cats and dogs
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
        name: The name it was looked up by: "dog6", "micro/teal_dog", "demo"; a custom
            subject's folder name.
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


def image_files(folder: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """The images directly in `folder`, sorted by name; none if it is not a folder."""
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
    """The dataset's subjects present under `root`, sorted by name (the micro subjects are not among them).

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
        images = image_files(root / name)
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


def micro_subject(name: str) -> Subject:
    """A micro subject by its full name ("micro/teal_dog") or "demo", its photos rendered if need be.

    Raises:
        UserError: No micro subject has that name.
    """
    from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS
    from sparse_dreambooth.micro.world import CLASSES

    short = DEMO_ALIAS_OF if name == DEMO_SUBJECT else name.removeprefix(MICRO_PREFIX)
    if short not in MICRO_SUBJECTS:
        known = [MICRO_PREFIX + known_name for known_name in sorted(MICRO_SUBJECTS)]
        raise UserError(
            f"unknown micro subject {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}, "
            f"and {DEMO_SUBJECT!r} ({MICRO_PREFIX}{DEMO_ALIAS_OF})"
        )
    class_name = MICRO_SUBJECTS[short].class_name
    return Subject(name, class_name, CLASSES[class_name], image_files(micro_subject_dir(short)))


def micro_subjects() -> list[Subject]:
    """Every micro subject, by its full name, sorted (the "demo" alias is not repeated)."""
    from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS

    return [micro_subject(MICRO_PREFIX + name) for name in sorted(MICRO_SUBJECTS)]


def get_subject(root: str | os.PathLike | None, name: str) -> Subject:
    """Look a subject up by name.

    Args:
        root: The dataset folder; unused (may be None) for micro subjects and "demo".
        name: A DreamBooth subject ("dog6"), a micro subject ("micro/teal_dog") or "demo" (an
            alias of "micro/robot_toy").

    Raises:
        UserError: The dataset is missing (for a DreamBooth name) or has no subject of that name.
    """
    if name == DEMO_SUBJECT or name.startswith(MICRO_PREFIX):
        return micro_subject(name)
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
            f"unknown subject {name!r}; known subjects: {', '.join([DEMO_SUBJECT, *subjects])}, and the "
            f"micro ones listed by `sparse-db data list` ({MICRO_PREFIX}NAME; the DreamBooth ones are "
            "fetched by `sparse-db data download`)"
        )
    return subjects[name]


def find_subject(
    name: str | None,
    data_root: str | None = None,
    instance_dir: str | os.PathLike | None = None,
    class_name: str | None = None,
) -> Subject:
    """The subject a command names: the user's own photos when `instance_dir` is given, else the
    subject called `name`: a micro one ("micro/NAME", "demo") or a DreamBooth one, looked up under
    `resolve_data_root(data_root)`."""
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
    images = image_files(folder)
    if not images:
        raise UserError(f"no images ({', '.join('*' + suffix for suffix in IMAGE_SUFFIXES)}) in {folder}")
    # Caption files (a photo's IMAGE.txt, metadata.jsonl) belong beside the photos: no warning for them.
    captions = {image.with_suffix(SIDECAR_SUFFIX) for image in images} | {folder / METADATA_FILE}
    skipped = sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path not in images and path not in captions
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
