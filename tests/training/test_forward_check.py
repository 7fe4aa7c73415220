"""The forward check (training/forward_check.py, TrainConfig.cooc_curve_fit "choose").

What must hold: stacking runs twice from the fitted model (the identity curve held at 1, the curve
learned on from its own lineage) and loads the chosen one; the check scores window t+1's training
sessions (the newest N, as known after window t, unknown targets left out) with both and pools the
paired NDCG@20 differences; the curve serves from the next window on only once the pooled gain is
positive at z > 1.645; a run whose check never picks the curve ranks exactly as the same run
without the curve; the fit never moves the curve ("stack", "choose"); --resume carries the choice.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import training.forward_check as fc
from tests.training.model.test_combiner import CAT, ITEM, V, make_model
from tests.training.test_stacking import held_sessions, stack_cfg
from training.evaluate import evaluate_model, known_inputs
from training.forward_check import ForwardCheck, combiner_state, curve_gain, load_combiner, next_sessions
from training.metrics import per_session
from training.stacking import stack_choice, stack_memory

CPU = torch.device("cpu")


def test_pooled_gain_z_and_choice_and_their_resume():
    check, rng = ForwardCheck(), np.random.default_rng(0)
    first = rng.normal(0.001, 0.05, 400)  # a small gain in much noise: not enough
    e1 = check.add_window(first, window=3, identity=0.2, curve=0.201)
    z1 = first.mean() / (first.std(ddof=1) / math.sqrt(len(first)))
    assert e1["z"] == pytest.approx(z1) and e1["use_curve_next"] is False and z1 < fc.Z_SWITCH
    second = rng.normal(0.02, 0.05, 600)
    e2 = check.add_window(second, window=4, identity=0.2, curve=0.22)
    both = np.concatenate([first, second])
    z2 = both.mean() / (both.std(ddof=1) / math.sqrt(len(both)))
    assert e2["z"] == pytest.approx(z2) and z2 > fc.Z_SWITCH and check.use_curve and e2["use_curve_next"]
    assert e2["pooled_sessions"] == 1000 and e2["sessions"] == 600
    assert e2["pooled_gain"] == pytest.approx(both.mean())
    rows = [{"curve_check": e1, "cooc_curve_slopes": [1.1, 0.9]}, {}, {"curve_check": e2, "cooc_curve_slopes": [1.2, 0.8]}]
    again = ForwardCheck.from_rows(rows)
    assert (again.n, again.use_curve, again.slopes) == (1000, True, [1.2, 0.8])
    assert again.z == pytest.approx(check.z)
    assert ForwardCheck.from_rows([]) == ForwardCheck()
    assert ForwardCheck().z == 0.0  # nothing pooled: the identity stays


def curved_model():
    m = make_model(head_gate=True, cooc_curve=3)
    with torch.no_grad():
        m.item_memory.cooc_curve.slopes.copy_(torch.tensor([1.4, 0.3]))
    return m


def test_curve_gain_is_the_paired_difference_over_known_targets_and_leaves_the_model():
    m = make_model(head_gate=True, cooc_curve=3)  # the identity (slopes 1) as it stands
    other = combiner_state(curved_model().item_memory)
    st = held_sessions(60, seed=21)
    known = {ITEM: V - 6, CAT: 7}  # the targets among the last 6 ids are unknown
    before = {k: v.clone() for k, v in m.state_dict().items()}
    diffs, ident, curve = curve_gain(m, other, False, next_sessions(st, known, ITEM), CPU, 16)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # left as it was
    targets = st.feats[ITEM][torch.arange(len(st)), st.lengths - 1]
    keep = torch.nonzero(targets < V - 6).flatten()
    assert 0 < len(keep) < len(st) and len(diffs) == len(keep)

    seen = known_inputs(st, known, ITEM)[0].select(keep)  # unknown input ids read as OOV, as served
    assert not torch.equal(seen.feats[ITEM], st.select(keep).feats[ITEM])

    def direct(state):
        mm = copy.deepcopy(m)
        load_combiner(mm.item_memory, state)
        ranks = {}
        evaluate_model(mm, seen, CPU, 16, ranks_out=ranks)
        return per_session(ranks["model"], "ndcg@20")

    want = direct(other) - direct(combiner_state(m.item_memory))
    assert np.allclose(diffs, want) and np.abs(want).sum() > 0  # the curve ranks otherwise
    assert ident == pytest.approx(direct(combiner_state(m.item_memory)).mean())
    assert curve == pytest.approx(direct(other).mean())
    # the model holding the curve (use_curve): the same differences, the same sign
    mc = copy.deepcopy(m)
    load_combiner(mc.item_memory, other)
    again, ident2, curve2 = curve_gain(mc, combiner_state(m.item_memory), True, next_sessions(st, known, ITEM), CPU, 16)
    assert np.allclose(again, diffs) and (ident2, curve2) == pytest.approx((ident, curve))


@pytest.mark.parametrize("use_curve", [False, True])
def test_stack_choice_stacks_both_from_the_fitted_model_and_loads_the_chosen(use_curve):
    m = curved_model()  # the model carries a curve (say, the one chosen the window before)
    held, cfg = held_sessions(40, seed=11), stack_cfg(stack=2)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    ref_a = copy.deepcopy(m)
    with torch.no_grad():
        ref_a.item_memory.cooc_curve.slopes.fill_(1.0)
    ref_a.item_memory.cooc_curve.slopes.requires_grad_(False)
    stack_memory(ref_a, held, cfg, seed=3, device=CPU)
    ref_b = copy.deepcopy(m)
    with torch.no_grad():
        ref_b.item_memory.cooc_curve.slopes.copy_(torch.tensor([1.2, 0.6]))  # the curve's own lineage
    stack_memory(ref_b, held, cfg, seed=3, device=CPU)
    want_a, want_b = combiner_state(ref_a.item_memory), combiner_state(ref_b.item_memory)
    assert torch.equal(want_a["cooc_curve.slopes"], torch.ones(2))  # held at the identity
    assert not torch.equal(want_b["cooc_curve.slopes"], torch.tensor([1.2, 0.6]))  # learned on

    check = ForwardCheck(use_curve=use_curve, slopes=[1.2, 0.6])
    net = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("item_memory.")}
    out, other = stack_choice(m, check, lambda b: stack_memory(m, held, cfg, seed=3, device=CPU, before=b))
    loaded, rest = (want_b, want_a) if use_curve else (want_a, want_b)
    assert all(torch.equal(v, loaded[k]) for k, v in combiner_state(m.item_memory).items())
    assert all(torch.equal(v, rest[k]) for k, v in other.items()) and set(other) == set(rest)
    assert all(torch.equal(net[k], v) for k, v in m.state_dict().items() if k in net)  # the network untouched
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert out["cooc_curve_used"] is use_curve
    assert check.slopes == out["cooc_curve_slopes"] == [float(v) for v in want_b["cooc_curve.slopes"]]
    assert out["holdout_ndcg20_after_stack"] == (
        out["holdout_ndcg20_curve"] if use_curve else out["holdout_ndcg20_identity"]
    )


CHOOSE = dict(
    holdout=0.2, patience=1, stack=1, epochs=2, end_window=5, memory_lr=1e-2, baselines=False,
    model={"objective": "clm", "memory": True, "memory_k": 10},
)  # fmt: skip


def choose_run(data, out, **kw):
    from tests.training.train_util import tiny_cfg
    from training.train import train

    model = {**CHOOSE["model"], "cooc_curve": 3}
    return train(tiny_cfg(data, out, **{**CHOOSE, "model": model, "cooc_curve_fit": "choose", **kw}))


def model_metrics(row):
    return {k: v for k, v in row.items() if k.startswith(("ndcg@", "recall@", "mrr@"))}


def test_a_run_whose_check_keeps_the_identity_ranks_as_without_the_curve(tiny_synthetic_data, tmp_path, monkeypatch):
    from tests.training.train_util import tiny_cfg
    from training.train import train

    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)  # the check never picks the curve
    plain = train(tiny_cfg(tiny_synthetic_data, tmp_path / "plain", **CHOOSE))["windows"]
    ours = choose_run(tiny_synthetic_data, tmp_path / "choose")["windows"]
    assert [model_metrics(r) for r in ours] == [model_metrics(r) for r in plain]
    assert any(model_metrics(r) for r in ours)
    checked = [r for r in ours if "curve_check" in r]
    # windows 1..4 trained; each but the last has a next window in the data (5: 1..9 days)
    assert [r["curve_check"]["window"] for r in checked] == [r["train_window"] + 1 for r in checked]
    assert len(checked) == len([r for r in ours if r.get("sessions_trained")])
    assert all(r["cooc_curve_used"] is False and r["curve_check"]["use_curve_next"] is False for r in checked)
    assert all(r["curve_check"]["sessions"] > 0 for r in checked)
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "choose" / "model.pt", weights_only=True)
    assert set(b) - set(a) == {"item_memory.cooc_curve.slopes"} and torch.equal(b["item_memory.cooc_curve.slopes"], torch.ones(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_curve_serves_from_the_window_after_the_check_picks_it(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "Z_SWITCH", -math.inf)  # any check picks the curve
    rows = [r for r in choose_run(tiny_synthetic_data, tmp_path / "run")["windows"] if r.get("sessions_trained")]
    assert len(rows) >= 3
    assert rows[0]["cooc_curve_used"] is False  # no check before the first window
    for prev, row in zip(rows, rows[1:]):
        assert row["cooc_curve_used"] is prev["curve_check"]["use_curve_next"] is True
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["item_memory.cooc_curve.slopes"]
    assert final.tolist() == pytest.approx(rows[-1]["cooc_curve_slopes"]) and not torch.equal(final, torch.ones(2))


def test_the_check_reads_the_newest_sessions_of_the_next_windows_training_split(
    tiny_synthetic_data, tmp_path, monkeypatch
):
    calls = []
    real = fc.next_sessions

    def spy(st, known, *rest):
        calls.append((st.source, len(st), st.session_id.clone(), dict(known)))
        return real(st, known, *rest)

    monkeypatch.setattr(fc, "next_sessions", spy)
    rows = choose_run(tiny_synthetic_data, tmp_path / "run", forward_check_sessions=25)["windows"]
    checked = [r for r in rows if "curve_check" in r]
    assert checked and len(calls) == len(checked)
    from training.data.splits import load_schema, load_split, split_path
    from training.schema import Schema

    data, schema = tiny_synthetic_data, load_schema(tiny_synthetic_data)
    for (source, n, ids, known), r in zip(calls, checked):
        nxt = r["train_window"] + 1
        whole = load_split(split_path(data, nxt, "train"), schema)
        assert source == whole.source and n == min(25, len(whole))
        assert torch.equal(ids, whole.session_id[len(whole) - n :])  # the newest
        assert known == Schema.of(schema).known_sizes(r["train_window"])  # as known after window t


@pytest.mark.parametrize("fit", ["stack", "choose"])
def test_the_fit_leaves_the_curve_to_stacking(tiny_synthetic_data, tmp_path, monkeypatch, fit):
    """The fit reads the curve as it stands ("stack", "choose"); "joint" trains it in the fit too."""
    import training.trainer as trainer_mod

    seen = []
    real = trainer_mod.Trainer._step

    def spy(self, loss, optimizers, schedulers, dense):
        before = self.model.item_memory.cooc_curve.slopes.detach().clone()
        real(self, loss, optimizers, schedulers, dense)
        seen.append(torch.equal(before, self.model.item_memory.cooc_curve.slopes))

    monkeypatch.setattr(trainer_mod.Trainer, "_step", spy)
    choose_run(tiny_synthetic_data, tmp_path / fit, cooc_curve_fit=fit, end_window=3)
    assert seen and all(seen)
    seen.clear()
    choose_run(tiny_synthetic_data, tmp_path / "joint", cooc_curve_fit="joint", end_window=3)
    assert seen and not all(seen)


def full_and_resumed(run, data, tmp_path, monkeypatch) -> tuple[list[dict], list[dict]]:
    """The rows of `run` (data, out, **kw) -> rows uninterrupted, and killed in window 3's evaluation
    (before its checkpoint) then resumed."""
    import training.evaluate as evaluate_mod

    full = run(data, tmp_path / "full")
    real_eval = evaluate_mod.evaluate_model

    def crash(model, st, *a, **k):
        if st.source.endswith("4/valid.parquet"):
            raise KeyboardInterrupt("simulated kill")
        return real_eval(model, st, *a, **k)

    monkeypatch.setattr(evaluate_mod, "evaluate_model", crash)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "crashed")
    monkeypatch.setattr(evaluate_mod, "evaluate_model", real_eval)
    return full, run(data, tmp_path / "crashed", resume=True)


def test_resume_carries_the_check(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "Z_SWITCH", -math.inf)
    full, resumed = full_and_resumed(
        lambda data, out, **kw: choose_run(data, out, **kw)["windows"], tiny_synthetic_data, tmp_path, monkeypatch
    )
    def state(r):  # the check's timing aside
        check = {k: v for k, v in (r.get("curve_check") or {}).items() if k != "seconds"}
        return r.get("cooc_curve_used"), r.get("cooc_curve_slopes"), check

    assert [state(r) for r in resumed] == [state(r) for r in full]
    assert [model_metrics(r) for r in resumed] == [model_metrics(r) for r in full]
    assert any(r.get("cooc_curve_used") for r in full)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(cooc_curve_fit="sometimes", model={"memory": True, "cooc_curve": 3}), "cooc_curve_fit must be one of"),
        (dict(forward_check_sessions=0), "forward_check_sessions must be >= 1"),
    ],
)
def test_bad_settings_name_the_field(kw, match):
    base = dict(data="-", out="-", stack=1, holdout=0.1, patience=1)
    with pytest.raises(ValueError, match=match):
        from training.config import TrainConfig

        TrainConfig(**{**base, **kw})


def test_choose_without_stacking_keeps_the_identity_and_checks_nothing(tiny_synthetic_data, tmp_path):
    """A recipe's "choose" stays valid when a flag turns stacking or the memory off: a no-op there."""
    from training.config import TrainConfig

    rows = choose_run(tiny_synthetic_data, tmp_path / "run", stack=0)["windows"]
    assert rows and all("curve_check" not in r and "cooc_curve_used" not in r for r in rows)
    slopes = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["item_memory.cooc_curve.slopes"]
    assert torch.equal(slopes, torch.ones(2))
    assert TrainConfig(data="-", out="-", cooc_curve_fit="choose").model.memory is False  # accepted


# --- the guard (blend_guard, guard_split "next") -------------------------------------------------


def test_guard_pools_each_metric_and_falls_back_when_the_blend_leads_on_either():
    from training.forward_check import GuardCheck

    g, rng = GuardCheck(), np.random.default_rng(1)
    nd, rc = rng.normal(0, 0.05, 500), rng.normal(0, 0.05, 500)
    nd, rc = nd - nd.mean() + 0.01, rc - rc.mean() - 0.001  # ahead on NDCG, a little behind on recall
    e1 = g.add_window({"ndcg@20": nd, "recall@20": rc}, 3, {"ndcg@20": 0.2, "recall@20": 0.3}, {"ndcg@20": 0.19, "recall@20": 0.3})
    z = {m: d.mean() / (d.std(ddof=1) / math.sqrt(len(d))) for m, d in (("ndcg@20", nd), ("recall@20", rc))}
    assert e1["z"] == pytest.approx(z) and z["recall@20"] > -fc.Z_SWITCH and e1["use_blend_next"] is False
    rc2 = rng.normal(0, 0.05, 500)
    rc2 = rc2 - rc2.mean() - 0.02  # now clearly behind on recall
    e2 = g.add_window({"ndcg@20": nd, "recall@20": rc2}, 4, {}, {})
    both = np.concatenate([rc, rc2])
    assert e2["z"]["recall@20"] == pytest.approx(both.mean() / (both.std(ddof=1) / math.sqrt(1000)))
    assert e2["z"]["ndcg@20"] > fc.Z_SWITCH and e2["z"]["recall@20"] < -fc.Z_SWITCH  # either metric decides
    assert g.use_blend and e2["use_blend_next"] and e2["sessions"] == 500
    again = GuardCheck.from_rows([{"guard_check": e1}, {"guard_check": e2}, {}])
    assert again == g and GuardCheck.from_rows([]) == GuardCheck()


def test_blend_gain_is_the_model_minus_its_count_blend_per_session():
    from training.evaluate import count_blend_ranks
    from training.forward_check import blend_gain, next_sessions
    from training.model import ItemMemory

    m = make_model(head_gate=True)
    st, known = held_sessions(60, seed=21), {ITEM: V - 6, CAT: 7}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    diffs, ours, blend = blend_gain(m, next_sessions(st, known, ITEM), V - 6, CPU, 16)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    seen = next_sessions(st, known, ITEM)
    ranks = {}
    evaluate_model(m, seen, CPU, 16, ranks_out=ranks)
    tables = {k: getattr(m.item_memory, k) for k in ItemMemory.TABLES}
    b = count_blend_ranks(tables, m.cfg, seen, CPU, 16, V - 6).double().numpy()
    for metric in ("ndcg@20", "recall@20"):
        want = per_session(ranks["model"], metric) - per_session(b, metric)
        assert np.allclose(diffs[metric], want) and len(want) == len(seen) < len(st)
        assert ours[metric] == pytest.approx(per_session(ranks["model"], metric).mean())
        assert blend[metric] == pytest.approx(per_session(b, metric).mean())
    assert any(np.abs(d).sum() > 0 for d in diffs.values())  # the model is not its blend


GUARD = dict(CHOOSE, blend_guard=True, guard_split="next", baselines=True)


def guard_run(data, out, **kw):
    from tests.training.train_util import tiny_cfg
    from training.train import train

    return train(tiny_cfg(data, out, **{**GUARD, **kw}))["windows"]


def test_a_guard_that_never_falls_back_changes_nothing(tiny_synthetic_data, tmp_path, monkeypatch):
    from tests.training.train_util import tiny_cfg
    from training.train import train

    monkeypatch.setattr(fc, "Z_SWITCH", math.inf)
    plain = train(tiny_cfg(tiny_synthetic_data, tmp_path / "plain", **{**GUARD, "blend_guard": False}))["windows"]
    ours = guard_run(tiny_synthetic_data, tmp_path / "guard")
    assert [model_metrics(r) for r in ours] == [model_metrics(r) for r in plain] and any(model_metrics(r) for r in ours)
    trained = [r for r in ours if r.get("sessions_trained")]
    assert trained and all(r["blend_fallback"] is False and r["guard_check"]["use_blend_next"] is False for r in trained)
    for r in trained:
        g = r["guard_check"]
        assert g["window"] == r["train_window"] + 1 and g["sessions"] > 0 and set(g["z"]) == {"ndcg@20", "recall@20"}


def test_the_blend_serves_after_the_guard_picks_it_and_the_model_trains_on(tiny_synthetic_data, tmp_path, monkeypatch):
    import training.trainer as trainer_mod

    monkeypatch.setattr(fc, "Z_SWITCH", -math.inf)  # any check picks the blend
    stacked, at_fit = [], []
    real_serve, real_fit = trainer_mod.serve_blend, trainer_mod.Trainer.fit

    def spy_serve(trainer):
        stacked.append(fc.served_state(trainer.model.item_memory))  # as stacking left it
        return real_serve(trainer)

    def spy_fit(self, t, *a, **k):
        at_fit.append(fc.served_state(self.model.item_memory))
        return real_fit(self, t, *a, **k)

    monkeypatch.setattr(trainer_mod, "serve_blend", spy_serve)
    monkeypatch.setattr(trainer_mod.Trainer, "fit", spy_fit)
    rows = [r for r in guard_run(tiny_synthetic_data, tmp_path / "run") if r.get("sessions_trained")]
    assert len(rows) >= 3 and rows[0]["blend_fallback"] is False  # no check before the first window
    for prev, row in zip(rows, rows[1:]):
        assert row["blend_fallback"] is prev["guard_check"]["use_blend_next"] is True
        # the window's model ranks as its count blend (the same tables)
        assert model_metrics(row) == pytest.approx({k: row["baselines"]["count_blend"][k] for k in model_metrics(row)})
        assert row["guard_check"]["model"] != row["guard_check"]["blend"]  # the check scored the stacked model
    # each fit after a fallback starts from the stacked combiner, not from the blend it served as
    for i in range(1, len(rows)):
        assert all(torch.equal(at_fit[i][k], v) for k, v in stacked[i - 1].items())
    assert any(not torch.equal(stacked[0][k], v) for k, v in stacked[1].items())  # and stacking moved it on


def test_resume_carries_the_guard_and_its_set_aside_combiner(tiny_synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "Z_SWITCH", -math.inf)
    full, resumed = full_and_resumed(guard_run, tiny_synthetic_data, tmp_path, monkeypatch)

    def state(r):
        g = {k: v for k, v in (r.get("guard_check") or {}).items() if k != "seconds"}
        return r.get("blend_fallback"), g, model_metrics(r)

    assert [state(r) for r in resumed] == [state(r) for r in full] and any(r.get("blend_fallback") for r in full)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_both_checks_read_one_scoring_of_the_model_as_it_stands(tiny_synthetic_data, tmp_path, monkeypatch):
    """check_next_window scores the model once and hands its ranks to both checks: they must be the
    ranks each check would compute itself."""
    calls = []

    def same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, tuple):
            return all(same(x, y) for x, y in zip(a, b, strict=True))
        return np.array_equal(np.asarray(a), np.asarray(b))

    for name in ("curve_gain", "blend_gain"):
        real = getattr(fc, name)

        def spy(*a, real=real, name=name, mine=None, **k):
            got = real(*a, mine=mine, **k)
            calls.append((name, mine is not None, same(got, real(*a, **k))))
            return got

        monkeypatch.setattr(fc, name, spy)
    model = {**CHOOSE["model"], "cooc_curve": 3}
    guard_run(tiny_synthetic_data, tmp_path / "run", model=model, cooc_curve_fit="choose")
    assert {c[0] for c in calls} == {"curve_gain", "blend_gain"}
    assert all(shared and equal for _, shared, equal in calls), calls
