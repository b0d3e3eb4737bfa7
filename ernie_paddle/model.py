"""The ERNIE 4.5 text models (dense, and MoE: 21B-A3B, 300B-A47B) as a Paddle dygraph Layer, in one file.

The attention projection is one fused [Q | K | V] matrix and the MLP one fused [GATE | UP] matrix,
as in the -Paddle checkpoints, but every weight matrix is held [out, in] (y = x @ W^T), as transformers
holds them: the -Paddle checkpoint's [in, out] matrices are transposed as they load. The CPU decoding
kernel reads 8 rows 1.5-1.7x as fast that way, and one row as fast (docs/performance.md).
Numerics follow transformers' `Ernie4_5ForCausalLM` and `Ernie4_5_MoeForCausalLM`: RMSNorm statistics,
interleaved RoPE, the attention softmax and the MoE router in float32, whatever the compute dtype.

The weight matrices may be held in a narrower dtype than the computation: float32 on CPU over
bfloat16 matrices (a bf16 checkpoint as it is stored), widened exactly where they are read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import cpu_ops, device, quant
from .config import ErnieConfig
from .device import import_paddle


paddle = import_paddle()
nn, F = paddle.nn, paddle.nn.functional
EagerParamBase = paddle.base.framework.EagerParamBase

MASKED = -1e30  # additive mask value: exp() underflows to exactly 0, and stays finite (no NaN rows)
# CPU decoder operator calls a step makes when the server may prefill between layers (decode_on_cpu)
BETWEEN_LAYER_CALLS = 4


def _weight(shape, dtype):
    """A weight as the model holds it: a tensor of `dtype`, or for "wint8" / "wint4" a Packed one."""
    if dtype in quant.FORMATS:
        return Packed(shape, dtype)
    # Uninitialised: the loader overwrites every weight; zero-filling them first took 1.0 s of a
    # 2.4 s load of the 0.3B model. Untouched yet, so a CPU weight can still get huge pages.
    weight = paddle.empty(list(shape), dtype)
    if weight.place.is_cpu_place():
        cpu_ops.advise_huge_pages(weight)
    return EagerParamBase.from_tensor(weight)


class Packed(nn.Layer):
    """A weight matrix [N, K], or a stack of experts' [E, N, K], quantized at load as wint8 / wint4
    (quant.py's layout: integers, and a float16 scale per group along K); the CPU kernels read it."""

    def __init__(self, shape, format: str):
        super().__init__()
        *lead, n, self.k = shape
        padded = -(-self.k // quant.GROUP) * quant.GROUP
        bits = quant.FORMATS[format]
        self.format = format
        self.data = _weight([*lead, n, padded * bits // 8], "int8" if bits == 8 else "uint8")
        self.scales = _weight([*lead, n, padded // quant.GROUP], "float16")

    @property
    def shape(self) -> list[int]:
        return [*self.data.shape[:-1], self.k]

    def dequantized(self, rows=None):
        """float32 [N, K], or [*rows.shape, K] of the given rows (an embedding lookup)."""
        if rows is None:
            return cpu_ops.dequantize(self.data, self.scales, self.k)
        return cpu_ops.dequantize_rows(self.data, self.scales, rows, self.k)


class RMSNorm(nn.Layer):
    def __init__(self, size: int, eps: float, dtype: str):
        super().__init__()
        self.weight = _weight([size], dtype)
        self.eps = eps
        self.fused = device.fused_op("rms_norm", dtype)

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps)
        if x.place.is_cpu_place() and x.dtype == paddle.float32 and cpu_ops.available():
            return cpu_ops.rms_norm(x, self.weight, self.eps)  # one op instead of six
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.astype(x.dtype)


def project(x, w):
    """x [..., K] @ w^T for a weight matrix w [N, K] as the model holds it (the tied embedding too,
    as the lm_head). On CPU, decoding (a few rows) runs the weight-streaming kernels of cpu_ops.py,
    which widen bfloat16 weights as they read them or take wint8 / wint4 ones as integers; longer
    inputs widen the matrix first for MKL. Without the kernels, for 8 to 32 rows MKL is 1.2-2.3x
    faster computing w @ x^T and transposing the small result."""
    rows = math.prod(x.shape[:-1])
    if isinstance(w, Packed):  # only on CPU, with the kernels (predictor.py checks)
        if rows <= cpu_ops.MAX_ROWS:
            return cpu_ops.quant_matmul(x, w.data, w.scales)
        return paddle.matmul(x, w.dequantized(), transpose_y=True)
    if not w.place.is_cpu_place():
        return paddle.matmul(x, w, transpose_y=True)
    if rows <= cpu_ops.MAX_ROWS and x.dtype == paddle.float32 and cpu_ops.available():
        return cpu_ops.matmul(x, w)
    if w.dtype != x.dtype:
        w = cpu_ops.widen(w) if cpu_ops.available() else w.astype(x.dtype)
    if 8 <= rows <= 32:
        return paddle.matmul(w, x.reshape([rows, -1]), transpose_y=True).t().reshape([*x.shape[:-1], -1])
    return paddle.matmul(x, w, transpose_y=True)


class Rope:
    """Interleaved ("rotate every two") RoPE: channel pairs (2j, 2j+1) rotate by position * freq_j,
    in float32. A rotation is x * cos + swap_pairs(x) * sin, with each angle repeated for its pair
    and sin negated on even channels."""

    def __init__(self, config: ErnieConfig):
        d = config.head_dim
        freqs = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        self.freqs = paddle.to_tensor(np.repeat(freqs, 2))
        self.signs = paddle.to_tensor(np.tile(np.array([-1, 1], np.float32), d // 2))
        swap = np.arange(d).reshape(-1, 2)[:, ::-1].flatten()
        self.swap = paddle.to_tensor(swap)
        # On CPU the swap as a matmul with a permutation matrix: exact in float32 and twice as fast
        # as index_select, which was a tenth of a 512-token prefill. Not elsewhere: GPUs may run
        # float32 matmuls in TF32.
        self.swap_matrix = paddle.to_tensor(np.eye(d, dtype=np.float32)[:, swap]) \
            if paddle.device.get_device() == "cpu" else None
        self.compression_ratio = config.compression_ratio
        self.heads = config.num_attention_heads + config.num_key_value_heads

    def swap_pairs(self, h):
        if self.swap_matrix is not None:
            return paddle.matmul(h, self.swap_matrix)
        return paddle.index_select(h, self.swap, axis=-1)

    def at(self, positions: paddle.Tensor) -> "Rotation":
        """The rotation for integer positions [B, T]; on CPU one operator (the decoder operator's)."""
        if positions.place.is_cpu_place() and cpu_ops.available():
            return Rotation(*cpu_ops.rotation(positions, self.freqs, self.compression_ratio), self)
        pos = positions.astype("float32")
        if self.compression_ratio != 1.0:
            pos = pos / self.compression_ratio
        angles = (pos.unsqueeze(-1) * self.freqs).unsqueeze(2)
        return Rotation(paddle.cos(angles), paddle.sin(angles) * self.signs, self)


class Rotation:
    """RoPE at a batch of positions: `cos`, `sin` [B, T, 1, D] (sin negated on even channels).
    Calling it rotates x [B, T, heads + kv_heads, D], queries and keys together."""

    def __init__(self, cos, sin, rope: Rope):
        self.cos, self.sin, self.swap_pairs, self.heads = cos, sin, rope.swap_pairs, rope.heads

    @functools.cached_property
    def full(self):
        # Expanded to every head once, at the first layer (not for the CPU operators, which take cos and
        # sin): full-shape elementwise ops are several times cheaper than broadcasting ones on CPU, and
        # each layer does four of them.
        shape = [*self.cos.shape[:2], self.heads, self.cos.shape[-1]]
        return self.cos.expand(shape), self.sin.expand(shape)

    def __call__(self, x):
        h = x.astype("float32")
        full_cos, full_sin = self.full
        return (h * full_cos + self.swap_pairs(h) * full_sin).astype(x.dtype)


def attention_on_cpu(x, cache) -> bool:
    """Whether attention goes to the CPU attention op of cpu_ops.py: with a KV cache, float32 on CPU."""
    return cache is not None and x.place.is_cpu_place() and x.dtype == paddle.float32 and cpu_ops.available()


def decoder_on_cpu(input_ids, cache, dtype: str) -> bool:
    """Whether the model runs as one CPU operator (cpu_ops.decoder), from the embedding to the lm_head: a few
    rows, float32 compute on CPU, with a KV cache (as the attention operator of cpu_ops.py)."""
    return cache is not None and cache.keys[0].place.is_cpu_place() and dtype == "float32" and cpu_ops.available() \
        and 0 < math.prod(input_ids.shape) <= cpu_ops.MAX_ROWS


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
    def __init__(self, config: ErnieConfig, dtype: str, weight_dtype: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = _weight([(self.heads + 2 * self.kv_heads) * self.head_dim, config.hidden_size], weight_dtype)
        self.o_proj = _weight([config.hidden_size, self.heads * self.head_dim], weight_dtype)
        self.scale = self.head_dim ** -0.5
        self.fused = device.fused_op("attention", dtype)

    def forward(self, x, rotate, mask, cache_kv, start: int):
        b, t, _ = x.shape
        d, h, kvh = self.head_dim, self.heads, self.kv_heads
        qkv = project(x, self.qkv_proj)
        if attention_on_cpu(x, cache_kv):
            out = cpu_ops.attention(qkv, rotate.cos, rotate.sin, *cache_kv, mask, start, h, self.scale)
            return project(out, self.o_proj)
        qkv = qkv.reshape([b, t, h + 2 * kvh, d])
        qk, v = paddle.split(qkv, [h + kvh, kvh], axis=2)
        q, k = paddle.split(rotate(qk), [h, kvh], axis=2)
        k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
        if cache_kv is not None:
            keys, values = cache_kv
            keys[:, :, start:start + t] = k
            values[:, :, start:start + t] = v
            if start > 0 and keys.place.is_cpu_place():
                # Over the whole cache, the mask hiding what is not written yet: on CPU a slice of the
                # filled part is a strided view that matmul first copies, 8x the attention's cost at
                # batch 8. Elsewhere the slice is cheap and the cache may be much longer.
                k, v = keys, values
            elif start > 0:
                k, v, mask = keys[:, :, :start + t], values[:, :, :start + t], mask[..., :start + t]
        if self.fused is not None:
            return paddle.matmul(self.fused(q, k, v, mask).reshape([b, t, h * d]), self.o_proj, transpose_y=True)
        # GQA without repeating K/V: query head j uses kv head j // groups, so fold the groups of
        # each kv head into the query-length axis: [B, kv_heads, groups * T, D].
        groups = h // kvh
        q = q.transpose([0, 2, 1, 3]).reshape([b, kvh, groups * t, d]) * self.scale
        scores = paddle.matmul(q, k, transpose_y=True).astype("float32") + mask
        probs = F.softmax(scores, axis=-1).astype(x.dtype)
        out = paddle.matmul(probs, v).reshape([b, h, t, d]).transpose([0, 2, 1, 3]).reshape([b, t, h * d])
        return project(out, self.o_proj)

    def expand_mask(self, mask):
        """The additive mask [B, T, S] as `forward` takes it: as is for the fused op; for the plain
        path expanded to the folded score shape [B, kv_heads, groups * T, S], once per model call,
        because adding a broadcast mask in every layer is several times slower on CPU."""
        if self.fused is not None:
            return mask
        b, t, s = mask.shape
        kvh, groups = self.kv_heads, self.heads // self.kv_heads
        return mask.unsqueeze([1, 2]).expand([b, kvh, groups, t, s]).reshape([b, kvh, groups * t, s])


class MLP(nn.Layer):
    def __init__(self, config: ErnieConfig, weight_dtype: str, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.up_gate_proj = _weight([2 * size, config.hidden_size], weight_dtype)
        self.down_proj = _weight([config.hidden_size, size], weight_dtype)

    def forward(self, x):
        return project(swiglu(project(x, self.up_gate_proj)), self.down_proj)


class MoE(nn.Layer):
    """The mixture-of-experts MLP of the MoE models (21B-A3B, 300B-A47B), as transformers'
    Ernie4_5_MoeSparseMoeBlock computes it: a float32 router chooses `top_k` experts by softmax score
    plus a per-expert correction bias, weighs their outputs by the scores (without the bias)
    renormalised to sum to 1, and the shared experts, one plain MLP, add theirs for every token.
    The experts' matrices are stacked, [experts, out, in]."""

    def __init__(self, config: ErnieConfig, weight_dtype: str):
        super().__init__()
        moe, hidden = config.moe, config.hidden_size
        self.top_k, self.norm_min = moe.top_k, moe.norm_min
        self.gate = _container(weight=_weight([moe.num_experts, hidden], "float32"))
        self.moe_statics = _container(e_score_correction_bias=_weight([1, moe.num_experts], "float32"))
        self.experts = _container(
            up_gate_proj=_weight([moe.num_experts, 2 * moe.intermediate_size, hidden], weight_dtype),
            down_proj=_weight([moe.num_experts, hidden, moe.intermediate_size], weight_dtype))
        self.shared_experts = MLP(config, weight_dtype, moe.intermediate_size * moe.num_shared_experts) \
            if moe.num_shared_experts else None

    def route(self, h):
        """The experts chosen for each row of h [M, H], [M, top_k] int64, and their weights, float32. On CPU
        one operator, the router of the decoder operator (ErnieForCausalLM.decode_on_cpu): the same bits."""
        bias = self.moe_statics.e_score_correction_bias
        if h.place.is_cpu_place() and cpu_ops.available():
            return cpu_ops.route(h.astype("float32"), self.gate.weight, bias, self.top_k, self.norm_min)
        scores = F.softmax(project(h.astype("float32"), self.gate.weight), axis=-1)
        _, chosen = paddle.topk(scores + bias, self.top_k)
        weights = paddle.take_along_axis(scores, chosen, axis=-1)
        return chosen, weights / paddle.clip(weights.sum(-1, keepdim=True), min=self.norm_min)

    def forward(self, x):
        h = x.reshape([-1, x.shape[-1]])
        chosen, weights = self.route(h)
        out = routed_experts(h, chosen, weights.astype(x.dtype), self.experts.up_gate_proj, self.experts.down_proj)
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)
        return out.reshape(x.shape)


def routed_experts(h, chosen, weights, up_gate, down):
    """h [M, H] through the experts `chosen` [M, k], summed with `weights` [M, k]. The (token, expert)
    pairs are sorted by expert, so that each chosen expert's matrices are read once for all its rows."""
    rows, k = chosen.shape
    experts = up_gate.shape[0]
    flat = chosen.flatten()
    order = paddle.argsort(flat, stable=True)
    offsets = paddle.concat([paddle.zeros([1], "int64"),
                             paddle.cumsum(paddle.bincount(flat, minlength=experts)).astype("int64")])
    by_expert = paddle.gather(h, order // k)
    out = project_grouped(swiglu(project_grouped(by_expert, up_gate, offsets)), down, offsets)
    out = paddle.scatter(paddle.zeros_like(out), order, out)  # back to (token, slot) order
    # Each token's k outputs added in slot order: the same sum alone and in a batch.
    return (out.reshape([rows, k, -1]) * weights.unsqueeze(-1)).sum(1)


def project_grouped(x, w, offsets):
    """Rows offsets[e]..offsets[e + 1] of x [R, K] @ w[e]^T, for stacked matrices w [E, N, K]. On CPU
    one kernel call that streams each used expert's matrix once (cpu_ops.py); elsewhere an expert at
    a time."""
    if isinstance(w, Packed):
        return cpu_ops.grouped_quant_matmul(x, w.data, w.scales, offsets)
    if w.place.is_cpu_place() and x.dtype == paddle.float32 and cpu_ops.available():
        return cpu_ops.grouped_matmul(x, w, offsets)
    bounds = offsets.numpy().tolist()
    parts = [project(x[a:b], w[e]) for e, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]
    return paddle.concat(parts)


def _container(**parameters) -> nn.Layer:
    """A sublayer holding only parameters, for checkpoint names such as `mlp.gate.weight`."""
    layer = nn.Layer()
    for name, value in parameters.items():
        setattr(layer, name, value)
    return layer


def swiglu(h):
    """silu of the first half of h ([GATE | UP]) times the second, in one op."""
    if h.place.is_cpu_place() and h.dtype == paddle.float32 and cpu_ops.available():
        return cpu_ops.swiglu(h)  # 16 exps at a time, on every core
    return F.swiglu(h)


class DecoderLayer(nn.Layer):
    def __init__(self, config: ErnieConfig, dtype: str, weight_dtype: str, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, weight_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        moe = config.moe is not None and config.moe.is_moe_layer(index)
        self.mlp = MoE(config, weight_dtype) if moe else MLP(config, weight_dtype)

    def forward(self, x, rotate, mask, cache_kv, start):
        x = x + self.self_attn(self.input_layernorm(x), rotate, mask, cache_kv, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cpu_weights(self) -> tuple:
        """The layer's weights as cpu_ops.layer_weights takes them."""
        mlp, router = self.mlp, None
        if isinstance(mlp, MoE):
            router = (mlp.gate.weight, mlp.moe_statics.e_score_correction_bias, mlp.experts.up_gate_proj,
                      mlp.experts.down_proj)
            mlp = mlp.shared_experts
        up_gate, down = (mlp.up_gate_proj, mlp.down_proj) if mlp is not None else (None, None)
        return (self.input_layernorm.weight, self.self_attn.qkv_proj, self.self_attn.o_proj,
                self.post_attention_layernorm.weight, up_gate, down, router)


class ErnieForCausalLM(nn.Layer):
    """ERNIE 4.5 decoder, dense or MoE (config.moe). Parameter names are the -Paddle checkpoint names
    (`ernie.layers.0.self_attn.qkv_proj.weight` is `ernie.layers[0].self_attn.qkv_proj`).
    `dtype` is the computation's; `weight_dtype` that of the weight matrices and the embedding, by
    default the same (bfloat16 under float32 is the one mix `project` supports, on CPU)."""

    def __init__(self, config: ErnieConfig, dtype: str = "float32", weight_dtype: str | None = None):
        super().__init__()
        weight_dtype = weight_dtype or dtype
        self.config = config
        self.dtype_name, self.weight_dtype = dtype, weight_dtype
        head_dtype = quant.head_format(weight_dtype, config.hidden_size) if weight_dtype in quant.FORMATS \
            else weight_dtype
        self.ernie = nn.Layer()
        self.ernie.embed_tokens = _weight([config.vocab_size, config.hidden_size], head_dtype)
        self.ernie.layers = nn.LayerList([DecoderLayer(config, dtype, weight_dtype, i)
                                          for i in range(config.num_hidden_layers)])
        self.ernie.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else \
            _weight([config.vocab_size, config.hidden_size], head_dtype)
        self.rope = Rope(config)

    def load_targets(self) -> dict[str, tuple]:
        """Where each -Paddle checkpoint tensor goes (the Linear weights transposed: [out, in]):
        (parameter or Packed, None), or (a stack of experts' matrices, expert index) for an expert's."""
        held = {name: p for name, p in self.named_parameters()}
        for name, packed in self.named_sublayers():
            if isinstance(packed, Packed):
                del held[f"{name}.data"], held[f"{name}.scales"]
                held[name] = packed
        out = {}
        for name, p in held.items():
            layer, _, last = name.rpartition(".")
            if layer.endswith(".experts"):
                out.update({f"{layer}.{e}.{last}.weight": (p, e) for e in range(p.shape[0])})
            else:
                out[_checkpoint_name(name)] = (p, None)
        return out

    def weights(self) -> dict[str, paddle.Tensor]:
        """The weights by -Paddle checkpoint name (Linear weights [out, in]; an expert's, a slice of its
        stack, or a Packed stack whole)."""
        return {name: p if e is None or isinstance(p, Packed) else p[e] for name, (p, e) in self.load_targets().items()}

    def forward(self, input_ids, positions, mask, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False, between_layers=None):
        """input_ids, positions: [B, T] int64; mask: additive float32 [B, T, S], causal, over the S
        keys attended: the T new tokens when `start` is 0 or there is no cache, else the whole cache
        (the positions not written yet masked).
        Returns float32 logits [B, T, V], or [B, V] for the last position when `last_only`.
        `between_layers`, if given, is called before each layer (the server prefills arrivals there;
        the CPU decoder calls it before each quarter of the layers)."""
        if decoder_on_cpu(input_ids, cache, self.dtype_name):
            return self.decode_on_cpu(input_ids, positions, mask, cache, start, last_only, between_layers)
        table = self.ernie.embed_tokens
        x = table.dequantized(input_ids) if isinstance(table, Packed) else F.embedding(input_ids, table)
        if self.weight_dtype != self.dtype_name:
            x = x.astype(self.dtype_name)
        rotate = self.rope.at(positions)
        if not attention_on_cpu(x, cache):
            mask = self.ernie.layers[0].self_attn.expand_mask(mask)
        for i, layer in enumerate(self.ernie.layers):
            if between_layers is not None:
                between_layers()
            cache_kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = layer(x, rotate, mask, cache_kv, start)
        if last_only:
            x = x[:, -1]
        x = self.ernie.norm(x)
        return project(x, self.head).astype("float32")

    @property
    def head(self):
        """The lm_head matrix: the tied embedding, or a matrix of its own."""
        return self.ernie.embed_tokens if self.lm_head is None else self.lm_head

    @functools.cached_property
    def cpu_layer_weights(self) -> list[list]:
        # Built once: the loader writes into the parameters' tensors in place, so these stay the model's.
        return cpu_ops.layer_weights([layer.cpu_weights() for layer in self.ernie.layers])

    def decode_on_cpu(self, input_ids, positions, mask, cache: KVCache, start: int, last_only: bool,
                      between_layers):
        """The model as one CPU operator when it takes a few rows (decoding, short prompts): the kernels
        its sublayers call, in their order, without their operator dispatches and Python calls (30-60 us
        a layer: a tenth of a wint4 0.3B decoding step). With `between_layers`, one call for each
        quarter of the layers, each after calling it: an arrival waits at most a quarter of the step."""
        attn, moe, rope = self.ernie.layers[0].self_attn, self.config.moe, self.rope
        settings = dict(heads=attn.heads, scale=attn.scale, eps=self.ernie.norm.eps, rope_ratio=rope.compression_ratio,
                        top_k=moe.top_k if moe else 0, norm_min=moe.norm_min if moe else 0.0,
                        embedding=self.ernie.embed_tokens)
        ends = dict(final_norm=self.ernie.norm.weight, head=self.head, last_only=last_only)
        layers, n = self.cpu_layer_weights, len(self.ernie.layers)
        if between_layers is None:
            return cpu_ops.decoder(input_ids, positions, rope.freqs, mask, cache.keys, cache.values, start, layers,
                                   **settings, **ends)
        x, per_call = input_ids, -(-n // BETWEEN_LAYER_CALLS)
        for i in range(0, n, per_call):
            between_layers()
            j = min(n, i + per_call)
            x = cpu_ops.decoder(x, positions, rope.freqs, mask, cache.keys[i:j], cache.values[i:j], start,
                                [weights[i:j] for weights in layers], **settings, **(ends if j == n else {}))
        return x


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
