"""Checkpoint I/O of a training run: RUN/model.pt + optim.pt + meta.json.

    save_checkpoint(run_dir, model.state_dict(), optim.state_dict(), meta)
    meta = read_meta(run_dir)            # completes an interrupted write, checks the sha256s
    model, meta = load_run(run_dir)      # SessionModel in eval mode, rebuilt without unpickling code

Writes are atomic (see `save_checkpoint`); state dicts are loaded with
`weights_only=True`. Imports only torch (and training.model inside `load_run`).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training import integrity
from training.integrity import TMP_SUFFIX, bytes_sha256, file_sha256

if TYPE_CHECKING:
    from training.model import SessionModel

MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"
META_FILE = "meta.json"
MEMBERS_DIR = "members"  # RUN/members/<k>/: an ensemble run's members (training/members.py)
MEMBERS_KEY = "members"  # meta.json of an ensemble run: the members' folders, relative to it
WINDOWS_DIR = "windows"  # RUN/windows/<t>/: model.pt + meta.json after window t (--keep-windows)
__all__ = [
    "META_FILE",
    "MEMBERS_DIR",
    "MEMBERS_KEY",
    "MODEL_FILE",
    "OPTIM_FILE",
    "TMP_SUFFIX",
    "WINDOWS_DIR",
    "RunError",
    "check_writable",
    "load_run",
    "read_meta",
    "recover_checkpoint",
    "save_checkpoint",
]


class RunError(RuntimeError):
    """A run folder cannot be used (unwritable, damaged checkpoint, config mismatch)."""


def check_writable(out: Path) -> None:
    """Create the run folder `out` if needed and check a file can be written in it (RunError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(
            f"cannot write to the output folder {out} ({e.strerror or e}); choose another --out"
        ) from e


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: Path, model_state: dict, optim_state: dict, meta: dict) -> None:
    """model.pt + optim.pt + meta.json, written so a crash or a full disk never loses the last good one.

    All three new files are first written completely as *.tmp (fsync'ed);
    meta.json.tmp records the sha256 of the new model.pt and optim.pt. Only
    then are they renamed into place, meta.json last. A crash during the
    writes leaves the old checkpoint untouched; a crash between the renames is
    completed by `recover_checkpoint` (roll forward), which every reader calls.
    """
    model_bytes, optim_bytes = _torch_bytes(model_state), _torch_bytes(optim_state)
    meta = dict(meta, files={MODEL_FILE: bytes_sha256(model_bytes), OPTIM_FILE: bytes_sha256(optim_bytes)})
    tmps = [
        (integrity.write_tmp(run_dir / MODEL_FILE, model_bytes), run_dir / MODEL_FILE),
        (integrity.write_tmp(run_dir / OPTIM_FILE, optim_bytes), run_dir / OPTIM_FILE),
        (integrity.write_tmp(run_dir / META_FILE, json.dumps(meta, indent=2).encode()), run_dir / META_FILE),
    ]
    for tmp, final in tmps:
        os.replace(tmp, final)


def recover_checkpoint(run_dir: Path) -> None:
    """Finish or discard a checkpoint write that a crash interrupted (see `save_checkpoint`)."""
    meta_tmp = run_dir / (META_FILE + TMP_SUFFIX)
    tmps = [run_dir / (n + TMP_SUFFIX) for n in (MODEL_FILE, OPTIM_FILE, META_FILE)]
    if not meta_tmp.exists():
        for t in tmps:  # a write that never reached meta.json.tmp: the old checkpoint stands
            t.unlink(missing_ok=True)
        return
    try:
        files = json.loads(meta_tmp.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        files = None  # torn meta.json.tmp: no rename had started
    if files is not None:
        ok = True
        for name in (MODEL_FILE, OPTIM_FILE):
            final, tmp = run_dir / name, run_dir / (name + TMP_SUFFIX)
            if tmp.exists() and file_sha256(tmp) == files[name]:
                continue  # not renamed yet, complete
            if final.exists() and file_sha256(final) == files[name]:
                continue  # already renamed
            ok = False
        if ok:  # roll forward
            for name in (MODEL_FILE, OPTIM_FILE, META_FILE):
                tmp = run_dir / (name + TMP_SUFFIX)
                if tmp.exists():
                    os.replace(tmp, run_dir / name)
            return
    for t in tmps:
        t.unlink(missing_ok=True)


def read_meta(run_dir: str | Path, recover: bool = True) -> dict:
    """RUN/meta.json, after completing an interrupted checkpoint write; checks the file hashes."""
    run_dir = Path(run_dir)
    if recover:
        recover_checkpoint(run_dir)
    path = run_dir / META_FILE
    if not path.is_file():
        raise RunError(
            f"{path} does not exist: {run_dir} holds no finished window of `python -m training.train`"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from e
    for name, sha in meta.get("files", {}).items():
        f = run_dir / name
        if not f.is_file() or file_sha256(f) != sha:
            raise RunError(f"{f} does not match the sha256 recorded in {path}: the checkpoint is damaged")
    return meta


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SessionModel, dict]:
    """Rebuild the trained model of RUN/ (in eval mode) without unpickling code.

    Returns (model, meta); meta holds "model_config", "schema", "window",
    "workflow_sha256", "metrics", "train_config".
    """
    from training.model import ModelConfig, SessionModel  # here: the rest of this module needs no model code

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if MEMBERS_KEY in meta:  # an ensemble run (TrainConfig.members): its members, tables shared
        from training.members import load_members

        return load_members(run_dir, meta, device), meta
    model = SessionModel(ModelConfig.from_dict(meta["model_config"]))
    state = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
