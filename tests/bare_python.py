"""A bare Python environment for the Python-backend stub: the standard library, numpy and torch only.

    env = bare_python_env(tmp / "stub-env")        # a venv: bin/python3, pyvenv.cfg, site-packages
    ServerConfig(repo=..., stub_python_env=env)    # its bin/ first on PATH: the stubs' Python
    check_bare(env, cwd)                           # proves: numpy/torch import, the project does not

The stub of tritonserver 2.51 is an embedded CPython with an isolated
configuration: PYTHONPATH and PYTHONHOME do not reach it; it takes the
installation of the `python3` first on PATH (a venv's pyvenv.cfg included), as
Triton's own EXECUTION_ENV_PATH does with `source <env>/bin/activate`. So the
bare environment is a venv made with the base interpreter (`python -m venv
--without-pip`: the standard library of sys.base_prefix, lib-dynload included, no
site-packages of its own) whose site-packages holds symlinks to the top-level
files of numpy (the venv's 1.24.4: numpy 2.x breaks the Python backend's outputs),
torch and typing_extensions. By trial, `import torch` and `torch.jit.load` need
only typing_extensions besides torch (torch's other declared requirements,
filelock, sympy, networkx, jinja2, fsspec, are imported lazily by code the model
step does not run; a `pip install torch` in an image brings them anyway).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

from export.tritonserver import server_env

STUB_DISTRIBUTIONS = ("numpy", "torch", "typing_extensions")
MUST_IMPORT = ("numpy", "torch")
MUST_NOT_IMPORT = ("pandas", "nvtabular", "merlin", "training", "export", "pyarrow", "transformers")


def bare_python_env(dest: Path, distributions: tuple[str, ...] = STUB_DISTRIBUTIONS) -> Path:
    dest = Path(dest)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix) / "bin" / version
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(dest)], check=True, env=_clean_env())
    site = dest / "lib" / version / "site-packages"
    for name in distributions:
        dist = metadata.distribution(name)
        for top in sorted({Path(str(f)).parts[0] for f in dist.files or []}):
            src = Path(dist.locate_file(top))
            if top in ("..", "__pycache__") or not src.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(src)
    return dest


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def check_bare(env_dir: Path, cwd: Path) -> dict[str, str]:
    """Run env_dir's python3 with the stubs' environment (server_env) in `cwd`: {module: 'ok' | error}.
    Raises unless MUST_IMPORT import and MUST_NOT_IMPORT fail."""
    results = {}
    for module in (*MUST_IMPORT, *MUST_NOT_IMPORT):
        proc = subprocess.run(
            ["python3", "-c", f"import {module}"], env=server_env(stub_env=Path(env_dir)), cwd=cwd,
            capture_output=True, text=True,
        )  # fmt: skip
        results[module] = "ok" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]
    wrong = [m for m in MUST_IMPORT if results[m] != "ok"] + [m for m in MUST_NOT_IMPORT if results[m] == "ok"]
    if wrong:
        raise AssertionError(f"the bare stub environment is not what it should be for {wrong}: {results}")
    return results


if __name__ == "__main__":  # python -m tests.bare_python DEST: build one, show what imports
    env_dir = bare_python_env(Path(sys.argv[1]))
    print(env_dir, check_bare(env_dir, Path(sys.argv[1]).parent))
