// Weight-only quantized matmul for CPU decoding: y = x @ W^T for a few float32 rows x and a weight
// matrix W [N, K] held as 8-bit or 4-bit integers with one float16 scale per group of G weights along
// K (G a multiple of 32; K padded with zero weights to Kp, a multiple of G). The layout (quant.py
// writes it):
//
//   wint8: data int8 [N, Kp], W[n, k] = data[n, k] * scale[n, k / G]                  (-127..127)
//   wint4: data uint8 [N, Kp / 2]; in each 16-weight chunk c of a row, byte c * 8 + j holds weight
//          16c + j in its low nibble and weight 16c + 8 + j in its high one, stored as q + 8 (0..15):
//          W[n, k] = (nibble - 8) * scale[n, k / G]
//   scale: float16 [N, Kp / G]
//
// The weights are dequantized into float32 registers as they stream, (q - 8) * s rounded once, the
// float32 value dequantize() gives, and multiplied with the float32 rows: no rounding of the
// activations, so the result is float32 arithmetic on the dequantized weights (on AVX2, bit for bit
// what the float32 kernel of dot.h gives for them). Each weight byte is read once for all the rows.
//
// Contract of quant_matmul_range, for a caller that runs its own `#pragma omp parallel` region (the
// MoE layer: one expert's matrix at a time, or several):
//   - x is prepared by prepare_rows() into a buffer of M * Kp floats, once per x, before the region
//     (or by one thread with a barrier after it): the rows zero-padded to Kp, and on AVX-512 the
//     wint4 rows permuted within each 32 values to match the 16-lane nibble order;
//   - each thread calls it for its own column range [n0, n1) of y (rows M, row stride y_stride); the
//     ranges must not overlap; share(N, t, threads, kQuantTileRows, ...) splits N the way the operator
//     does. Any split gives the same bits: every y element is one dot product in a fixed order;
//   - it allocates nothing, takes no lock and starts no threads.

#pragma once

#include <cstdint>
#include <cstring>

#include "dot.h"
#include "vec.h"

namespace ernie {

constexpr int kQuantBlock = 32;  // G and the x padding are multiples of this
// w rows per tile: 3 x 4 accumulators on AVX2 left too few of its 16 registers for the dequantizing
// (measured: 2 x 4 ran the 8-row step 1.3x as fast); AVX-512 has 32.
constexpr int kQuantTileRows = kLanes == 16 ? 4 : 2;
#ifndef ERNIE_QUANT_WIDE
#define ERNIE_QUANT_WIDE 4
#endif
constexpr int kQuantWideRows = ERNIE_QUANT_WIDE;

struct QuantMatrix {
  const uint8_t* data;     // wint8 bytes are int8
  const uint16_t* scales;  // float16 bits, [N, Kp / group]
  int64_t N, Kp, group;
  int bits;                // 8 or 4
  int64_t row_bytes() const { return bits == 8 ? Kp : Kp / 2; }
};

inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}

// kLanes weights from kLanes bytes as 32-bit lanes: int8 sign-extended, uint8 zero-extended.
inline Bits32 load_int8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (Bits32)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (Bits32)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  int8_t v[kLanes];
  std::memcpy(v, p, kLanes);
  Bits32 r;
  for (int i = 0; i < kLanes; ++i) r[i] = v[i];
  return r;
#endif
}
inline Bits32 load_uint8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (Bits32)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (Bits32)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  Bits32 r;
  for (int i = 0; i < kLanes; ++i) r[i] = p[i];
  return r;
#endif
}
inline Vec to_vec(Bits32 v) { return __builtin_convertvector(v, Vec); }

// Where x value k of a 32-block goes in the prepared row: on AVX-512 a 16-byte load holds two 16-weight
// chunks, so its low nibbles are weights 0-7 and 16-23 of the block and its high ones 8-15 and 24-31.
inline int64_t prepared_index(int64_t k, int bits) {
  if (kLanes != 16 || bits != 4) return k;
  const int64_t in_block = k % kQuantBlock, chunk = in_block / 16, j = in_block % 16;
  return k - in_block + (j < 8 ? chunk * 8 + j : 16 + chunk * 8 + j - 8);
}

// out [M, Kp] = the rows of x [M, K], zero-padded and in the order quant_matmul_range reads them.
inline void prepare_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int bits, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = out + m * Kp;
    std::memset(row, 0, Kp * sizeof(float));
    for (int64_t k = 0; k < K; ++k) row[prepared_index(k, bits)] = x[m * K + k];
  }
}

// XR prepared x rows against WR weight rows starting at row n: XR * WR dot products, each in one
// vector register, in k order (a lane adds k, k + kLanes, ...: the float32 kernel's order).
template <int BITS, int XR, int WR>
inline void quant_tile(const float* x, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride, bool prefetch) {
  Vec acc[XR * WR] = {};
  const int64_t Kp = w.Kp, groups = Kp / w.group, blocks_per_group = w.group / kQuantBlock, row_bytes = w.row_bytes();
  const uint8_t* data = w.data + n * row_bytes;
  const uint16_t* scales = w.scales + n * groups;
  // One flat loop over 32-weight blocks (a loop per group spilled the accumulators at each group's end:
  // the 8-row step 2.5x as slow), each block as dot.h's tiles: the w vectors in registers, then each x
  // row loaded once for all of them.
  for (int64_t b = 0, g = 0, k = 0; k < Kp; k += kQuantBlock) {
    Vec scale[WR], offset[WR];
    for (int j = 0; j < WR; ++j) {
      const float s = half_to_float(scales[j * groups + g]);
      scale[j] = splat(s);
      offset[j] = splat(-8.f * s);  // (q - 8) * s = q * s - 8s, rounded once
    }
    if (++b == blocks_per_group) b = 0, ++g;
    if constexpr (BITS == 8) {
#pragma GCC unroll 4
      for (int c = 0; c < kQuantBlock; c += kLanes) {
        Vec wv[WR];
        for (int j = 0; j < WR; ++j) {
          const uint8_t* p = data + j * row_bytes + k + c;
          if (prefetch && c == 0 && k % 64 == 0) __builtin_prefetch(p + WR * row_bytes);
          wv[j] = in_register(to_vec(load_int8(p)) * scale[j]);
        }
        for (int i = 0; i < XR; ++i) {
          const Vec xv = in_register(load(x + i * Kp + k + c));
          for (int j = 0; j < WR; ++j) acc[i * WR + j] = madd(xv, wv[j], acc[i * WR + j]);
        }
      }
    } else {
#pragma GCC unroll 2
      for (int c = 0; c < kQuantBlock; c += 2 * kLanes) {
        Bits32 bytes[WR];
        Vec wv[WR];
        for (int j = 0; j < WR; ++j) {
          const uint8_t* p = data + j * row_bytes + (k + c) / 2;
          if (prefetch && c == 0 && k % 128 == 0) __builtin_prefetch(p + WR * row_bytes);
          bytes[j] = load_uint8(p);
          wv[j] = in_register(madd(to_vec(bytes[j] & 15), scale[j], offset[j]));
        }
        for (int i = 0; i < XR; ++i) {
          const Vec xv = in_register(load(x + i * Kp + k + c));
          for (int j = 0; j < WR; ++j) acc[i * WR + j] = madd(xv, wv[j], acc[i * WR + j]);
        }
        for (int j = 0; j < WR; ++j) wv[j] = in_register(madd(to_vec(bytes[j] >> 4), scale[j], offset[j]));
        for (int i = 0; i < XR; ++i) {
          const Vec xv = in_register(load(x + i * Kp + k + c + kLanes));
          for (int j = 0; j < WR; ++j) acc[i * WR + j] = madd(xv, wv[j], acc[i * WR + j]);
        }
      }
    }
  }
  store_sums<XR, WR>(acc, y, y_stride);
}

template <int BITS, int WR>
inline void quant_rows(const float* x, const QuantMatrix& w, int64_t n, float* y, int64_t M, int64_t y_stride,
                       bool prefetch) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) quant_tile<BITS, 4, WR>(x + m * w.Kp, w, n, y + m * y_stride, y_stride, prefetch);
  switch (M - m) {
    case 3: quant_tile<BITS, 3, WR>(x + m * w.Kp, w, n, y + m * y_stride, y_stride, prefetch); break;
    case 2: quant_tile<BITS, 2, WR>(x + m * w.Kp, w, n, y + m * y_stride, y_stride, prefetch); break;
    case 1: quant_tile<BITS, 1, WR>(x + m * w.Kp, w, n, y + m * y_stride, y_stride, prefetch); break;
  }
}

template <int BITS>
inline void quant_columns(const float* x, int64_t M, const QuantMatrix& w, float* y, int64_t y_stride, int64_t n0,
                          int64_t n1) {
  int64_t n = n0;
  if (M <= 2)  // few accumulators would wait on each other's multiply-adds: more w rows at once
    for (; n + kQuantWideRows <= n1; n += kQuantWideRows)
      quant_rows<BITS, kQuantWideRows>(x, w, n, y + n, M, y_stride, n + 2 * kQuantWideRows <= w.N);
  for (; n + kQuantTileRows <= n1; n += kQuantTileRows)
    quant_rows<BITS, kQuantTileRows>(x, w, n, y + n, M, y_stride, n + 2 * kQuantTileRows <= w.N);
  for (; n < n1; ++n) quant_rows<BITS, 1>(x, w, n, y + n, M, y_stride, n + 2 <= w.N);
}

// y[m, n] for m < M and n0 <= n < n1 (y_stride floats a row), from rows prepared by prepare_rows.
inline void quant_matmul_range(const float* x, int64_t M, const QuantMatrix& w, float* y, int64_t y_stride,
                               int64_t n0, int64_t n1) {
  if (w.bits == 8) quant_columns<8>(x, M, w, y, y_stride, n0, n1);
  else quant_columns<4>(x, M, w, y, y_stride, n0, n1);
}

}  // namespace ernie
