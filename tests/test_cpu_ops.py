"""The CPU operators (ernie_paddle/csrc/): built for real; the matmul, swiglu and RMSNorm checked against numpy in
float64 on awkward shapes, the attention against the plain Paddle path; the fallback when they cannot be
built."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ernie_paddle import cpu_ops, device

paddle = device.import_paddle()

needs_ops = pytest.mark.skipif(not cpu_ops.available(), reason="the CPU operators could not be built here")

# (rows, K, N): one row and several; K not a multiple of the vector lanes (a zero-padded tail); N not a
# multiple of the tiles of 3 (AVX2) or 4 w rows, and fewer w rows than threads x tile; more rows than the
# 4-row x tiles; a 1-wide output; an empty K; shapes of the real model; the lm_head at batch 8.
SHAPES = [(1, 1024, 1536), (1, 37, 50), (3, 37, 50), (5, 7, 3), (8, 64, 1), (2, 16, 40), (33, 100, 17),
          (4, 3072, 40), (32, 96, 211), (9, 9, 33), (8, 1024, 100), (2, 0, 5)]


@needs_ops
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_kernel_matches_numpy(rows, k, n, threads):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)  # [out, in]
    got = cpu_ops.matmul(paddle.to_tensor(x), paddle.to_tensor(w), threads).numpy()
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    assert got.shape == (rows, n) and got.dtype == np.float32
    # float32 rounding of a K-term sum: well under 1e-6 * K relative to the terms' scale
    assert np.abs(got - expected).max(initial=0) <= 1e-6 * k * np.abs(x).max(initial=0) * np.abs(w).max(initial=0)


@needs_ops
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_bf16_weights_give_the_float32_results_bit_for_bit(rows, k, n, threads):
    """bfloat16 weights widened as they are read: the same float32 sums as their float32 copies."""
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = paddle.to_tensor(rng.standard_normal((rows, k)).astype(np.float32))
    w = paddle.to_tensor(rng.standard_normal((n, k)).astype(np.float32))
    held = w.astype("bfloat16")
    widened = cpu_ops.widen(held)
    assert widened.dtype == paddle.float32 and np.array_equal(widened.numpy(), held.astype("float32").numpy())
    got = cpu_ops.matmul(x, held, threads).numpy()
    assert np.array_equal(got, cpu_ops.matmul(x, widened, threads).numpy())
    w64 = widened.numpy().astype(np.float64)
    expected = x.numpy().astype(np.float64) @ w64.T
    scale = np.abs(x.numpy()).max(initial=0) * np.abs(w64).max(initial=0)
    assert np.abs(got - expected).max(initial=0) <= 1e-6 * k * scale


@needs_ops
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_row_gets_the_same_bits_in_any_batch(dtype):
    """Rows in 4-row tiles, in the 1-3-row remainder and alone add their dot products in the same order:
    a sequence decodes to the same logits alone and in a batch."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 100)).astype(np.float32)
    w = paddle.to_tensor(rng.standard_normal((37, 100)).astype(np.float32)).astype(dtype)
    alone = {m: cpu_ops.matmul(paddle.to_tensor(x[:m]), w).numpy() for m in range(1, 10)}
    for m in range(1, 9):
        assert np.array_equal(alone[m], alone[9][:m]), m


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64, np.int8])
def test_copy_transposed_writes_a_block_of_columns(kernels, dtype, monkeypatch):
    """How -Paddle [in, out] weights load into the [out, in] layout: in C++, or numpy (other item
    sizes, or without the operators); the columns beside the block untouched."""
    if kernels and not cpu_ops.available():
        pytest.skip("the CPU operators could not be built here")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "_transpose", None)
    src = np.random.default_rng(0).integers(0, 100, (37, 1003)).astype(dtype)
    held = np.zeros((1003, 50), dtype)
    assert cpu_ops.copy_transposed(src, held[:, 5:42]) == (kernels and dtype != np.int8)
    assert np.array_equal(held[:, 5:42], src.T)
    assert not held[:, :5].any() and not held[:, 42:].any()


def test_loading_does_not_build_the_operators():
    """Loading transposes -Paddle weights in C++ only where the operators are loaded already: a GPU or
    NPU model, or bfloat16 compute on CPU, must not start a minute-long build of kernels it will not use."""
    code = ("import numpy as np\nfrom ernie_paddle import cpu_ops\n"
            "src, dst = np.ones((3, 4), np.float32), np.zeros((4, 3), np.float32)\n"
            "print(cpu_ops.copy_transposed(src, dst), dst.all(), cpu_ops.available.cache_info().currsize)\n"
            "print(cpu_ops.available() and cpu_ops.copy_transposed(src, dst))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    first, then = run.stdout.splitlines()
    assert first == "False True 0"  # numpy's copy, and available() not even asked
    assert then == str(cpu_ops.available())  # once it has loaded them, they copy


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
                    reason="an x86-64 g++ is needed")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4", "icelake-server"])
@pytest.mark.parametrize("source", [p.name for p in cpu_ops.SOURCES])
def test_kernels_compile_for_cpus_without_avx512(source, march, tmp_path):
    """-march=native builds for this machine only: the other x86 vector widths must compile too
    (without AVX-512 a Vec is two or four registers; icelake-server has AVX-512 VNNI, which the quantized
    matmul uses), or such machines fall back to Paddle's ops."""
    from paddle.utils.cpp_extension.extension_utils import find_paddle_includes
    includes = [*find_paddle_includes(), sysconfig.get_paths()["include"]]
    flags = [f for f in cpu_ops.FLAGS if not f.startswith("-march")] + [f"-march={march}", "-O0", "-std=c++17"]
    result = subprocess.run(["g++", "-S", *flags, *(f"-I{i}" for i in includes), str(cpu_ops.CSRC / source),
                             "-o", str(tmp_path / "out.s")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]



@needs_ops
@pytest.mark.skipif(" avx512f" not in cpu_ops._cpu_flags() or "ERNIE_PADDLE_CPU_ARCH" in os.environ,
                    reason="the native build is the AVX2 one (no AVX-512 here), which this whole suite runs")
def test_the_avx2_kernels_pass_the_kernel_tests_on_an_avx512_machine():
    """On an AVX-512 machine every other test runs its AVX-512 kernels; these run the kernel tests (the
    decoder's bits against its operators', attention, matmuls, quantization) on the AVX2 build too."""
    selection = "not compile_for_cpus and not forced and not avx2_kernels"  # the kernels' numerics, once
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          str(Path(__file__).with_name("test_quant.py")), "-k", selection],
                         env={**os.environ, "ERNIE_PADDLE_CPU_ARCH": "x86-64-v3"}, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]

# one decoding row and a batch of 8 of the real model; a tail of 1 to 15 after whole vectors; no rows;
# vectors only; enough outputs for two threads, with and without whole vectors
@needs_ops
@pytest.mark.parametrize("shape", [(1, 1, 6144), (8, 1, 6144), (3, 5, 34), (2, 0, 8), (4, 32), (40000, 2),
                                   (7, 10002)])
def test_swiglu_matches_float64(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 8).astype(np.float32)
    x.reshape(-1)[:12] = [-1e30, 1e30, -100, 100, -88.5, 88.5, -87, 87, 0, -0.0, 1e-30, -1e-30][:x.size]
    got = cpu_ops.swiglu(paddle.to_tensor(x)).numpy()
    half = shape[-1] // 2
    gate, up = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    with np.errstate(over="ignore"):
        expected = gate / (1 + np.exp(-gate)) * up
    assert got.shape == expected.shape and got.dtype == np.float32
    # e^x within 1.1 ulp, then three roundings: a few float32 ulps of the result
    np.testing.assert_allclose(got, expected, rtol=5e-7, atol=1e-30)


@needs_ops
def test_the_mlp_uses_the_swiglu_kernel_on_cpu(monkeypatch):
    from ernie_paddle.model import swiglu
    calls = []
    monkeypatch.setattr(cpu_ops, "swiglu", lambda h: calls.append(h.shape) or h[..., :2])
    swiglu(paddle.ones([1, 4]))
    assert calls == [[1, 4]]
    assert swiglu(paddle.ones([1, 4], "float64")).dtype == paddle.float64 and len(calls) == 1  # not float32


# one decoding row and a batch of 8 of the real model; a tail after whole vectors; shorter than a vector;
# no rows; a prefill long enough for two threads; a strided view
@needs_ops
@pytest.mark.parametrize("shape", [(1, 1, 1024), (8, 1024), (3, 5, 37), (4, 5), (2, 0, 8), (600, 1024), "view"])
def test_rms_norm_matches_float64(shape):
    rng = np.random.default_rng(len(str(shape)))
    x = (rng.standard_normal((6, 40) if shape == "view" else shape) * 3).astype(np.float32)
    tensor = paddle.to_tensor(x)
    if shape == "view":
        tensor, x = tensor[:, 4:33], x[:, 4:33]
    w = rng.standard_normal(x.shape[-1]).astype(np.float32)
    got = cpu_ops.rms_norm(tensor, paddle.to_tensor(w), 1e-5).numpy()
    x64 = x.astype(np.float64)
    expected = w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5))
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-30)


@needs_ops
def test_the_norms_use_the_rms_norm_kernel_on_cpu(monkeypatch):
    from ernie_paddle.model import RMSNorm
    calls = []
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda x, w, eps: calls.append((x.shape, eps)) or x)
    RMSNorm(4, 1e-6, "float32")(paddle.ones([2, 4]))
    assert calls == [([2, 4], 1e-6)]
    norm = RMSNorm(4, 1e-6, "float64")
    norm.weight.set_value(paddle.ones([4], "float64"))
    assert norm(paddle.ones([1, 4], "float64")).dtype == paddle.float64 and len(calls) == 1  # not float32


@needs_ops
def test_widen_takes_odd_sizes_and_views():
    w = paddle.randn([7, 19]).astype("bfloat16")
    for tensor in (w, w[:, 3:11]):
        assert np.array_equal(cpu_ops.widen(tensor).numpy(), tensor.astype("float32").numpy())


@needs_ops
def test_kernel_keeps_leading_axes_and_takes_views():
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((2, 3, 40)).astype(np.float32))
    w = paddle.to_tensor(rng.standard_normal((30, 24)).astype(np.float32))
    got = cpu_ops.matmul(x[:, :, 8:32], w)  # a strided view of x
    assert got.shape == [2, 3, 30]
    np.testing.assert_allclose(got.numpy(), x.numpy()[:, :, 8:32] @ w.numpy().T, rtol=1e-5, atol=1e-5)


@needs_ops
def test_decoding_uses_the_kernel(monkeypatch):
    from ernie_paddle.model import project
    calls = []
    monkeypatch.setattr(cpu_ops, "matmul", lambda *args: calls.append(args) or paddle.zeros([1, 4]))
    x, w = paddle.ones([1, 8]), paddle.ones([4, 8])  # w as the model holds it: [out, in]
    project(x, w)
    assert len(calls) == 1 and calls[0][1] is w
    project(paddle.ones([cpu_ops.MAX_ROWS + 1, 8]), w)  # prefill: MKL
    assert len(calls) == 1


def run_generate(tmp_path, cache, **env):
    code = ("from ernie_paddle import ErniePredictor, cpu_ops\n"
            f"p = ErniePredictor.from_pretrained({str(tmp_path / 'model')!r}, device='cpu', progress=False)\n"
            "print(cpu_ops.available(), p.generate([[5, 6, 7]], max_new_tokens=4)[0].token_ids)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ERNIE_PADDLE_CACHE": str(cache), **env})


def test_a_failed_build_falls_back_to_paddle_ops_once_and_quietly(tmp_path):
    from conftest import save_tiny_pt
    save_tiny_pt(tmp_path / "model")
    cache = tmp_path / "cache"
    broken = {"CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false"}
    first = run_generate(tmp_path, cache, **broken)
    assert first.returncode == 0, first.stderr
    warnings = [line for line in first.stderr.splitlines() if "kernels are unavailable" in line]
    failed = list(cache.rglob("*.failed"))
    assert len(warnings) == 1 and len(failed) == 1 and f"delete {failed[0]}" in warnings[0], first.stderr
    assert first.stdout.startswith("False") and not list(cache.rglob("*.so"))
    again = run_generate(tmp_path, cache, **broken)  # the failure is remembered: no rebuild, no noise
    assert again.returncode == 0 and again.stderr == "" and again.stdout == first.stdout
    off = run_generate(tmp_path, tmp_path / "unused", ERNIE_PADDLE_CPU_OPS="0")
    assert off.returncode == 0 and off.stdout == first.stdout and not (tmp_path / "unused").exists()
    if cpu_ops.available():  # the operators built here: the same greedy tokens
        on = run_generate(tmp_path, cpu_ops.cache_dir().parent)
        assert on.returncode == 0 and on.stdout.replace("True", "False", 1) == first.stdout


@needs_ops
def test_a_damaged_library_is_removed_and_rebuilt(tmp_path):
    from conftest import save_tiny_pt
    save_tiny_pt(tmp_path / "model")
    cache = tmp_path / "cache"
    built = list(cpu_ops.cache_dir().rglob(f"{cpu_ops.LIBRARY}.so"))
    library = cache / "kernels" / cpu_ops._build_key() / f"{cpu_ops.LIBRARY}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    damaged = run_generate(tmp_path, cache)
    assert damaged.returncode == 0 and damaged.stdout.startswith("False"), damaged.stderr
    assert "kernels are unavailable" in damaged.stderr and not library.exists() and built


@needs_ops
@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_the_rotation_operator_gives_ropes_angles_correctly_rounded(ratio):
    """RoPE's cos and sin on CPU (one operator, which the decoder operator also runs): for the angles
    position / ratio * freq in float32, as model.Rope forms them, cos and sin within an ulp of the exact
    values (glibc's; Paddle's vectorised cos and sin are looser), sin negated on even channels; the
    positions reach the 0.3B model's 131072."""
    from ernie_paddle.config import ErnieConfig
    from ernie_paddle.model import Rope
    config = ErnieConfig.from_dict(dict(model_type="ernie4_5", hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                        rope_theta=500000.0, compression_ratio=ratio, vocab_size=8,
                                        intermediate_size=8, num_hidden_layers=1, max_position_embeddings=131072))
    rope = Rope(config)
    positions = np.random.default_rng(0).integers(0, 131072, size=(3, 5))
    rotation = rope.at(paddle.to_tensor(positions))
    pos = positions.astype(np.float32)
    if ratio != 1.0:
        pos = pos / np.float32(ratio)
    angles = (pos[..., None] * rope.freqs.numpy())[:, :, None, :]
    assert angles.dtype == np.float32
    signs = np.tile(np.float32([-1, 1]), 64)
    for got, want in ((rotation.cos, np.cos(angles.astype(np.float64))),
                      (rotation.sin, np.sin(angles.astype(np.float64)) * signs)):
        got = got.numpy()
        assert got.shape == (3, 5, 1, 128)
        assert np.all(np.abs(got - want) <= np.spacing(np.abs(want).astype(np.float32)))


def decode_logits(model, prompts, steps, between_layers=None):
    """Logits of a left-padded batch: the prompt, then `steps` teacher-forced tokens, fed to the
    model as generate.decode_steps feeds it (with `between_layers`, as the server's engine does)."""
    from ernie_paddle.generate import left_padded, step_masks
    from ernie_paddle.model import KVCache, causal_mask
    tokens, positions, valid = left_padded(prompts, steps)
    batch, length = tokens.shape
    step_mask = step_masks(valid)
    cache = KVCache.allocate(model.config, batch, valid.shape[1], "float32")
    out = [model(tokens, positions[:, :length], causal_mask(valid, 0, length), cache, 0, last_only=True,
                 between_layers=between_layers)]
    for step in range(steps):
        pos = length + step
        token = paddle.full([batch, 1], 7 + step, "int64")
        out.append(model(token, positions[:, pos:pos + 1], step_mask(pos), cache, pos, last_only=True,
                         between_layers=between_layers))
    return np.stack([o.numpy() for o in out]), [k.numpy() for k in cache.keys + cache.values]


# head sizes that are whole vectors (16 to 256; 24 is 3 8-lane vectors: a pair and one left) and not (12);
# GQA, MHA and MQA; groups of 1 to 8 query heads per kv head, taken in blocks of 1 to 4 (5: a block
# of 3 and one of 2); left padding; a prompt longer than the 32 rows the matmul takes
@needs_ops
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (4, 4, 12), (8, 1, 24), (4, 2, 32), (2, 2, 64),
                                                     (4, 1, 128), (2, 1, 256), (10, 2, 16)])
def test_fused_attention_matches_the_plain_path(tmp_path, monkeypatch, heads, kv_heads, head_dim):
    from conftest import save_tiny_pt
    from ernie_paddle import ErniePredictor, model as model_module
    save_tiny_pt(tmp_path, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    model = ErniePredictor.from_pretrained(tmp_path, device="cpu", progress=False).model
    prompts = [[5, 6, 7, 8, 9] * 8, [11, 12], [13, 14, 15]]
    calls = []
    for name in ("attention", "decoder"):  # the prompt's layers, and each step's decoder (cpu_decoder.cc)
        monkeypatch.setattr(cpu_ops, name, lambda *a, real=getattr(cpu_ops, name), **k: calls.append(1) or real(*a, **k))
    fused, fused_keys = decode_logits(model, prompts, 6)
    assert len(calls) == model.config.num_hidden_layers + 6
    monkeypatch.setattr(model_module, "attention_on_cpu", lambda *a: False)
    monkeypatch.setattr(model_module, "decoder_on_cpu", lambda *a: False)
    plain, plain_keys = decode_logits(model, prompts, 6)
    assert len(calls) == model.config.num_hidden_layers + 6
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5)
    for a, b in zip(fused_keys, plain_keys):  # the cache the fused op wrote, RoPE included
        for row, prompt in enumerate(prompts):  # (padding's own hidden states are garbage either way)
            first = len(prompts[0]) - len(prompt)
            np.testing.assert_allclose(a[row, :, first:], b[row, :, first:], rtol=0, atol=1e-5)


@needs_ops
@pytest.mark.parametrize("heads,kv_heads,threads", [(5, 1, 7), (12, 2, 9)])
def test_fused_attention_with_more_threads_than_kv_heads(tmp_path, monkeypatch, heads, kv_heads, threads):
    """More threads than batch rows x kv heads: the groups split into smaller head blocks (5 heads
    over 7 threads and 3 rows: blocks of 2, 2 and 1)."""
    from conftest import save_tiny_pt
    from ernie_paddle import ErniePredictor, model as model_module
    save_tiny_pt(tmp_path, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, hidden_size=48)
    model = ErniePredictor.from_pretrained(tmp_path, device="cpu", progress=False).model
    prompts = [[5, 6, 7, 8, 9] * 8, [11, 12], [13, 14, 15]]
    monkeypatch.setattr(cpu_ops, "cpu_threads", lambda: threads)
    fused, _ = decode_logits(model, prompts, 4)
    monkeypatch.setattr(model_module, "attention_on_cpu", lambda *a: False)
    plain, _ = decode_logits(model, prompts, 4)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5)


@needs_ops
def test_attention_refuses_a_cache_it_cannot_write_in_place():
    cache = paddle.zeros([1, 2, 8, 32])
    keys = paddle.zeros([1, 2, 16, 32])[:, :, :8]  # a view: writing through it would miss the tensor
    with pytest.raises(Exception, match="contiguous"):
        cpu_ops.attention(paddle.zeros([1, 1, 6 * 32]), paddle.ones([1, 1, 32]), paddle.zeros([1, 1, 32]),
                          keys, cache, paddle.zeros([1, 1, 8]), 0, 2, 1.0)


@needs_ops
@pytest.mark.parametrize("head_dim", [16, 12])  # the head-block path and attend_any
def test_attention_gives_the_same_bits_wherever_a_rows_keys_sit(head_dim):
    """A row's keys after `offset` masked cache positions holding other data (left padding, a serving
    slot) give the bits they give at position 0. The softmax adds its terms into lanes by cache
    position, which an offset rotates, and then the lanes as a tree of halves, which a rotation
    leaves as it is; a sequential sum of the lanes would break this."""
    heads, kv, n = 4, 2, 29
    rng = np.random.default_rng(0)
    qkv = rng.normal(0, 3, [n, (heads + 2 * kv) * head_dim]).astype(np.float32)
    angles = rng.uniform(-3, 3, [n, head_dim]).astype(np.float32)

    def attend(offset):
        length = offset + n
        keys = paddle.to_tensor(rng.normal(0, 3, [1, kv, length, head_dim]).astype(np.float32))
        values = paddle.to_tensor(rng.normal(0, 3, [1, kv, length, head_dim]).astype(np.float32))
        # The stale prefix, written as keys: one "prompt" of `offset` junk tokens first.
        if offset:
            junk = paddle.to_tensor(rng.normal(0, 3, [1, offset, qkv.shape[1]]).astype(np.float32))
            cpu_ops.attention(junk, paddle.ones([1, offset, head_dim]), paddle.zeros([1, offset, head_dim]),
                              keys, values, paddle.zeros([1, offset, offset]), 0, heads, 0.3)
        visible = np.arange(length)[None, :] >= offset
        causal = np.arange(length)[None, :] <= np.arange(offset, length)[:, None]
        mask = np.where(visible & causal, 0, -1e30).astype(np.float32)[None]
        return cpu_ops.attention(paddle.to_tensor(qkv[None]), paddle.to_tensor(np.cos(angles)[None]),
                                 paddle.to_tensor(np.sin(angles)[None]), keys, values, paddle.to_tensor(mask),
                                 offset, heads, 0.01).numpy()  # near-uniform weights: many terms count

    alone = attend(0)
    for offset in range(1, 18):
        np.testing.assert_array_equal(attend(offset), alone, err_msg=f"keys at offset {offset}")


@pytest.mark.skipif(os.environ.get("ERNIE_PADDLE_CPU_OPS") == "0" or not (
    sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("g++")),
    reason="the kernels are built for x86-64 Linux with g++ (and ERNIE_PADDLE_CPU_OPS=0 turns them off)")
def test_the_kernels_build_where_they_are_meant_to():
    """A failed build falls back to Paddle's ops and turns the kernel tests into skips; where it should
    work, it must fail the suite instead (it is remembered in a .failed file and not retried)."""
    failed = cpu_ops.cache_dir() / cpu_ops._build_key() / f"{cpu_ops.LIBRARY}.failed"
    reason = failed.read_text().strip() if failed.exists() else "see the build's message above"
    assert cpu_ops.available(), f"the CPU kernels did not build: {reason} ({failed})"


@needs_ops
@pytest.mark.parametrize("moe,dtype,quantization,shape", [
    (False, "float32", None, {}), (False, "bfloat16", None, {}), (False, "float32", "wint8", {}),
    (False, "bfloat16", "wint4", {}), (True, "float32", None, {}), (True, "float32", "wint4", {}),
    # rows of 40 values (a packed row padded to 64), an lm_head of its own, head_dim 12, RoPE compressed
    (False, "float32", "wint4", dict(hidden_size=40, tie_word_embeddings=False, head_dim=12, compression_ratio=2.0)),
    (False, "bfloat16", "wint4", dict(hidden_size=256)),  # a wint6 embedding / lm_head
    (False, "float32", None, dict(num_hidden_layers=6))])  # `between_layers` before layers 0, 2 and 4
def test_the_decoder_in_one_operator_gives_the_bits_of_its_operators_one_by_one(tmp_path, monkeypatch, moe, dtype,
                                                                              quantization, shape):
    """Decoding runs the layers, the final norm and the lm_head as one operator (cpu_ops.decoder), or
    one call for each quarter of the layers when the server's engine passes `between_layers`; the same
    kernels called one by
    one give the same logits and cache, bit for bit: for each weight format, dense and MoE layers
    (tests/test_moe.py has more MoE ones), prompts short enough to go through it (24 rows) and one too
    long (prefilled by the sublayers, then decoded by it)."""
    from conftest import save_tiny_moe_pt, save_tiny_pt
    from ernie_paddle import ErniePredictor
    shape = dict(shape)
    ratio = shape.pop("compression_ratio", None)
    if moe:
        save_tiny_moe_pt(tmp_path, moe_layer_start_index=0, moe_layer_interval=2, num_hidden_layers=3)
    else:
        save_tiny_pt(tmp_path, dtype=dtype, **{"num_hidden_layers": 3, **shape})
    if ratio is not None:  # a -Paddle config key, which transformers' config does not have
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "compression_ratio": ratio}))
    model = ErniePredictor.from_pretrained(tmp_path, device="cpu", quantization=quantization, progress=False).model
    assert model.config.compression_ratio == (ratio or 1.0)
    assert (model.lm_head is None) == shape.get("tie_word_embeddings", True)
    assert_the_decoder_operator_gives_the_bits_of_its_operators(
        model, monkeypatch, ([[5, 6, 7, 8, 9, 10, 11, 12], [11, 12], [13, 14, 15]], [[5, 6, 7, 8, 9] * 8, [11, 12]]))


def assert_the_decoder_operator_gives_the_bits_of_its_operators(model, monkeypatch, prompt_sets, steps: int = 5):
    """For each batch of prompts, the logits and KV cache of decoding `steps` tokens with the decoder as
    one operator, and as one operator call for each quarter of the layers (`between_layers`, called
    before each), equal bit for bit those with the layers' separate operators; the operator runs at
    every step, and for the prompt too when it has at most cpu_ops.MAX_ROWS rows."""
    from ernie_paddle import model as model_module
    calls, between = [], []
    real = cpu_ops.decoder
    monkeypatch.setattr(cpu_ops, "decoder", lambda *a, **k: calls.append(1) or real(*a, **k))
    layers = model.config.num_hidden_layers
    quarters = len(range(0, layers, -(-layers // 4)))  # the operator calls of a step with `between_layers`
    for prompts in prompt_sets:
        calls.clear()
        fused, fused_keys = decode_logits(model, prompts, steps)
        short = len(prompts[0]) * len(prompts) <= cpu_ops.MAX_ROWS
        forwards = steps + 1 if short else steps
        assert len(calls) == forwards
        calls.clear()
        by_layer, by_layer_keys = decode_logits(model, prompts, steps, between_layers=lambda: between.append(1))
        # a prompt too long for the operator runs layer by layer, calling `between_layers` before each
        assert len(calls) == forwards * quarters and len(between) == steps * quarters + (quarters if short else layers)
        between.clear()
        with monkeypatch.context() as m:
            m.setattr(model_module, "decoder_on_cpu", lambda *a: False)
            separate, separate_keys = decode_logits(model, prompts, steps)
        assert len(calls) == forwards * quarters
        np.testing.assert_array_equal(fused, separate)
        np.testing.assert_array_equal(by_layer, separate)
        for a, b, c in zip(fused_keys, by_layer_keys, separate_keys):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, c)
        if short:  # the prompt's logits at every position, as the server's prompt_logprobs asks
            logits = [prompt_logits(model, prompts), prompt_logits(model, prompts, between_layers=lambda: None)]
            with monkeypatch.context() as m:
                m.setattr(model_module, "decoder_on_cpu", lambda *a: False)
                separate = prompt_logits(model, prompts)
            assert len(calls) == (forwards + 1) * quarters + 1
            for got in logits:
                np.testing.assert_array_equal(got, separate)


def prompt_logits(model, prompts, between_layers=None):
    from ernie_paddle.generate import left_padded
    from ernie_paddle.model import KVCache, causal_mask
    tokens, positions, valid = left_padded(prompts, 0)
    cache = KVCache.allocate(model.config, *tokens.shape, "float32")
    return model(tokens, positions, causal_mask(valid, 0, tokens.shape[1]), cache, 0,
                 between_layers=between_layers).numpy()


@needs_ops
def test_the_decoder_operator_refuses_bad_input_before_writing_the_cache(tmp_path):
    """A token id outside the vocabulary, a KV cache of another batch or with a layer missing, no tokens
    at all, an lm_head of the wrong shape: one error naming the problem, and the cache as it was."""
    from conftest import save_tiny_pt
    from ernie_paddle import ErniePredictor
    from ernie_paddle.model import KVCache
    save_tiny_pt(tmp_path)
    model = ErniePredictor.from_pretrained(tmp_path, device="cpu", progress=False).model
    config = model.config

    def decode(ids, cache, start=0):
        ids = paddle.to_tensor(ids, dtype="int64")
        mask = paddle.zeros([*ids.shape, 8], "float32")
        return model.decode_on_cpu(ids, paddle.zeros(ids.shape, "int64"), mask, cache, start, True, None)

    for ids, batch, layers, error in (([[5, config.vocab_size]], 1, 2, f"token id {config.vocab_size} is outside"),
                                      ([[5], [7]], 1, 2, "KV cache holds 1 rows, x 2"),  # 2 tokens of 1 row?
                                      ([[5, 6]], 1, 1, "1 keys and 1 values caches for 2 layers"),
                                      (np.zeros([1, 0]), 1, 2, "x has no tokens")):
        cache = KVCache.allocate(config, batch, 8, "float32")
        cache = KVCache(cache.keys[:layers], cache.values[:layers])
        with pytest.raises(Exception, match=error):
            decode(ids, cache, start=3)
        assert not any(t.numpy().any() for t in cache.keys + cache.values)
    cache = KVCache.allocate(config, 1, 8, "float32")  # an lm_head of the wrong width, checked first too
    with pytest.raises(Exception, match="a weight matrix is not"):
        cpu_ops.decoder(paddle.to_tensor([[5]]), paddle.zeros([1, 1], "int64"), model.rope.freqs,
                        paddle.zeros([1, 1, 8]), cache.keys, cache.values, 3, model.cpu_layer_weights,
                        heads=config.num_attention_heads, scale=0.25, eps=1e-5, embedding=model.ernie.embed_tokens,
                        final_norm=model.ernie.norm.weight, head=paddle.zeros([7, 3]))
    assert not any(t.numpy().any() for t in cache.keys + cache.values)
    assert decode([[5, 6]], KVCache.allocate(config, 1, 8, "float32")).shape == [1, config.vocab_size]


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_cpu_weights_get_huge_pages():
    """A weight the model allocates on CPU asks for 2 MB pages before it is written (model._weight): the
    whole 2 MB pages inside it are advised (VmFlags "hg"), and its memory is then mostly backed by them.
    How much, the kernel decides: with memory fragmented it falls back to 4 KB pages, so that half is
    a loose bound."""
    import ctypes
    from ernie_paddle import model as model_module

    weight = model_module._weight([4096, 4096], "float32")  # 64 MB: its own mmap, untouched
    size, page = 4096 * 4096 * 4, 1 << 21
    advised_from, advised_to = -(-weight.data_ptr() // page) * page, (weight.data_ptr() + size) // page * page
    ctypes.memset(weight.data_ptr(), 1, size)
    huge, advised, inside = 0, 0, False  # over the mappings it spans (madvise splits them at 2 MB boundaries)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        field = line.split()[0]
        if not field.endswith(":"):
            low, high = (int(a, 16) for a in field.split("-"))
            inside = low < weight.data_ptr() + size and weight.data_ptr() < high
        elif inside and field == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
        elif inside and field == "VmFlags:" and "hg" in line.split()[1:]:
            advised += min(high, advised_to) - max(low, advised_from)
    assert advised == advised_to - advised_from
    assert huge >= 32 << 20
