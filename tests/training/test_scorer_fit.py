"""The candidate scorer's fit and forward check (training/scorer_fit.py): fitted on forward sessions of
the training splits only, served from the window after a check finds it better, resumed exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import training.forward_check as fc
import training.scorer_fit as sf
from tests.training.test_forward_check import GUARD, full_and_resumed, model_metrics
from tests.training.train_util import tiny_cfg
from training.data.splits import load_schema, load_split, split_path
from training.model.scorer import FEATURES, CandidateScorer
from training.train import train

SCORER = dict(GUARD, model={**GUARD["model"], "rerank": True, "head_gate": True, "scorer_hidden": 8, "scorer_top": 16})
Z_COL = FEATURES.index("z_log_softmax")


def planted(n: int, slots: int = 16, seed: int = 0):
    """n sessions whose target slot has feature 3 raised by 2.5; z (the combiner's log-softmax) is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, slots, len(FEATURES), generator=g)
    ok = torch.ones(n, slots, dtype=torch.bool)
    ok[:, -2:] = False  # the last two slots hold no candidate
    y = torch.randint(slots - 2, (n,), generator=g)
    x[torch.arange(n), y, 3] += 2.5
    return x, ok, y


def test_fit_mlp_learns_a_planted_feature_that_the_combiners_score_misses():
    x, ok, y = planted(3000)
    fit = sf.fit_mlp(x[:2500], ok[:2500], y[:2500], hidden=16, seed=1)
    scores = CandidateScorer.mlp((x[2500:] - fit["mu"]) / fit["sd"], fit["weights"])
    learned = sf.ndcg_at(scores, ok[2500:], y[2500:]).mean()
    plain = sf.ndcg_at(x[2500:, :, Z_COL], ok[2500:], y[2500:]).mean()
    oracle = sf.ndcg_at(x[2500:, :, 3], ok[2500:], y[2500:]).mean()
    assert plain < 0.45 and learned > 0.9 * oracle, (float(plain), float(learned), float(oracle))
    # seeded: the same fit twice
    again = sf.fit_mlp(x[:2500], ok[:2500], y[:2500], hidden=16, seed=1)
    assert all(torch.equal(fit["weights"][k], again["weights"][k]) for k in fit["weights"])


def test_fold_serves_the_mean_of_its_members_as_one_mlp():
    x, ok, y = planted(600)
    fits = [sf.fit_mlp(x, ok, y, hidden=8, seed=s, steps=30) for s in (1, 2, 3)]
    folded = sf.fold(fits)
    assert folded["weights"]["w1"].shape == (len(FEATURES), 24) and folded["weights"]["w2"].shape == (24, 24)
    norm = (x - fits[0]["mu"]) / fits[0]["sd"]
    mean = torch.stack([CandidateScorer.mlp(norm, f["weights"]) for f in fits]).mean(0)
    torch.testing.assert_close(CandidateScorer.mlp(norm, folded["weights"]), mean, rtol=1e-5, atol=1e-5)
    assert sf.fold(fits[:1]) is fits[0]


def test_a_scorer_of_three_members_starts_from_the_one_member_fit(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    fitted = {}
    real = sf.fold

    def spy(fits):
        fitted.setdefault(len(fits), fits)  # each run's first fit
        return real(fits)

    monkeypatch.setattr(sf, "fold", spy)
    scorer_run(tiny_synthetic_data, tmp_path / "one")
    rows = scorer_run(tiny_synthetic_data, tmp_path / "three", model={**SCORER["model"], "scorer_members": 3})
    assert sorted(fitted) == [1, 3] and any((r.get("scorer") or {}).get("fitted") for r in rows)
    # member 0 is the one-member run's fit (same pool, same seed); the others are other fits
    one, three = fitted[1][0]["weights"], fitted[3]
    assert torch.equal(three[0]["weights"]["w1"], one["w1"]) and not torch.equal(three[1]["weights"]["w1"], one["w1"])
    final = torch.load(tmp_path / "three" / "model.pt", weights_only=True)
    assert final["item_memory.scorer.w2"].shape == (24, 24)


def test_ndcg_at_counts_ties_against_the_target_and_misses_as_zero():
    s = torch.tensor([[3.0, 3.0, 1.0], [0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    ok = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    y = torch.tensor([0, 0, -1])
    got = sf.ndcg_at(s, ok, y)
    assert got.tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(4), 0.0])
    # a slot that holds no candidate never outranks the target
    assert sf.ndcg_at(torch.tensor([[1.0, 9.0]]), torch.tensor([[True, False]]), torch.tensor([0])).item() == 1.0


def test_the_pool_reads_the_newest_sessions_of_windows_up_to_t_and_keeps_what_a_redo_needs(monkeypatch):
    monkeypatch.setattr(sf, "POOL_SESSIONS", 5)
    state = sf.ScorerState()

    def entry(w, n):
        y = torch.arange(n) % 3 - 1  # every third session: target not among the slots
        x = torch.full((n, 2, len(FEATURES)), float(w)).half()
        x[:, 0, 0] = torch.arange(n).half()
        return x, torch.ones(n, 2, dtype=torch.bool), y

    for w in (2, 3, 4, 5):
        state.pool[w] = entry(w, 6)  # 4 sessions with the target among the slots each
        state._trim(w)
    x, ok, y = state.sessions(4)
    assert len(y) == 5 and bool((y >= 0).all())
    # window 4's four, then window 3's newest one: the oldest first
    assert x[:, 1, 1].tolist() == [3, 4, 4, 4, 4] and x[0, 0, 0] == 5
    # window 2 is read by no fit at t >= 4 and was dropped; 3 is kept for a redo of window 4
    assert sorted(state.pool) == [3, 4, 5]


def test_the_pool_is_saved_a_window_a_file_and_a_legacy_one_file_pool_is_carried_over(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "POOL_SESSIONS", 5)
    writes: list = []
    real_write = sf.atomic_write
    monkeypatch.setattr(sf, "atomic_write", lambda path, data: (writes.append(path.name), real_write(path, data)))

    def entry(w, n=4):
        return torch.full((n, 3, len(FEATURES)), float(w)), torch.ones(n, 3, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)

    legacy = {3: entry(3), 4: entry(4)}
    torch.save({w: (x.half(), ok, y) for w, (x, ok, y) in legacy.items()}, tmp_path / sf.LEGACY_POOL_FILE)
    state = sf.ScorerState.restore(tmp_path, [])
    assert sorted(state.pool) == [3, 4] and torch.equal(state.pool[4][0].float(), legacy[4][0])
    data = iter(entry(w) for w in (5, 6, 7))
    monkeypatch.setattr(sf, "collect", lambda *a, **k: next(data))
    state.add_window(_Model(CandidateScorer(4, 3)), None, 5, torch.device("cpu"), 8, tmp_path)
    # the legacy file's windows go to files of their own, then it is removed
    files = lambda: sorted(p.name for p in (tmp_path / sf.POOL_DIR).iterdir())  # noqa: E731
    assert not (tmp_path / sf.LEGACY_POOL_FILE).exists() and files() == ["w3.pt", "w4.pt", "w5.pt"]
    for w in (6, 7):
        writes.clear()
        state.add_window(_Model(CandidateScorer(4, 3)), None, w, torch.device("cpu"), 8, tmp_path)
        assert writes == [f"w{w}.pt"]  # only the new window is written
    # windows 3 and 4 are read by no fit from 7 on (and not by a redo of 7): their files are removed
    assert sorted(state.pool) == [5, 6, 7] and files() == ["w5.pt", "w6.pt", "w7.pt"]
    back = sf.load_pool(tmp_path)
    assert sorted(back) == [5, 6, 7] and all(torch.equal(back[w][0], state.pool[w][0]) for w in back)


def scorer_run(data, out, **kw):
    return train(tiny_cfg(data, out, **{**SCORER, **kw}))["windows"]


def test_the_check_pools_the_next_windows_training_sessions_and_the_scorer_serves_after_it(
    tiny_synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", -math.inf)  # any check picks the scorer
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)  # the guard never falls back
    seen_windows = []
    real = sf.collect

    def spy(model, st, *a):
        seen_windows.append(st.source)
        taps.append(a[-1])
        return real(model, st, *a)

    taps: list = []
    monkeypatch.setattr(sf, "collect", spy)
    rows = [r for r in scorer_run(tiny_synthetic_data, tmp_path / "run", forward_check_sessions=40) if r.get("sessions_trained")]
    # the pool reads what the check's one pass kept (no second scoring of the sessions)
    assert all(isinstance(tap, list) for tap in taps) and any(taps)
    assert len(rows) >= 3
    schema = load_schema(tiny_synthetic_data)
    for r, source in zip(rows, seen_windows, strict=True):
        c = r["scorer_check"]
        nxt = r["train_window"] + 1
        assert c["window"] == nxt and source == str(split_path(tiny_synthetic_data, nxt, "train"))
        whole = load_split(split_path(tiny_synthetic_data, nxt, "train"), schema)
        assert 0 < c["sessions"] <= min(40, len(whole))
    # the first fit has only the first check's sessions; each check before the scorer is fitted compares nothing
    assert rows[0]["scorer"]["fitted"] is False and "ndcg@20_scorer" not in rows[0]["scorer_check"]
    fitted = [r for r in rows if r["scorer"]["fitted"]]
    assert len(fitted) >= 2
    # the first fit has had no check yet: off; every later one serves once the check before it picked it
    assert fitted[0]["scorer"]["on"] is False
    for prev, r in zip(fitted, fitted[1:]):
        assert "ndcg@20_scorer" in prev["scorer_check"] and prev["scorer_check"]["use_scorer_next"] is True
        assert r["scorer"]["on"] is True
    pool = sf.load_pool(tmp_path / "run")
    assert sorted(pool) == [r["train_window"] + 1 for r in rows]
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert float(final["item_memory.scorer.on"]) == 1.0 and bool(final["item_memory.scorer.w1"].any())


def test_shorter_prefixes_are_the_sessions_heads_without_the_whole_session_or_an_oov_target():
    from training.data.splits import SessionTensors
    from training.names import OOV_ID

    items = torch.tensor([[5, 0, 0, 0, 0], [5, 6, 0, 0, 0], [7, 8, 9, 0, 0], [3, 4, OOV_ID, 6, 7]])
    side = torch.arange(20, dtype=torch.float32).reshape(4, 5) + 1
    st = SessionTensors({"item": items, "side": side}, torch.tensor([1, 2, 3, 5]), torch.tensor([10, 11, 12, 13]), "w")
    every = sf.shorter_prefixes(st, 100, seed=0, item_feature="item")
    # session 12 gives its 2-item head; 13 its heads of 2 and 4 items (3 ends on OOV); 5 and 11 none
    assert every.session_id.tolist() == [12, 13, 13] and every.lengths.tolist() == [2, 2, 4]
    assert every.feats["item"].tolist() == [[7, 8, 0, 0, 0], [3, 4, 0, 0, 0], [3, 4, OOV_ID, 6, 0]]
    assert every.feats["side"][2].tolist() == [16.0, 17.0, 18.0, 19.0, 0.0] and every.source == "w"
    many = SessionTensors({"item": torch.arange(3, 63).reshape(6, 10)}, torch.full((6,), 10), torch.arange(6))
    drawn = sf.shorter_prefixes(many, 7, seed=1, item_feature="item")
    assert len(drawn) == 7 and bool((drawn.lengths >= 2).all() and (drawn.lengths <= 9).all())
    again = sf.shorter_prefixes(many, 7, seed=1, item_feature="item")
    other = sf.shorter_prefixes(many, 7, seed=2, item_feature="item")
    assert torch.equal(drawn.feats["item"], again.feats["item"]) and not torch.equal(drawn.feats["item"], other.feats["item"])
    rows = drawn.session_id
    assert rows.tolist() == sorted(rows.tolist())  # in session order
    for r, n, f in zip(rows.tolist(), drawn.lengths.tolist(), drawn.feats["item"], strict=True):
        assert f[:n].tolist() == many.feats["item"][r, :n].tolist() and not f[n:].any()


def test_the_prefixes_join_the_pool_before_the_sessions_and_the_check_reads_the_sessions_only(
    tiny_synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)  # the guard never falls back
    calls: list = []
    real = sf.collect

    def spy(model, st, *a):
        got = real(model, st, *a)
        calls.append((st, isinstance(a[-1], list), got))
        return got

    monkeypatch.setattr(sf, "collect", spy)
    rows = [
        r
        for r in scorer_run(tiny_synthetic_data, tmp_path / "run", forward_check_sessions=40, scorer_prefixes=0.5)
        if r.get("sessions_trained")
    ]
    pool = sf.load_pool(tmp_path / "run")
    assert len(calls) == 2 * len(rows) >= 6
    for r, (whole, tapped, _), (pre, pre_tapped, (xp, _okp, yp)) in zip(rows, calls[::2], calls[1::2], strict=True):
        c = r["scorer_check"]
        assert tapped and not pre_tapped and c["sessions"] == len(whole) and 0 < c["prefix_sessions"] == len(pre) <= round(0.5 * len(whole))
        # each prefix is the head of one of the checked sessions, shorter than it
        by_id = {int(s): i for i, s in enumerate(whole.session_id)}
        for s, n, f in zip(pre.session_id.tolist(), pre.lengths.tolist(), pre.feats["item_id-list"], strict=True):
            i = by_id[s]
            assert 2 <= n < int(whole.lengths[i]) and f[:n].tolist() == whole.feats["item_id-list"][i, :n].tolist()
        x, ok, y = pool[c["window"]]
        assert len(y) == len(pre) + len(whole) and torch.equal(y[: len(pre)], yp) and torch.equal(x[: len(pre)], xp.half())
    # the check pools the whole sessions' differences only
    checked = [r["scorer_check"] for r in rows if "ndcg@20_scorer" in r["scorer_check"]]
    assert checked and rows[-1]["scorer_check"]["pooled_sessions"] == sum(c["sessions"] for c in checked)


def test_a_scorer_the_check_never_picks_changes_no_metric(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", math.inf)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    plain = train(tiny_cfg(tiny_synthetic_data, tmp_path / "plain", **{**SCORER, "model": {**SCORER["model"], "scorer_hidden": 0}}))
    ours = scorer_run(tiny_synthetic_data, tmp_path / "ours")
    assert [model_metrics(r) for r in ours] == [model_metrics(r) for r in plain["windows"]]
    assert any(model_metrics(r) for r in ours) and any((r.get("scorer") or {}).get("fitted") for r in ours)
    assert not any((r.get("scorer") or {}).get("on") for r in ours)


def test_while_the_blend_serves_the_scorer_is_off_and_comes_back_with_the_stack(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", -math.inf)
    monkeypatch.setattr(fc, "Z_SWITCH", -math.inf)  # the guard always falls back to the blend
    rows = [r for r in scorer_run(tiny_synthetic_data, tmp_path / "run") if r.get("sessions_trained")]
    fitted = [r for r in rows if r["scorer"]["fitted"]]
    assert fitted and all(r["blend_fallback"] and r["scorer"]["on"] is False for r in fitted)
    for r in fitted:  # the blend is what the window's model served
        assert model_metrics(r) == pytest.approx({k: r["baselines"]["count_blend"][k] for k in model_metrics(r)})
    # the set-aside stack holds the scorer switched on: resume_stacked brings it back
    ostate = torch.load(tmp_path / "run" / "optim.pt", weights_only=True)
    assert float(ostate["guard_combiner"]["scorer_on"]) == 1.0


def test_resume_carries_the_pool_the_check_and_the_scorer(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", -math.inf)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    full, resumed = full_and_resumed(scorer_run, tiny_synthetic_data, tmp_path, monkeypatch)

    def state(r):
        untimed = {k: v for k, v in (r.get("scorer_check") or {}).items() if k != "seconds"}
        fit = {k: v for k, v in (r.get("scorer") or {}).items() if k != "seconds"}
        return untimed, fit, model_metrics(r)

    assert [state(r) for r in resumed] == [state(r) for r in full]
    assert any((r.get("scorer") or {}).get("on") for r in full)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("top", [16, 5000])  # 5000: more slots than candidates, the empty ones among the best
def test_collect_labels_the_targets_slot_among_the_combiners_best(tiny_synthetic_data, tmp_path, monkeypatch, top):
    from training.data.splits import eval_inputs_targets

    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", -math.inf)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    checked = []
    real = sf.collect

    def spy(model, st, *a):
        x, ok, y = real(model, st, *a)
        sc = model.item_memory.scorer
        on = sc.on.clone()
        sc.on.zero_()  # the combiner's scores z, as collect read them (in eval mode)
        feats, lengths, targets = eval_inputs_targets(st, model.cfg.item_feature)
        was = model.training
        model.eval()
        with torch.no_grad():
            z, cand = model.candidate_scores(feats, lengths)
        sc.on.copy_(on)
        model.train(was)
        best = z.sort(1, descending=True).values[:, : sc.top]
        for s in range(len(y)):
            at = ((cand[s] == targets[s]) & torch.isfinite(z[s])).nonzero().flatten()
            if y[s] >= 0:  # the slot holds the target: its z is the slot's, and the slot is a candidate
                assert len(at) == 1 and z[s, at[0]] == best[s, y[s]] and ok[s, y[s]]
                checked.append(s)
            else:  # not a candidate, or below the last slot
                assert len(at) == 0 or z[s, at[0]] <= best[s, -1]
        return x, ok, y

    monkeypatch.setattr(sf, "collect", spy)
    scorer_run(tiny_synthetic_data, tmp_path / "run", model={**SCORER["model"], "scorer_top": top})
    assert len(checked) > 20


class _Model:
    """What ScorerState.add_window reads of a model: its item memory's scorer."""

    def __init__(self, scorer):
        self.item_memory = type("Mem", (), {"scorer": scorer})()


def test_the_scorer_serves_on_its_recent_checks_not_on_the_pooled_history(monkeypatch):
    """A scorer refitted each window is judged on its RECENT latest checks: early fits on a small pool
    were worse, and pooling them all would keep a scorer that now wins switched off."""
    sc = CandidateScorer(4, 3)
    with torch.no_grad():  # the MLP scores relu(feature 3)
        sc.w1[3, 0], sc.w2[0, 0], sc.w3[0] = 1.0, 1.0, 1.0
    plain_col = FEATURES.index("z_log_softmax")

    def window(n, scorer_right: bool, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 3, len(FEATURES), generator=g)
        y = torch.zeros(n, dtype=torch.int64)
        x[:, 0, plain_col] = 1.0  # z ranks the target (slot 0) second
        x[:, 1, plain_col] = 2.0
        right = torch.rand(n, generator=g) < (0.95 if scorer_right else 0.05)
        x[:, 0, 3] = torch.where(right, 5.0, 0.0)  # the MLP ranks it first where `right`, else last
        x[:, 1, 3] = 1.0
        x[:, 2, 3] = 0.5
        return x, torch.ones(n, 3, dtype=torch.bool), y

    assert sf.RECENT == 3
    windows = [window(3000, False, 1), *(window(100, True, s) for s in (2, 3, 4))]
    state, data = sf.ScorerState(), iter(windows)
    monkeypatch.setattr(sf, "collect", lambda *a: next(data))
    rows = [state.add_window(_Model(sc), None, w, torch.device("cpu"), 8, None) for w in range(5, 9)]
    assert rows[0]["z_recent"] == rows[0]["z"] < 0 and rows[0]["use_scorer_next"] is False
    # the bad check is among the recent ones until three good ones follow it
    assert [r["use_scorer_next"] for r in rows] == [False, False, False, True]
    assert rows[-1]["z"] < 0 < rows[-1]["z_recent"]  # all checks pooled: still negative
    restored = sf.ScorerState.restore(Path("/nonexistent"), [{"scorer_check": rows[-1]}])
    assert restored.recent == state.recent and restored.use is True and restored.check.n == state.check.n


@pytest.mark.parametrize("recent", [0, 40])  # 40: with the recent counts' input (ModelConfig.scorer_recent)
def test_the_exported_repository_serves_the_scorer(tiny_synthetic_data, tmp_path, monkeypatch, recent):
    from export.inference import TopKRanker, feature_order
    from export.pbtxt import TORCH_MODEL
    from export.repository import ExportConfig, export_repository
    from training.checkpoint import load_run
    from training.data.splits import eval_inputs_targets
    from training.schema import Schema

    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", -math.inf)
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    run = tmp_path / "run"
    scorer_run(tiny_synthetic_data, run, model={**SCORER["model"], "scorer_recent": recent})
    out = export_repository(ExportConfig(run=run, data=tiny_synthetic_data, out=tmp_path / "repo", top_k=5))
    traced = torch.jit.load(str(out / TORCH_MODEL / "1" / "model.pt"))
    model, meta = load_run(run)
    assert float(model.item_memory.scorer.on) == 1.0
    if recent:  # the traced model holds the recent counts as trained
        recent = model.item_memory.scorer.pop_recent
        assert torch.equal(traced.state_dict()["model.item_memory.scorer.pop_recent"], recent) and bool(recent.any())
    schema = Schema.load(tiny_synthetic_data)
    names = feature_order(schema)
    st = load_split(split_path(tiny_synthetic_data, meta["window"], "train"), schema)  # inputs only
    feats, lengths, _ = eval_inputs_targets(st, model.cfg.item_feature)
    inputs = (*[feats[n] for n in names], lengths)
    ranker = TopKRanker(model, names, 5, model.cfg.n_items)
    with torch.no_grad():
        want_scores, want_ids = ranker(*inputs)
        got_scores, got_ids = traced(*inputs)
        model.item_memory.scorer.on.zero_()
        _, plain_ids = ranker(*inputs)
    assert len(lengths) > 10 and torch.equal(got_ids, want_ids) and torch.allclose(got_scores, want_scores)
    assert not torch.equal(plain_ids, got_ids)  # the served ranking is the scorer's


def test_an_export_leaves_out_a_scorer_that_does_not_serve(tiny_synthetic_data, tmp_path, monkeypatch):
    from export.inference import TopKRanker, feature_order
    from export.pbtxt import TORCH_MODEL
    from export.repository import ExportConfig, export_repository
    from training.checkpoint import load_run
    from training.data.splits import eval_inputs_targets
    from training.schema import Schema

    monkeypatch.setattr(sf, "MIN_SESSIONS", 5)
    monkeypatch.setattr(sf, "Z_SWITCH", math.inf)  # fitted, never served
    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    run = tmp_path / "run"
    rows = scorer_run(tiny_synthetic_data, run, model={**SCORER["model"], "scorer_recent": 40})
    assert any((r.get("scorer") or {}).get("fitted") for r in rows)
    out = export_repository(ExportConfig(run=run, data=tiny_synthetic_data, out=tmp_path / "repo", top_k=5))
    traced = torch.jit.load(str(out / TORCH_MODEL / "1" / "model.pt"))
    assert not [k for k in traced.state_dict() if "scorer" in k]  # its weights and its recent counts
    model, meta = load_run(run)
    assert model.item_memory.scorer is not None and float(model.item_memory.scorer.on) == 0.0
    assert bool(model.item_memory.scorer.w1.any())
    schema = Schema.load(tiny_synthetic_data)
    names = feature_order(schema)
    st = load_split(split_path(tiny_synthetic_data, meta["window"], "train"), schema)
    feats, lengths, _ = eval_inputs_targets(st, model.cfg.item_feature)
    inputs = (*[feats[n] for n in names], lengths)
    with torch.no_grad():
        want_scores, want_ids = TopKRanker(model, names, 5, model.cfg.n_items)(*inputs)
        got_scores, got_ids = traced(*inputs)
    assert len(lengths) > 10 and torch.equal(got_ids, want_ids) and torch.allclose(got_scores, want_scores)


def test_the_recent_counts_are_the_newest_training_sessions_counted(tiny_synthetic_data, tmp_path):
    """ModelConfig.scorer_recent: after each window the item memory's recent counts are how often each
    item occurs in the newest N training sessions of the windows counted (the last window whole)."""
    n = 70
    cfg = {**SCORER, "model": {**SCORER["model"], "scorer_recent": n}}
    rows = [r for r in scorer_run(tiny_synthetic_data, tmp_path / "run", **cfg) if r.get("sessions_trained")]
    last = rows[-1]["train_window"]
    schema = load_schema(tiny_synthetic_data)
    splits = [load_split(split_path(tiny_synthetic_data, w, "train"), schema) for w in range(1, last + 1)]
    splits = [s for s in splits if len(s)]
    item = "item_id-list"
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    got = final["item_memory.scorer.pop_recent"]
    # by hand: the last window's sessions, then the earlier ones newest first up to n in all
    sessions = [(s.feats[item][i, : s.lengths[i]]) for s in splits for i in range(len(s))]
    newest = sessions[-max(n, len(splits[-1])) :]
    assert len(splits[-1]) < n < len(sessions)  # the budget reaches back into an earlier window, not all
    want = torch.bincount(torch.cat(newest).long(), minlength=got.shape[0]).float()
    assert torch.equal(got, want)
    # and it is among the scorer's inputs: the pooled rows have one more column than the plain scorer's
    pool = sf.load_pool(tmp_path / "run")
    x = next(iter(pool.values()))[0]
    assert x.shape[2] == len(FEATURES) + 1
