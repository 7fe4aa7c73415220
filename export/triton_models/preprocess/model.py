"""Triton Python-backend model `preprocess` (written by `python -m export`).

Raw interaction rows of one request -> per-session tensors, with the fitted
NVTabular workflow's semantics executed by `training.serving_transform.ServingTransform`
(numpy, no NVTabular executor per request). Its version directory holds a copy
of DATA/workflow/ and DATA/schema.json. Before the workflow pickle is loaded:
every file is checked against the sha256 in the repository's sessrec_export.json,
schema.json's workflow_sha256 against the one the run recorded at training time,
and (ServingTransform.load) the workflow files against schema.json. A mismatch
fails the model load with a message naming the file.

Each request is transformed on its own (no dynamic batching: sessions of two
requests that share a session id are never merged). A request with bad input
gets its own INVALID_ARG response naming the input; the others are answered.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from export.steps import IntegrityError, preprocess, verify_version_files


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # 1. every file of this version matches the sha256 recorded at export;
        # 2. schema.json's workflow_sha256 is the one the run was trained with (RUN/meta.json, via the manifest);
        # 3. ServingTransform.load checks the workflow files against schema.json, and only then unpickles.
        manifest = verify_version_files(args["model_repository"], args["model_version"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        schema = json.loads((version_dir / "schema.json").read_text())
        if manifest.get("workflow_sha256") != schema.get("workflow_sha256"):
            raise IntegrityError(
                f"{version_dir / 'schema.json'} lists other workflow files than the run was trained with "
                "(workflow_sha256 differs from sessrec_export.json): refusing to load the workflow"
            )
        from training.serving_transform import ServingTransform  # NVTabular: imported only for verified files

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
            except ValueError as e:  # RequestError and training.serving_transform.InputError: the client's input
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            except Exception as e:  # a bug here must fail this request only, loudly
                self.logger.log_error(f"preprocess failed: {e!r}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {e!r}", pb_utils.TritonError.INTERNAL)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n]) for n in self.outputs]))
        return responses
