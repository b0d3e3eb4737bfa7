"""Samplers and logits processors as plain callables on float32 device logits [B, V].

Everything stays on the device (only the chosen ids [B] travel to the host), and in float32: on NPU
several of these ops have no bf16 kernel.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable

import numpy as np

from .device import import_paddle

paddle = import_paddle()
F = paddle.nn.functional

from .errors import ErnieError

Sampler = Callable[[paddle.Tensor], paddle.Tensor]
# Logits are float32: a temperature below its smallest normal number becomes 0 or loses its precision there.
GREEDY_BELOW = float(np.finfo(np.float32).tiny)
MAX_SEED = 2**64 - 1  # paddle.seed takes an unsigned 64-bit integer


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                   seed: int | None = None) -> dict:
    """The sampling parameters, checked and normalised for `make_sampler` and `paddle.seed`, as keyword
    arguments; the first bad one is an ErnieError naming it. A temperature too small for float32 is 0
    (greedy); a seed must be in 0..2**64-1 (not reduced into it). The API and the CLI call this; the
    server's request fields (serve.Sampling) and its engine take the same limits and greedy rule."""
    def number(name, value, test, what):
        try:
            number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond float range
            number = math.nan
        if not math.isfinite(number) or not test(number):
            raise ErnieError(f"{name} {value!r}: must be {what}")
        return number

    def integer(name, value, low, high, what):
        if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
            raise ErnieError(f"{name} {value!r}: must be {what}")
        return int(value)

    temperature = number("temperature", temperature, lambda v: v >= 0, "a finite number >= 0 (0 is greedy)")
    return dict(
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=integer("top_k", top_k, 0, math.inf, "an integer >= 0 (0 disables it)"),
        repetition_penalty=number("repetition_penalty", repetition_penalty, lambda v: v > 0,
                                  "a finite number > 0 (1 disables it)"),
        seed=None if seed is None else integer("seed", seed, 0, MAX_SEED, f"an integer in 0..{MAX_SEED} (2**64-1)"),
    )


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """temperature 0 is greedy; otherwise scale, keep the top_k ids and the top_p probability mass,
    and draw (reproducible after `paddle.seed`). Takes values `check_sampling` has passed."""
    if temperature == 0:
        return lambda logits: paddle.argmax(logits, axis=-1)

    def sample(logits):
        # Shifted so the largest is 0: however small the temperature, the scaled logits cannot overflow.
        logits = (logits - logits.max(axis=-1, keepdim=True)) / temperature
        if top_k > 0:
            kth = paddle.topk(logits, min(top_k, logits.shape[-1]), axis=-1)[0][:, -1:]
            logits = paddle.where(logits < kth, paddle.full_like(logits, float("-inf")), logits)
        if top_p >= 1:
            return paddle.multinomial(F.softmax(logits, axis=-1), 1).squeeze(-1)
        # Nucleus: in descending order keep each id whose preceding mass is below top_p
        # (the most likely id always survives), draw in sorted space, map back to ids.
        order = paddle.argsort(logits, axis=-1, descending=True)
        probs = F.softmax(paddle.take_along_axis(logits, order, axis=-1), axis=-1)
        before = paddle.cumsum(probs, axis=-1) - probs
        probs = paddle.where(before < top_p, probs, paddle.zeros_like(probs))
        pick = paddle.multinomial(probs / probs.sum(-1, keepdim=True), 1)
        return paddle.take_along_axis(order, pick, axis=-1).squeeze(-1)

    return sample


def apply_repetition_penalty(logits: paddle.Tensor, seen: paddle.Tensor, penalty: float) -> paddle.Tensor:
    """CTRL-style penalty on every id a row has seen (`seen` [B, V] > 0): positive logits are
    divided by `penalty`, negative ones multiplied."""
    penalised = paddle.where(logits > 0, logits / penalty, logits * penalty)
    return paddle.where(seen > 0, penalised, logits)
