"""The CPU operators of csrc/ (the decoding matmul and its MoE form, the MoE router, attention, swiglu, RMSNorm,
and the decoder layers, dense or MoE, with the lm_head, chaining them) as Paddle custom operators: built
once per machine with Paddle's own extension builder, cached, and loaded in milliseconds afterwards.
The same library has the transposing copy that loads -Paddle checkpoints and the quantizer of quant.py,
plain C functions, and the weight-only int8 / int4 matmul (csrc/quant.h has its layout).

Decoding multiplies a few rows by every weight matrix, so its speed is the speed of reading the
weights: the matmul streams them over all cores (MKL runs a one-row product on one core), and the
attention op replaces ~20 small ops per layer (docs/performance.md has the measurements). Without a C++
compiler, or with ERNIE_PADDLE_CPU_OPS=0, Paddle's own ops run instead: same results to float32
rounding.
ERNIE_PADDLE_CPU_ARCH=x86-64-v3 (any GCC -march value) builds for that instruction set instead of this
machine's: the AVX2 kernels on an AVX-512 machine, say.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .device import cpu_threads, import_paddle

LIBRARY = "ernie_cpu_ops"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "cpu_matmul.cc", CSRC / "cpu_moe.cc", CSRC / "cpu_attention.cc", CSRC / "cpu_swiglu.cc",
           CSRC / "cpu_rms_norm.cc", CSRC / "cpu_transpose.cc", CSRC / "cpu_quant.cc", CSRC / "cpu_decoder.cc"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-w"]
MAX_ROWS = 32  # above this (prefill), MKL's blocked GEMM is compute-bound and faster

log = logging.getLogger(__name__)

# Run in a child process: the builder prints build logs and registers the ops in its own process.
# Linked to the OpenMP runtime that Paddle's MKL uses (libiomp5, which also serves GCC's OpenMP calls),
# not GCC's libgomp: one pool of threads for both. With two pools, each one's workers spin waiting for
# work on the cores the other needs, and decoding ran 3x slower.
BUILD = """
import sys, warnings
warnings.simplefilter("ignore")
from paddle.utils.cpp_extension import load
import os, paddle
libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
name, build_directory, sources, flags = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
load(name=name, sources=sources, extra_cxx_cflags=flags, build_directory=build_directory,
     extra_ldflags=[f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"])
"""


def cache_dir() -> Path:
    root = os.environ.get("ERNIE_PADDLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ernie-paddle")
    return Path(root) / "kernels"


def matmul(x, w, threads: int | None = None):
    """x [..., K] @ w^T for w [N, K]: x float32, w float32 or bfloat16, on CPU; after `available()`."""
    return _run_custom_op("ernie_cpu_matmul", x, w, threads or cpu_threads())[0]


def grouped_matmul(x, w, offsets):
    """Rows offsets[e]..offsets[e + 1] of x [R, K] @ w[e]^T for stacked w [E, N, K] (float32 or bfloat16),
    `offsets` int64 [E + 1] on CPU: each used expert's matrix read once; after `available()`."""
    return _run_custom_op("ernie_cpu_grouped_matmul", x, w, offsets, cpu_threads())[0]


def grouped_quant_matmul(x, data, scales, offsets):
    """grouped_matmul over a stack of experts' matrices packed by quant.quantize (data [E, N, ...],
    scales [E, N, ...]); after `available()`."""
    return _run_custom_op("ernie_cpu_grouped_quant_matmul", x, data, scales, offsets, cpu_threads())[0]


def quant_matmul(x, data, scales, threads: int | None = None):
    """x [..., K] @ W^T for W [N, K] packed by quant.quantize (data, scales), for 1 to MAX_ROWS rows of
    float32 x on CPU; after `available()`."""
    return _run_custom_op("ernie_quant_matmul", x, data, scales, threads or cpu_threads())[0]


def dequantize(data, scales, k: int):
    """The float32 [N, k] matrix packed by quant.quantize (data, scales), on CPU; after `available()`."""
    return _run_custom_op("ernie_dequantize", data, scales, k, cpu_threads())[0]


def dequantize_rows(data, scales, ids, k: int):
    """Rows `ids` (int64, any shape) of the float32 matrix packed by quant.quantize, [*ids.shape, k]: an
    embedding lookup in a packed tied lm_head; after `available()`."""
    return _run_custom_op("ernie_dequantize_rows", data, scales, ids, k)[0].reshape([*ids.shape, k])


def widen(w):
    """A float32 copy of the bfloat16 CPU tensor `w` (exact; Paddle's cast is 5x slower); after `available()`."""
    return _run_custom_op("ernie_bf16_to_f32", w, cpu_threads())[0]


def swiglu(x):
    """silu(x[..., :I]) * x[..., I:] for float32 x [..., 2I] on CPU; after `available()`."""
    return _run_custom_op("ernie_swiglu", x, cpu_threads())[0]


def rms_norm(x, weight, eps: float):
    """RMSNorm of float32 x [..., H] with weight [H] on CPU, as model.RMSNorm computes it; after `available()`."""
    return _run_custom_op("ernie_rms_norm", x, weight, eps, cpu_threads())[0]


def attention(qkv, cos, sin, keys, values, mask, start: int, heads: int, scale: float):
    """Causal attention of T new tokens over the KV cache (csrc/cpu_attention.cc says what it takes);
    writes their keys and values into `keys` and `values` at `start`; returns [B, T, heads * D].
    After `available()`."""
    _check_cache(keys, values, "attention")
    return _run_custom_op("ernie_cpu_attention", qkv, cos, sin, keys, values, mask, start, heads, scale,
                          cpu_threads())[0]


def layer_weights(layers) -> list[list]:
    """The lists of layer weights that `decoder` takes, from each layer's (input_norm, qkv, o, post_norm,
    up_gate, down, router): router = (gate, bias, experts' up_gate stack, experts' down stack) for a MoE
    layer, whose up_gate and down are the shared experts' (or None), and None for a dense one. Weight
    matrices are float32 / bfloat16 tensors or packed ones (with `data` and `scales`)."""
    rows = []
    for input_norm, qkv, o, post_norm, up_gate, down, router in layers:
        gate, bias, experts_up_gate, experts_down = router or (_empty(), _empty(), None, None)
        rows.append((input_norm, *_matrix(qkv), *_matrix(o), post_norm, *_matrix(up_gate), *_matrix(down), gate, bias,
                     *_matrix(experts_up_gate), *_matrix(experts_down)))
    return [list(weights) for weights in zip(*rows)]


def decoder(x, positions, freqs, mask, keys: list, values: list, start: int, layers: list[list], heads: int,
            scale: float, eps: float, rope_ratio: float = 1.0, top_k: int = 0, norm_min: float = 0.0,
            embedding=None, final_norm=None, head=None, last_only: bool = False):
    """Decoder layers in one operator (csrc/cpu_decoder.cc), `layers` from `layer_weights`, each with its
    keys and values (written in place at `start`, as `attention` does), RoPE at `positions` (`rotation`):
    the hidden states after them, or with final_norm and head (the lm_head matrix) the float32 logits,
    [B, V] of the last positions when `last_only`. x is the hidden states, or token ids looked up in
    `embedding`. top_k and norm_min are the MoE router's. After `available()`."""
    for k, v in zip(keys, values):
        _check_cache(k, v, "decoder")
    return _run_custom_op("ernie_cpu_decoder", x, positions, freqs, mask, *_matrix(embedding),
                          _empty() if final_norm is None else final_norm, *_matrix(head), *layers, keys, values, start,
                          heads, scale, eps, rope_ratio, top_k, norm_min, last_only, cpu_threads())[0]


def rotation(positions, freqs, ratio: float):
    """RoPE's cos and sin [B, T, 1, D] at int64 positions [B, T] (csrc/cpu_attention.cc): angle = position / ratio
    * freqs, freqs float32 [D] (one frequency repeated for each pair of channels), sin negated on even
    channels. After `available()`."""
    return tuple(_run_custom_op("ernie_rotation", positions, freqs, ratio))


def route(h, gate, bias, top_k: int, norm_min: float):
    """The MoE router (csrc/cpu_moe.cc) for float32 rows h [M, H] on CPU: the `top_k` experts of each row by
    softmax(h @ gate^T) + bias, [M, top_k] int64, and their scores renormalised to sum to 1 (the sum
    clipped below at norm_min), float32. After `available()`."""
    return tuple(_run_custom_op("ernie_cpu_route", h, gate, bias, top_k, norm_min, cpu_threads()))


def _check_cache(keys, values, op: str):
    if not (keys.is_contiguous() and values.is_contiguous()):
        # Paddle hands a custom op a contiguous copy of a view: the new keys would be written there.
        raise ValueError(f"cpu_ops.{op}: the KV cache must be contiguous tensors, not views")


def _matrix(w) -> tuple:
    """A weight matrix as the operators take it: packed (data, scales), or (w, an empty tensor); None, two
    empty tensors."""
    if w is None:
        return _empty(), _empty()
    return (w.data, w.scales) if hasattr(w, "scales") else (w, _empty())


@functools.lru_cache(maxsize=None)
def _empty():
    return import_paddle().empty([0], "float32")


def advise_huge_pages(t):
    """Ask Linux to back the CPU tensor t's memory with 2 MB pages, before anything is written to it, where
    transparent huge pages are left to madvise (the usual setting); elsewhere nothing happens. Decoding
    streams every weight once a step, and over 4 KB pages the TLB misses cost a sixth of the time: on the
    2-core Zen 3 one row through the 21B-A3B shape's bf16 lm_head (530 MB) took 27-34 ms instead of 34-39."""
    page = 1 << 21
    first = -(-t.data_ptr() // page) * page
    last = (t.data_ptr() + t.numel().item() * t.element_size()) // page * page
    if last > first and _libc() is not None:
        _libc().madvise(first, last - first, 14)  # MADV_HUGEPAGE


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def copy_transposed(src: np.ndarray, dst: np.ndarray) -> bool:
    """dst[...] = src.T, for a contiguous 2-D src and a dst with unit element stride (a block of
    columns of a weight matrix). In C++ (2-4x numpy's speed) when `available()` has loaded the
    operators already, and then True: loading a model does not build them just for this (a GPU or
    NPU model, or bfloat16 compute on CPU, does not use them)."""
    native = (_transpose is not None and src.flags.c_contiguous and dst.strides[1] == dst.itemsize == src.itemsize
              and dst.shape == src.shape[::-1] and _transpose(src.ctypes.data, dst.ctypes.data, *src.shape, src.shape[1],
                                                               dst.strides[0] // dst.itemsize, dst.itemsize,
                                                               cpu_threads()) == 0)
    if not native:
        dst[...] = src.T
    return native


def quantize(src: np.ndarray, bits: int, group: int, data: np.ndarray, scales: np.ndarray) -> bool:
    """Fill data and scales (quant.py's layout) from the float32 or bf16-bits (uint16) 2-D src, in
    C++ when `available()` has loaded the operators already, and then True; else False and untouched."""
    if _quantize is None or src.dtype not in (np.float32, np.uint16):
        return False
    n, k = src.shape
    return _quantize(src.ctypes.data, src.dtype == np.uint16, n, k, src.strides[0] // src.itemsize,
                     src.strides[1] // src.itemsize, group, bits, data.ctypes.data, scales.ctypes.data,
                     cpu_threads()) == 0


_transpose = None  # csrc/cpu_transpose.cc's function, once available() has loaded the library
_quantize = None  # and csrc/cpu_quant.cc's


def _load_functions(library: Path):
    global _transpose, _quantize
    handle = ctypes.CDLL(str(library))  # loaded by Paddle already: the same handle
    transpose = handle.ernie_copy_transposed
    transpose.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
    quantize_ = handle.ernie_quantize
    quantize_.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_void_p,
                                                                                  ctypes.c_void_p, ctypes.c_int]
    _transpose, _quantize = transpose, quantize_


def _run_custom_op(name, *args):
    return _custom_op_runner()(name, *args)


@functools.lru_cache(maxsize=None)
def _custom_op_runner():
    return import_paddle().base.core.eager._run_custom_op


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the operators are loaded in this process, building them first if this machine has not.
    A failed build is remembered (a `.failed` file beside where the library would be) and not retried."""
    if os.environ.get("ERNIE_PADDLE_CPU_OPS", "1") == "0":
        return False
    library = failed = None
    try:
        library = cache_dir() / _build_key() / f"{LIBRARY}.so"
        failed = library.with_suffix(".failed")
        if not library.exists():
            if failed.exists():
                log.debug("CPU operators: an earlier build failed (%s); using Paddle's ops", failed)
                return False
            _build(library)
        try:
            import_paddle().base.core.load_op_meta_info_and_register_op(str(library))
            _load_functions(library)
        except Exception:
            library.unlink(missing_ok=True)  # unusable (a different Paddle, a damaged file): rebuilt next time
            raise
        failed.unlink(missing_ok=True)  # a concurrent build that failed
        return True
    except Exception as e:  # any failure leaves Paddle's own ops, which compute the same
        _report(e, failed)
        return False


def _report(error: Exception, failed: Path | None):
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        fix = "install a C++ compiler"
    elif failed is None or failed.parent.exists() and os.access(failed.parent, os.W_OK):
        fix = "fix the cause"
    else:
        fix = "set ERNIE_PADDLE_CACHE to a writable directory"
    if failed is not None:
        try:
            failed.write_text(reason + "\n")
            fix += f" and delete {failed}"
        except OSError:
            pass
    print(f"ernie-paddle: the CPU decoding kernels are unavailable ({reason}); Paddle's own ops run instead, "
          f"decoding 1.1x to 1.6x slower. To use them, {fix}.", file=sys.stderr)


def _build_key() -> str:
    """Changes with anything the library depends on: the sources, flags, Paddle, and the CPU
    (-march=native)."""
    sources = sorted(p for p in CSRC.iterdir() if p.suffix in (".cc", ".h"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources))
    digest.update(" ".join(_flags()).encode())
    paddle = import_paddle()
    digest.update(f"{paddle.__version__} {paddle.__file__}".encode())
    digest.update(platform.machine().encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _flags() -> list[str]:
    arch = os.environ.get("ERNIE_PADDLE_CPU_ARCH")
    return [f"-march={arch}" if arch and flag == "-march=native" else flag for flag in FLAGS]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(library: Path):
    library.parent.mkdir(parents=True, exist_ok=True)
    print("ernie-paddle: building the CPU decoding kernels for this machine (once, one to two minutes on 2 cores) ...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        command = [sys.executable, "-c", BUILD, LIBRARY, work, ",".join(map(str, SOURCES)), *_flags()]
        returncode, output = _run_with_clock(command, timeout=900)
        built = sorted(Path(work).rglob(f"{LIBRARY}*.so"))
        if returncode != 0 or not built:
            lines = [line for line in output.splitlines() if "error" in line.lower()]
            raise RuntimeError(lines[0] if lines else f"the build exited with code {returncode}")
        os.replace(built[0], library)  # complete or absent, even with two builders at once
    print(f"ernie-paddle: built in {time.perf_counter() - started:.1f} s ({library})", file=sys.stderr)


def _run_with_clock(command: list[str], timeout: float) -> tuple[int, str]:
    """Run `command`, showing the seconds elapsed on a terminal; its exit code and output."""
    from tqdm import tqdm
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process, \
            tqdm(desc="compiling", bar_format="{desc} {elapsed}", file=sys.stderr, leave=False,
                 disable=None) as clock:  # None: only on a terminal
        deadline = time.monotonic() + timeout
        while True:
            try:
                output, _ = process.communicate(timeout=0.5)
                return process.returncode, output
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    process.kill()
                    raise
                clock.refresh()
