"""Deployment configs for FastDeploy, vLLM and vLLM-Ascend: check a model directory and the options
against what the targeted engine release accepts, then write the engine's YAML, a launch script, a
smoke test and a README into one directory. Everything is validated before anything is written.

What each release accepts is data (deploy_rules.py, read from the engines' own sources); the checks,
the YAML keys and the launch script below all follow those rows."""

from __future__ import annotations

import errno
import json
import math
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from converters.convert import staged

from .checkpoint import Checkpoint
from .config import ErnieConfig
from .deploy_rules import (DEFAULT_FASTDEPLOY_VERSION, DEVICE_MEMORY_GB, DEVICES_PER_NODE, FASTDEPLOY,
                           FASTDEPLOY_BATCHED_TOKENS_CHUNKED, FASTDEPLOY_BATCHED_TOKENS_V1, FASTDEPLOY_MAX_NUM_SEQS,
                           FASTDEPLOY_MIN_MODEL_LEN, FASTDEPLOY_RECIPE_TP, FASTDEPLOY_TORCH_TRANSFORMERS_ABOVE,
                           PUBLISHED_MODELS, VLLM, FastDeployRelease)
from .errors import ErnieError

# Per engine: the config file name, how options are spelled in it, defaults (per device where they
# differ) and the command launch.sh runs.
ENGINES = {
    "fastdeploy": {
        "config": "fastdeploy.yaml", "sep": "_", "default_device": "gpu",
        "port": 8180, "max_model_len": 32768, "max_num_seqs": 128, "gpu_memory_utilization": 0.9,
        "command": 'python -m fastdeploy.entrypoints.openai.api_server --model "$MODEL" --config "$HERE/{config}"',
    },
    "vllm": {
        "config": "vllm.yaml", "sep": "-", "default_device": "gpu",
        "port": 8000, "max_model_len": 4096, "max_num_seqs": 64, "gpu_memory_utilization": 0.9,
        "command": 'vllm serve "$MODEL" --config "$HERE/{config}"',
    },
    "vllm-ascend": {
        "config": "vllm.yaml", "sep": "-", "default_device": "npu",
        "port": 8000, "max_model_len": 4096, "max_num_seqs": 64, "gpu_memory_utilization": 0.8,
        "command": 'vllm serve "$MODEL" --config "$HERE/{config}"',
    },
}
# A CPU server holds the KV cache in host RAM: fewer sequences by default.
DEVICE_DEFAULTS = {"cpu": {"max_num_seqs": 8}}
# vLLM dtype per device: bf16 needs avx512_bf16 / AMX to be fast on a CPU, float32 runs everywhere
# (and equals the float32 reference); Atlas 300I Duo users set float16 (no bf16 there).
VLLM_DTYPE = {"gpu": "auto", "cpu": "float32", "npu": "bfloat16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Where a device is asked of the wrong engine: what serves it (FastDeploy has no released Ascend path).
DEVICE_HINT = {
    "npu": "use `ernie-paddle deploy vllm-ascend` (or `ernie-paddle serve --device npu`)",
    "gpu": "use `ernie-paddle deploy fastdeploy` or `ernie-paddle deploy vllm`",
    "cpu": "use `ernie-paddle deploy vllm --device cpu` (or `ernie-paddle serve --device cpu`)",
    "xpu": "use `ernie-paddle deploy fastdeploy --device xpu`",
    "dcu": "use `ernie-paddle deploy fastdeploy --device dcu`",
    "iluvatar": "use `ernie-paddle deploy fastdeploy --device iluvatar`",
}
CONVERT_TO = {"pt": "ernie-paddle convert paddle2pt {model} {model}-PT",
              "paddle": "ernie-paddle convert pt2paddle {model} {model}-Paddle"}
LAYOUT_NAMES = {"pt": "-PT", "paddle": "-Paddle"}

# Weight quantizations per engine/device (FastDeploy names; vLLM runs these models unquantized).
# GPU: docs/best_practices/ERNIE-4.5-*-Paddle.md; XPU: docs/usage/kunlunxin_xpu_deployment.md (wint4
# for the MoE models only); DCU / Iluvatar: their installation docs use wint8.
QUANTIZATIONS = {
    ("fastdeploy", "gpu"): ("none", "wint8", "wint4", "block_wise_fp8"),
    ("fastdeploy", "xpu"): ("none", "wint8"),
    ("fastdeploy", "dcu"): ("none", "wint8"),
    ("fastdeploy", "iluvatar"): ("none", "wint8"),
    ("vllm", "gpu"): ("none",), ("vllm", "cpu"): ("none",), ("vllm-ascend", "npu"): ("none",),
}
MOE_ONLY_QUANTIZATIONS = {("fastdeploy", "xpu"): ("wint4",)}

# Environment each device needs, exported unless already set. The visible-devices variable gets 0..TP-1.
VISIBLE_DEVICES = {"gpu": "CUDA_VISIBLE_DEVICES", "xpu": "XPU_VISIBLE_DEVICES", "dcu": "HIP_VISIBLE_DEVICES",
                   "iluvatar": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
DEVICE_ENV = {
    "dcu": {"FD_ATTENTION_BACKEND": "BLOCK_ATTN"},  # docs/get_started/installation/hygon_dcu.md
    # docs/get_started/installation/iluvatar_gpu.md: every serving script exports all three.
    "iluvatar": {"PADDLE_XCCL_BACKEND": "iluvatar_gpu", "LD_PRELOAD": "/usr/local/corex/lib64/libcuda.so.1",
                 "FD_SAMPLING_CLASS": "rejection"},
}
BLOCK_SIZE = {"iluvatar": 16}                  # FastDeploy's default is 64; the Iluvatar docs pass 16
PREFIX_CACHING_DEVICES = ("gpu", "xpu")        # FastDeploy turns it off elsewhere (config.py __post_init__)

# Options that mean something only to FastDeploy: (args attribute, flag).
FASTDEPLOY_ONLY = (("kv_cache_ratio", "--kv-cache-ratio"), ("metrics_port", "--metrics-port"),
                   ("engine_worker_queue_port", "--engine-worker-queue-port"),
                   ("cache_queue_port", "--cache-queue-port"), ("fastdeploy_version", "--fastdeploy-version"))
VLLM_ONLY = (("dtype", "--dtype"),)
FASTDEPLOY_PORTS = ("port", "metrics_port", "engine_worker_queue_port", "cache_queue_port")

SMOKE_PROMPT = "The capital of France is"


@dataclass
class Plan:
    """Everything decided about one deployment, validated; `write_deployment` only renders it."""
    engine: str
    device: str
    model_ref: str
    served_name: str
    layout: str
    kind: str
    quantization: str
    release: FastDeployRelease | None   # the FastDeploy release targeted; None for vLLM
    settings: dict                      # engine config, our underscored names, in file order
    env: dict = field(default_factory=dict)         # exported unless already set
    fixed_env: dict = field(default_factory=dict)   # always exported
    memory: Memory | None = None
    notes: list = field(default_factory=list)

    @property
    def config_name(self) -> str:
        return ENGINES[self.engine]["config"]

    @property
    def target(self) -> str:
        if self.release:
            return f"FastDeploy {self.release.version}"
        return f"{self.engine} {VLLM[self.engine].version}"

    def engine_config(self) -> dict:
        sep = ENGINES[self.engine]["sep"]
        return {key.replace("_", sep): value for key, value in self.settings.items()}


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _first_release(holds) -> str | None:
    return next((version for version, release in FASTDEPLOY.items() if holds(release)), None)


def _resolve_release(args) -> FastDeployRelease | None:
    if args.engine != "fastdeploy":
        return None
    version = args.fastdeploy_version or DEFAULT_FASTDEPLOY_VERSION
    if version not in FASTDEPLOY:
        raise ErnieError(f"--fastdeploy-version {version}: not a FastDeploy 2.x release this tool knows; "
                         f"choose one of {', '.join(FASTDEPLOY)}")
    return FASTDEPLOY[version]


def _resolve_device(args, release: FastDeployRelease | None) -> str:
    engine = args.engine
    device = args.device or ENGINES[engine]["default_device"]
    devices = release.devices if release else VLLM[engine].devices
    if device not in devices:
        since = _first_release(lambda r: device in r.devices) if release else None
        if since:
            raise ErnieError(f"--device {device}: FastDeploy {release.version} has no {device} serving; "
                             f"target --fastdeploy-version {since} or later")
        raise ErnieError(f"--device {device}: {engine} does not serve on {device}; {DEVICE_HINT[device]}")
    engine_only = FASTDEPLOY_ONLY if engine != "fastdeploy" else VLLM_ONLY
    for name, flag in engine_only:
        if getattr(args, name, None) is not None:
            raise ErnieError(f"{flag}: not a {engine} option; drop it")
    return device


def layouts(engine: str, device: str, release: FastDeployRelease | None) -> tuple:
    """The checkpoint layouts the engine loads there, the preferred first: FastDeploy reads -PT only
    where its v1 loader runs; vLLM loads the transformers (-PT) layout only."""
    if release is None:
        return ("pt",)
    return ("pt", "paddle") if device in release.pt_devices else ("paddle",)


def _read_model(model: str) -> tuple[ErnieConfig, dict, str]:
    directory = Path(model)
    if directory.exists() and not directory.is_dir():
        raise ErnieError(f"--model {model}: not a directory; pass the model's directory (the one holding "
                         "config.json)")
    if not directory.is_dir():
        raise ErnieError(f"--model {model}: no such directory; deploy checks a local copy of the model "
                         "(for a hub id, download it first: `huggingface-cli download ID --local-dir DIR`, "
                         "and pass the id as --model-ref)")
    config = ErnieConfig.from_dir(directory)
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    checkpoint = Checkpoint(directory)  # a missing shard or a truncated file is an error here
    try:
        layout = checkpoint.layout
    finally:
        checkpoint.close()
    return config, raw, layout


def _check_layout(engine: str, device: str, layout: str, release: FastDeployRelease | None, model: str):
    accepted = layouts(engine, device, release)
    if layout in accepted:
        return
    fix = CONVERT_TO[accepted[0]].format(model=model.rstrip("/"))
    if release is None:
        raise ErnieError(f"--model {model}: a {LAYOUT_NAMES[layout]} checkpoint, but {engine} loads only "
                         f"{LAYOUT_NAMES[accepted[0]]}; convert it with `{fix}`")
    since = _first_release(lambda r: device in r.pt_devices)
    later = f"FastDeploy {since} or later reads -PT there, " if since else ""
    raise ErnieError(f"--model {model}: a -PT checkpoint, but FastDeploy {release.version} on {device} loads "
                     f"only -Paddle; {later}or convert it with `{fix}`")


def _torch_format_env(raw: dict, layout: str, model: str, release: FastDeployRelease) -> dict:
    """FastDeploy reads the layout from config.json alone (config.py read_model_config): `torch_dtype`
    means torch, `dtype` Paddle, both or neither is refused; from 2.5 `dtype` with transformers_version
    above 4.56 means torch too."""
    keys = [key for key in ("torch_dtype", "dtype") if key in raw]
    where = f"{model.rstrip('/')}/config.json"
    if len(keys) == 2:
        keep = "torch_dtype" if layout == "pt" else "dtype"
        raise ErnieError(f"{where}: has both `torch_dtype` and `dtype`, which FastDeploy refuses; "
                         f"keep only `{keep}` for this {LAYOUT_NAMES[layout]} checkpoint")
    if not keys:
        key = "torch_dtype" if layout == "pt" else "dtype"
        raise ErnieError(f'{where}: has neither `torch_dtype` nor `dtype`, which FastDeploy refuses; '
                         f'add "{key}": "bfloat16" for this {LAYOUT_NAMES[layout]} checkpoint')
    if layout == "paddle" and keys == ["torch_dtype"]:
        raise ErnieError(f"{where}: `torch_dtype` makes FastDeploy read these -Paddle weights as -PT; "
                         "rename the key to `dtype`")
    transformers = str(raw.get("transformers_version", ""))
    if (layout == "paddle" and release.dtype_and_new_transformers_is_torch and transformers
            and _version(transformers) > FASTDEPLOY_TORCH_TRANSFORMERS_ABOVE):
        raise ErnieError(f"{where}: `dtype` with transformers_version {transformers} makes FastDeploy "
                         f"{release.version} read these -Paddle weights as -PT; remove `transformers_version`")
    if layout == "pt" and keys == ["dtype"]:
        return {"FD_FOR_TORCH_MODEL_FORMAT": "1"}
    return {}


def _option(args, name: str, default):
    """The option's value, or the default when it was not given (0 counts as given)."""
    value = getattr(args, name, None)
    return default if value is None else value


def _positive(value, flag: str):
    if value is not None and value <= 0:
        raise ErnieError(f"{flag} {value}: must be positive")
    return value


def _check_ratio(value: float, flag: str):
    if not 0 < value <= 1:
        raise ErnieError(f"{flag} {value}: must be in (0, 1]")


def _tensor_parallel_error(tp: int, device: str, release: FastDeployRelease | None, config: ErnieConfig) -> str:
    """Why the engine refuses `tp` ranks for this model; "" when it takes them."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if release and release.kv_heads_split:
        # FastDeploy 2.0 / 2.1 model_executor/layers/linear.py: divide(kv_heads, tp).
        valid = [d for d in range(1, kv + 1) if kv % d == 0]
        rule = f"must divide num_key_value_heads ({kv}) in FastDeploy {release.version}"
    else:
        # vllm/config/model.py and FastDeploy 2.2+ QKVParallelLinear: KV heads replicated when tp > kv.
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        rule = (f"must divide num_attention_heads ({heads}) and divide or be a multiple of "
                f"num_key_value_heads ({kv})")
    if tp not in valid:
        return f"{rule}; use one of {', '.join(map(str, valid))}"
    if release is None or tp <= _tensor_parallel_limit(device, release):
        return ""
    limit = _tensor_parallel_limit(device, release)
    if not release.tp_limit_per_node:
        return f"FastDeploy {release.version} accepts 1 to {limit}"
    return (f"FastDeploy {release.version} runs at most {limit} ranks per {device} node; more needs several "
            "nodes (--ips), which deploy does not write")


def _tensor_parallel_limit(device: str, release: FastDeployRelease | None) -> int:
    return release.tp_limit_per_device.get(device, release.tp_limit) if release else DEVICES_PER_NODE


# Bytes per weight under FastDeploy's weight quantizations: (routed experts, the other linear layers);
# the embedding and lm_head stay in the checkpoint's dtype. On ERNIE, wint4 is mix_quant with int8
# dense layers (worker/worker_process.py), except on dense models in FastDeploy 2.0 (see _weight_bytes).
QUANTIZED_WEIGHT_BYTES = {"wint8": (1, 1), "wint4": (0.5, 1), "block_wise_fp8": (1, 1)}


def _parameters(config: ErnieConfig) -> tuple[int, int, int]:
    """Parameters of the embedding (and an untied lm_head), of the routed experts and of the other
    linear layers, from config.json alone; the norms (under 0.01%) and the MTP layer FastDeploy loads
    only for speculative decoding are left out."""
    hidden, layers, moe = config.hidden_size, config.num_hidden_layers, config.moe
    attention = hidden * config.head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    moe_layers = sum(map(moe.is_moe_layer, range(layers))) if moe else 0
    experts = moe_layers * moe.num_experts * 3 * hidden * moe.intermediate_size if moe else 0
    shared_and_router = (moe_layers * hidden * (3 * moe.intermediate_size * moe.num_shared_experts + moe.num_experts)
                         if moe else 0)
    linear = layers * attention + (layers - moe_layers) * 3 * hidden * config.intermediate_size + shared_and_router
    return config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2), experts, linear


# Bytes per weight of the quantization types a published pre-quantized checkpoint's config.json names in
# its quantization_config (ERNIE-4.5-300B-A47B-W4A8C8-TP4-Paddle: moe w4a8, dense wint8).
STORED_WEIGHT_BYTES = {"wint8": 1, "w8a8": 1, "block_wise_fp8": 1, "fp8": 1, "wint4": 0.5, "w4a8": 0.5,
                       "w4afp8": 0.5, "wint2": 0.25, "w4w2": 0.25}


def _stored_quantization(config: ErnieConfig) -> tuple[float, float, str] | None:
    """A pre-quantized checkpoint's bytes per routed-expert and per other linear weight, and how to say
    it; None for a checkpoint of plain weights. Unknown types are refused: they cannot be sized."""
    stored = config.extra.get("quantization_config")
    if not stored:
        return None
    overall = stored.get("quantization") if isinstance(stored, dict) else None
    kinds = (stored.get("moe_quant_type", overall), stored.get("dense_quant_type", overall)) \
        if isinstance(stored, dict) else (None, None)
    unknown = [kind for kind in kinds if kind not in STORED_WEIGHT_BYTES]
    if unknown:
        raise ErnieError(f"config.json: quantization_config {json.dumps(stored)}: deploy does not know the size of "
                         f"{json.dumps(unknown[0])} weights (it knows {', '.join(STORED_WEIGHT_BYTES)}), so it cannot "
                         "size tensor parallelism for this checkpoint")
    return STORED_WEIGHT_BYTES[kinds[0]], STORED_WEIGHT_BYTES[kinds[1]], f"its own {kinds[0]} / {kinds[1]}"


def _weight_bytes(config: ErnieConfig, quantization: str, width: int, release: FastDeployRelease | None) -> float:
    embedding, experts, linear = _parameters(config)
    stored = _stored_quantization(config)
    if stored:
        return width * embedding + stored[0] * experts + stored[1] * linear
    if quantization == "none":
        return width * (embedding + experts + linear)
    expert_bytes, linear_bytes = QUANTIZED_WEIGHT_BYTES[quantization]
    if quantization == "wint4" and config.kind == "dense" and not release.wint4_dense_as_wint8:
        linear_bytes = 0.5
    return width * embedding + expert_bytes * experts + linear_bytes * linear


def _model_name(config: ErnieConfig) -> str:
    """The published model config.json describes, else its size."""
    for name, shape in PUBLISHED_MODELS.items():
        if all(getattr(config, key) == value for key, value in shape.items()):
            return name
    return f"a {_billions(sum(_parameters(config)))}-parameter ERNIE 4.5 model"


def _billions(parameters: int) -> str:
    return f"{parameters / 1e9:.0f}B" if parameters >= 1e10 else f"{parameters / 1e9:.2g}B"


def _gb(size: float) -> str:
    return f"{size / 1e9:.{0 if size >= 1e10 else 1}f} GB"


@dataclass
class Memory:
    """The weights as served, and one full sequence of KV cache, against one device's memory."""
    model: str               # the published model config.json describes, or its size
    parameters: int
    weights: float           # bytes, all ranks together
    served_as: str           # the dtype, or the quantization
    kv_sequence: int         # bytes of KV cache for one max_model_len sequence, all ranks together
    kv_heads: int
    max_model_len: int
    device_gb: float | None  # memory per device assumed; None on CPU (the serving machine's RAM is unknown)
    utilization: float       # the share of it the engine uses
    recipes: bool            # FastDeploy's published recipes apply: the device memory is the one they are for
    tp_reason: str = ""      # why deploy chose the tensor-parallel size; "" when it was given

    def per_device(self, tp: int) -> float:
        return self.weights / tp + self.kv_sequence / min(tp, self.kv_heads)

    def fits(self, tp: int) -> bool:
        return self.device_gb is None or self.per_device(tp) <= self.usable

    @property
    def usable(self) -> float:
        return self.device_gb * 1e9 * self.utilization

    def describe(self) -> str:
        return (f"{self.model} ({_billions(self.parameters)} parameters, {_gb(self.weights)} of weights in "
                f"{self.served_as})")

    def shortfall(self, tp: int, device: str) -> str:
        return (f"at tensor parallel {tp} each {device} needs {_gb(self.per_device(tp))} (its share of the weights and "
                f"of one {self.max_model_len}-token sequence of KV cache), above the {_gb(self.usable)} usable "
                f"({self.utilization} of the {self.device_gb} GB assumed per device)")


def _memory(config: ErnieConfig, quantization: str, dtype: str, release: FastDeployRelease | None,
            max_model_len: int, utilization: float, device_gb: float | None, recipes: bool) -> Memory:
    served, stored = config.dtype if dtype == "auto" else dtype, _stored_quantization(config)
    return Memory(model=_model_name(config), parameters=sum(_parameters(config)),
                  weights=_weight_bytes(config, quantization, DTYPE_BYTES.get(served, 2), release),
                  served_as=stored[2] if stored else served if quantization == "none" else quantization,
                  kv_sequence=max_model_len * _kv_bytes_per_token(config, dtype), kv_heads=config.num_key_value_heads,
                  max_model_len=max_model_len, device_gb=device_gb, utilization=utilization, recipes=recipes)


def _recipe(memory: Memory, quantization: str, device: str, release: FastDeployRelease | None) -> int | None:
    """The tensor-parallel size of FastDeploy's published recipe for this model, if there is one."""
    if release is None or not memory.recipes:
        return None
    return FASTDEPLOY_RECIPE_TP.get((memory.model, device), {}).get(quantization)


def _smallest_tensor_parallel(memory: Memory, quantization: str, device: str, release: FastDeployRelease | None,
                              config: ErnieConfig) -> tuple[int | None, str]:
    """The tensor-parallel size for these weights and why: FastDeploy's published recipe where there is
    one, else the smallest the engine takes whose share fits one device (None: none on one node)."""
    recipe = _recipe(memory, quantization, device, release)
    limit = _tensor_parallel_limit(device, release)
    for tp in range(recipe or 1, limit + 1):
        if not _tensor_parallel_error(tp, device, release, config) and memory.fits(tp):
            if tp == recipe:
                return tp, f"FastDeploy's published recipe for {memory.model} with {quantization} on {device}"
            return tp, (f"the fewest {device} devices that hold {_gb(memory.weights)} of weights in "
                        f"{memory.served_as}, at {memory.device_gb} GB each")
    return None, ""


def _tensor_parallel(args, engine: str, device: str, release: FastDeployRelease | None, config: ErnieConfig,
                     memory: Memory) -> int:
    """The tensor-parallel size: as given (refused when it cannot hold the weights), else chosen."""
    given = getattr(args, "tensor_parallel_size", None)
    if given is not None:
        problem = _tensor_parallel_error(given, device, release, config)
        if problem:
            raise ErnieError(f"--tensor-parallel-size {given}: {problem}")
        if memory.fits(given):
            return given
    tp, memory.tp_reason = _smallest_tensor_parallel(memory, args.quantization, device, release, config)
    if given is not None:
        fix = (f"use --tensor-parallel-size {tp} ({memory.tp_reason})" if tp else
               _too_big_fix(engine, device, release, config, memory))
        larger = " (or, with devices that hold more, --device-memory-gb)" if memory.recipes else ""
        raise ErnieError(f"--tensor-parallel-size {given}: {memory.describe()}: {memory.shortfall(given, device)}; "
                         f"{fix}{larger}")
    if tp is None:
        largest = max(d for d in range(1, _tensor_parallel_limit(device, release) + 1)
                      if not _tensor_parallel_error(d, device, release, config))
        fix = _too_big_fix(engine, device, release, config, memory)
        raise ErnieError(f"--model {args.model}: {memory.describe()} does not fit on one node: "
                         f"{memory.shortfall(largest, device)}; {fix}")
    return tp


def _too_big_fix(engine: str, device: str, release: FastDeployRelease | None, config: ErnieConfig,
                 memory: Memory) -> str:
    """What fits instead: a smaller weight quantization, or FastDeploy's where vLLM serves unquantized."""
    if release is None:
        return ("vLLM serves it unquantized here: use `ernie-paddle deploy fastdeploy --quantization wint4`"
                if device == "gpu" else "it needs several nodes, which deploy does not write")
    options = []  # "wint8 (tensor parallel 8)", ...
    for quantization in _allowed_quantizations(engine, device, config.kind):
        weights = _weight_bytes(config, quantization, DTYPE_BYTES.get(config.dtype, 2), release)
        if weights < memory.weights:
            smaller = replace(memory, weights=weights, served_as=quantization)
            tp, _ = _smallest_tensor_parallel(smaller, quantization, device, release, config)
            if tp:
                options.append(f"{quantization} ({'tensor parallel ' if not options else ''}{tp})")
    if not options:
        return "it needs several nodes, which deploy does not write"
    return "use --quantization " + (" or ".join(options) if len(options) < 3 else
                                    ", ".join(options[:-1]) + " or " + options[-1])


def _max_len_ceiling(engine: str, config: ErnieConfig, model: str) -> tuple[int, str]:
    """The longest max_model_len the engine takes, and what sets it. vLLM (config/model.py
    _get_and_verify_max_len) also takes tokenizer_config.json's model_max_length into account."""
    positions = config.max_position_embeddings
    ceiling = (positions, f"the model's max_position_embeddings ({positions})")
    tokenizer_config = Path(model) / "tokenizer_config.json"
    if engine != "fastdeploy" and tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(limit, int) and limit < ceiling[0]:
            ceiling = (limit, f"tokenizer_config.json's model_max_length ({limit})")
    return ceiling


def _sizes(args, engine: str, device: str, release: FastDeployRelease | None,
           config: ErnieConfig) -> tuple[dict, Memory]:
    defaults = {**ENGINES[engine], **DEVICE_DEFAULTS.get(device, {})}
    ceiling, ceiling_reason = _max_len_ceiling(engine, config, args.model)
    max_model_len = _positive(_option(args, "max_model_len", min(defaults["max_model_len"], ceiling)),
                              "--max-model-len")
    max_num_seqs = _positive(_option(args, "max_num_seqs", defaults["max_num_seqs"]), "--max-num-seqs")
    if max_model_len > ceiling:
        raise ErnieError(f"--max-model-len {max_model_len}: above {ceiling_reason}; use at most that")
    batched = _positive(getattr(args, "max_num_batched_tokens", None), "--max-num-batched-tokens")
    block_size = BLOCK_SIZE.get(device, 64)
    if release:
        _fastdeploy_start_checks(release, device, max_model_len, max_num_seqs, batched, block_size)
    elif batched is not None and batched < max_num_seqs:
        raise ErnieError(f"--max-num-batched-tokens {batched}: vLLM needs at least max_num_seqs ({max_num_seqs}) "
                         "(vllm/config/scheduler.py); raise it or lower --max-num-seqs")
    dtype = "auto" if release else _option(args, "dtype", VLLM_DTYPE[device])
    if device == "cpu" and getattr(args, "gpu_memory_utilization", None) is None:
        # On CPU vLLM reads gpu_memory_utilization as a share of host RAM (v1/worker/cpu_worker.py); an
        # explicit KV cache size is the same on every machine: the cache for max_num_seqs full sequences.
        cache = {"kv_cache_memory_bytes": max_model_len * max_num_seqs * _kv_bytes_per_token(config, dtype)}
    else:
        cache = {"gpu_memory_utilization": _option(args, "gpu_memory_utilization", defaults["gpu_memory_utilization"])}
        _check_ratio(cache["gpu_memory_utilization"], "--gpu-memory-utilization")
    # FastDeploy's recipes are for the cards DEVICE_MEMORY_GB assumes; for other memory sizes deploy computes.
    device_gb = getattr(args, "device_memory_gb", None)
    if device_gb is not None and (device == "cpu" or not 0 < device_gb < math.inf):
        raise ErnieError(f"--device-memory-gb {device_gb}: " + (
            "not for --device cpu, whose serving machine's RAM deploy cannot know" if device == "cpu" else
            "must be a positive number of GB, the memory of one device"))
    memory = _memory(config, args.quantization, dtype, release, max_model_len, cache.get("gpu_memory_utilization", 1.0),
                     DEVICE_MEMORY_GB.get(device) if device_gb is None else device_gb, recipes=device_gb is None)
    tp = _tensor_parallel(args, engine, device, release, config, memory)
    sizes = {"tensor_parallel_size": tp, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs}
    if batched is not None:
        sizes["max_num_batched_tokens"] = batched
    sizes.update(cache)
    if release:
        kv_cache_ratio = _option(args, "kv_cache_ratio", 0.75)
        _check_ratio(kv_cache_ratio, "--kv-cache-ratio")
        sizes["kv_cache_ratio"] = kv_cache_ratio
    return sizes, memory


def _fastdeploy_start_checks(release: FastDeployRelease, device: str, max_model_len: int, max_num_seqs: int,
                             batched: int | None, block_size: int):
    """The checks FastDeploy's FDConfig.check (config.py) applies at start, against the
    max_num_batched_tokens that release really uses: given, or its default on that device."""
    if not 1 <= max_num_seqs <= FASTDEPLOY_MAX_NUM_SEQS:
        raise ErnieError(f"--max-num-seqs {max_num_seqs}: FastDeploy accepts 1 to {FASTDEPLOY_MAX_NUM_SEQS}")
    if max_model_len < FASTDEPLOY_MIN_MODEL_LEN:
        raise ErnieError(f"--max-model-len {max_model_len}: FastDeploy needs at least {FASTDEPLOY_MIN_MODEL_LEN}")
    v1, chunked = device in release.v1_devices, device in release.chunked_devices
    if batched is not None:
        tokens, flag, origin = batched, f"--max-num-batched-tokens {batched}", ""
    else:
        tokens = (FASTDEPLOY_BATCHED_TOKENS_V1 if v1 else FASTDEPLOY_BATCHED_TOKENS_CHUNKED if chunked
                  else max_model_len)
        flag = f"--max-model-len {max_model_len} --max-num-seqs {max_num_seqs}"
        origin = (f" (FastDeploy {release.version} on {device} takes {tokens} when --max-num-batched-tokens "
                  "is not given)")
    where = f"FastDeploy {release.version} on {device}"
    if tokens < max_num_seqs:
        raise ErnieError(f"{flag}: {where} needs max_num_batched_tokens ({tokens}) >= max_num_seqs "
                         f"({max_num_seqs}){origin}; raise it or lower --max-num-seqs")
    if tokens > max_model_len * max_num_seqs:
        raise ErnieError(f"{flag}: {where} needs max_num_batched_tokens ({tokens}) at most max_model_len x "
                         f"max_num_seqs = {max_model_len * max_num_seqs}{origin}; pass --max-num-batched-tokens "
                         f"{max_model_len * max_num_seqs} or less")
    if not chunked and not v1 and tokens < max_model_len:
        raise ErnieError(f"{flag}: {where} runs without chunked prefill, so max_num_batched_tokens ({tokens}) "
                         f"must be at least max_model_len ({max_model_len})")
    if chunked and tokens < block_size:
        raise ErnieError(f"{flag}: {where} prefills in chunks, so max_num_batched_tokens ({tokens}) must be at "
                         f"least block_size ({block_size})")


def _kv_bytes_per_token(config: ErnieConfig, dtype: str) -> int:
    """K and V of every layer for one token; "auto" is the checkpoint's dtype."""
    width = DTYPE_BYTES.get(config.dtype if dtype == "auto" else dtype, 2)
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * width


def _allowed_quantizations(engine: str, device: str, kind: str) -> tuple:
    return QUANTIZATIONS[(engine, device)] + (MOE_ONLY_QUANTIZATIONS.get((engine, device), ()) if kind == "moe" else ())


def _check_quantization(engine: str, device: str, quantization: str, kind: str):
    moe_names = MOE_ONLY_QUANTIZATIONS.get((engine, device), ())
    allowed = _allowed_quantizations(engine, device, kind)
    if quantization not in allowed:
        raise ErnieError(f"--quantization {quantization}: not supported by {engine} on {device}"
                         f"{' for dense models' if quantization in moe_names else ''}; "
                         f"choose one of {', '.join(allowed)}")


def port_is_free(port: int) -> bool:
    """Bind the port the way the engines do (all interfaces) and let it go again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _ports(args, engine: str) -> dict:
    base = _option(args, "port", ENGINES[engine]["port"])
    if engine == "fastdeploy":
        ports = {name: _option(args, name, base + i) for i, name in enumerate(FASTDEPLOY_PORTS)}
    else:
        ports = {"port": base}
    seen = {}
    for name, port in ports.items():
        flag = "--" + name.replace("_", "-")
        if not 1 <= port <= 65535:
            raise ErnieError(f"{flag} {port}: not a TCP port (1 to 65535)")
        if port in seen:
            raise ErnieError(f"{flag} {port}: the same port as {seen[port]}; every role needs its own port")
        seen[port] = flag
    if not getattr(args, "no_port_check", False):
        for name, port in ports.items():
            if not port_is_free(port):
                raise ErnieError(f"--{name.replace('_', '-')} {port}: already in use on this machine; "
                                 "pick a free port (or pass --no-port-check when deploying elsewhere)")
    return ports


def _check_out(out: str, overwrite: bool):
    path = Path(out)
    if path.exists() and not overwrite:
        raise ErnieError(f"--out {out}: already exists; choose a new directory or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise ErnieError(f"--out {out}: exists and is not a directory")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking:
        raise ErnieError(f"--out {out}: {blocking} is a file, not a directory; choose another --out")


def plan_deployment(args) -> Plan:
    """Validate the options and the model directory; raise ErnieError on the first problem."""
    engine = args.engine
    release = _resolve_release(args)
    device = _resolve_device(args, release)
    config, raw, layout = _read_model(args.model)
    _check_quantization(engine, device, args.quantization, config.kind)
    _check_layout(engine, device, layout, release, args.model)
    fixed_env = _torch_format_env(raw, layout, args.model, release) if release else {}
    sizes, memory = _sizes(args, engine, device, release, config)
    ports = _ports(args, engine)
    _check_out(args.out, getattr(args, "overwrite", False))

    served_name = Path(args.model).resolve().name
    settings = dict(ports)
    if release is None or "served_model_name" in release.args:
        settings["served_model_name"] = served_name
    settings.update(sizes)
    if release:
        settings["block_size"] = BLOCK_SIZE.get(device, 64)
        settings["enable_prefix_caching"] = device in PREFIX_CACHING_DEVICES
        if args.quantization != "none":
            settings["quantization"] = args.quantization
        if "load_choices" in release.args and device in release.pt_devices:
            settings["load_choices"] = "default_v1"
    else:
        settings["dtype"] = _option(args, "dtype", VLLM_DTYPE[device])
        if engine == "vllm-ascend":
            settings["enforce_eager"] = True
    tp = sizes["tensor_parallel_size"]
    env = dict(DEVICE_ENV.get(device, {}))
    if device in VISIBLE_DEVICES:
        env[VISIBLE_DEVICES[device]] = ",".join(str(i) for i in range(tp))
    plan = Plan(engine=engine, device=device, model_ref=args.model_ref or str(Path(args.model).resolve()),
                served_name=served_name, layout=layout, kind=config.kind, quantization=args.quantization,
                release=release, settings=settings, env=env, fixed_env=fixed_env, memory=memory)
    plan.notes = _notes(plan, config)
    return plan


def _quantization_note(plan: Plan) -> str:
    if plan.quantization != "wint4":
        return {"none": "weights stay in the checkpoint's dtype",
                "wint8": "int8 weights, bf16 activations: about half the weight memory",
                "block_wise_fp8": "fp8 weights and activations; needs a Hopper GPU (launch.sh checks the "
                                  "selected GPUs)"}[plan.quantization]
    # worker/worker_process.py: wint4 on an ERNIE model becomes mix_quant (MoE models in every release,
    # dense ones from 2.1).
    if plan.kind == "moe":
        return "FastDeploy runs it as mix_quant: expert weights int4, the other layers int8"
    if plan.release.wint4_dense_as_wint8:
        return (f"on the dense ERNIE models FastDeploy {plan.release.version} rewrites wint4 to mix_quant with "
                "int8 dense layers, so this is effectively wint8")
    return "int4 weights (FastDeploy 2.0 applies wint4 to dense models as asked)"


def _memory_note(plan: Plan) -> str:
    """What the weights need, where it is worth saying: on CPU (deploy cannot see the serving machine's
    RAM), where deploy chose more than one device, or where the given size is below FastDeploy's recipe."""
    memory, tp = plan.memory, plan.settings["tensor_parallel_size"]
    if memory.device_gb is None:
        cache = plan.settings.get("kv_cache_memory_bytes")
        if cache is None:
            return (f"Memory: vLLM on CPU keeps {memory.describe()} in the serving machine's RAM, and takes "
                    f"{plan.settings['gpu_memory_utilization']} of that RAM for the KV cache; deploy cannot check "
                    "that machine.")
        return (f"Memory: vLLM on CPU keeps {memory.describe()} and {_gb(cache)} of KV cache in the serving "
                f"machine's RAM, about {_gb(memory.weights + cache)} in all; deploy cannot check that machine.")
    recipe = _recipe(memory, plan.quantization, plan.device, plan.release)
    if recipe and tp < recipe:
        return (f"Memory: FastDeploy's published recipe for {memory.model} with {plan.quantization} on {plan.device} "
                f"uses tensor parallel {recipe}; at {tp} the weights fit ({_gb(memory.per_device(tp))} per device "
                f"of {memory.device_gb} GB), leaving less room for the KV cache.")
    if memory.tp_reason and tp > 1:
        return (f"Memory: {memory.describe()}; {_gb(memory.per_device(tp))} per {plan.device} with one "
                f"{memory.max_model_len}-token sequence of KV cache, within the {_gb(memory.usable)} usable of the "
                f"{memory.device_gb} GB assumed per device.")
    return ""


def _notes(plan: Plan, config: ErnieConfig) -> list[str]:
    s = plan.settings
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    tp = s["tensor_parallel_size"]
    split = (f"divides the {kv} KV heads" if kv % tp == 0 else
             f"the {kv} KV heads are replicated over the ranks, the {heads} query heads split")
    memory = plan.memory
    chosen = f" ({memory.tp_reason})" if memory.tp_reason and tp > 1 else ""
    notes = [
        f"Targets {plan.target}; layout {LAYOUT_NAMES[plan.layout]}: what it loads on {plan.device}.",
        f"Tensor parallel {tp}{chosen}: {split}.",
        f"max_model_len {s['max_model_len']} (the model allows {config.max_position_embeddings}): "
        "bounds the KV cache; raise it only if prompts need it.",
        f"Quantization {plan.quantization}: {_quantization_note(plan)}.",
    ]
    memory_note = _memory_note(plan)
    if memory_note:
        notes.append(memory_note)
    if "served_model_name" not in s:
        notes.append(f"FastDeploy {plan.release.version} has no served_model_name: requests name the model by "
                     "its path (see /v1/models).")
    if "kv_cache_memory_bytes" in s:
        notes.append(f"kv_cache_memory_bytes {s['kv_cache_memory_bytes']}: the KV cache for max_num_seqs full "
                     "sequences, in host RAM (on CPU vLLM would read gpu_memory_utilization as a share of RAM). "
                     "vLLM keeps one core for its scheduler unless VLLM_CPU_OMP_THREADS_BIND / "
                     "VLLM_CPU_NUM_OF_RESERVED_CPU say otherwise.")
    if plan.device == "cpu":
        notes.append("dtype float32: runs on every x86 CPU and equals the float32 reference; on a CPU with "
                     "avx512_bf16 or AMX, --dtype bfloat16 halves memory.")
    if "FD_FOR_TORCH_MODEL_FORMAT" in plan.fixed_env:
        notes.append("FD_FOR_TORCH_MODEL_FORMAT=1: config.json says `dtype` (as transformers 5 writes it), "
                     "which FastDeploy would read as the Paddle layout; the variable forces the torch layout.")
    if s.get("load_choices"):
        notes.append("load_choices default_v1: the v1 loader, needed for -PT and faster for -Paddle.")
    counted = plan.release.counted_visible_devices.get(plan.device) if plan.release else None
    if counted:
        notes.append(f"FastDeploy {plan.release.version} needs {counted}, when set, to list exactly {tp} "
                     "device(s): launch.sh checks it.")
    if plan.release and plan.device in plan.release.v1_devices:
        notes.append(f"kv_cache_ratio has no effect here: FastDeploy {plan.release.version} runs the V1 KV-cache "
                     f"scheduler on {plan.device}; max_num_batched_tokens defaults to {FASTDEPLOY_BATCHED_TOKENS_V1}.")
    elif plan.release and plan.device not in plan.release.chunked_devices:
        notes.append(f"No chunked prefill on {plan.device} in FastDeploy {plan.release.version}: "
                     "max_num_batched_tokens must be at least max_model_len.")
    if plan.device in DEVICE_ENV or plan.device in BLOCK_SIZE:
        notes.append(f"{plan.device} environment: "
                     + ", ".join(f"{k}={v}" for k, v in DEVICE_ENV.get(plan.device, {}).items())
                     + (f"; block_size {BLOCK_SIZE[plan.device]}" if plan.device in BLOCK_SIZE else "") + ".")
    if plan.engine == "vllm-ascend":
        notes.append("enforce_eager: graph mode off. vLLM-Ascend sets PYTORCH_NPU_ALLOC_CONF itself (and "
                     "refuses it with --enable-sleep-mode). Atlas 300I Duo has no bf16: set `dtype: float16` there.")
    if not plan.release:
        notes.append(f"Needs {VLLM[plan.engine].requirements}.")
        if plan.kind == "moe":
            notes.append("MoE models need vLLM > 0.10.0 (0.10.0 broke shared-expert loading).")
    if "Base" in plan.served_name:
        notes.append("A Base model: text completion only (/v1/completions); it has no chat template.")
    return notes


def _yaml(plan: Plan) -> str:
    head = (f"# {plan.target} config for {plan.served_name} on {plan.device}, written by `ernie-paddle deploy`.\n"
            f"# Keys are {plan.engine} argument names; flags given to launch.sh override them.\n")
    return head + yaml.safe_dump(plan.engine_config(), sort_keys=False)


def _launch_script(plan: Plan) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# Start {plan.target} serving {plan.served_name} on {plan.device} (written by `ernie-paddle deploy`).",
             "# MODEL and the exported variables may be overridden from the environment.",
             "set -euo pipefail",
             'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
             f'MODEL="${{MODEL:-{plan.model_ref}}}"']
    lines += [f'export {name}="${{{name}:-{value}}}"' for name, value in plan.env.items()]
    lines += [f"export {name}={value}" for name, value in plan.fixed_env.items()]
    tp = plan.settings["tensor_parallel_size"]
    counted = plan.release.counted_visible_devices.get(plan.device) if plan.release else None
    if counted:
        lines += [f'IFS=, read -ra ids <<< "${{{counted}:-}}"',
                  f'if [ -n "${{{counted}:-}}" ] && [ "${{#ids[@]}}" -ne {tp} ]; then',
                  f'  echo "launch.sh: FastDeploy {plan.release.version} needs {counted} to list exactly {tp} '
                  f'device(s) (tensor parallel {tp}), got \'${counted}\'" >&2',
                  "  exit 2",
                  "fi"]
    if plan.quantization == "block_wise_fp8":
        lines += ['caps="$(nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-gpu=compute_cap --format=csv,noheader)"',
                  'for cap in $caps; do',
                  '  if [ "${cap%%.*}" -lt 9 ]; then',
                  '    echo "launch.sh: block_wise_fp8 needs Hopper GPUs (compute capability 9.x), found $cap among '
                  'CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; redeploy with --quantization wint8" >&2',
                  "    exit 2",
                  "  fi",
                  "done"]
    lines.append("exec " + ENGINES[plan.engine]["command"].format(config=plan.config_name) + ' "$@"')
    return "\n".join(lines) + "\n"


def smoke_test_script(port: int, served_name: str) -> str:
    body = json.dumps({"model": served_name, "prompt": SMOKE_PROMPT, "max_tokens": 16, "temperature": 0})
    return f"""#!/usr/bin/env bash
# Wait until /health answers 200 (FastDeploy answers 304 when its workers are dead, 404 while
# loading; vLLM 503), then send one request to /v1/completions.
# Works against FastDeploy, vLLM and `ernie-paddle serve` alike.
set -euo pipefail
URL="${{URL:-http://127.0.0.1:{port}}}"
TIMEOUT="${{TIMEOUT:-900}}"
waited=0
until [ "$(curl -s -o /dev/null -w '%{{http_code}}' "$URL/health")" = 200 ]; do
  if [ "$waited" -ge "$TIMEOUT" ]; then
    echo "smoke_test.sh: $URL/health did not answer 200 within ${{TIMEOUT}}s" >&2
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done
reply="$(curl -fsS "$URL/v1/completions" -H 'Content-Type: application/json' -d '{body}')"
echo "$reply"
case "$reply" in
  *'"choices"'*) echo "smoke test passed" ;;
  *) echo "smoke_test.sh: no choices in the reply" >&2; exit 1 ;;
esac
"""


def _readme(plan: Plan) -> str:
    target = (f"{plan.target} (`fastdeploy-gpu` / `-xpu` ... from Paddle's package index, not the PyPI "
              "`fastdeploy-python` placeholder)" if plan.release else plan.target)
    s = plan.settings
    served = f", served as `{plan.served_name}`" if "served_model_name" in s else ""
    lines = [f"# {plan.served_name} on {plan.engine} ({plan.device})", "",
             f"Written by `ernie-paddle deploy`. Targets {target}.", "",
             f"- model: `{plan.model_ref}` ({LAYOUT_NAMES[plan.layout]} layout){served}",
             f"- config: `{plan.config_name}`; port {s['port']}",
             "", "## Run", "",
             "    bash launch.sh            # MODEL=/path/to/model bash launch.sh to load another copy",
             "    bash smoke_test.sh        # waits for /health, then one /v1/completions request",
             "", "## Why these settings", ""]
    lines += [f"- {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"


def write_deployment(plan: Plan, out: str | Path) -> Path:
    """Render into a hidden sibling directory, then put it in place of DIR (converters' `staged`, as
    `convert` writes DST): no half-written DIR, and an unwritable place is one ErnieError line."""
    out = Path(out)
    files = {plan.config_name: _yaml(plan), "launch.sh": _launch_script(plan),
             "smoke_test.sh": smoke_test_script(plan.settings["port"], plan.served_name), "README.md": _readme(plan)}
    with staged(out, "--out") as staging:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        for script in ("launch.sh", "smoke_test.sh"):
            (staging / script).chmod(0o755)
    return out


def run_deploy(args) -> int:
    plan = plan_deployment(args)
    out = write_deployment(plan, args.out)
    print(f"wrote {out}/ ({plan.config_name}, launch.sh, smoke_test.sh, README.md): {plan.target} on "
          f"{plan.device}, {LAYOUT_NAMES[plan.layout]}, quantization {plan.quantization}, tensor parallel "
          f"{plan.settings['tensor_parallel_size']}, port {plan.settings['port']}")
    if plan.memory.device_gb is None:
        print(f"note: {_memory_note(plan)}", file=sys.stderr)
    return 0
