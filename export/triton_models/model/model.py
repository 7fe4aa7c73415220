"""Triton Python-backend model `model` (written by `python -m export`).

Runs the traced TopKRanker (`model.pt`, torch.jit.load) on the embedded
tritonserver, which has no libtorch backend. Dynamic batching over sessions:
the requests of one batch are concatenated along the session axis, ranked in
one forward pass under torch.inference_mode and split again. The same model.pt
is what `platform: "pytorch_libtorch"` serves in an NGC container.

Parameters (config.pbtxt): `input_order` (JSON list: the traced forward's
positional inputs), `torch_threads` (intra-op threads; 0 = export.steps.default_torch_threads():
half the cores, at most 4).
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from export.steps import concat_requests, default_torch_threads, split_rows


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads", "0")) or default_torch_threads()
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)  # one forward at a time per instance
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.device = torch.device("cuda", int(args["model_instance_device_id"])) if args["model_instance_kind"] == "GPU" else torch.device("cpu")
        self.model = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device).eval()
        self.inputs = json.loads(params["input_order"])
        self.outputs = [o["name"] for o in config["output"]]  # scores, encoded ids: the forward's order
        self.logger = pb_utils.Logger

    def execute(self, requests):
        try:
            per_request = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
            batch, sizes = concat_requests(per_request)
            with torch.inference_mode():
                outs = self.model(*[torch.from_numpy(a).to(self.device) for a in batch])
            arrays = [np.ascontiguousarray(o.cpu().numpy()) for o in outs]
        except Exception as e:  # inputs come from the preprocess step; a failure here is a server bug
            self.logger.log_error(f"model step failed: {e!r}")
            err = pb_utils.TritonError(f"model step failed: {e!r}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in zip(self.outputs, parts)])
            for parts in split_rows(arrays, sizes)
        ]
