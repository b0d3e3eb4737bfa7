"""One config object for ERNIE 4.5, read from and written to either layout's config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ErnieError

DENSE_ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
MOE_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)
PT_ARCHITECTURE = {"dense": "Ernie4_5ForCausalLM", "moe": "Ernie4_5_MoeForCausalLM"}
PADDLE_ARCHITECTURE = {"dense": "Ernie4_5_ForCausalLM", "moe": "Ernie4_5_MoeForCausalLM"}
PT_MODEL_TYPE = {"dense": "ernie4_5", "moe": "ernie4_5_moe"}

# Keys only Paddle-side tools read. A -PT config keeps them nested under PADDLE_CONFIG_KEY, where no
# PT-side reader picks them up by accident, so that converting back to -Paddle restores them.
PADDLE_ONLY_KEYS = (
    "compression_ratio", "fuse_rms_norm", "fuse_rope", "fuse_linear", "fuse_swiglu", "fuse_attn_ffn",
    "fuse_ln", "fuse_gate_detach_matmul", "use_flash_attention", "use_rmsnorm", "max_sequence_length",
    "paddlenlp_version", "use_fast_ln", "weight_share_add_bias", "rope_reorder", "freq_allocation",
    "add_tail_layers", "global_aux_loss", "moe_aux_loss_lambda", "moe_group_orthogonal_loss",
    "moe_orthogonal_loss_lambda", "moe_z_loss_lambda", "model_name",
)
PADDLE_CONFIG_KEY = "paddle_config"
# Keys that only transformers writes; dropped on the way to -Paddle.
PT_ONLY_KEYS = ("torch_dtype", "dtype", "rope_parameters", "transformers_version", "_name_or_path")

# MoE keys of the published ERNIE 4.5 MoE configs (21B-A3B, 300B-A47B, -Paddle and -PT) and what the model
# does with each. Honoured: MoeSettings below. Accepted with one value only: the ones transformers'
# Ernie4_5_MoeForCausalLM implements; another value is refused, since it would compute something else.
# The rest are read by training only (moe_capacity, the aux / z / orthogonal loss weights,
# multi_token_pred_lambda, ...) or describe the multi-token-prediction layers (num_nextn_predict_layers),
# whose tensors the loader skips: nothing in inference depends on them.
MOE_FIXED_VALUES = {
    "moe_gate": ("topk",), "moe_gate_act": ("softmax",), "moe_use_aux_free": (True,),
    "moe_norm_gate_logits": (True,),
}
# The same for every ERNIE 4.5 text model: RMSNorm (RoPE without scaling: _check_rope).
FIXED_VALUES = {"use_rmsnorm": (True,)}


def _check_fixed_values(raw: dict, fixed: dict, source: str):
    for key, allowed in fixed.items():
        if key in raw and raw[key] not in allowed:
            raise ErnieError(f"{source}: {key} = {json.dumps(raw[key])} is not supported (ERNIE 4.5 text models use "
                             f"{json.dumps(allowed[0])}, as transformers' implementation does)")


def _check_rope(raw: dict, source: str):
    """Plain RoPE: rope_scaling and rope_parameters absent, null, or of type "default"."""
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ErnieError(f"{source}: {key} = {json.dumps(value)} is not a JSON object")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            raise ErnieError(f"{source}: {key} asks for RoPE type {json.dumps(rope_type)}, which is not supported "
                             "(ERNIE 4.5 text models use plain RoPE, type \"default\", as transformers' implementation does)")


def _integer(raw: dict, key: str, default=None) -> int:
    """raw[key] (or `default` when absent) as an int: 2.7, "2", true and null are refused, not rounded."""
    value = raw[key] if default is None else raw.get(key, default)
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{key} {value!r} is not an integer")
    return int(value)


@dataclass(frozen=True)
class MoeSettings:
    """The mixture-of-experts part of an ERNIE 4.5 MoE config (transformers' Ernie4_5_MoeConfig)."""
    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared_experts: int
    layer_start: int
    layer_end: int
    layer_interval: int
    norm_min: float

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.layer_interval == 0 and self.layer_start <= i <= self.layer_end


def _moe_settings(raw: dict, layers: int, source: str) -> MoeSettings:
    _check_fixed_values(raw, MOE_FIXED_VALUES, source)
    for key in ("moe_num_experts", "moe_intermediate_size", "moe_layer_start_index", "moe_layer_end_index", "moe_k"):
        if isinstance(raw.get(key), (list, tuple)):
            raise ErnieError(f"{source}: {key} is a list {raw[key]!r}: that is a multimodal (VL) ERNIE 4.5 "
                             "config; only the text models are supported")
    try:  # transformers' defaults
        end = _integer(raw, "moe_layer_end_index", -1)
        moe = MoeSettings(
            num_experts=_integer(raw, "moe_num_experts", 64), top_k=_integer(raw, "moe_k", 6),
            intermediate_size=_integer(raw, "moe_intermediate_size", 1536),
            num_shared_experts=_integer(raw, "moe_num_shared_experts", 2),
            layer_start=_integer(raw, "moe_layer_start_index", 1), layer_end=layers - 1 if end == -1 else end,
            layer_interval=_integer(raw, "moe_layer_interval", 1), norm_min=float(raw.get("moe_norm_min", 1e-12)))
    except (TypeError, ValueError) as e:
        raise ErnieError(f"{source}: bad value ({e})") from None
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ErnieError(f"{source}: moe_k {moe.top_k} must be between 1 and moe_num_experts {moe.num_experts}")
    if moe.intermediate_size < 1 or moe.num_shared_experts < 0 or moe.layer_interval < 1:
        raise ErnieError(f"{source}: moe_intermediate_size, moe_num_shared_experts and moe_layer_interval "
                         "must be positive")
    return moe


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, tokenizer_config.json, ...); bad content is an ErnieError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErnieError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ErnieError(f"{path}: expected a JSON object")
    return data


@dataclass
class ErnieConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    compression_ratio: float = 1.0
    dtype: str = "bfloat16"
    kind: str = "dense"  # "dense" or "moe"
    moe: MoeSettings | None = None
    extra: dict = field(default_factory=dict)  # every other key of the source file, carried over

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ErnieConfig":
        raw = {**(raw.get(PADDLE_CONFIG_KEY) or {}), **raw}
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        model_type = raw.get("model_type")
        if arch in MOE_ARCHITECTURES or model_type == "ernie4_5_moe":
            kind = "moe"
        elif arch in DENSE_ARCHITECTURES or (arch is None and model_type == "ernie4_5"):
            kind = "dense"
        else:
            raise ErnieError(
                f"{source}: architecture {arch or model_type!r} is not ERNIE 4.5 "
                f"(expected one of {', '.join(DENSE_ARCHITECTURES + MOE_ARCHITECTURES)})")
        _check_rope(raw, source)
        try:
            heads = _integer(raw, "num_attention_heads")
            hidden = _integer(raw, "hidden_size")
            rope = raw.get("rope_parameters") or {}
            cfg = cls(
                vocab_size=_integer(raw, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_integer(raw, "intermediate_size"),
                num_hidden_layers=_integer(raw, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=_integer(raw, "num_key_value_heads") if raw.get("num_key_value_heads") else heads,
                head_dim=_integer(raw, "head_dim") if raw.get("head_dim") else (hidden // heads if heads > 0 else 0),
                rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 500000.0))),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=_integer(raw, "max_position_embeddings", 131072),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                use_bias=bool(raw.get("use_bias", False)),
                hidden_act=raw.get("hidden_act", "silu"),
                pad_token_id=raw.get("pad_token_id", 0),
                bos_token_id=raw.get("bos_token_id", 1),
                eos_token_id=raw.get("eos_token_id", 2),
                compression_ratio=float(raw.get("compression_ratio", 1.0)),
                dtype=raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
                kind=kind,
            )
        except KeyError as e:
            raise ErnieError(f"{source}: missing key {e.args[0]!r}; is this an ERNIE 4.5 config.json?") from None
        except (TypeError, ValueError) as e:
            raise ErnieError(f"{source}: bad value ({e})") from None
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(cfg, key) < 1:
                raise ErnieError(f"{source}: {key} is {getattr(cfg, key)}; it must be a positive integer")
        if not (0 < cfg.rope_theta < math.inf and 0 <= cfg.rms_norm_eps < math.inf):  # NaN fails too
            raise ErnieError(f"{source}: rope_theta {cfg.rope_theta} must be finite and > 0, rms_norm_eps "
                             f"{cfg.rms_norm_eps} finite and >= 0")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ErnieError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        if cfg.hidden_act != "silu":
            raise ErnieError(f"{source}: hidden_act {cfg.hidden_act!r} is not supported (ERNIE 4.5 uses silu)")
        if cfg.use_bias:
            raise ErnieError(f"{source}: use_bias true is not supported (no ERNIE 4.5 text model has biases)")
        _check_fixed_values(raw, FIXED_VALUES, source)
        if kind == "moe":
            cfg.moe = _moe_settings(raw, cfg.num_hidden_layers, source)
        known = set(cls.__dataclass_fields__) | {"architectures", "model_type", "rope_parameters",
                                                 "torch_dtype", "dtype", PADDLE_CONFIG_KEY}
        cfg.extra = {k: v for k, v in raw.items() if k not in known}
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ErnieConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ErnieError(f"{file}: not found; a model directory needs its config.json")
        return cls.from_dict(read_json(file), str(file))

    def _common(self) -> dict:
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "use_bias": self.use_bias,
            "hidden_act": self.hidden_act, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }

    def to_pt_dict(self, dtype: str | None = None) -> dict:
        """config.json for the -PT layout: `torch_dtype` (FastDeploy reads it as the layout flag)."""
        out = {"architectures": [PT_ARCHITECTURE[self.kind]], "model_type": PT_MODEL_TYPE[self.kind]}
        out.update(self._common())
        out["torch_dtype"] = dtype or self.dtype
        out.update({k: v for k, v in self.extra.items() if k not in PADDLE_ONLY_KEYS})
        paddle_only = {k: v for k, v in self.extra.items() if k in PADDLE_ONLY_KEYS}
        if self.compression_ratio != 1.0:
            paddle_only["compression_ratio"] = self.compression_ratio
        if paddle_only:
            out[PADDLE_CONFIG_KEY] = paddle_only
        return out

    def to_paddle_dict(self, dtype: str | None = None) -> dict:
        """config.json for the -Paddle layout: every value Paddle defaults differently stated explicitly."""
        out = {"architectures": [PADDLE_ARCHITECTURE[self.kind]], "model_type": PT_MODEL_TYPE[self.kind]}
        out.update(self._common())
        out["dtype"] = dtype or self.dtype
        if self.compression_ratio != 1.0:
            out["compression_ratio"] = self.compression_ratio
        out.update({k: v for k, v in self.extra.items() if k not in PT_ONLY_KEYS})
        return out
