"""Triton Python-backend model `model` (written by `python -m export`).

Runs the traced TopKRanker (`model.pt`, torch.jit.load) on the embedded
tritonserver, which has no libtorch backend. Dynamic batching over sessions:
the requests of one batch are concatenated along the session axis, ranked in
one forward pass under torch.inference_mode and split again. The same model.pt
is what `platform: "pytorch_libtorch"` serves in an NGC container.

Parameters (config.pbtxt): `input_order` (JSON list: the traced forward's
positional inputs), `torch_threads` (intra-op threads; 0 = sessrec_steps.default_torch_threads():
half the cores, at most 4) and `max_len`; `sessrec_model.json` of the version
folder holds `cardinalities` (categorical input -> number of encoded ids: they
change with the vocabulary, version by version, so they cannot live in
config.pbtxt, which all versions share). Each request is checked on its own before
the batch runs (a client may call this step directly: a bad request gets
INVALID_ARG and the requests batched with it are still answered).

Nothing of this folder is imported or loaded (sessrec_steps.py, model.pt) before
every file of this version folder, and the model folder's config.pbtxt and
warm-up files, matched their sha256 in sessrec_files.json
(sessrec_integrity.verify_folder). Imports only the
standard library, numpy, torch, triton_python_backend_utils and the files of
this folder (sessrec_steps.py, sessrec_integrity.py): torch is the one package a
stock tritonserver image lacks for this step (see export/README.md).
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from sessrec_integrity import verify_folder


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        verify_folder(version_dir)  # before anything of this folder is imported or read (model.pt, sessrec_steps.py)
        from sessrec_steps import (
            RequestError,
            check_model_inputs,
            concat_requests,
            default_torch_threads,
            json_parameter,
            split_rows,
            string_parameters,
        )

        self.RequestError, self.check_model_inputs = RequestError, check_model_inputs
        self.concat_requests, self.split_rows = concat_requests, split_rows
        config = json.loads(args["model_config"])
        params = string_parameters(config)
        threads = int(params.get("torch_threads", "0")) or default_torch_threads()
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)  # one forward at a time per instance
        self.device = torch.device("cuda", int(args["model_instance_device_id"])) if args["model_instance_kind"] == "GPU" else torch.device("cpu")
        self.model = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device).eval()
        self.inputs = json_parameter(params, "input_order", "model")
        self.cardinalities = json.loads((version_dir / "sessrec_model.json").read_text())["cardinalities"]
        self.max_len = int(params.get("max_len", "0")) or None
        self.outputs = [o["name"] for o in config["output"]]  # scores, encoded ids: the forward's order
        for name in self.inputs:
            if pb_utils.get_input_config_by_name(config, name) is None:
                raise ValueError(f"config.pbtxt of model declares no input {name!r}: re-export the repository")
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = [None] * len(requests)
        good, per_request = [], []
        for i, r in enumerate(requests):
            arrays = [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
            if self.max_len is not None:
                try:
                    self.check_model_inputs(arrays, self.inputs, self.cardinalities, self.max_len)
                except self.RequestError as e:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                    )
                    continue
            good.append(i)
            per_request.append(arrays)
        if not good:
            return responses
        try:
            batch, sizes = self.concat_requests(per_request)
            with torch.inference_mode():
                outs = self.model(*[torch.from_numpy(a).to(self.device) for a in batch])
            arrays = [np.ascontiguousarray(o.cpu().numpy()) for o in outs]
        except Exception as e:  # inputs come from the preprocess step; a failure here is a server bug
            self.logger.log_error(f"model step failed: {e!r}")
            err = pb_utils.TritonError(f"model step failed: {e!r}", pb_utils.TritonError.INTERNAL)
            for i in good:
                responses[i] = pb_utils.InferenceResponse(error=err)
            return responses
        for i, parts in zip(good, self.split_rows(arrays, sizes)):
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in zip(self.outputs, parts)])
        return responses
