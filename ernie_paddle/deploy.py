"""Deployment configs for FastDeploy, vLLM and vLLM-Ascend: check a model directory and the options
against what the engine accepts, then write the engine's YAML, a launch script, a smoke test and a
README into one directory. Everything is validated before anything is written.

None of these engines runs on a CPU-only machine, so all checks are offline: what each engine
accepts is stated as data below, read from the engines' own sources (see each table)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import Checkpoint
from .config import ErnieConfig
from .errors import ErnieError

FASTDEPLOY_VERSIONS = ("2.0", "2.1", "2.2", "2.3", "2.4", "2.5")
DEFAULT_FASTDEPLOY_VERSION = "2.3"  # first with the v1 loader as default and `fastdeploy serve`
PT_LAYOUT_SINCE = "2.2"             # FastDeploy registered Ernie4_5ForCausalLM (0.3B -PT) in 2.2
LOAD_CHOICES_SINCE = "2.2"

# FastDeploy `--config` keys: argparse dest names (underscored) and the type each value must have.
# From fastdeploy/engine/args_utils.py (EngineArgs.add_cli_args) and
# fastdeploy/entrypoints/openai/api_server.py; the file loader drops any other key silently.
FASTDEPLOY_ARGS = {
    "model": str, "port": int, "host": str, "metrics_port": int, "max_concurrency": int,
    "workers": int, "served_model_name": str, "tokenizer": str, "max_model_len": int,
    "block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int,
    "tensor_parallel_size": int, "data_parallel_size": int, "gpu_memory_utilization": float,
    "kv_cache_ratio": float, "engine_worker_queue_port": int, "cache_queue_port": int,
    "quantization": str, "load_choices": str, "enable_prefix_caching": bool,
    "enable_chunked_prefill": bool, "enable_logprob": bool, "seed": int,
    "guided_decoding_backend": str, "reasoning_parser": str, "speculative_config": dict,
    "graph_optimization_config": dict, "use_warmup": int, "swap_space": float,
}

# vLLM `--config` keys: long option names (hyphenated), from vllm/engine/arg_utils.py and
# vllm/entrypoints/openai/cli_args.py.
VLLM_ARGS = {
    "host": str, "port": int, "served-model-name": str, "tokenizer": str, "dtype": str,
    "max-model-len": int, "max-num-seqs": int, "max-num-batched-tokens": int,
    "tensor-parallel-size": int, "gpu-memory-utilization": float, "enforce-eager": bool,
    "enable-prefix-caching": bool, "seed": int, "quantization": str, "block-size": int,
    "trust-remote-code": bool, "generation-config": str,
}

# Per engine: devices (the first is the default), defaults, the config file name and how options
# are spelled in it.
ENGINES = {
    "fastdeploy": {
        "devices": ("gpu", "xpu", "dcu", "iluvatar"), "config": "fastdeploy.yaml", "sep": "_",
        "port": 8180, "max_model_len": 32768, "max_num_seqs": 128, "gpu_memory_utilization": 0.9,
        "command": 'python -m fastdeploy.entrypoints.openai.api_server --model "$MODEL" --config "$HERE/{config}"',
    },
    "vllm": {
        "devices": ("gpu",), "config": "vllm.yaml", "sep": "-",
        "port": 8000, "max_model_len": 4096, "max_num_seqs": 64, "gpu_memory_utilization": 0.9,
        "command": 'vllm serve "$MODEL" --config "$HERE/{config}"',
    },
    "vllm-ascend": {
        "devices": ("npu",), "config": "vllm.yaml", "sep": "-",
        "port": 8000, "max_model_len": 4096, "max_num_seqs": 64, "gpu_memory_utilization": 0.8,
        "command": 'vllm serve "$MODEL" --config "$HERE/{config}"',
    },
}
# Where a device is asked of the wrong engine: what serves it (FastDeploy has no released Ascend path).
DEVICE_HINT = {
    "npu": "use `ernie-paddle deploy vllm-ascend` (or `ernie-paddle serve --device npu`)",
    "gpu": "use `ernie-paddle deploy fastdeploy` or `ernie-paddle deploy vllm`",
    "xpu": "use `ernie-paddle deploy fastdeploy --device xpu`",
    "dcu": "use `ernie-paddle deploy fastdeploy --device dcu`",
    "iluvatar": "use `ernie-paddle deploy fastdeploy --device iluvatar`",
}

# Layouts each engine/device loads. FastDeploy's v1 loader (the one that reads -PT) falls back to
# v0 off NVIDIA GPUs; vLLM loads the transformers (-PT) layout only.
LAYOUTS = {
    ("fastdeploy", "gpu"): ("pt", "paddle"), ("fastdeploy", "xpu"): ("paddle",),
    ("fastdeploy", "dcu"): ("paddle",), ("fastdeploy", "iluvatar"): ("paddle",),
    ("vllm", "gpu"): ("pt",), ("vllm-ascend", "npu"): ("pt",),
}
CONVERT_TO = {"pt": "convert paddle2pt {model} {model}-PT", "paddle": "convert pt2paddle {model} {model}-Paddle"}
LAYOUT_NAMES = {"pt": "-PT", "paddle": "-Paddle"}

# Weight quantizations per engine/device (FastDeploy names; vLLM runs these models unquantized).
QUANTIZATIONS = {
    ("fastdeploy", "gpu"): ("none", "wint8", "wint4", "block_wise_fp8"),
    ("fastdeploy", "xpu"): ("none", "wint8"),
    ("fastdeploy", "dcu"): ("none", "wint8"),
    ("fastdeploy", "iluvatar"): ("none", "wint8"),
    ("vllm", "gpu"): ("none",), ("vllm-ascend", "npu"): ("none",),
}
QUANTIZATION_NOTES = {
    "none": "weights stay in the checkpoint's dtype",
    "wint8": "int8 weights, bf16 activations: about half the weight memory",
    "wint4": "on the dense ERNIE models FastDeploy rewrites wint4 to mix_quant with int8 dense layers, "
             "so this is effectively wint8",
    "block_wise_fp8": "fp8 weights and activations; needs a Hopper GPU (launch.sh checks)",
}

# Environment each device needs; the visible-devices variable is filled with 0..TP-1 unless set.
VISIBLE_DEVICES = {"gpu": "CUDA_VISIBLE_DEVICES", "xpu": "XPU_VISIBLE_DEVICES", "dcu": "HIP_VISIBLE_DEVICES",
                   "iluvatar": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
DEVICE_ENV = {
    "dcu": {"FD_ATTENTION_BACKEND": "BLOCK_ATTN"},
    "iluvatar": {"PADDLE_XCCL_BACKEND": "iluvatar_gpu"},
    "npu": {"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"},
}
BLOCK_SIZE = {"iluvatar": 16}                  # FastDeploy's default is 64
PREFIX_CACHING_DEVICES = ("gpu", "xpu")        # FastDeploy turns it off elsewhere anyway
MAX_TENSOR_PARALLEL = 8                        # FastDeploy's own start check

# Options that mean something only to FastDeploy: (args attribute, flag).
FASTDEPLOY_ONLY = (("kv_cache_ratio", "--kv-cache-ratio"), ("metrics_port", "--metrics-port"),
                   ("engine_worker_queue_port", "--engine-worker-queue-port"),
                   ("cache_queue_port", "--cache-queue-port"), ("fastdeploy_version", "--fastdeploy-version"))
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
    version: str | None
    settings: dict                      # engine config, our underscored names, in file order
    env: dict = field(default_factory=dict)         # exported unless already set (visible devices)
    fixed_env: dict = field(default_factory=dict)   # always exported
    notes: list = field(default_factory=list)

    @property
    def config_name(self) -> str:
        return ENGINES[self.engine]["config"]

    def engine_config(self) -> dict:
        sep = ENGINES[self.engine]["sep"]
        return {key.replace("_", sep): value for key, value in self.settings.items()}


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def _resolve_engine_device(args) -> tuple[str, str]:
    engine = args.engine
    device = args.device or ENGINES[engine]["devices"][0]
    if device not in ENGINES[engine]["devices"]:
        raise ErnieError(f"--device {device}: {engine} does not serve on {device}; {DEVICE_HINT[device]}")
    if engine != "fastdeploy":
        for name, flag in FASTDEPLOY_ONLY:
            if getattr(args, name, None) is not None:
                raise ErnieError(f"{flag}: a FastDeploy option; {engine} has no such setting, drop it")
    return engine, device


def _resolve_version(args) -> str | None:
    if args.engine != "fastdeploy":
        return None
    version = args.fastdeploy_version or DEFAULT_FASTDEPLOY_VERSION
    if version not in FASTDEPLOY_VERSIONS:
        raise ErnieError(f"--fastdeploy-version {version}: not a FastDeploy 2.x release this tool knows; "
                         f"choose one of {', '.join(FASTDEPLOY_VERSIONS)}")
    return version


def _read_model(model: str) -> tuple[ErnieConfig, dict, str]:
    directory = Path(model)
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


def _check_layout(engine: str, device: str, layout: str, version: str | None, model: str):
    accepted = LAYOUTS[(engine, device)]
    fix = CONVERT_TO[accepted[0]].format(model=model.rstrip("/"))
    if layout not in accepted:
        raise ErnieError(f"--model {model}: a {LAYOUT_NAMES[layout]} checkpoint, but {engine} on {device} "
                         f"loads only {LAYOUT_NAMES[accepted[0]]}; convert it with `{fix}`")
    if engine == "fastdeploy" and layout == "pt" and _version(version) < _version(PT_LAYOUT_SINCE):
        raise ErnieError(f"--fastdeploy-version {version}: FastDeploy before {PT_LAYOUT_SINCE} cannot load "
                         f"the -PT layout; target {PT_LAYOUT_SINCE} or later, or convert with "
                         f"`{CONVERT_TO['paddle'].format(model=model.rstrip('/'))}`")


def _torch_format_env(raw: dict, layout: str, model: str) -> dict:
    """FastDeploy reads the layout from config.json alone: `torch_dtype` means torch, `dtype` Paddle."""
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


def _sizes(args, engine: str, config: ErnieConfig) -> dict:
    defaults = ENGINES[engine]
    tp = args.tensor_parallel_size
    if tp < 1 or config.num_key_value_heads % tp:
        divisors = [d for d in range(1, config.num_key_value_heads + 1) if config.num_key_value_heads % d == 0]
        raise ErnieError(f"--tensor-parallel-size {tp}: must divide num_key_value_heads "
                         f"({config.num_key_value_heads}) or the engine hangs at start; use one of "
                         f"{', '.join(map(str, divisors))}")
    if engine == "fastdeploy" and tp > MAX_TENSOR_PARALLEL:
        raise ErnieError(f"--tensor-parallel-size {tp}: FastDeploy accepts 1 to {MAX_TENSOR_PARALLEL}")
    default_len = min(defaults["max_model_len"], config.max_position_embeddings)
    max_model_len = _positive(_option(args, "max_model_len", default_len), "--max-model-len")
    max_num_seqs = _positive(_option(args, "max_num_seqs", defaults["max_num_seqs"]), "--max-num-seqs")
    if max_model_len > config.max_position_embeddings:
        raise ErnieError(f"--max-model-len {max_model_len}: above the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); use at most that")
    gpu_memory = _option(args, "gpu_memory_utilization", defaults["gpu_memory_utilization"])
    _check_ratio(gpu_memory, "--gpu-memory-utilization")
    sizes = {"tensor_parallel_size": tp, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs}
    batched = getattr(args, "max_num_batched_tokens", None)
    if engine == "fastdeploy":
        _fastdeploy_start_checks(max_model_len, max_num_seqs, batched)
    if batched is not None:
        sizes["max_num_batched_tokens"] = _positive(batched, "--max-num-batched-tokens")
    sizes["gpu_memory_utilization"] = gpu_memory
    if engine == "fastdeploy":
        kv_cache_ratio = _option(args, "kv_cache_ratio", 0.75)
        _check_ratio(kv_cache_ratio, "--kv-cache-ratio")
        sizes["kv_cache_ratio"] = kv_cache_ratio
    return sizes


def _fastdeploy_start_checks(max_model_len: int, max_num_seqs: int, batched: int | None):
    """The checks FastDeploy's FDConfig.check applies at start, here before a GPU is ever touched."""
    if not 1 <= max_num_seqs <= 256:
        raise ErnieError(f"--max-num-seqs {max_num_seqs}: FastDeploy accepts 1 to 256")
    if max_model_len < 16:
        raise ErnieError(f"--max-model-len {max_model_len}: FastDeploy needs at least 16")
    # Unset, FastDeploy takes max_num_batched_tokens = max_model_len (no chunked prefill).
    tokens = batched if batched is not None else max_model_len
    flag = "--max-num-batched-tokens" if batched is not None else "--max-model-len"
    if tokens < max_num_seqs:
        raise ErnieError(f"{flag} {tokens}: FastDeploy needs max_num_batched_tokens ({tokens}) >= "
                         f"max_num_seqs ({max_num_seqs}); raise it or lower --max-num-seqs")
    if tokens > max_model_len * max_num_seqs:
        raise ErnieError(f"--max-num-batched-tokens {tokens}: FastDeploy needs at most max_model_len x "
                         f"max_num_seqs = {max_model_len * max_num_seqs}")


def _check_quantization(engine: str, device: str, quantization: str):
    allowed = QUANTIZATIONS[(engine, device)]
    if quantization not in allowed:
        raise ErnieError(f"--quantization {quantization}: not supported by {engine} on {device}; "
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


def plan_deployment(args) -> Plan:
    """Validate the options and the model directory; raise ErnieError on the first problem."""
    engine, device = _resolve_engine_device(args)
    version = _resolve_version(args)
    _check_quantization(engine, device, args.quantization)
    config, raw, layout = _read_model(args.model)
    _check_layout(engine, device, layout, version, args.model)
    fixed_env = dict(DEVICE_ENV.get(device, {}))
    if engine == "fastdeploy":
        fixed_env.update(_torch_format_env(raw, layout, args.model))
    sizes = _sizes(args, engine, config)
    ports = _ports(args, engine)
    _check_out(args.out, getattr(args, "overwrite", False))

    served_name = Path(args.model).resolve().name
    settings = {**ports, "served_model_name": served_name, **sizes}
    if engine == "fastdeploy":
        settings["block_size"] = BLOCK_SIZE.get(device, 64)
        settings["enable_prefix_caching"] = device in PREFIX_CACHING_DEVICES
        if args.quantization != "none":
            settings["quantization"] = args.quantization
        if device == "gpu" and _version(version) >= _version(LOAD_CHOICES_SINCE):
            settings["load_choices"] = "default_v1"
    else:
        settings["dtype"] = "bfloat16" if engine == "vllm-ascend" else "auto"
        if engine == "vllm-ascend":
            settings["enforce_eager"] = True
    tp = sizes["tensor_parallel_size"]
    plan = Plan(engine=engine, device=device, model_ref=args.model_ref or str(Path(args.model).resolve()),
                served_name=served_name, layout=layout, kind=config.kind, quantization=args.quantization,
                version=version, settings=settings,
                env={VISIBLE_DEVICES[device]: ",".join(str(i) for i in range(tp))}, fixed_env=fixed_env)
    plan.notes = _notes(plan, config)
    return plan


def _notes(plan: Plan, config: ErnieConfig) -> list[str]:
    s = plan.settings
    notes = [
        f"Layout {LAYOUT_NAMES[plan.layout]}: what {plan.engine} loads on {plan.device}.",
        f"Tensor parallel {s['tensor_parallel_size']}: divides the {config.num_key_value_heads} KV heads.",
        f"max_model_len {s['max_model_len']} (the model allows {config.max_position_embeddings}): "
        "bounds the KV cache; raise it only if prompts need it.",
        f"Quantization {plan.quantization}: {QUANTIZATION_NOTES[plan.quantization]}.",
    ]
    if "FD_FOR_TORCH_MODEL_FORMAT" in plan.fixed_env:
        notes.append("FD_FOR_TORCH_MODEL_FORMAT=1: config.json says `dtype` (as transformers 5 writes it), "
                     "which FastDeploy would read as the Paddle layout; the variable forces the torch layout.")
    if s.get("load_choices"):
        notes.append("load_choices default_v1: the v1 loader, needed for -PT and faster for -Paddle.")
    if plan.device in DEVICE_ENV or plan.device in BLOCK_SIZE:
        notes.append(f"{plan.device} environment: "
                     + ", ".join(f"{k}={v}" for k, v in DEVICE_ENV.get(plan.device, {}).items())
                     + (f"; block_size {BLOCK_SIZE[plan.device]}" if plan.device in BLOCK_SIZE else "") + ".")
    if plan.engine == "vllm-ascend":
        notes.append("enforce_eager: graph mode off, as measured (vllm / vllm-ascend 0.18.0, torch_npu "
                     "2.9.0.post1, CANN 8.3.1); vllm and vllm-ascend versions must match exactly. "
                     "Atlas 300I Duo has no bf16: set `dtype: float16` there.")
    if plan.engine != "fastdeploy":
        notes.append("vLLM needs transformers >= 4.54 for the ernie4_5 config class (no trust_remote_code).")
        if plan.kind == "moe":
            notes.append("MoE models need vLLM > 0.10.0 (0.10.0 broke shared-expert loading).")
    if "Base" in plan.served_name:
        notes.append("A Base model: text completion only (/v1/completions); it has no chat template.")
    return notes


def _yaml(plan: Plan) -> str:
    engine = plan.engine if plan.version is None else f"FastDeploy {plan.version}"
    head = (f"# {engine} config for {plan.served_name} on {plan.device}, written by `ernie-paddle deploy`.\n"
            f"# Keys are {plan.engine} argument names; flags given to launch.sh override them.\n")
    return head + yaml.safe_dump(plan.engine_config(), sort_keys=False)


def _launch_script(plan: Plan) -> str:
    target = plan.engine if plan.version is None else f"FastDeploy {plan.version}"
    lines = ["#!/usr/bin/env bash",
             f"# Start {target} serving {plan.served_name} on {plan.device} (written by `ernie-paddle deploy`).",
             "# MODEL and the visible-devices variable may be overridden from the environment.",
             "set -euo pipefail",
             'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
             f'MODEL="${{MODEL:-{plan.model_ref}}}"']
    lines += [f'export {name}="${{{name}:-{value}}}"' for name, value in plan.env.items()]
    lines += [f"export {name}={value}" for name, value in plan.fixed_env.items()]
    if plan.quantization == "block_wise_fp8":
        lines += ['cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)"',
                  'if [ "${cap%%.*}" -lt 9 ]; then',
                  '  echo "launch.sh: block_wise_fp8 needs a Hopper GPU (compute capability 9.x), found $cap; '
                  'redeploy with --quantization wint8" >&2',
                  "  exit 2",
                  "fi"]
    lines.append("exec " + ENGINES[plan.engine]["command"].format(config=plan.config_name) + ' "$@"')
    return "\n".join(lines) + "\n"


def smoke_test_script(port: int, served_name: str) -> str:
    body = json.dumps({"model": served_name, "prompt": SMOKE_PROMPT, "max_tokens": 16, "temperature": 0})
    return f"""#!/usr/bin/env bash
# Wait until the server answers /health, then send one request to /v1/completions.
# Works against FastDeploy, vLLM and `ernie-paddle serve` alike.
set -euo pipefail
URL="${{URL:-http://127.0.0.1:{port}}}"
TIMEOUT="${{TIMEOUT:-900}}"
waited=0
until curl -fsS -o /dev/null "$URL/health"; do
  if [ "$waited" -ge "$TIMEOUT" ]; then
    echo "smoke_test.sh: $URL/health not ready after ${{TIMEOUT}}s" >&2
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
    target = (f"FastDeploy {plan.version} (`fastdeploy-gpu` / `-xpu` ... from Paddle's package index, "
              "not the PyPI `fastdeploy-python` placeholder)" if plan.version else plan.engine)
    s = plan.settings
    lines = [f"# {plan.served_name} on {plan.engine} ({plan.device})", "",
             f"Written by `ernie-paddle deploy`. Targets {target}.", "",
             f"- model: `{plan.model_ref}` ({LAYOUT_NAMES[plan.layout]} layout), served as `{plan.served_name}`",
             f"- config: `{plan.config_name}`; port {s['port']}",
             "", "## Run", "",
             "    bash launch.sh            # MODEL=/path/to/model bash launch.sh to load another copy",
             "    bash smoke_test.sh        # waits for /health, then one /v1/completions request",
             "", "## Why these settings", ""]
    lines += [f"- {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"


def write_deployment(plan: Plan, out: str | Path, overwrite: bool = False) -> Path:
    """Render into a temporary sibling directory, then rename it into place: no half-written DIR."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = {plan.config_name: _yaml(plan), "launch.sh": _launch_script(plan),
                 "smoke_test.sh": smoke_test_script(plan.settings["port"], plan.served_name),
                 "README.md": _readme(plan)}
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        for script in ("launch.sh", "smoke_test.sh"):
            (staging / script).chmod(0o755)
        staging.chmod(0o755)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def run_deploy(args) -> int:
    plan = plan_deployment(args)
    out = write_deployment(plan, args.out, getattr(args, "overwrite", False))
    print(f"wrote {out}/ ({plan.config_name}, launch.sh, smoke_test.sh, README.md): {plan.engine} on "
          f"{plan.device}, {LAYOUT_NAMES[plan.layout]}, quantization {plan.quantization}, port {plan.settings['port']}")
    return 0
