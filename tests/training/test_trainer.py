"""training/trainer.py: the set-up a fresh start and --resume share, and the count filling."""

from __future__ import annotations

import json

import pytest
import torch

import training.trainer as trainer_mod
from tests.training.train_util import tiny_cfg
from training.checkpoint import RunError, read_meta
from training.runtime import Dist
from training.train import train

DIST1 = Dist()  # rank 0 of 1


@pytest.fixture()
def built(monkeypatch) -> list:
    """Every SessionModel the trainer builds, with its config."""
    seen: list = []
    real = trainer_mod.SessionModel

    def spy(cfg):
        seen.append(cfg)
        return real(cfg)

    monkeypatch.setattr(trainer_mod, "SessionModel", spy)
    return seen


@pytest.mark.parametrize(
    "model", [{}, {"memory": True, "memory_k": 8, "objective": "clm"}], ids=["reference", "memory"]
)
def test_start_and_resume_build_the_model_once(tiny_synthetic_data, tmp_path, built, model):
    out = tmp_path / "run"
    first = trainer_mod.Trainer(tiny_cfg(tiny_synthetic_data, out, end_window=3, model=model), DIST1)
    assert len(built) == 1 and first.resume_meta is None
    assert first.mcfg.categorical == first._config_at(first.mcfg, first.known_sizes(1)).categorical
    first.run()
    saved = read_meta(out)["model_config"]["categorical"]
    assert saved != built[0].categorical  # the tables grew after the first window

    built.clear()
    again = trainer_mod.Trainer(
        tiny_cfg(tiny_synthetic_data, out, end_window=4, resume=True, model=model), DIST1
    )
    # built once, at the checkpoint's size: restore only loads states into it
    assert len(built) == 1 and built[0].categorical == saved
    params = {id(p) for p in again.model.parameters()}
    optimizer = again.optimizer
    again.restore()
    assert len(built) == 1 and again.optimizer is optimizer
    assert {id(p) for p in again.model.parameters()} == params
    assert again.first == 3 and len(again.rows) == 2
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())


def test_resume_refuses_another_model(tiny_synthetic_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_synthetic_data, out, end_window=2))
    with pytest.raises(RunError, match="pass --resume"):
        trainer_mod.Trainer(tiny_cfg(tiny_synthetic_data, out), DIST1)
    with pytest.raises(RunError, match="model config"):
        trainer_mod.Trainer(tiny_cfg(tiny_synthetic_data, out, resume=True, model={"n_layer": 1}), DIST1)


def test_run_records_the_train_config(tiny_synthetic_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_synthetic_data, out, end_window=2, model={"dropout": 0.1}))
    saved = json.loads((out / "metrics.json").read_text())["train_config"]
    assert saved == result["train_config"] and saved["model"]["dropout"] == 0.1
    assert read_meta(out)["train_config"] == saved


def _sessions(n: int, first_id: int):
    import torch

    from training.data.splits import SessionTensors

    return SessionTensors({"item_id-list": torch.ones(n, 3, dtype=torch.long)}, torch.full((n,), 2),
                          torch.arange(first_id, first_id + n))  # fmt: skip


@pytest.mark.parametrize(
    "sizes, budget, expected_ids",
    [
        ((3, 4, 5), 0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),  # no cap: every window
        ((3, 4, 5), 100, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        ((3, 4, 5), 9, [3, 4, 5, 6, 7, 8, 9, 10, 11]),  # the oldest window dropped
        ((3, 4, 5), 7, [5, 6, 7, 8, 9, 10, 11]),  # the next one cut from its old end
        ((3, 4, 5), 2, [7, 8, 9, 10, 11]),  # window t stays whole
    ],
)
def test_newest_keeps_the_newest_sessions_within_the_budget(sizes, budget, expected_ids):
    from training.trainer import concat_sessions, newest

    parts, start = [], 0
    for n in sizes:
        parts.append(_sessions(n, start))
        start += n
    assert concat_sessions(newest(parts, budget)).session_id.tolist() == expected_ids
