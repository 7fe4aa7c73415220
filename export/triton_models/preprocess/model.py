"""Triton Python-backend model `preprocess` (written by `python -m export`).

Raw interaction rows of one request -> per-session tensors, with the fitted
NVTabular workflow's semantics: its compiled state (workflow.json + the .npy
files of workflow_arrays/) run by sessrec_transform.py, numpy only. Nothing is
unpickled and nothing outside this folder is imported: a stock tritonserver
(python3 + numpy) serves it.

Files of this version folder (all sha256-recorded in sessrec_files.json, checked
first in initialize): model.py, sessrec_transform.py (= training/sessrec_transform.py),
sessrec_steps.py (= export/sessrec_steps.py), sessrec_integrity.py
(= training/integrity.py), workflow.json, workflow_arrays/*.npy.

Each request is transformed on its own (no dynamic batching: sessions of two
requests that share a session id are never merged). A request with bad input
gets its own INVALID_ARG response naming the input; the others are answered.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils
from sessrec_integrity import verify_folder


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        verify_folder(version_dir)  # before anything of this folder is imported or read
        from sessrec_steps import json_parameter, preprocess, string_parameters
        from sessrec_transform import Transform

        config = json.loads(args["model_config"])
        params = string_parameters(config)
        self.transform = Transform.load(version_dir)
        self.preprocess = preprocess
        self.inputs = [i["name"] for i in config["input"]]
        self.features = json_parameter(params, "feature_names", "preprocess")
        self.session_out = params["session_output"]
        self.outputs = [self.session_out, *self.features, self.transform.lengths_name]
        for name in self.outputs:
            if pb_utils.get_output_config_by_name(config, name) is None:
                raise ValueError(f"config.pbtxt of preprocess declares no output {name!r}: re-export the repository")
        for name in self.transform.raw_inputs:
            if pb_utils.get_input_config_by_name(config, name) is None:
                raise ValueError(f"config.pbtxt of preprocess declares no input {name!r}: re-export the repository")
        self.max_rows = int(params["max_request_rows"])
        self.max_sessions = int(params["max_request_sessions"])
        self.logger = pb_utils.Logger

    def execute(self, requests):
        t = self.transform
        responses = []
        for request in requests:
            try:
                columns = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                out = self.preprocess(columns, t, self.features, self.max_rows, self.max_sessions,
                                      t.session_col, self.session_out, t.lengths_name)  # fmt: skip
            except ValueError as e:  # RequestError and sessrec_transform.InputError: the client's input
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            except Exception as e:  # a bug here must fail this request only, loudly
                self.logger.log_error(f"preprocess failed: {e!r}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {e!r}", pb_utils.TritonError.INTERNAL)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n]) for n in self.outputs]))
        return responses
