"""`ernie-paddle serve` on the embedded demo model, answered over loopback by a real HTTP client."""

from __future__ import annotations

import http.client
import json
import re
import select
import signal
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ernie_paddle import deploy
from ernie_paddle.demo import DEMO_MODEL as DEMO
from ernie_paddle.serve import make_server

PROMPT = "The capital of France is"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def predictor():
    from ernie_paddle import ErniePredictor
    return ErniePredictor.from_pretrained(DEMO, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def port(predictor):
    server = make_server(predictor, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT_S)


def call(port, method, path, body=None):
    """(status, headers, raw body) of one request; `body` is JSON-encoded unless already bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def complete(port, **body):
    status, _, raw = call(port, "POST", "/v1/completions", {"prompt": PROMPT, "temperature": 0, **body})
    assert status == 200, raw
    return json.loads(raw)


def stream(port, **body):
    """The decoded events of a streamed completion, checking the SSE framing and the [DONE] end."""
    status, headers, raw = call(port, "POST", "/v1/completions",
                                {"prompt": PROMPT, "temperature": 0, "stream": True, **body})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    frames = raw.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [json.loads(f[len("data: "):]) for f in frames[:-2]]


def streamed_text(events) -> str:
    return "".join(e["choices"][0]["text"] for e in events)


def test_health_and_models(port):
    assert call(port, "GET", "/health")[0] == 200
    status, _, raw = call(port, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(raw)["data"]] == [DEMO.name]


def test_completion_matches_the_predictor(port, predictor):
    reply = complete(port, max_tokens=8, model=DEMO.name)
    [expected] = predictor.generate([PROMPT], max_new_tokens=8, temperature=0.0)
    [choice] = reply["choices"]
    assert reply["object"] == "text_completion" and reply["model"] == DEMO.name
    assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
    assert reply["usage"]["completion_tokens"] == expected.generated_tokens <= 8
    assert reply["usage"]["total_tokens"] == expected.prompt_tokens + expected.generated_tokens


def test_streaming_gives_the_same_text(port):
    events = stream(port, max_tokens=8)
    assert streamed_text(events) == complete(port, max_tokens=8)["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events][-1] in ("stop", "length")
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_max_tokens(port):
    reply = complete(port, max_tokens=1, stop=None)
    assert reply["usage"]["completion_tokens"] == 1
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_string_ends_the_text_before_it(port):
    full = complete(port, max_tokens=12)["choices"][0]["text"]
    # the first two characters that occur only after the start
    cut = next(k for k in range(1, len(full) - 1) if full.find(full[k:k + 2]) == k)
    stop = full[cut:cut + 2]
    choice = complete(port, max_tokens=12, stop=[stop])["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (full[:cut], "stop")
    events = stream(port, max_tokens=12, stop=stop)
    assert streamed_text(events) == full[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(port):
    first, second = (complete(port, max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=7) for _ in range(2))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_batch_of_prompts(port):
    reply = complete(port, prompt=[PROMPT, "1 + 1 ="], max_tokens=4)
    assert [c["index"] for c in reply["choices"]] == [0, 1]


# (body, status, words the error message must contain)
BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"max_tokens": 4}, 400, "prompt: required"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens: expected int, got str"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens: must be at least 1"),
    ({"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens: expected int, got bool"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature: must be 0 or more"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p: must be in (0, 1]"),
    ({"prompt": PROMPT, "stop": [1]}, 400, "stop: expected a string or a list of strings"),
    ({"prompt": PROMPT, "n": 2}, 400, "n: must be 1"),
    ({"prompt": [PROMPT, PROMPT], "stream": True}, 400, "streaming takes one prompt"),
    ({"prompt": [{"a": 1}]}, 400, "prompt: expected a string, a list of token ids"),
    ({"prompt": PROMPT, "max_tokens": 10 ** 7}, 400, "exceeds the model's"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_request_gets_a_json_4xx_and_the_server_keeps_serving(port, body, status, message):
    got, headers, raw = call(port, "POST", "/v1/completions", body)
    assert got == status and headers["Content-Type"] == "application/json"
    error = json.loads(raw)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert complete(port, max_tokens=1)["choices"]


def test_unknown_routes_are_404(port):
    assert call(port, "GET", "/v1/chat")[0] == 404
    assert call(port, "POST", "/v1/chat/completions", {"messages": []})[0] == 404


def test_concurrent_requests_are_served_one_at_a_time(port):
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda _: complete(port, max_tokens=6)["choices"][0]["text"], range(3)))
    assert len(set(texts)) == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="smoke_test.sh uses curl")
def test_deploy_smoke_test_script_passes_against_serve(port, tmp_path):
    script = tmp_path / "smoke_test.sh"
    script.write_text(deploy.smoke_test_script(port, DEMO.name))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={"PATH": "/usr/bin:/bin", "TIMEOUT": "10"})
    assert done.returncode == 0, done.stderr
    assert "smoke test passed" in done.stdout


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_subprocess_answers_and_stops(predictor, stop):
    """The `ernie-paddle serve` command itself: load, listen on a free port, answer, stop on SIGINT
    (Ctrl-C) or SIGTERM (kill), also when started as a shell's background job (SIGINT ignored)."""
    proc = subprocess.Popen([sys.executable, "-m", "ernie_paddle", "serve", "--model", str(DEMO), "--port", "0",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline, seen = time.monotonic() + TIMEOUT_S, ""
        while not (match := re.search(r"on http://127\.0\.0\.1:(\d+)", seen)):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([proc.stderr], [], [], 1)[0]:
                seen += proc.stderr.readline()
        port = int(match.group(1))
        assert call(port, "GET", "/health")[0] == 200
        assert complete(port, max_tokens=2)["usage"]["completion_tokens"] <= 2
        proc.send_signal(stop)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        proc.kill()
        proc.wait(TIMEOUT_S)
