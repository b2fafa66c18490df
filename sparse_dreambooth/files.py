"""Atomic file and folder writes (a reader, or a crash, never sees half of one) and the cache folder."""

import contextlib
import functools
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def cache_dir() -> Path:
    """Directory for files this package builds once and reuses (tiny model, demo subject, LPIPS).

    Returns:
        `$SPARSE_DB_CACHE` if set, else `$XDG_CACHE_HOME/sparse-dreambooth` (default
        `~/.cache/sparse-dreambooth`). It may not exist yet.
    """
    configured = os.environ.get("SPARSE_DB_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse-dreambooth"


@functools.cache
def _umask() -> int:
    """The process umask, read once.

    Linux reports it in /proc/self/status; elsewhere the only way is os.umask's set-and-restore,
    which is process-wide, so it is done once here (at first write) rather than on every file.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plain mkdir() gives a new folder: 0o777 minus the umask."""
    return 0o777 & ~_umask()


def share_like_open(folder) -> None:
    """Give every file and folder under `folder` the modes open()/mkdir() would have given them.

    For trees written by other libraries: safetensors' save_file (and so diffusers' save_pretrained)
    creates owner-only (0o600) files, which a UI running as another user cannot read.
    """
    folder = Path(folder)
    os.chmod(folder, folder_mode())
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode())
        for name in files:
            os.chmod(os.path.join(root, name), file_mode())


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    Rename within one directory is atomic on POSIX, so an interrupted write leaves the previous
    file (or nothing) in place, never a truncated one. The file gets the mode a plain open() would
    give it (mkstemp's own is owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path, *, replace: bool = True):
    """Yield an empty folder beside `path` that becomes `path` once the block succeeds.

    A crash or an exception leaves the previous `path` (or nothing), never a half-written folder.

    Args:
        path: The folder to create.
        replace: True swaps out whatever is at `path`. False keeps a `path` that appeared in the
            meantime (another process finishing the same work first) and discards this copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its owner-only permissions would carry over to a shared folder.
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        # Libraries writing into the folder (safetensors' save_file, so diffusers' save_pretrained)
        # create owner-only files; what we publish gets the modes a plain open() would give.
        share_like_open(staging)
        if replace and (path.exists() or path.is_symlink()):
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            try:
                os.rename(staging, path)  # atomic, and refuses to replace a non-empty folder
            except OSError:
                if not path.is_dir():  # anything but "another process finished first" is a real error
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically and byte-for-byte reproducibly.

    safetensors writes its metadata map in hash order, which changes from process to process;
    we rewrite the (same-length) JSON header with sorted keys so the same tensors and metadata
    always give the same bytes.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    header_length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert len(text) <= header_length, "a sorted header is never longer than the original"
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob[:8] + text.ljust(header_length) + blob[8 + header_length :])
