"""Switch a live server from whole-repository version N to M without downtime (issue 12).

    python -m export --run RUN --data DATA --out REPO --window 5 --new-version   # stages N+1
    SESSREC_ADMIN_KEY=... python -m export.versions --url 127.0.0.1:8000 --repo REPO --version N+1

    from export.versions import swap_to
    swap_to(server.http_url, repo, version, server.admin_headers)   # also: rollback to N

The "Daily swap" of ../shared/notes/triton-deploy.md section 4, in this order:

1. every version folder of M exists and holds its sessrec_files.json (staged completely
   by `export.repository.add_ensemble_version`, renamed into place);
2. for each step (preprocess, model, postprocess): POST load, then wait until
   `/v2/models/<step>/versions/<M>/ready`. The steps keep `latest { num_versions: 2 }`:
   the load adds M and keeps the served N (Triton does not reload an unchanged version).
   If a step's M is not READY the swap stops here and the ensemble is untouched: a failed
   ensemble check would *unload* the serving ensemble, not roll it back;
3. session_ranker/config.pbtxt is replaced atomically (tmp + rename) by the same text
   pinned to M (its own version folder and every step's model_version), then the
   ensemble is loaded: Triton builds ensemble M in the background and swaps it in.
   In-flight requests finish on N (each holds its ensemble and step handles), new ones
   run on M; no request mixes two versions' steps. If the ensemble does not come up READY
   on M, the previous config.pbtxt is put back and loaded again.

N stays loaded (rollback: `swap_to(..., N)` while N is still one of the two kept
versions). Only the server's restricted model-repository API is used: pass the admin
key headers (`TritonServer.admin_headers`, or `sessrec-admin-key: $SESSREC_ADMIN_KEY`).
Imports only the standard library and export.repository's text helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from export.repository import ensemble_version, pin_ensemble
from training.integrity import FOLDER_RECORD
from training.names import ENSEMBLE_NAME, POSTPROCESS_MODEL, PREPROCESS_MODEL, TORCH_MODEL

STEPS = (PREPROCESS_MODEL, TORCH_MODEL, POSTPROCESS_MODEL)


class SwapError(RuntimeError):
    """A version could not be switched in; the message says which step and what the server said."""


def _post(url: str, headers: Mapping[str, str], timeout_s: float) -> None:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        raise SwapError(f"POST {url} failed ({e.code}): {e.read().decode(errors='replace')}") from e


def version_ready(http_url: str, model: str, version: int) -> bool:
    """GET /v2/models/<model>/versions/<version>/ready answers 200."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/versions/{version}/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_ready(http_url: str, model: str, version: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if version_ready(http_url, model, version):
            return True
        time.sleep(0.1)
    return False


def _replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def swap_to(
    http_url: str, repo: str | os.PathLike, version: int, admin_headers: Mapping[str, str], timeout_s: float = 600.0
) -> float:
    """Serve whole-repository `version` of `repo` (see the module docstring); returns the seconds it took."""
    t0 = time.monotonic()
    repo, version = Path(repo), int(version)
    for name in (*STEPS, ENSEMBLE_NAME):
        if not (repo / name / str(version) / FOLDER_RECORD).is_file():
            raise SwapError(f"{repo / name / str(version)} is missing or unfinished (no {FOLDER_RECORD}): stage it first")
    base = f"http://{http_url}/v2/repository/models"
    for step in STEPS:  # 2. load M of every step next to N; the ensemble still pins N
        _post(f"{base}/{step}/load", admin_headers, timeout_s)
        if not _wait_ready(http_url, step, version, 30.0):
            raise SwapError(
                f"step {step!r} version {version} is not READY after its load: the ensemble was left on its "
                "current version (see the server log)"
            )
    config = repo / ENSEMBLE_NAME / "config.pbtxt"  # 3. re-pin the ensemble, atomically, then load it
    before = config.read_text()
    _replace_atomically(config, pin_ensemble(before, version))
    try:
        _post(f"{base}/{ENSEMBLE_NAME}/load", admin_headers, timeout_s)
        ok = _wait_ready(http_url, ENSEMBLE_NAME, version, 30.0)
    except SwapError:
        ok = False
    if not ok:
        _replace_atomically(config, before)
        _post(f"{base}/{ENSEMBLE_NAME}/load", admin_headers, timeout_s)
        raise SwapError(
            f"{ENSEMBLE_NAME} did not come up on version {version}; {config} pins version "
            f"{ensemble_version(before)} again"
        )
    return time.monotonic() - t0


def served_version(repo: str | os.PathLike) -> int:
    """The version session_ranker/config.pbtxt pins."""
    return ensemble_version((Path(repo) / ENSEMBLE_NAME / "config.pbtxt").read_text())


def main(argv: list[str] | None = None) -> int:
    from export.tritonserver import ADMIN_HEADER

    p = argparse.ArgumentParser(prog="python -m export.versions", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP endpoint host:port")
    p.add_argument("--repo", type=Path, required=True, help="the model repository the server serves")
    p.add_argument("--version", type=int, required=True, help="whole-repository version to serve (staged already)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each load call may take")
    a = p.parse_args(argv)
    key = os.environ.get("SESSREC_ADMIN_KEY")
    if not key:
        print("error: set SESSREC_ADMIN_KEY to the server's admin key", file=sys.stderr)
        return 2
    try:
        took = swap_to(a.url, a.repo, a.version, {ADMIN_HEADER: key}, a.timeout)
    except SwapError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{ENSEMBLE_NAME} serves version {a.version} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
