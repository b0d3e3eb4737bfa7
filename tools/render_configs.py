"""Regenerate configs/: the reference deployments of ERNIE-4.5-0.3B (Base and instruct, -PT and
-Paddle) and ERNIE-4.5-21B-A3B (-PT and -Paddle) on every engine/device, each written by
`ernie-paddle deploy` itself.

The real checkpoints are not needed: deploy reads config.json and the tensor names only. So each
model is described by a stand-in directory built here: the published config.json values (written
through ErnieConfig, the same writer the converters use, so the -PT file carries `torch_dtype` and
the -Paddle file `dtype`, as published) and a one-tensor model.safetensors with a name in the
model's layout. Stating the values here rather than committing config.json files keeps one copy of
them, and a test re-renders into a temporary directory and compares with configs/.

    python tools/render_configs.py            # rewrite configs/
    python tools/render_configs.py --check    # say whether configs/ is current (exit 1 if not)
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ernie_paddle import cli, deploy
from ernie_paddle.checkpoint import write_safetensors
from ernie_paddle.config import ErnieConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# ERNIE-4.5-0.3B (Base and instruct share it): spec/checkpoints.md section 1.
ERNIE_0_3B = dict(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=128, rope_theta=500000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
                  use_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
# ERNIE-4.5-21B-A3B: the shape of transformers.Ernie4_5_MoeConfig()'s defaults, with the MoE keys of the
# published config.json.
ERNIE_21B_A3B = dict(
    vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
    num_key_value_heads=4, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
    tie_word_embeddings=True, use_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    kind="moe", extra=dict(
        moe_num_experts=64, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27,
        moe_layer_interval=1, moe_intermediate_size=1536, moe_k=6, moe_capacity=[64, 64, 64], moe_gate="topk",
        moe_use_aux_free=True, num_nextn_predict_layers=1, use_cache=False))
STAND_IN_TENSOR = {"pt": "model.embed_tokens.weight", "paddle": "ernie.embed_tokens.weight"}

# Deployment name -> (engine, device, quantization, other deploy flags).
DENSE_TARGETS = {  # wint4 is left out: on the dense 0.3B it is wint8 under another name (FastDeploy 2.1+)
    "fastdeploy-gpu": ("fastdeploy", "gpu", "none", []),
    "fastdeploy-gpu-wint8": ("fastdeploy", "gpu", "wint8", []),
    "fastdeploy-gpu-block_wise_fp8": ("fastdeploy", "gpu", "block_wise_fp8", []),
    "fastdeploy-xpu": ("fastdeploy", "xpu", "none", []),
    "fastdeploy-xpu-wint8": ("fastdeploy", "xpu", "wint8", []),
    "fastdeploy-dcu": ("fastdeploy", "dcu", "none", []),
    "fastdeploy-iluvatar": ("fastdeploy", "iluvatar", "none", []),
    "vllm-gpu": ("vllm", "gpu", "none", []),
    "vllm-cpu": ("vllm", "cpu", "none", []),
    "vllm-ascend-npu": ("vllm-ascend", "npu", "none", []),
}
# FastDeploy's recipes for 21B-A3B: docs/best_practices/ERNIE-4.5-21B-A3B-Paddle.md (GPU: wint4 / wint8 /
# fp8 on one GPU, wint8 on two 24-40 GB GPUs), docs/usage/kunlunxin_xpu_deployment.md (one P800),
# docs/get_started/installation/iluvatar_gpu.md (TP 4, wint8, block 16, 8K context).
MOE_TARGETS = {
    "fastdeploy-gpu-wint4": ("fastdeploy", "gpu", "wint4", []),
    "fastdeploy-gpu-wint8": ("fastdeploy", "gpu", "wint8", []),
    "fastdeploy-gpu-wint8-tp2": ("fastdeploy", "gpu", "wint8", ["--tensor-parallel-size", "2"]),
    "fastdeploy-gpu-block_wise_fp8": ("fastdeploy", "gpu", "block_wise_fp8", []),
    "fastdeploy-xpu-wint4": ("fastdeploy", "xpu", "wint4", []),
    "fastdeploy-xpu-wint8": ("fastdeploy", "xpu", "wint8", []),
    "fastdeploy-iluvatar-wint8-tp4": ("fastdeploy", "iluvatar", "wint8",
                                      ["--tensor-parallel-size", "4", "--max-model-len", "8192"]),
    "vllm-gpu": ("vllm", "gpu", "none", []),
    "vllm-ascend-npu": ("vllm-ascend", "npu", "none", []),
}
# model -> (config values, layout, targets)
MODELS = {
    "ERNIE-4.5-0.3B-Base-PT": (ERNIE_0_3B, "pt", DENSE_TARGETS),
    "ERNIE-4.5-0.3B-PT": (ERNIE_0_3B, "pt", DENSE_TARGETS),
    "ERNIE-4.5-0.3B-Base-Paddle": (ERNIE_0_3B, "paddle", DENSE_TARGETS),
    "ERNIE-4.5-0.3B-Paddle": (ERNIE_0_3B, "paddle", DENSE_TARGETS),
    "ERNIE-4.5-21B-A3B-PT": (ERNIE_21B_A3B, "pt", MOE_TARGETS),
    "ERNIE-4.5-21B-A3B-Paddle": (ERNIE_21B_A3B, "paddle", MOE_TARGETS),
}


def write_stand_in(directory: Path, layout: str, values: dict = ERNIE_0_3B):
    directory.mkdir(parents=True)
    config = ErnieConfig(**values)
    raw = config.to_pt_dict() if layout == "pt" else config.to_paddle_dict()
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_safetensors(directory / "model.safetensors",
                      [(STAND_IN_TENSOR[layout], "float32", (1,), lambda: np.zeros(1, np.float32))])


def render(out: Path):
    """Write every reference deployment under `out`/<model>/<deployment name>/."""
    release = deploy.FASTDEPLOY[deploy.DEFAULT_FASTDEPLOY_VERSION]
    with tempfile.TemporaryDirectory() as scratch:
        for model, (values, layout, targets) in MODELS.items():
            source = Path(scratch) / model
            write_stand_in(source, layout, values)
            for name, (engine, device, quantization, flags) in targets.items():
                if layout not in deploy.layouts(engine, device, release if engine == "fastdeploy" else None):
                    continue
                argv = ["deploy", engine, "--model", str(source), "--model-ref", f"baidu/{model}",
                        "--out", str(out / model / name), "--device", device, "--quantization", quantization,
                        "--no-port-check", *flags]
                if cli.main(argv) != 0:
                    raise SystemExit(f"render_configs: `ernie-paddle {' '.join(argv)}` failed")


def stale(configs: Path = CONFIGS) -> list[str]:
    """The paths below `configs` that differ from what deploy writes now, or stand on one side only."""
    with tempfile.TemporaryDirectory() as fresh:
        render(Path(fresh))
        return _differences(filecmp.dircmp(fresh, configs))


def _differences(comparison: filecmp.dircmp, prefix: str = "") -> list[str]:
    found = [prefix + name for name in comparison.left_only + comparison.right_only + comparison.diff_files]
    for name, below in comparison.subdirs.items():
        found += _differences(below, f"{prefix}{name}/")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with configs/ instead of rewriting it; "
                                                                "exit 1 when it is stale")
    if parser.parse_args(argv).check:
        differ = stale()
        print(f"configs/ is stale: {', '.join(differ[:5])}; run python tools/render_configs.py" if differ else
              "configs/ is up to date")
        return 1 if differ else 0
    staging = Path(tempfile.mkdtemp(prefix=".configs.", dir=ROOT))
    try:
        render(staging)
        staging.chmod(0o755)
        shutil.rmtree(CONFIGS, ignore_errors=True)
        staging.rename(CONFIGS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {CONFIGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
