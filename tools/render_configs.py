"""Regenerate configs/: the reference deployments of ERNIE-4.5-0.3B (Base and instruct, -PT and
-Paddle) on every engine/device, each written by `ernie-paddle deploy` itself.

The real checkpoints are not needed: deploy reads config.json and the tensor names only. So each
model is described by a stand-in directory built here: the published config.json values (written
through ErnieConfig, the same writer the converters use, so the -PT file carries `torch_dtype` and
the -Paddle file `dtype`, as published) and a one-tensor model.safetensors with a name in the
model's layout. Stating the values here rather than committing four config.json files keeps one
copy of them, and a test re-renders into a temporary directory and compares with configs/.

    python tools/render_configs.py            # rewrite configs/
"""

from __future__ import annotations

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
MODELS = {"ERNIE-4.5-0.3B-Base-PT": "pt", "ERNIE-4.5-0.3B-PT": "pt",
          "ERNIE-4.5-0.3B-Base-Paddle": "paddle", "ERNIE-4.5-0.3B-Paddle": "paddle"}
STAND_IN_TENSOR = {"pt": "model.embed_tokens.weight", "paddle": "ernie.embed_tokens.weight"}

# (engine, device, quantization): wint4 is left out, on the dense 0.3B it is wint8 under another name.
TARGETS = (
    ("fastdeploy", "gpu", "none"), ("fastdeploy", "gpu", "wint8"), ("fastdeploy", "gpu", "block_wise_fp8"),
    ("fastdeploy", "xpu", "none"), ("fastdeploy", "xpu", "wint8"),
    ("fastdeploy", "dcu", "none"), ("fastdeploy", "iluvatar", "none"),
    ("vllm", "gpu", "none"), ("vllm-ascend", "npu", "none"),
)


def write_stand_in(directory: Path, layout: str):
    directory.mkdir(parents=True)
    config = ErnieConfig(**ERNIE_0_3B)
    raw = config.to_pt_dict() if layout == "pt" else config.to_paddle_dict()
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_safetensors(directory / "model.safetensors",
                      [(STAND_IN_TENSOR[layout], "float32", (1,), lambda: np.zeros(1, np.float32))])


def target_name(engine: str, device: str, quantization: str) -> str:
    return f"{engine}-{device}" + ("" if quantization == "none" else f"-{quantization}")


def render(out: Path):
    """Write every reference deployment under `out`/<model>/<engine>-<device>[-<quantization>]/."""
    with tempfile.TemporaryDirectory() as scratch:
        for model, layout in MODELS.items():
            source = Path(scratch) / model
            write_stand_in(source, layout)
            for engine, device, quantization in TARGETS:
                if layout not in deploy.LAYOUTS[(engine, device)]:
                    continue
                argv = ["deploy", engine, "--model", str(source), "--model-ref", f"baidu/{model}",
                        "--out", str(out / model / target_name(engine, device, quantization)),
                        "--device", device, "--quantization", quantization, "--no-port-check"]
                if cli.main(argv) != 0:
                    raise SystemExit(f"render_configs: `ernie-paddle {' '.join(argv)}` failed")


def main() -> int:
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
