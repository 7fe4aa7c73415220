"""Triton Python-backend model that returns its inputs (the benchmark's floor ensemble).

Outputs are named like the inputs with `_out` appended (config.pbtxt).
"""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.names = [i["name"] for i in config["input"]]

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor(f"{n}_out", pb_utils.get_input_tensor_by_name(r, n).as_numpy()) for n in self.names]
            )
            for r in requests
        ]
