"""Hostile and malformed input against the live ensemble (one tritonserver for the module).

A table of malformed requests, sent as raw gRPC protobuf (no client-side
checks), through tritonclient, or as raw HTTP to /v2/models/<m>/infer (JSON and
the binary-data extension). For each: the exact error class (gRPC status code
or HTTP status) and a message that names the offending input (or output,
model, field). Then: the answers to a fixed set of good requests are
byte-identical to those before, the steps' failure counters show no INTERNAL
errors, and a bad request sent straight to the model step in the same
dynamic batch as good ones fails alone.

The status codes are what tritonserver 2.51 answers; where it answers a
client's mistake with 500 (malformed JSON) the table says so.
"""

from __future__ import annotations

import http.client
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.triton_util import MAX_ROWS, MAX_SESSIONS, K
from training.names import (
    ENSEMBLE_NAME,
    LENGTHS_TENSOR,
    OUT_ENCODED_IDS,
    OUT_ITEM_IDS,
    OUT_SCORES,
    OUT_SESSION_ID,
    POSTPROCESS_MODEL,
    SESSION_COL,
    TORCH_MODEL,
)

pytestmark = pytest.mark.triton

INT64_MAX = np.iinfo(np.int64).max
DTYPES = {"i": "INT64", "f": "FP32", "b": "BOOL"}


# --- fixtures (`server`, conftest.py: the artifacts exported with triton_util.served_config) ----------
@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def sessions(interactions, schema, n: int, skip: int = 0) -> dict[str, np.ndarray]:
    sids = interactions[SESSION_COL].unique()[skip : skip + n]
    rows = interactions[interactions[SESSION_COL].isin(sids)]
    return {c: rows[c].to_numpy().astype(dt) for c, dt in schema["raw_inputs"].items()}


# --- transports -----------------------------------------------------------------------------
@dataclass
class Tensor:
    """One input as it goes on the wire: datatype, shape and raw bytes are independent (so they can disagree)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes

    @classmethod
    def of(cls, name: str, values: np.ndarray, datatype: str | None = None) -> Tensor:
        values = np.asarray(values)
        return cls(name, datatype or DTYPES[values.dtype.kind], list(values.shape), values.tobytes())


def tensors(cols: dict[str, np.ndarray]) -> list[Tensor]:
    return [Tensor.of(n, v) for n, v in cols.items()]


def grpc_infer(stub, inputs: list[Tensor], model: str = ENSEMBLE_NAME, version: str = "",
               outputs: list[str] | None = None, metadata=None):
    """Raw ModelInfer: returns ("OK", {output: array}) or (status code name, message)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for t in inputs:
        inp = req.inputs.add()
        inp.name, inp.datatype = t.name, t.datatype
        inp.shape.extend(t.shape)
        req.raw_input_contents.append(t.raw)
    for name in outputs or []:
        req.outputs.add().name = name
    try:
        resp = stub.ModelInfer(req, timeout=60, metadata=metadata)
    except grpc.RpcError as e:
        return e.code().name, e.details()
    np_types = {"INT64": np.int64, "FP32": np.float32}
    out = {}
    for o, raw in zip(resp.outputs, resp.raw_output_contents):
        out[o.name] = np.frombuffer(raw, dtype=np_types[o.datatype]).reshape(list(o.shape))
    return "OK", out


def http_post(server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def binary_body(cols: dict[str, np.ndarray], cut: int = 0, declared: dict[str, int] | None = None,
                header_delta: int = 0, outputs=(OUT_ITEM_IDS,)) -> tuple[bytes, dict[str, str]]:
    """A binary-data-extension request: JSON header, then each input's raw bytes."""
    inputs, blobs = [], b""
    for name, v in cols.items():
        raw = v.tobytes()
        inputs.append({"name": name, "shape": list(v.shape), "datatype": DTYPES[v.dtype.kind],
                       "parameters": {"binary_data_size": (declared or {}).get(name, len(raw))}})
        blobs += raw
    header = json.dumps({"inputs": inputs, "outputs": [{"name": o, "parameters": {"binary_data": False}}
                                                       for o in outputs]}).encode()
    body = header + blobs
    if cut:
        body = body[:-cut]
    return body, {"Inference-Header-Content-Length": str(len(header) + header_delta),
                  "Content-Type": "application/octet-stream"}


def json_body(cols: dict[str, np.ndarray], data_of=None, shape_of=None) -> bytes:
    inputs = []
    for name, v in cols.items():
        data = (data_of or {}).get(name, v.tolist())
        shape = (shape_of or {}).get(name, list(v.shape))
        inputs.append({"name": name, "shape": shape, "datatype": DTYPES[v.dtype.kind], "data": data})
    return json.dumps({"inputs": inputs}).encode()


# --- the table ----------------------------------------------------------------------------
def _edit(name, fn):
    """cols -> cols with column `name` replaced by fn(column)."""
    def edit(cols):
        cols = dict(cols)
        cols[name] = fn(cols[name])
        return cols

    return edit


def _set(name, value, row=0):
    def fn(v):
        v = v.copy()
        v[row] = value
        return v

    return _edit(name, fn)


def _without(name):
    return lambda cols: {k: v for k, v in cols.items() if k != name}


def _g(edit=None, retype=None, reshape=None, rebytes=None, model=ENSEMBLE_NAME, version="", outputs=None, extra=None):
    """A gRPC case: edit the good request's columns, then override datatypes/shapes/bytes per input."""
    def send(ctx):
        cols = (edit or (lambda c: c))(dict(ctx.base))
        ts = tensors(cols) + [Tensor.of(n, v) for n, v in (extra or {}).items()]
        for t in ts:
            if retype and t.name in retype:
                t.datatype, t.raw = retype[t.name](cols[t.name])
            if reshape and t.name in reshape:
                t.shape = reshape[t.name](t.shape)
            if rebytes and t.name in rebytes:
                t.raw = rebytes[t.name](t.raw)
        return grpc_infer(ctx.stub, ts, model=model, version=version, outputs=outputs)

    return send


def _direct(step_inputs):
    """A request straight to a step (not through the ensemble)."""
    def send(ctx):
        model, cols = step_inputs(ctx)
        return grpc_infer(ctx.stub, tensors(cols), model=model)

    return send


def _model_step_inputs(ctx, **override):
    """Valid model-step inputs for 2 sessions (the preprocess step's output), with overrides."""
    L = int(ctx.schema["max_sequence_length"])
    cols = {}
    for name in ctx.schema["categorical"]:
        a = np.zeros((2, L), np.int64)
        a[:, :3] = 3
        cols[name] = a
    for name in ctx.schema["continuous"]:
        cols[name] = np.zeros((2, L), np.float32)
    cols[LENGTHS_TENSOR] = np.array([[3], [3]], np.int64)
    for name, fn in override.items():
        cols[name.replace("_list", "-list")] = fn(cols[name.replace("_list", "-list")].copy())
    return TORCH_MODEL, cols


def _h(body_fn, path=f"/v2/models/{ENSEMBLE_NAME}/infer", headers=None):
    def send(ctx):
        body, hdrs = body_fn(ctx)
        status, text = http_post(ctx.server, path, body, {**hdrs, **(headers or {})})
        return status, text

    return send


def _bytes_as(datatype: str, fn=lambda v: v.tobytes()):
    return lambda v: (datatype, fn(v))


def _utf8_violating_bytes(v):
    """BYTES tensor content: per element a 4-byte length, then bytes that are not UTF-8."""
    return b"".join(struct.pack("<I", 2) + b"\xff\xfe" for _ in range(len(v)))


IA, NF, UN = "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"

# (id, send, expected status (gRPC code name or HTTP status), strings the message must contain)
CASES = [
    # wrong dtype (Triton checks the declared datatype against the config)
    ("dtype-int32-item_id", _g(retype={"item_id": _bytes_as("INT32", lambda v: v.astype(np.int32).tobytes())}),
     IA, ["'item_id'", "INT32"]),
    ("dtype-fp64-age_days", _g(retype={"age_days": _bytes_as("FP64", lambda v: v.astype(np.float64).tobytes())}),
     IA, ["'age_days'", "FP64"]),
    ("dtype-int64-weekday_sin", _g(retype={"weekday_sin": _bytes_as("INT64", lambda v: v.astype(np.int64).tobytes())}),
     IA, ["'weekday_sin'", "INT64"]),
    ("dtype-fp32-session_id", _g(retype={"session_id": _bytes_as("FP32", lambda v: v.astype(np.float32).tobytes())}),
     IA, ["'session_id'", "FP32"]),
    ("dtype-bool-category", _g(retype={"category": _bytes_as("BOOL", lambda v: (v > 0).tobytes())}),
     IA, ["'category'", "BOOL"]),
    ("dtype-bytes-non-utf8-item_id", _g(retype={"item_id": _bytes_as("BYTES", _utf8_violating_bytes)}),
     IA, ["'item_id'", "BYTES"]),
    # wrong rank
    ("rank2-item_id-Nx1", _g(reshape={"item_id": lambda s: [s[0], 1]}), IA, ["'item_id'", "shape"]),
    ("rank2-weekday_sin-1xN", _g(reshape={"weekday_sin": lambda s: [1, s[0]]}), IA, ["'weekday_sin'", "shape"]),
    ("rank0-session_id", _g(edit=_edit("session_id", lambda v: v[:1]), reshape={"session_id": lambda s: []}),
     IA, ["'session_id'"]),
    # missing / extra inputs
    ("missing-category", _g(edit=_without("category")), IA, ["'category'", "missing"]),
    ("only-session_id", _g(edit=lambda c: {"session_id": c["session_id"]}), IA, ["'item_id'", "'weekday_sin'"]),
    ("extra-input", _g(extra={"item_ids": np.arange(3)}), IA, ["'item_ids'"]),
    ("duplicate-input", _g(extra={"item_id": np.arange(3)}), IA, ["'item_id'"]),
    # byte payload disagrees with the declared shape
    ("bytes-truncated-item_id", _g(rebytes={"item_id": lambda b: b[:-3]}), IA, ["'item_id'", "byte size"]),
    ("shape-larger-than-bytes-age_days", _g(reshape={"age_days": lambda s: [s[0] + 1]}), IA, ["'age_days'"]),
    # mismatched lengths / empty
    ("item_id-one-row-short", _g(edit=_edit("item_id", lambda v: v[:-1])), IA, ["'item_id'", "rows"]),
    ("session_id-one-row-long", _g(edit=_edit("session_id", lambda v: np.append(v, v[-1]))), IA, ["'session_id'"]),
    ("zero-rows", _g(edit=lambda c: {k: v[:0] for k, v in c.items()}), IA, ["'session_id'", "0 rows"]),
    ("empty-category-column", _g(edit=_edit("category", lambda v: v[:0])), IA, ["'category'", "0 rows"]),
    # values the workflow cannot take
    ("nan-age_days", _g(edit=_set("age_days", np.nan)), IA, ["'age_days'", "finite"]),
    ("inf-weekday_sin", _g(edit=_set("weekday_sin", np.inf)), IA, ["'weekday_sin'", "finite"]),
    ("neg-inf-age_days", _g(edit=_set("age_days", -np.inf, row=-1)), IA, ["'age_days'", "finite"]),
    ("negative-item_id", _g(edit=_set("item_id", -5)), IA, ["'item_id'", "non-negative"]),
    ("negative-category", _g(edit=_set("category", -1)), IA, ["'category'", "non-negative"]),
    ("int64-min-session_id", _g(edit=_set("session_id", np.iinfo(np.int64).min)), IA, ["'session_id'", "non-negative"]),
    # over-large requests
    ("rows-over-max", lambda ctx: grpc_infer(ctx.stub, tensors({k: np.tile(v, MAX_ROWS // len(v) + 1)
                                                                 for k, v in ctx.base.items()})),
     IA, ["'session_id'", f"maximum of {MAX_ROWS}"]),
    ("sessions-over-max", lambda ctx: grpc_infer(ctx.stub, tensors(ctx.many)), IA,
     ["'session_id'", f"{MAX_SESSIONS + 1} sessions"]),
    # unknown model / version / output
    ("unknown-model", _g(model="nope"), NF, ["'nope'"]),
    ("unknown-version", _g(version="99"), NF, ["version 99"]),
    ("unknown-output", _g(outputs=["nope"]), IA, ["'nope'"]),
    ("intermediate-tensor-as-output", _g(outputs=[OUT_ENCODED_IDS]), IA, [f"'{OUT_ENCODED_IDS}'"]),
    # straight to a step, bypassing the preprocess checks
    ("model-step-id-over-cardinality", _direct(lambda ctx: _model_step_inputs(
        ctx, item_id_list=lambda a: np.where(a > 0, 10**6, 0))), IA, ["'item_id-list'", "[0, "]),
    ("model-step-negative-category", _direct(lambda ctx: _model_step_inputs(
        ctx, category_list=lambda a: -a)), IA, ["'category-list'"]),
    ("model-step-length-0", _direct(lambda ctx: _model_step_inputs(ctx, lengths=lambda a: a * 0)), IA, ["'lengths'"]),
    ("model-step-length-over-L", _direct(lambda ctx: _model_step_inputs(ctx, lengths=lambda a: a + 100)), IA,
     ["'lengths'"]),
    ("model-step-nan-feature", _direct(lambda ctx: _model_step_inputs(
        ctx, age_days_list=lambda a: a + np.nan)), IA, ["'age_days-list'", "finite"]),
    ("postprocess-special-id", _direct(lambda ctx: (POSTPROCESS_MODEL, {OUT_ENCODED_IDS: np.zeros((1, K), np.int64)})),
     IA, [f"'{OUT_ENCODED_IDS}'"]),
    # raw HTTP: binary-data extension and JSON
    ("http-binary-truncated", _h(lambda ctx: binary_body(ctx.base, cut=3)), 400, ["'weekday_sin'", "additional bytes"]),
    ("http-binary-size-not-whole-elements", _h(lambda ctx: binary_body(
        ctx.base, cut=1, declared={"weekday_sin": 4 * len(ctx.base["weekday_sin"]) - 1})), 400,
     ["'weekday_sin'", "byte size mismatch"]),
    ("http-binary-declared-larger", _h(lambda ctx: binary_body(
        ctx.base, declared={"item_id": 8 * len(ctx.base["item_id"]) + 8})), 400, ["additional bytes"]),
    ("http-header-length-past-body", _h(lambda ctx: (binary_body(ctx.base)[0],
                                                     {"Inference-Header-Content-Length": "100000000"})), 400,
     ["inference header size"]),
    ("http-json-not-json", _h(lambda ctx: (b'{"inputs": [', {})), 500, ["failed to parse the request JSON"]),
    ("http-json-data-shorter-than-shape", _h(lambda ctx: (json_body(
        ctx.base, shape_of={"item_id": [len(ctx.base["item_id"]) + 1]}), {})), 500, ["Unable to parse 'data'"]),
    ("http-json-strings-for-int64", _h(lambda ctx: (json_body(
        ctx.base, data_of={"category": ["x"] * len(ctx.base["category"])}), {})), 500, ["Unable to parse 'data'"]),
    ("http-json-non-utf8-input-name", _h(lambda ctx: (
        b'{"inputs": [{"name": "\xff\xfe", "shape": [1], "datatype": "INT64", "data": [1]}]}', {})), 400,
     ["'session_id'", "missing"]),
    ("http-json-nan-age_days", _h(lambda ctx: (json_body(
        ctx.base, data_of={"age_days": [float("nan")] * len(ctx.base["age_days"])}), {})), 400,
     ["'age_days'", "finite"]),  # Triton's JSON parser takes the NaN literal; the preprocess step refuses it
    ("http-unknown-model", _h(lambda ctx: binary_body(ctx.base), path="/v2/models/nope/infer"), 404, ["'nope'"]),
    ("http-model-name-traversal", _h(lambda ctx: binary_body(ctx.base), path="/v2/models/..%2Fmodel/infer"), 404,
     ["..%2Fmodel"]),
    ("http-unknown-version", _h(lambda ctx: binary_body(ctx.base), path=f"/v2/models/{ENSEMBLE_NAME}/versions/99/infer"),
     404, ["version 99"]),
    ("http-rows-over-max", _h(lambda ctx: binary_body({k: np.tile(v, MAX_ROWS // len(v) + 1)
                                                       for k, v in ctx.base.items()})), 400,
     ["'session_id'", f"maximum of {MAX_ROWS}"]),
    # the restricted APIs without the admin key
    ("http-unload-without-key", lambda ctx: http_post(ctx.server, f"/v2/repository/models/{TORCH_MODEL}/unload", b"{}"),
     403, ["sessrec-admin-key"]),
    ("http-load-with-wrong-key", lambda ctx: http_post(
        ctx.server, f"/v2/repository/models/{TORCH_MODEL}/load", b"{}", {"sessrec-admin-key": "guess"}),
     403, ["sessrec-admin-key"]),
    ("http-shared-memory-without-key", lambda ctx: http_post(
        ctx.server, "/v2/systemsharedmemory/region/x/register", json.dumps(
            {"key": "/triton_python_backend_shm_region_x", "offset": 0, "byte_size": 8}).encode()),
     403, ["sessrec-admin-key"]),
    ("http-logging-without-key", lambda ctx: http_post(ctx.server, "/v2/logging", b'{"log_verbose_level": 1}'),
     403, ["sessrec-admin-key"]),
    ("grpc-unload-without-key", lambda ctx: _grpc_unload(ctx.stub), UN, ["restricted", "sessrec-admin-key"]),
]


def _grpc_unload(stub):
    try:
        stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=TORCH_MODEL), timeout=30)
    except grpc.RpcError as e:
        return e.code().name, e.details()
    return "OK", None


@dataclass
class Ctx:
    server: object
    stub: object
    schema: dict
    base: dict  # a good request: 2 real sessions
    many: dict  # MAX_SESSIONS + 1 real sessions


@pytest.fixture(scope="module")
def ctx(server, stub, schema, interactions):
    return Ctx(server, stub, schema, sessions(interactions, schema, 2), sessions(interactions, schema, MAX_SESSIONS + 1))


@pytest.fixture(scope="module")
def good_requests(interactions, schema):
    """Fixed good requests: 1, 3 and 64 sessions (different sessions), and one with unknown/huge ids."""
    huge = sessions(interactions, schema, 2, skip=200)
    huge["item_id"] = huge["item_id"].copy()
    huge["item_id"][-1] = INT64_MAX
    huge["session_id"] = np.where(huge["session_id"] == huge["session_id"][0], INT64_MAX, 0).astype(np.int64)
    return {
        "1": sessions(interactions, schema, 1, skip=100),
        "3": sessions(interactions, schema, 3, skip=110),
        "64": sessions(interactions, schema, 64, skip=120),
        "huge-ids": huge,
    }


@pytest.fixture(scope="module")
def answers_before(stub, good_requests):
    out = {}
    for name, cols in good_requests.items():
        status, answer = grpc_infer(stub, tensors(cols))
        assert status == "OK", (name, answer)
        out[name] = answer
    return out


def test_endpoints_listen_on_loopback_only(server):
    """The server's three ports are bound to 127.0.0.1 (the default), per the kernel's socket table."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.rsplit(":", 1)
                listening.setdefault(int(port, 16), set()).add(addr)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6 (metrics)
    for port in (server.grpc_port, server.http_port, server.metrics_port):
        assert listening.get(port) and listening[port] <= loopback, (port, listening.get(port))


def test_table_is_large_enough():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


def test_good_requests_are_answered(answers_before, good_requests):
    for name, answer in answers_before.items():
        n_sessions = len(np.unique(good_requests[name][SESSION_COL]))
        assert answer[OUT_ITEM_IDS].shape == (n_sessions, K) and answer[OUT_SCORES].shape == (n_sessions, K), name
    # unknown/huge raw ids are valid input: OOV, ranked like any other unknown id
    huge = answers_before["huge-ids"]
    assert huge[OUT_SESSION_ID].tolist() == [INT64_MAX, 0]


@pytest.mark.parametrize("send, expected, contains", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request(ctx, answers_before, send, expected, contains):
    status, message = send(ctx)
    assert status == expected, f"{status}: {message}"
    for text in contains:
        assert text in message, f"{text!r} not in: {message}"


def test_answers_unchanged_after_every_malformed_request(stub, good_requests, answers_before, ctx):
    """Runs after the table (file order): the same good requests give byte-identical answers."""
    for name, cols in good_requests.items():
        status, answer = grpc_infer(stub, tensors(cols))
        assert status == "OK", (name, answer)
        assert answer.keys() == answers_before[name].keys()
        for out in answer:
            assert answer[out].tobytes() == answers_before[name][out].tobytes(), (name, out)


def test_no_step_failed_internally(server):
    """Every refusal above was a per-request answer: no step raised or logged a failure of its own."""
    assert server.proc.poll() is None
    log = server.log_path.read_text(errors="replace")
    for text in ("model step failed", "preprocess failed", "Failed to process the request", "is not healthy"):
        assert text not in log, text


def test_bad_direct_request_fails_alone_in_a_dynamic_batch(ctx, server, good_requests, answers_before):
    """Bad requests straight to the model step, in flight with good ensemble requests: the good ones are answered
    (the model step checks each request of a batch on its own instead of failing the batch)."""
    bad = tensors(_model_step_inputs(ctx, item_id_list=lambda a: np.where(a > 0, 10**6, 0))[1])

    def one(i):
        channel = grpc.insecure_channel(server.grpc_url)
        try:
            s = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            if i % 2:
                return grpc_infer(s, bad, model=TORCH_MODEL)
            return grpc_infer(s, tensors(good_requests["3"]))
        finally:
            channel.close()

    for _ in range(3):
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(16)))
        for i, (status, answer) in enumerate(results):
            if i % 2:
                assert status == IA and "'item_id-list'" in answer, answer
            else:
                assert status == "OK", answer
                assert answer[OUT_ITEM_IDS].tobytes() == answers_before["3"][OUT_ITEM_IDS].tobytes()
