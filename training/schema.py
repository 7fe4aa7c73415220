"""DATA/schema.json as a typed object, loaded once and passed around.

    from training.schema import Schema
    schema = Schema.load("data/synthetic")   # DataError (a ValueError) naming the file and key
    schema.categorical                       # {"item_id-list": 507, "category-list": 174}
    schema.max_len, schema.item_feature, schema.continuous, schema.raw_inputs, schema.workflow_sha256
    schema.to_dict()                         # exactly the JSON object of the file (keys, order, values)

`training.prepare` writes the file with `Schema.to_json()`; the format is in
docs/contracts.md. Functions that used to take the dict take either
(`Schema.of(x)`), so `training.train` may keep passing `load_schema`'s dict.

Imports only the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.names import FIRST_REAL_ID, ITEM_LIST, SCHEMA_FILE


class DataError(ValueError):
    """The prepared data cannot be used; the message names the file, the column and the fix."""


# JSON key -> attribute, in the order `training.prepare` writes them.
_KEYS = {
    "max_sequence_length": "max_len",
    "min_session_length": "min_len",
    "item_list": "item_feature",
    "categorical": "categorical",
    "continuous": "continuous",
    "raw_inputs": "raw_inputs",
    "windows": "windows",
    "window_unit": "window_unit",
    "source": "source",
    "freq_threshold": "freq_threshold",
    "split": "split",
    "workflow_sha256": "workflow_sha256",
    "vocabulary_by_window": "vocabulary_by_window",
}
_REQUIRED = ("categorical", "max_sequence_length")


@dataclass(frozen=True)
class Schema:
    """DATA/schema.json. Absent optional keys read as their defaults and stay absent in `to_dict`."""

    categorical: dict[str, int]  # categorical list feature -> cardinality (encoded ids 0..n-1)
    max_len: int  # "max_sequence_length": lists hold the last <= max_len interactions
    min_len: int | None = None  # "min_session_length": shorter sessions were dropped
    item_feature: str = ITEM_LIST  # "item_list": the list feature the model ranks
    continuous: tuple[str, ...] = ()  # continuous list features, in model input order
    raw_inputs: dict[str, str] = field(default_factory=dict)  # raw column -> numpy dtype (serving inputs)
    windows: tuple[int, ...] | None = None  # window indices (None: list DATA/sessions_by_day/)
    window_unit: str | None = None  # "day" | "hour" | "week"
    source: str | None = None  # "synthetic", "diginetica", ...
    freq_threshold: int | None = None
    split: dict[str, Any] | None = None  # how sessions were assigned to train/valid/test
    workflow_sha256: dict[str, str] = field(default_factory=dict)  # DATA-relative path -> sha256
    # categorical list feature -> {window t: ids known after window t, special ids included}: ids
    # follow first appearance, so the values known at t are the ids [0, known); None (a schema.json
    # written before issue 12): everything known from the first window (`known_size`)
    vocabulary_by_window: dict[str, dict[int, int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    # the JSON keys present, in file order (None: all known keys, prepare's order)
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    # ---- reading ------------------------------------------------------- #
    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Schema:
        """DATA/schema.json, checked: DataError naming the file and the key otherwise."""
        path = Path(data_dir) / SCHEMA_FILE
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: is {data_dir} a DATA folder written by `python -m training.prepare`?"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e})") from e
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = SCHEMA_FILE) -> Schema:
        for key in _REQUIRED:
            if key not in raw:
                raise DataError(f"{where} lacks the key {key!r} (see docs/contracts.md)")
        item = raw.get("item_list", ITEM_LIST)
        if item not in raw["categorical"]:
            raise DataError(
                f"{where}: item feature {item!r} has no cardinality in 'categorical' {raw['categorical']}"
            )
        kw: dict[str, Any] = {_KEYS[k]: v for k, v in raw.items() if k in _KEYS}
        kw["categorical"] = {k: int(v) for k, v in raw["categorical"].items()}
        kw["max_len"] = int(raw["max_sequence_length"])
        if "continuous" in raw:
            kw["continuous"] = tuple(raw["continuous"])
        if "windows" in raw:
            kw["windows"] = tuple(int(w) for w in raw["windows"])
        if raw.get("vocabulary_by_window") is not None:
            vbw = raw["vocabulary_by_window"]
            unknown = sorted(set(vbw) - set(raw["categorical"]))
            if unknown:
                raise DataError(f"{where}: 'vocabulary_by_window' names features {unknown} not in 'categorical'")
            kw["vocabulary_by_window"] = {f: {int(w): int(n) for w, n in v.items()} for f, v in vbw.items()}
        if kw.get("workflow_sha256") is None:
            kw["workflow_sha256"] = {}
        extra = {k: v for k, v in raw.items() if k not in _KEYS}
        return cls(**kw, extra=extra, json_keys=tuple(raw))

    @classmethod
    def of(cls, schema: Schema | Mapping[str, Any]) -> Schema:
        """A Schema as is; a schema.json dict (e.g. `training.data.splits.load_schema`'s) parsed."""
        return schema if isinstance(schema, Schema) else cls.from_dict(schema)

    # ---- writing ------------------------------------------------------- #
    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys read (or all known keys, prepare's order), JSON types."""
        by_key = {k: getattr(self, attr) for k, attr in _KEYS.items()}
        by_key["continuous"] = list(self.continuous)
        if self.windows is not None:
            by_key["windows"] = list(self.windows)
        by_key["categorical"] = dict(self.categorical)
        if self.vocabulary_by_window is not None:
            by_key["vocabulary_by_window"] = {
                f: {str(w): n for w, n in v.items()} for f, v in self.vocabulary_by_window.items()
            }
        by_key.update(self.extra)
        keys = self.json_keys if self.json_keys is not None else [*_KEYS, *self.extra]
        return {k: by_key[k] for k in keys}

    def to_json(self) -> str:
        """schema.json's text, as `training.prepare` writes it."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    # ---- derived ------------------------------------------------------- #
    @property
    def features(self) -> list[str]:
        """The model's positional feature order: categorical features, then continuous (schema.json order)."""
        return [*self.categorical, *self.continuous]

    @property
    def item_cardinality(self) -> int:
        return self.categorical[self.item_feature]

    def known_size(self, feature: str, window: int) -> int:
        """Ids of `feature` known after window `window` (special ids included): the prefix
        [0, n) of its vocabulary. Before the first recorded window only the special ids; an old
        schema.json without "vocabulary_by_window": the whole vocabulary at every window."""
        if self.vocabulary_by_window is None or feature not in self.vocabulary_by_window:
            return self.categorical[feature]
        by_window = self.vocabulary_by_window[feature]
        done = [w for w in by_window if w <= window]
        return by_window[max(done)] if done else FIRST_REAL_ID

    def known_sizes(self, window: int) -> dict[str, int]:
        """`known_size` of every categorical feature after window `window`."""
        return {f: self.known_size(f, window) for f in self.categorical}
