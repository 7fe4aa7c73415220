"""An ensemble run (TrainConfig.members > 1): K Trainers side by side, evaluated and served together.

Each member is a whole `Trainer` with its own folder RUN/members/<k>/ (checkpoint, metrics.json
of its training rows, --resume), its own seed (member 0: --seed itself, so it is the single-model
run of that seed; member k: a seed mixed from (--seed, k)), and so its own initialisation,
held-back slice, early stopping, stacking, curve choice and blend guard. The members see the same
windows and the same sessions, so they hold the same count tables and rank the same candidates.
Window by window every member trains on window t, then the ensemble
(`training.model.ensemble.Ensemble`: the mean of the members' log-softmax over the candidates)
is evaluated on t+1 with the model's baselines (member 0's counts) exactly as a single model is.

RUN/meta.json names the members (`MEMBERS_KEY`); `training.checkpoint.load_run(RUN)` returns the
Ensemble, whose count tables are one copy shared by the members (`Ensemble.shared_tables`).
RUN/metrics.json holds the ensemble's rows, each with the members' own rows under "members".
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.checkpoint import (
    MEMBERS_DIR,
    MEMBERS_KEY,
    META_FILE,
    WINDOWS_DIR,
    RunError,
    check_writable,
    load_run,
)
from training.config import TrainConfig
from training.integrity import atomic_write
from training.model.ensemble import Ensemble, unfit_member
from training.report import METRICS_FILE, PLOT_FILE, plot_metrics, print_table, summarise
from training.runtime import Dist
from training.trainer import Trainer, _seed

# the members' row entries summed into the ensemble's row (the rest is member 0's)
_SUMMED = ("train_seconds", "sessions_trained")


def member_seed(seed: int, k: int) -> int:
    """Member 0 keeps the run's seed; member k >= 1 a seed mixed from (seed, k), so the members of
    runs with seeds 0, 1, 2 never coincide."""
    return seed if k == 0 else _seed(seed, k, 13) % (2**31)


class MembersTrainer:
    """`run()` trains the members window by window and evaluates their Ensemble (module docstring)."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        if d.world > 1:
            raise RunError(
                f"--members {cfg.members} trains its members in one process; run it without torchrun "
                f"(got {d.world} processes)"
            )
        self.cfg, self.out = cfg, Path(cfg.out)
        check_writable(self.out)
        has_meta = (self.out / META_FILE).exists()
        if has_meta and not cfg.resume:
            raise RunError(
                f"{self.out} already holds a checkpoint ({META_FILE}); pass --resume to continue it or choose "
                "another --out"
            )
        self.trainers = [Trainer(self._member_config(k), d) for k in range(cfg.members)]
        for k, tr in enumerate(self.trainers):
            if problem := unfit_member(tr.model):
                raise RunError(f"--members {cfg.members} {problem} (member {k})")
        self.rows: list[dict[str, Any]] = []
        self.resume_meta = _read_json(self.out / META_FILE) if has_meta else None

    def _member_config(self, k: int) -> TrainConfig:
        """Member k's settings: its seed and folder; member 0 keeps the baselines' counts and the
        evaluation's settings (the driver evaluates through it), no member evaluates itself."""
        cfg = self.cfg
        return replace(
            cfg,
            members=1,
            seed=member_seed(cfg.seed, k),
            out=str(self.out / MEMBERS_DIR / str(k)),
            evaluate=False,
            baselines=cfg.baselines and k == 0,
            save_ranks=cfg.save_ranks and k == 0,
            tensorboard=False,
        )

    def restore(self) -> int:
        """--resume: every member restores its own checkpoint; -> the first window still to train."""
        for tr in self.trainers:
            tr.restore()
        firsts = [tr.first for tr in self.trainers]
        first = self.cfg.start_window
        if self.resume_meta is not None:
            first = int(self.resume_meta["window"]) + 1
            self.rows = list(self.resume_meta["metrics"]["windows"])
        if any(f != first for f in firsts):
            raise RunError(
                f"--resume: the members of {self.out} stopped after different windows (next window per member "
                f"{firsts}, the ensemble's {first}): a run interrupted while saving; start it again in a new --out"
            )
        return first

    def run(self) -> dict[str, Any]:
        first = self.restore()
        for tr in self.trainers:
            tr._count_earlier_windows()
        lead = self.trainers[0]
        for t in range(first, self.cfg.end_window):
            member_rows = []
            for tr in self.trainers:
                row = tr.run_window(t)
                tr.rows.append(row)
                tr.save(t, row)
                member_rows.append(row)
            row = self._row(member_rows)
            if self.cfg.evaluate:
                ensemble = Ensemble([tr.model for tr in self.trainers])
                lead.evaluate(t, row, model=ensemble, out=self.out)
            self.rows.append(row)
            self.save(t)
        result = self.result()
        plot_metrics(self.rows, self.out / PLOT_FILE)
        print_table(self.rows)
        return result

    def _row(self, member_rows: list[dict[str, Any]]) -> dict[str, Any]:
        row = dict(member_rows[0])
        for key in _SUMMED:
            if any(key in r for r in member_rows):
                row[key] = sum(r.get(key, 0) for r in member_rows)
        row["members"] = member_rows
        return row

    def result(self) -> dict[str, Any]:
        return {"windows": self.rows, "summary": summarise(self.rows), "train_config": self.cfg.to_dict()}

    def save(self, t: int) -> None:
        """RUN/meta.json naming the members (after every member saved window t) and metrics.json."""
        meta = {
            "window": t,
            MEMBERS_KEY: [f"{MEMBERS_DIR}/{k}" for k in range(len(self.trainers))],
            "model_config": self.trainers[0].mcfg.to_dict(),
            "schema": self.trainers[0].schema,
            "workflow_sha256": self.trainers[0].schema.get("workflow_sha256", {}),
            "train_config": self.cfg.to_dict(),
            "metrics": {"windows": self.rows},
        }
        if self.cfg.keep_windows:  # RUN/windows/<t>/meta.json names the members' windows/<t>
            at = self.out / WINDOWS_DIR / str(t)
            at.mkdir(parents=True, exist_ok=True)
            members = [f"../../{MEMBERS_DIR}/{k}/{WINDOWS_DIR}/{t}" for k in range(len(self.trainers))]
            atomic_write(at / META_FILE, json.dumps(meta | {MEMBERS_KEY: members}, indent=2).encode())
        atomic_write(self.out / META_FILE, json.dumps(meta, indent=2).encode())
        atomic_write(self.out / METRICS_FILE, json.dumps(self.result(), indent=2).encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read as JSON ({e}): the ensemble's checkpoint is damaged") from e


def load_members(run_dir: Path, meta: dict[str, Any], device: Any = "cpu") -> Ensemble:
    """The Ensemble of an ensemble run's folder (meta.json with `MEMBERS_KEY`), tables shared."""
    members = []
    for rel in meta[MEMBERS_KEY]:
        model, member_meta = load_run(run_dir / rel, device)
        if int(member_meta["window"]) != int(meta["window"]):
            raise RunError(
                f"{run_dir / rel} holds window {member_meta['window']}, the ensemble in {run_dir} window "
                f"{meta['window']}: a run interrupted while saving; resume it (--resume) to finish the window"
            )
        members.append(model)
    ensemble = Ensemble(members)
    ensemble.shared_tables()
    return ensemble.eval()
