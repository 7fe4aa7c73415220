"""Triton Python-backend model `postprocess` (written by `python -m export`).

Encoded item ids [S, k] from the model step -> raw item ids [S, k], through
the fitted Categorify vocabulary saved at export as `item_vocabulary.npy`
(index = encoded id, value = raw id). Clients never see internal ids.
The version directory is checked against the export manifest before loading
(export.steps.verify_version_files); the .npy is read with allow_pickle=False.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from export.steps import to_raw_item_ids, verify_version_files


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        verify_version_files(args["model_repository"], args["model_version"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.vocabulary = np.load(version_dir / "item_vocabulary.npy", allow_pickle=False)
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            try:
                raw = to_raw_item_ids(self.vocabulary, encoded)
            except ValueError as e:  # ids outside the vocabulary: from a client calling this step directly
                err = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, raw)]))
        return responses
