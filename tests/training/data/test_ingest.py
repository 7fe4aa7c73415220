"""Reading real click logs: formats, ordering, repeats, windows and bad input."""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import DIGINETICA_CSV, DIGINETICA_TSV
from training.data.ingest import IngestConfig, IngestError, read_clicks, window_index
from training.names import ITEM_COL, SESSION_COL, TIME_COL, WINDOW_COL

DAY = 86_400
T0 = 1_464_134_400  # 2016-05-25 00:00:00 UTC

# session 1 written out of time order, with an order column breaking a time tie
# and a consecutive repeat (item 12 twice in a row once sorted)
CLICKS = [
    # sess, item, time,        order
    (2, 30, T0 + DAY + 10, 0),
    (1, 12, T0 + 50, 2),
    (1, 11, T0 + 50, 1),
    (1, 10, T0 + 5, 9),
    (1, 12, T0 + 60, 0),
    (2, 31, T0 + DAY + 20, 0),
    (3, 40, T0 + 3 * DAY, 0),
]


def write(path: Path, rows, header=("sess", "item", "t", "ord"), sep=",", crlf=False) -> Path:
    nl = "\r\n" if crlf else "\n"
    text = sep.join(header) + nl + "".join(sep.join(str(v) for v in r) + nl for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, newline="")
    return path


def cfg(path, **kw) -> IngestConfig:
    base = dict(path=path, session_col="sess", item_col="item", time_col="t", order_col="ord")
    base.update(kw)
    return IngestConfig(**base)


def test_sorts_by_session_time_order_and_drops_consecutive_repeats(tmp_path):
    data = read_clicks(cfg(write(tmp_path / "c.csv", CLICKS)))
    f = data.frame
    assert list(f.columns) == [SESSION_COL, ITEM_COL, TIME_COL, WINDOW_COL]
    assert f[SESSION_COL].tolist() == [1, 1, 1, 2, 2, 3]
    # session 1: t+5 (10), then the tie at t+50 broken by the order column (11 before 12),
    # then 12 again at t+60: a consecutive repeat, dropped
    assert f[ITEM_COL].tolist() == [10, 11, 12, 30, 31, 40]
    assert f[WINDOW_COL].tolist() == [1, 1, 1, 2, 2, 4]
    assert data.stats["repeats_dropped"] == 1
    assert data.stats["rows_read"] == 7


def test_keep_repeats_flag(tmp_path):
    data = read_clicks(cfg(write(tmp_path / "c.csv", CLICKS), keep_repeats=True))
    assert data.frame[ITEM_COL].tolist() == [10, 11, 12, 12, 30, 31, 40]
    assert data.stats["repeats_dropped"] == 0


def test_non_consecutive_repeats_are_kept(tmp_path):
    rows = [(1, 5, T0, 0), (1, 6, T0 + 1, 0), (1, 5, T0 + 2, 0)]
    data = read_clicks(cfg(write(tmp_path / "c.csv", rows)))
    assert data.frame[ITEM_COL].tolist() == [5, 6, 5]


@pytest.mark.parametrize(
    "name, sep, crlf, extra",
    [
        ("c.tsv", "\t", True, {}),  # tab inferred from the extension, CRLF
        ("c.csv.gz", ",", False, {}),  # gzip by suffix
        ("c.txt", ";", False, {"sep": ";"}),  # explicit separator
    ],
)
def test_formats(tmp_path, name, sep, crlf, extra):
    data = read_clicks(cfg(write(tmp_path / name, CLICKS, sep=sep, crlf=crlf), **extra))
    assert data.frame[ITEM_COL].tolist() == [10, 11, 12, 30, 31, 40]


def test_parquet_input_and_extra_columns(tmp_path):
    df = pd.DataFrame(CLICKS, columns=["sess", "item", "t", "ord"])
    df["cat"] = df["item"] // 10
    df["price"] = np.linspace(1, 2, len(df))
    df.to_parquet(tmp_path / "c.parquet")
    data = read_clicks(cfg(tmp_path / "c.parquet", category_col="cat", continuous_cols=("price",)))
    assert data.has_category and data.continuous == ("price",)
    assert data.frame["category"].tolist() == [1, 1, 1, 3, 3, 4]
    assert data.frame["price"].dtype == np.float32


@pytest.mark.parametrize(
    "unit, values",
    [
        ("s", [T0 + 0.9, T0 + DAY]),  # float seconds are floored
        ("ms", [(T0 + 0.9) * 1000, (T0 + DAY) * 1000]),
        ("date", ["2016-05-25", "2016-05-26T00:00:00"]),
    ],
)
def test_time_units(tmp_path, unit, values):
    rows = [(1, 5, values[0], 0), (1, 6, values[1], 0)]
    data = read_clicks(cfg(write(tmp_path / "c.csv", rows), time_unit=unit))
    assert data.frame[TIME_COL].tolist() == [T0, T0 + DAY]
    assert data.frame[WINDOW_COL].tolist() == [1, 2]


def test_hour_windows():
    ts = np.array([T0 + 59 * 60, T0 + 3600, T0 + 3 * 3600 + 1])
    assert window_index(ts, "hour").tolist() == [1, 2, 4]
    assert window_index(ts, "day").tolist() == [1, 1, 1]


def test_week_windows():
    week = 7 * 86_400
    ts = np.array([10 * week, 10 * week + 6 * 86_400, 11 * week, 13 * week + 5])
    assert window_index(ts, "week").tolist() == [1, 1, 2, 4]


# ---- bad input: IngestError naming the column, a sample value and the expectation ----
BAD = [
    # id, header, rows, extra cfg, message fragments
    ("misnamed column", ("session", "item", "t", "ord"), CLICKS, {}, ["'sess'", "--session-col", "did you mean 'session'"]),
    ("missing column", ("sess", "item", "t"), [r[:3] for r in CLICKS], {}, ["'ord'", "--order-col", "['sess', 'item', 't']"]),
    ("non-numeric id", None, [(1, "abc", T0, 0), (1, 2, T0, 1)], {}, ["'item'", "'abc'", "data row 1", "integer ids"]),
    ("fractional id", None, [(1, 2.5, T0, 0), (1, 2, T0, 1)], {}, ["'item'", "2.5", "integer ids"]),
    ("negative id", None, [(1, 3, T0, 0), (-4, 2, T0, 1)], {}, ["'sess'", "-4", "non-negative"]),
    ("NaN id", None, [(1, 3, T0, 0), (1, "", T0, 1)], {}, ["'item'", "missing value (NaN)", "data row 2"]),
    ("all-null session", None, [("", 3, T0, 0), ("NA", 2, T0, 1)], {}, ["'sess'", "entirely null", "integer ids"]),
    ("unparseable date", None, [(1, 3, "2016-05-25", 0), (1, 2, "yesterday", 1)], {"time_unit": "date"},
     ["'t'", "'yesterday'", "data row 2", "2016-05-09"]),
    ("dates given as seconds", None, [(1, 3, "2016-05-25", 0)], {}, ["'t'", "'2016-05-25'", "--time-unit date"]),
    ("ms given as seconds", None, [(1, 3, T0 * 1000, 0)], {}, ["'t'", "outside 1970..2100", "--time-unit ms"]),
    ("numbers given as dates", None, [(1, 3, T0, 0)], {"time_unit": "date"}, ["'t'", "holds numbers", "--time-unit s"]),
    ("missing timestamp", None, [(1, 3, T0, 0), (1, 2, "", 1)], {}, ["'t'", "missing value", "data row 2"]),
]  # fmt: skip


@pytest.mark.parametrize("header, rows, extra, fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_messages(tmp_path, header, rows, extra, fragments):
    path = write(tmp_path / "bad.csv", rows, header=header or ("sess", "item", "t", "ord"))
    with pytest.raises(IngestError) as e:
        read_clicks(cfg(path, **extra))
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


@pytest.mark.parametrize(
    "content, fragment",
    [("", "is empty"), ("sess,item,t,ord\n", "has a header but no rows")],
    ids=["empty file", "header only"],
)
def test_empty_files(tmp_path, content, fragment):
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(IngestError, match=fragment):
        read_clicks(cfg(path))


def test_wrong_separator_is_explained(tmp_path):
    path = write(tmp_path / "c.csv", CLICKS, sep=";")
    with pytest.raises(IngestError, match="ONE column with separator ','"):
        read_clicks(cfg(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(IngestError, match="not found"):
        read_clicks(cfg(tmp_path / "nope.csv"))
    with pytest.raises(IngestError, match="pass --sep"):
        read_clicks(cfg(write(tmp_path / "c.dat", CLICKS)))


# ---- both DIGINETICA extracts, unchanged ----
@pytest.mark.diginetica
def test_diginetica_tsv(diginetica_dir):
    data = read_clicks(
        IngestConfig(diginetica_dir / DIGINETICA_TSV, session_col="sessionId", item_col="itemId",
                     time_col="Time", order_col="timeframe", time_unit="s")
    )  # fmt: skip
    raw = pd.read_csv(diginetica_dir / DIGINETICA_TSV, sep="\t")
    assert data.stats["rows_read"] == len(raw) == 76_821
    assert data.stats["sessions"] == 15_963
    assert data.stats["interactions"] + data.stats["repeats_dropped"] == 76_821
    assert sorted(data.frame[WINDOW_COL].unique()) == list(range(1, 9))
    _check_time_order(data.frame, raw, "sessionId", "itemId", ["Time", "timeframe"])


@pytest.mark.diginetica
def test_diginetica_raw_csv(diginetica_dir):
    data = read_clicks(
        IngestConfig(diginetica_dir / DIGINETICA_CSV, sep=";", time_col="eventdate", time_unit="date",
                     order_col="timeframe")
    )  # fmt: skip
    raw = pd.read_csv(diginetica_dir / DIGINETICA_CSV, sep=";")
    assert data.stats["rows_read"] == 12_391 and data.stats["sessions"] == 2_986
    assert data.frame[TIME_COL].min() == pd.Timestamp("2016-01-03", tz="UTC").timestamp()
    assert data.frame[WINDOW_COL].max() == (pd.Timestamp("2016-06-01") - pd.Timestamp("2016-01-03")).days + 1
    raw["t"] = pd.to_datetime(raw["eventdate"])
    _check_time_order(data.frame, raw, "session_id", "item_id", ["t", "timeframe"])


def _check_time_order(frame, raw, sess, item, order_cols):
    """Independent check: raw rows sorted by (time, order), consecutive repeats removed."""
    expected = raw.sort_values([sess, *order_cols], kind="stable")
    for s in expected[sess].drop_duplicates().sample(200, random_state=0):
        want = expected.loc[expected[sess] == s, item].to_numpy()
        want = want[np.r_[True, want[1:] != want[:-1]]]
        got = frame.loc[frame[SESSION_COL] == s, ITEM_COL].to_numpy()
        np.testing.assert_array_equal(got, want)
