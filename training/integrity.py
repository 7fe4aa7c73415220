"""File hashes, atomic writes and the one integrity error, for every stage.

    from training.integrity import IntegrityError, atomic_write, file_sha256
    atomic_write(path, data)      # readers see the old or the new bytes, never a torn file
    file_sha256(path)             # hex digest, read in 1 MiB chunks

Imports only the standard library: it can be copied unchanged into a Triton
model folder (a stock tritonserver has the standard library and numpy).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"  # `<file>.tmp`: written and fsync'ed, then os.replace()d into place


class IntegrityError(RuntimeError):
    """A file does not match the sha256 recorded for it (workflow, exported repository): refuse to load it."""


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tmp(path: Path, data: bytes) -> Path:
    """Write `data` to `path`.tmp and fsync it; the caller os.replace()s it into place."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind (e.g. on a full disk)
        raise
    return tmp


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    os.replace(write_tmp(path, data), path)
