"""Where the model runs: device resolution, dtype policy, and a quiet import of paddle."""

from __future__ import annotations

import os
import warnings

from .errors import ErnieError

DTYPES = ("float32", "bfloat16", "float16")


def import_paddle():
    """Import paddle once, quietly, or say in one line what to install."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No ccache found" from paddle.utils.cpp_extension
            import paddle
    except ImportError:
        raise ErnieError("PaddlePaddle is not installed: pip install 'ernie-paddle[cpu]' for CPU, "
                         "or install your GPU/NPU Paddle build (see README)") from None
    return paddle


def resolve(device: str = "auto") -> str:
    """Turn 'auto', 'cpu', 'gpu[:i]', 'npu[:i]' into a Paddle place string and make it current."""
    paddle = import_paddle()
    name = (device or "auto").lower()
    if name == "auto":
        name = "cpu"
    if name != "cpu":
        raise ErnieError(f"--device {device}: unknown or unavailable device; available: cpu")
    paddle.set_device(name)
    return name


def resolve_dtype(device: str, dtype: str = "auto") -> str:
    if dtype in (None, "auto"):
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ErnieError(f"--dtype {dtype}: unknown dtype; choose from auto, {', '.join(DTYPES)}")
    if device == "cpu" and dtype != "float32":
        raise ErnieError(f"--dtype {dtype}: Paddle computes only in float32 on CPU; use --dtype float32")
    return dtype


def synchronize(device: str):
    if device != "cpu":
        import_paddle().device.synchronize(device)


def peak_memory(device: str) -> int | None:
    """Peak bytes allocated on the device, or None where Paddle cannot say (CPU)."""
    if device == "cpu":
        return None
    return int(import_paddle().device.max_memory_allocated(device))
