"""bench.scorer_probe, the probe of recent counts as scorer inputs: the recent sessions are the newest
ones (the last window whole), its rows hold the served scorer's inputs among the blend's best candidates
and the recent tables' features beside them, and the command writes every variant's windows."""

from __future__ import annotations

import json

import numpy as np
import torch

from bench.scorer_probe import NB, VARIANTS, Z_COLS, forward_windows, main, newest_sessions
from tests.training.test_count_scorer import memory_cfg
from training.baselines import BaselineCounts, memory_tables
from training.data.splits import eval_inputs_targets, load_split, split_path
from training.evaluate import blend_memory, known_inputs
from training.model.scorer import COUNT_FEATURES
from training.schema import Schema


def parts_of(*sizes):
    """Windows of `sizes` sessions, session k holding the id k (rows in time order)."""
    out, k = [], 0
    for n in sizes:
        ids = np.arange(k, k + n)[:, None]
        out.append((ids, np.ones(n, dtype=np.int64)))
        k += n
    return out


def test_the_newest_sessions_reach_back_as_far_as_needed_and_keep_the_last_window_whole():
    got = newest_sessions(parts_of(4, 3, 5), 7)
    assert [p[0].ravel().tolist() for p in got] == [[5, 6], [7, 8, 9, 10, 11]]
    assert [p[0].ravel().tolist() for p in newest_sessions(parts_of(4, 3, 5), 2)] == [[7, 8, 9, 10, 11]]
    assert sum(len(p[1]) for p in newest_sessions(parts_of(4, 3, 5), 100)) == 12


def test_the_rows_are_the_served_inputs_and_the_recent_tables_beside_them(tiny_synthetic_data):
    cfg = memory_cfg(tiny_synthetic_data)
    top = 16
    windows = forward_windows(tiny_synthetic_data, cfg, recent=30, top=top)
    assert windows and all(w.x[0].shape[1:] == (top, 2 * NB + 2) for w in windows)
    assert VARIANTS["pop_recent"][NB] == NB + COUNT_FEATURES.index("log1p_pop")
    schema = Schema.load(tiny_synthetic_data)
    item = cfg.item_feature
    win = windows[-1]
    # the recent popularity column, by hand: the newest 30 training sessions before the window
    parts = [load_split(split_path(tiny_synthetic_data, w, "train"), schema) for w in schema.windows if w < win.w]
    parts = [p for p in parts if len(p)]
    sessions = [p.feats[item][i, : p.lengths[i]] for p in parts for i in range(len(p))]
    newest = sessions[-max(30, len(parts[-1])) :]
    pop_r = torch.bincount(torch.cat(newest).long(), minlength=schema.categorical[item]).float()
    counts = BaselineCounts(schema.categorical[item])
    for p in parts:
        counts.add_sessions(p.feats[item].numpy(), p.lengths.numpy())
    mem = blend_memory({k: torch.from_numpy(v) for k, v in memory_tables(counts, cfg.memory_k, cfg.memory_hop2).items()}, cfg)
    x, bad, y, blend = win.x[0].float(), win.bad[0], win.y[0], win.blend[0]
    assert (~bad).any() and (y >= 0).any()
    # the blend's scores are sorted best first, and the log-softmax column is theirs
    ok = ~bad
    assert bool((blend[:, :-1] >= blend[:, 1:]).all())
    want_ls = torch.log_softmax(blend, 1)
    assert torch.allclose(x[..., Z_COLS[0]][ok], want_ls[ok], atol=2e-2)
    # each slot's whole-log and recent popularity are its candidate's, and its target column is the target's
    cand = win.cand[0]
    assert torch.allclose(x[..., 0][ok], torch.log1p(mem.pop[cand])[ok], rtol=1e-2)
    assert torch.allclose(x[..., NB][ok], torch.log1p(pop_r[cand])[ok], rtol=1e-2)
    assert not torch.equal(pop_r, mem.pop)  # the recent counts are not all of them
    st, unknown = known_inputs(load_split(split_path(tiny_synthetic_data, win.w, "train"), schema), schema.known_sizes(win.w - 1), item)
    targets = eval_inputs_targets(st.select((~unknown).nonzero().squeeze(1)), item)[2][: len(y)]
    hit = y >= 0
    assert hit.any() and torch.equal(cand[hit, y[hit]], targets[hit])
    assert not bool(((cand == targets[:, None]) & ok)[~hit].any())  # a miss is not among the slots


def test_the_command_writes_every_variants_windows(tiny_synthetic_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"model_config": memory_cfg(tiny_synthetic_data).to_dict()}))
    out = tmp_path / "probe.json"
    last = Schema.load(tiny_synthetic_data).windows[-1]
    argv = ["--data", str(tiny_synthetic_data), "--model-config", str(run), "--from-window", str(last)]
    assert main([*argv, "--seeds", "0", "--epochs", "2", "--recent", "30", "--top", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == set(VARIANTS)
    for name in VARIANTS:
        assert set(result["variants"][name]) == {str(last)}
        assert 0.0 <= result[name]["ndcg@20"] <= result[name]["recall@20"] <= 1.0
    assert result["base"]["ndcg@20_vs_base"] == 1.0
