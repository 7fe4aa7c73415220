"""Non-neural baselines, evaluated on exactly the model's evaluation sessions.

Counts come from the training sessions of every window <= t (added window by
window with `BaselineCounts.add_sessions`):

* popular:       score = number of occurrences of the item in training sessions;
* cooc_knn:      score = number of training sessions in which the candidate
                 appears together with the input's last item (for the last
                 item itself: sessions where it appears at least twice),
                 ties broken by popularity;
* successor_knn: score = how often the candidate directly followed the input's
                 last item in a training session, ties broken by popularity;
* vsknn:         V-SKNN, the vector-multiplication session-based kNN of Ludewig &
                 Jannach 2018 ("Evaluation of session-based recommendation
                 algorithms", UMUAI 28), as session-rec's `algorithms/knn/vsknn.py`
                 (class VMContextKNN) computes it with the defaults of its docstring:
                 k=100, sample_size=500 (the constructor's own default is 1000),
                 sampling='recent', weighting='div', weighting_score='div',
                 dwelling_time=False, remind=True (see `BaselineCounts.vsknn_neighbours`
                 and `vsknn_scores`), ties broken by popularity.

V-SKNN for an input x_1..x_n (n clicks):
  1. position weight of a distinct input item i (weighting 'div'): w_i = p_i / n,
     p_i the 1-based position of its last click (later items count more, the
     last item 1);
  2. candidates: the training sessions containing any input item; when there
     are more than sample_size, the sample_size most recent (sampling 'recent':
     later windows, and later rows of a window, are more recent; session-rec uses
     each session's last timestamp, the splits keep none inside a window, whose
     rows are in session-id order);
  3. similarity of a candidate s (session-rec's `vec`, the dot product of the
     weighted input vector with s's binary item vector, over the number of
     distinct input items d): sim(s) = sum_{i in s} w_i / d. The `similarity`
     setting ('cosine') is not read by session-rec's VMContextKNN: its
     `calc_similarity` always calls `vec`;
  4. neighbours: the k candidates of highest sim (ties: the more recent first;
     session-rec leaves them to set order);
  5. item score (weighting_score 'div', remind=True: input items are scored
     too): score(c) = sum over neighbours s containing c of sim(s) / step(s),
     step(s) = n - p + 1 for the latest input item found in s (1 = the last
     click). session-rec's final division by the maximum (normalize) changes
     no ranking and is left out.
Only real items take part (special ids are neither query items nor neighbour
items, but still count as clicks for p and n); items outside every neighbour
score 0 and are ordered by popularity.

Special ids (pad, null, OOV) are never ranked; items never seen in training
get -inf and a target never seen in training counts as a miss (rank +inf).
An input with no item (a one-click session) falls back to popularity.
Vectorised with numpy / scipy.sparse (V-SKNN included: no Python loop over
sessions); scores are built in chunks of sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from training.metrics import metrics_from_ranks, pessimistic_ranks_np
from training.names import FIRST_REAL_ID, PAD_ID

BASELINES = ("popular", "cooc_knn", "successor_knn", "vsknn")
VSKNN_K = 100  # neighbours kept (session-rec VMContextKNN docstring default)
VSKNN_SAMPLE_SIZE = 500  # most recent candidate sessions (idem)
HOP2_BRIDGE = 5  # two-hop fill: the bridging item's strongest co-occurrences followed (`two_hop_fill`)
HOP2_MOST = 10  # two-hop fill: two-hop items per row at most
HOP2_CHUNK = 8192  # two-hop fill: rows per sparse product


def _valid(items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.arange(items.shape[1])[None, :] < lengths[:, None]  # (N, L)


class BaselineCounts:
    """Cumulative item statistics over the training sessions added so far.

    Besides the counts, V-SKNN's session index: the real items of every training
    session (one binary CSR block per `add_sessions` call, in the order added =
    recency order), stacked into session -> items and item -> sessions matrices
    the first time V-SKNN needs them after new sessions were added.
    """

    def __init__(
        self,
        n_items: int,
        vsknn_k: int = VSKNN_K,
        vsknn_sample_size: int = VSKNN_SAMPLE_SIZE,
        sessions: bool = True,
    ):
        """`sessions=False`: counts only, no V-SKNN session index (the item memory's tables need
        none, and at 1M items the index is a large part of the training process's memory)."""
        if vsknn_k < 1 or vsknn_sample_size < 1:
            raise ValueError(
                f"vsknn_k and vsknn_sample_size must be >= 1, got {vsknn_k} and {vsknn_sample_size}"
            )
        self.n_items = n_items
        self.vsknn_k = vsknn_k
        self.vsknn_sample_size = vsknn_sample_size
        self.keeps_sessions = sessions
        self._session_blocks: list[sp.csr_matrix] = []  # (n_w, V) binary, real items only
        self._index: tuple[sp.csr_matrix, sp.csr_matrix] | None = None  # (S, V), (V, S)
        self.pop = np.zeros(n_items, dtype=np.int64)  # (V,)
        self.cooc = sp.csr_matrix((n_items, n_items), dtype=np.int64)  # (V, V)
        self.succ = sp.csr_matrix((n_items, n_items), dtype=np.int64)  # (V, V)
        self.n_sessions = 0

    def add_sessions(self, items: np.ndarray, lengths: np.ndarray) -> None:
        """Add N right-padded training sessions: items (N, L) encoded ids, lengths (N,)."""
        items = np.asarray(items, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        n, L = items.shape
        V = self.n_items
        valid = _valid(items, lengths)
        rows = np.broadcast_to(np.arange(n)[:, None], (n, L))[valid]
        vals = items[valid]
        self.pop += np.bincount(vals, minlength=V)
        # session x item occurrence counts, then binary presence
        occ = sp.csr_matrix((np.ones(vals.size, dtype=np.int64), (rows, vals)), shape=(n, V))
        occ.sum_duplicates()
        present = occ.copy()
        present.data[:] = 1
        cooc = (present.T @ present).tocsr()  # (V, V) sessions containing both (diag: containing the item)
        repeated = np.asarray((occ >= 2).sum(0)).ravel().astype(np.int64)  # sessions with the item twice
        cooc = cooc - sp.diags(cooc.diagonal()) + sp.diags(repeated)
        self.cooc = (self.cooc + cooc).tocsr()
        # successor pairs (t -> t+1) inside each session
        nxt = valid[:, 1:] & valid[:, :-1]
        a, b = items[:, :-1][nxt], items[:, 1:][nxt]
        succ = sp.csr_matrix((np.ones(a.size, dtype=np.int64), (a, b)), shape=(V, V))
        succ.sum_duplicates()
        self.succ = (self.succ + succ).tocsr()
        self.n_sessions += n
        if not self.keeps_sessions:
            return
        # V-SKNN: the session's set of real items; session ids continue from earlier calls
        real = vals >= FIRST_REAL_ID
        block = sp.csr_matrix(
            (np.ones(int(real.sum()), dtype=np.int8), (rows[real], vals[real])), shape=(n, V)
        )
        block.sum_duplicates()
        block.data[:] = 1
        self._session_blocks.append(block)
        self._index = None

    def scale(self, g: float) -> None:
        """Every count so far times g (the item memory's window decay, ModelConfig.memory_window_decay):
        pop, cooc and succ become float64 and later sessions add 1 each to them. V-SKNN's session
        index is not weighted."""
        self.pop = self.pop.astype(np.float64) * g
        self.cooc = (self.cooc.astype(np.float64) * g).tocsr()
        self.succ = (self.succ.astype(np.float64) * g).tocsr()

    def _session_index(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(S, V) session -> items, and (V, S) item -> its sample_size most recent sessions.

        Session index = recency (added later = more recent). Keeping only each item's
        sample_size most recent sessions is exact for V-SKNN: a session among the
        sample_size most recent candidates of an input is among the sample_size most
        recent sessions of each input item it contains.
        """
        if not self.keeps_sessions:
            raise ValueError("V-SKNN needs the session index: these counts were built with sessions=False")
        if self._index is None:
            by_session = (
                sp.vstack(self._session_blocks, format="csr")
                if self._session_blocks
                else sp.csr_matrix((0, self.n_items), dtype=np.int8)
            )
            self._session_blocks = [by_session]  # compacted: the next add stacks two blocks
            by_item = by_session.T.tocsr()
            by_item.sort_indices()
            per = np.diff(by_item.indptr)
            rank_from_end = np.repeat(by_item.indptr[1:], per) - 1 - np.arange(by_item.nnz)
            recent = by_item.copy()
            recent.data = (rank_from_end < self.vsknn_sample_size).astype(np.int64)
            recent.eliminate_zeros()
            self._index = (by_session, recent)
        return self._index

    def _vsknn(
        self, items: np.ndarray, lengths: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Neighbours (see `vsknn_neighbours`), the number of items of each neighbour, and those items in turn."""
        items = np.asarray(items, dtype=np.int64)
        n = np.asarray(lengths, dtype=np.int64)
        B, L = items.shape
        V = self.n_items
        by_session, recent = self._session_index()
        S = by_session.shape[0]
        # 1. distinct real input items with the 1-based position of their last click
        pos = np.arange(1, L + 1)[None, :]  # (1, L)
        q_row, q_col = np.nonzero((pos <= n[:, None]) & (items >= FIRST_REAL_ID))
        q_key = q_row * V + items[q_row, q_col]  # (input, item)
        q_pos = q_col + 1
        order = np.lexsort((q_pos, q_key))
        q_key, q_pos = q_key[order], q_pos[order]
        last = np.ones(q_key.size, dtype=bool)  # the last click of each (input, item)
        last[:-1] = q_key[1:] != q_key[:-1]
        q_key, q_pos = q_key[last], q_pos[last]  # sorted, unique
        n_distinct = np.bincount(q_key // V, minlength=B)  # d
        # 2. candidates: per input, sum of the positions of its items in each training session
        query = sp.csr_matrix((q_pos, (q_key // V, q_key % V)), shape=(B, V))
        cand = (query @ recent).tocsc().tocsr()  # (B, S) int64; the round trip sorts each row's indices
        c_row = np.repeat(np.arange(B), np.diff(cand.indptr))
        # recency sample: the sample_size largest session indices of each row
        rank_from_end = cand.indptr[c_row + 1] - 1 - np.arange(cand.nnz)
        keep = rank_from_end < self.vsknn_sample_size
        c_row, c_sess, c_sum = c_row[keep], cand.indices[keep].astype(np.int64), cand.data[keep]
        # 3-4. top-k by similarity (the integer sum of positions: exact ties), then recency:
        # one key per candidate, laid out as (B, sample_size) to sort each row with numpy
        width = min(self.vsknn_sample_size, int(np.bincount(c_row, minlength=B).max(initial=0)))
        slot = rank_from_end[keep]
        table = np.full((B, max(width, 1)), -1, dtype=np.int64)
        table[c_row, slot] = c_sum * max(S, 1) + c_sess  # unique within a row
        table = -np.sort(-table, axis=1)[:, : self.vsknn_k]  # descending
        nb_row, nb_col = np.nonzero(table >= 0)  # row-major: by input, then similarity desc
        key = table[nb_row, nb_col]
        nb_sess, nb_sum = key % max(S, 1), key // max(S, 1)
        sim = nb_sum / (n[nb_row] * n_distinct[nb_row]).astype(np.float64)  # sum_i (p_i / n) / d
        # 5. the neighbours' items; the position of each in the input (0: not in the input)
        per = np.diff(by_session.indptr)[nb_sess]
        flat = np.repeat(by_session.indptr[nb_sess] - np.cumsum(per) + per, per) + np.arange(int(per.sum()))
        e_item = by_session.indices[flat].astype(np.int64)
        e_key = np.repeat(nb_row, per) * V + e_item
        at = np.minimum(np.searchsorted(q_key, e_key), max(q_key.size - 1, 0))
        e_pos = np.where(q_key[at] == e_key, q_pos[at], 0) if q_key.size else np.zeros(0, dtype=np.int64)
        starts = np.cumsum(per) - per  # every neighbour holds >= 1 input item
        latest = np.maximum.reduceat(e_pos, starts) if nb_row.size else np.zeros(0, dtype=np.int64)
        nb = dict(row=nb_row, session=nb_sess, sim=sim, step=n[nb_row] - latest + 1)
        return nb, per, e_item

    def vsknn_neighbours(self, items: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The V-SKNN neighbours of B right-padded input sessions (module docstring, steps 1-4).

        items (B, L) encoded ids, lengths (B,) clicks. Returns flat arrays over all
        (input, neighbour) pairs, ordered by input then similarity (descending):
        row (input index), session (training session index, larger = more recent),
        sim (float64), step (int64, 1 = the input's last click is in the neighbour).
        """
        return self._vsknn(items, lengths)[0]

    def vsknn_scores(self, items: np.ndarray, lengths: np.ndarray) -> sp.csr_matrix:
        """(B, L) inputs, (B,) clicks -> (B, V) V-SKNN item scores, 0 outside the neighbours (step 5)."""
        nb, per, e_item = self._vsknn(items, lengths)
        contrib = np.repeat(nb["sim"] / nb["step"], per)
        s = sp.csr_matrix((contrib, (np.repeat(nb["row"], per), e_item)), shape=(len(lengths), self.n_items))
        s.sum_duplicates()
        return s

    def scores(
        self, name: str, last_items: np.ndarray, inputs: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """(B,) last input item (PAD_ID if the input is empty) -> (B, V) float64 scores.

        vsknn reads the whole input: inputs = (items (B, L), input lengths (B,)). Its
        scores are ordinal: the dense rank of the V-SKNN score among the row's
        non-zero scores (equal up to 1e-12 relative: one level) plus the popularity
        tie-breaker, so they rank exactly as (V-SKNN score, popularity);
        `vsknn_scores` gives the scores themselves.
        """
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
        pop = self.pop.astype(np.float64)
        tie = pop / (pop.max() + 1.0)  # in [0, 1): breaks ties of integer counts by popularity
        b = len(last_items)
        if name == "popular":
            s = np.broadcast_to(pop, (b, self.n_items)).copy()
        elif name == "vsknn":
            if inputs is None:
                raise ValueError(
                    "vsknn reads the whole input session: pass inputs=(items (B, L), lengths (B,))"
                )
            if len(inputs[1]) != b:
                raise ValueError(f"inputs hold {len(inputs[1])} sessions, last_items {b}")
            s = np.broadcast_to(tie, (b, self.n_items)).copy()
            raw = self.vsknn_scores(*inputs).tocoo()  # every stored value > 0
            if raw.nnz:
                row_max = np.asarray(raw.max(axis=1).todense()).ravel()
                key = np.round(raw.data / row_max[raw.row], 12)
                order = np.lexsort((key, raw.row))
                r, c, key = raw.row[order], raw.col[order], key[order]
                new_row = np.r_[True, r[1:] != r[:-1]]
                level = np.cumsum(np.r_[True, new_row[1:] | (key[1:] != key[:-1])])
                level = level - np.maximum.accumulate(np.where(new_row, level, 0)) + 1  # 1.. within each row
                s[r, c] += level
        else:
            mat = self.cooc if name == "cooc_knn" else self.succ
            s = mat[last_items].toarray().astype(np.float64) + tie[None, :]
            s[last_items == PAD_ID] = tie  # no input item: popularity
        s[:, self.pop == 0] = -np.inf  # never seen in training
        s[:, :FIRST_REAL_ID] = -np.inf  # special ids are never ranked
        return s

    def ranks(
        self,
        name: str,
        last_items: np.ndarray,
        targets: np.ndarray,
        chunk: int | None = None,
        inputs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Pessimistic rank of each target (+inf when the target was never seen in training).

        Scores are built `chunk` sessions at a time (default: ~4M scores, 32 MB);
        `inputs` = (items (N, L), input lengths (N,)) for vsknn (see `scores`).
        """
        chunk = chunk or max(1, 4_000_000 // self.n_items)
        last_items = np.asarray(last_items, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        out = np.empty(len(targets), dtype=np.float64)
        for i in range(0, len(targets), chunk):
            part = None if inputs is None else (inputs[0][i : i + chunk], inputs[1][i : i + chunk])
            s = self.scores(name, last_items[i : i + chunk], part)
            out[i : i + chunk] = pessimistic_ranks_np(s, targets[i : i + chunk])
        out[(self.pop[targets] == 0) | (targets < FIRST_REAL_ID)] = np.inf
        return out


def last_input_items(items: np.ndarray, input_lengths: np.ndarray) -> np.ndarray:
    """(N, L) items, (N,) input lengths -> (N,) last input item, PAD_ID for an empty input."""
    items = np.asarray(items, dtype=np.int64)
    lengths = np.asarray(input_lengths, dtype=np.int64)
    last = items[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    return np.where(lengths > 0, last, PAD_ID)


def evaluate_baselines(
    counts: BaselineCounts,
    input_items: np.ndarray,
    input_lengths: np.ndarray,
    targets: np.ndarray,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of every baseline on the evaluation sessions (inputs = all but the last item);
    ranks_out: filled with each baseline's (N,) target ranks too."""
    last = last_input_items(input_items, input_lengths)
    inputs = (np.asarray(input_items, dtype=np.int64), np.asarray(input_lengths, dtype=np.int64))
    ranks = {name: counts.ranks(name, last, targets, inputs=inputs) for name in BASELINES}
    if ranks_out is not None:
        ranks_out.update(ranks)
    return {name: metrics_from_ranks(r) for name, r in ranks.items()}


def _top_k_rows(mat: sp.csr_matrix, k: int, tie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of every row of a count matrix by (count, tie): (V, k) int32 ids, (V, k) float32 counts.

    Rows with fewer than k entries are padded with column PAD_ID and count 0.
    """
    mat = mat.tocsr()
    mat.sum_duplicates()
    n = mat.shape[0]
    rows = np.repeat(np.arange(n), np.diff(mat.indptr))
    cols, vals = mat.indices, mat.data.astype(np.float64)
    order = np.lexsort((-tie[cols], -vals, rows))  # by row, then count desc, then popularity desc
    rows, cols, vals = rows[order], cols[order], vals[order]
    rank = np.arange(rows.size) - mat.indptr[rows]
    keep = (rank < k) & (vals > 0)
    idx = np.full((n, k), PAD_ID, dtype=np.int32)
    val = np.zeros((n, k), dtype=np.float32)
    idx[rows[keep], rank[keep]] = cols[keep]
    val[rows[keep], rank[keep]] = vals[keep]
    return idx, val


def memory_tables(counts: BaselineCounts, k: int, hop2: float = 0.0) -> dict[str, np.ndarray]:
    """The count tables of the model's ItemMemory (training/model/item_memory.py) from the training counts.

    cooc_idx/cooc_val: per item the k items co-occurring in most training sessions
    (same definition as cooc_knn), succ_idx/succ_val: the k most frequent direct
    successors (successor_knn), pop: occurrences (popular); ties by popularity.
    hop2 > 0: a co-occurrence row with free slots is filled with two-hop items (`two_hop_fill`).
    """
    return dict(iter_memory_tables(counts, k, hop2=hop2))


def iter_memory_tables(
    counts: BaselineCounts, k: int, release: bool = False, hop2: float = 0.0
) -> Iterator[tuple[str, np.ndarray]]:
    """`memory_tables` one (name, table) at a time, in the same order.

    release=True drops each count matrix from `counts` once its tables are built (the counts
    are then spent): at 1M items the (V, K) tables and the sparse counts they come from
    dominate the training process's peak RSS, so a caller that copies each table and drops
    it before asking for the next one holds one count matrix and one table at a time."""
    tie = counts.pop.astype(np.float64)
    pop = counts.pop.astype(np.float32)
    for name in ("cooc", "succ"):
        tables = _top_k_rows(getattr(counts, name), k, tie)
        if release:
            setattr(counts, name, None)
        if name == "cooc" and hop2 > 0:
            tables = two_hop_fill(*tables, hop2, tie)
        yield f"{name}_idx", tables[0]
        yield f"{name}_val", tables[1]
        del tables
    yield "pop", pop


def two_hop_fill(
    idx: np.ndarray,
    val: np.ndarray,
    weight: float,
    tie: np.ndarray,
    bridge: int = HOP2_BRIDGE,
    most: int = HOP2_MOST,
) -> tuple[np.ndarray, np.ndarray]:
    """Co-occurrence table (V, K) ids and counts (`_top_k_rows`, count-descending rows) -> the same
    with each row's free slots (a row holds all of its item's co-occurring items when it has
    fewer than K) filled with up to `most` of the item's best **two-hop** items: items z that
    never occur in a training session with item a but with an item y that does, scored
    s(z) = sum_y log1p(cooc[a, y]) * log1p(cooc[y, z]) over a's co-occurring y and each y's
    `bridge` strongest z (its first table entries), best first (ties by popularity `tie`). Their
    pseudo-count is weight * s(z) / max_z s(z), in (0, weight]: with weight <= 1 never more than one real
    co-occurrence, so every two-hop item ranks below the item's own co-occurring ones on the
    co-occurrence term. Self and the special ids are never filled in. New arrays; the inputs
    are not changed. Cost: one sparse product per HOP2_CHUNK rows."""
    V, K = idx.shape
    filled = val > 0
    n = filled.sum(1)  # (V,) real entries per row, all at its front
    r, c = np.nonzero(filled)
    ids = idx[r, c].astype(np.int64)
    w = np.log1p(val[r, c].astype(np.float64))
    other = ids != r  # an item's count with itself (it occurred twice in a session) bridges nothing
    first = sp.csr_matrix((w[other], (r[other], ids[other])), shape=(V, V))
    near = other & (c < bridge)
    second = sp.csr_matrix((w[near], (r[near], ids[near])), shape=(V, V))
    idx, val = idx.copy(), val.copy()
    todo = np.nonzero((n > 0) & (n < K))[0]
    big = float(np.abs(first.data).sum() * max(first.data.max(initial=0.0), 1.0) + 1.0) if first.nnz else 1.0
    for s in range(0, todo.size, HOP2_CHUNK):
        rows = todo[s : s + HOP2_CHUNK]
        b = rows.size
        hop = first[rows] @ second  # (b, V): two-hop scores (one-hop and self among them)
        one = first[rows].copy()
        one.data[:] = big
        own = sp.csr_matrix((np.full(b, big), (np.arange(b), rows)), shape=(b, V))
        hop = (hop - one - own).tocsr()  # one-hop items and self go negative
        hop.sum_duplicates()
        hr = np.repeat(np.arange(b), np.diff(hop.indptr))
        # rounded: equal scores summed in another order must tie (then popularity decides); a score that
        # rounds to 0 (weighted counts far below one: bench.count_fusion's decay) is none
        rounded = np.round(hop.data, 9)
        keep = (rounded > 0) & (hop.indices >= FIRST_REAL_ID)
        hr, hc, hv = hr[keep], hop.indices[keep].astype(np.int64), rounded[keep]
        order = np.lexsort((-tie[hc], -hv, hr))  # by row, then score desc, then popularity desc
        hr, hc, hv = hr[order], hc[order], hv[order]
        rank = np.arange(hr.size) - np.searchsorted(hr, hr)  # place within its row
        a = rows[hr]
        room = np.minimum(K - n[a], most)
        sel = rank < room
        hr, hc, hv, rank, a = hr[sel], hc[sel], hv[sel], rank[sel], a[sel]
        top = np.zeros(b)
        np.maximum.at(top, hr, hv)
        idx[a, n[a] + rank] = hc
        val[a, n[a] + rank] = weight * hv / top[hr]
    return idx, val
