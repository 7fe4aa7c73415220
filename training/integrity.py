"""File hashes, atomic writes and the one integrity error, for every stage.

    from training.integrity import IntegrityError, atomic_write, file_sha256
    atomic_write(path, data)      # readers see the old or the new bytes, never a torn file
    file_sha256(path)             # hex digest, read in 1 MiB chunks

    write_folder_record(folder, model_files=model_level_sha256(folder.parent))
                                  # folder/sessrec_files.json: sha256 of every other file of the version
                                  # folder, and of the model folder's own files (config.pbtxt, warmup/)
    verify_folder(folder)         # IntegrityError naming the file unless both match

Imports only the standard library, Python 3.10 syntax: `python -m export` copies
this file verbatim into every Python-backend version folder as
`sessrec_integrity.py`, and each step's `initialize` calls `verify_folder` on its
own folder before it loads anything (a stock tritonserver has the standard
library and numpy).
"""

from __future__ import annotations

import hashlib
import json
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


# --- per-folder records (each Triton model version folder verifies on its own) -------------
FOLDER_RECORD = "sessrec_files.json"  # <model>/<version>/sessrec_files.json, written last by `python -m export`
MODEL_FILES = "model_files_sha256"  # its key for the model folder's config.pbtxt and warmup/ files


def _folder_files(folder: Path) -> list[Path]:
    """Files under `folder` except the record itself and __pycache__ (the stub writes it on import)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(folder).parts and p.relative_to(folder).as_posix() != FOLDER_RECORD
    )


def model_level_files(model_dir: Path) -> list[Path]:
    """Files of a Triton model folder outside its version folders: config.pbtxt, warmup/* (what Triton
    reads besides <version>/). Version folders (numeric names), staged ones (hidden: `.<v>.tmp`) and
    __pycache__ are not part of it."""
    out = []
    for p in Path(model_dir).rglob("*"):
        parts = p.relative_to(model_dir).parts
        if not p.is_file() or "__pycache__" in parts or parts[0].isdigit() or parts[0].startswith("."):
            continue
        out.append(p)
    return sorted(out)


def model_level_sha256(model_dir: str | os.PathLike) -> dict[str, str]:
    """{path relative to the model folder: sha256} of `model_level_files`."""
    model_dir = Path(model_dir)
    return {p.relative_to(model_dir).as_posix(): file_sha256(p) for p in model_level_files(model_dir)}


def write_folder_record(
    folder: str | os.PathLike, extra: dict | None = None, model_files: dict[str, str] | None = None
) -> Path:
    """Record the sha256 of every file of `folder` in folder/sessrec_files.json (atomic; write it last).

    `model_files` ({path relative to the model folder (folder's parent): sha256}, e.g.
    `model_level_sha256(folder.parent)`): the model folder's config.pbtxt and warm-up files, which
    Triton reads for this version too; verify_folder then checks them and refuses unlisted ones."""
    folder = Path(folder)
    record = dict(extra or {})
    record["files_sha256"] = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _folder_files(folder)}
    if model_files is not None:
        record[MODEL_FILES] = dict(sorted(model_files.items()))
    path = folder / FOLDER_RECORD
    atomic_write(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def _check_listed(base: Path, expected: dict, present: list[Path], record_path: Path, where: str) -> None:
    """Every file listed in `expected` (relative to `base`) exists with its sha256; no file of `present`
    is unlisted. IntegrityError naming the file otherwise."""
    for rel, want in sorted(expected.items()):
        file = base / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(f"{record_path} lists {rel!r}, outside its folder: refusing to load")
        if not file.is_file():
            raise IntegrityError(f"{file} is missing (its sha256 is recorded in {FOLDER_RECORD}): re-export the repository")
        got = file_sha256(file)
        if got != want:
            raise IntegrityError(
                f"{file} has sha256 {got}, but {FOLDER_RECORD} records {want} (written by `python -m export`): "
                "the file was modified after export; refusing to load it (re-export the repository)"
            )
    for file in present:
        if file.relative_to(base).as_posix() not in expected:
            raise IntegrityError(
                f"{file} is not listed in {FOLDER_RECORD}{where}: refusing to load a folder holding "
                "files that `python -m export` did not write"
            )


def verify_folder(folder: str | os.PathLike) -> dict:
    """Check `folder` against its sessrec_files.json before anything there is loaded; returns the record.

    Every listed file must exist with its recorded sha256, and no other file may be
    there (`__pycache__` aside). When the record lists the model folder's own files
    (`model_files_sha256`: config.pbtxt, warmup/*), those are checked the same way,
    relative to the model folder (the parent of `folder`). Raises IntegrityError
    naming the file otherwise."""
    folder = Path(folder)
    path = folder / FOLDER_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise IntegrityError(
            f"{path} not found: this model folder was not written by `python -m export` (or was copied "
            "without it); refusing to load files whose sha256 was never recorded"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}): re-export the repository") from e
    expected = record.get("files_sha256")
    if not isinstance(expected, dict) or not expected:
        raise IntegrityError(f"{path} records no files: re-export the repository")
    _check_listed(folder, expected, _folder_files(folder), path, "")
    model_files = record.get(MODEL_FILES)
    if model_files is not None:
        if not isinstance(model_files, dict):
            raise IntegrityError(f"{path}: {MODEL_FILES} is not a mapping: re-export the repository")
        model_dir = folder.parent
        _check_listed(model_dir, model_files, model_level_files(model_dir), path, f" ({MODEL_FILES})")
    return record
