"""Samplers and logits processors as plain callables on float32 device logits [B, V].

Everything stays on the device (only the chosen ids [B] travel to the host), and in float32: on NPU
several of these ops have no bf16 kernel.
"""

from __future__ import annotations

from typing import Callable

from .device import import_paddle

paddle = import_paddle()
F = paddle.nn.functional

from .errors import ErnieError

Sampler = Callable[[paddle.Tensor], paddle.Tensor]


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """temperature 0 is greedy; otherwise scale, keep the top_k ids and the top_p probability mass,
    and draw (reproducible after `paddle.seed`)."""
    if temperature < 0:
        raise ErnieError(f"temperature {temperature}: must be >= 0")
    if top_k < 0:
        raise ErnieError(f"top_k {top_k}: must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise ErnieError(f"top_p {top_p}: must be in (0, 1]")
    if temperature == 0:
        return lambda logits: paddle.argmax(logits, axis=-1)

    def sample(logits):
        logits = logits / temperature
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
