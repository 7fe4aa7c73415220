"""Triton Python-backend model that returns its inputs: the steps of the benchmark's floor ensemble.

Output i (config.pbtxt order) is input i, unchanged: the cost measured is the
stack's alone (gRPC, ensemble scheduling, two Python-backend round trips).
"""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.pairs = list(zip([i["name"] for i in config["input"]], [o["name"] for o in config["output"]]))

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor(out, pb_utils.get_input_tensor_by_name(r, inp).as_numpy()) for inp, out in self.pairs]
            )
            for r in requests
        ]
