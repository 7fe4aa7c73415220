"""`python -m training.prepare`: layout, split rule, determinism, DIGINETICA, Dask, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    DIGINETICA_CSV,
    DIGINETICA_CSV_FLAGS,
    DIGINETICA_TSV,
    TINY_ROWS,
)
from training.data.prepare import PrepareConfig, prepare, session_uniform, split_of
from training.names import (
    CATEGORY_LIST,
    INTERACTIONS_FILE,
    ITEM_COL,
    ITEM_COUNT,
    ITEM_LIST,
    SCHEMA_FILE,
    SESSION_COL,
    SESSIONS_DIR,
    SPLITS,
    SUMMARY_FILE,
    WINDOW_COL,
    WINDOW_FIRST,
)
from training.prepare import main

pytestmark = pytest.mark.filterwarnings("ignore:Initializing an NVTabular Dataset in CPU mode")


def read_splits(data: Path) -> pd.DataFrame:
    frames = []
    for w in json.loads((data / SCHEMA_FILE).read_text())["windows"]:
        for s in SPLITS:
            f = pd.read_parquet(data / SESSIONS_DIR / str(w) / f"{s}.parquet")
            frames.append(f.assign(window=w, split=s))
    return pd.concat(frames, ignore_index=True)


def split_files(data: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data)): p.read_bytes() for p in sorted((data / SESSIONS_DIR).rglob("*.parquet"))
    }


# --------------------------------------------------------------------------- #
# layout and contents
# --------------------------------------------------------------------------- #
def test_layout_and_schema(tiny_synthetic_data):
    data = tiny_synthetic_data
    schema = json.loads((data / SCHEMA_FILE).read_text())
    assert schema["windows"] == list(range(1, 10)) and schema["window_unit"] == "day"
    assert schema["max_sequence_length"] == 20 and schema["min_session_length"] == 2
    assert schema["item_list"] == ITEM_LIST
    assert list(schema["categorical"]) == [ITEM_LIST, CATEGORY_LIST]
    assert schema["continuous"] == ["age_days-list", "weekday_sin-list"]
    assert schema["raw_inputs"] == {"session_id": "int64", "item_id": "int64", "category": "int64",
                                    "age_days": "float32", "weekday_sin": "float32"}  # fmt: skip
    assert "workflow/workflow.pkl" in schema["workflow_sha256"]
    for w in schema["windows"]:
        for s in SPLITS:
            assert (data / SESSIONS_DIR / str(w) / f"{s}.parquet").is_file()
    assert not [p for p in data.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert not (data / ".fit").exists()
    assert data.stat().st_mode & 0o755 == 0o755


def test_split_file_schema_and_contents(tiny_synthetic_data):
    data = tiny_synthetic_data
    table = pq.read_table(data / SESSIONS_DIR / "1" / "train.parquet")
    assert str(table.schema) == str(pq.read_table(data / SESSIONS_DIR / "2" / "test.parquet").schema)
    types = {f.name: str(f.type.value_type if pa.types.is_list(f.type) else f.type) + "[]" * pa.types.is_list(f.type)
             for f in table.schema}  # fmt: skip
    assert types == {
        SESSION_COL: "int64", WINDOW_FIRST: "int64", ITEM_COUNT: "int64",
        ITEM_LIST: "int64[]", CATEGORY_LIST: "int64[]", "age_days-list": "float[]", "weekday_sin-list": "float[]",
    }  # fmt: skip
    sessions = read_splits(data)
    schema = json.loads((data / SCHEMA_FILE).read_text())
    assert (sessions[WINDOW_FIRST] == sessions["window"]).all()
    assert sessions[SESSION_COL].is_unique
    lengths = sessions[ITEM_LIST].map(len)
    assert (lengths == np.minimum(sessions[ITEM_COUNT], 20)).all() and (lengths >= 2).all()
    for name, card in schema["categorical"].items():
        flat = np.concatenate(sessions[name].to_numpy())
        assert flat.min() >= 3 and flat.max() < card  # no pad/null/OOV inside the lists
    for w in schema["windows"]:  # files are sorted by session id
        f = pd.read_parquet(data / SESSIONS_DIR / str(w) / "train.parquet")
        assert f[SESSION_COL].is_monotonic_increasing


def test_lists_hold_the_last_interactions_in_order(tiny_synthetic_data):
    data = tiny_synthetic_data
    raw = pd.read_parquet(data / INTERACTIONS_FILE)
    sessions = read_splits(data).set_index(SESSION_COL)
    from training.data.serving_transform import ServingTransform

    vocab = ServingTransform.load(data).item_vocabulary()
    for sid, rows in raw.groupby(SESSION_COL, sort=False):
        if len(rows) < 2:
            assert sid not in sessions.index
            continue
        got = vocab[np.asarray(sessions.loc[sid, ITEM_LIST])]
        np.testing.assert_array_equal(got, rows[ITEM_COL].to_numpy()[-20:])
        np.testing.assert_array_equal(sessions.loc[sid, "age_days-list"], rows["age_days"].to_numpy()[-20:])
        assert sessions.loc[sid, WINDOW_FIRST] == rows[WINDOW_COL].iloc[0]


def test_interactions_file(tiny_synthetic_data):
    raw = pd.read_parquet(tiny_synthetic_data / INTERACTIONS_FILE)
    assert len(raw) == TINY_ROWS
    assert [str(t) for t in raw.dtypes] == ["int64", "int64", "int64", "float32", "float32", "int64"]
    sid = raw[SESSION_COL].to_numpy()
    starts = np.r_[True, sid[1:] != sid[:-1]]
    assert starts.sum() == len(np.unique(sid)), "sessions must be contiguous"


def test_summary_matches_files(tiny_synthetic_data):
    data = tiny_synthetic_data
    summary = json.loads((data / SUMMARY_FILE).read_text())
    sessions = read_splits(data)
    for entry in summary["windows"]:
        for s in SPLITS:
            part = sessions[(sessions["window"] == entry["window"]) & (sessions["split"] == s)]
            assert entry[s]["sessions"] == len(part)
            assert entry[s]["interactions"] == part[ITEM_COUNT].sum()
            items = set(np.concatenate(part[ITEM_LIST].to_numpy())) if len(part) else set()
            assert entry[s]["items"] == len(items)
    assert summary["total"]["all"]["sessions"] == len(sessions) == summary["sessions_kept"]
    assert summary["input"]["interactions"] == TINY_ROWS


# --------------------------------------------------------------------------- #
# split rule
# --------------------------------------------------------------------------- #
def test_split_rule_proportions_and_independence():
    ids = np.arange(1_000_000, 1_200_000)
    split = split_of(ids, seed=0)
    share = np.bincount(split, minlength=3) / len(ids)
    np.testing.assert_allclose(share, [0.8, 0.1, 0.1], atol=0.005)
    perm = np.random.RandomState(0).permutation(len(ids))
    np.testing.assert_array_equal(split_of(ids[perm], seed=0), split[perm])  # order-free
    np.testing.assert_array_equal(split_of(ids[:10], seed=0), split[:10])  # batch-free
    assert (split_of(ids, seed=1) != split).mean() > 0.25  # the seed matters
    u = session_uniform(ids, 0)
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(split, np.where(u < 0.8, 0, np.where(u < 0.9, 1, 2)))


def test_files_follow_the_split_rule(tiny_synthetic_data):
    sessions = read_splits(tiny_synthetic_data)
    expected = np.array(SPLITS)[split_of(sessions[SESSION_COL].to_numpy(), seed=0)]
    assert (sessions["split"].to_numpy() == expected).all()


def test_same_seed_same_bytes(tiny_synthetic_data, tmp_path):
    again = tmp_path / "again"
    prepare(PrepareConfig(out=again, synthetic=True, seed=0, num_rows=TINY_ROWS, quiet=True))
    assert split_files(again) == split_files(tiny_synthetic_data)
    assert (again / INTERACTIONS_FILE).read_bytes() == (tiny_synthetic_data / INTERACTIONS_FILE).read_bytes()
    # a rerun into the same folder replaces it
    prepare(PrepareConfig(out=again, synthetic=True, seed=1, num_rows=TINY_ROWS, quiet=True))
    assert split_files(again) != split_files(tiny_synthetic_data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- #
# Dask
# --------------------------------------------------------------------------- #
def test_dask_two_local_workers_give_the_same_splits(tiny_synthetic_data, tmp_path):
    out = tmp_path / "dask"
    prepare(PrepareConfig(out=out, synthetic=True, seed=0, num_rows=TINY_ROWS, workers=2, quiet=True))
    assert split_files(out) == split_files(tiny_synthetic_data)
    a = json.loads((out / SCHEMA_FILE).read_text())
    b = json.loads((tiny_synthetic_data / SCHEMA_FILE).read_text())
    assert a["categorical"] == b["categorical"]
    from training.data.serving_transform import ServingTransform

    np.testing.assert_array_equal(ServingTransform.load(out).item_vocabulary(),
                                  ServingTransform.load(tiny_synthetic_data).item_vocabulary())  # fmt: skip


# --------------------------------------------------------------------------- #
# DIGINETICA (both files, unchanged)
# --------------------------------------------------------------------------- #
@pytest.mark.diginetica
def test_diginetica_tsv(diginetica_data, diginetica_dir):
    schema = json.loads((diginetica_data / SCHEMA_FILE).read_text())
    assert list(schema["categorical"]) == [ITEM_LIST]  # no category column in this extract
    assert schema["continuous"] == ["age_days-list", "weekday_sin-list"]  # derived by workflow ops
    assert schema["raw_inputs"] == {"session_id": "int64", "item_id": "int64", "timestamp": "int64"}
    assert schema["windows"] == list(range(1, 9))
    summary = json.loads((diginetica_data / SUMMARY_FILE).read_text())
    assert summary["input"]["rows_read"] == 76_821 and summary["input"]["sessions"] == 15_963
    assert 14_000 < summary["sessions_kept"] <= 15_963
    sessions = read_splits(diginetica_data)
    # time order: the lists follow (Time, timeframe) of the raw file
    raw = pd.read_csv(diginetica_dir / DIGINETICA_TSV, sep="\t").sort_values(
        ["sessionId", "Time", "timeframe"]
    )
    from training.data.serving_transform import ServingTransform

    vocab = ServingTransform.load(diginetica_data).item_vocabulary()
    for _, row in sessions.sample(300, random_state=0).iterrows():
        items = raw.loc[raw["sessionId"] == row[SESSION_COL], "itemId"].to_numpy()
        items = items[np.r_[True, items[1:] != items[:-1]]]
        np.testing.assert_array_equal(vocab[np.asarray(row[ITEM_LIST])], items[-20:])
        assert len(row["age_days-list"]) == len(row[ITEM_LIST])


@pytest.mark.diginetica
def test_diginetica_raw_csv(diginetica_dir, tmp_path):
    out = tmp_path / "raw"
    assert (
        main(
            [
                "--input",
                str(diginetica_dir / DIGINETICA_CSV),
                *DIGINETICA_CSV_FLAGS,
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    schema = json.loads((out / SCHEMA_FILE).read_text())
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["input"]["rows_read"] == 12_391
    assert schema["windows"][0] == 1 and schema["windows"][-1] == 151  # 2016-01-03 .. 2016-06-01
    sessions = read_splits(out)
    assert len(sessions) == summary["sessions_kept"] > 1_500
    assert sessions[ITEM_COUNT].min() >= 2


# --------------------------------------------------------------------------- #
# bad input: exit code 2, a message naming column/value/expectation, no output
# --------------------------------------------------------------------------- #
GOOD = "sess,item,t\n1,10,1464134400\n1,11,1464134460\n2,12,1464134500\n2,13,1464134600\n"
BAD_FILES = [
    # id, file content, message fragments
    ("missing column", "sess,item\n1,10\n", ["'t'", "--time-col", "['sess', 'item']"]),
    ("misnamed column", "session,item,t\n1,10,1464134400\n", ["'sess'", "did you mean 'session'"]),
    ("empty file", "", ["is empty", "header"]),
    ("header only", "sess,item,t\n", ["no rows"]),
    ("non-numeric id", GOOD + "x1,10,1464134700\n", ["'sess'", "'x1'", "data row 5", "integer ids"]),
    ("unparseable timestamp", GOOD + "3,10,soon\n", ["'t'", "'soon'", "data row 5", "epoch seconds"]),
    ("NaN id", GOOD + "3,,1464134700\n", ["'item'", "missing value (NaN)", "data row 5"]),
    ("all-null session", "sess,item,t\n,10,1464134400\nNA,11,1464134460\n", ["'sess'", "entirely null", "integer ids"]),
]  # fmt: skip


@pytest.mark.parametrize("content, fragments", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_input_exit_code_2_and_no_output(tmp_path, capsys, content, fragments):
    src = tmp_path / "clicks.csv"
    src.write_text(content)
    out = tmp_path / "out" / "data"
    code = main(
        [
            "--input",
            str(src),
            "--session-col",
            "sess",
            "--item-col",
            "item",
            "--time-col",
            "t",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for frag in fragments:
        assert frag in err, (frag, err)
    assert not out.exists()
    assert not (tmp_path / "out").exists(), "temporary output (or the parent it created) left behind"


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "exactly one of --synthetic or --input"),
        (["--synthetic", "--input", "x.csv"], "exactly one of"),
        (["--input", "x.csv"], "--time-col is required"),
        (["--synthetic", "--num-rows", "0"], "--num-rows 0"),
        (["--synthetic", "--workers", "2", "--dask-scheduler", "h:1"], "at most one of"),
    ],
)
def test_bad_flags(tmp_path, capsys, args, fragment):
    assert main([*args, "--out", str(tmp_path / "d")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--synthetic", "--num-rows", "100", "--out", str(out)]) == 2
    assert "not a previous prepare output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


# every flag of the hand-written parser this command had before its flags were derived from
# PrepareConfig (issue 16), with the value it gave: same spelling, same meaning
FLAGS = [
    (["--synthetic"], "synthetic", True),
    (["--input", "c.csv"], "path", Path("c.csv")),
    (["--seed", "7"], "seed", 7),
    (["--num-rows", "500"], "num_rows", 500),
    (["--num-sessions", "50"], "num_sessions", 50),
    (["--session-col", "s"], "session_col", "s"),
    (["--item-col", "i"], "item_col", "i"),
    (["--time-col", "t"], "time_col", "t"),
    (["--order-col", "o"], "order_col", "o"),
    (["--category-col", "c"], "category_col", "c"),
    (["--continuous-cols", "a,b"], "continuous_cols", ("a", "b")),
    (["--continuous-cols", " a , b ,"], "continuous_cols", ("a", "b")),
    (["--continuous-cols", ""], "continuous_cols", ()),
    (["--sep", ";"], "sep", ";"),
    (["--time-unit", "date"], "time_unit", "date"),
    (["--window", "hour"], "window", "hour"),
    (["--keep-repeats"], "keep_repeats", True),
    (["--max-len", "5"], "max_len", 5),
    (["--min-len", "3"], "min_len", 3),
    (["--freq-threshold", "2"], "freq_threshold", 2),
    (["--workers", "2"], "workers", 2),
    (["--dask-scheduler", "h:1"], "dask_scheduler", "h:1"),
    (["--partitions", "4"], "partitions", 4),
    (["--quiet"], "quiet", True),
]
DEFAULTS = dict(
    synthetic=False, path=None, seed=0, num_rows=100_000, num_sessions=None, session_col="session_id",
    item_col="item_id", time_col=None, order_col=None, category_col=None, continuous_cols=(), sep=None,
    time_unit="s", window="day", keep_repeats=False, max_len=20, min_len=2, freq_threshold=0, workers=0,
    dask_scheduler=None, partitions=None, quiet=False,
)  # fmt: skip


@pytest.mark.parametrize("args, name, value", FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_every_flag_keeps_its_meaning(args, name, value):
    from training.prepare import config_from_args

    cfg = config_from_args([*args, "--out", "d"])
    assert getattr(cfg, name) == value and cfg.out == Path("d")
    assert {k: getattr(cfg, k) for k in DEFAULTS if k != name} == {
        k: v for k, v in DEFAULTS.items() if k != name
    }


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--synthetic"], "give --out"),
        (
            ["--synthetic", "--out", "d", "--num-rows", "many"],
            "argument --num-rows: invalid int value: 'many'",
        ),
        (["--input", "c.csv", "--out", "d", "--time-unit", "h"], "argument --time-unit: invalid choice: 'h'"),
        (["--synthetic", "--out", "d", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, args, fragment):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_config_file_then_flags(tmp_path):
    from training.prepare import config_from_args

    path = tmp_path / "prepare.json"
    path.write_text(
        json.dumps({"path": "c.csv", "time_col": "t", "continuous_cols": ["a"], "max_len": 5, "out": "x"})
    )
    cfg = config_from_args(["--config", str(path), "--max-len", "7", "--out", "d"])
    assert (cfg.path, cfg.time_col, cfg.continuous_cols, cfg.max_len, cfg.out) == (
        Path("c.csv"),
        "t",
        ("a",),
        7,
        Path("d"),
    )


def test_cli_process_exit_code_and_help(tmp_path, repo_root):
    src = tmp_path / "c.csv"
    src.write_text("sess,item,t\n1,10,yesterday\n")
    proc = subprocess.run(
        [sys.executable, "-m", "training.prepare", "--input", str(src), "--session-col", "sess",
         "--item-col", "item", "--time-col", "t", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, cwd=repo_root, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "column 't'" in proc.stderr and "'yesterday'" in proc.stderr and "epoch seconds" in proc.stderr
    assert not (tmp_path / "d").exists()
    from training.prepare import build_parser

    help_text = build_parser().format_help()
    assert "train if u < 0.8, valid if u < 0.9" in help_text
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_cli_prints_the_summary_table(tmp_path, capsys):
    assert main(["--synthetic", "--num-rows", "500", "--seed", "2", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "window" in printed and "interactions" in printed and "total" in printed
    summary = json.loads((tmp_path / "d" / SUMMARY_FILE).read_text())
    first = summary["windows"][0]
    assert f"{first['all']['sessions']:>9}" in printed.splitlines()[2]


def test_dask_scheduler_address(tiny_synthetic_data, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:  # fmt: skip
        out = tmp_path / "sched"
        prepare(PrepareConfig(out=out, synthetic=True, seed=0, num_rows=TINY_ROWS, dask_scheduler=cluster.scheduler_address,
                              quiet=True))  # fmt: skip
    assert split_files(out) == split_files(tiny_synthetic_data)


def test_hour_windows_and_given_continuous_columns(tmp_path):
    t0 = 1_464_134_400
    rows = ["s,i,t,price"]
    rs = np.random.RandomState(0)
    for s in range(60):
        start = t0 + rs.randint(0, 5 * 3600)
        for k in range(rs.randint(1, 6)):
            rows.append(f"{s},{rs.randint(1, 30)},{start + 60 * k},{rs.uniform():.3f}")
    src = tmp_path / "c.csv"
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "d"
    args = ["--input", str(src), "--session-col", "s", "--item-col", "i", "--time-col", "t",
            "--continuous-cols", "price", "--window", "hour", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    schema = json.loads((out / SCHEMA_FILE).read_text())
    assert schema["window_unit"] == "hour"
    assert schema["continuous"] == ["price-list"]  # given: nothing derived from the timestamp
    assert schema["raw_inputs"] == {"session_id": "int64", "item_id": "int64", "price": "float32"}
    raw = pd.read_parquet(out / INTERACTIONS_FILE)
    expected_windows = sorted(set((raw["timestamp"] // 3600 - raw["timestamp"].min() // 3600 + 1).tolist()))
    assert schema["windows"] == expected_windows and len(expected_windows) >= 5
    sessions = read_splits(out)
    first = raw.groupby(SESSION_COL)[WINDOW_COL].first()
    assert (sessions["window"].to_numpy() == first.loc[sessions[SESSION_COL]].to_numpy()).all()
    from training.data.serving_transform import ServingTransform

    transform = ServingTransform.load(out)
    got = transform({c: raw[c].to_numpy() for c in transform.raw_inputs})
    by_id = dict(zip(got[SESSION_COL].tolist(), range(len(got[SESSION_COL]))))
    for _, row in sessions.iterrows():
        i = by_id[row[SESSION_COL]]
        np.testing.assert_allclose(got["price-list"][i, : got["lengths"][i]], row["price-list"])
