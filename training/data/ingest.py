"""Read a real click log (CSV/TSV/parquet, optionally gzip) into normalised interactions.

Steps, all vectorised with pandas/numpy:
1. read only the named columns; the separator comes from --sep or the extension
   (.tsv -> tab, .csv -> comma; a .gz suffix is decompressed); CRLF is fine;
2. validate and convert: ids -> int64 (non-negative integers), timestamps -> int64
   epoch seconds (--time-unit s, ms or date), order column and continuous columns
   -> numbers. Every problem raises `IngestError` naming the column, a sample bad
   value with its row, and what was expected;
3. sort by (session, time, order column) -- stable, so ties keep file order --
   and drop consecutive repeats of the same item in a session (unless keep_repeats);
4. derive the window index `day` (1 = the first day or hour of the log).

The result keeps sessions contiguous and rows in time order inside a session: this
is the row order the workflow groups.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from training.cli import comma_list, help_meta
from training.names import CATEGORY_COL, ITEM_COL, SESSION_COL, TIME_COL, WINDOW_COL

TIME_UNITS = ("s", "ms", "date")
# "month" is 30 days (a fixed length, counted from the epoch like the others): a sparse log such as
# NowPlaying1M (~3.5k sessions a month over 18 months) needs windows of that size to hold a day's worth
# of DIGINETICA
WINDOW_SECONDS = {"day": 86_400, "hour": 3_600, "week": 604_800, "month": 2_592_000}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_SEP_BY_SUFFIX = {".tsv": "\t", ".tab": "\t", ".csv": ","}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zip", ".zst"}
_MAX_EPOCH_S = 4_102_444_800  # 2100-01-01


class IngestError(ValueError):
    """The input file cannot be used as it is; the message says what to fix."""


SOURCE_GROUP = "source (exactly one)"
COLUMNS_GROUP = "input columns (--input)"


@dataclass
class IngestConfig:
    """How to read one click log: its path and columns (the `--input` flags of
    `python -m training.prepare`, whose `PrepareConfig` extends this class)."""

    path: Path | None = field(
        default=None,
        metadata=help_meta(
            "click log: .csv/.tsv/.parquet, optionally .gz", flags=["--input"], group=SOURCE_GROUP
        ),
    )
    session_col: str = field(
        default=SESSION_COL, metadata=help_meta("session id column (integers)", group=COLUMNS_GROUP)
    )
    item_col: str = field(
        default=ITEM_COL, metadata=help_meta("item id column (integers)", group=COLUMNS_GROUP)
    )
    time_col: str | None = field(
        default=None,
        metadata=help_meta(
            "time of each click (see --time-unit); required with --input", group=COLUMNS_GROUP
        ),
    )
    order_col: str | None = field(
        default=None,
        metadata=help_meta(
            "tie-breaker inside a session after time (e.g. DIGINETICA timeframe)", group=COLUMNS_GROUP
        ),
    )
    category_col: str | None = field(
        default=None,
        metadata=help_meta(
            "item category column (integers); omitted: no category feature", group=COLUMNS_GROUP
        ),
    )
    continuous_cols: tuple[str, ...] = field(
        default=(),
        metadata=help_meta(
            "comma-separated continuous columns; omitted: weekday_sin and age_days are derived "
            "from the timestamp by workflow ops",
            group=COLUMNS_GROUP,
            parse=comma_list,
        ),
    )
    sep: str | None = field(
        default=None,
        metadata=help_meta(
            "field separator (default: from the extension, .tsv tab, .csv comma)", group=COLUMNS_GROUP
        ),
    )
    time_unit: str = field(
        default="s",
        metadata=help_meta(
            "s or ms: epoch numbers; date: date/time strings", choices=TIME_UNITS, group=COLUMNS_GROUP
        ),
    )
    window: str = field(
        default="day",
        metadata=help_meta(
            "time window of the split folders", choices=tuple(WINDOW_SECONDS), group=COLUMNS_GROUP
        ),
    )
    keep_repeats: bool = field(
        default=False,
        metadata=help_meta(
            "keep consecutive repeats of the same item in a session (dropped by default)", group=COLUMNS_GROUP
        ),
    )

    def __post_init__(self) -> None:
        # values from a --config file or a caller: a path as text, columns as a list or "a,b"
        if self.path is not None:
            self.path = Path(self.path)
        cols = self.continuous_cols
        self.continuous_cols = comma_list(cols) if isinstance(cols, str) else tuple(cols)

    def check(self) -> None:
        """IngestError unless the column flags can describe a click log (`read_clicks` calls it)."""
        if self.path is not None and not self.time_col:
            raise IngestError("--time-col is required with --input (the column holding each click's time)")
        if self.time_unit not in TIME_UNITS:
            raise IngestError(f"--time-unit {self.time_unit!r}: expected one of {', '.join(TIME_UNITS)}")
        if self.window not in WINDOW_SECONDS:
            raise IngestError(f"--window {self.window!r}: expected one of {', '.join(WINDOW_SECONDS)}")


@dataclass
class Interactions:
    """Normalised interactions (columns from training.names) and what was done to them."""

    frame: pd.DataFrame
    has_category: bool
    continuous: tuple[str, ...]
    window_unit: str
    source: str
    stats: dict = field(default_factory=dict)


def read_clicks(cfg: IngestConfig) -> Interactions:
    if cfg.path is None:
        raise IngestError("no click log given: expected --input FILE (a CSV/TSV/parquet click log)")
    cfg.check()
    flags = {
        cfg.session_col: "--session-col",
        cfg.item_col: "--item-col",
        cfg.time_col: "--time-col",
    }
    if cfg.order_col:
        flags[cfg.order_col] = "--order-col"
    if cfg.category_col:
        flags[cfg.category_col] = "--category-col"
    for c in cfg.continuous_cols:
        flags[c] = "--continuous-cols"
    if len(flags) != 3 + bool(cfg.order_col) + bool(cfg.category_col) + len(cfg.continuous_cols):
        raise IngestError("the same input column is named by two flags: expected distinct columns")

    raw = _read_table(Path(cfg.path), list(flags), cfg.sep, flags)
    n = len(raw)
    session = _int_ids(raw[cfg.session_col], cfg.session_col, flags[cfg.session_col])
    item = _int_ids(raw[cfg.item_col], cfg.item_col, flags[cfg.item_col])
    ts = _timestamps(raw[cfg.time_col], cfg.time_col, cfg.time_unit)
    columns = {SESSION_COL: session, ITEM_COL: item}
    if cfg.category_col:
        columns[CATEGORY_COL] = _int_ids(raw[cfg.category_col], cfg.category_col, "--category-col")
    columns[TIME_COL] = ts
    for c in cfg.continuous_cols:
        columns[c] = _numbers(raw[c], c, "--continuous-cols", dtype=np.float32)

    if cfg.order_col:
        order = _numbers(raw[cfg.order_col], cfg.order_col, "--order-col", dtype=np.float64)
        idx = np.lexsort((order, ts, session))
    else:
        idx = np.lexsort((ts, session))
    columns = {k: v[idx] for k, v in columns.items()}

    repeats = 0
    if not cfg.keep_repeats and n > 1:
        s, i = columns[SESSION_COL], columns[ITEM_COL]
        dup = np.r_[False, (s[1:] == s[:-1]) & (i[1:] == i[:-1])]
        repeats = int(dup.sum())
        if repeats:
            columns = {k: v[~dup] for k, v in columns.items()}

    columns[WINDOW_COL] = window_index(columns[TIME_COL], cfg.window)
    frame = pd.DataFrame(columns)
    stats = {
        "rows_read": n,
        "repeats_dropped": repeats,
        "interactions": len(frame),
        "sessions": int(pd.unique(frame[SESSION_COL]).size),
        "items": int(pd.unique(frame[ITEM_COL]).size),
    }
    return Interactions(
        frame=frame,
        has_category=bool(cfg.category_col),
        continuous=tuple(cfg.continuous_cols),
        window_unit=cfg.window,
        source=str(cfg.path),
        stats=stats,
    )


def window_index(timestamps: np.ndarray, window: str) -> np.ndarray:
    """Window number of each epoch-second timestamp, 1 = the first window of the log."""
    w = np.floor_divide(timestamps, WINDOW_SECONDS[window])
    return (w - w.min() + 1).astype(np.int64)


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #
def _suffixes(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix) of e.g. clicks.tsv.gz -> ('.tsv', '.gz')."""
    sfx = [s.lower() for s in path.suffixes]
    comp = sfx.pop() if sfx and sfx[-1] in _COMPRESSION_SUFFIXES else None
    return (sfx[-1] if sfx else ""), comp


def _read_table(path: Path, needed: list[str], sep: str | None, flags: dict[str, str]) -> pd.DataFrame:
    if not path.is_file():
        raise IngestError(f"input file {path} not found: expected a CSV/TSV/parquet click log (--input)")
    fmt, _ = _suffixes(path)
    if fmt in _PARQUET_SUFFIXES:
        try:
            available = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise IngestError(
                f"{path} is not a readable parquet file ({e}): expected a parquet click log"
            ) from e
        _check_columns(path, needed, available, flags)
        frame = pd.read_parquet(path, columns=needed)
    else:
        if sep is None:
            if fmt not in _SEP_BY_SUFFIX:
                raise IngestError(
                    f"cannot tell the separator of {path.name} from its extension {fmt or '(none)'!r}: "
                    "expected .csv, .tsv or .parquet (optionally .gz), or pass --sep"
                )
            sep = _SEP_BY_SUFFIX[fmt]
        try:
            header = pd.read_csv(path, sep=sep, nrows=0, compression="infer")
        except pd.errors.EmptyDataError as e:
            raise IngestError(
                f"{path} is empty: expected a header line naming the columns ({', '.join(needed)}) "
                "followed by one line per interaction"
            ) from e
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise IngestError(
                f"{path} cannot be read as text ({e}): expected a CSV/TSV file (gzip allowed)"
            ) from e
        available = [str(c) for c in header.columns]
        _check_columns(path, needed, available, flags, sep=sep)
        try:
            frame = pd.read_csv(path, sep=sep, usecols=needed, compression="infer", low_memory=False)
        except pd.errors.ParserError as e:
            raise IngestError(f"{path} is not well-formed ({e}): expected {sep!r}-separated columns") from e
    if not len(frame):
        raise IngestError(f"{path} has a header but no rows: expected at least one interaction")
    return frame


def _check_columns(
    path: Path, needed: list[str], available: list[str], flags: dict[str, str], sep=None
) -> None:
    for col in needed:
        if col in available:
            continue
        hint = difflib.get_close_matches(col, available, n=1, cutoff=0.6)
        hint_txt = f"; did you mean {hint[0]!r}?" if hint else ""
        sep_txt = ""
        if sep is not None and len(available) == 1:
            sep_txt = f" (the header was read as ONE column with separator {sep!r}: pass the right --sep)"
        raise IngestError(
            f"column {col!r} ({flags.get(col, 'column')}) not found in {path.name}: "
            f"expected one of the file's columns {available}{sep_txt}{hint_txt}"
        )


# --------------------------------------------------------------------------- #
# validation / conversion
# --------------------------------------------------------------------------- #
def _where(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _all_null(series: pd.Series, name: str, flag: str, expected: str) -> None:
    if series.isna().all():
        sample = series.iloc[0] if len(series) else None
        raise IngestError(
            f"column {name!r} ({flag}) is entirely null ({len(series)} rows, e.g. {sample!r}): expected {expected}"
        )


def _check_parsed(
    series: pd.Series, parsed: pd.Series, name: str, flag: str, expected: str, *, unparsed: str, missing: str
) -> None:
    """IngestError naming the first row that `parsed` (series converted with errors="coerce") lost, then
    the first row missing in `series` itself."""
    bad = (parsed.isna() & series.notna()).to_numpy()
    if bad.any():
        i = _where(bad)
        raise IngestError(
            f"column {name!r} ({flag}) has {unparsed} {series.iloc[i]!r} at data row {i + 1}: expected {expected}"
        )
    lost = parsed.isna().to_numpy()
    if lost.any():
        i = _where(lost)
        raise IngestError(
            f"column {name!r} ({flag}) has {missing} at data row {i + 1}: expected {expected} in every row"
        )


def _as_numbers(series: pd.Series, name: str, flag: str, expected: str) -> pd.Series:
    """Numeric version of a column; IngestError on non-numeric text or missing values."""
    _all_null(series, name, flag, expected)
    if pd.api.types.is_bool_dtype(series):
        raise IngestError(
            f"column {name!r} ({flag}) holds booleans (e.g. {series.iloc[0]!r}): expected {expected}"
        )
    numeric = series if pd.api.types.is_numeric_dtype(series) else pd.to_numeric(series, errors="coerce")
    _check_parsed(series, numeric, name, flag, expected, unparsed="non-numeric value", missing="a missing value (NaN)")
    values = numeric.to_numpy()
    if values.dtype.kind == "f":
        inf = ~np.isfinite(values)
        if inf.any():
            i = _where(inf)
            raise IngestError(
                f"column {name!r} ({flag}) has value {values[i]} at data row {i + 1}: expected {expected}"
            )
    return numeric


def _int_ids(series: pd.Series, name: str, flag: str) -> np.ndarray:
    expected = "non-negative integer ids"
    values = _as_numbers(series, name, flag, expected).to_numpy()
    if values.dtype.kind == "f":
        frac = values != np.floor(values)
        if frac.any():
            i = _where(frac)
            raise IngestError(
                f"column {name!r} ({flag}) has non-integer value {series.iloc[i]!r} at data row {i + 1}: expected {expected}"
            )
    values = values.astype(np.int64)
    neg = values < 0
    if neg.any():
        i = _where(neg)
        raise IngestError(
            f"column {name!r} ({flag}) has negative value {values[i]} at data row {i + 1}: expected {expected}"
        )
    return values


def _numbers(series: pd.Series, name: str, flag: str, dtype) -> np.ndarray:
    return _as_numbers(series, name, flag, "finite numbers").to_numpy().astype(dtype)


def _timestamps(series: pd.Series, name: str, unit: str) -> np.ndarray:
    """int64 epoch seconds (UTC)."""
    flag = "--time-col"
    if unit == "date":
        expected = "dates/times such as 2016-05-09 or 2016-05-09 13:45:00 (--time-unit date)"
        _all_null(series, name, flag, expected)
        if pd.api.types.is_numeric_dtype(series):
            raise IngestError(
                f"column {name!r} ({flag}) holds numbers (e.g. {series.iloc[0]!r}): expected {expected}; "
                "for epoch numbers pass --time-unit s or ms"
            )
        parsed = pd.to_datetime(series, errors="coerce", utc=True)
        _check_parsed(series, parsed, name, flag, expected, unparsed="unparseable timestamp", missing="a missing timestamp")
        return parsed.to_numpy().astype("datetime64[s]").astype(np.int64)

    per_second = 1000 if unit == "ms" else 1
    expected = f"epoch {'milliseconds' if unit == 'ms' else 'seconds'} (--time-unit {unit})"
    try:
        numeric = _as_numbers(series, name, flag, expected)
    except IngestError as e:
        if _looks_like_dates(series):
            raise IngestError(f"{e}; the values look like dates: pass --time-unit date") from e
        raise
    secs = np.floor(numeric.to_numpy().astype(np.float64) / per_second)
    out = (secs < 0) | (secs >= _MAX_EPOCH_S)
    if out.any():
        i = _where(out)
        hint = (
            " (are these milliseconds? pass --time-unit ms)"
            if unit == "s" and secs[i] >= _MAX_EPOCH_S
            else ""
        )
        raise IngestError(
            f"column {name!r} ({flag}) has value {series.iloc[i]!r} at data row {i + 1}, outside 1970..2100: "
            f"expected {expected}{hint}"
        )
    return secs.astype(np.int64)


def _looks_like_dates(series: pd.Series) -> bool:
    sample = series.dropna().astype(str).head(20)
    return bool(len(sample)) and pd.to_datetime(sample, errors="coerce").notna().all()
