"""The floor: a minimal two-step Python-backend ensemble (identity, identity).

    write_floor_repository(out, raw_inputs)    # out/floor (ensemble), out/floor_a, out/floor_b

What a request costs on this stack before any work: gRPC, the ensemble
scheduler and two Python-backend round trips. `bench.serving` compares the
ranker's latency with it; tests use it as a small repository that loads fast.
Its steps import only json and triton_python_backend_utils.
"""

from __future__ import annotations

from pathlib import Path

from export.pbtxt import ensemble_step, header, io_block, quote, tensor, triton_dtype
from export.staging import TEMPLATES, write_file

FLOOR_ENSEMBLE = "floor"
FLOOR_STEPS = ("floor_a", "floor_b")


def write_floor_repository(out: Path, raw_inputs: dict[str, str]) -> Path:
    """A trivial two-step Python-backend ensemble with the ranker's inputs (identity, identity).

    What a request costs on this stack before any work: gRPC, the ensemble
    scheduler and two Python-backend round trips. bench.serving
    compares the ranker's latency with it."""
    out = Path(out)
    names = list(raw_inputs)
    for i, step in enumerate(FLOOR_STEPS):
        suffix = f"_{step[-1]}"
        inputs = [tensor(n, triton_dtype(raw_inputs[n]), [-1]) for n in names]
        outputs = [tensor(n + suffix, triton_dtype(raw_inputs[n]), [-1]) for n in names]
        write_file(
            out / step / "config.pbtxt",
            header(f"floor step {i + 1}")
            + f'name: {quote(step)}\nbackend: "python"\nmax_batch_size: 0\n'
            + io_block("input", inputs)
            + io_block("output", outputs)
            + "instance_group [ { count: 1 kind: KIND_CPU } ]\n",
        )
        write_file(out / step / "1" / "model.py", (TEMPLATES / "identity" / "model.py").read_text())
    a, b = FLOOR_STEPS
    steps = [
        ensemble_step(a, {n: n for n in names}, {n + "_a": n + "_a" for n in names}),
        ensemble_step(b, {n: n + "_a" for n in names}, {n + "_b": n + "_b" for n in names}),
    ]
    write_file(
        out / FLOOR_ENSEMBLE / "config.pbtxt",
        header("floor ensemble")
        + f'name: {quote(FLOOR_ENSEMBLE)}\nplatform: "ensemble"\nmax_batch_size: 0\n'
        + io_block("input", [tensor(n, triton_dtype(raw_inputs[n]), [-1]) for n in names])
        + io_block("output", [tensor(n + "_b", triton_dtype(raw_inputs[n]), [-1]) for n in names])
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n",
    )
    (out / FLOOR_ENSEMBLE / "1").mkdir(parents=True, exist_ok=True)
    return out
