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
from training.names import OUT_ENCODED_IDS, OUT_ITEM_IDS


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        verify_version_files(args["model_repository"], args["model_version"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.vocabulary = np.load(version_dir / "item_vocabulary.npy", allow_pickle=False)
        if pb_utils.get_input_config_by_name(config, OUT_ENCODED_IDS) is None:
            raise ValueError(f"config.pbtxt of postprocess declares no input {OUT_ENCODED_IDS!r}: re-export the repository")
        if pb_utils.get_output_config_by_name(config, OUT_ITEM_IDS) is None:
            raise ValueError(f"config.pbtxt of postprocess declares no output {OUT_ITEM_IDS!r}: re-export the repository")
        self.input, self.output = OUT_ENCODED_IDS, OUT_ITEM_IDS

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
