"""The tensor rules between the two ERNIE 4.5 layouts, stated once, as data.

Each rule names one -Paddle tensor, the -PT tensors it corresponds to, and how data moves:
  COPY       same array (embeddings, norms, MoE score bias)
  TRANSPOSE  Paddle Linear stores [in, out], torch [out, in]
  FUSE       Paddle concatenates the transposed -PT parts along its last (output) axis:
             qkv_proj = [Q | K | V] split by head counts, up_gate_proj = [GATE | UP] in halves.
There is no q/k permutation: both layouts use the same interleaved RoPE channel order.
The converters and the model loader both use `checked_plan()` and `to_paddle()` / `to_pt()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ernie_paddle.checkpoint import same_values
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ErnieError

COPY, TRANSPOSE, FUSE = "copy", "transpose", "fuse"

_L = "layers.{i}"
_E = "experts.{e}"
RULES = [
    # (Paddle name, -PT names, how)
    ("ernie.embed_tokens.weight", ("model.embed_tokens.weight",), COPY),
    ("ernie.norm.weight", ("model.norm.weight",), COPY),
    ("lm_head.weight", ("lm_head.weight",), TRANSPOSE),
    (f"ernie.{_L}.input_layernorm.weight", (f"model.{_L}.input_layernorm.weight",), COPY),
    (f"ernie.{_L}.post_attention_layernorm.weight", (f"model.{_L}.post_attention_layernorm.weight",), COPY),
    (f"ernie.{_L}.self_attn.qkv_proj.weight",
     tuple(f"model.{_L}.self_attn.{p}_proj.weight" for p in "qkv"), FUSE),
    (f"ernie.{_L}.self_attn.o_proj.weight", (f"model.{_L}.self_attn.o_proj.weight",), TRANSPOSE),
    (f"ernie.{_L}.mlp.up_gate_proj.weight", (f"model.{_L}.mlp.gate_proj.weight", f"model.{_L}.mlp.up_proj.weight"), FUSE),
    (f"ernie.{_L}.mlp.down_proj.weight", (f"model.{_L}.mlp.down_proj.weight",), TRANSPOSE),
    # MoE layers (21B-A3B, 300B-A47B): router in float32, experts and shared experts like the dense MLP.
    (f"ernie.{_L}.mlp.gate.weight", (f"model.{_L}.mlp.gate.weight",), TRANSPOSE),
    (f"ernie.{_L}.mlp.moe_statics.e_score_correction_bias", (f"model.{_L}.mlp.moe_statics.e_score_correction_bias",), COPY),
    (f"ernie.{_L}.mlp.{_E}.up_gate_proj.weight",
     (f"model.{_L}.mlp.{_E}.gate_proj.weight", f"model.{_L}.mlp.{_E}.up_proj.weight"), FUSE),
    (f"ernie.{_L}.mlp.{_E}.down_proj.weight", (f"model.{_L}.mlp.{_E}.down_proj.weight",), TRANSPOSE),
    (f"ernie.{_L}.mlp.shared_experts.up_gate_proj.weight",
     (f"model.{_L}.mlp.shared_experts.gate_proj.weight", f"model.{_L}.mlp.shared_experts.up_proj.weight"), FUSE),
    (f"ernie.{_L}.mlp.shared_experts.down_proj.weight", (f"model.{_L}.mlp.shared_experts.down_proj.weight",), TRANSPOSE),
]

# Tensors that transformers does not load (multi-token-prediction heads): skipped, with a note.
SKIPPED = re.compile(r"^(ernie\.|model\.)?mtp_")

# The MoE router stays float32 when other weights are cast: its logits choose the experts.
ROUTER = re.compile(r"\.mlp\.(gate\.weight|moe_statics\.e_score_correction_bias)$")


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern + "$")


_MATCHERS = {
    "paddle": [(_regex(paddle), paddle, pts, how) for paddle, pts, how in RULES],
    "pt": [(_regex(pt), paddle, pts, how) for paddle, pts, how in RULES for pt in pts],
}
_LAYOUT_NAME = {"paddle": "-Paddle", "pt": "-PT"}
EMBEDDING = {"paddle": "ernie.embed_tokens.weight", "pt": "model.embed_tokens.weight"}


@dataclass(frozen=True)
class Group:
    """One -Paddle tensor and the -PT tensors it is made of."""
    paddle: str
    pt: tuple[str, ...]
    how: str


def split_sizes(paddle_name: str, config: ErnieConfig, width: int) -> list[int]:
    """Output-axis sizes of the parts of a fused -Paddle tensor of last-axis `width`."""
    if paddle_name.endswith("qkv_proj.weight"):
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        return [q, kv, kv]
    return [width // 2, width // 2]


def check_tied_head(config: ErnieConfig, shapes: dict, layout: str):
    """A tied model's `lm_head.weight`, when a -Paddle file carries one, is the embedding [V, H]. An
    [H, V] head is an untied model whose config.json says tied (or leaves the key out: Paddle-side
    code defaults to untied, transformers to tied); loading it as tied would silently drop the head."""
    shape = shapes.get("lm_head.weight")
    V, H = config.vocab_size, config.hidden_size
    if layout == "paddle" and config.tie_word_embeddings and shape is not None and tuple(shape) == (H, V) != (V, H):
        raise ErnieError(f"tensor 'lm_head.weight' is an untied head [{H}, {V}], but config.json ties the "
                         "embeddings (tie_word_embeddings true or absent); add \"tie_word_embeddings\": false to it")


def plan(names, layout: str, tied: bool | None = None) -> tuple[list[Group], list[str]]:
    """Group a checkpoint's tensor names (of `layout`, 'pt' or 'paddle') into rules.
    Returns (groups, skipped names). A tied lm_head copy in a -Paddle file maps to nothing in -PT."""
    groups: dict[str, Group] = {}
    seen: dict[str, set] = {}
    skipped = []
    for name in names:
        if SKIPPED.match(name):
            skipped.append(name)
            continue
        group = match(name, layout)
        if group is None:
            raise ErnieError(f"tensor {name!r} is not part of the ERNIE 4.5 {_LAYOUT_NAME[layout]} layout")
        if group.paddle == "lm_head.weight" and tied:
            skipped.append(name)
            continue
        groups[group.paddle] = group
        seen.setdefault(group.paddle, set()).add(name)
    if layout == "pt":
        for g in groups.values():
            missing = [p for p in g.pt if p not in seen[g.paddle]]
            if missing:
                raise ErnieError(f"tensor {missing[0]!r} is missing (needed with {sorted(seen[g.paddle])[0]!r} "
                                 f"to build {g.paddle!r})")
    return list(groups.values()), skipped


def match(name: str, layout: str) -> Group | None:
    """The group a tensor name of `layout` belongs to, or None."""
    for rx, paddle, pts, how in _MATCHERS[layout]:
        if m := rx.match(name):
            fill = m.groupdict()
            return Group(paddle.format(**fill), tuple(p.format(**fill) for p in pts), how)
    return None


def paddle_names(config: ErnieConfig) -> list[str]:
    """The -Paddle tensors of the model config.json describes, named as the model's `load_targets` names
    its parameters: what loading fills and what a checkpoint must hold, in either layout."""
    names = ["ernie.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        layer = f"ernie.layers.{i}"
        names += [f"{layer}.input_layernorm.weight", f"{layer}.self_attn.qkv_proj.weight",
                  f"{layer}.self_attn.o_proj.weight", f"{layer}.post_attention_layernorm.weight"]
        moe = config.moe
        if moe is None or not moe.is_moe_layer(i):
            names += [f"{layer}.mlp.up_gate_proj.weight", f"{layer}.mlp.down_proj.weight"]
            continue
        names += [f"{layer}.mlp.gate.weight", f"{layer}.mlp.moe_statics.e_score_correction_bias"]
        for e in range(moe.num_experts):
            names += [f"{layer}.mlp.experts.{e}.up_gate_proj.weight", f"{layer}.mlp.experts.{e}.down_proj.weight"]
        if moe.num_shared_experts:
            names += [f"{layer}.mlp.shared_experts.up_gate_proj.weight", f"{layer}.mlp.shared_experts.down_proj.weight"]
    names.append("ernie.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def check_complete(groups: list[Group], config: ErnieConfig, layout: str):
    """The groups make exactly the model config.json describes: none missing, none without a place."""
    expected = paddle_names(config)
    held, known = {g.paddle: g for g in groups}, set(expected)
    extra = next((g for name, g in held.items() if name not in known), None)
    if extra:
        name = extra.paddle if layout == "paddle" else extra.pt[0]
        raise ErnieError(f"tensor {name!r} has no place in the {config.kind} ERNIE 4.5 model that config.json "
                         "describes; use the config.json that belongs to these weights")
    missing = [name for name in expected if name not in held]
    if missing == ["lm_head.weight"]:
        raise ErnieError("config.json says tie_word_embeddings is false, but there is no lm_head.weight; "
                         "set it to true if the model shares its embedding")
    if layout == "pt":
        missing = [pt for name in missing for pt in match(name, "paddle").pt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ErnieError(f"tensor {missing[0]!r}{more} is missing, but the {config.kind} ERNIE 4.5 model that "
                         "config.json describes needs it; download the complete checkpoint, or use the "
                         "config.json that belongs to these weights")


def check_tied_copy(source, config: ErnieConfig, layout: str):
    """A tied checkpoint's own `lm_head.weight` is skipped as a copy of the embedding only if it is one,
    bit for bit: a distinct head under a tied config.json would otherwise be dropped without a word."""
    if not config.tie_word_embeddings or "lm_head.weight" not in source.tensors:
        return
    embedding = EMBEDDING[layout]
    if not same_values(source, "lm_head.weight", embedding):
        raise ErnieError(f"{source.tensors['lm_head.weight'].file}: tensor 'lm_head.weight' differs from the "
                         f"embedding {embedding!r} although config.json ties them (tie_word_embeddings true or "
                         "absent); set \"tie_word_embeddings\": false to use lm_head.weight as the head, or "
                         "remove the tensor")


def checked_plan(source, config: ErnieConfig, layout: str, where) -> tuple[list[Group], list[str]]:
    """`plan` of a whole checkpoint (`source`: a Checkpoint, or anything with its `tensors`, `dtype` and
    `read`), its groups in file order, refused (naming `where`) unless they make exactly the model
    config.json describes; a tied lm_head copy is compared with the embedding before it is skipped."""
    rank = {file: i for i, file in enumerate(dict.fromkeys(t.file for t in source.tensors.values()))}
    names = sorted(source.tensors, key=lambda n: (rank[source.tensors[n].file], source.tensors[n].start))
    try:
        check_tied_head(config, {n: t.shape for n, t in source.tensors.items()}, layout)
        groups, skipped = plan(names, layout, config.tie_word_embeddings)
        check_complete(groups, config, layout)
    except ErnieError as e:
        raise ErnieError(f"{where}: {e}") from None
    check_tied_copy(source, config, layout)
    return groups, skipped


def to_paddle(group: Group, parts: list[np.ndarray]) -> np.ndarray:
    """-PT arrays of one group -> the -Paddle array."""
    if group.how == COPY:
        return parts[0]
    if group.how == TRANSPOSE:
        return parts[0].T
    return np.concatenate([p.T for p in parts], axis=-1)


def to_pt(group: Group, array: np.ndarray, config: ErnieConfig) -> list[np.ndarray]:
    """The -Paddle array of one group -> its -PT arrays, in `group.pt` order."""
    if group.how == COPY:
        return [array]
    if group.how == TRANSPOSE:
        return [array.T]
    bounds = np.cumsum(split_sizes(group.paddle, config, array.shape[-1]))[:-1]
    return [part.T for part in np.split(array, bounds, axis=-1)]


def paddle_shape(group: Group, pt_shapes: list[tuple]) -> tuple:
    if group.how == COPY:
        return tuple(pt_shapes[0])
    if group.how == TRANSPOSE:
        return tuple(reversed(pt_shapes[0]))
    return (pt_shapes[0][1], sum(s[0] for s in pt_shapes))


def pt_shapes(group: Group, shape: tuple, config: ErnieConfig) -> list[tuple]:
    if group.how == COPY:
        return [tuple(shape)]
    if group.how == TRANSPOSE:
        return [tuple(reversed(shape))]
    return [(size, shape[0]) for size in split_sizes(group.paddle, config, shape[-1])]


def expected_paddle_shape(paddle_name: str, config: ErnieConfig) -> tuple | None:
    """The shape config.json implies for a -Paddle tensor (None where the rule has no fixed shape)."""
    H, V, D = config.hidden_size, config.vocab_size, config.head_dim
    NH, NKV, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    moe_i = config.extra.get("moe_intermediate_size", I)
    if isinstance(moe_i, list):
        moe_i = moe_i[0]
    E = config.extra.get("moe_num_experts")
    if isinstance(E, list):
        E = E[0]
    shared = moe_i * (config.extra.get("moe_num_shared_experts") or 0)
    suffixes = [
        ("embed_tokens.weight", (V, H)), ("norm.weight", (H,)), ("layernorm.weight", (H,)),
        ("qkv_proj.weight", (H, (NH + 2 * NKV) * D)), ("o_proj.weight", (NH * D, H)),
        ("shared_experts.up_gate_proj.weight", (H, 2 * shared)), ("shared_experts.down_proj.weight", (shared, H)),
        ("gate.weight", (H, E)), ("e_score_correction_bias", (1, E)),
    ]
    if ".experts." in paddle_name:
        suffixes += [("up_gate_proj.weight", (H, 2 * moe_i)), ("down_proj.weight", (moe_i, H))]
    suffixes += [("up_gate_proj.weight", (H, 2 * I)), ("down_proj.weight", (I, H))]
    if paddle_name == "lm_head.weight":
        return (V, H) if config.tie_word_embeddings else (H, V)
    for suffix, shape in suffixes:
        if paddle_name.endswith(suffix):
            return None if None in shape else shape
    return None
