"""Training under faults, through the public CLI (`python -m training.train`) and API (`train`).

What tests/training/test_train.py already covers (not repeated here): an exception after
training a window and before its checkpoint, then `--resume`, gives identical
metrics and weights (in-process); ENOSPC while `save_checkpoint` writes keeps
the previous checkpoint; a crash between the renames rolls forward; a file in
the way of --out gives RunError.

Added here:
- a real SIGKILL of the CLI in the middle of a window, then `--resume`: the same
  final metrics as an uninterrupted CLI run;
- a really full disk (a small tmpfs filled up while the CLI trains; needs root
  to mount, skipped otherwise): the run stops with a clear error, the last good
  checkpoint loads, and `--resume` after freeing space gives the same metrics;
- an output folder that became read-only (tmpfs remounted ro; as non-root a
  chmod'ed folder): `--resume` refuses with RunError, the checkpoint is intact;
- ENOSPC through `train()` (any user).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.triton_util import PROJECT_ROOT
from training.checkpoint import RunError, load_run, read_meta

END_WINDOW = 4  # trains windows 1..3 (evaluates on 2..4)
CLI_FLAGS = ["--epochs", "2", "--batch-size", "16", "--threads", "1", "--no-progress", "--no-baselines"]


def cli(data: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--end-window",
        str(END_WINDOW),
        *CLI_FLAGS,
        *extra,
    ]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT
    )


def window_of(out: Path) -> int | None:
    """The finished window recorded in out/meta.json, read without recovering (the writer may be running)."""
    try:
        return json.loads((out / "meta.json").read_text()).get("window")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for_window(proc: subprocess.Popen, out: Path, window: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while window_of(out) != window:
        assert proc.poll() is None, (
            f"training exited ({proc.returncode}) before window {window}: {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline, f"no window {window} after {timeout_s} s"
        time.sleep(0.01)


def model_metrics(metrics: dict) -> list[dict]:
    keys = ("train_window", "eval_window", "ndcg@20", "recall@20", "mrr@20")
    return [{k: row.get(k) for k in keys} for row in metrics["windows"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_synthetic_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = cli(tiny_synthetic_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


# --- SIGKILL mid-window ----------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_window_then_resume_gives_the_same_metrics(tiny_synthetic_data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = cli(tiny_synthetic_data, out, wait=False)
    try:
        wait_for_window(proc, out, 1)  # window 1 checkpointed: window 2 is under way
        time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert read_meta(out)["window"] == 1, "the kill did not land in window 2"
    load_run(out)  # the last good checkpoint loads
    resumed = cli(tiny_synthetic_data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_metrics(json.loads((out / "metrics.json").read_text())) == model_metrics(uninterrupted)


# --- full disk -------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write zeros into path/filler until the file system is full."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


@pytest.mark.slow
def test_full_disk_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
    tiny_synthetic_data, uninterrupted, tmp_path
):
    with tmpfs(tmp_path / "disk", "32m") as disk:
        out = disk / "run"
        proc = cli(tiny_synthetic_data, out, wait=False)
        try:
            wait_for_window(proc, out, 1)
            filler = fill(disk)
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0, "training finished on a full disk?"
        assert "No space left on device" in stderr, stderr[-3000:]
        meta = read_meta(
            out
        )  # recovers (drops a partial checkpoint *.tmp) and checks model.pt/optim.pt's sha256
        assert meta["window"] == 1
        load_run(out)
        assert not [
            p for p in out.glob("*.tmp") if p.name.split(".tmp")[0] in ("model.pt", "optim.pt", "meta.json")
        ]
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error:") and "Traceback" not in stderr, stderr[
            -3000:
        ]
        assert "--resume" in last, last
        assert not sorted(p.name for p in out.glob("*.tmp")), "partial files left behind on the full disk"
        filler.unlink()
        resumed = cli(tiny_synthetic_data, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert model_metrics(json.loads((out / "metrics.json").read_text())) == model_metrics(uninterrupted)


# --- unwritable output folder ----------------------------------------------------------------------
def _tiny_cfg(data: Path, out: Path, **kw):
    from training.config import TrainConfig

    base = dict(
        data=str(data),
        out=str(out),
        end_window=2,
        epochs=1,
        batch_size=16,
        threads=1,
        progress=False,
        baselines=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` unwritable: remount its tmpfs read-only (root), else chmod 0555 (non-root)."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_read_only_output_folder_is_refused_and_checkpoint_intact(tiny_synthetic_data, tmp_path):
    from training.train import train

    ctx = tmpfs(tmp_path / "disk", "32m") if os.geteuid() == 0 else contextlib.nullcontext(tmp_path / "disk")
    with ctx as disk:
        disk.mkdir(exist_ok=True)
        out = disk / "run"
        train(_tiny_cfg(tiny_synthetic_data, out))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with read_only(disk if os.geteuid() == 0 else out):
            with pytest.raises(RunError, match="cannot write to the output folder"):
                train(_tiny_cfg(tiny_synthetic_data, out, end_window=3, resume=True))
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
            assert read_meta(out, recover=False)["window"] == 1


def test_enospc_through_train_keeps_the_last_checkpoint(tiny_synthetic_data, tmp_path, monkeypatch):
    """Any user: the second window's checkpoint write fails with ENOSPC; train() raises OSError(ENOSPC)
    and the first window's checkpoint stays loadable."""
    import training.integrity as integrity_mod
    from training.train import train

    out = tmp_path / "run"
    real = integrity_mod.write_tmp
    calls = {"n": 0}

    def full_after_first_checkpoint(path, data):
        calls["n"] += 1
        if window_of(out) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(integrity_mod, "write_tmp", full_after_first_checkpoint)
    with pytest.raises(OSError) as info:
        train(_tiny_cfg(tiny_synthetic_data, out, end_window=3))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(integrity_mod, "write_tmp", real)
    assert read_meta(out)["window"] == 1
    load_run(out)
    shutil.rmtree(out)
