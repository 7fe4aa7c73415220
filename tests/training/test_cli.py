"""training.cli: flags derived from a dataclass; defaults < config file < explicit flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from training.cli import (
    ConfigFileError,
    add_flags,
    build_parser,
    comma_list,
    command_line,
    given,
    help_meta,
    layered,
    parse,
    parse_with,
)


@dataclass
class Stage:
    out: str = field(metadata=help_meta("output folder"))
    batch_size: int = field(default=128, metadata=help_meta("batch size"))
    lr: float = field(default=1e-3, metadata=help_meta("learning rate"))
    progress: bool = field(default=True, metadata=help_meta("progress bars"))
    mode: str = field(default="a", metadata=help_meta("mode", choices=("a", "b")))
    sep: str | None = field(default=None, metadata=help_meta("separator"))
    hidden: int = field(default=7, metadata=help_meta("not a flag", cli=False))


def run(argv, tmp_path=None, file=None):
    if file is not None:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(file))
        argv = [*argv, "--config", str(path)]
    return parse(Stage, argv, prog="x", description="d", config_flag=True)


@pytest.mark.parametrize(
    "argv, file, expected",
    [
        (["--out", "o"], None, dict(batch_size=128, lr=1e-3, progress=True, mode="a", sep=None, hidden=7)),
        (["--out", "o", "--batch-size", "64"], None, dict(batch_size=64)),
        (["--out", "o"], {"batch_size": 32}, dict(batch_size=32)),
        # an explicit flag beats the file, whatever the order on the command line
        (["--batch-size", "64", "--out", "o"], {"batch_size": 32, "lr": 0.5}, dict(batch_size=64, lr=0.5)),
        (["--out", "o", "--no-progress"], {"progress": True}, dict(progress=False)),
        (["--out", "o", "--progress"], {"progress": False}, dict(progress=True)),
        (["--out", "o", "--sep", ";"], None, dict(sep=";")),
        (["--out", "o"], {"hidden": 3}, dict(hidden=3)),  # a cli=False field still comes from a file
        ([], {"out": "from-file"}, dict(out="from-file")),
    ],
)
def test_layers(tmp_path, argv, file, expected):
    cfg = run(argv, tmp_path, file)
    for k, v in expected.items():
        assert getattr(cfg, k) == v, k


@pytest.mark.parametrize(
    "argv, file, message",
    [
        (["--out", "o", "--mode", "c"], None, "invalid choice"),
        (["--out", "o", "--batch-size", "x"], None, "invalid int value"),
        (["--out", "o"], {"batch_sise": 3}, "unknown setting 'batch_sise'"),
    ],
)
def test_bad_input_names_the_setting(tmp_path, capsys, argv, file, message):
    with pytest.raises(SystemExit) as e:
        run(argv, tmp_path, file)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_hidden_field_has_no_flag(capsys):
    with pytest.raises(SystemExit):
        parse(Stage, ["--out", "o", "--hidden", "3"], prog="x", description="d")
    assert "unrecognized arguments: --hidden" in capsys.readouterr().err


def test_layered_rejects_unknown_keys():
    with pytest.raises(ConfigFileError, match="unknown setting 'nope'"):
        layered(Stage, {"out": "o"}, {"nope": 1})
    assert layered(Stage, {"out": "o", "lr": 2.0}, None, {"lr": 3.0}).lr == 3.0


def test_missing_required_setting_names_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse(Stage, [], prog="x", description="d")
    assert e.value.code == 2
    assert "missing setting 'out': give --out" in capsys.readouterr().err


@dataclass
class Inner:
    width: int = field(default=4, metadata=help_meta("width"))
    on: bool = field(default=False, metadata=help_meta("switch"))


def test_a_second_dataclass_under_a_prefix(capsys):
    p = argparse.ArgumentParser(prog="x")
    add_flags(p, Stage, defaults_text={"lr": " [from the recipe]"})
    add_flags(p, Inner, prefix="inner.", group="inner settings")
    ns = p.parse_args(["--out", "o", "--width", "8", "--on"])
    assert given(ns) == {"out": "o"}
    assert given(ns, "inner.") == {"width": 8, "on": True}
    assert layered(Inner, given(ns, "inner.")) == Inner(width=8, on=True)
    p.print_help()
    text = capsys.readouterr().out
    assert "inner settings:" in text and "[from the recipe]" in text and "width [4]" in text


@pytest.mark.parametrize(
    "text, expected", [("a,b", ("a", "b")), (" a , b ,, ", ("a", "b")), ("", ()), ("x", ("x",))]
)
def test_comma_list(text, expected):
    assert comma_list(text) == expected


@dataclass
class Listed:
    cols: tuple[str, ...] = field(default=(), metadata=help_meta("columns", parse=comma_list))
    name: str | None = field(default=None, metadata=help_meta("a name; omitted: none"))
    n: int = field(default=3, metadata=help_meta("a count"))


def test_parse_metadata_and_the_defaults_shown():
    p = build_parser(Listed, prog="x", description="d")
    assert parse_with(p, Listed, ["--cols", "a, b"]).cols == ("a", "b")
    assert parse_with(p, Listed, []) == Listed()
    text = " ".join(p.format_help().split())
    assert "a count [3]" in text  # a default worth reading is shown
    assert "[None]" not in text and "[()]" not in text  # "nothing" is said by the help text itself


def test_unreadable_config_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        parse(Stage, ["--out", "o", "--config", str(bad)], prog="x", description="d", config_flag=True)
    assert e.value.code == 2
    assert f"--config {bad}: cannot read a JSON object" in capsys.readouterr().err


@dataclass
class Repeated:
    header: list[tuple[str, str]] = field(
        default_factory=list,
        metadata=help_meta(
            "KEY=VALUE, repeatable", append=True, metavar="KEY=VALUE", parse=lambda t: tuple(t.split("=", 1))
        ),
    )
    tag: list[int] = field(default_factory=list, metadata=help_meta("an int, repeatable", append=True))
    where: Path | None = field(default=None, metadata=help_meta("a folder"))


def test_append_flags_collect_each_use_and_paths_from_a_file_are_paths(tmp_path, capsys):
    assert parse(Repeated, [], prog="x", description="d") == Repeated()
    cfg = parse(
        Repeated,
        ["--header", "a=1", "--tag", "3", "--header", "b=2=3", "--tag", "4"],
        prog="x",
        description="d",
    )
    assert cfg.header == [("a", "1"), ("b", "2=3")] and cfg.tag == [3, 4]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"where": "some/folder", "tag": [7]}))
    cfg = parse(Repeated, ["--config", str(path)], prog="x", description="d", config_flag=True)
    assert cfg.where == Path("some/folder") and cfg.tag == [7]
    with pytest.raises(SystemExit):
        parse(Repeated, ["--help"], prog="x", description="d")
    assert "--header KEY=VALUE" in capsys.readouterr().out


def test_command_line_is_parse_with_a_config_file_and_the_docstring(tmp_path, capsys):
    parse_args = command_line(Stage, "python -m stage", "Run the stage.\n\n    python -m stage --out O\n")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"out": "f", "lr": 0.5}))
    cfg = parse_args(["--config", str(path), "--lr", "0.25"])
    assert (cfg.out, cfg.lr) == ("f", 0.25)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert (
        out.startswith("usage: python -m stage")
        and "Run the stage." in out
        and "python -m stage --out" not in out
    )
