"""Sessions held by the stateful preprocess step: the last clicks of every live session, bounded.

    store = SessionStore({"item_id": "int64", "age_days": "float32"}, max_len=20,
                         max_sessions=100_000, idle_timeout_s=1800.0)
    rows, clicks = store.update(key, new_rows, start=True, check=transform_rows)   # the session's kept rows
    store.end(key)                                                                 # sequence_end: forget it

The Triton Python backend has no implicit state: the step `preprocess_stateful` (a sequence-batched
model, `export/triton_models/preprocess_stateful/model.py`) keeps its own, as Triton's
`qa/python_models/sequence_py` does, keyed by the request's correlation id (`request.correlation_id()`,
an int or a str). What a session holds is the raw rows of its last `max_len` clicks (every raw input
column but the session id: raw item ids and what the workflow derives its features from) plus the
number of clicks received since its START. Because the compiled workflow is row-wise up to its
"last max_len per session" slice (Categorify, the first-seen lookup, weekday/age from the timestamp,
a group-by that keeps row order), transforming these rows gives exactly what transforming the whole
session would: the stateful answer equals the stateless one for the same clicks.

Bounds (each instance of the step, a separate process, has its own store):
- `max_sessions` live sessions at most: a new session beyond it evicts the least recently used one
  (LRU); that session's next click (without START) is refused with the message below, and the client
  resends its clicks. Triton's sequence batcher tracks twice as many sequences per instance
  (`max_candidate_sequences`), so at this cap new sessions replace old ones instead of waiting for a
  sequence slot.
- `idle_timeout_s`: a session not touched for that long is forgotten. Triton's sequence batcher frees
  the slot of a sequence idle for `max_sequence_idle_microseconds` (the same number, from the same
  config) but sends the model nothing when it does (no END), so the store evicts by itself: every
  update first drops the sessions idle longer than the timeout (oldest first, O(1) per eviction).
- memory: rows live in preallocated slabs `[max_sessions, max_len]`, one per raw column (np.zeros:
  pages are only resident once used), plus a few counters and a dict entry per session;
  `bytes_per_session()` states it.

A click for a session the store does not hold, without START, raises `SessionNotHeld` (a
ValueError, as sessrec_steps.RequestError: the step answers INVALID_ARG), whose message says "resend ... with the START flag",
like Triton's own refusal of a sequence it does not know ("must specify the START flag on the first
request of the sequence"): never a silently shorter history. START resets a session that exists.

Imports only the standard library and numpy (Python 3.10 syntax): shipped verbatim into the step's
version folder, like sessrec_steps.py.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

import numpy as np

RESEND = "resend its clicks with the START flag"  # in every "not held" message (clients match "START flag")


class SessionNotHeld(ValueError):
    """A click without START for a session this store does not hold (never started, evicted, lost).

    A ValueError like sessrec_steps.RequestError: the step answers the request INVALID_ARG."""


class SessionStore:
    """The last `max_len` raw rows of up to `max_sessions` live sessions (see the module docstring)."""

    def __init__(
        self,
        columns: Mapping[str, str],
        max_len: int,
        max_sessions: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_len < 1 or max_sessions < 1 or idle_timeout_s <= 0:
            raise ValueError(f"bad session store bounds: max_len {max_len}, max_sessions {max_sessions}, "
                             f"idle_timeout_s {idle_timeout_s}")  # fmt: skip
        self.columns = {name: np.dtype(dt) for name, dt in columns.items()}
        self.max_len, self.max_sessions, self.idle_timeout_s = int(max_len), int(max_sessions), float(idle_timeout_s)
        self.clock = clock
        # one [max_sessions, max_len] slab per raw column (np.zeros: pages resident only once written)
        self.rows = {name: np.zeros((self.max_sessions, self.max_len), dtype=dt) for name, dt in self.columns.items()}
        self.length = np.zeros(self.max_sessions, dtype=np.int32)  # rows kept per slot
        self.clicks = np.zeros(self.max_sessions, dtype=np.int64)  # clicks received since START
        self.touched = np.zeros(self.max_sessions, dtype=np.float64)  # clock() of the last update
        self.slots: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self.free = list(range(self.max_sessions - 1, -1, -1))  # slots not in use (pop() gives slot 0 first)
        self.evicted_idle = 0
        self.evicted_lru = 0

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.slots

    def bytes_per_session(self) -> int:
        """Array bytes one live session takes (rows, counters); the dict entry adds ~100-200 bytes."""
        row = sum(dt.itemsize for dt in self.columns.values())
        return self.max_len * row + self.length.itemsize + self.clicks.itemsize + self.touched.itemsize

    def evict_idle(self, now: float | None = None) -> int:
        """Forget the sessions not touched for more than idle_timeout_s; returns how many."""
        now = self.clock() if now is None else now
        limit = now - self.idle_timeout_s
        n = 0
        while self.slots:
            key, slot = next(iter(self.slots.items()))
            if self.touched[slot] >= limit:  # idle for at most the timeout: kept
                break
            self._drop(key)
            n += 1
        self.evicted_idle += n
        return n

    def _drop(self, key: Hashable) -> None:
        slot = self.slots.pop(key)
        self.length[slot] = 0
        self.clicks[slot] = 0
        self.free.append(slot)

    def end(self, key: Hashable) -> bool:
        """Forget `key` (sequence_end); True when it was held."""
        if key in self.slots:
            self._drop(key)
            return True
        return False

    def held(self, key: Hashable) -> dict[str, np.ndarray] | None:
        """The rows kept for `key` ({column: a copy}), or None."""
        slot = self.slots.get(key)
        if slot is None:
            return None
        n = self.length[slot]
        return {name: rows[slot, :n].copy() for name, rows in self.rows.items()}

    def not_held(self, key: Hashable) -> SessionNotHeld:
        return SessionNotHeld(
            f"session {key!r} is not held by this server (never started here, idle for more than "
            f"{self.idle_timeout_s:g} s, evicted by the cap of {self.max_sessions} live sessions, or the server "
            f"restarted or switched versions): {RESEND} (sequence_start=True), oldest first"
        )

    def update(
        self,
        key: Hashable,
        new_rows: Mapping[str, np.ndarray],
        start: bool,
        check: Callable[[dict[str, np.ndarray]], object] | None = None,
    ) -> tuple[dict[str, np.ndarray], int, object]:
        """Append `new_rows` (one value per click in each column, oldest first) to session `key`.

        start: reset the session first (a START for a session that exists starts it again).
        check: called with the session's rows after the update (the last max_len, as columns) before
        anything is stored; whatever it raises leaves the store as it was, and what it returns is
        passed back. Returns (those columns, clicks since START, check's result). Raises
        SessionNotHeld for a key without START that is not held."""
        now = self.clock()
        self.evict_idle(now)
        slot = self.slots.get(key)
        if slot is None and not start:
            raise self.not_held(key)
        fresh = {name: np.asarray(new_rows[name], dtype=dt) for name, dt in self.columns.items()}
        n_new = len(next(iter(fresh.values())))
        old = 0 if slot is None or start else int(self.length[slot])
        clicks = n_new + (0 if slot is None or start else int(self.clicks[slot]))
        if slot is not None and not start and old + n_new <= self.max_len:  # common: append in place, behind
            for name, rows in self.rows.items():  # the kept length (committed only after `check`)
                rows[slot, old : old + n_new] = fresh[name]
            columns = {name: rows[slot, : old + n_new] for name, rows in self.rows.items()}
        else:  # a new or restarted session, or more rows than fit: the last max_len of old + new (a copy)
            columns = {
                name: np.concatenate([rows[slot, :old], fresh[name]])[-self.max_len :] if old else fresh[name][-self.max_len :]
                for name, rows in self.rows.items()
            }  # fmt: skip
        result = check(columns) if check is not None else None
        if slot is None:
            if not self.free:  # at the cap: the least recently used session goes
                self._drop(next(iter(self.slots)))
                self.evicted_lru += 1
            slot = self.free.pop()
            self.slots[key] = slot
        else:
            self.slots.move_to_end(key)
        kept = len(next(iter(columns.values())))
        for name, rows in self.rows.items():
            if columns[name].base is not rows:
                rows[slot, :kept] = columns[name]
        self.length[slot] = kept
        self.clicks[slot] = clicks
        self.touched[slot] = now
        return columns, clicks, result
