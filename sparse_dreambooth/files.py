"""Atomic file writes: a reader (or a crash) never sees half a file."""

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    Rename within one directory is atomic on POSIX, so an interrupted write leaves the previous
    file (or nothing) in place, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
