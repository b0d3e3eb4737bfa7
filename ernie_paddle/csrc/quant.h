// Weight-only quantized matmul for CPU decoding: y = x @ W^T for a few float32 rows x and a weight
// matrix W [N, K] held as 8-bit or 4-bit integers with one float16 scale per group of G weights along
// K (G a multiple of 32; K padded with zero weights to Kp, a multiple of G). The layout (quant.py
// writes it):
//
//   wint8: data int8 [N, Kp], W[n, k] = data[n, k] * scale[n, k / G]                  (q in -127..127)
//   wint4: data uint8 [N, Kp / 2]; in each 32-weight block b of a row, byte 16b + j holds weight
//          32b + j in its low nibble and weight 32b + 16 + j in its high one, each as q + 8 (0..15):
//          W[n, k] = (nibble - 8) * scale[n, k / G]                                  (llama.cpp's Q4_0)
//   scale: float16 [N, Kp / G]
//
// Numerics, as llama.cpp's Q8_0 and Q4_0 dot products: each 32 values of an x row are rounded to
// int8 with a float32 scale of their own, d = max|x| / 127, and the products of a block are summed
// exactly in integers; y[m, n] = sum over blocks of float(dot) * (scale_w * d_x), in float32. Against
// dequantizing into float32 registers (exact with respect to the stored integers) this does 2.1x fewer
// operations per weight; measured on 2 Zen 3 cores, wint4 at 1 row decoded 1.8x as fast (see quant.py).
//
// Contract of quant_matmul_range, for a caller that runs its own `#pragma omp parallel` region (the
// MoE layer, one expert's matrix at a time or several):
//   - the rows are prepared once by prepare_rows() into a QuantRows (buffers of M * Kp int8 and
//     M * Kp / 32 floats the caller owns), before the region (or by one thread, then a barrier);
//   - each thread calls it for its own column range [n0, n1) of y (M rows, y_stride floats apart);
//     ranges must not overlap. share(N, t, threads, kQuantTileRows, ...) splits N as the operator
//     does; any split gives the same bits (each y element is one sum in a fixed order), and so does
//     any M: a row's results do not depend on the rows beside it;
//   - it allocates nothing, takes no lock and starts no threads.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace ernie {

constexpr int kQuantBlock = 32;  // x values per int8 scale; G and the padding are multiples of it
// w rows per tile: with AVX2's 16 registers, 2 w rows x 4 x rows of accumulators; 4 for one or two
// x rows, whose few accumulators would otherwise wait on each other.
constexpr int kQuantTileRows = 2;
constexpr int kQuantWideRows = 4;

struct QuantMatrix {
  const uint8_t* data;     // wint8 bytes are int8
  const uint16_t* scales;  // float16 bits, [N, Kp / group]
  int64_t N, Kp, group;
  int bits;                // 8 or 4
  int64_t row_bytes() const { return bits == 8 ? Kp : Kp / 2; }
};

struct QuantRows {
  int8_t* q;  // [M, Kp]: x rounded to int8, zero-padded
  float* d;   // [M, Kp / 32]: the scale of each block of 32
  int64_t M, Kp;
};

inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}

// out = the rows of x [M, K] rounded to int8 per block of 32: d = max|x| / 127, q = rint(x / d).
inline void prepare_rows(const float* x, int64_t K, QuantRows* out) {
  for (int64_t m = 0; m < out->M; ++m) {
    for (int64_t k0 = 0; k0 < out->Kp; k0 += kQuantBlock) {
      const int64_t count = std::min<int64_t>(kQuantBlock, std::max<int64_t>(0, K - k0));
      const float* v = x + m * K + k0;
      float amax = 0.f;
      for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, inverse = d == 0.f ? 0.f : 1.f / d;
      int8_t* q = out->q + m * out->Kp + k0;
      for (int64_t i = 0; i < kQuantBlock; ++i) q[i] = i < count ? static_cast<int8_t>(__builtin_rintf(v[i] * inverse)) : 0;
      out->d[m * (out->Kp / kQuantBlock) + k0 / kQuantBlock] = d;
    }
  }
}

#if defined(__AVX2__)
// 32 weights of a block as signed bytes, in k order.
template <int BITS>
inline __m256i load_block(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8));
  }
}

// The products of 32 unsigned |w| and signed x bytes summed in eight 32-bit lanes, exactly: with
// AVX-512 VNNI (or AVX-VNNI) one instruction; else pairs into 16 bits (at most 2 * 127 * 127, no
// saturation) and then fours.
inline __m256i dot_bytes(__m256i abs_w, __m256i signed_x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, signed_x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), abs_w, signed_x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1));
#endif
}

inline float sum8(__m256 v) {  // lanes i and i + 4, then i and i + 2, then the two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// XR prepared x rows against WR weight rows from row n: each y element in one 8-lane accumulator,
// block after block (block b adds float(dot lanes) * scale_w * d_x).
template <int BITS, int XR, int WR>
inline void quant_tile(const QuantRows& x, int64_t x0, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride,
                       bool prefetch) {
  __m256 acc[XR * WR];
  for (auto& a : acc) a = _mm256_setzero_ps();
  const int64_t blocks = w.Kp / kQuantBlock, per_group = w.group / kQuantBlock, groups = w.Kp / w.group;
  const int64_t block_bytes = BITS * kQuantBlock / 8, row_bytes = w.row_bytes();
  const uint8_t* data = w.data + n * row_bytes;
  const uint16_t* scales = w.scales + n * groups;
  const int8_t* xq = x.q + x0 * x.Kp;
  const float* xd = x.d + x0 * blocks;
  for (int64_t b = 0, g = 0, in_group = 0; b < blocks; ++b) {
    __m256i wq[WR], aw[WR];
    __m256 sw[WR];
    for (int j = 0; j < WR; ++j) {
      const uint8_t* p = data + j * row_bytes + b * block_bytes;
      if (prefetch && b % (64 / block_bytes) == 0) __builtin_prefetch(p + WR * row_bytes);
      wq[j] = load_block<BITS>(p);
      aw[j] = _mm256_sign_epi8(wq[j], wq[j]);
      sw[j] = _mm256_set1_ps(half_to_float(scales[j * groups + g]));
    }
    for (int i = 0; i < XR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * x.Kp + b * kQuantBlock));
      const __m256 dx = _mm256_set1_ps(xd[i * blocks + b]);
      for (int j = 0; j < WR; ++j) {
        const __m256 dot = _mm256_cvtepi32_ps(dot_bytes(aw[j], _mm256_sign_epi8(xv, wq[j])));
        acc[i * WR + j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sw[j], dx), acc[i * WR + j]);
      }
    }
    if (++in_group == per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) y[i * y_stride + j] = sum8(acc[i * WR + j]);
}
#else
// Without AVX2: one block's integer dot product at a time, the same sums.
template <int BITS, int XR, int WR>
inline void quant_tile(const QuantRows& x, int64_t x0, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride,
                       bool prefetch) {
  const int64_t blocks = w.Kp / kQuantBlock, groups = w.Kp / w.group, row_bytes = w.row_bytes();
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      const uint8_t* row = w.data + (n + j) * row_bytes;
      const int8_t* xq = x.q + (x0 + i) * x.Kp;
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int t = 0; t < kQuantBlock; ++t) {
          const int q = BITS == 8 ? static_cast<int8_t>(row[b * kQuantBlock + t])
                                  : (t < 16 ? row[b * 16 + t] & 15 : row[b * 16 + t - 16] >> 4) - 8;
          dot += q * xq[b * kQuantBlock + t];
        }
        const float s = half_to_float(w.scales[(n + j) * groups + b * kQuantBlock / w.group]);
        acc += static_cast<float>(dot) * (s * x.d[(x0 + i) * blocks + b]);
      }
      y[i * y_stride + j] = acc;
    }
  }
}
#endif

template <int BITS, int WR>
inline void quant_rows(const QuantRows& x, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride, bool prefetch) {
  int64_t m = 0;
  for (; m + 4 <= x.M; m += 4) quant_tile<BITS, 4, WR>(x, m, w, n, y + m * y_stride, y_stride, prefetch);
  switch (x.M - m) {
    case 3: quant_tile<BITS, 3, WR>(x, m, w, n, y + m * y_stride, y_stride, prefetch); break;
    case 2: quant_tile<BITS, 2, WR>(x, m, w, n, y + m * y_stride, y_stride, prefetch); break;
    case 1: quant_tile<BITS, 1, WR>(x, m, w, n, y + m * y_stride, y_stride, prefetch); break;
  }
}

template <int BITS>
inline void quant_columns(const QuantRows& x, const QuantMatrix& w, float* y, int64_t y_stride, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (x.M <= 2)
    for (; n + kQuantWideRows <= n1; n += kQuantWideRows)
      quant_rows<BITS, kQuantWideRows>(x, w, n, y + n, y_stride, n + 2 * kQuantWideRows <= w.N);
  for (; n + kQuantTileRows <= n1; n += kQuantTileRows)
    quant_rows<BITS, kQuantTileRows>(x, w, n, y + n, y_stride, n + 2 * kQuantTileRows <= w.N);
  for (; n < n1; ++n) quant_rows<BITS, 1>(x, w, n, y + n, y_stride, n + 2 <= w.N);
}

// y[m, n] for the M prepared rows and n0 <= n < n1 (rows of y y_stride floats apart).
inline void quant_matmul_range(const QuantRows& x, const QuantMatrix& w, float* y, int64_t y_stride, int64_t n0,
                               int64_t n1) {
  if (w.bits == 8) quant_columns<8>(x, w, y, y_stride, n0, n1);
  else quant_columns<4>(x, w, y, y_stride, n0, n1);
}

}  // namespace ernie
