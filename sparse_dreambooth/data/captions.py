"""Per-image captions, made into training prompts.

A caption comes from a sidecar text file beside its photo (`00.jpg` -> `00.txt`, as kohya reads
them) or from the folder's `metadata.jsonl`, one `{"file_name": "00.jpg", "text": "..."}` per line
(Hugging Face imagefolder's layout). `{token}` and `{class}` in a caption, a caption template or the
class prompt are filled from the settings; `{caption}` in the template is the caption. A photo
without a caption is trained on the instance prompt, "a {token} {class}".

Torch-free, so reading captions happens with the other input checks, before any model loads.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import TYPE_CHECKING

from sparse_dreambooth.errors import UserError

if TYPE_CHECKING:
    from sparse_dreambooth.config import DataSettings
    from sparse_dreambooth.data.subjects import Subject

METADATA_FILE = "metadata.jsonl"
SIDECAR_SUFFIX = ".txt"


def fill_placeholders(text: str, token: str, class_name: str, caption: str | None = None) -> str:
    """`text` with {token}, {class} (and {caption}) replaced; other braces are left as they are."""
    text = text.replace("{token}", token).replace("{class}", class_name)
    return text if caption is None else text.replace("{caption}", caption)


def _sidecar_captions(image_paths: tuple[pathlib.Path, ...]) -> dict[pathlib.Path, str]:
    captions = {}
    for path in image_paths:
        sidecar = path.with_suffix(SIDECAR_SUFFIX)
        if not sidecar.is_file():
            continue
        try:
            captions[path] = sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"caption {sidecar} is not UTF-8 text; save it as UTF-8") from None
        except OSError as error:
            raise UserError(f"cannot read caption {sidecar}: {error.strerror or error}") from None
    return captions


def _metadata_captions(metadata: pathlib.Path, image_paths: tuple[pathlib.Path, ...]) -> dict[pathlib.Path, str]:
    by_location = {path.resolve(): path for path in image_paths}
    captions = {}
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {metadata}: {getattr(error, 'strerror', None) or error}") from None
    unknown = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{metadata} line {number} is not JSON ({error.msg}); write one object per line") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise UserError(f'{metadata} line {number} has no "file_name"; write {{"file_name": ..., "text": ...}}')
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            raise UserError(f'{metadata} line {number}: "text" must be a string, got {text!r}')
        path = by_location.get((metadata.parent / entry["file_name"]).resolve())  # relative to the file
        if path is None:
            unknown.append(entry["file_name"])
        elif text is not None:
            captions[path] = text.strip()
    if unknown:
        warnings.warn(
            f"{metadata} names {len(unknown)} file(s) not among the photos: {', '.join(unknown[:5])}", stacklevel=2
        )
    return captions


def read_captions(image_paths: tuple[pathlib.Path, ...], source: str) -> dict[pathlib.Path, str]:
    """The caption of each photo that has a non-empty one.

    Args:
        image_paths: The subject's photos, all in one folder.
        source: "none", "sidecar" (IMAGE.txt), "metadata" (the folder's metadata.jsonl), or
            "auto" (metadata.jsonl if the folder has one, else sidecars).

    Raises:
        UserError: metadata.jsonl is asked for but missing, or a caption file cannot be read.
    """
    if source == "none" or not image_paths:
        return {}
    metadata = image_paths[0].parent / METADATA_FILE
    if source == "metadata" and not metadata.is_file():
        raise UserError(f"--captions metadata: no {METADATA_FILE} in {metadata.parent}; use --captions sidecar or auto")
    if source == "sidecar" or (source == "auto" and not metadata.is_file()):
        captions = _sidecar_captions(image_paths)
    else:
        captions = _metadata_captions(metadata, image_paths)
    return {path: caption for path, caption in captions.items() if caption}


def training_prompts(subject: Subject, settings: DataSettings) -> list[str]:
    """One prompt per photo of `subject`, in its order: the templated caption, or the instance prompt.

    Warns when some photos have no caption, naming how many fall back.
    """
    from sparse_dreambooth.data.subjects import instance_prompt

    fallback = instance_prompt(subject, settings.token)
    captions = read_captions(subject.image_paths, settings.captions)
    if settings.captions != "none" and len(captions) < len(subject.image_paths):
        warnings.warn(
            f"{len(subject.image_paths) - len(captions)} of {len(subject.image_paths)} photos have no caption "
            f"({settings.captions}); they train on the instance prompt {fallback!r}",
            stacklevel=2,
        )
    template = settings.caption_template or "{caption}"
    prompts = []
    for path in subject.image_paths:
        if path not in captions:
            prompts.append(fallback)
            continue
        caption = fill_placeholders(captions[path], settings.token, subject.class_name)
        prompts.append(fill_placeholders(template, settings.token, subject.class_name, caption))
    return prompts
