"""The dense ERNIE 4.5 model as a Paddle dygraph Layer, in one file.

Weights are held in the published -Paddle layout: Linear weights are [in, out] (y = x @ W), the
attention projection is one fused [Q | K | V] matrix and the MLP one fused [GATE | UP] matrix.
Numerics follow transformers' `Ernie4_5ForCausalLM`: RMSNorm statistics, interleaved RoPE and the
attention softmax in float32, whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import device
from .config import ErnieConfig
from .device import import_paddle

paddle = import_paddle()
nn, F = paddle.nn, paddle.nn.functional

MASKED = -1e30  # additive mask value: exp() underflows to exactly 0, and stays finite (no NaN rows)


def _weight(layer: nn.Layer, shape, dtype) -> paddle.Tensor:
    # Zero-filled: the loader overwrites every weight, so random init would be wasted time.
    return layer.create_parameter(list(shape), dtype=dtype, default_initializer=nn.initializer.Constant(0.0))


class RMSNorm(nn.Layer):
    def __init__(self, size: int, eps: float, dtype: str):
        super().__init__()
        self.weight = _weight(self, [size], dtype)
        self.eps = eps
        self.fused = device.fused_op("rms_norm_npu", dtype)

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps)
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.astype(x.dtype)


def rope_angles(config: ErnieConfig, positions: paddle.Tensor):
    """cos and sin [B, T, 1, D/2] in float32 for integer positions [B, T]."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    pos = positions.astype("float32")
    if config.compression_ratio != 1.0:
        pos = pos / config.compression_ratio
    angles = pos.unsqueeze(-1) * paddle.to_tensor(inv_freq.astype(np.float32))
    return paddle.cos(angles).unsqueeze(2), paddle.sin(angles).unsqueeze(2)


def apply_rope(x, cos, sin):
    """Interleaved ("rotate every two") RoPE on [B, T, heads, D]: channel pairs (2j, 2j+1) rotate."""
    b, t, h, d = x.shape
    pairs = x.astype("float32").reshape([b, t, h, d // 2, 2])
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape([b, t, h, d]).astype(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys and values for every layer, [B, kv_heads, max_len, D]; written in place."""
    keys: list
    values: list

    @classmethod
    def allocate(cls, config: ErnieConfig, batch: int, max_len: int, dtype: str) -> "KVCache":
        shape = [batch, config.num_key_value_heads, max_len, config.head_dim]
        n = config.num_hidden_layers
        return cls([paddle.zeros(shape, dtype) for _ in range(n)], [paddle.zeros(shape, dtype) for _ in range(n)])


class Attention(nn.Layer):
    def __init__(self, config: ErnieConfig, dtype: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = _weight(self, [config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim], dtype)
        self.o_proj = _weight(self, [self.heads * self.head_dim, config.hidden_size], dtype)
        self.scale = self.head_dim ** -0.5
        self.fused = device.fused_op("flash_attention_npu", dtype)

    def forward(self, x, cos, sin, mask, cache_kv, start: int):
        b, t, _ = x.shape
        d, h, kvh = self.head_dim, self.heads, self.kv_heads
        q, k, v = paddle.split(paddle.matmul(x, self.qkv_proj), [h * d, kvh * d, kvh * d], axis=-1)
        q = apply_rope(q.reshape([b, t, h, d]), cos, sin)
        k = apply_rope(k.reshape([b, t, kvh, d]), cos, sin).transpose([0, 2, 1, 3])
        v = v.reshape([b, t, kvh, d]).transpose([0, 2, 1, 3])
        if cache_kv is not None:
            keys, values = cache_kv
            keys[:, :, start:start + t] = k
            values[:, :, start:start + t] = v
            k, v = keys[:, :, :start + t], values[:, :, :start + t]
        if self.fused is not None:
            return paddle.matmul(self.fused(q, k, v, mask).reshape([b, t, h * d]), self.o_proj)
        # GQA without repeating K/V: query head j uses kv head j // groups, so fold the groups of
        # each kv head into the query-length axis: [B, kv_heads, groups * T, D].
        groups = h // kvh
        q = q.transpose([0, 2, 1, 3]).reshape([b, kvh, groups * t, d])
        scores = paddle.matmul(q, k, transpose_y=True) * self.scale
        s = scores.shape[-1]
        scores = scores.astype("float32").reshape([b, kvh, groups, t, s]) + mask
        probs = F.softmax(scores, axis=-1).astype(x.dtype).reshape([b, kvh, groups * t, s])
        out = paddle.matmul(probs, v).reshape([b, h, t, d]).transpose([0, 2, 1, 3]).reshape([b, t, h * d])
        return paddle.matmul(out, self.o_proj)


class MLP(nn.Layer):
    def __init__(self, config: ErnieConfig, dtype: str):
        super().__init__()
        self.up_gate_proj = _weight(self, [config.hidden_size, 2 * config.intermediate_size], dtype)
        self.down_proj = _weight(self, [config.intermediate_size, config.hidden_size], dtype)

    def forward(self, x):
        gate, up = paddle.chunk(paddle.matmul(x, self.up_gate_proj), 2, axis=-1)
        return paddle.matmul(F.silu(gate) * up, self.down_proj)


class DecoderLayer(nn.Layer):
    def __init__(self, config: ErnieConfig, dtype: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(self, x, cos, sin, mask, cache_kv, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ErnieForCausalLM(nn.Layer):
    """ERNIE 4.5 dense decoder. Parameter names are the -Paddle checkpoint names
    (`ernie.layers.0.self_attn.qkv_proj.weight` is `ernie.layers[0].self_attn.qkv_proj`)."""

    def __init__(self, config: ErnieConfig, dtype: str = "float32"):
        super().__init__()
        self.config = config
        self.dtype_name = dtype
        self.ernie = nn.Layer()
        self.ernie.embed_tokens = _weight(self.ernie, [config.vocab_size, config.hidden_size], dtype)
        self.ernie.layers = nn.LayerList([DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])
        self.ernie.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else _weight(self, [config.hidden_size, config.vocab_size], dtype)

    def weights(self) -> dict[str, paddle.Tensor]:
        """Parameters by their -Paddle checkpoint name."""
        return {_checkpoint_name(name): p for name, p in self.named_parameters()}

    def forward(self, input_ids, positions, mask, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False):
        """input_ids, positions: [B, T] int64; mask: additive float32 [B, T, S] over the S keys seen
        (cache positions 0..start+T, or the T new tokens when there is no cache).
        Returns float32 logits [B, T, V], or [B, V] for the last position when `last_only`."""
        x = F.embedding(input_ids, self.ernie.embed_tokens)
        cos, sin = rope_angles(self.config, positions)
        mask = mask.unsqueeze([1, 2])  # broadcast over [kv heads, groups]
        for i, layer in enumerate(self.ernie.layers):
            cache_kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = layer(x, cos, sin, mask, cache_kv, start)
        if last_only:
            x = x[:, -1]
        x = self.ernie.norm(x)
        if self.lm_head is None:
            logits = paddle.matmul(x, self.ernie.embed_tokens, transpose_y=True)
        else:
            logits = paddle.matmul(x, self.lm_head)
        return logits.astype("float32")


def _checkpoint_name(parameter_name: str) -> str:
    # The fused projections and the embedding are plain parameters on their parent layer;
    # the checkpoint names them `<layer>.weight`.
    if parameter_name.endswith((".qkv_proj", ".o_proj", ".up_gate_proj", ".down_proj", ".embed_tokens")) \
            or parameter_name == "lm_head":
        return parameter_name + ".weight"
    return parameter_name


def causal_mask(key_valid: paddle.Tensor, start: int, length: int) -> paddle.Tensor:
    """Additive float32 mask [B, T, S] for T new queries at positions start..start+T-1 over the
    S = start + T keys; `key_valid` [B, S] is 1 for real tokens and 0 for left padding."""
    s = start + length
    query_pos = paddle.arange(start, s, dtype="int64").unsqueeze(-1)
    key_pos = paddle.arange(0, s, dtype="int64").unsqueeze(0)
    visible = (key_pos <= query_pos).unsqueeze(0) & (key_valid[:, :s].unsqueeze(1) > 0)
    return paddle.where(visible, paddle.zeros([], "float32"), paddle.full([], MASKED, "float32"))
