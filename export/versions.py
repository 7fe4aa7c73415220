"""Switch a live server from whole-repository version N to M without downtime (issue 12).

    python -m export --run RUN --data DATA --out REPO --window 5 --new-version   # stages N+1
    SESSREC_ADMIN_KEY=... python -m export.versions --url 127.0.0.1:8000 --repo REPO --version N+1

    from export.versions import swap_to
    swap_to(server.http_url, repo, version, server.admin_headers)   # also: rollback to N

The "Daily swap" of ../shared/notes/triton-deploy.md section 4, in this order:

1. every version folder of M exists and holds its sessrec_files.json (staged completely
   by `export.repository.add_ensemble_version`, renamed into place);
2. for each step (preprocess, preprocess_stateful, model, postprocess): POST load, then wait until
   `/v2/models/<step>/versions/<M>/ready`. The steps keep `latest { num_versions: 2 }`:
   the load adds M and keeps the served N (Triton does not reload an unchanged version).
   If a step's M is not READY the swap stops here and the ensemble is untouched: a failed
   ensemble check would *unload* the serving ensemble, not roll it back;
3. for each ensemble (session_ranker, then session_ranker_stateful): its config.pbtxt is
   replaced atomically (tmp + rename) by the same text pinned to M (its own version folder
   and every step's model_version), then the ensemble is loaded: Triton builds ensemble M in
   the background and swaps it in. In-flight requests finish on N (each holds its ensemble
   and step handles), new ones run on M; no request mixes two versions' steps. If an
   ensemble does not come up READY on M, its previous config.pbtxt is put back and loaded
   again. The two ensembles switch one after the other, each atomically.

A live stateful session does not move with the switch: the sessions are held by
preprocess_stateful version N (and Triton's sequence batcher of N). Its next click goes to
M, which does not know it: Triton answers INVALID_ARGUMENT "... must specify the START flag
...", and the client resends the session's clicks with START (clients.sessions does that by
itself), so the answer covers the whole session again.

N stays loaded (rollback: `swap_to(..., N)` while N is still one of the two kept
versions). Only the server's restricted model-repository API is used: pass the admin
key headers (`TritonServer.admin_headers`, or `sessrec-admin-key: $SESSREC_ADMIN_KEY`).
Imports the standard library, export.pbtxt's pins, export.staging's model names and export.tritonserver's admin POST.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from export.pbtxt import ensemble_version, pin_ensemble
from export.staging import ENSEMBLES, STEPS
from export.tritonserver import ADMIN_HEADER, ADMIN_KEY_ENV, ServerError, repository_post
from training.cli import command_line, help_meta
from training.integrity import FOLDER_RECORD, atomic_write
from training.names import ENSEMBLE_NAME


class SwapError(RuntimeError):
    """A version could not be switched in; the message says which step and what the server said."""


def _load(http_url: str, model: str, headers: Mapping[str, str], timeout_s: float) -> None:
    """POST load of `model` (the admin key's API); SwapError with the server's answer."""
    try:
        repository_post(http_url, f"models/{model}/load", headers, timeout_s)
    except ServerError as e:
        raise SwapError(str(e)) from e


def version_ready(http_url: str, model: str, version: int) -> bool:
    """GET /v2/models/<model>/versions/<version>/ready answers 200."""
    try:
        with urllib.request.urlopen(
            f"http://{http_url}/v2/models/{model}/versions/{version}/ready", timeout=5
        ) as r:
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


def _repin(http_url: str, repo: Path, ensemble: str, version: int, admin_headers, timeout_s: float) -> None:
    """Step 3 for one ensemble: its config.pbtxt pinned to `version` (atomic), loaded; put back on failure."""
    config = repo / ensemble / "config.pbtxt"
    before = config.read_text()
    atomic_write(config, pin_ensemble(before, version).encode())
    try:
        _load(http_url, ensemble, admin_headers, timeout_s)
        ok = _wait_ready(http_url, ensemble, version, 30.0)
    except SwapError:
        ok = False
    if not ok:
        atomic_write(config, before.encode())
        _load(http_url, ensemble, admin_headers, timeout_s)
        raise SwapError(
            f"{ensemble} did not come up on version {version}; {config} pins version "
            f"{ensemble_version(before)} again"
        )


def swap_to(
    http_url: str,
    repo: str | os.PathLike,
    version: int,
    admin_headers: Mapping[str, str],
    timeout_s: float = 600.0,
) -> float:
    """Serve whole-repository `version` of `repo` (see the module docstring); returns the seconds it took."""
    t0 = time.monotonic()
    repo, version = Path(repo), int(version)
    for name in (*STEPS, *ENSEMBLES):
        if not (repo / name / str(version) / FOLDER_RECORD).is_file():
            raise SwapError(
                f"{repo / name / str(version)} is missing or unfinished (no {FOLDER_RECORD}): stage it first"
            )
    for step in STEPS:  # 2. load M of every step next to N; the ensembles still pin N
        _load(http_url, step, admin_headers, timeout_s)
        if not _wait_ready(http_url, step, version, 30.0):
            raise SwapError(
                f"step {step!r} version {version} is not READY after its load: the ensembles were left on their "
                "current version (see the server log)"
            )
    for i, ensemble in enumerate(ENSEMBLES):  # 3. re-pin each ensemble, atomically, then load it
        try:
            _repin(http_url, repo, ensemble, version, admin_headers, timeout_s)
        except SwapError as e:
            done = ", ".join(ENSEMBLES[:i])
            raise SwapError(f"{e}{f' ({done} serves version {version} already)' if done else ''}") from e
    return time.monotonic() - t0


def served_version(repo: str | os.PathLike) -> int:
    """The version session_ranker/config.pbtxt pins."""
    return ensemble_version((Path(repo) / ENSEMBLE_NAME / "config.pbtxt").read_text())


@dataclass
class SwapCommand:
    repo: Path = field(metadata=help_meta("the model repository the server serves"))
    version: int = field(metadata=help_meta("whole-repository version to serve (staged already)"))
    url: str = field(default="127.0.0.1:8000", metadata=help_meta("the server's HTTP endpoint host:port"))
    timeout: float = field(default=600.0, metadata=help_meta("seconds each load call may take"))


def main(argv: list[str] | None = None) -> int:
    a = command_line(SwapCommand, "python -m export.versions", __doc__)(argv)
    key = os.environ.get(ADMIN_KEY_ENV)
    if not key:
        print(f"error: set {ADMIN_KEY_ENV} to the server's admin key", file=sys.stderr)
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
