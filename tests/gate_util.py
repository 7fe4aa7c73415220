"""A gate in front of an exported ensemble: requests that are in flight by construction.

    add_gated_ensemble(repo, gate_dir)   # repo/gate/ + repo/gated_ranker/ (= gate -> session_ranker's steps)
    ... send requests to GATED ...
    wait_arrived(gate_dir)               # a request is held in the gate (it reached the server)
    open_gate(gate_dir)                  # the gate lets every request through, to the real steps

`gate` is a test-only Python-backend step that holds each request until the file `gate_dir/open` exists
(then passes its inputs through, renamed `<name>__gated`); it writes `gate_dir/arrived` first.
`gated_ranker` is `session_ranker` with the gate as its first step, so a request held there still has
to run preprocess, model and postprocess after the gate opens. Used by the SIGTERM test: a request is
in flight at SIGTERM because it cannot finish before the test opens the gate (a request merely slow
enough was not, on a fast machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from training.names import ENSEMBLE_NAME

GATE = "gate"
GATED = "gated_ranker"
SUFFIX = "__gated"

GATE_MODEL = '''
import json, os, time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.dir = config["parameters"]["gate_dir"]["string_value"]
        self.names = [i["name"] for i in config["input"]]

    def execute(self, requests):
        open(os.path.join(self.dir, "arrived"), "a").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(self.dir, "open")) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor(n + "SUFFIX", pb_utils.get_input_tensor_by_name(r, n).as_numpy()) for n in self.names]
            )
            for r in requests
        ]
'''.replace("SUFFIX", SUFFIX)


def add_gated_ensemble(repo: Path, gate_dir: Path) -> None:
    """Write repo/gate/ and repo/gated_ranker/ next to an exported repository's models."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    gate_dir.mkdir(parents=True, exist_ok=True)
    ens = text_format.Parse((repo / ENSEMBLE_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    gate = model_config_pb2.ModelConfig(name=GATE, backend="python", max_batch_size=0)
    for tensor in ens.input:
        gate.input.add().CopyFrom(tensor)
        gate.output.add(name=tensor.name + SUFFIX, data_type=tensor.data_type, dims=tensor.dims)
    gate.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    gate.parameters["gate_dir"].string_value = str(gate_dir)
    (repo / GATE / "1").mkdir(parents=True)
    (repo / GATE / "config.pbtxt").write_text(text_format.MessageToString(gate))
    (repo / GATE / "1" / "model.py").write_text(GATE_MODEL)

    steps = list(ens.ensemble_scheduling.step)
    for key in list(steps[0].input_map):
        steps[0].input_map[key] = steps[0].input_map[key] + SUFFIX
    first = model_config_pb2.ModelEnsembling.Step(model_name=GATE, model_version=-1)
    for tensor in ens.input:
        first.input_map[tensor.name] = tensor.name
        first.output_map[tensor.name + SUFFIX] = tensor.name + SUFFIX
    del ens.ensemble_scheduling.step[:]
    ens.ensemble_scheduling.step.extend([first, *steps])
    ens.name = GATED
    version = ens.version_policy.specific.versions[0]
    (repo / GATED / str(version)).mkdir(parents=True)
    (repo / GATED / "config.pbtxt").write_text(text_format.MessageToString(ens))


def wait_arrived(gate_dir: Path, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (gate_dir / "arrived").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def open_gate(gate_dir: Path) -> None:
    (gate_dir / "open").write_text(json.dumps({"opened": time.time()}))
