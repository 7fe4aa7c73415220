"""bench.ablation_table: one table of ablation rows over several logs and files."""

from __future__ import annotations

import json

import pytest

from bench.ablation_table import build, main, markdown


def _summary(rows: dict[str, dict[int, tuple[float, float]]]) -> dict:
    """An ablation JSON: row -> seed -> (model NDCG@20, Recall@20)."""
    out = {"rows": {}}
    for name, seeds in rows.items():
        per_seed = {
            str(s): {"model": {"ndcg@20": n, "recall@20": r, "mrr@20": n / 2}} for s, (n, r) in seeds.items()
        }
        mean = {
            m: [sum(v["model"][m] for v in per_seed.values()) / len(per_seed), 0.0]
            for m in ("ndcg@20", "recall@20", "mrr@20")
        }
        out["rows"][name] = {"per_seed": per_seed, "mean": {"model": mean}}
    return out


def test_effects_are_paired_per_seed_renamed_filtered_and_first_file_wins(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_summary({
        "recipe": {0: (0.10, 0.20), 1: (0.20, 0.40)},
        "wide": {0: (0.11, 0.20), 1: (0.20, 0.44)},  # +10 % and 0 %; 0 % and +10 %
    })))  # fmt: skip
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_summary({
        "old": {0: (0.05, 0.05)},
        "mlm_hop2_0.6": {0: (0.10, 0.20), 1: (0.20, 0.40)},
        "clm": {0: (0.90, 0.90), 1: (0.90, 0.90)},  # the name hop2_0.6 takes: never read
        "hop2_0.6": {0: (0.09, 0.20), 1: (0.18, 0.40)},  # -10 % both seeds: the table's "clm"
        "wide": {0: (0.50, 0.50), 1: (0.50, 0.50)},  # a.json has it first
    })))  # fmt: skip
    order, table, refs = build([["LOG", str(a), f"{b}:ref=mlm_hop2_0.6:rows=clm,wide:clm=hop2_0.6"]])
    assert order == ["wide", "clm"]  # "old" is not asked for
    wide, clm = table["LOG"]["wide"], table["LOG"]["clm"]
    assert wide["ndcg@20"] == pytest.approx((0.05, 0.05, 2)) and wide["recall@20"] == pytest.approx(
        (0.05, 0.05, 2)
    )
    assert clm["ndcg@20"] == pytest.approx((-0.1, 0.0, 2)) and clm["recall@20"] == pytest.approx(
        (0.0, 0.0, 2)
    )
    assert "mlm_hop2_0.6" in refs["LOG"][1] and "0.1500" in refs["LOG"][1]
    text = markdown(order, table, refs)
    assert "| clm | causal LM" in text and "-10.0 % ± 0.0" in text and "+5.0 % ± 5.0" in text


def test_a_second_log_without_a_row_shows_a_dash_and_bad_specs_are_named(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_summary({"recipe": {0: (0.1, 0.2)}, "wide": {0: (0.1, 0.2)}})))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_summary({"recipe": {0: (0.1, 0.2)}})))
    out = tmp_path / "t.md"
    assert main(["--log", "A", str(a), "--log", "B", str(b), "--out", str(out)]) == 0
    line = [x for x in out.read_text().splitlines() if x.startswith("| wide")][0]
    assert line.endswith("| +0.0 % ± 0.0 | +0.0 % ± 0.0 | - | - |")
    with pytest.raises(SystemExit, match="no reference row 'base'"):
        main(["--log", "A", f"{a}:ref=base"])
    with pytest.raises(SystemExit, match="is not KEY=VALUE"):
        main(["--log", "A", f"{a}:oops"])
