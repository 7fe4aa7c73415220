"""Triton Python-backend model `preprocess_stateful` (written by `python -m export`): the first step of
`session_ranker_stateful`, where the server holds each session and a request carries its newest click(s).

A sequence-batched model (config.pbtxt `sequence_batching`, strategy `oldest`): every request carries
a correlation id (the session, `sequence_id` in tritonclient) and the START/END flags; Triton keeps a
live session on one instance and refuses a non-START request for a sequence it does not know ("must
specify the START flag on the first request of the sequence"). The Python backend has no implicit
state, so this step keeps its own (sessrec_sessions.SessionStore, keyed by correlation id): the raw
rows of the session's last max_len clicks. Each request: START resets the session; the request's rows
are appended; the kept rows are transformed by the same compiled workflow and the same function as
the stateless `preprocess` step (sessrec_transform.Transform, sessrec_steps.preprocess); END forgets
the session after answering. Outputs: the model step's features [1, L], lengths [1, 1] and
`session_clicks` [1] (clicks received since START, this request's included: a client compares it
with its own count).

Bounds from config.pbtxt: the idle timeout is the sequence batcher's max_sequence_idle_microseconds
(one number for Triton and the store, which evicts idle sessions itself: Triton sends no END on
timeout); the store holds `max_live_sessions` sessions per instance (parameter; least recently used
forgotten beyond it), Triton tracks twice as many sequences (max_candidate_sequences). A click
without START for a session this instance does not hold is answered INVALID_ARG with a message that
says to resend the session's clicks with the START flag; a bad click leaves the session unchanged.

Checks its version folder (and the model folder's config.pbtxt) against sessrec_files.json before
anything of the folder is imported or read. Imports only the standard library, numpy (through the
shipped modules), triton_python_backend_utils and the files of this folder.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils
from sessrec_integrity import verify_folder


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        verify_folder(version_dir)  # before anything of this folder is imported or read
        import numpy as np
        from sessrec_sessions import SessionStore
        from sessrec_steps import (
            RequestError,
            check_raw_columns,
            json_parameter,
            preprocess,
            string_parameters,
        )
        from sessrec_transform import Transform

        self.np, self.RequestError = np, RequestError
        self.check_raw_columns, self.preprocess = check_raw_columns, preprocess
        config = json.loads(args["model_config"])
        params = string_parameters(config)
        self.transform = t = Transform.load(version_dir)
        self.inputs = [i["name"] for i in config["input"]]  # the raw inputs but the session id
        self.features = json_parameter(params, "feature_names", "preprocess_stateful")
        self.clicks_out = params["clicks_output"]
        self.outputs = [*self.features, t.lengths_name]
        for name in [*self.outputs, self.clicks_out]:
            if pb_utils.get_output_config_by_name(config, name) is None:
                raise ValueError(f"config.pbtxt of preprocess_stateful declares no output {name!r}: re-export")
        missing = [n for n in t.raw_inputs if n != t.session_col and n not in self.inputs]
        if missing or t.session_col in self.inputs:
            raise ValueError(f"config.pbtxt of preprocess_stateful: inputs {self.inputs} do not match the workflow's "
                             f"raw inputs {list(t.raw_inputs)} without {t.session_col!r}: re-export")  # fmt: skip
        self.max_rows = int(params["max_request_rows"])
        seq = config["sequence_batching"]
        self.store = SessionStore(
            {n: t.raw_inputs[n] for n in self.inputs},
            max_len=t.max_len,
            max_sessions=int(params["max_live_sessions"]),
            idle_timeout_s=int(seq["max_sequence_idle_microseconds"]) / 1e6,
        )
        self.logger = pb_utils.Logger

    def _features(self, columns):
        """The kept rows of one session -> the model step's tensors (the stateless step's function)."""
        t = self.transform
        rows = dict(columns, **{t.session_col: self.np.zeros(len(next(iter(columns.values()))), dtype=self.np.int64)})
        return self.preprocess(rows, t, self.features, self.max_rows, 1, t.session_col, t.session_col, t.lengths_name)

    def _one(self, request):
        key, flags = request.correlation_id(), request.flags()
        if key in (0, ""):  # the sequence batcher refuses these before they get here
            raise self.RequestError("no correlation id: send the session id as sequence_id")
        columns = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
        self.check_raw_columns(columns, self.inputs, self.max_rows)
        start = bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
        _, clicks, out = self.store.update(key, columns, start, check=self._features)
        if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
            self.store.end(key)
        tensors = [pb_utils.Tensor(n, out[n]) for n in self.outputs]
        tensors.append(pb_utils.Tensor(self.clicks_out, self.np.array([clicks], dtype=self.np.int64)))
        return pb_utils.InferenceResponse(tensors)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except ValueError as e:  # RequestError, InputError, SessionNotHeld: the client's to fix
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
            except Exception as e:  # a bug here must fail this request only, loudly
                self.logger.log_error(f"preprocess_stateful failed: {e!r}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess_stateful failed: {e!r}", pb_utils.TritonError.INTERNAL)))
        return responses
