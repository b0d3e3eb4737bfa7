"""`ernie-paddle serve`: the Paddle predictor behind the OpenAI-style completions API that FastDeploy
and vLLM also speak (/v1/completions, streaming or not; /v1/models; /health), so one client works
against all three. Standard library only; one predictor, one generation at a time."""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import ErnieError

MAX_BODY_BYTES = 1 << 20
NUMBER = (int, float)
# Completion request fields: (accepted types, default). Defaults are the OpenAI API's.
FIELDS = {
    "model": ((str,), None),
    "prompt": ((str, list), None),
    "max_tokens": ((int,), 16),
    "temperature": (NUMBER, 1.0),
    "top_p": (NUMBER, 1.0),
    "top_k": ((int,), 0),
    "seed": ((int,), None),
    "stop": ((str, list), None),
    "stream": ((bool,), False),
    "n": ((int,), 1),
}
# value checks: field -> (test, what the value must be)
LIMITS = {
    "max_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, "0 or more"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "0 (off) or more"),
    "n": (lambda v: v == 1, "1 (one choice per prompt)"),
}


class RequestError(Exception):
    """A bad request: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _is_type(value, types) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def parse_completion(body: bytes, served_name: str) -> dict:
    """The request's generation settings, defaults filled in; RequestError (4xx) when it is bad."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object")
    params = {}
    for name, (types, default) in FIELDS.items():
        value = request.get(name)
        if value is None:
            params[name] = default
            continue
        if not _is_type(value, types):
            raise RequestError(400, f"{name}: expected {' or '.join(t.__name__ for t in types)}, "
                                    f"got {type(value).__name__}", name)
        if name in LIMITS and not LIMITS[name][0](value):
            raise RequestError(400, f"{name}: must be {LIMITS[name][1]}, got {value!r}", name)
        params[name] = value
    if params["model"] not in (None, served_name):
        raise RequestError(404, f"model {params['model']!r} does not exist; this server serves {served_name!r}",
                           "model", "model_not_found")
    params["prompts"] = _prompts(params.pop("prompt"))
    if params["stream"] and len(params["prompts"]) > 1:
        raise RequestError(400, "prompt: streaming takes one prompt", "prompt")
    stop = params["stop"]
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop: expected a string or a list of strings", "stop")
    return params


def _prompts(prompt) -> list:
    """A prompt is a string, a list of token ids, or a list of either (a batch)."""
    if prompt is None or prompt == [] or prompt == "":
        raise RequestError(400, "prompt: required and not empty", "prompt")
    if isinstance(prompt, str) or all(_is_type(t, (int,)) for t in prompt):
        return [prompt]
    if all(isinstance(p, str) or (isinstance(p, list) and p and all(_is_type(t, (int,)) for t in p))
           for p in prompt):
        return list(prompt)
    raise RequestError(400, "prompt: expected a string, a list of token ids, or a list of those", "prompt")


def _sampling(params: dict) -> dict:
    return dict(max_new_tokens=params["max_tokens"], temperature=params["temperature"], top_p=params["top_p"],
                top_k=params["top_k"], seed=params["seed"], stop=params["stop"])


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, predictor, served_name: str):
        super().__init__(address, CompletionHandler)
        self.predictor, self.served_name = predictor, served_name
        self.generation_lock = threading.Lock()  # the predictor's KV cache serves one request at a time
        self.created = int(time.time())


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    server_version = "ernie-paddle"

    def do_GET(self):
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{
                "id": self.server.served_name, "object": "model", "created": self.server.created,
                "owned_by": "ernie-paddle", "max_model_len": self.server.predictor.config.max_position_embeddings}]})
        else:
            self._error(RequestError(404, f"no route GET {self.path}; try /v1/completions, /v1/models, /health"))

    def do_POST(self):
        if self.path != "/v1/completions":
            self._error(RequestError(404, f"no route POST {self.path}; completions are at /v1/completions"))
            return
        try:
            params = parse_completion(self._body(), self.server.served_name)
            if params["stream"]:
                self._stream(params)
            else:
                self._complete(params)
        except RequestError as e:
            self._error(e)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        return self.rfile.read(length)

    def _complete(self, params: dict):
        with self.server.generation_lock:
            try:
                results = self.server.predictor.generate(params["prompts"], **_sampling(params))
            except ErnieError as e:
                raise RequestError(400, str(e)) from None
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.generated_tokens for r in results)
        self._json(200, {**self._head("text_completion"), "choices": [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    def _stream(self, params: dict):
        with self.server.generation_lock:
            chunks = self.server.predictor.stream(params["prompts"][0], **_sampling(params))
            try:
                first = next(chunks)  # the predictor checks the request on its first step
            except ErnieError as e:
                raise RequestError(400, str(e)) from None
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            head = self._head("text_completion")
            try:
                for chunk in itertools.chain([first], chunks):
                    if chunk.text or chunk.finish_reason:
                        self._event({**head, "choices": [{"index": 0, "text": chunk.text,
                                                          "finish_reason": chunk.finish_reason, "logprobs": None}]})
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away: stop generating
            finally:
                chunks.close()

    def _head(self, kind: str) -> dict:
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.server.served_name}

    def _event(self, payload: dict):
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict):
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: RequestError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self._json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})


def make_server(predictor, host: str = "127.0.0.1", port: int = 8180, served_name: str | None = None):
    """A bound, not yet running server (port 0 picks a free one: see `server.server_address`)."""
    name = served_name or Path(predictor.directory).name
    try:
        return CompletionServer((host, port), predictor, name)
    except OSError as e:
        raise ErnieError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                         "pick another port, or 0 for any free one") from None


def run_serve(args) -> int:
    from .predictor import ErniePredictor

    predictor = ErniePredictor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                               weight_dtype=args.weight_dtype,
                                               quantization=args.quantization)
    server = make_server(predictor, args.host, args.port, args.served_model_name)
    host, port = server.server_address[:2]
    print(f"serving {server.served_name} ({predictor.device}, {predictor.dtype}) on http://{host}:{port} "
          "(/v1/completions, /v1/models, /health); Ctrl-C stops", file=sys.stderr)
    # Ctrl-C and `kill` stop the server, also when started in the background by a shell (which
    # starts it with SIGINT ignored).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
