"""Issue 12: a vocabulary that grows window by window.

Ids follow first appearance (append-only: a refit on the log up to window t gives every
item it knows the same id), schema.json records the prefix known after each window, the
model's tables grow with it (old rows and optimizer state kept, resume exact), and window
t+1 is evaluated with what was known after t (unknown inputs OOV, unknown targets a miss
for the model, the baselines and the count blend); --eval-split test reads test.parquet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import training.trainer as trainer_mod
from tests.training import train_util
from training.baselines import BaselineCounts, evaluate_baselines, memory_tables
from training.config import TrainConfig
from training.data.prepare import prepare
from training.data.splits import SessionTensors, eval_inputs_targets, load_schema, load_split, split_path
from training.evaluate import count_blend_metrics, evaluate_model, known_inputs
from training.model import ModelConfig, SessionModel
from training.names import FIRST_REAL_ID, ITEM_LIST, OOV_ID, SESSION_COL, WINDOW_COL
from training.prepare import config_from_args
from training.schema import Schema
from training.train import parse_args, train
from training.trainer import pad_optimizer_state

DAY = 86_400
T0 = 1_600_000_000  # 2020-09-13 12:26:40 UTC


def click_log(path: Path, days: int = 4, sessions_per_day: int = 60, seed: int = 0) -> pd.DataFrame:
    """A click log whose catalogue grows every day (new items appear each day), with a few
    sessions crossing midnight; written to `path` as CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    sid = 0
    for d in range(days):
        for s in range(sessions_per_day):
            start = T0 - T0 % DAY + d * DAY + int(rng.integers(0, DAY - 600))
            if s == 0 and d < days - 1:
                start = T0 - T0 % DAY + (d + 1) * DAY - 90  # crosses into the next day
            n = int(rng.integers(1, 6))
            pool = 20 + 15 * (d + 1)  # items 1000..1000+pool: later days reach new items
            for j in range(n):
                rows.append((sid, 1000 + int(rng.integers(0, pool)), start + 60 * j))
            sid += 1
    frame = pd.DataFrame(rows, columns=["sess", "item", "ts"])
    frame.to_csv(path, index=False)
    return frame


FLAGS = ["--session-col", "sess", "--item-col", "item", "--time-col", "ts", "--time-unit", "s", "--quiet"]


def vocabulary(data: Path) -> np.ndarray:
    """Raw item id of every encoded id (-1 for special ids), from the saved workflow."""
    from training.data.serving_transform import ServingTransform

    return ServingTransform.load(data).item_vocabulary()


@pytest.fixture(scope="module")
def grown_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    frame = click_log(root / "clicks.csv")
    data = root / "data"
    prepare(config_from_args(["--input", str(root / "clicks.csv"), *FLAGS, "--out", str(data)]))
    return root, frame, data


@pytest.mark.parametrize("freq_threshold", [0, 2])
def test_refit_on_a_prefix_of_the_log_gives_the_same_ids(grown_log, tmp_path, freq_threshold):
    """An item's id never changes across windows: prepare on the sessions of windows <= t
    gives every item it knows the id the whole log gave it, and knows exactly known(t)."""
    root, frame, _ = grown_log
    full = tmp_path / "full"
    thr = ["--freq-threshold", str(freq_threshold)]
    prepare(config_from_args(["--input", str(root / "clicks.csv"), *FLAGS, *thr, "--out", str(full)]))
    schema = Schema.load(full)
    vocab = vocabulary(full)
    inter = pd.read_parquet(full / "interactions.parquet")
    first_window = inter.groupby(SESSION_COL)[WINDOW_COL].transform("first")
    sizes = [schema.known_size(ITEM_LIST, t) for t in schema.windows]
    assert sizes == sorted(sizes) and sizes[-1] == schema.categorical[ITEM_LIST] == len(vocab)
    assert len(set(sizes)) == len(sizes)  # new items every day
    for t in schema.windows[:-1]:
        keep = set(inter.loc[first_window <= t, SESSION_COL])
        cut = root / f"cut{t}-{freq_threshold}.csv"
        frame[frame["sess"].isin(keep)].to_csv(cut, index=False)
        part = tmp_path / f"part{t}"
        prepare(config_from_args(["--input", str(cut), *FLAGS, *thr, "--out", str(part)]))
        sub = vocabulary(part)
        assert len(sub) == schema.known_size(ITEM_LIST, t)
        np.testing.assert_array_equal(sub, vocab[: len(sub)])  # same ids for every known item
        if freq_threshold == 0:  # known(t) = every item of the sessions of windows <= t
            assert len(sub) - FIRST_REAL_ID == inter.loc[first_window <= t, "item_id"].nunique()


def test_split_files_of_window_t_hold_only_ids_known_at_t(grown_log):
    _, _, data = grown_log
    schema = Schema.load(data)
    for t in schema.windows:
        for split in ("train", "valid", "test"):
            st = load_split(split_path(data, t, split), schema)
            if len(st):
                assert int(st.feats[ITEM_LIST].max()) < schema.known_size(ITEM_LIST, t)


def test_schema_without_vocabulary_by_window_knows_everything(tmp_path):
    raw = {"categorical": {ITEM_LIST: 50, "category-list": 9}, "max_sequence_length": 20}
    old = Schema.from_dict(raw)
    assert old.vocabulary_by_window is None and old.to_dict() == raw
    assert old.known_sizes(1) == {ITEM_LIST: 50, "category-list": 9}
    new = Schema.from_dict({**raw, "vocabulary_by_window": {ITEM_LIST: {"2": 10, "3": 50}}})
    assert [new.known_size(ITEM_LIST, t) for t in (1, 2, 3, 4)] == [FIRST_REAL_ID, 10, 50, 50]
    assert new.known_size("category-list", 2) == 9  # not recorded: everything known
    assert Schema.from_dict(json.loads(new.to_json())) == new


# --- growing the model -----------------------------------------------------------------------


def small_model(n_items: int = 10, **kw) -> SessionModel:
    cfg = ModelConfig(
        categorical={ITEM_LIST: n_items, "category-list": 5},
        continuous=["age_days-list"],
        d_model=16,
        n_head=2,
        d_inner=32,
        embedding_dim=16,
        **kw,
    )
    torch.manual_seed(0)
    return SessionModel(cfg)


def batch(v: int = 10, c: int = 5):
    g = torch.Generator().manual_seed(1)
    items = torch.randint(FIRST_REAL_ID, v, (6, 5), generator=g)
    feats = {
        ITEM_LIST: items,
        "category-list": torch.randint(FIRST_REAL_ID, c, (6, 5), generator=g),
        "age_days-list": torch.rand(6, 5, generator=g),
    }
    return feats, torch.tensor([5, 4, 3, 2, 5, 3])


@pytest.mark.parametrize("memory", [False, True])
def test_grow_keeps_old_rows_and_optimizer_state(memory):
    model = small_model(memory=memory, objective="clm", memory_k=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    feats, lengths = batch()
    model.training_loss(feats, lengths).backward()
    opt.step()
    table = model.embeddings[ITEM_LIST].weight
    old = table.detach().clone()
    state = {k: v.clone() for k, v in opt.state[table].items()}
    before = model.grow({ITEM_LIST: 14, "category-list": 7}, torch.Generator().manual_seed(3))
    assert before == {ITEM_LIST: 10, "category-list": 5}
    assert model.cfg.n_items == 14 and model.cfg.categorical["category-list"] == 7
    assert model.embeddings[ITEM_LIST].weight is table  # same Parameter: the optimizer keeps its key
    assert torch.equal(table[:10], old) and table.shape == (14, 16)
    gen = torch.Generator().manual_seed(3)  # rows drawn from the given generator, features in name order
    cat_rows = torch.randn(2, 16, generator=gen) * model.cfg.embedding_init_std
    item_rows = torch.randn(4, 16, generator=gen) * model.cfg.embedding_init_std
    torch.testing.assert_close(model.embeddings["category-list"].weight[5:].detach(), cat_rows)
    torch.testing.assert_close(table[10:].detach(), item_rows)
    pad_optimizer_state(opt, model)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[table][k][:10], state[k]) and not opt.state[table][k][10:].any()
    assert opt.state[table]["step"] == state["step"]
    scores = model.eval().next_item_scores(*batch())
    assert scores.shape == (6, 14) and torch.isinf(scores[:, :FIRST_REAL_ID]).all()
    if memory:
        assert model.item_memory.pop.shape == (14,) and model.item_memory.cooc_idx.shape == (14, 4)
    model.train()
    feats, lengths = batch(14, 7)
    model.training_loss(feats, lengths).backward()
    opt.step()  # fused or not, the state fits the grown table
    with pytest.raises(ValueError, match="cannot shrink"):
        model.grow({ITEM_LIST: 12})


def test_zero_init_rule_gives_zero_rows():
    model = small_model(embedding_init_std=0.0)
    model.grow({ITEM_LIST: 12}, torch.Generator().manual_seed(0))
    assert not model.embeddings[ITEM_LIST].weight[10:].any()


def test_ids_beyond_the_table_are_read_as_oov():
    model = small_model().eval()
    feats, lengths = batch()
    later = dict(feats)
    later[ITEM_LIST] = feats[ITEM_LIST].clone()
    later[ITEM_LIST][:, 0] = 40  # encoded by a workflow fitted on a longer log
    oov = dict(feats)
    oov[ITEM_LIST] = later[ITEM_LIST].masked_fill(later[ITEM_LIST] >= 10, OOV_ID)
    torch.testing.assert_close(model.next_item_scores(later, lengths), model.next_item_scores(oov, lengths))
    traced = torch.jit.trace(model, (later, lengths), strict=False)
    torch.testing.assert_close(traced(later, lengths), model.next_item_scores(oov, lengths))


# --- evaluation with what was known at t -----------------------------------------------------


def test_unknown_inputs_become_oov_and_unknown_targets_miss_for_every_method():
    items = torch.tensor([[3, 7, 4, 0], [4, 3, 8, 0], [5, 3, 0, 0]])  # known after t: ids < 7
    age = torch.full((3, 4), 2.5)
    st = SessionTensors({ITEM_LIST: items, "age_days-list": age}, torch.tensor([3, 3, 2]), torch.arange(3))
    masked, miss = known_inputs(st, {ITEM_LIST: 7}, ITEM_LIST, "age_days-list")
    assert masked.feats[ITEM_LIST].tolist() == [[3, OOV_ID, 4, 0], [4, 3, OOV_ID, 0], [5, 3, 0, 0]]
    assert masked.feats["age_days-list"][0].tolist() == [2.5, 0.0, 2.5, 2.5]  # unseen item: age 0
    assert miss.tolist() == [False, True, False]  # session 1's target (8) is unknown at t
    # model: the miss is a miss, whatever the scores
    model = small_model(7, memory=True, memory_k=4).eval()
    feats = {ITEM_LIST: masked.feats[ITEM_LIST], "category-list": torch.full((3, 4), 3),
             "age_days-list": masked.feats["age_days-list"]}  # fmt: skip
    mst = SessionTensors(feats, masked.lengths, masked.session_id)
    res = evaluate_model(model, mst, torch.device("cpu"), 2, miss)
    with_target = evaluate_model(model, mst, torch.device("cpu"), 2)
    assert res["recall@40"] <= 2 / 3 and with_target["recall@40"] == 1.0  # 7 ids: everything in the top 40
    # baselines: counts of training sessions of windows <= t (ids < 7); the unknown target misses
    counts = BaselineCounts(9)
    counts.add_sessions(np.array([[3, 4, 5, 6], [4, 3, 5, 0]]), np.array([4, 3]))
    f, lens, targets = eval_inputs_targets(masked, ITEM_LIST)
    base = evaluate_baselines(counts, f[ITEM_LIST].numpy(), lens.numpy(), targets.numpy())
    for name, m in base.items():
        assert m["recall@40"] <= 2 / 3, name
    # count blend: the same
    tables = {k: torch.from_numpy(v) for k, v in memory_tables(counts, 4).items()}
    blend = count_blend_metrics(tables, model.cfg, mst, torch.device("cpu"), 2, 7, miss)
    assert blend["recall@40"] <= 2 / 3


# --- the run ---------------------------------------------------------------------------------


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    return train_util.tiny_cfg(data, out, **{"end_window": 4, **kw})


def test_run_records_items_known_and_unseen_targets(grown_log, tmp_path):
    _, _, data = grown_log
    schema = Schema.load(data)
    result = train(
        tiny_cfg(data, tmp_path / "run", model={"memory": True, "memory_k": 8, "objective": "clm"})
    )
    inter = pd.read_parquet(data / "interactions.parquet")
    first_window = inter.groupby(SESSION_COL)[WINDOW_COL].transform("first")
    known = []
    for row in result["windows"]:
        t = row["train_window"]
        seen = inter.loc[first_window <= t, "item_id"].nunique()
        assert row["items_known"] == schema.known_size(ITEM_LIST, t) <= FIRST_REAL_ID + seen
        known.append(row["items_known"])
        st = load_split(split_path(data, t + 1, "valid"), schema)
        targets = st.feats[ITEM_LIST][torch.arange(len(st)), st.lengths - 1]
        assert row["unseen_targets"] == pytest.approx(float((targets >= row["items_known"]).float().mean()))
        assert row["eval_split"] == "valid"
        assert set(row["baselines"]) == {"popular", "cooc_knn", "successor_knn", "vsknn", "count_blend"}
    assert known == sorted(known) and len(set(known)) == len(known)  # grows every window here
    assert any(r["unseen_targets"] > 0 for r in result["windows"])
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["model_config"]["categorical"][ITEM_LIST] == known[-1]
    assert meta["vocabulary_sizes"][ITEM_LIST] == known[-1] < schema.categorical[ITEM_LIST]


def test_eval_split_test_reads_test_parquet(tiny_synthetic_data, tmp_path, monkeypatch):
    read: list[str] = []
    real = trainer_mod.load_split

    def spy(path, schema):
        read.append(str(path))
        return real(path, schema)

    monkeypatch.setattr(trainer_mod, "load_split", spy)
    result = train(tiny_cfg(tiny_synthetic_data, tmp_path / "run", end_window=3, eval_split="test"))
    assert any(p.endswith("3/test.parquet") for p in read)
    assert not any(p.endswith("valid.parquet") for p in read)  # nothing reads the valid split
    schema = load_schema(tiny_synthetic_data)
    for row in result["windows"]:
        assert row["eval_split"] == "test"
        assert row["eval_sessions"] == len(
            load_split(split_path(tiny_synthetic_data, row["eval_window"], "test"), schema)
        )
    with pytest.raises(ValueError, match="eval_split"):
        tiny_cfg(tiny_synthetic_data, tmp_path / "x", eval_split="train")


def test_cli_eval_split_flag(tiny_synthetic_data, tmp_path):
    base = ["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "r")]
    assert parse_args(base).eval_split == "valid"
    assert parse_args([*base, "--eval-split", "test"]).eval_split == "test"
    with pytest.raises(SystemExit):
        parse_args([*base, "--eval-split", "train"])


def test_synthetic_prepare_records_vocabulary_by_window(tiny_synthetic_data):
    schema = Schema.load(tiny_synthetic_data)
    assert schema.vocabulary_by_window is not None
    for feature, card in schema.categorical.items():
        sizes = [schema.known_size(feature, t) for t in schema.windows]
        assert sizes == sorted(sizes) and sizes[-1] == card
