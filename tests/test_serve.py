"""`ernie-paddle serve` run as a subprocess on 127.0.0.1, answered by the official `openai` client,
`http.client` and raw sockets; its answers compared with ErniePredictor on the same prompts."""

from __future__ import annotations

import http.client
import json
import math
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai  # in the test extra: missing, the suite fails rather than skips
import pytest

from conftest import save_tiny_pt, save_tiny_tokenizer
from ernie_paddle import deploy
from ernie_paddle.demo import DEMO_MODEL as DEMO

PROMPT = "The capital of France is"
TIMEOUT_S = 120
NO_EOS = {"2": -100}  # logit_bias that keeps the demo model talking
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


class ServerProcess:
    """`python -m ernie_paddle serve ...` on a free port; its stderr kept in `log`."""

    def __init__(self, model, *options, ignore_sigint=False):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ernie_paddle", "serve", "--model", str(model), "--port", "0", "--device", "cpu",
             *map(str, options)], stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
        self.log = ""
        deadline = time.monotonic() + TIMEOUT_S
        while not (match := re.search(r"on http://127\.0\.0\.1:(\d+)", self.log)):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log
            if select.select([self.proc.stderr], [], [], 1)[0]:
                self.log += self.proc.stderr.readline()
        self.port = int(match.group(1))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log += line

    def stop(self, how=signal.SIGTERM) -> int:
        self.proc.send_signal(how)
        try:
            return self.proc.wait(TIMEOUT_S)
        finally:
            self.proc.kill()

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=kwargs.pop("api_key", "none"),
                             max_retries=0, timeout=TIMEOUT_S, **kwargs)


@pytest.fixture(scope="module")
def predictor():
    from ernie_paddle import ErniePredictor
    return ErniePredictor.from_pretrained(DEMO, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(DEMO, "--max-num-seqs", 4)
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A tiny random model that rarely stops by itself, with a tokenizer and a chat template."""
    directory = tmp_path_factory.mktemp("serve") / "tiny-random-PT"
    save_tiny_pt(directory, vocab_size=400)
    save_tiny_tokenizer(directory, [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)],
                        vocab_size=400)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


def call(port, method, path, body=None, headers=None):
    """(status, headers, raw body) of one request; `body` is JSON-encoded unless already bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw(port, data: bytes, read_s: float = TIMEOUT_S) -> bytes:
    """What the server sends back on a raw connection for `data`, until it closes or `read_s` pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return got


def post(body, path="/v1/completions", length=None) -> bytes:
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def json_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), response[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def healthy(port) -> bool:
    return call(port, "GET", "/health")[0] == 200


def metric(port, name: str) -> float:
    text = call(port, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---- the API, through the official client ----------------------------------------------------


def test_health_models_and_metrics(server, client):
    assert healthy(server.port)
    assert [m.id for m in client.models.list().data] == [DEMO.name]
    status, headers, raw_metrics = call(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for series in ("ernie_requests_total", "ernie_prompt_tokens_total", "ernie_generation_tokens_total",
                   "ernie_queue_length", "ernie_running_requests", "ernie_time_to_first_token_seconds_bucket",
                   "ernie_time_per_output_token_seconds_bucket"):
        assert series in raw_metrics.decode()


def test_completions_equal_the_predictor(client, predictor):
    prompts = [PROMPT, "The capital of Japan is", "Water boils at", "1 + 1 ="]
    reply = client.completions.create(model=DEMO.name, prompt=prompts, max_tokens=12, temperature=0)
    for prompt, choice in zip(prompts, reply.choices):
        [expected] = predictor.generate([prompt], max_new_tokens=12)
        assert (choice.text, choice.finish_reason) == (expected.text, expected.finish_reason)
    assert reply.usage.completion_tokens == sum(predictor.generate([p], max_new_tokens=12)[0].generated_tokens
                                                for p in prompts)
    ids = predictor.tokenizer.encode(PROMPT)
    assert client.completions.create(model=DEMO.name, prompt=ids, max_tokens=12, temperature=0).choices[0].text \
        == reply.choices[0].text


def test_chat_equals_the_predictor_on_the_ernie_format(client, predictor):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model=DEMO.name, messages=messages, max_tokens=10, temperature=0)
    [expected] = predictor.generate([predictor.tokenizer.apply_chat_template(messages)], max_new_tokens=10)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert reply.usage.completion_tokens == expected.generated_tokens


def test_streams_carry_the_same_text_and_the_usage(client):
    whole = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=40, temperature=0, logit_bias=NO_EOS)
    chunks = list(client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=40, temperature=0,
                                            logit_bias=NO_EOS, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40

    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=DEMO.name, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=DEMO.name, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    no_usage = list(client.chat.completions.create(model=DEMO.name, messages=messages, max_tokens=3, stream=True))
    assert all(c.choices for c in no_usage)


def test_logprobs_and_echo_are_the_models(client, predictor):
    reply = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      echo=True)
    [choice] = reply.choices
    assert choice.text.startswith(PROMPT)
    prompt_ids = predictor.tokenizer.encode(PROMPT)
    ids = prompt_ids + predictor.generate([PROMPT], max_new_tokens=6)[0].token_ids
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:2] == [0, len(predictor.tokenizer.decode(prompt_ids[:1]))]
    expected = log_softmax(predictor.logits([ids])[0])  # the model's own, from a run without the KV cache
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], expected[i - 1, ids[i]], abs_tol=1e-4)
    for i in range(len(prompt_ids), len(lp.tokens)):  # greedy: each generated token is the most likely
        assert len(lp.top_logprobs[i]) == 3 and max(lp.top_logprobs[i].values()) == lp.token_logprobs[i]

    chat = client.chat.completions.create(model=DEMO.name, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob <= 0
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content) == chat.choices[0].message.content


def test_logprobs_name_ids_beyond_the_tokenizers_pieces(client, predictor):
    # The model's vocab is padded beyond the tokenizer's pieces (the demo's 1024 against 1000, ERNIE 4.5's
    # 103424 against 100295): such an id in a prompt, and among the alternatives, has no text.
    beyond = predictor.tokenizer.vocab_size + 5
    assert beyond < predictor.config.vocab_size
    reply = client.completions.create(model=DEMO.name, prompt=[1, beyond], max_tokens=2, temperature=0, logprobs=5,
                                      echo=True, logit_bias={str(beyond + 1): 100})
    lp = reply.choices[0].logprobs
    assert lp.tokens[1] == "" and lp.tokens[2] == ""
    assert lp.tokens[0] == predictor.tokenizer.sp.IdToPiece(1)  # a special token is named


def test_stop_strings_and_seeds(client):
    full = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=30, temperature=0,
                                     logit_bias=NO_EOS).choices[0].text
    cut = next(k for k in range(1, len(full) - 1) if full.find(full[k:k + 2]) == k)
    stopped = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=30, temperature=0,
                                        logit_bias=NO_EOS, stop=[full[cut:cut + 2]]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (full[:cut], "stop")
    streamed = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=30, temperature=0,
                                         logit_bias=NO_EOS, stop=full[cut:cut + 2], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]

    def sampled(seed):
        return client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=20, temperature=1.5, top_p=0.95,
                                         seed=seed, logit_bias=NO_EOS, presence_penalty=0.5, frequency_penalty=0.5,
                                         extra_body={"top_k": 50, "repetition_penalty": 1.1}).choices[0].text

    assert sampled(7) == sampled(7) != sampled(8)
    assert sampled(2**64 - 1) == sampled(2**64 - 1)  # the API's seeds: 0..2**64-1
    # the API's greedy rule: a temperature below float32's smallest normal number is 0
    tiny = client.completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=30, temperature=1e-39,
                                     logit_bias=NO_EOS).choices[0].text
    assert tiny == full


# ---- bad requests ---------------------------------------------------------------------------

# (body, status, the `param` named, words of the message)
BAD_BODIES = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
    (b'{"prompt": "a", "temperature": NaN}', 400, None, "NaN is not a JSON number"),
    (b'{"prompt": "a", "top_p": Infinity}', 400, None, "Infinity is not a JSON number"),
    ({"max_tokens": 4}, 400, "prompt", "required"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"prompt": PROMPT, "max_tokens": 10 ** 7}, 400, "max_tokens", "exceeds a slot's 512 tokens"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": PROMPT, "temperature": 1e400}, 400, None, "not valid JSON"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": PROMPT, "seed": 2 ** 64}, 400, "seed", "less than or equal to 18446744073709551615"),
    ({"prompt": PROMPT, "stop": [1]}, 400, "stop", "a list of at most 16 strings"),
    ({"prompt": PROMPT, "n": 2}, 400, "n", "Input should be 1"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of", "Input should be 1"),
    ({"prompt": PROMPT, "suffix": "x"}, 400, "suffix", "None"),
    ({"prompt": PROMPT, "logprobs": 9}, 400, "logprobs", "less than or equal to 5"),
    ({"prompt": PROMPT, "logit_bias": {"x": 1}}, 400, "logit_bias", "token id"),
    ({"prompt": PROMPT, "logit_bias": {"5000": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ({"prompt": PROMPT, "tools": []}, 400, "tools", "not supported"),
    ({"prompt": [PROMPT, PROMPT], "stream": True}, 400, "prompt", "streaming takes one prompt"),
    ({"prompt": [{"a": 1}]}, 400, "prompt", "a list of token ids"),
    ({"prompt": 5}, 400, "prompt", "a list of token ids"),
    ({"prompt": {"a": "b"}}, 400, "prompt", "a list of token ids"),
    ({"prompt": PROMPT, "logit_bias": {"\u00b2": 1}}, 400, "logit_bias", "token id"),
    ({"prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist"),
]


@pytest.mark.parametrize("body,status,param,message", BAD_BODIES, ids=[m for *_, m in BAD_BODIES])
def test_a_bad_body_gets_a_json_4xx_naming_the_field(server, body, status, param, message):
    got, error = json_error(raw(server.port, post(body)))
    assert (got, error["param"]) == (status, param) and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert healthy(server.port)


BAD_CHATS = [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'system', 'developer', 'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content",
     "text only"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "less than or equal to 20"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format", "not supported"),
]


@pytest.mark.parametrize("body,param,message", BAD_CHATS, ids=[p for _, p, _ in BAD_CHATS])
def test_a_bad_chat_gets_a_400_naming_the_field(server, body, param, message):
    got, error = json_error(raw(server.port, post(body, "/v1/chat/completions")))
    assert (got, error["param"]) == (400, param) and message in error["message"], error


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n{}", 413),
    (post(b"x" * (2 << 20)), 413),
    (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
], ids=["length -1", "length abc", "length 300 MB", "body 2 MiB", "no route", "wrong method"])
def test_malformed_http_gets_a_json_4xx(server, request_bytes, status):
    got, error = json_error(raw(server.port, request_bytes, read_s=10))
    assert got == status and error["message"]
    assert healthy(server.port)


@pytest.mark.skipif(shutil.which("curl") is None, reason="smoke_test.sh uses curl")
def test_deploy_smoke_test_script_passes_against_serve(server, tmp_path):
    script = tmp_path / "smoke_test.sh"
    script.write_text(deploy.smoke_test_script(server.port, DEMO.name))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={"PATH": "/usr/bin:/bin", "TIMEOUT": "10"})
    assert done.returncode == 0, done.stderr
    assert "smoke test passed" in done.stdout


# ---- batching -------------------------------------------------------------------------------


def test_32_concurrent_clients_each_get_what_they_get_alone(random_model):
    """Token-id prompts of 1-15 tokens, 1-45 new tokens each, in 8 slots of 64 tokens (so the KV
    cache is also compacted on the way); against ErniePredictor.generate on each alone."""
    from ernie_paddle import ErniePredictor

    rnd = np.random.default_rng(0)
    work = [([int(t) for t in rnd.integers(3, 400, rnd.integers(1, 16))], int(rnd.integers(1, 46)))
            for _ in range(32)]
    server = ServerProcess(random_model, "--max-num-seqs", 8, "--max-model-len", 64)
    try:
        client = server.client()

        def ask(job):
            ids, max_tokens = job
            return client.completions.create(model=random_model.name, prompt=ids, max_tokens=max_tokens,
                                             temperature=0).choices[0]

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, work))
        chat = [{"role": "user", "content": "the lazy dog"}]
        reply = client.chat.completions.create(model=random_model.name, messages=chat, max_tokens=8, temperature=0)
        assert metric(server.port, 'ernie_requests_total{outcome="length"}') + \
            metric(server.port, 'ernie_requests_total{outcome="stop"}') == 33
    finally:
        assert server.stop() == 0, server.log
    predictor = ErniePredictor.from_pretrained(random_model, device="cpu", dtype="float32", progress=False)
    for (ids, max_tokens), answer in zip(work, answers):
        [expected] = predictor.generate([ids], max_new_tokens=max_tokens)
        assert (answer.text, answer.finish_reason) == (expected.text, expected.finish_reason)
    rendered = "[user] the lazy dog\n[assistant] "  # the tokenizer_config.json template
    assert reply.choices[0].message.content == predictor.generate([rendered], max_new_tokens=8)[0].text


def test_requests_arriving_while_others_stream_get_what_they_get_alone(random_model):
    """Two long streams decode while six requests arrive one by one at random moments (so they join
    mid-step); every answer equals ErniePredictor.generate on that prompt alone."""
    from ernie_paddle import ErniePredictor

    rnd = np.random.default_rng(1)
    long_jobs = [([int(t) for t in rnd.integers(3, 400, 5)], 230) for _ in range(2)]
    short_jobs = [([int(t) for t in rnd.integers(3, 400, rnd.integers(1, 12))], int(rnd.integers(5, 30)))
                  for _ in range(6)]
    server = ServerProcess(random_model, "--max-num-seqs", 4, "--max-model-len", 256)
    finished = {}
    try:
        client = server.client()

        def stream(i, ids, max_tokens):
            chunks = client.completions.create(model=random_model.name, prompt=ids, max_tokens=max_tokens,
                                               temperature=0, stream=True)
            text = "".join(chunk.choices[0].text for chunk in chunks)
            finished[i] = time.monotonic()
            return text

        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream, f"long {i}", *job) for i, job in enumerate(long_jobs)]
            until(lambda: metric(server.port, "ernie_running_requests") == 2, TIMEOUT_S)
            shorts = []
            for i, job in enumerate(short_jobs):
                time.sleep(rnd.random() * 0.03)
                shorts.append(pool.submit(stream, f"short {i}", *job))
            answers = [f.result() for f in streams + shorts]
    finally:
        assert server.stop() == 0, server.log
    assert min(t for k, t in finished.items() if k.startswith("short")) < min(finished["long 0"], finished["long 1"])
    predictor = ErniePredictor.from_pretrained(random_model, device="cpu", dtype="float32", progress=False)
    for (ids, max_tokens), answer in zip(long_jobs + short_jobs, answers):
        assert answer == predictor.generate([ids], max_new_tokens=max_tokens)[0].text


# ---- limits: slots, queue, disconnects, API key, time ---------------------------------------


@pytest.fixture(scope="module")
def one_slot():
    server = ServerProcess(DEMO, "--max-num-seqs", 1, "--max-queue", 1, "--request-timeout", 2, "--api-key", "k3y",
                           "--max-tokens", 500)
    yield server
    assert server.stop() == 0, server.log


KEY = {"Authorization": "Bearer k3y"}


def long_stream(port, max_tokens: int = 500) -> socket.socket:
    """A connection streaming a long generation, its first event read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "logit_bias": NO_EOS, "stream": True}).encode()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Length: "
                 f"{len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:
        got += sock.recv(1 << 16)
    return sock


def until(condition, seconds: float) -> float:
    """Seconds until `condition()` held (fails after `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds
        time.sleep(0.01)
    return time.monotonic() - start


def test_api_key_on_every_route_but_health(one_slot):
    assert healthy(one_slot.port)
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")]:
        status, _, body = call(one_slot.port, method, path, {"prompt": "x"})
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        one_slot.client(api_key="wrong").models.list()
    assert one_slot.client(api_key="k3y").completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=2).usage


def test_max_tokens_cap(one_slot):
    status, _, body = call(one_slot.port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 501}, KEY)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "max_tokens" and "limit of 500 (--max-tokens)" in error["message"]


def test_a_client_that_disconnects_frees_its_slot(one_slot):
    running, cancelled = "ernie_running_requests", 'ernie_requests_total{outcome="cancelled"}'
    cancelled_before = metric_with_key(one_slot.port, cancelled)  # the server is shared with other tests
    for streaming in (True, False):
        if streaming:
            sock = long_stream(one_slot.port)
        else:
            sock = socket.create_connection(("127.0.0.1", one_slot.port))
            sock.sendall(post({"prompt": PROMPT, "max_tokens": 500, "logit_bias": NO_EOS}).replace(
                b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer k3y\r\n"))
        until(lambda: metric_with_key(one_slot.port, running) == 1, 10)
        sock.close()
        until(lambda: metric_with_key(one_slot.port, running) == 0, 1)  # a step is milliseconds
    start = time.monotonic()
    one_slot.client(api_key="k3y").completions.create(model=DEMO.name, prompt=PROMPT, max_tokens=1)
    assert time.monotonic() - start < 2
    assert metric_with_key(one_slot.port, cancelled) == cancelled_before + 2


def metric_with_key(port, name):
    text = call(port, "GET", "/metrics", headers=KEY)[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def long_demo(tmp_path_factory):
    """The demo model allowed 16384 positions: a generation that holds its slot for seconds on any machine
    (500 tokens, the most the demo's 512 positions allow, took about a second here)."""
    directory = tmp_path_factory.mktemp("long") / DEMO.name
    shutil.copytree(DEMO, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    return directory


def test_a_full_queue_answers_503_with_retry_after(long_demo):
    server = ServerProcess(long_demo, "--max-num-seqs", 1, "--max-queue", 1, "--max-model-len", 16384,
                           "--api-key", "k3y")
    holder = waiter = None
    try:
        holder = long_stream(server.port, max_tokens=16000)
        waiter = socket.create_connection(("127.0.0.1", server.port))
        waiter.sendall(post({"prompt": PROMPT, "max_tokens": 2}).replace(b"Host: x\r\n",
                                                                         b"Host: x\r\nAuthorization: Bearer k3y\r\n"))
        until(lambda: metric_with_key(server.port, "ernie_queue_length") == 1, 10)
        status, headers, body = call(server.port, "POST", "/v1/completions", {"prompt": PROMPT}, KEY)
        assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]["message"]
        assert metric_with_key(server.port, "ernie_running_requests") == 1  # the holder was still running
    finally:
        for sock in (holder, waiter):
            if sock:
                sock.close()
        assert server.stop() == 0, server.log


def test_a_body_shorter_than_announced_gets_408(one_slot):
    start = time.monotonic()
    response = raw(one_slot.port, post(b'{"prompt"', length=100).replace(b"Host: x\r\n",
                                                                        b"Host: x\r\nAuthorization: Bearer k3y\r\n"))
    status, error = json_error(response)
    assert status == 408 and "did not arrive within 2" in error["message"] and time.monotonic() - start < 10


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_generation_ends_the_stream_and_exits_0(stop):
    """Also when started as a shell's background job (SIGINT ignored)."""
    server = ServerProcess(DEMO, "--max-num-seqs", 2, "--api-key", "k3y", ignore_sigint=True)
    try:
        sock = long_stream(server.port)
        server.proc.send_signal(stop)
        rest = b""
        while chunk := sock.recv(1 << 16):
            rest += chunk
        assert b"shutting down" in rest or b'"finish_reason": "length"' in rest
        assert server.proc.wait(TIMEOUT_S) == 0, server.log
        assert "Traceback" not in server.log
    finally:
        server.proc.kill()


@pytest.mark.parametrize("option, value, message", [
    ("--max-num-seqs", 0, "--max-num-seqs 0: must be at least 1"),
    ("--max-model-len", 0, "--max-model-len 0: must be from 2 to the model's"),  # 0 was taken as the default
    ("--max-tokens", 0, "--max-tokens 0: must be positive"),
    ("--port", 70000, "--port 70000: must be from 0 to 65535"),
    ("--host", "999.1.1.1", "--host 999.1.1.1: not an address of this machine"),
])
def test_bad_server_options_fail_in_one_line(option, value, message):
    run = subprocess.run([sys.executable, "-m", "ernie_paddle", "serve", "--model", str(DEMO), "--port", "0",
                          "--device", "cpu", option, str(value)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        broken = tmp_path / "model"  # loading it would fail with a message of its own
        shutil.copytree(DEMO, broken)
        (broken / "model.safetensors").write_bytes(b"not a checkpoint")
        run = subprocess.run([sys.executable, "-m", "ernie_paddle", "serve", "--model", str(broken), "--port",
                              str(port), "--device", "cpu"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in run.stderr
