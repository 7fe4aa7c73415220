"""Triton Python-backend model `postprocess` (written by `python -m export`).

Encoded item ids [S, k] from the model step -> raw item ids [S, k], through
the fitted Categorify vocabulary saved at export as `item_vocabulary.npy`
(index = encoded id, value = raw id). Clients never see internal ids.
The version folder is checked against its sessrec_files.json before anything
is loaded; the .npy is read with allow_pickle=False. Imports only the standard
library, numpy, triton_python_backend_utils and the files of this folder
(sessrec_steps.py, sessrec_integrity.py). Tensor names and the first real id
come from config.pbtxt.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from sessrec_integrity import verify_folder


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        verify_folder(version_dir)
        from sessrec_steps import string_parameters, to_raw_item_ids

        config = json.loads(args["model_config"])
        params = string_parameters(config)
        self.to_raw_item_ids = to_raw_item_ids
        self.vocabulary = np.load(version_dir / "item_vocabulary.npy", allow_pickle=False)
        self.first_real_id = int(params["first_real_id"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]
        if pb_utils.get_input_config_by_name(config, self.input) is None or pb_utils.get_output_config_by_name(config, self.output) is None:
            raise ValueError("config.pbtxt of postprocess is inconsistent: re-export the repository")

    def execute(self, requests):
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            try:
                raw = self.to_raw_item_ids(self.vocabulary, encoded, self.first_real_id, self.input)
            except ValueError as e:  # ids outside the vocabulary: from a client calling this step directly
                err = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, raw)]))
        return responses
