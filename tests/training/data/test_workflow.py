"""The NVTabular workflow (special ids, truncation, ordering, derived features, schema)
and ServingTransform (parity with Workflow.transform, validation, integrity, speed)."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import nvtabular as nvt
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from merlin.io import Dataset
from merlin.schema import Tags
from nvtabular import ops

from training.data import serving_transform as serving_mod
from training.data import synthetic, workflow_ops
from training.data import workflow as wf
from training.integrity import IntegrityError
from training.names import (
    AGE_COL,
    CATEGORY_LIST,
    ITEM_COL,
    ITEM_COUNT,
    ITEM_LIST,
    LENGTHS_TENSOR,
    OOV_ID,
    SESSION_COL,
    TIME_COL,
    WEEKDAY_COL,
    WINDOW_COL,
    WINDOW_FIRST,
)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing an NVTabular Dataset in CPU mode")

DAY = 86_400
MONDAY = 1_462_752_000  # 2016-05-09 00:00:00 UTC, a Monday
SYNTH_SPEC = wf.WorkflowSpec(has_category=True, continuous=synthetic.CONTINUOUS)
REAL_SPEC = wf.WorkflowSpec(has_category=False, derive_from_timestamp=True)


def fit_transform(frame: pd.DataFrame, spec: wf.WorkflowSpec, stats_dir):
    """Fit with NVTabular's own executor and transform `frame` (the stock path)."""
    workflow = wf.build_workflow(spec, stats_dir)
    workflow.fit(Dataset(frame, cpu=True))
    return workflow, workflow.transform(frame)


def real_frame(sessions: list[list[int]], start=MONDAY, step=60) -> pd.DataFrame:
    """Interactions (session i = sessions[i]) with increasing timestamps, in time order."""
    rows = []
    t = start
    for s, items in enumerate(sessions):
        for item in items:
            rows.append((100 + s, item, t, 1))
            t += step
    return pd.DataFrame(rows, columns=[SESSION_COL, ITEM_COL, TIME_COL, WINDOW_COL])


def by_session(frame: pd.DataFrame) -> dict:
    return {int(r[SESSION_COL]): r for _, r in frame.iterrows()}


# --------------------------------------------------------------------------- #
# Groupby: row order and the vectorised implementation
# --------------------------------------------------------------------------- #
def test_stock_groupby_keeps_row_order_without_sort_cols():
    frame = pd.DataFrame({"s": [2, 1, 2, 1, 2, 1], "x": [9, 5, 3, 7, 1, 6]})
    workflow = nvt.Workflow(["s", "x"] >> ops.Groupby(groupby_cols=["s"], aggs={"x": ["list"]}, name_sep="-"))
    out = workflow.fit_transform(Dataset(frame, cpu=True)).to_ddf().compute()
    assert out["s"].tolist() == [1, 2]
    assert [list(v) for v in out["x-list"]] == [[5, 7, 6], [9, 3, 1]]


@pytest.mark.parametrize("seed", [0, 1])
def test_session_groupby_matches_stock_groupby(seed):
    rs = np.random.RandomState(seed)
    n = 400
    frame = pd.DataFrame(
        {
            "s": rs.randint(0, 60, n),
            "a": rs.randint(0, 1000, n),
            "f": rs.uniform(size=n).astype(np.float32),
            "d": rs.randint(1, 5, n),
        }
    )
    aggs = {"a": ["list", "count", "last"], "f": ["list"], "d": ["first"]}
    stock = ops.Groupby(groupby_cols=["s"], aggs=aggs, name_sep="-")
    ours = workflow_ops.SessionGroupby(groupby_cols=["s"], aggs=aggs, name_sep="-")
    sel = nvt.ColumnSelector(["s", "a", "f", "d"])
    want, got = stock.transform(sel, frame), ours.transform(sel, frame)
    assert sorted(want.columns) == sorted(got.columns)
    for col in want.columns:
        if want[col].dtype == object:
            for w, g in zip(want[col], got[col]):
                np.testing.assert_array_equal(np.asarray(w), g)
        else:
            np.testing.assert_array_equal(want[col].to_numpy(), got[col].to_numpy(), err_msg=col)
            assert want[col].dtype == got[col].dtype, col


def reference_etl_workflow(out_path) -> nvt.Workflow:
    """Transformers4Rec getting-started 01-ETL cell 15 (stock ops), up to its Filter."""
    from training.data.reference_workflow import reference_etl_graph

    return nvt.Workflow(reference_etl_graph(out_path))


def test_matches_the_reference_etl(tmp_path, monkeypatch):
    """Our graph (vectorised groupby, memoised executor, partitioned fit) = the notebook's ETL."""
    from training.data.prepare import _fit_transform_local

    monkeypatch.chdir(tmp_path)  # the reference Categorify writes ./categories
    frame = synthetic.generate(6_000, seed=5, num_sessions=600)
    inputs = frame[SYNTH_SPEC.input_columns()]
    ref = reference_etl_workflow(tmp_path).fit_transform(Dataset(inputs, cpu=True)).to_ddf().compute()
    ours_wf = wf.build_workflow(SYNTH_SPEC, tmp_path / "stats")
    workflow_ops.use_memoizing_executor(ours_wf)
    ours = _fit_transform_local(ours_wf, inputs)
    ref = ref.sort_values(SESSION_COL).reset_index(drop=True)
    ours = ours.sort_values(SESSION_COL).reset_index(drop=True)
    assert len(ours) == len(ref) > 500
    for col in ref.columns:
        if ref[col].dtype == object:
            for r, o in zip(ref[col], ours[col]):
                np.testing.assert_array_equal(np.asarray(r), np.asarray(o), err_msg=col)
        else:
            np.testing.assert_array_equal(ref[col].to_numpy(), ours[col].to_numpy(), err_msg=col)


# --------------------------------------------------------------------------- #
# Workflow semantics
# --------------------------------------------------------------------------- #
def test_special_ids_and_frequency_order(tmp_path):
    # item 7 is the most frequent, then 5, then 9
    frame = real_frame([[7, 5, 7], [9, 7, 5], [7, 8]])
    workflow, out = fit_transform(frame, REAL_SPEC, tmp_path)
    lists = by_session(out)
    assert list(lists[100][ITEM_LIST]) == [3, 4, 3]  # 7 -> 3 (most frequent), 5 -> 4
    for items in out[ITEM_LIST]:
        assert min(items) >= 3  # 0 pad, 1 null, 2 OOV never appear for known items
    # an item unseen at fit time is OOV (2)
    unseen = workflow.transform(real_frame([[7, 12345, 5]]))
    assert list(unseen[ITEM_LIST][0]) == [3, OOV_ID, 4]


def test_frequency_threshold_maps_rare_items_to_oov(tmp_path):
    frame = real_frame([[7, 5, 7], [9, 7, 5], [7, 8]])
    spec = wf.WorkflowSpec(has_category=False, derive_from_timestamp=True, freq_threshold=2)
    _, out = fit_transform(frame, spec, tmp_path)
    lists = by_session(out)
    assert list(lists[101][ITEM_LIST]) == [OOV_ID, 3, 4]  # 9 seen once -> OOV
    assert list(lists[102][ITEM_LIST]) == [3, OOV_ID]  # 8 seen once -> OOV


def test_keeps_the_last_max_len_items_in_time_order(tmp_path):
    long_session = list(range(1000, 1025))  # 25 distinct items
    frame = real_frame([long_session, [1, 2]])
    workflow, out = fit_transform(frame, REAL_SPEC, tmp_path)
    row = by_session(out)[100]
    assert row[ITEM_COUNT] == 25
    assert len(row[ITEM_LIST]) == 20
    values, labels = _item_table(workflow)
    raw = dict(zip(labels, values))
    assert [raw[i] for i in row[ITEM_LIST]] == long_session[-20:]  # the LAST 20, in order
    # continuous lists are cut the same way: weekday/age of interactions 6..25
    assert len(row["age_days-list"]) == len(row["weekday_sin-list"]) == 20


def _item_table(workflow):
    for node in _nodes(workflow.output_node):
        if isinstance(node.op, ops.Categorify):
            return serving_mod._categorify_tables(node.op, ITEM_COL)
    raise AssertionError("no Categorify")


def _nodes(node, seen=None):
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    yield node
    for p in node.parents_with_dependencies:
        yield from _nodes(p, seen)


@pytest.mark.parametrize("min_len, kept", [(2, {100, 102}), (3, {102}), (1, {100, 101, 102})])
def test_min_session_length(tmp_path, min_len, kept):
    frame = real_frame([[1, 2], [3], [4, 5, 6]])
    spec = wf.WorkflowSpec(has_category=False, derive_from_timestamp=True, min_len=min_len)
    _, out = fit_transform(frame, spec, tmp_path)
    assert set(out[SESSION_COL]) == kept


def test_time_ordering_follows_row_order(tmp_path):
    # rows interleaved across sessions; inside each session in time order
    frame = pd.DataFrame(
        {SESSION_COL: [5, 6, 5, 6, 5], ITEM_COL: [30, 40, 10, 50, 20],
         TIME_COL: MONDAY + np.arange(5), WINDOW_COL: 1}
    )  # fmt: skip
    workflow, out = fit_transform(frame, REAL_SPEC, tmp_path)
    values, labels = _item_table(workflow)
    raw = dict(zip(labels, values))
    lists = by_session(out)
    assert [raw[i] for i in lists[5][ITEM_LIST]] == [30, 10, 20]
    assert [raw[i] for i in lists[6][ITEM_LIST]] == [40, 50]


def test_derived_timestamp_features(tmp_path):
    # item 1 first seen on Monday; seen again 2.5 days later (Wednesday noon)
    frame = pd.DataFrame(
        {SESSION_COL: [1, 1, 2, 2], ITEM_COL: [1, 2, 3, 1],
         TIME_COL: [MONDAY, MONDAY + 60, MONDAY + 2 * DAY + DAY // 2, MONDAY + 2 * DAY + DAY // 2 + 60],
         WINDOW_COL: [1, 1, 3, 3]}
    )  # fmt: skip
    workflow, out = fit_transform(frame, REAL_SPEC, tmp_path)
    rows = by_session(out)
    np.testing.assert_allclose(rows[1]["weekday_sin-list"], [0.0, 0.0], atol=1e-7)  # Monday
    np.testing.assert_allclose(rows[2]["weekday_sin-list"], [np.sin(2 * np.pi * 2 / 7)] * 2, rtol=1e-6)
    np.testing.assert_allclose(rows[1]["age_days-list"], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(rows[2]["age_days-list"], [0.0, 2.5 + 60 / DAY], rtol=1e-6)
    assert rows[2]["age_days-list"].dtype == np.float32
    # at serving, an item unseen at fit time has age 0
    later = pd.DataFrame(
        {SESSION_COL: [9, 9], ITEM_COL: [1, 777], TIME_COL: [MONDAY + 7 * DAY] * 2, WINDOW_COL: 1}
    )
    got = workflow.transform(later)
    np.testing.assert_allclose(got["age_days-list"][0], [7.0, 0.0], rtol=1e-6)


def test_weekday_and_age_functions_on_arrays_and_series():
    ts = np.array([0, MONDAY, MONDAY + 6 * DAY])  # Thursday, Monday, Sunday
    expected = np.sin(2 * np.pi * np.array([3, 0, 6]) / 7).astype(np.float32)
    np.testing.assert_allclose(workflow_ops.weekday_sin(ts), expected)
    s = workflow_ops.weekday_sin(pd.Series(ts, index=[5, 6, 7]))
    assert list(s.index) == [5, 6, 7] and s.dtype == np.float32
    age = workflow_ops.item_age_days(
        np.array([MONDAY, np.nan, MONDAY + DAY]), {TIME_COL: np.array([MONDAY + DAY] * 3)}
    )
    np.testing.assert_allclose(age, [1.0, 0.0, 0.0])


def test_output_schema_tags(tmp_path):
    workflow, _ = fit_transform(
        synthetic.generate(1_000, 0)[SYNTH_SPEC.input_columns()], SYNTH_SPEC, tmp_path
    )
    schema = workflow.output_schema
    assert {Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.LIST} <= set(schema[ITEM_LIST].tags)
    assert {Tags.CATEGORICAL, Tags.LIST} <= set(schema[CATEGORY_LIST].tags)
    assert Tags.ITEM not in schema[CATEGORY_LIST].tags
    for c in ("age_days-list", "weekday_sin-list"):
        assert {Tags.CONTINUOUS, Tags.LIST} <= set(schema[c].tags)
    assert not schema[ITEM_COUNT].tags  # a plain count, not a categorical item id
    assert schema[ITEM_LIST].properties["value_count"]["max"] == 20
    categorical, continuous = wf.feature_columns(workflow)
    assert list(categorical) == [ITEM_LIST, CATEGORY_LIST]
    assert continuous == ["age_days-list", "weekday_sin-list"]
    assert list(schema.column_names) == [SESSION_COL, WINDOW_FIRST, ITEM_COUNT, ITEM_LIST, CATEGORY_LIST,
                                         "age_days-list", "weekday_sin-list"]  # fmt: skip


# --------------------------------------------------------------------------- #
# ServingTransform
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def serving(tiny_synthetic_data):
    return serving_mod.ServingTransform.load(tiny_synthetic_data)


def _request(frame: pd.DataFrame, transform) -> dict:
    return {c: frame[c].to_numpy() for c in transform.raw_inputs}


def assert_parity(transform, rows: pd.DataFrame) -> int:
    """ServingTransform(rows) == Workflow.transform(rows) for sessions the workflow keeps."""
    rows = rows.reset_index(drop=True)
    out = transform(_request(rows, transform))
    ref = transform.workflow.transform(rows)
    first_seen = pd.unique(rows[SESSION_COL])
    np.testing.assert_array_equal(out[SESSION_COL], first_seen)  # order of first appearance
    pos = {s: i for i, s in enumerate(out[SESSION_COL])}
    L = transform.max_len
    for _, r in ref.iterrows():
        i = pos[r[SESSION_COL]]
        n = out[LENGTHS_TENSOR][i]
        assert n == len(r[ITEM_LIST]) == min(r[ITEM_COUNT], L)
        for name in [*transform.categorical, *transform.continuous]:
            assert out[name].shape == (len(first_seen), L)
            np.testing.assert_array_equal(out[name][i, :n], np.asarray(r[name]), err_msg=name)
            assert not out[name][i, n:].any(), "right padding must be 0"
    # sessions the workflow drops (length 1) are kept by serving
    counts = rows.groupby(SESSION_COL, sort=False).size()
    short = counts[counts < transform.schema["min_session_length"]].index
    for s in short:
        assert out[LENGTHS_TENSOR][pos[s]] == counts[s]
    return len(ref)


def test_serving_parity_synthetic(serving, tiny_synthetic_data):
    rows = pd.read_parquet(tiny_synthetic_data / "interactions.parquet")
    assert assert_parity(serving, rows) > 500
    # several small requests (sessions cut at request boundaries are still handled the same way)
    for start in range(0, 300, 37):
        assert_parity(serving, rows.iloc[start : start + 37])


def test_serving_dtypes_and_truncation(serving):
    items = serving.item_vocabulary()[3:28]  # 25 known raw item ids
    n = len(items)
    req = {
        "session_id": np.array([5] * n + [3], dtype=np.int64),
        "item_id": np.r_[items, items[0]],
        "category": np.ones(n + 1, dtype=np.int64),
        "age_days": np.linspace(0, 1, n + 1).astype(np.float32),
        "weekday_sin": np.zeros(n + 1, dtype=np.float32),
    }
    out = serving(req)
    assert out[SESSION_COL].tolist() == [5, 3]
    assert out[LENGTHS_TENSOR].tolist() == [20, 1]
    assert out[ITEM_LIST].dtype == np.int64 and out["age_days-list"].dtype == np.float32
    np.testing.assert_array_equal(out[ITEM_LIST][0], np.arange(3, 28)[-20:])  # the LAST 20
    np.testing.assert_allclose(out["age_days-list"][0], req["age_days"][5:25])
    assert out[ITEM_LIST][1, 0] == 3 and not out[ITEM_LIST][1, 1:].any()


def test_serving_accepts_castable_dtypes(serving):
    items = serving.item_vocabulary()[3:6]
    base = _request_of(items)
    want = serving(base)
    castable = dict(base, session_id=base["session_id"].astype(np.int32), item_id=base["item_id"].astype(np.float64),
                    age_days=base["age_days"].astype(np.float64), extra=np.zeros(3))  # fmt: skip
    got = serving(castable)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def _request_of(items) -> dict:
    n = len(items)
    return {
        "session_id": np.full(n, 1, dtype=np.int64),
        "item_id": np.asarray(items, dtype=np.int64),
        "category": np.ones(n, dtype=np.int64),
        "age_days": np.full(n, 0.5, dtype=np.float32),
        "weekday_sin": np.zeros(n, dtype=np.float32),
    }


BAD_REQUESTS = [
    # id, change to a valid 3-row request, message fragments
    ("missing column", lambda r: r.pop("category"), ["'category'", "missing column", "int64"]),
    ("length mismatch", lambda r: r.update(age_days=np.zeros(2, np.float32)), ["'age_days'", "2 values", "3", "one value per"]),
    ("zero rows", lambda r: r.update({k: v[:0] for k, v in r.items()}), ["'session_id'", "zero rows", "at least one"]),
    ("NaN continuous", lambda r: r["age_days"].__setitem__(1, np.nan), ["'age_days'", "nan", "finite"]),
    ("inf continuous", lambda r: r["weekday_sin"].__setitem__(0, np.inf), ["'weekday_sin'", "inf", "finite"]),
    ("negative id", lambda r: r["item_id"].__setitem__(2, -7), ["'item_id'", "-7", "non-negative"]),
    ("fractional id", lambda r: r.update(session_id=np.array([1.0, 1.5, 1.0])), ["'session_id'", "1.5", "integer"]),
    ("NaN id", lambda r: r.update(item_id=np.array([3.0, np.nan, 4.0])), ["'item_id'", "nan", "integer ids"]),
    ("string dtype", lambda r: r.update(item_id=np.array(["a", "b", "c"])), ["'item_id'", "'a'", "int64"]),
    ("bool dtype", lambda r: r.update(category=np.array([True, False, True])), ["'category'", "bool", "int64"]),
    ("2-D column", lambda r: r.update(item_id=np.ones((3, 2), np.int64)), ["'item_id'", "(3, 2)", "1-D"]),
]  # fmt: skip


@pytest.mark.parametrize("change, fragments", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_serving_input_errors(serving, change, fragments):
    req = _request_of(serving.item_vocabulary()[3:6])
    change(req)
    with pytest.raises(serving_mod.InputError) as e:
        serving(req)
    assert isinstance(e.value, ValueError)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_item_vocabulary(serving, tiny_synthetic_data):
    vocab = serving.item_vocabulary()
    schema = json.loads((tiny_synthetic_data / "schema.json").read_text())
    assert vocab.dtype == np.int64 and len(vocab) == schema["categorical"][ITEM_LIST]
    assert vocab[:3].tolist() == [-1, -1, -1]
    assert (vocab[3:] >= 1).all() and len(set(vocab[3:])) == len(vocab) - 3
    # encoding the vocabulary gives back its indices
    out = serving(_request_of(vocab[3:23]))
    np.testing.assert_array_equal(out[ITEM_LIST][0], np.arange(3, 23))
    raw = pd.read_parquet(tiny_synthetic_data / "interactions.parquet")[ITEM_COL]
    assert set(vocab[3:]) == set(raw)


def test_serving_latency_small_request(serving, tiny_synthetic_data):
    rows = pd.read_parquet(tiny_synthetic_data / "interactions.parquet").iloc[:10]
    req = _request(rows, serving)
    for _ in range(20):
        serving(req)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        serving(req)
        times.append(time.perf_counter() - t)
    median_ms = 1000 * float(np.median(times))
    print(f"ServingTransform, 10 rows: median {median_ms:.3f} ms")
    assert median_ms < 1.0


def _copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sha256_is_checked_before_unpickling(tiny_synthetic_data, tmp_path):
    data = _copy_data(tiny_synthetic_data, tmp_path / "data")
    serving_mod.ServingTransform.load(data)  # intact copy loads
    with open(data / "workflow" / "workflow.pkl", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"workflow\.pkl has sha256 .* expects"):
        serving_mod.ServingTransform.load(data)


@pytest.mark.parametrize("problem", ["missing file", "no hash for the pickle", "unlisted pickle"])
def test_integrity_errors(tiny_synthetic_data, tmp_path, problem):
    data = _copy_data(tiny_synthetic_data, tmp_path / "data")
    schema = json.loads((data / "schema.json").read_text())
    if problem == "missing file":
        victim = next(k for k in schema["workflow_sha256"] if k.endswith(".parquet"))
        (data / victim).unlink()
        match = "is missing"
    elif problem == "no hash for the pickle":
        del schema["workflow_sha256"]["workflow/workflow.pkl"]
        (data / "schema.json").write_text(json.dumps(schema))
        match = "refusing to unpickle"
    else:
        shutil.copy(data / "workflow" / "workflow.pkl", data / "workflow" / "other.pkl")
        match = "unexpected pickle"
    with pytest.raises(IntegrityError, match=match):
        serving_mod.ServingTransform.load(data)


@pytest.mark.diginetica
def test_serving_parity_diginetica(diginetica_data):
    transform = serving_mod.ServingTransform.load(diginetica_data)
    assert list(transform.raw_inputs) == [SESSION_COL, ITEM_COL, TIME_COL]
    assert transform.continuous == [f"{AGE_COL}-list", f"{WEEKDAY_COL}-list"]
    rows = pd.read_parquet(diginetica_data / "interactions.parquet")
    sample = rows[rows[SESSION_COL].isin(pd.unique(rows[SESSION_COL])[:800])]
    assert assert_parity(transform, sample) > 600
    # sessions longer than max_len exist in this sample and are cut identically
    assert sample.groupby(SESSION_COL).size().max() > 20


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_serving_parity_random_requests(serving, data):
    """Random requests: interleaved sessions, unseen items, long sessions."""
    vocab = serving.item_vocabulary()[3:]
    n = data.draw(st.integers(1, 60), label="rows")
    sessions = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n), label="sessions")
    items = data.draw(
        st.lists(
            st.one_of(st.sampled_from(vocab.tolist()), st.integers(100_000, 100_010)), min_size=n, max_size=n
        ),
        label="items",
    )
    rows = pd.DataFrame(
        {
            SESSION_COL: np.asarray(sessions, dtype=np.int64) + 70_000,
            ITEM_COL: np.asarray(items, dtype=np.int64),
            "category": np.asarray(
                data.draw(st.lists(st.integers(1, 400), min_size=n, max_size=n)), dtype=np.int64
            ),
            "age_days": np.linspace(0, 1, n, dtype=np.float32),
            "weekday_sin": np.linspace(1, 0, n, dtype=np.float32),
            WINDOW_COL: 1,
        }
    )
    assert_parity(serving, rows)


@pytest.mark.parametrize("which", ["synthetic", "diginetica"])
def test_compiled_workflow_round_trips_through_its_files(request, tmp_path, which):
    """What export ships (workflow.json + .npy, read by training/data/sessrec_transform.py alone) gives the same
    tensors as ServingTransform: the parity tests above cover the shipped code."""
    from training.data.sessrec_transform import SPEC_FILE, Transform

    data = request.getfixturevalue("tiny_synthetic_data" if which == "synthetic" else "diginetica_data")
    serving = serving_mod.ServingTransform.load(data)
    written = serving.compiled.save(tmp_path)
    assert {Path(p).suffix for p in written} == {".json", ".npy"}
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec["format"] == 1 and spec["special_ids"] == {"pad": 0, "null": 1, "oov": 2, "first_real": 3}
    loaded = Transform.load(tmp_path)
    rows = pd.read_parquet(data / "interactions.parquet")
    rows = rows[rows[SESSION_COL].isin(rows[SESSION_COL].unique()[:400])]
    cols = {c: rows[c].to_numpy() for c in serving.raw_inputs}
    want, got = serving(cols), loaded(cols)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(loaded.item_vocabulary(), serving.item_vocabulary())
