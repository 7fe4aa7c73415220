"""Window-by-window training on tiny data: outputs, checkpoint round trip, resume
equivalence, atomic checkpoints, bad input, empty windows, 2-process DDP, GPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import training.evaluate as evaluate_mod
import training.integrity as integrity_mod
import training.model as model_mod
import training.train as train_mod
import training.trainer as trainer_mod
from tests.training.train_util import tiny_cfg
from training.checkpoint import RunError, load_run, read_meta, save_checkpoint
from training.data.splits import DataError, eval_inputs_targets, load_schema, load_split, split_path
from training.evaluate import evaluate_model, known_inputs
from training.metrics import metric_keys
from training.runtime import Dist
from training.schema import Schema
from training.train import main, train
from training.trainer import cosine_lambda

DIST1 = Dist()  # rank 0 of 1

REPO = Path(__file__).resolve().parents[2]  # tests/training/ -> the repository root


def model_metrics(row: dict) -> dict:
    return {k: row[k] for k in metric_keys()}


@pytest.fixture(scope="module")
def finished_run(tiny_synthetic_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "run"
    return out, train(tiny_cfg(tiny_synthetic_data, out))


# --- outputs and checkpoint round trip ----------------------------------------------


def test_run_outputs(finished_run, tiny_synthetic_data):
    out, result = finished_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["train_window"], r["eval_window"]) for r in metrics["windows"]] == [(1, 2), (2, 3)]
    for row in metrics["windows"]:
        assert set(metric_keys()) <= set(row)
        for key in ("eval_sessions", "train_sessions", "epochs", "train_seconds"):
            assert key in row
        assert set(row["baselines"]) == {"popular", "cooc_knn", "successor_knn", "vsknn", "count_blend"}
        assert set(row["baselines"]["popular"]) == set(metric_keys())
        # every evaluation session counts (no drop_last)
        assert row["eval_sessions"] == len(
            load_split(
                split_path(tiny_synthetic_data, row["eval_window"], "valid"), load_schema(tiny_synthetic_data)
            )
        )
    assert metrics["summary"]["sessions_per_second"] > 0
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "meta.json").read_text())
    schema = load_schema(tiny_synthetic_data)
    assert meta["window"] == 2
    assert meta["workflow_sha256"] == schema["workflow_sha256"]
    # issue 12: the tables hold the vocabulary known after the last window trained (2), not the whole log's
    assert meta["vocabulary_sizes"] == Schema.of(schema).known_sizes(2) == meta["model_config"]["categorical"]
    assert meta["metrics"]["windows"] == result["windows"]
    assert not list(out.glob("*.tmp"))


def test_checkpoint_round_trip(finished_run, tiny_synthetic_data):
    """load_run rebuilds the model from state_dict + JSON and it evaluates to the recorded metrics."""
    out, result = finished_run
    model, meta = load_run(out)
    assert not model.training
    st = load_split(split_path(tiny_synthetic_data, 3, "valid"), load_schema(tiny_synthetic_data))
    st, miss = known_inputs(st, meta["vocabulary_sizes"], model.cfg.item_feature)  # what was known after 2
    again = evaluate_model(model, st, torch.device("cpu"), 7, miss)  # other batch size: same ranks
    assert again == pytest.approx(model_metrics(result["windows"][-1]), abs=1e-12)
    state = torch.load(out / "model.pt", weights_only=True)  # plain tensors, no pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    optim = torch.load(out / "optim.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(optim)
    assert optim["scheduler"]["last_epoch"] == result["windows"][-1]["steps"]


def test_training_module_reexports_load_run():
    assert train_mod.load_run is load_run


# --- resume -------------------------------------------------------------------------------


# the real recipe's moving parts: item memory (rebuilt per window), cumulative data,
# early stopping on a held-back slice, two optimizer parameter groups
REAL_LIKE = dict(
    model={"objective": "clm", "memory": True, "memory_k": 10, "dropout": 0.5, "embedding_init_std": 0.0},
    train_on="cumulative",
    holdout=0.2,
    patience=1,
    epochs=2,
    memory_lr=1e-2,
    weight_decay=0.1,
)


# the sampled loss on the tiny catalogue ("auto" switches at a small sampled_min_items): SparseAdam
# over the item table, negatives drawn per window; with and without the memory (its pop table samples)
SAMPLED = dict(model={"sampled_min_items": 10, "negatives": 32})
SAMPLED_REAL_LIKE = {**REAL_LIKE, "model": {**REAL_LIKE["model"], **SAMPLED["model"]}}


@pytest.mark.parametrize(
    "kw",
    [{}, REAL_LIKE, SAMPLED, SAMPLED_REAL_LIKE],
    ids=["reference", "real-with-memory", "sampled", "sampled-real-with-memory"],
)
def test_resume_after_crash_gives_identical_metrics(tiny_synthetic_data, tmp_path, monkeypatch, kw):
    full = train(tiny_cfg(tiny_synthetic_data, tmp_path / "full", end_window=4, **kw))

    real_eval = evaluate_mod.evaluate_model

    def crash_in_window_3(model, st, *a, **k):
        if st.source.endswith("4/valid.parquet"):  # after training window 3, before its checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real_eval(model, st, *a, **k)

    monkeypatch.setattr(evaluate_mod, "evaluate_model", crash_in_window_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_synthetic_data, tmp_path / "crashed", end_window=4, **kw))
    assert read_meta(tmp_path / "crashed")["window"] == 2  # last good checkpoint
    monkeypatch.setattr(evaluate_mod, "evaluate_model", real_eval)

    resumed = train(tiny_cfg(tiny_synthetic_data, tmp_path / "crashed", end_window=4, resume=True, **kw))
    assert [model_metrics(r) for r in resumed["windows"]] == [model_metrics(r) for r in full["windows"]]
    assert [r["baselines"] for r in resumed["windows"]] == [r["baselines"] for r in full["windows"]]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_run_saves_and_restores_both_optimizers(tiny_synthetic_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_synthetic_data, out, end_window=2, **SAMPLED))
    meta = read_meta(out)
    assert meta["model_config"]["loss"] == "sampled"
    ostate = torch.load(out / "optim.pt", weights_only=True)
    assert {"optimizer", "sparse_optimizer"} <= set(ostate)
    (table,) = ostate["sparse_optimizer"]["state"].values()
    V, E = meta["model_config"]["categorical"]["item_id-list"], meta["model_config"]["embedding_dim"]
    assert table["exp_avg"].shape == table["exp_avg_sq"].shape == (V, E)  # dense moments: 2 x the table
    assert table["exp_avg"].abs().sum() > 0
    # the dense AdamW keeps every parameter but the item table
    n_dense = sum(len(g["params"]) for g in ostate["optimizer"]["param_groups"])
    trainer = trainer_mod.Trainer(
        tiny_cfg(tiny_synthetic_data, out, end_window=3, resume=True, **SAMPLED), DIST1
    )
    dense, sparse = trainer.model.param_groups()
    assert n_dense == len(dense) and list(sparse) == ["embeddings.item_id-list.weight"]
    trainer.restore()
    got = trainer.sparse_optimizer.state_dict()
    assert torch.equal(got["state"][0]["exp_avg"], table["exp_avg"])
    assert torch.equal(got["state"][0]["exp_avg_sq"], table["exp_avg_sq"])
    assert got["state"][0]["step"] == table["step"]
    assert trainer.first == 2


@pytest.mark.parametrize(
    "model", [{"loss": "sampled"}, SAMPLED["model"]], ids=["sampled", "auto-resolves-sampled"]
)
def test_label_smoothing_is_rejected_with_the_sampled_loss(tiny_synthetic_data, tmp_path, model):
    # one check, where the loss is final ("auto" resolves to sampled only once the catalogue size is
    # known): refused before training, nothing written
    cfg = tiny_cfg(tiny_synthetic_data, tmp_path / "a", label_smoothing=0.1, model=model)
    with pytest.raises(
        RunError, match="label_smoothing=0.1 needs the full softmax.*--label-smoothing 0, or --loss full"
    ):
        train(cfg)
    assert not (tmp_path / "a" / "meta.json").exists()


def test_label_smoothing_is_accepted_under_re_ranking_with_the_sparse_table(tiny_synthetic_data, tmp_path):
    # re-ranking's softmax runs over each target's candidates whatever the loss setting: its uniform
    # part spans them, so label smoothing is defined (and changes what is learnt)
    model = {"loss": "sampled", "memory": True, "rerank": True, "rank_popular": 16}
    losses = []
    for eps in (0.0, 0.3):
        result = train(tiny_cfg(tiny_synthetic_data, tmp_path / f"ls{eps}", label_smoothing=eps, model=model))
        rows = [r for r in result["windows"] if r.get("sessions_trained")]
        assert rows and all(math.isfinite(r["train_loss_last_epoch"]) for r in rows)
        losses.append([r["train_loss_last_epoch"] for r in rows])
    assert losses[0] != losses[1]


def test_resume_reads_an_older_meta_without_the_loss_fields(tiny_synthetic_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_synthetic_data, out, end_window=2))
    meta = json.loads((out / "meta.json").read_text())
    for k in ("loss", "sampled_min_items", "negatives", "sample_alpha"):
        meta["model_config"].pop(k)
    (out / "meta.json").write_text(json.dumps(meta))
    trainer = trainer_mod.Trainer(tiny_cfg(tiny_synthetic_data, out, end_window=3, resume=True), DIST1)
    trainer.restore()
    assert trainer.first == 2


def test_existing_run_needs_resume(finished_run, tiny_synthetic_data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    with pytest.raises(RunError, match="--resume"):
        train(tiny_cfg(tiny_synthetic_data, out))
    with pytest.raises(RunError, match="model config"):
        train(tiny_cfg(tiny_synthetic_data, out, resume=True, end_window=4, model={"mask_prob": 0.3}))


def test_unwritable_output_folder(tiny_synthetic_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="cannot write to the output folder"):
        train(tiny_cfg(tiny_synthetic_data, blocker / "run"))


# --- atomic checkpoints --------------------------------------------------------------------


def _ckpt(tmp_path: Path, window: int) -> None:
    save_checkpoint(tmp_path, {"w": torch.full((3,), float(window))}, {"step": window}, {"window": window})


def test_full_disk_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _ckpt(tmp_path, 1)
    real = integrity_mod.write_tmp
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(integrity_mod, "write_tmp", full_disk)
    with pytest.raises(OSError):
        _ckpt(tmp_path, 2)
    assert read_meta(tmp_path)["window"] == 1
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"][0] == 1.0
    assert not list(tmp_path.glob("*.tmp"))  # leftovers removed by the recovery


@pytest.mark.parametrize("renames_done", [0, 1, 2])
def test_crash_between_renames_is_rolled_forward(tmp_path, monkeypatch, renames_done):
    _ckpt(tmp_path, 1)
    real = os.replace
    calls = {"n": 0}

    def crash(src, dst):
        if calls["n"] == renames_done:
            raise KeyboardInterrupt("power cut")
        calls["n"] += 1
        return real(src, dst)

    monkeypatch.setattr(integrity_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _ckpt(tmp_path, 2)
    monkeypatch.setattr(integrity_mod.os, "replace", real)
    meta = read_meta(tmp_path)  # completes the interrupted write
    assert meta["window"] == 2
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"][0] == 2.0
    assert not list(tmp_path.glob("*.tmp"))


def test_torn_meta_tmp_is_discarded(tmp_path):
    _ckpt(tmp_path, 1)
    (tmp_path / "model.pt.tmp").write_bytes(b"partial")
    (tmp_path / "meta.json.tmp").write_text('{"window": 2, "fil')
    assert read_meta(tmp_path)["window"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_damaged_model_file_is_detected(finished_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    (out / "model.pt").write_bytes((out / "model.pt").read_bytes()[:-10])
    with pytest.raises(RunError, match="sha256"):
        load_run(out)


# --- bad input and empty windows --------------------------------------------------------


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def _ids_out_of_vocab(t: pa.Table) -> pa.Table:
    lists = t.column("item_id-list").to_pylist()
    lists[0] = [10_000] + lists[0][1:]
    return t.set_column(
        t.schema.get_field_index("item_id-list"), "item_id-list", pa.array(lists, pa.list_(pa.int64()))
    )


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: _rewrite(p, lambda t: t.drop(["category-list"])), r"'category-list'\] missing"),
        (lambda p: _rewrite(p, _ids_out_of_vocab), r"'item_id-list' holds id 10000 outside the vocabulary"),
        (lambda p: p.write_bytes(b"PAR1 this is not parquet"), r"cannot read the parquet file"),
        (lambda p: p.unlink(), r"does not exist"),
    ],
    ids=["missing-column", "id-outside-vocabulary", "corrupt-parquet", "missing-file"],
)
def test_bad_input_names_file_and_column(tiny_synthetic_data, tmp_path, damage, match, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic_data, data)
    bad = split_path(data, 2, "train")
    damage(bad)
    with pytest.raises(DataError, match=match) as e:
        load_split(bad, load_schema(data))
    assert str(bad) in str(e.value)
    # the CLI reports it as one line and exits 2
    rc = main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 2 and str(bad) in capsys.readouterr().err


def test_empty_window_is_skipped_with_a_warning(tiny_synthetic_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic_data, data)
    _rewrite(split_path(data, 1, "train"), lambda t: t.slice(0, 0))
    _rewrite(split_path(data, 3, "valid"), lambda t: t.slice(0, 0))
    with pytest.warns(UserWarning) as w:
        result = train(tiny_cfg(data, tmp_path / "run"))
    messages = [str(x.message) for x in w]
    assert any("has no sessions; skipping training on window 1" in m for m in messages)
    assert any("has no sessions; window 2 is not evaluated" in m for m in messages)
    first, second = result["windows"]
    assert first["skipped"] and first["sessions_trained"] == 0 and "ndcg@20" in first
    assert second["eval_sessions"] == 0 and "ndcg@20" not in second
    assert (tmp_path / "run" / "metrics.png").exists()


def test_eval_inputs_targets():
    from training.data.splits import SessionTensors

    items = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [4, 0, 0, 0]])
    st = SessionTensors({"item_id-list": items, "x": items.float()}, torch.tensor([3, 2, 1]), torch.arange(3))
    feats, lengths, targets = eval_inputs_targets(st)
    assert targets.tolist() == [7, 9, 4]
    assert lengths.tolist() == [2, 1, 0]
    assert feats["item_id-list"].tolist() == [[5, 6, 0, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert feats["x"][0].tolist() == [5.0, 6.0, 0.0, 0.0]


def test_chunked_evaluation_gives_the_same_ranks(finished_run, tiny_synthetic_data):
    out, _ = finished_run
    model, _ = load_run(out)
    st = load_split(split_path(tiny_synthetic_data, 3, "valid"), load_schema(tiny_synthetic_data))
    V = model.cfg.n_items
    assert evaluate_mod.eval_rows(V, 1024) == 1024  # small catalogues: the batch size, as before
    assert evaluate_mod.eval_rows(1_000_000, 1024) == 32  # 32M scores at once
    assert evaluate_mod.eval_rows(10**9, 1024) == 1
    ranks = []
    real = evaluate_mod.pessimistic_ranks

    def keep(scores, targets):
        ranks.append((scores.shape[0], real(scores, targets)))
        return ranks[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_mod, "pessimistic_ranks", keep)
        whole = evaluate_model(model, st, torch.device("cpu"), 1024)
        n_whole = len(ranks)
        chunked = evaluate_model(model, st, torch.device("cpu"), 1024, max_scores=3 * V)
    assert n_whole == 1 and all(rows <= 3 for rows, _ in ranks[1:]) and len(ranks) > 2
    assert torch.equal(ranks[0][1], torch.cat([r for _, r in ranks[1:]]))
    assert whole == chunked


def test_cosine_schedule_matches_hf():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=70, num_cycles=7.5)
    ours = cosine_lambda(70, 7.5)
    for step in range(71):
        assert ours(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12)


def test_cli_fills_the_config(capsys):
    cfg = train_mod.parse_args(
        ["--data", "D", "--out", "R", "--epochs", "2", "--no-baselines", "--objective", "clm"]
    )
    assert (cfg.data, cfg.out, cfg.epochs, cfg.baselines, cfg.model.objective) == (
        "D",
        "R",
        2,
        False,
        "clm",
    )
    assert (cfg.start_window, cfg.end_window, cfg.batch_size, cfg.lr) == (1, 8, 128, 5e-4)
    with pytest.raises(SystemExit) as e:
        train_mod.parse_args(["--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_cli_sets_the_sampled_loss():
    cfg = train_mod.parse_args(
        ["--data", "D", "--out", "R", "--loss", "sampled", "--negatives", "512", "--sample-alpha", "0.5",
         "--sampled-min-items", "1000", "--max-steps", "7"]
    )  # fmt: skip
    assert {k: getattr(cfg.model, k) for k in ("loss", "negatives", "sample_alpha", "sampled_min_items")} == {
        "loss": "sampled",
        "negatives": 512,
        "sample_alpha": 0.5,
        "sampled_min_items": 1000,
    }
    assert cfg.max_steps == 7
    plain = train_mod.parse_args(["--data", "D", "--out", "R"])
    assert plain.model.loss == "auto" and plain.max_steps == 0  # not given: the model's "auto"


# --- scale: 2 processes (gloo) and GPU ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--memory"]], ids=["reference", "with-memory"])
def test_two_process_ddp_run_loads_and_evaluates(tiny_synthetic_data, tmp_path, extra):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "training.train", "--data", str(tiny_synthetic_data), "--out", str(out),
        "--end-window", "3", "--epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_config"]["batch_size"] == 16 and len(metrics["windows"]) == 2
    model, meta = load_run(out)
    assert meta["model_config"]["memory"] is bool(extra)
    st = load_split(split_path(tiny_synthetic_data, 3, "valid"), load_schema(tiny_synthetic_data))
    assert evaluate_model(model, st, torch.device("cpu"), 64) == pytest.approx(
        model_metrics(metrics["windows"][-1]), abs=1e-12
    )
    single = model_mod.SessionModel(model_mod.ModelConfig.from_dict(meta["model_config"]))
    assert {k: v.shape for k, v in single.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.gpu
def test_gpu_run(tiny_synthetic_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available on this machine")
    result = train(tiny_cfg(tiny_synthetic_data, tmp_path / "gpu", device="cuda"))
    model, _ = load_run(tmp_path / "gpu", device="cuda")
    st = load_split(split_path(tiny_synthetic_data, 3, "valid"), load_schema(tiny_synthetic_data))
    got = evaluate_model(model, st, torch.device("cuda"), 64)
    assert got == pytest.approx(model_metrics(result["windows"][-1]), abs=1e-9)
    cpu_model, _ = load_run(tmp_path / "gpu")  # a GPU checkpoint loads on the CPU
    assert evaluate_model(cpu_model, st, torch.device("cpu"), 64) == pytest.approx(got, abs=0.02)
