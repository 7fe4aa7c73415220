"""Run tritonclient 2.51's bundled perf_analyzer with the shared libraries it needs.

    python -m clients.perf_analyzer -i grpc -u 127.0.0.1:8001 -m session_ranker --input-data requests.json ...

`pip install "tritonclient[all]==2.51.0"` puts the perf_analyzer binary in the venv's bin/, but the
binary needs `libcudart.so.12` (also on a machine without a GPU; the pip package
`nvidia-cuda-runtime-cu12` carries it, outside any library path) and `libb64.so.0d` (Debian/Ubuntu
package `libb64-0d`). Run from the venv as `perf_analyzer ...` it fails with "libcudart.so.12: cannot
open shared object file". This command puts the CUDA runtime's lib/ on LD_LIBRARY_PATH and replaces
itself with the binary (same arguments, same exit status, same output); without libb64 it says how to
install it. export/README.md's perf_analyzer commands use it, and tests/system/test_doc_commands.py runs them
as written. Equivalent by hand:

    LD_LIBRARY_PATH=$(python -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))') perf_analyzer ...
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import sysconfig
from pathlib import Path


class PerfAnalyzerMissing(RuntimeError):
    """The binary or a library it needs is not installed; the message says what to install."""


def perf_analyzer_binary() -> Path:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.is_file():
        raise PerfAnalyzerMissing(
            f"{binary} missing: pip install 'tritonclient[all]==2.51.0' (it bundles perf_analyzer; 2.52+ and the "
            "PyPI perf-analyzer wheels need glibc 2.38)"
        )
    return binary


def cuda_runtime_lib() -> Path:
    """The lib/ folder of the nvidia-cuda-runtime-cu12 wheel (libcudart.so.12)."""
    lib = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    if not any(lib.glob("libcudart.so*")):
        raise PerfAnalyzerMissing(f"libcudart.so.12 not found in {lib}: pip install nvidia-cuda-runtime-cu12")
    return lib


def perf_analyzer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the CUDA runtime's lib/ first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cuda_runtime_lib()), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def check_libb64() -> None:
    if ctypes.util.find_library("b64") is None and not any(
        Path(d).joinpath("libb64.so.0d").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib")
    ):
        raise PerfAnalyzerMissing("libb64.so.0d not found: apt-get install -y libb64-0d (Debian/Ubuntu)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        binary = perf_analyzer_binary()
        env = perf_analyzer_env()
        check_libb64()
    except PerfAnalyzerMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(binary, [str(binary), *argv], env)  # does not return
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
