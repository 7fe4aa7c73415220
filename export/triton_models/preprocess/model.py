"""Triton Python-backend model `preprocess` (written by `python -m export`).

Raw interaction rows of one request -> per-session tensors, with the fitted
NVTabular workflow's semantics executed by `training.workflow.ServingTransform`
(numpy, no NVTabular executor per request). Its version directory holds a copy
of DATA/workflow/ and DATA/schema.json; ServingTransform.load checks the sha256
of the workflow files against schema.json before unpickling anything.

Each request is transformed on its own (no dynamic batching: sessions of two
requests that share a session id are never merged). A request with bad input
gets its own INVALID_ARG response naming the input; the others are answered.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from export.steps import preprocess
from training.workflow import ServingTransform


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.transform = ServingTransform.load(version_dir)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.features = json.loads(params["feature_names"])
        self.max_rows = int(params["max_request_rows"])
        self.max_sessions = int(params["max_request_sessions"])
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                columns = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                out = preprocess(columns, self.transform, self.features, self.max_rows, self.max_sessions)
            except ValueError as e:  # RequestError and training.workflow.InputError: the client's input
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            except Exception as e:  # a bug here must fail this request only, loudly
                self.logger.log_error(f"preprocess failed: {e!r}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {e!r}", pb_utils.TritonError.INTERNAL)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n]) for n in self.outputs]))
        return responses
