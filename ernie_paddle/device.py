"""Where the model runs: device resolution, dtype policy, Paddle flags and the NPU fused-op probe.

Everything device-specific lives here. A place is Paddle's string: "cpu", "gpu:0", "npu:1", or any
type a custom-device plugin registers ("xpu:0", "mlu:0", "intel_hpu:0", ...).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import ErnieError

DTYPES = ("float32", "bfloat16", "float16")

# Read once by Paddle and the NPU plugin when paddle is imported (official Ascend recipes).
NPU_OPS = {"rms_norm": "rms_norm_npu", "attention": "flash_attention_npu"}
NPU_ENVIRONMENT = {"FLAGS_npu_jit_compile": "0", "FLAGS_npu_storage_format": "0"}
INSTALL_HINTS = {"gpu": "install a GPU build of paddlepaddle",
                 "npu": "install paddle-custom-npu, see docs/npu.md"}

log = logging.getLogger(__name__)


def configure_cpu_math():
    """Settings for the MKL that Paddle bundles, read at its first call, so set before paddle is
    imported; values already in the environment win. Measured on a 2-core EPYC:
    - it runs generic kernels on AMD CPUs; its AVX-512 (or AVX2) ones make GEMM 2.4x faster;
    - Paddle pins it to one thread; GEMMs (prefill, batched decoding) run 2x faster on both cores."""
    os.environ.setdefault("MKL_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else os.cpu_count() or 1))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if "AuthenticAMD" in cpuinfo:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "7" if " avx512f" in cpuinfo else "5")


# glibc malloc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD = -3, -1


@functools.cache
def keep_freed_memory():
    """Have glibc malloc keep freed memory for reuse instead of returning it to the system. Paddle's
    CPU tensors are malloc'ed, and glibc gave every large one (beyond 128 KB) fresh pages from the
    system and unmapped it when freed, so each new tensor was written through page faults: widening
    18 bf16 up_gate matrices took 220 ms instead of 25, a 512-token prefill 2.35 s instead of 2.0.
    Blocks up to 32 MB (glibc's limit) now come from the heap, which is trimmed only beyond 1 GB
    free. Environment values (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) win; other C
    libraries are left alone."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(MMAP_THRESHOLD, 32 << 20)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(TRIM_THRESHOLD, 1 << 30)


def cpu_threads() -> int:
    return int(os.environ.get("MKL_NUM_THREADS") or 1)


def import_paddle():
    """Import paddle once, quietly, or say in one line what to install."""
    paddle = sys.modules.get("paddle") or _import_paddle()
    keep_freed_memory()  # once per process, also when the caller imported paddle itself
    return paddle


def _import_paddle():
    os.environ.setdefault("GLOG_minloglevel", "2")
    configure_cpu_math()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No ccache found" from paddle.utils.cpp_extension
            import paddle
    except ImportError:
        raise ErnieError("PaddlePaddle is not installed: pip install 'ernie-paddle[cpu]' for CPU, "
                         "or install your GPU/NPU Paddle build (see README.md, 'Set up')") from None
    finally:
        # Paddle's import gives the root logger a stderr handler at INFO, which would print every
        # library's info lines (an HTTP client's every request) in the caller's program.
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
        root.setLevel(level)
    return paddle


def prepare_environment(device: str = "auto") -> None:
    """Set the flags that are read only when paddle is imported; call before importing it.
    Values already in the environment win."""
    kind = _kind(device)
    if kind in ("cpu", "gpu") or (kind == "auto" and not _plugins_installed()):
        return
    # Views on a custom device need its own `contiguous` kernel (no CPU fallback) unless strided
    # kernels are off; the official NPU images turn them off too.
    os.environ.setdefault("FLAGS_use_stride_kernel", "0")
    if kind in ("npu", "auto"):
        for name, value in NPU_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def available() -> list[str]:
    """The places Paddle can run on here, in the order `auto` prefers: gpu, npu, other custom
    devices, cpu."""
    paddle = import_paddle()
    gpus = [f"gpu:{i}" for i in range(paddle.device.cuda.device_count())]
    custom = [p if ":" in p else f"{p}:0" for p in paddle.device.get_available_custom_device() or []]
    custom.sort(key=lambda p: _kind(p) != "npu")
    return gpus + custom + ["cpu"]


def resolve(device: str = "auto") -> str:
    """Turn 'auto', 'cpu', 'gpu[:i]', 'npu[:i]' or '<custom type>[:i]' into a Paddle place string
    and make it current (always: a loaded plugin otherwise becomes the default device)."""
    paddle = import_paddle()
    places = available()
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = places[0]
    kind = _kind(name)
    if name not in places and not (name == kind and any(_kind(p) == kind for p in places)):
        raise ErnieError(_unavailable(device, places))
    if kind not in ("cpu", "gpu"):  # as prepare_environment() does, for Python callers who did not
        paddle.set_flags({"FLAGS_use_stride_kernel": False})
    paddle.set_device(name)
    return paddle.device.get_device()  # 'npu' becomes the index Paddle picked (FLAGS_selected_npus)


def resolve_dtype(device: str, dtype: str = "auto") -> str:
    """The compute dtype on a place. CPU computes in float32 only; GPU and NPU default to bfloat16
    (float16 on GPUs older than Ampere); other custom devices to float32, which every backend has.
    Whatever the dtype, the model keeps norm statistics, softmax and logits (so sampling) in float32."""
    kind = _kind(device)
    if dtype in (None, "auto"):
        if kind == "gpu":
            major, _ = import_paddle().device.cuda.get_device_capability(device)
            return "bfloat16" if major >= 8 else "float16"
        return "bfloat16" if kind == "npu" else "float32"
    if dtype not in DTYPES:
        raise ErnieError(f"--dtype {dtype}: unknown dtype; choose from auto, {', '.join(DTYPES)}")
    if kind == "cpu" and dtype != "float32":
        raise ErnieError(f"--dtype {dtype}: Paddle computes only in float32 on CPU; use --dtype float32")
    return dtype


def synchronize(device: str):
    if device != "cpu":  # paddle.device.synchronize raises TypeError on a CPU place
        import_paddle().device.synchronize(device)


def peak_memory(device: str) -> int | None:
    """Peak bytes allocated on the device, or None where Paddle cannot say (CPU, some plugins)."""
    if device == "cpu":
        return None
    try:
        return int(import_paddle().device.max_memory_allocated(device))
    except (ValueError, RuntimeError):
        return None


def fused_op(name: str, dtype: str):
    """A fused NPU kernel for `name` ("rms_norm" or "attention") on the current place, wrapped to the
    plain path's signature, or None to take the plain path. It is used only when, run on a small input,
    it matches the plain computation (the choice is logged). The CPU's are in cpu_ops.py: Paddle's own
    fused_rms_norm runs AVX-512 code on every CPU (SIGILL on the others)."""
    place = import_paddle().device.get_device()
    if _kind(place) == "npu":
        return _probe(NPU_OPS[name], place, dtype)
    return None


def rms_norm_npu(x, weight, eps: float):
    """RMSNorm of x [..., H] with weight [H], as model.RMSNorm computes it."""
    return _run_custom_op("rms_norm_npu", x, weight, eps)[0]


def flash_attention_npu(q, k, v, mask):
    """Attention of q [B, T, heads, D] over k, v [B, kv_heads, S, D] (the KV-cache layout) with an
    additive mask of B * T * S values ([B, T, S], or with axes of 1 for broadcasting); returns
    [B, T, heads, D]."""
    masked = (mask < 0).reshape([q.shape[0], 1, q.shape[1], k.shape[2]])  # the op takes True = cut
    k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
    # attrs: dropout, causal (its own square mask: wrong after a cache), return_softmax, is_test,
    # is_triangle_upper_mask (would hide every key after the query index: wrong when decoding)
    return _run_custom_op("flash_attention_npu", q, k, v, None, masked, 0.0, False, False, True, False)[0]


@functools.lru_cache(maxsize=None)
def _probe(name: str, place: str, dtype: str):
    """Run the fused op on the current place against a float32 numpy reference, once per place
    and dtype; return its wrapper when it agrees, else None."""
    op, check = FUSED[name]
    try:
        error = check(op, dtype)
        usable = error <= (1e-4 if dtype == "float32" else 2e-2)
        reason = f"max relative error {error:.1e} against the plain computation"
    except Exception as e:  # any failure (op missing, signature or dtype unsupported) means plain
        usable, reason = False, (str(e).strip().splitlines() or [type(e).__name__])[0]
    log.info("%s on %s in %s: %s (%s)", name, place, dtype, "fused op" if usable else "plain path", reason)
    return op if usable else None


def _probe_rms_norm(op, dtype: str) -> float:
    rng = np.random.default_rng(0)
    x, weight = _random(rng, (2, 3, 64), dtype), _random(rng, (64,), dtype)
    x32, weight32 = _values(x), _values(weight)
    expected = weight32 * x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)
    return _relative_error(op(x, weight, 1e-6), expected)


def _probe_attention(op, dtype: str) -> float:
    """Grouped-query attention of 3 new queries over 5 cached keys: the decoding case."""
    rng = np.random.default_rng(0)
    t, s, heads, kv_heads, d = 3, 5, 4, 2, 64
    q = _random(rng, (1, t, heads, d), dtype)
    k, v = (_random(rng, (1, kv_heads, s, d), dtype) for _ in range(2))
    visible = np.arange(s)[None, :] <= np.arange(s - t, s)[:, None]
    mask = np.where(visible, 0.0, -1e30).astype(np.float32)[None]
    k32, v32 = (np.repeat(_values(a), heads // kv_heads, axis=1) for a in (k, v))
    scores = np.einsum("bthd,bhsd->bhts", _values(q), k32) / np.sqrt(d) + mask[:, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhts,bhsd->bthd", probs / probs.sum(-1, keepdims=True), v32)
    return _relative_error(op(q, k, v, import_paddle().to_tensor(mask)), expected)


FUSED = {"rms_norm_npu": (rms_norm_npu, _probe_rms_norm),
         "flash_attention_npu": (flash_attention_npu, _probe_attention)}


def _run_custom_op(name, *args):
    return import_paddle().base.core.eager._run_custom_op(name, *args)


def _random(rng, shape, dtype: str):
    return import_paddle().to_tensor(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _values(tensor) -> np.ndarray:
    return tensor.astype("float32").numpy()


def _relative_error(got, expected: np.ndarray) -> float:
    got = _values(got)
    if got.shape != expected.shape:
        raise ValueError(f"output shape {list(got.shape)}, expected {list(expected.shape)}")
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _kind(device: str) -> str:
    return (device or "auto").strip().lower().split(":")[0]


def _plugins_installed() -> bool:
    """Whether `import paddle` will load a custom-device plugin (without importing paddle)."""
    root = os.environ.get("CUSTOM_DEVICE_ROOT")
    if root is None:
        spec = importlib.util.find_spec("paddle")
        if spec is None or not spec.submodule_search_locations:
            return False
        root = Path(list(spec.submodule_search_locations)[0]).parent / "paddle_custom_device"
    return bool(root) and any(Path(root).glob("*.so"))


def _unavailable(device: str, places: list[str]) -> str:
    kind = _kind(device)
    hint = INSTALL_HINTS.get(kind) if not any(_kind(p) == kind for p in places) else None
    return (f"--device {device}: not available here; choose from auto, {', '.join(places)}"
            + (f" ({kind}: {hint})" if hint else ""))
