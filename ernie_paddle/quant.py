"""Weight-only quantization of weight matrices for CPU decoding, in FastDeploy's names: "wint8" (8-bit
integers) and "wint4" (4-bit), each with one float16 scale per group of GROUP weights along K; and
"wint6" (6-bit, the lm_head of wint4 models).

A float32 (or bf16) matrix W [N, K], as the model holds a Linear weight, packs into
- data: wint8 int8 [N, Kp], a 32-weight block of a row 32 bytes; wint4 uint8 [N, Kp / 2], a block 16
  bytes, byte j holding weight j of the block in its low nibble and weight 16 + j in its high one,
  as q + 8; wint6 uint8 [N, 3 Kp / 4], a block 24 bytes: q + 32's low 4 bits as wint4's nibbles, then
  8 bytes of its top 2 bits (csrc/quant.h: block_weight);
- scales: float16 [N, Kp / GROUP];
with K padded by zero weights to Kp, a multiple of the group, W[n, k] = q * scales[n, k // GROUP], and
the rows interleaved in groups of 8 for the kernel (all but the last N % 8) as csrc/quant.h details:
row n is not data[n]; dequantize_rows() gives rows.
wint8 takes s = max|w| / 127 in each group and q = rint(w / s) in -127..127 (llama.cpp's Q8_0);
wint4 takes s = -w_m / 8 for the w_m of largest magnitude, so that it maps to -8 exactly, and
q = clip(rint(w / s), -8, 7) (llama.cpp's Q4_0), but then tries 7 smaller divisors than 8 for the one
with the least squared error (_best_scales); wint6 the same with 32 for 8. s is rounded to float16 before q is computed.

csrc/cpu_quant.cc computes the same in C++ (the 0.3B model quantizes in about a second); the numpy
code here is the definition, and runs where the CPU operators are not loaded.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cpu_ops

FORMATS = {"wint8": 8, "wint6": 6, "wint4": 4}
QUANTIZATIONS = ("wint8", "wint4")  # what a user asks for; wint6 holds the lm_head of wint4 models
# Weights per scale: 32, as llama.cpp. Measured against 64 and 128: the matmul at 1 row took the same
# time per pass over the 0.3B matrices (within 4%, one Zen 3 core: the kernel is bound by its per-block
# work, which does not change), while the KL of a wint4 model to float32 rose 1.1x and 2x (demo model).
GROUP = 32


def head_format(format: str, row_length: int) -> str:
    """The lm_head's format under `format` (the tied embedding of the small models, so also the table its
    rows are looked up in). At 4 bits it gave 20x the KL of the whole wint4 model with an 8-bit one (0.0017
    against 0.00008 on the demo model); llama.cpp's Q4_0 keeps it at Q6_K (6.56 bits a weight) where its
    rows are a multiple of Q6_K's 256-value blocks (every ERNIE 4.5 model), and at Q8_0 elsewhere (the
    demo model's 128): wint4 follows, with wint6 (6.5 bits) and wint8, so that both spend the same bits.
    The 0.3B model's 103424 x 1024 lm_head is 30% of its weights; at 8 bits it was half of a wint4
    decoding step's bytes."""
    return "wint6" if format == "wint4" and row_length % 256 == 0 else "wint8"


class Quantized(NamedTuple):
    data: np.ndarray    # int8 [N, Kp] (wint8) or uint8 [N, Kp / 2] (wint4), [N, 3 Kp / 4] (wint6)
    scales: np.ndarray  # float16 [N, Kp / group]
    k: int              # the columns of the matrix before padding

    @property
    def format(self) -> str:
        return format_of(self.data, self.scales)


def format_of(data, scales) -> str:
    """The format of packed data and scales (arrays or tensors): wint6 is the uint8 one with 24 bytes a
    scale (its group is 32, wint4's 32 or more give 16 or a multiple of 16)."""
    if str(data.dtype).endswith("int8") and not str(data.dtype).endswith("uint8"):
        return "wint8"
    return "wint6" if data.shape[-1] == 24 * scales.shape[-1] else "wint4"


def quantize(w: np.ndarray, format: str, group: int = GROUP, out: tuple[np.ndarray, np.ndarray] | None = None) -> Quantized:
    """W [N, K] (float32, or uint16 holding bf16 bits as checkpoint.py reads them) packed as `format`,
    into new arrays or the contiguous (data, scales) of `out`. Any strides work, a -Paddle [in, out]
    matrix's transposed view too, but reading across rows is ~10x slower than cpu_ops.copy_transposed
    and then this. Rows pack independently but for the interleaving in groups of 8: rows a:b of W, a a
    multiple of 8 and b one too or N, pack into rows a:b of the whole matrix's data and scales."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantization {format!r}: use one of {', '.join(FORMATS)}")
    if group <= 0 or group % 32 or (format == "wint6" and group != 32):
        raise ValueError(f"the quantization group must be a positive multiple of 32 (for wint6, 32), not {group}")
    bits = FORMATS[format]
    n, k = w.shape
    kp = -(-k // group) * group
    shapes = (n, kp * bits // 8), (n, kp // group)
    if out is None:
        data, scales = np.empty(shapes[0], np.int8 if bits == 8 else np.uint8), np.empty(shapes[1], np.float16)
    else:
        data, scales = out
        if (data.shape, scales.shape) != shapes or not (data.flags.c_contiguous and scales.flags.c_contiguous):
            raise ValueError(f"quantize out: expected contiguous arrays of shapes {shapes}, got "
                             f"{data.shape} and {scales.shape}")
    if not cpu_ops.quantize(w, bits, group, data, scales):
        data[...], scales[...] = _quantize_numpy(w, bits, group, kp)
    return Quantized(data, scales, k)


def dequantize(q: Quantized) -> np.ndarray:
    """The float32 [N, K] matrix that `q` holds."""
    return _dequantize_plain(_interleave(q.data, inverse=True), _interleave(q.scales, inverse=True), q.k)


def dequantize_rows(q: Quantized, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the float32 matrix that `q` holds, [len(ids), K]: an embedding lookup in a tied
    lm_head."""
    ids = np.asarray(ids).reshape(-1)
    n, width = q.data.shape
    grouped = n // 8 * 8
    data = np.empty((len(ids), width), q.data.dtype)
    scales = np.empty((len(ids), q.scales.shape[1]), q.scales.dtype)
    inside = ids < grouped
    group, row = ids[inside] // 8, ids[inside] % 8
    data[inside] = q.data[:grouped].reshape(n // 8, width // 4, 8, 4)[group, :, row].reshape(-1, width)
    scales[inside] = q.scales[:grouped].reshape(n // 8, -1, 8)[group, :, row]
    data[~inside], scales[~inside] = q.data[ids[~inside]], q.scales[ids[~inside]]
    return _dequantize_plain(data, scales, q.k)


def _dequantize_plain(data: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    n, groups = scales.shape
    format = format_of(data, scales)
    if format == "wint8":
        values = data.astype(np.float32)
    elif format == "wint4":
        chunks = data.reshape(n, -1, 1, 16)
        values = np.concatenate([chunks & 15, chunks >> 4], axis=2).reshape(n, -1).astype(np.int8) - 8
    else:
        blocks = data.reshape(n, -1, 24)
        nibbles = np.stack([blocks[..., :16] & 15, blocks[..., :16] >> 4], axis=2)  # [n, blocks, half, 16]
        top = blocks[..., 16:].reshape(n, -1, 1, 1, 2, 4)  # [.., c % 2, j % 4] of nibble j, c = j // 4
        shifts = (4 * np.arange(2)[None, :] + 2 * np.arange(2)[:, None]).astype(np.uint8)  # [half, c // 2]
        top = (top >> shifts[..., None, None]) & 3  # [n, blocks, half, c // 2, c % 2, j % 4]
        values = (nibbles | top.reshape(n, -1, 2, 16) << 4).reshape(n, -1).astype(np.int8) - 32
    w = values.reshape(n, groups, -1).astype(np.float32) * scales.astype(np.float32)[..., None]
    return w.reshape(n, -1)[:, :k]


def _quantize_numpy(w: np.ndarray, bits: int, group: int, kp: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    w = w.astype(np.uint32) << 16 if w.dtype == np.uint16 else w
    values = np.zeros((n, kp), np.float32)
    values[:, :k] = w.view(np.float32) if w.dtype == np.uint32 else w
    values = values.reshape(n, kp // group, group)
    levels = 127 if bits == 8 else 1 << (bits - 1)  # q's most negative value: -levels
    if bits == 8:
        scales = (np.abs(values).max(axis=2) / np.float32(levels)).astype(np.float16)
    else:
        extreme = np.take_along_axis(values, np.abs(values).argmax(axis=2)[..., None], axis=2)[..., 0]
        scales = _best_scales(values, extreme, np.float32(levels))
    s = scales.astype(np.float32)
    inverse = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s != 0)
    hi = levels if bits == 8 else levels - 1
    q = np.clip(np.rint(values * inverse[..., None]), -levels, hi).astype(np.int8).reshape(n, kp)
    if bits == 8:
        return _interleave(q), _interleave(scales)
    unsigned = (q + levels).astype(np.uint8).reshape(n, -1, 2, 16)  # [n, blocks, half, j]
    nibbles = (unsigned[:, :, 0] & 15) | (unsigned[:, :, 1] & 15) << 4
    if bits == 4:
        return _interleave(nibbles.reshape(n, -1)), _interleave(scales)
    top = (unsigned >> 4).reshape(n, -1, 2, 2, 2, 4)  # [n, blocks, half, c // 2, c % 2, j % 4]
    shifts = (4 * np.arange(2)[None, :] + 2 * np.arange(2)[:, None]).astype(np.uint8)  # [half, c // 2]
    top = (top << shifts[..., None, None]).sum(axis=(2, 3), dtype=np.uint8)  # [n, blocks, c % 2, j % 4]
    return _interleave(np.concatenate([nibbles, top.reshape(n, -1, 8)], axis=2).reshape(n, -1)), _interleave(scales)


def _best_scales(values: np.ndarray, extreme: np.ndarray, levels: np.float32) -> np.ndarray:
    """wint4 / wint6 scales of groups values [N, groups, G] whose values of largest magnitude are `extreme`:
    of s = extreme / -d for the divisors d = levels * (1 + j / 32), j = -7 .. 0, the one whose q leave
    the least squared error, summed in order in float32 (the first of equals). d = levels alone is
    llama.cpp's Q4_0 rule; with the search the demo model's wint4 KL to float32 fell from 0.032 to 0.020
    (csrc/cpu_quant.cc: best_scale)."""
    divisors = levels + (np.arange(8, dtype=np.float32) - 7) * (levels / np.float32(32))
    with np.errstate(over="ignore", invalid="ignore"):  # a candidate overflowing float16: its error is NaN
        candidates = (extreme[..., None] / -divisors).astype(np.float16)  # [N, groups, 8]
        s = candidates.astype(np.float32)
        inverse = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s != 0)
        error = np.zeros_like(s)
        for i in range(values.shape[2]):
            v = values[:, :, i, None]
            d = v - np.clip(np.rint(v * inverse), -levels, levels - 1) * s
            error += d * d
    error[~(error <= np.finfo(np.float32).max)] = np.inf  # which never wins but when all do
    return np.take_along_axis(candidates, error.argmin(axis=2)[..., None], axis=2)[..., 0]


def _interleave(a: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The groups of 8 rows: the bytes [N, Kp], [N, Kp / 2] or [N, 3 Kp / 4] (4 of each row in turn) or the
    scales [N, groups] (1 of each row in turn); the last N % 8 rows as they are. inverse undoes it."""
    n, width = a.shape
    grouped = n // 8 * 8
    unit = 1 if a.dtype == np.float16 else 4
    out = a.copy()
    middle = (width // unit, 8) if inverse else (8, width // unit)
    rows = a[:grouped].reshape(n // 8, *middle, unit).transpose(0, 2, 1, 3)
    out[:grouped] = rows.reshape(grouped, width)
    return out
