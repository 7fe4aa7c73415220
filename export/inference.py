"""The inference module that is traced and served: session features in, top-k out.

    ranker = TopKRanker(model, feature_names=["item_id-list", ...], k=20)
    scores, ids = ranker(item_id_list, ..., lengths)   # [S, k] float32, [S, k] int64
    traced = trace_ranker(ranker, max_len=20)          # torch.jit.trace, saved as model.pt

Inputs are positional, in a fixed order: the feature tensors in the order of
`feature_names` (schema.json's categorical features, then its continuous
features), each [S, L] right-padded with 0, then `lengths` [S] (>= 1). The
same order names the libtorch inputs (`<feature>__<i>`) in the model repository.

Imports only torch/numpy (and the SessionModel it wraps), so the module runs in
any PyTorch environment.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from training.names import FIRST_REAL_ID, OOV_ID, SPECIAL_IDS
from training.schema import Schema


def feature_order(schema: Schema | Mapping) -> list[str]:
    """The model's positional feature order: categorical features, then continuous (schema.json order)."""
    return Schema.of(schema).features


class TopKRanker(nn.Module):
    """Wraps a SessionModel: (features..., lengths) -> (scores [S, k] float32, encoded ids [S, k] int64).

    `k` is fixed at construction and must leave room for the special ids: the
    model gives them -inf, and `k <= vocab - len(SPECIAL_IDS)` guarantees that
    top-k never reaches them (the ids returned are always >= FIRST_REAL_ID).

    Guard against out-of-range inputs, inside the traced graph (`cardinalities`
    {categorical feature: number of encoded ids} and `max_len` given): a
    categorical id outside [0, cardinality) becomes the OOV id and lengths are
    clamped to [1, max_len] before anything is indexed. For valid inputs these
    are no-ops (same scores); for bad ones the answer is the ranking of the
    clamped session instead of an out-of-range embedding lookup, which on a GPU
    is a device-side assert that poisons the whole libtorch server process. The
    libtorch step has no other place to check values; the Python-backend model
    step still answers such a request INVALID_ARG before the forward
    (sessrec_steps.check_model_inputs). No flag output: the ensemble's outputs
    stay as they are (the clamp is documented in export/README.md).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_names: Sequence[str],
        k: int,
        n_items: int,
        cardinalities: Mapping[str, int] | None = None,
        max_len: int | None = None,
    ):
        super().__init__()
        n_real = n_items - len(SPECIAL_IDS)
        if not 1 <= k <= n_real:
            raise ValueError(
                f"top-k must be in [1, {n_real}] (the item vocabulary has {n_real} real items "
                f"out of {n_items} encoded ids), got k={k}"
            )
        if not feature_names:
            raise ValueError("feature_names is empty: the model needs at least the item list feature")
        self.model = model.eval()
        self.model.prepare_ranking()  # two-stage ranking's index, built before tracing (exact: no-op)
        self.feature_names = tuple(feature_names)
        self.k = int(k)
        cards = dict(cardinalities or {})
        self.cardinalities = tuple(int(cards[n]) if n in cards else 0 for n in self.feature_names)  # 0: continuous
        self.max_len = int(max_len) if max_len else 0  # 0: no guard

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        # inputs: one [S, L] tensor per feature (in feature_names order), then lengths [S]
        feats = {}
        for name, card, x in zip(self.feature_names, self.cardinalities, inputs[:-1]):
            if card and self.max_len:  # out-of-range id -> OOV (no host sync, no data-dependent branch)
                x = torch.where((x >= 0) & (x < card), x, torch.full_like(x, OOV_ID))
            feats[name] = x
        lengths = inputs[-1]
        if self.max_len:
            lengths = lengths.clamp(1, self.max_len)
        scores, ids = self.model.next_item_topk(feats, lengths, self.k)  # [S, k] each, best first
        return scores.float(), ids.long()


def example_inputs(schema: Schema | Mapping, batch: int = 4) -> tuple[Tensor, ...]:
    """Deterministic, valid inputs in the ranker's order for tracing and warm-up.

    Session i has length 1 + (i * 7) % L; categorical ids are real ids
    (FIRST_REAL_ID <= id < the feature's cardinality); padding after `lengths` is 0."""
    schema = Schema.of(schema)
    max_len = schema.max_len
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1 + (i * 7) % max_len for i in range(batch)], dtype=torch.int64)  # [S]
    pos = torch.arange(max_len).unsqueeze(0)  # [1, L]
    real = pos < lengths.unsqueeze(1)  # [S, L]
    out = []
    for name in schema.features:
        if name in schema.categorical:
            hi = max(schema.categorical[name], FIRST_REAL_ID + 1)
            x = torch.randint(FIRST_REAL_ID, hi, (batch, max_len), generator=g)
        else:
            x = torch.rand((batch, max_len), generator=g, dtype=torch.float32)
        out.append(torch.where(real, x, torch.zeros((), dtype=x.dtype)))
    return (*out, lengths)


def trace_ranker(ranker: TopKRanker, inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """torch.jit.trace the ranker on `inputs` and check it on them; returns the traced module."""
    ranker.eval()
    with torch.no_grad():
        traced = torch.jit.trace(ranker, inputs, check_trace=False)
        # a second batch size than the one traced with: a trace that baked in the
        # batch dimension fails here rather than on the server
        half = tuple(t[: max(1, len(t) // 2)] for t in inputs)
        for args in (inputs, half):
            want_s, want_i = ranker(*args)
            got_s, got_i = traced(*args)
            if not torch.equal(want_i, got_i) or not torch.allclose(want_s, got_s, atol=1e-5, rtol=0):
                raise RuntimeError(
                    "the traced ranker disagrees with the eager one (data-dependent Python control flow "
                    "or a shape baked into the trace?)"
                )
    return traced


def baked_devices(traced: torch.jit.ScriptModule) -> set[str]:
    """Devices written into the traced graph as constants (e.g. `torch.arange(n, device=x.device)`).

    torch.jit.trace records such devices as constants: a model traced on the CPU
    that creates tensors this way fails on a GPU instance (cpu vs cuda tensors)."""
    found = set()
    graph = traced.inlined_graph  # keep a reference: the nodes die with the graph
    for node in graph.findAllNodes("prim::Constant"):
        if node.output().type().kind() == "DeviceObjType":
            match = re.search(r'value="([^"]+)"', str(node))
            if match:
                found.add(match.group(1))
    return found


DEBUG_RECORD_SUFFIX = ".debug_pkl"  # TorchScript source ranges: the exporting machine's file paths and lines


def without_debug_records(path: Path) -> Path:
    """Rewrite the TorchScript archive `path` without its `code/**.py.debug_pkl` records.

    Those records hold the source ranges of the traced graph: the absolute paths (and line
    numbers) of the export machine's checkout and site-packages, which have no place in a
    served artifact and made model.pt depend on where and from which line the export ran.
    libtorch reads them only for error messages and loads an archive without them
    (`torch.jit.load` checks for each record before reading it). The other records are
    copied unchanged, in order, through torch's own archive writer (PyTorchFileWriter: the
    archive's top folder is the file's stem, records aligned as torch writes them); it adds
    a new random `.data/serialization_id`, which `save_traced` then pins."""
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        records = [(i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in records:
        if name.endswith(DEBUG_RECORD_SUFFIX) or name == ".data/serialization_id":
            continue
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    with zipfile.ZipFile(path) as z:
        names = [i.filename for i in z.infolist()]
    if len(names) != len(set(names)) or any(n.endswith(DEBUG_RECORD_SUFFIX) for n in names):
        raise RuntimeError(f"{path}: rewriting the archive without debug records failed ({names[:5]}...)")
    return path


def save_traced(traced: torch.jit.ScriptModule, path: Path) -> Path:
    """torch.jit.save, then make the archive a function of the model only.

    The debug records (source ranges naming the export machine's files) are dropped
    (`without_debug_records`). TorchScript archives carry `<name>/.data/serialization_id`,
    40 random digits per save. It is replaced in place (same length, stored uncompressed)
    by digits derived from the other records' CRCs, and its CRC-32 is fixed in
    the local header, data descriptor and central directory. The archive's top
    folder is the file's stem, so save under the same file name (model.pt)."""
    path = Path(path)
    torch.jit.save(traced, str(path))
    without_debug_records(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    sid = [i for i in infos if i.filename.endswith("/.data/serialization_id")]
    if not sid:
        return path  # an older torch without the record: nothing to pin
    info = sid[0]
    if info.compress_type != zipfile.ZIP_STORED:
        raise RuntimeError(f"{path}: serialization_id is compressed; cannot pin it in place")
    digest = hashlib.sha256("".join(f"{i.filename}:{i.CRC};" for i in infos if i is not info).encode())
    new = str(int(digest.hexdigest(), 16)).rjust(info.file_size, "0")[: info.file_size].encode()
    old_crc, new_crc = info.CRC, zlib.crc32(new)

    def patch_crc(at: int) -> bool:
        if struct.unpack_from("<I", data, at)[0] == old_crc:
            struct.pack_into("<I", data, at, new_crc)
            return True
        return False

    off = info.header_offset
    if data[off : off + 4] != b"PK\x03\x04":
        raise RuntimeError(f"{path}: no local file header at {off}")
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    start = off + 30 + name_len + extra_len
    data[start : start + info.file_size] = new
    patch_crc(off + 14)  # local header (0 when a data descriptor follows)
    if info.flag_bits & 0x08:  # data descriptor after the data, optional signature
        dd = start + info.file_size
        patch_crc(dd + 4 if data[dd : dd + 4] == b"PK\x07\x08" else dd)
    name = info.filename.encode()
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:  # central directory entries
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + n] == name:
            if not patch_crc(pos + 16):
                raise RuntimeError(f"{path}: central directory CRC of {info.filename} not found")
            break
        pos += 4
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise RuntimeError(f"{path}: CRC check failed for {bad} after pinning serialization_id")
    return path
