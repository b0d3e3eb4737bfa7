"""Weight-only wint8 / wint6 / wint4 (ernie_paddle/quant.py, csrc/quant.h, csrc/cpu_quant.cc): the packed layout
round-trips within each group's step, the C++ quantizer gives numpy's bytes, and the matmul equals a
numpy float64 reference of its integer arithmetic (x rounded to int8 per 32 values) for 1 to 32 rows,
odd K and N; also in a build forced to AVX2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_paddle import cpu_ops, device, quant

paddle = device.import_paddle()

needs_ops = pytest.mark.skipif(not cpu_ops.available(), reason="the CPU operators could not be built here")

# (rows, K, N): K not a multiple of the group (padded), N odd and smaller than threads x tiles, one row
# to 32; the model's shapes.
SHAPES = [(1, 1024, 1536), (1, 37, 50), (2, 100, 7), (3, 64, 1), (5, 33, 9), (8, 3072, 41), (9, 1000, 33),
          (32, 96, 211), (17, 2048, 5)]


def spread_weights(n, k, seed):
    """Gaussian weights with a few large ones, as trained matrices have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    w[rng.random((n, k)) < 0.01] *= 20
    return w


def reference(x: np.ndarray, q: quant.Quantized) -> np.ndarray:
    """The kernel's arithmetic in float64: each 32 values of x rounded to int8 with d = max|x| / 127,
    times the dequantized weights."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    blocks = np.zeros((m, kp), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(m, -1, 32)
    d = np.abs(blocks).max(axis=2) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    rounded = (np.rint(blocks * inverse[..., None]).astype(np.float64) * d[..., None]).reshape(m, kp)[:, :k]
    return rounded @ quant.dequantize(q).astype(np.float64).T


def plain_rule(w, levels):
    """w [N, K] through llama.cpp's Q4_0 rule (at `levels`, 8 for 4 bits): s = -extreme / levels per 32."""
    groups = np.pad(w, [(0, 0), (0, -w.shape[1] % 32)]).reshape(w.shape[0], -1, 32)
    extreme = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[..., None], axis=2)
    s = (extreme / np.float32(-levels)).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(groups * np.divide(1, s, out=np.zeros_like(s), where=s != 0)), -levels, levels - 1)
    return (q * s).reshape(w.shape[0], -1)[:, :w.shape[1]]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("format", ["wint8", "wint6", "wint4"])
def test_quantize_then_dequantize_is_within_each_groups_step(format, native, monkeypatch):
    if native and not cpu_ops.available():
        pytest.skip("the CPU operators could not be built here")
    if not native:
        monkeypatch.setattr(cpu_ops, "_quantize", None)
    w = spread_weights(37, 1000, 0)
    q = quant.quantize(w, format)
    assert q.data.shape == (37, 1024 * quant.FORMATS[format] // 8) and q.scales.shape == (37, 32)
    back = quant.dequantize(q)
    assert back.shape == w.shape and back.dtype == np.float32
    step = np.repeat(np.abs(quant._interleave(q.scales, inverse=True).astype(np.float32)), 32, axis=1)[:, :1000]
    error = np.abs(back - w)
    slack = 1e-6 * np.abs(w)
    if format == "wint8":
        assert (error <= step / 2 + slack).all()
    else:  # rounding within half a step but at the ends of -8..7 (-32..31), which may clip
        levels = 2 ** (quant.FORMATS[format] - 1)
        q = np.rint(back / np.where(step > 0, step, 1))
        at_an_end = np.abs(q) >= levels - 1  # either end, whatever the sign of the scale
        assert (error[~at_an_end] <= step[~at_an_end] / 2 + slack[~at_an_end]).all()
        assert (error[at_an_end] <= step[at_an_end] + slack[at_an_end]).all()
        # and the search's scales leave no group more squared error than llama.cpp's rule alone (d = levels)
        def per_group(e):
            return np.pad(e ** 2, [(0, 0), (0, 24)]).reshape(37, -1, 32).sum(axis=2, dtype=np.float64)
        searched, plain = per_group(back - w), per_group(plain_rule(w, levels) - w)
        assert (searched <= plain * (1 + 1e-6)).all() and searched.sum() < plain.sum()
    assert np.abs(back - w).max() > 0  # it did quantize


@needs_ops
@pytest.mark.parametrize("format", ["wint8", "wint6", "wint4"])
def test_the_cpp_quantizer_writes_numpys_bytes(format):
    """From float32, from bf16 bits (uint16, as checkpoints load) and from a transposed view (a -Paddle
    [in, out] matrix); an all-zero group; the dequantize operator gives numpy's floats."""
    w = spread_weights(45, 200, 1)
    w[3, :64] = 0
    bf16_bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    cases = [w, bf16_bits, np.ascontiguousarray(w.T).T]
    for src in cases:
        got = quant.quantize(src, format)
        kp = got.data.shape[1] * 8 // quant.FORMATS[format]
        data, scales = quant._quantize_numpy(src, quant.FORMATS[format], quant.GROUP, kp)
        assert np.array_equal(got.data, data) and np.array_equal(got.scales, scales)
        widened = cpu_ops.dequantize(paddle.to_tensor(got.data), paddle.to_tensor(got.scales), got.k).numpy()
        assert np.array_equal(widened, quant.dequantize(got))


@needs_ops
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("format", ["wint8", "wint6", "wint4"])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_matmul_matches_its_integer_arithmetic(rows, k, n, format, threads):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, : min(k, 40)] = 0  # an all-zero block of x
    q = quant.quantize(spread_weights(n, k, n), format)
    got = cpu_ops.quant_matmul(paddle.to_tensor(x), paddle.to_tensor(q.data), paddle.to_tensor(q.scales), threads)
    got = got.numpy()
    expected = reference(x, q)
    assert got.shape == (rows, n) and got.dtype == np.float32
    # each block's integer sum is exact; float32 rounds the K / 32 block terms
    terms = np.abs(x).max() * np.abs(quant.dequantize(q)).max() * k
    assert np.abs(got - expected).max() <= 1e-6 * terms


@needs_ops
@pytest.mark.parametrize("format", ["wint8", "wint6", "wint4"])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(format):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 300)).astype(np.float32)
    q = quant.quantize(spread_weights(21, 300, 4), format)
    data, scales = paddle.to_tensor(q.data), paddle.to_tensor(q.scales)
    batch = cpu_ops.quant_matmul(paddle.to_tensor(x), data, scales).numpy()
    for m in range(11):
        assert np.array_equal(cpu_ops.quant_matmul(paddle.to_tensor(x[m:m + 1]), data, scales).numpy()[0], batch[m])
    assert np.array_equal(cpu_ops.quant_matmul(paddle.to_tensor(x.reshape(1, 11, 300)), data, scales, 1).numpy()[0],
                          batch)


@needs_ops
def test_a_mismatched_k_is_one_clear_error():
    q = quant.quantize(spread_weights(4, 64, 0), "wint4")
    with pytest.raises(Exception, match="K = 100 does not match the packed rows"):
        cpu_ops.quant_matmul(paddle.ones([1, 100]), paddle.to_tensor(q.data), paddle.to_tensor(q.scales))


@pytest.mark.parametrize("native", [True, False])
def test_a_scale_overflowing_float16_does_not_win_the_search(native, monkeypatch):
    """extreme / 6.25 is past float16's 65504 where extreme / 8 is not: that candidate's error is NaN."""
    if native and not cpu_ops.available():
        pytest.skip("the CPU operators could not be built here")
    if not native:
        monkeypatch.setattr(cpu_ops, "_quantize", None)
    w = np.full((1, 32), 1000.0, np.float32)
    w[0, 0] = -4.5e5
    q = quant.quantize(w, "wint4")
    assert np.isfinite(q.scales).all() and np.isfinite(quant.dequantize(q)).all()


def test_unknown_formats_and_groups_are_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int4': use one of wint8, wint6, wint4"):
        quant.quantize(np.ones((2, 32), np.float32), "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.ones((2, 32), np.float32), "wint8", group=48)
    with pytest.raises(ValueError, match="for wint6, 32"):
        quant.quantize(np.ones((2, 64), np.float32), "wint6", group=64)


CHILD = """
import json, sys
import numpy as np
from ernie_paddle import cpu_ops, device, quant
paddle = device.import_paddle()
assert cpu_ops.available(), "the forced build failed"
out = {"key": cpu_ops._build_key()}
for format in ("wint8", "wint6", "wint4"):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 1000)).astype(np.float32)
    q = quant.quantize(rng.standard_normal((37, 1000)).astype(np.float32), format)
    y = cpu_ops.quant_matmul(paddle.to_tensor(x), paddle.to_tensor(q.data), paddle.to_tensor(q.scales)).numpy()
    out[format] = y.view(np.uint32).tolist()
print(json.dumps(out))
"""


@needs_ops
@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux only")
def test_a_build_forced_to_avx2_gives_the_same_bits():
    """ERNIE_PADDLE_CPU_ARCH=x86-64-v3 builds the AVX2 kernels (on an AVX-512 machine, instead of its
    VNNI ones) under a key of its own; the integer sums are exact, so both builds agree bit for bit."""
    runs = []
    for arch in ("x86-64-v3", None):
        env = {k: v for k, v in os.environ.items() if k != "ERNIE_PADDLE_CPU_ARCH"}
        if arch:
            env["ERNIE_PADDLE_CPU_ARCH"] = arch
        run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        runs.append(json.loads(run.stdout.splitlines()[-1]))
    forced, native = runs
    assert forced["key"] != native["key"]
    for format in ("wint8", "wint6", "wint4"):
        assert forced[format] == native[format], format


@pytest.mark.parametrize("format", ["wint8", "wint6", "wint4"])
def test_dequantize_rows_picks_rows_of_the_interleaved_layout(format):
    """The embedding lookup in a quantized tied lm_head: rows inside the groups of 8 and after them."""
    q = quant.quantize(spread_weights(21, 100, 2), format)
    ids = np.array([0, 7, 8, 15, 16, 20, 3, 3])
    assert np.array_equal(quant.dequantize_rows(q, ids), quant.dequantize(q)[ids])
    if cpu_ops.available():  # the operator the model looks its embeddings up with
        got = cpu_ops.dequantize_rows(paddle.to_tensor(q.data), paddle.to_tensor(q.scales),
                                      paddle.to_tensor(ids.reshape(2, 4)), q.k)
        assert np.array_equal(got.numpy(), quant.dequantize(q)[ids].reshape(2, 4, 100))
        with pytest.raises(Exception, match="id 21 is outside the table's 21 rows"):
            cpu_ops.dequantize_rows(paddle.to_tensor(q.data), paddle.to_tensor(q.scales), paddle.to_tensor([21]), q.k)
