"""Download the DreamBooth dataset safely: checked archive members, sha256 of every file, and
nothing at the destination unless all of it is right.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import json
import logging
import os
import pathlib
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib

from tqdm import tqdm

from sparse_dreambooth import __version__
from sparse_dreambooth.data.subjects import PROMPTS_FILE
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder

logger = logging.getLogger(__name__)

DATASET_URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
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
    """Unpack the archive's `<top>/dataset/` folder, plus `<top>/LICENSE*`, into the empty `staging`.

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
    with scratch_holder as scratch_name, atomic_folder(root) as staging:
        archive = pathlib.Path(scratch_name) / "dreambooth.zip"
        _fetch(url, archive, progress)
        _unpack_dataset(archive, staging, url)
        problems = _manifest_problems(staging, manifest)
        if problems:
            raise UserError(
                f"the archive from {url} does not match the expected files: {_summarise(problems)}; "
                f"nothing was written to {root}. The download may be corrupt (try again) or the "
                "upstream dataset changed"
            )
    return root
