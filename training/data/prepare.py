"""The data stage: click log -> fitted NVTabular workflow -> per-window session splits.

    from training.data.prepare import PrepareConfig, prepare
    summary = prepare(PrepareConfig(out=Path("data/synthetic"), synthetic=True, seed=0))

The command is `python -m training.prepare` (training/prepare.py: its flags are this
module's `PrepareConfig` fields). Writes DATA/ as described in docs/contracts.md:
interactions.parquet, workflow/, schema.json, sessions_by_day/<window>/{train,valid,test}.parquet,
summary.json. Everything is written to a temporary folder next to `out` and renamed at
the end; on any error the temporary folder is removed (no partial output).

Split rule (per session, deterministic, independent of row order and of how the
data is partitioned, so one process and a Dask cluster give the same splits):
    h = splitmix64(splitmix64(seed) XOR session_id);  u = (h >> 11) / 2**53  in [0, 1)
    train if u < 0.8, valid if u < 0.9, else test.
A session belongs to the window of its first interaction (`day-first`).

Bad input or settings raise one of `BAD_INPUT` (the message names the flag or column,
a sample bad value and what was expected); the command exits with code 2 on them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.cli import help_meta
from training.data import synthetic as synthetic_log
from training.data.ingest import SOURCE_GROUP, IngestConfig, IngestError, Interactions, read_clicks
from training.names import (
    DEFAULT_MAX_LEN,
    DEFAULT_MIN_LEN,
    INTERACTIONS_FILE,
    ITEM_COUNT,
    ITEM_LIST,
    SCHEMA_FILE,
    SESSION_COL,
    SESSIONS_DIR,
    SPLITS,
    SUMMARY_FILE,
    WINDOW_COL,
    WINDOW_FIRST,
    WORKFLOW_DIR,
    list_col,
)
from training.schema import Schema

SPLIT_BOUNDS = (0.8, 0.9)  # train u < 0.8, valid u < 0.9, test otherwise
_MASK64 = (1 << 64) - 1
FIT_PARTITIONS = 8


class ConfigError(ValueError):
    """Contradictory or missing flags."""


class OutputDirError(ValueError):
    """--out cannot be (re)placed safely."""


BAD_INPUT = (ConfigError, OutputDirError, IngestError)


WORKFLOW_GROUP = "workflow"
SCALE_GROUP = "scale-out"


@dataclass(kw_only=True)
class PrepareConfig(IngestConfig):
    """Everything `prepare` needs: the click log's columns (`IngestConfig`, used only with
    `path`, i.e. --input) and the stage's own settings. The command line is these fields."""

    out: Path = field(metadata=help_meta("output DATA folder (replaced atomically)"))
    synthetic: bool = field(
        default=False,
        metadata=help_meta("generate the reference example's synthetic click log", group=SOURCE_GROUP),
    )
    seed: int = field(default=0, metadata=help_meta("seed of the synthetic generator and of the split rule"))
    num_rows: int = field(
        default=synthetic_log.REFERENCE_ROWS,
        metadata=help_meta("synthetic interactions to generate (the reference example's count)"),
    )
    num_sessions: int | None = field(
        default=None,
        metadata=help_meta(
            "synthetic session ids to draw from (default num-rows / 5, i.e. 20000 for 100000 rows)"
        ),
    )
    max_len: int = field(
        default=DEFAULT_MAX_LEN,
        metadata=help_meta("keep the LAST N items of a session", group=WORKFLOW_GROUP),
    )
    min_len: int = field(
        default=DEFAULT_MIN_LEN, metadata=help_meta("drop sessions shorter than this", group=WORKFLOW_GROUP)
    )
    freq_threshold: int = field(
        default=0,
        metadata=help_meta(
            "Categorify: values seen fewer times become OOV (id 2); 0 keeps all", group=WORKFLOW_GROUP
        ),
    )
    workers: int = field(
        default=0,
        metadata=help_meta(
            "run the workflow on a local dask.distributed cluster of N worker processes (0: in this process)",
            group=SCALE_GROUP,
        ),
    )
    dask_scheduler: str | None = field(
        default=None,
        metadata=help_meta(
            "run the workflow on an existing Dask cluster (HOST:PORT); its workers must see --out's parent folder",
            group=SCALE_GROUP,
        ),
    )
    partitions: int | None = field(
        default=None, metadata=help_meta("Dask partitions (default 2 per worker)", group=SCALE_GROUP)
    )
    quiet: bool = field(default=False, metadata=help_meta("do not print the summary table"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.out = Path(self.out)

    def validate(self) -> None:
        if self.synthetic == (self.path is not None):
            raise ConfigError("pass exactly one of --synthetic or --input FILE")
        self.check()  # --time-col with --input, --time-unit, --window (IngestError)
        if self.synthetic and (self.time_col or self.order_col or self.category_col or self.continuous_cols):
            raise ConfigError("--synthetic takes no column flags (--time-col/--order-col/--category-col/...)")
        if self.num_rows < 1:
            raise ConfigError(f"--num-rows {self.num_rows}: expected a positive number of interactions")
        if self.max_len < 1 or self.min_len < 1:
            raise ConfigError(f"--max-len {self.max_len} / --min-len {self.min_len}: expected integers >= 1")
        if self.freq_threshold < 0:
            raise ConfigError(f"--freq-threshold {self.freq_threshold}: expected an integer >= 0")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: expected an integer >= 0")
        if self.workers and self.dask_scheduler:
            raise ConfigError("pass at most one of --workers and --dask-scheduler")


# --------------------------------------------------------------------------- #
# split rule
# --------------------------------------------------------------------------- #
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    x += np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def session_uniform(session_ids: np.ndarray, seed: int) -> np.ndarray:
    """u in [0, 1) per session id, a pure function of (seed, session_id)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    h = _splitmix64(np.asarray(session_ids).astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_of(session_ids: np.ndarray, seed: int) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test (indexes into names.SPLITS)."""
    u = session_uniform(session_ids, seed)
    return np.searchsorted(np.array(SPLIT_BOUNDS), u, side="right").astype(np.int8)


def partition_of(session_ids: np.ndarray, nparts: int) -> np.ndarray:
    """Dask partition of each row: hash(session_id) % nparts (a session lives in one partition)."""
    return (_splitmix64(np.asarray(session_ids).astype(np.uint64)) % np.uint64(nparts)).astype(np.int64)


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def prepare(cfg: PrepareConfig) -> dict:
    """Run the data stage; returns the summary (as written to summary.json, plus timings_s)."""
    cfg.validate()
    out = Path(cfg.out).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SCHEMA_FILE).exists())):
        raise OutputDirError(
            f"--out {out} exists and is not a previous prepare output (no {SCHEMA_FILE}): "
            "expected a new or empty folder, or one written by python -m training.prepare"
        )
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; DATA is read by other stages/users
    try:
        summary = _prepare_into(cfg, tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents this call created, innermost first, if still empty
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
    return summary


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _load_interactions(cfg: PrepareConfig) -> Interactions:
    if cfg.synthetic:
        frame = synthetic_log.generate(cfg.num_rows, cfg.seed, cfg.num_sessions)
        stats = {
            "rows_read": len(frame),
            "repeats_dropped": 0,
            "interactions": len(frame),
            "sessions": int(frame[SESSION_COL].nunique()),
            "items": int(frame["item_id"].nunique()),
        }
        return Interactions(frame, True, synthetic_log.CONTINUOUS, "day", "synthetic", stats)
    return read_clicks(cfg)


def _prepare_into(cfg: PrepareConfig, tmp: Path) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = _load_interactions(cfg)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    _write_table(data.frame, tmp / INTERACTIONS_FILE)
    timings["write_interactions"] = time.perf_counter() - t

    # NVTabular is imported only now: bad input is reported without its ~5 s import.
    from training.data import workflow as wf

    spec = wf.WorkflowSpec(
        has_category=data.has_category,
        continuous=data.continuous,
        derive_from_timestamp=not data.continuous,
        max_len=cfg.max_len,
        min_len=cfg.min_len,
        freq_threshold=cfg.freq_threshold,
    )
    t = time.perf_counter()
    # ids in order of first appearance (append-only across windows: training/data/workflow.py)
    vocabularies = wf.first_seen_vocabulary(data.frame, spec.categorical, cfg.freq_threshold)
    workflow = wf.build_workflow(spec, tmp / ".fit", vocabularies)
    inputs = data.frame[spec.input_columns()]
    wf.use_memoizing_executor(workflow)
    try:
        if cfg.workers or cfg.dask_scheduler:
            sessions = _fit_transform_dask(workflow, inputs, cfg)
        else:
            sessions = _fit_transform_local(workflow, inputs)
    finally:
        wf.use_stock_executor(workflow)
    timings["fit_transform"] = time.perf_counter() - t

    t = time.perf_counter()
    windows = sorted(int(w) for w in pd.unique(data.frame[WINDOW_COL]))
    categorical, continuous = wf.feature_columns(workflow)
    list_of = {list_col(c): c for c in spec.categorical}
    vocabulary_by_window = {f: vocabularies[list_of[f]].known_sizes(windows) for f in categorical}
    for f, sizes in vocabulary_by_window.items():
        if sizes[windows[-1]] != categorical[f]:  # the workflow's cardinality is the whole log's vocabulary
            raise RuntimeError(
                f"{f}: {sizes[windows[-1]]} ids known after the last window, cardinality {categorical[f]}"
            )
    table, split, window = _sessions_table(sessions, categorical, continuous, cfg.seed)
    per_window = _write_splits(table, split, window, windows, tmp / SESSIONS_DIR)
    timings["write_splits"] = time.perf_counter() - t

    t = time.perf_counter()
    workflow.save(str(tmp / WORKFLOW_DIR))
    shutil.rmtree(tmp / ".fit", ignore_errors=True)
    schema = Schema(
        max_len=cfg.max_len,
        min_len=cfg.min_len,
        item_feature=ITEM_LIST,
        categorical=categorical,
        continuous=tuple(continuous),
        raw_inputs=spec.raw_inputs(),
        windows=tuple(windows),
        window_unit=data.window_unit,
        source=data.source,
        freq_threshold=cfg.freq_threshold,
        split={
            "seed": cfg.seed,
            "train": "u < 0.8",
            "valid": "0.8 <= u < 0.9",
            "test": "u >= 0.9",
            "u": "splitmix64(splitmix64(seed) ^ session_id) >> 11 / 2**53",
        },
        workflow_sha256=wf.workflow_sha256(tmp),
        vocabulary_by_window=vocabulary_by_window,
    )
    (tmp / SCHEMA_FILE).write_text(schema.to_json())
    timings["save_workflow"] = time.perf_counter() - t

    summary = {
        "source": data.source,
        "window_unit": data.window_unit,
        "seed": cfg.seed,
        "input": data.stats,
        "sessions_kept": int(len(table)),
        "windows": per_window,
        "total": _total(per_window),
    }
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    timings["total"] = time.perf_counter() - t0
    return {**summary, "timings_s": {k: round(v, 4) for k, v in timings.items()}}


def _fit_transform_local(workflow, frame: pd.DataFrame) -> pd.DataFrame:
    from merlin.io import Dataset

    from training.data.workflow import transform_frame

    frame = frame.reset_index(drop=True)
    # Several partitions for fit: NVTabular's fit also transforms the FIRST partition
    # to learn output dtypes; statistics (Categorify) are the same for any partitioning.
    nparts = max(1, min(FIT_PARTITIONS, len(frame) // 10_000))
    workflow.fit(Dataset(frame, cpu=True, npartitions=nparts))
    return transform_frame(workflow, frame)


def _fit_transform_dask(workflow, frame: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster
    from merlin.core import utils as merlin_utils
    from merlin.io import Dataset

    cluster = None
    if cfg.dask_scheduler:
        client = Client(cfg.dask_scheduler)
    else:
        # fork (where available): workers inherit the imported NVTabular instead of
        # spending ~8 s each importing it again under the default "spawn".
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with dask.config.set({"distributed.worker.multiprocessing-method": method}):
            cluster = LocalCluster(
                n_workers=cfg.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
        client = Client(cluster)
    previous = merlin_utils._merlin_dask_client.get()
    try:
        merlin_utils.set_dask_client(client)
        nworkers = max(1, len(client.scheduler_info().get("workers", {})))
        nparts = cfg.partitions or 2 * nworkers
        part = partition_of(frame[SESSION_COL].to_numpy(), nparts)
        # Boolean masks keep the row order inside each partition (time order per session).
        parts = [frame[part == k].reset_index(drop=True) for k in range(nparts)]
        parts = [p for p in parts if len(p)]
        futures = client.scatter(parts)
        ddf = dd.from_delayed(futures, meta=frame.iloc[:0], verify_meta=False)
        workflow.fit(Dataset(ddf, cpu=True))
        sessions = workflow.transform(Dataset(ddf, cpu=True)).to_ddf().compute()
    finally:
        merlin_utils.set_dask_client(previous)
        client.close()
        if cluster is not None:
            cluster.close()
    return sessions.sort_values(SESSION_COL, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def _write_table(frame: pd.DataFrame, path: Path) -> None:
    """Deterministic parquet (no pandas metadata, no timestamps): same data -> same bytes."""
    table = pa.table({c: pa.array(frame[c].to_numpy()) for c in frame.columns})
    pq.write_table(table, path)


def _list_array(column: pd.Series, dtype) -> pa.Array:
    parts = column.to_numpy()
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (
        np.concatenate([np.asarray(p) for p in parts]).astype(dtype) if len(parts) else np.empty(0, dtype)
    )
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values))


def _sessions_table(sessions: pd.DataFrame, categorical: dict, continuous: list, seed: int):
    sessions = sessions.sort_values(SESSION_COL, kind="stable").reset_index(drop=True)
    sid = sessions[SESSION_COL].to_numpy().astype(np.int64)
    window = sessions[WINDOW_FIRST].to_numpy().astype(np.int64)
    cols = {
        SESSION_COL: pa.array(sid),
        WINDOW_FIRST: pa.array(window),
        ITEM_COUNT: pa.array(sessions[ITEM_COUNT].to_numpy().astype(np.int64)),
    }
    for name in categorical:
        cols[name] = _list_array(sessions[name], np.int64)
    for name in continuous:
        cols[name] = _list_array(sessions[name], np.float32)
    return pa.table(cols), split_of(sid, seed), window


def _write_splits(
    table: pa.Table, split: np.ndarray, window: np.ndarray, windows: list[int], root: Path
) -> list:
    """Write sessions_by_day/<w>/<split>.parquet for every window; return per-window counts."""
    counts = table.column(ITEM_COUNT).to_numpy()
    items = table.column(ITEM_LIST)
    flat_items = items.combine_chunks().flatten().to_numpy() if len(table) else np.empty(0, np.int64)
    lengths = items.combine_chunks().value_lengths().to_numpy() if len(table) else np.empty(0, np.int64)
    row_of_item = np.repeat(np.arange(len(table)), lengths)

    # distinct items per (window, split) group, and per window, in one pass each
    win_pos = np.searchsorted(np.array(windows), window)
    group = win_pos * len(SPLITS) + split
    ngroups = len(windows) * len(SPLITS)
    n_items_group = _distinct_per_group(group[row_of_item], flat_items, ngroups)
    n_items_window = _distinct_per_group(win_pos[row_of_item], flat_items, len(windows))

    out = []
    for wi, w in enumerate(windows):
        folder = root / str(w)
        folder.mkdir(parents=True, exist_ok=True)
        entry: dict = {"window": w}
        in_window = win_pos == wi
        for si, name in enumerate(SPLITS):
            idx = np.flatnonzero(in_window & (split == si))
            pq.write_table(table.take(pa.array(idx, type=pa.int64())), folder / f"{name}.parquet")
            entry[name] = {
                "sessions": int(len(idx)),
                "interactions": int(counts[idx].sum()),
                "items": int(n_items_group[wi * len(SPLITS) + si]),
            }
        entry["all"] = {
            "sessions": int(in_window.sum()),
            "interactions": int(counts[in_window].sum()),
            "items": int(n_items_window[wi]),
        }
        out.append(entry)
    return out


def _distinct_per_group(group: np.ndarray, values: np.ndarray, ngroups: int) -> np.ndarray:
    if not len(values):
        return np.zeros(ngroups, dtype=np.int64)
    key = group.astype(np.int64) * (int(values.max()) + 1) + values.astype(np.int64)
    uniq = np.unique(key)
    return np.bincount(uniq // (int(values.max()) + 1), minlength=ngroups)


def _total(per_window: list) -> dict:
    total = {}
    for name in (*SPLITS, "all"):
        total[name] = {
            "sessions": sum(w[name]["sessions"] for w in per_window),
            "interactions": sum(w[name]["interactions"] for w in per_window),
        }
    return total


def format_summary(summary: dict) -> str:
    """The per-window table the CLI prints."""
    header = f"{'window':>7} {'sessions':>9} {'interactions':>13} {'items':>7} {'train':>7} {'valid':>7} {'test':>7}"
    lines = [header, "-" * len(header)]
    for w in summary["windows"]:
        a = w["all"]
        lines.append(
            f"{w['window']:>7} {a['sessions']:>9} {a['interactions']:>13} {a['items']:>7} "
            f"{w['train']['sessions']:>7} {w['valid']['sessions']:>7} {w['test']['sessions']:>7}"
        )
    t = summary["total"]
    lines.append("-" * len(header))
    lines.append(
        f"{'total':>7} {t['all']['sessions']:>9} {t['all']['interactions']:>13} {'':>7} "
        f"{t['train']['sessions']:>7} {t['valid']['sessions']:>7} {t['test']['sessions']:>7}"
    )
    inp = summary["input"]
    lines.append(
        f"input: {inp['interactions']} interactions ({inp['repeats_dropped']} consecutive repeats dropped), "
        f"{inp['sessions']} sessions, {inp['items']} items; kept {summary['sessions_kept']} sessions"
    )
    return "\n".join(lines)


__all__ = [
    "BAD_INPUT",
    "ConfigError",
    "OutputDirError",
    "PrepareConfig",
    "format_summary",
    "prepare",
    "session_uniform",
    "split_of",
]
