"""training/config.py: one typed route for the training settings.

dataclass defaults < recipe < --config FILE < explicit flags, for every field (model settings
included); the model's settings are a ModelConfig checked where they are built."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

import training.train as train_mod
from training.checkpoint import RunError
from training.cli import ConfigFileError
from training.config import TrainConfig, check_model, load_params
from training.data.splits import load_schema
from training.model import MODEL_FLAGS, MODEL_SETTINGS, SCHEMA_FIELDS, ModelConfig
from training.recipes import RECIPES


def parse(data, tmp_path, argv=(), file=None):
    args = ["--data", str(data), "--out", str(tmp_path / "run"), *argv]
    if file is not None:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(file))
        args += ["--config", str(path)]
    return train_mod.parse_args(args)


@pytest.mark.parametrize(
    "argv, file, expected",
    [
        ([], None, dict(batch_size=128, epochs=5, lr=5e-4, model=dict(dropout=0.3, objective="mlm"))),
        # a file over the dataclass default and over the recipe; model settings flat or under "model"
        ([], {"batch_size": 32}, dict(batch_size=32)),
        ([], {"params": {"epochs": 3, "dropout": 0.1}}, dict(epochs=3, model=dict(dropout=0.1))),
        ([], {"model": {"objective": "clm"}}, dict(model=dict(objective="clm"))),
        # an explicit flag over the file, whatever the field (batch_size was the exception before)
        (["--batch-size", "64"], {"batch_size": 32}, dict(batch_size=64)),
        (["--max-grad-norm", "0.5"], {"max_grad_norm": 2.0}, dict(max_grad_norm=0.5)),
        (["--epochs", "2"], {"epochs": 3}, dict(epochs=2)),
        (["--dropout", "0.2"], {"model": {"dropout": 0.1}}, dict(model=dict(dropout=0.2))),
        (["--no-memory"], {"memory": True}, dict(model=dict(memory=False))),
        # the recipe under the file under the flags
        (["--recipe", "real"], None, dict(epochs=20, train_on="cumulative", model=dict(objective="mlm", memory=True, memory_hop2=0.6, feature_norm=True, scorer_hidden=64, scorer_members=3))),
        (["--recipe", "real", "--scorer-members", "1"], None, dict(model=dict(scorer_hidden=64, scorer_members=1))),
        (["--recipe", "real", "--train-on", "window"], {"train_on": "cumulative"}, dict(train_on="window")),
        (["--recipe", "real"], {"model": {"memory": False}}, dict(model=dict(memory=False, objective="mlm"))),
    ],
)  # fmt: skip
def test_precedence(tiny_synthetic_data, tmp_path, argv, file, expected):
    cfg = parse(tiny_synthetic_data, tmp_path, argv, file)
    for k, v in expected.items():
        if k == "model":
            assert {m: getattr(cfg.model, m) for m in v} == v
        else:
            assert getattr(cfg, k) == v, k
    assert cfg.recipe.endswith("+config") == (file is not None)


def test_model_settings_are_a_typed_config_without_the_schema(tiny_synthetic_data, tmp_path):
    cfg = parse(tiny_synthetic_data, tmp_path, ["--objective", "clm", "--memory-k", "7"])
    assert isinstance(cfg.model, ModelConfig) and not cfg.model.has_schema
    assert cfg.model.loss == "auto"  # resolved once the catalogue size is known
    schema = load_schema(tiny_synthetic_data)
    full = cfg.model.with_schema(schema)
    want = {**RECIPES["reference"]["model"], "objective": "clm", "memory_k": 7}
    assert full == ModelConfig.from_schema(schema, **want)
    assert full.loss == "full" and full.has_schema
    with pytest.raises(ValueError, match="settings only"):
        _ = cfg.model.n_items


def test_every_model_flag_is_a_setting_and_no_setting_shadows_a_train_field():
    assert set(MODEL_FLAGS) <= set(MODEL_SETTINGS)
    assert not set(MODEL_SETTINGS) & {f.name for f in fields(TrainConfig)}
    assert set(SCHEMA_FIELDS).isdisjoint(MODEL_SETTINGS)


@pytest.mark.parametrize(
    "model, match",
    [
        ({"surprise": 1}, "unknown model setting 'surprise'"),
        ({"categorical": {"x": 5}}, "unknown model setting 'categorical'"),  # the schema's, not a setting
        ({"mask_prob": 2.0}, "mask_prob"),
        ({"objective": "plm"}, "objective"),
    ],
)
def test_bad_model_settings_name_the_setting(model, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="D", out="R", model=model)


def test_bad_settings_on_the_command_line(tiny_synthetic_data, tmp_path, capsys):
    with pytest.raises(ConfigFileError, match="unknown setting 'batch_sise'"):
        parse(tiny_synthetic_data, tmp_path, file={"batch_sise": 3})
    with pytest.raises(ConfigFileError, match="\"model\": unknown setting 'nope'"):
        parse(tiny_synthetic_data, tmp_path, file={"model": {"nope": 1}})
    with pytest.raises(SystemExit) as e:  # a bad value: argparse's usage and message, code 2
        parse(tiny_synthetic_data, tmp_path, ["--mask-prob", "2"])
    assert e.value.code == 2 and "mask_prob must be in (0, 1)" in capsys.readouterr().err
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"batch_sise": 3}))
    rc = train_mod.main(
        ["--data", str(tiny_synthetic_data), "--out", str(tmp_path / "r"), "--config", str(path)]
    )
    assert rc == 2 and "unknown setting 'batch_sise'" in capsys.readouterr().err


def test_load_params_splits_train_and_model_settings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"params": {"lr": 0.1, "dropout": 0.2, "model": {"memory": True}}}))
    assert load_params(path) == {"lr": 0.1, "model": {"dropout": 0.2, "memory": True}}


def test_label_smoothing_check_needs_the_final_loss():
    full = ModelConfig(categorical={"item_id-list": 300}, sampled_min_items=100)
    assert full.loss == "sampled"
    with pytest.raises(RunError, match="--label-smoothing 0, or --loss full"):
        check_model(full, 0.1)
    check_model(full, 0.0)
    check_model(ModelConfig(categorical={"item_id-list": 300}), 0.1)  # full softmax: fine


def test_train_config_records_the_model_settings():
    cfg = TrainConfig(data="D", out="R", model={"objective": "clm"})
    d = cfg.to_dict()
    assert d["model"]["objective"] == "clm" and set(d["model"]) == set(MODEL_SETTINGS)
    assert json.loads(json.dumps(d)) == d
