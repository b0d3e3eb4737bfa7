"""Continuous batching for `ernie-paddle serve`: requests join and leave a running batch between
decode steps, on one worker thread.

The KV cache is a pool of `max_num_seqs` slots [slots, kv_heads, max_model_len, D] per layer, the
running requests in slots 0..n-1. Every decode step writes all of them at one cache index, the
clock; a request of L tokens so far holds cache indexes [clock - L, clock), hidden from the others
by the mask, while its RoPE positions still count 0..L-1. A new request is prefilled alone into a
cache of its own, exactly as `ErniePredictor.generate` runs it alone, and its keys and values are
copied in to end at the clock. A row then gets the same bits as alone: the masked slots add exact
zeros, and the CPU attention kernel's sum over the lanes is the same at any offset.

A request that arrives during a decode step while a slot is free is prefilled at the step's next layer
boundary (the model calls `between_layers` there: on CPU before each quarter of the layers), and joins
the batch once the step is done: its first token waits for at most a quarter of the step instead of the
rest of it (docs/serving.md has the measurements). With every slot taken, the step runs whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .device import import_paddle
from .generate import Row
from .model import MASKED, KVCache, causal_mask
from .sampling import GREEDY_BELOW  # the API's rule: float32 logits over a smaller temperature still fit float64

paddle = import_paddle()
log = logging.getLogger(__name__)

NUCLEUS_CANDIDATES = 1024  # top-p sorts only this many most likely ids when they hold the mass


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives returned per token; None: no logprobs
    prompt_logprobs: bool = False  # also the prompt's tokens' logprobs (echo)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before temperature and penalties), and the
    `top` most likely ids at its place with theirs."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """What a request is handed after a step. The last one has `finish_reason` ("stop", "length")
    or `error` set."""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFull(Exception):
    """The pool is busy and the queue is full, or the server is shutting down."""


class Request:
    """One prompt on its way through the engine. `emit` is called on the engine's thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Output], None],
                 timeout: float | None = None):
        self.prompt_ids, self.params, self.emit = prompt_ids, params, emit
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancelled = False
        self.done = False
        # Its own generator: rows never share random state, so a seeded request draws the same
        # tokens whatever runs beside it.
        self.rng = np.random.default_rng(params.seed)
        self.length = 0  # tokens in the KV cache
        self.prompt_cache: KVCache | None = None  # its prefill's keys and values, until it joins the batch
        self.last_token = 0
        self.row: Row | None = None
        self.counts: dict[int, int] = {}  # generated token -> times, for the OpenAI penalties
        self.seen: np.ndarray | None = None  # ids in the prompt or generated, for repetition_penalty


class Engine:
    def __init__(self, model, tokenizer, max_num_seqs: int = 8, max_model_len: int = 2048, max_queue: int = 64,
                 device: str = "cpu"):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.slots, self.max_model_len, self.max_queue, self.device = max_num_seqs, max_model_len, max_queue, device
        self.eos = set(self.config.eos_token_ids)
        paddle.set_device(device)
        self.cache = KVCache.allocate(self.config, max_num_seqs, max_model_len, model.dtype_name)
        self.running: list[Request] = []  # running[i] is in slot i
        self.joining: list[Request] = []  # taken from `waiting` for the free slots; running after the step
        self.waiting: deque[Request] = deque()
        self.prefilling = False  # a prefill is in progress (between_layers must not start another)
        self.clock = 0  # the cache index the next decode step writes at
        self.wake = threading.Condition()
        self.stopping = False
        self.drain_deadline = None
        self.thread = threading.Thread(target=self._loop, name="ernie-engine", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, request: Request):
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"all {self.slots} slots are busy and {len(self.waiting)} requests wait already")
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request):
        """Stop generating for `request` before the next step (no more outputs reach it)."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def shutdown(self, grace: float):
        """Take no more requests, fail the waiting ones, and give the running ones `grace` seconds."""
        with self.wake:
            self.stopping, self.drain_deadline = True, time.monotonic() + grace
            waiting, self.waiting = list(self.waiting), deque()
            self.wake.notify()
        for request in waiting:
            self._fail(request, "the server is shutting down")

    def join(self, timeout: float | None = None):
        self.thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def _loop(self):
        paddle.set_device(self.device)
        while True:
            with self.wake:
                while not (self.waiting or self.running or self.stopping):
                    self.wake.wait()
                if self.stopping and not self.running:
                    return
            self.step()

    def step(self):
        """One turn of the engine: waiting requests are prefilled while slots are free, ended ones
        leave, and the running batch decodes one token. The engine's thread runs it in a loop."""
        try:
            with paddle.no_grad():
                self._prefill_waiting()
                self._join()
                for request in [r for r in self.running if self._ended(r)]:
                    self._leave(request)
                if self.running:
                    self._decode()
                    self._join()
        except Exception as e:  # a failed step must not take the server down with it
            log.exception("generation step failed")
            for request in self.joining + self.running:
                self._fail(request, f"internal error: {type(e).__name__}: {e}")
            self.running, self.joining, self.clock = [], [], 0

    def _prefill_waiting(self):
        """Take waiting requests while slots are free and prefill them; they join with `_join`."""
        while True:
            with self.wake:
                if not self.waiting or len(self.running) + len(self.joining) >= self.slots:
                    return
                request = self.waiting.popleft()
                self.joining.append(request)
            if self._ended(request):
                self.joining.remove(request)
            else:
                self._prefill(request)

    def _prefill_between_layers(self):
        """Called before each decoder layer of a decode step: prefills what arrived."""
        if self.waiting and not self.prefilling:
            self._prefill_waiting()

    def _ended(self, request: Request) -> bool:
        """Whether `request` must stop now: cancelled (it has been told), out of time, or the
        server is past its shutdown grace (it is told so)."""
        now = time.monotonic()
        if request.cancelled:
            request.done = True
        elif request.deadline is not None and now > request.deadline:
            self._fail(request, "the request timed out (--request-timeout)")
        elif self.drain_deadline is not None and now > self.drain_deadline:
            self._fail(request, "the server is shutting down")
        return request.done

    def _fail(self, request: Request, message: str):
        if not request.done:
            request.done = True
            request.emit(Output(error=message, prompt_tokens=len(request.prompt_ids),
                                completion_tokens=len(request.row.token_ids) if request.row else 0))

    def _prefill(self, request: Request):
        """Run the prompt alone, as generate does, and hand the request its first token."""
        ids, params = request.prompt_ids, request.params
        length = len(ids)
        cache = KVCache.allocate(self.config, 1, length, self.model.dtype_name)
        self.prefilling = True
        try:
            logits = self.model(paddle.to_tensor([ids], dtype="int64"),
                                paddle.arange(length, dtype="int64").unsqueeze(0),
                                causal_mask(paddle.ones([1, length], "int64"), 0, length), cache, 0,
                                last_only=not params.prompt_logprobs).numpy()
        finally:
            self.prefilling = False
        request.row = Row(self.tokenizer, params.stop, self.eos)
        if params.repetition_penalty != 1.0:
            request.seen = np.zeros(self.config.vocab_size, bool)
            request.seen[ids] = True
        prompt_logprobs = None
        if params.prompt_logprobs:
            logits = logits[0]
            prompt_logprobs = [None] + [token_logprob(logits[i], ids[i + 1], params.logprobs or 0)
                                        for i in range(length - 1)]
        self._advance(request, logits[-1], prompt_logprobs)
        if request.done:
            self.joining.remove(request)
        else:
            request.prompt_cache, request.length = cache, length

    def _join(self):
        """The prefilled requests take the next slots, their keys ending at the clock."""
        for request in self.joining:
            slot, length = len(self.running), request.length
            if slot == 0:
                self.clock = length
            elif length > self.clock:
                self._shift(length - self.clock)
            new = request.prompt_cache
            for pool, keys in zip(self.cache.keys + self.cache.values, new.keys + new.values):
                pool[slot:slot + 1, :, self.clock - length:self.clock] = keys
            request.prompt_cache = None
            self.running.append(request)
        self.joining = []

    def _decode(self):
        if self.clock == self.max_model_len:  # every request fits a slot, so the longest leaves room
            self._shift(max(r.length for r in self.running) - self.clock)
        n, clock = len(self.running), self.clock
        tokens = np.array([[r.last_token] for r in self.running], np.int64)
        positions = np.array([[r.length] for r in self.running], np.int64)
        mask = np.full([n, 1, self.max_model_len], MASKED, np.float32)
        for i, r in enumerate(self.running):
            mask[i, 0, clock - r.length:clock + 1] = 0
        # The first n slots, sharing the pool's memory (the model writes this step's keys into it):
        # `_slice`, because with FLAGS_use_stride_kernel=0 (custom devices, NPU images) `k[:n]` is a copy.
        cache = KVCache([k._slice(0, n) for k in self.cache.keys], [v._slice(0, n) for v in self.cache.values])
        # Arrivals are prefilled between layers only into a free slot; with none, the step runs whole (on
        # CPU one operator instead of one a layer).
        free = n + len(self.joining) < self.slots
        logits = self.model(paddle.to_tensor(tokens), paddle.to_tensor(positions), paddle.to_tensor(mask), cache,
                            clock, last_only=True, between_layers=self._prefill_between_layers if free else None).numpy()
        self.clock += 1
        for i, request in enumerate(self.running):
            request.length += 1
            self._advance(request, logits[i])
        for request in [r for r in self.running if r.done]:
            self._leave(request)

    def _advance(self, request: Request, logits: np.ndarray, prompt_logprobs=None):
        """Choose the request's next token from its logits [V] and hand it the result."""
        params, row = request.params, request.row
        token = choose(adjusted(logits, request), params, request.rng)
        request.last_token = token
        request.counts[token] = request.counts.get(token, 0) + 1
        if request.seen is not None:
            request.seen[token] = True
        text = row.add(token)
        if not row.finish_reason and len(row.token_ids) >= params.max_tokens:
            text += row.finish("length")
        logprobs = [token_logprob(logits, token, params.logprobs)] if params.logprobs is not None else []
        request.done = row.finish_reason is not None
        request.emit(Output(text, [token], logprobs, prompt_logprobs, row.finish_reason,
                            prompt_tokens=len(request.prompt_ids), completion_tokens=len(row.token_ids)))

    def _leave(self, request: Request):
        """Free `request`'s slot: the last running request moves into it."""
        slot, last = self.running.index(request), len(self.running) - 1
        if slot != last:
            moved = self.running[last]
            for pool in self.cache.keys + self.cache.values:
                pool[slot:slot + 1, :, self.clock - moved.length:self.clock] = \
                    pool[last:last + 1, :, self.clock - moved.length:self.clock]
            self.running[slot] = moved
        self.running.pop()
        if not self.running:
            self.clock = 0
            return
        # Attention reads every index below the clock: when a quarter of them are no request's any
        # more, move the requests' keys down (a copy of the same size as one step's reads).
        unused = self.clock - max(r.length for r in self.running)
        if unused >= 16 and 4 * unused >= self.clock:
            self._shift(-unused)

    def _shift(self, by: int):
        """Move every running request's keys and values `by` cache indexes (and the clock)."""
        n, low = len(self.running), self.clock - max(r.length for r in self.running)
        for pool in self.cache.keys + self.cache.values:
            pool[:n, :, low + by:self.clock + by] = pool[:n, :, low:self.clock].clone()
        self.clock += by


def adjusted(logits: np.ndarray, request: Request) -> np.ndarray:
    """The logits after the request's penalties and logit_bias (the same float32 arithmetic as
    sampling.apply_repetition_penalty)."""
    params = request.params
    if request.seen is not None:
        penalised = np.where(logits > 0, logits / np.float32(params.repetition_penalty),
                             logits * np.float32(params.repetition_penalty))
        logits = np.where(request.seen, penalised, logits)
    if (params.presence_penalty or params.frequency_penalty) and request.counts:
        ids = np.fromiter(request.counts, np.int64)
        counts = np.fromiter(request.counts.values(), np.float32)
        logits = logits.copy()
        logits[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    if params.logit_bias:
        logits = logits.copy()
        for token, bias in params.logit_bias.items():
            logits[token] += np.float32(bias)
    return logits


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy below GREEDY_BELOW, else a draw after temperature, top_k and top_p (the ids kept as
    sampling.make_sampler keeps them)."""
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    ids = np.arange(scores.size)
    if 0 < params.top_k < scores.size:
        ids = np.argpartition(scores, -params.top_k)[-params.top_k:]
        scores = scores[ids]
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1:
        head = np.argpartition(-probs, NUCLEUS_CANDIDATES)[:NUCLEUS_CANDIDATES] \
            if probs.size > NUCLEUS_CANDIDATES else np.arange(probs.size)
        if probs[head].sum() < params.top_p:
            head = np.arange(probs.size)
        order = head[np.argsort(-probs[head], kind="stable")]
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < params.top_p
        ids, probs = ids[order[keep]], sorted_probs[keep]
        probs = probs / probs.sum()
    return int(ids[min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"), ids.size - 1)])


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log_softmax of the raw logits [V] at `token`, with the `top` most likely ids."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logprobs, min(top, logprobs.size - 1))[:top]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(int(token), float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])
