"""export/README.md's commands run exactly as written (issue 18, "Also fix"): perf_analyzer (through
`python -m clients.perf_analyzer`, which gives the bundled binary its libcudart), plain tritonclient and
curl, stateless and stateful, against a real server of the serving tests' synthetic repository.

The blocks are the fenced blocks preceded by `<!-- doc-test: NAME -->` in export/README.md; only the
ports change (the documented 127.0.0.1:8001 / :8000 become the test server's). bash blocks run with
`bash -euo pipefail` in a temp folder, the venv's bin/ first on PATH (so `python` is the venv's) and
this checkout importable; python blocks with this interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export.repository import export_repository
from tests.triton_util import PROJECT_ROOT, served_config, start_server

pytestmark = [pytest.mark.triton, pytest.mark.slow]

README = PROJECT_ROOT / "export" / "README.md"
BLOCK = re.compile(r"<!-- doc-test: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)
EXPECTED = {"perf_analyzer", "tritonclient", "curl", "stateful-tritonclient", "stateful-curl", "perf_analyzer-sequence"}


def doc_blocks() -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["lang"], m["body"]) for m in BLOCK.finditer(README.read_text())}


@pytest.fixture(scope="module")
def doc_server(artifacts, tmp_path_factory):
    data, run = artifacts
    repo = export_repository(served_config(run, data, tmp_path_factory.mktemp("docs") / "model_repository"))
    server = start_server(repo, model_control="explicit")  # perf_analyzer may leave sequences open
    yield server
    assert server.stop() == 0, server.log_tail()


def run_block(name: str, server, cwd: Path) -> subprocess.CompletedProcess:
    lang, body = doc_blocks()[name]
    body = body.replace("127.0.0.1:8001", server.grpc_url).replace("127.0.0.1:8000", server.http_url)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} ({lang}) exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_every_documented_block_is_found():
    assert set(doc_blocks()) == EXPECTED


@pytest.mark.parametrize("name", ["perf_analyzer", "perf_analyzer-sequence"])
def test_perf_analyzer_commands(doc_server, tmp_path, name):
    proc = run_block(name, doc_server, tmp_path)
    assert "Throughput:" in proc.stdout, proc.stdout[-2000:]
    if name == "perf_analyzer":
        assert (tmp_path / "perf.csv").is_file()
    else:
        assert re.search(r"Sequence count: [1-9]", proc.stdout), proc.stdout[-2000:]
        assert "preprocess_stateful" in proc.stdout  # the composing models' breakdown


def test_tritonclient_examples(doc_server, tmp_path):
    out = run_block("tritonclient", doc_server, tmp_path).stdout
    assert out.startswith("[1 2]"), out
    lines = run_block("stateful-tritonclient", doc_server, tmp_path).stdout.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[1", "[2", "[3"], lines  # session_clicks grows


def test_curl_examples(doc_server, tmp_path):
    answer = json.loads(run_block("curl", doc_server, tmp_path).stdout)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["session_ids"]["data"] == [1, 2] and outputs["item_ids"]["shape"] == [2, 20]
    answer = json.loads(run_block("stateful-curl", doc_server, tmp_path).stdout)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["session_clicks"]["data"] == [1] and outputs["item_ids"]["shape"] == [1, 20]
