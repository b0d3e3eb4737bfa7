"""The prefill / decode loop: a batch of prompts, left-padded, with a preallocated KV cache;
per-row stop conditions (eos, stop strings, max_new_tokens) and streaming text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .device import import_paddle
from .model import MASKED, ErnieForCausalLM, KVCache, causal_mask
from .sampling import apply_repetition_penalty, make_sampler
from .tokenizer import Tokenizer

paddle = import_paddle()


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def left_padded(prompts: list[list[int]], new_tokens: int, pad_id: int = 0):
    """A batch of prompts left-padded to the longest (P tokens), with room for `new_tokens` more:
    token ids [B, P], positions and valid [B, P + new_tokens] int64. Each row's positions count its
    real tokens only and `valid` is 0 on its padding, so a row yields what it would alone."""
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    ids = np.full([batch, prompt_len], pad_id, dtype=np.int64)
    valid = np.ones([batch, prompt_len + new_tokens], dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, prompt_len - len(prompt):] = prompt
        valid[row, :prompt_len - len(prompt)] = 0
    positions = np.maximum(valid.cumsum(-1) - 1, 0)
    return paddle.to_tensor(ids), paddle.to_tensor(positions), paddle.to_tensor(valid)


def step_masks(valid: paddle.Tensor):
    """For a decoding step's query at position p: mask(p) [B, 1, total] over the whole cache, hiding
    the padding and the positions after p."""
    zero, masked = paddle.zeros([], "float32"), paddle.full([], MASKED, "float32")
    padding = paddle.where(valid > 0, zero, masked).unsqueeze(1)
    cache_positions = paddle.arange(valid.shape[1], dtype="int64")
    return lambda p: padding + paddle.where(cache_positions > p, masked, zero)


def decode_steps(model: ErnieForCausalLM, prompts: list[list[int]], settings: GenerationSettings,
                 pad_id: int = 0) -> Iterator[np.ndarray]:
    """Yield the next token id of every row, [B] int64, step after step (the caller stops early)."""
    config = model.config
    sample = make_sampler(settings.temperature, settings.top_k, settings.top_p)
    if settings.seed is not None:
        paddle.seed(settings.seed)
    tokens, positions, valid = left_padded(prompts, settings.max_new_tokens, pad_id)
    batch, prompt_len = tokens.shape
    step_mask = step_masks(valid)
    cache = KVCache.allocate(config, batch, valid.shape[1], model.dtype_name)
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = paddle.zeros([batch, config.vocab_size], "float32")
        seen = paddle.put_along_axis(seen, tokens, valid[:, :prompt_len].astype("float32"), axis=-1, reduce="add")
    with paddle.no_grad():
        logits = model(tokens, positions[:, :prompt_len], causal_mask(valid, 0, prompt_len), cache, 0, last_only=True)
        for step in range(settings.max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
            token = sample(logits)
            yield token.numpy()
            if step + 1 == settings.max_new_tokens:
                return
            token = token.reshape([batch, 1])
            if seen is not None:
                seen = paddle.put_along_axis(seen, token, paddle.ones([batch, 1], "float32"), axis=-1, reduce="add")
            pos = prompt_len + step
            logits = model(token, positions[:, pos:pos + 1], step_mask(pos), cache, pos, last_only=True)


@dataclass
class Row:
    """One prompt's output as it grows: token ids, visible text, why it stopped."""
    tokenizer: Tokenizer
    stop: list[str]
    eos_ids: set
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    emitted: int = 0

    def __post_init__(self):
        self.detokenizer = self.tokenizer.detokenizer()

    def add(self, token: int) -> str:
        """Take one generated token; return the text that became final."""
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.text += self.detokenizer.finish()
            self.finish_reason = "stop"
            return self.flush()
        self.text += self.detokenizer.add(token)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return self.flush()
        # Hold back a tail that could still grow into a stop string.
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self.flush(len(self.text) - hold)

    def flush(self, upto: int | None = None) -> str:
        upto = len(self.text) if upto is None else upto
        piece, self.emitted = self.text[self.emitted:upto], max(self.emitted, upto)
        return piece

    def finish(self, reason: str) -> str:
        self.text += self.detokenizer.finish()
        self.finish_reason = reason
        return self.flush()


@dataclass
class Chunk:
    """What `ErniePredictor.stream` yields: the new text of one step for one row."""
    text: str
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    row: int = 0


def stream_batch(model: ErnieForCausalLM, tokenizer: Tokenizer, prompts: list[list[int]],
                 settings: GenerationSettings) -> Iterator[Chunk]:
    """Generate for a batch; yield a Chunk per row per step until every row has stopped.
    The last chunk of each row carries its finish_reason."""
    eos = set(model.config.eos_token_ids)
    rows = [Row(tokenizer, list(settings.stop or []), eos) for _ in prompts]
    start = time.perf_counter()
    first_token_at = None
    steps = decode_steps(model, prompts, settings, pad_id=tokenizer.pad_id)
    for step, tokens in enumerate(steps):
        now = time.perf_counter()
        first_token_at = first_token_at or now
        last = step + 1 == settings.max_new_tokens
        for i, row in enumerate(rows):
            if row.finish_reason:
                continue
            text = row.add(int(tokens[i]))
            if not row.finish_reason and last:
                text += row.finish("length")
            prefill = first_token_at - start
            decode = now - first_token_at
            yield Chunk(text, int(tokens[i]), row.finish_reason, len(prompts[i]), len(row.token_ids),
                        len(prompts[i]) / prefill if prefill > 0 else 0.0,
                        (len(row.token_ids) - 1) / decode if decode > 0 else 0.0, i)
        if all(row.finish_reason for row in rows):
            steps.close()
            return
