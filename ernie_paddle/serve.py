"""`ernie-paddle serve`: the OpenAI API that vLLM and FastDeploy also speak (/v1/completions,
/v1/chat/completions, streamed or not; /v1/models; /health; /metrics), in front of the continuous
batching engine of engine.py.

Starlette on uvicorn, the ASGI stack under FastAPI (which vLLM and FastDeploy use): asynchronous,
so waiting and streaming clients cost no threads, and a client that goes away is noticed. FastAPI
itself would add little: the bodies are read here (size cap, time limit) and validated with
pydantic, so that every error is an OpenAI-style JSON body naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from .errors import ErnieError

log = logging.getLogger(__name__)

try:
    import starlette  # noqa: F401
    import uvicorn
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
except ImportError as e:
    raise ErnieError(f"`ernie-paddle serve` needs the serve extra ({e.name} is missing): "
                     "pip install 'ernie-paddle[serve]'") from None

from .sampling import MAX_SEED  # noqa: E402 (after the extra's check)

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30  # a client that sends less body than it announced is answered 408 after this
# (or after --request-timeout when shorter)
SHUTDOWN_GRACE_S = 3  # on SIGINT / SIGTERM, running requests get this long to finish
MAX_LOGPROBS = 5  # completions' `logprobs` (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs`


class ApiError(Exception):
    """A request answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---- requests -------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields completions and chat share. Unknown fields are refused, each by name."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # the limits of sampling.check_sampling (JSON has no infinity)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None or isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and len(value) <= 16 and all(isinstance(s, str) for s in value):
            return [s for s in value if s]
        raise ValueError("expected a string or a list of at most 16 strings")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value and not all(key.isascii() and key.isdigit() and -100 <= bias <= 100 for key, bias in value.items()):
            raise ValueError("expected {token id: bias from -100 to 100}")
        return value


class CompletionRequest(Sampling):
    prompt: Any = Field(None, validate_default=True)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if value is None or value == [] or value == "":
            raise ValueError("required and not empty")
        if isinstance(value, str) or (isinstance(value, list) and all(_is_int(t) for t in value)):
            return [value]
        if isinstance(value, list) and all(
                isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)) for p in value):
            return list(value)
        raise ValueError("expected a string, a list of token ids, or a list of those")


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value) -> str:
        """The message's text: a string, or the text parts' strings joined."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                           and isinstance(part.get("text"), str) for part in value):
            return "".join(part["text"] for part in value)
        raise ValueError('expected a string or a list of {"type": "text", "text": ...} parts (text only)')


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(model: type[Strict], body: bytes) -> Strict:
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ApiError(400, f"{param}: not supported by this server", param) from None
        message = error["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" + ("" if error["type"] == "missing" else f", got {error['input']!r}"[:200]),
                       param) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


# ---- the server -----------------------------------------------------------------------------


class Metrics:
    """The Prometheus series at /metrics."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ernie_requests", "Generation requests by outcome", ["outcome"], registry=registry)
        self.prompt_tokens = Counter("ernie_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generated_tokens = Counter("ernie_generation_tokens", "Tokens generated", registry=registry)
        Gauge("ernie_queue_length", "Requests waiting for a slot", registry=registry) \
            .set_function(lambda: engine.queue_length)
        Gauge("ernie_running_requests", "Requests in the running batch", registry=registry) \
            .set_function(lambda: engine.batch_size)
        self.ttft = Histogram("ernie_time_to_first_token_seconds", "From request to first token", registry=registry,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("ernie_time_per_output_token_seconds", "Between consecutive tokens", registry=registry,
                              buckets=(.005, .01, .02, .04, .06, .08, .1, .15, .2, .3, .5, 1, 2.5))


class Server:
    """The routes, over one ErniePredictor's model and tokenizer and the engine running it."""

    def __init__(self, predictor, engine, served_name: str, max_tokens: int | None = None,
                 request_timeout: float | None = None):
        self.predictor, self.engine, self.tokenizer = predictor, engine, predictor.tokenizer
        self.served_name, self.max_tokens, self.request_timeout = served_name, max_tokens, request_timeout
        self.body_timeout = min(BODY_TIMEOUT_S, request_timeout or BODY_TIMEOUT_S)
        self.created = int(time.time())
        self.metrics = Metrics(engine)
        self.chat_template = _chat_template(Path(predictor.directory)) if predictor.directory else None

    def app(self, api_key: str | None = None):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(_):
            self.engine.start()
            yield
            self.engine.shutdown(0)
            await asyncio.to_thread(self.engine.join)

        app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], exception_handlers={
            ApiError: lambda _, e: _error_response(e),
            HTTPException: lambda request, e: _error_response(ApiError(
                e.status_code, f"no route {request.method} {request.url.path}; the API is at /v1/completions, "
                               "/v1/chat/completions, /v1/models, /health, /metrics" if e.status_code == 404
                else f"{request.method} {request.url.path}: {e.detail}")),
            Exception: lambda _, e: _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}")),
        }, lifespan=lifespan)
        return app if api_key is None else _require_key(app, api_key)

    async def health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "shutting down" if self.engine.stopping else "ok"},
                            status_code=503 if self.engine.stopping else 200)

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [{
            "id": self.served_name, "object": "model", "created": self.created, "owned_by": "ernie-paddle",
            "max_model_len": self.engine.max_model_len}]})

    async def prometheus(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request):
        body = parse(CompletionRequest, await _read_body(request, self.body_timeout))
        self._check_model(body.model)
        prompts = [self._ids(p, "prompt") for p in body.prompt]
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "prompt: streaming takes one prompt", "prompt")
        params = [self._params(body, ids, body.max_tokens or 16, "prompt", body.logprobs, body.echo, body.max_tokens)
                  for ids in prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in body.prompt]
        head = _head("cmpl", "text_completion", self.served_name)
        if body.stream:
            sent = 0

            def chunk(out, first):
                nonlocal sent
                text = (texts[0] if body.echo and first else "") + out.text
                logprobs = self._completion_logprobs(out, body, prompts[0] if body.echo and first else None, sent)
                sent += len(text)
                return {**head, "choices": [{"index": 0, "text": text, "finish_reason": out.finish_reason,
                                             "logprobs": logprobs}]}

            return self._stream(request, prompts[0], params[0], body, chunk)
        results = await self._run(request, prompts, params)
        merged = [_merge(outs) for outs in results]
        return _json({**head, "choices": [
            {"index": i, "text": (text if body.echo else "") + out.text, "finish_reason": out.finish_reason,
             "logprobs": self._completion_logprobs(out, body, ids if body.echo else None, 0)}
            for i, (out, ids, text) in enumerate(zip(merged, prompts, texts))], "usage": _usage(merged)})

    async def chat(self, request):
        body = parse(ChatRequest, await _read_body(request, self.body_timeout))
        self._check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
        ids = self._ids(self._chat_prompt(body.messages), "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._params(body, ids, max_tokens, "messages", (body.top_logprobs or 0) if body.logprobs else None,
                              False, max_tokens)
        head = _head("chatcmpl", "chat.completion", self.served_name)
        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return self._stream(request, ids, params, body, lambda out, first: {
                **chunk_head, "choices": [{"index": 0, "delta": ({"role": "assistant"} if first else {})
                                           | ({"content": out.text} if out.text or first else {}),
                                           "finish_reason": out.finish_reason,
                                           "logprobs": self._chat_logprobs(out, body)}]})
        [outs] = await self._run(request, [ids], [params])
        merged = _merge(outs)
        return _json({**head, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": merged.text},
            "finish_reason": merged.finish_reason, "logprobs": self._chat_logprobs(merged, body)}],
            "usage": _usage([merged])})

    # -- helpers --

    def _check_model(self, model: str | None):
        if model not in (None, self.served_name):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.served_name!r}",
                           "model", "model_not_found")

    def _ids(self, prompt, field: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, f"{field}: encodes to no tokens", field)
        vocab = self.predictor.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", field)
        return ids

    def _chat_prompt(self, messages: list[ChatMessage]) -> str:
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        if self.chat_template is None:
            return self.tokenizer.apply_chat_template(plain)
        try:
            return self.chat_template.render(messages=plain, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (raise_exception) and its bugs
            raise ApiError(400, f"messages: the model's chat template refused them ({e})", "messages") from None

    def _params(self, body: Sampling, ids: list[int], default: int | None, field: str, logprobs: int | None,
                echo: bool, max_tokens: int | None):
        """The engine's settings for one prompt; `max_tokens` as asked for, else `default` within the
        limits (else as many as fit)."""
        from .engine import SamplingParams

        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ApiError(400, f"{field}: {len(ids)} tokens leave no room in a slot's {self.engine.max_model_len} "
                                "tokens (--max-model-len)", field)
        limit = min(room, self.max_tokens or room)
        max_tokens = max_tokens or min(default or limit, limit)
        if self.max_tokens and max_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {self.max_tokens} "
                                "(--max-tokens)", "max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                f"a slot's {self.engine.max_model_len} tokens (--max-model-len)", "max_tokens")
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        if any(k >= self.predictor.config.vocab_size for k in bias):
            raise ApiError(400, f"logit_bias: a token id is outside the vocabulary (0..{self.predictor.config.vocab_size - 1})",
                           "logit_bias")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), seed=body.seed, stop=body.stop,
                              repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=bias, logprobs=logprobs,
                              prompt_logprobs=echo and logprobs is not None)

    def _submit(self, ids: list[int], params):
        """Queue one prompt; its outputs arrive in the returned asyncio queue."""
        from .engine import QueueFull, Request

        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()

        def emit(out):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        request = Request(ids, params, emit, self.request_timeout)
        try:
            self.engine.submit(request)
        except QueueFull as e:
            self.metrics.requests.labels("rejected").inc()
            raise ApiError(503, f"the server is busy: {e}; retry later", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(len(ids))
        return request, outputs, time.monotonic()

    async def _outputs(self, outputs: asyncio.Queue, submitted: float):
        """The outputs of one request until its last, observed for the metrics."""
        last = None
        while True:
            out = await outputs.get()
            now = time.monotonic()
            if out.tokens:
                (self.metrics.tpot if last else self.metrics.ttft).observe(now - (last or submitted))
                self.metrics.generated_tokens.inc(len(out.tokens))
                last = now
            yield out
            if out.finish_reason or out.error:
                self.metrics.requests.labels(out.finish_reason or "error").inc()
                return

    async def _run(self, request, prompts: list[list[int]], params: list) -> list[list]:
        """Every prompt's outputs; cancelled as soon as the client disconnects."""
        submitted = []
        try:
            for ids, p in zip(prompts, params):
                submitted.append(self._submit(ids, p))
        except ApiError:
            for engine_request, _, _ in submitted:
                self.engine.cancel(engine_request)
            raise

        async def collect(outputs, started):
            return [out async for out in self._outputs(outputs, started)]

        gathered = asyncio.ensure_future(asyncio.gather(*(collect(q, t) for _, q, t in submitted)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([gathered, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for engine_request, _, _ in submitted:
                self.engine.cancel(engine_request)  # a no-op for a finished one
            gone.cancel()
        if not gathered.done():
            gathered.cancel()
            self.metrics.requests.labels("cancelled").inc(len(submitted))
            raise ApiError(499, "the client closed the connection")  # nobody reads this
        results = gathered.result()
        errors = [outs[-1].error for outs in results if outs[-1].error]
        if errors:
            raise ApiError(503 if "shutting down" in errors[0] else 504 if "timed out" in errors[0] else 500,
                           errors[0])
        return results

    def _stream(self, request, ids: list[int], params, body: Sampling, chunk):
        from starlette.responses import StreamingResponse

        engine_request, outputs, started = self._submit(ids, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            first, last, ended = True, None, False
            try:
                async for out in self._outputs(outputs, started):
                    ended = bool(out.finish_reason or out.error)
                    if out.error:
                        yield _sse(ApiError(500, out.error).body())
                        break
                    payload = chunk(out, first)
                    if include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
                    first, last = False, out
                if include_usage and last is not None and last.finish_reason:
                    yield _sse({**payload, "choices": [], "usage": _usage([last])})
            except Exception as e:  # a bug: the client still gets an error event and the end of the stream
                log.exception("streaming a response failed")
                ended = True
                self.metrics.requests.labels("error").inc()
                yield _sse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
            finally:  # also when the client went away: Starlette cancels this generator
                self.engine.cancel(engine_request)
                if not ended:
                    self.metrics.requests.labels("cancelled").inc()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _token_text(self, token: int) -> str:
        raw = self.tokenizer.token_bytes(token)
        if raw or token >= self.tokenizer.vocab_size:  # the model's vocab is padded beyond the tokenizer's pieces
            return raw.decode("utf-8", errors="replace")
        return self.tokenizer.sp.IdToPiece(token)  # a special token: its name

    def _completion_logprobs(self, out, body: CompletionRequest, prompt_ids: list[int] | None, offset: int):
        """The completions API's logprobs for one output (the prompt's tokens first with `prompt_ids`,
        for echo): parallel lists of tokens, their logprobs, the top alternatives, and where each
        token starts in the text (counting from `offset`)."""
        if body.logprobs is None:
            return None
        entries = list(zip(prompt_ids, out.prompt_logprobs)) if prompt_ids and out.prompt_logprobs else []
        entries += zip(out.tokens, out.logprobs)
        offsets = []
        for token, _ in entries:
            offsets.append(offset)
            offset += len(self.tokenizer.decode([token]))
        return {"tokens": [self._token_text(t) for t, _ in entries],
                "token_logprobs": [e.logprob if e else None for _, e in entries],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top} if e else None for _, e in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, out, body: ChatRequest):
        if not body.logprobs:
            return None

        def entry(token, logprob):
            return {"token": self._token_text(token), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token))}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in out.logprobs]}


def _merge(outputs: list):
    """One Output holding a whole request's outputs."""
    from .engine import Output

    last = outputs[-1]
    return Output("".join(o.text for o in outputs), [t for o in outputs for t in o.tokens],
                  [lp for o in outputs for lp in o.logprobs], outputs[0].prompt_logprobs, last.finish_reason,
                  last.error, last.prompt_tokens, last.completion_tokens)


def _usage(outputs) -> dict:
    prompt = completion = 0
    for out in outputs:
        prompt, completion = prompt + out.prompt_tokens, completion + out.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(prefix: str, kind: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _json(payload: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response
    return Response(json.dumps(payload, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


def _error_response(e: ApiError):
    return _json(e.body(), e.status, e.headers)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _read_body(request, timeout: float | None) -> bytes:
    """The request body: at most MAX_BODY_BYTES, within `timeout` seconds."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and int(length) > MAX_BODY_BYTES:  # uvicorn has checked that it is a number
        raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes, the most accepted")
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout} s") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    return bytes(body)


async def _disconnected(request):
    """Returns once the client has gone away (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _require_key(app, api_key: str):
    """`app` behind `Authorization: Bearer <api_key>` on every route but /health."""
    expected = f"Bearer {api_key}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, expected):
                error = ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key> "
                                      "(--api-key)", code="invalid_api_key")
                return await _error_response(error)(scope, receive, send)
        await app(scope, receive, send)

    return guarded


def _chat_template(directory: Path):
    """The jinja chat template of tokenizer_config.json, compiled, or None to use ERNIE's format."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        return None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token")}
    try:
        return env.from_string(template, globals=special)
    except TemplateError as e:
        raise ErnieError(f"{directory / 'tokenizer_config.json'}: its chat_template does not compile ({e})") from None


def _json_400_protocol():
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse (a Content-Length of -1 or
    abc, a bad header) with the API's JSON error body instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(ApiError(400, f"malformed HTTP request: {msg}").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorsH11Protocol


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), taken before the model loads: a port in
    use is then known at once, not after minutes of loading a large model."""
    if not 0 <= port <= 65535:
        raise ErnieError(f"--port {port}: must be from 0 to 65535 (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:  # gaierror included: a name that resolves to nothing
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise ErnieError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, "
                             "0.0.0.0 (every interface) or one of its addresses") from None
        raise ErnieError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                         "pick another port, or 0 for any free one") from None


def run_serve(args) -> int:
    from .engine import Engine
    from .predictor import ErniePredictor

    for option in ("max_num_seqs", "max_queue"):
        if getattr(args, option) < 1:
            raise ErnieError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    for option in ("max_tokens", "request_timeout"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            raise ErnieError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be positive")
    sock = listen(args.host, args.port)
    predictor = ErniePredictor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                               weight_dtype=args.weight_dtype, quantization=args.quantization)
    if predictor.tokenizer is None:
        raise ErnieError(f"{predictor.directory}: no tokenizer.model; the server needs the model's tokenizer")
    positions = predictor.config.max_position_embeddings
    max_model_len = min(positions, 2048) if args.max_model_len is None else args.max_model_len
    if not 2 <= max_model_len <= positions:
        raise ErnieError(f"--max-model-len {max_model_len}: must be from 2 to the model's {positions} positions")
    engine = Engine(predictor.model, predictor.tokenizer, args.max_num_seqs, max_model_len, args.max_queue,
                    predictor.device)
    name = args.served_model_name or Path(predictor.directory).name
    server = Server(predictor, engine, name, args.max_tokens, args.request_timeout)
    config = uvicorn.Config(server.app(args.api_key), http=_json_400_protocol(), log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 2, lifespan="on")
    host, port = sock.getsockname()[:2]
    print(f"serving {name} ({predictor.device}, {predictor.dtype}; {args.max_num_seqs} slots of {max_model_len} "
          f"tokens) on http://{host}:{port} (/v1/completions, /v1/chat/completions, /v1/models, /health, "
          "/metrics); Ctrl-C stops", file=sys.stderr, flush=True)
    _draining_server(config, engine).run(sockets=[sock])
    return 0


def _draining_server(config, engine):
    """uvicorn's server, telling the engine to drain when a stop signal arrives."""

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # In a signal handler: the engine's lock may be held by this very thread.
            threading.Thread(target=engine.shutdown, args=(SHUTDOWN_GRACE_S,)).start()
            super().handle_exit(sig, frame)

    # uvicorn raises the stop signal again once it has shut down, with the handlers it found at its
    # start: these do nothing, so the process exits 0 (also when started with SIGINT ignored).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda *_: None)
    return Draining(config)
