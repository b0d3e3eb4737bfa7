// Weight-only quantized matmul for CPU decoding: y = x @ W^T for a few float32 rows x and a weight
// matrix W [N, K] held as 8-, 6- or 4-bit integers with one float16 scale per group of G weights along
// K (G a multiple of 32, and 32 for wint6; K padded with zero weights to Kp, a multiple of G). The
// layout (quant.py writes it):
//
//   wint8: data int8 [N, Kp]: a row's 32-weight block is 32 bytes, q in -127..127 (llama.cpp's Q8_0)
//   wint4: data uint8 [N, Kp / 2]: a row's 32-weight block is 16 bytes, byte j holding weight j of
//          the block in its low nibble and weight 16 + j in its high one, each as q + 8 (Q4_0)
//   wint6: data uint8 [N, 3 Kp / 4]: a row's block is 24 bytes, q + 32 in 0..63: bytes 0..15 hold the
//          low 4 bits as wint4 holds its nibbles; bytes 16..23 the top 2 bits (block_weight spells
//          out where), so that the 2-bit pairs of 4 weights sit in the byte at the same place in
//          its 32-byte chunk as the 4 weights' nibbles in theirs. The lm_head of wint4 models (as
//          llama.cpp's Q4_0 keeps Q6_K's 6.56 bits there, this is 6.5).
//   scale: float16 [N, Kp / G];   W[n, k] = q * scale[n, k / G]
//   All interleave the rows in groups of 8 (all but the last N % 8, which follow plainly): group
//   r's block b is 8 blocks' bytes at (r * Kp / 32 + b) * 8 * B (B = 32, 24 or 16 bytes a block), in
//   chunks of 32 bytes: chunk c holds bytes 4c .. 4c + 3 of each of the 8 rows' blocks in turn; the
//   group's scales for group g of K are 8 float16 at (r * Kp / G + g) * 8. One 32-byte load is then
//   4 x values' weights (wint4: and 4 more) for 8 rows, and the kernel gets 8 rows' dot products in
//   the 8 lanes of one register, as llama.cpp's repacked Q4_0x8 does: at 1 row wint4 ran 1.9x, at
//   8 rows 2.6x as fast as one row at a time.
//
// Numerics, as llama.cpp's Q8_0 and Q4_0 dot products: each 32 values of an x row are rounded to
// int8 with a float32 scale of their own, d = max|x| / 127, and the products of a block are summed
// exactly in integers; y[m, n] = sum over blocks of float(dot) * (scale_w * d_x), in float32. The
// alternative, dequantizing into float32 registers (exact with respect to the stored integers), was
// measured first (one row at a time, one Zen 3 core, over the 0.3B model's matrices): the integer
// sums ran wint4 1.7x and wint8 1.1x as fast at 1 row, 1.2x and 1.0x at 8 rows, and then allowed
// the interleaved rows, which made that 1.9x / 2.6x (wint4) and 1.4x / 1.7x (wint8) faster again.
//
// Contract of quant_matmul_range, for a caller that runs its own `#pragma omp parallel` region (the
// MoE layer, one expert's matrix at a time or several):
//   - the rows are prepared once by prepare_rows() into a QuantRows (buffers of M * Kp int8, and
//     M * Kp / 32 floats and int32 the caller owns), before the region (or by one thread, then a barrier);
//   - each thread calls it for its own column range [n0, n1) of y (M rows, y_stride floats apart);
//     ranges must not overlap, and start at a multiple of kQuantRowGroup (the interleaved rows).
//     share(N, t, threads, kQuantRowGroup, ...) splits N as the operator does; any split gives the
//     same bits (each y element is one sum in a fixed order), and so does any M: a row's results do
//     not depend on the rows beside it;
//   - it allocates nothing, takes no lock and starts no threads.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace ernie {

constexpr int kQuantBlock = 32;  // x values per int8 scale; G and the padding are multiples of it
constexpr int kQuantRowGroup = 8;  // rows interleaved
// w rows per tile of the rows after the groups of 8 (and of all rows without AVX2)
constexpr int kQuantTileRows = 2;

struct QuantMatrix {
  const uint8_t* data;     // wint8 bytes are int8
  const uint16_t* scales;  // float16 bits, [N, Kp / group]
  int64_t N, Kp, group;
  int bits;                // 8, 6 or 4
  int64_t row_bytes() const { return Kp / kQuantBlock * block_bytes(); }
  int block_bytes() const { return bits * kQuantBlock / 8; }
  int64_t grouped_rows() const { return N / kQuantRowGroup * kQuantRowGroup; }
  // Where byte 4c of row n's block b is (the next 3 bytes follow it), and the float16 scale of row n
  // for group g of K: the layout above.
  const uint8_t* chunk(int64_t n, int64_t b, int c) const {
    if (n >= grouped_rows()) return data + n * row_bytes() + b * block_bytes() + 4 * c;
    return data + (n / kQuantRowGroup * (Kp / kQuantBlock) + b) * kQuantRowGroup * block_bytes() + 32 * c +
           4 * (n % kQuantRowGroup);
  }
  const uint16_t& scale(int64_t n, int64_t g) const {
    const int64_t groups = Kp / group;
    if (n >= grouped_rows()) return scales[n * groups + g];
    return scales[(n / kQuantRowGroup * groups + g) * kQuantRowGroup + n % kQuantRowGroup];
  }
};

struct QuantRows {
  int8_t* q;       // [M, Kp]: x rounded to int8, zero-padded
  float* d;        // [M, Kp / 32]: the scale of each block of 32
  int32_t* sums8;  // [M, Kp / 32]: 8 x the sum of each block's integers (wint4's offset of 8)
  int64_t M, Kp;
};

// float16 <-> float32 through F16C's instructions where the CPU has them (every AVX2 x86 CPU): GCC has
// _Float16 on x86 only from version 12, and a failed build would take every CPU kernel with it.
// float_to_half rounds to nearest even, as numpy's astype(np.float16) does.
#if defined(__F16C__)
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}
inline uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}
#endif

// Weight t of a block from its bytes in order, as a signed integer.
inline int block_weight(const uint8_t* bytes, int t, int bits) {
  if (bits == 8) return static_cast<int8_t>(bytes[t]);
  const int j = t % 16, nibble = t < 16 ? bytes[j] & 15 : bytes[j] >> 4;
  if (bits == 4) return nibble - 8;
  // The top bits of weights j and 16 + j of nibble chunk c = j / 4 are in byte 16 + 4 (c % 2) + j % 4,
  // at bits 4 (c / 2) and 4 (c / 2) + 2.
  const int c = j / 4, shift = 4 * (c / 2) + (t < 16 ? 0 : 2);
  return (nibble | (bytes[16 + 4 * (c % 2) + j % 4] >> shift & 3) << 4) - 32;
}

// The bytes of a block from its 32 signed integers: block_weight's inverse.
inline void pack_block(const int8_t* q, int bits, uint8_t* bytes) {
  if (bits == 8) {
    std::memcpy(bytes, q, kQuantBlock);
    return;
  }
  const int offset = bits == 4 ? 8 : 32;
  for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>(((q[j] + offset) & 15) | ((q[16 + j] + offset) & 15) << 4);
  if (bits == 4) return;
  std::memset(bytes + 16, 0, 8);
  for (int j = 0; j < 16; ++j) {
    const int c = j / 4, shift = 4 * (c / 2);
    bytes[16 + 4 * (c % 2) + j % 4] |= static_cast<uint8_t>((q[j] + 32) >> 4 << shift | (q[16 + j] + 32) >> 4 << (shift + 2));
  }
}

// The bytes of row n's block b, in order.
inline void block_of(const QuantMatrix& w, int64_t n, int64_t b, uint8_t* out) {
  for (int c = 0; c < w.block_bytes() / 4; ++c) std::memcpy(out + 4 * c, w.chunk(n, b, c), 4);
}

#if defined(__AVX2__)
// A whole block of prepare_rows in vector registers, the same bits: rint and cvtps round to nearest
// even alike. At 8 rows of a 0.3B wint4 step, scalar rounding took 1.3 ms of the ~25 ms, serially.
inline void prepare_block(const float* v, int8_t* q, float* d, int32_t* sums8) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 part[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    part[i] = _mm256_loadu_ps(v + 8 * i);
    amax = _mm256_max_ps(_mm256_andnot_ps(sign, part[i]), amax);  // a NaN gives amax, as std::max does
  }
  __m128 top = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  top = _mm_max_ps(top, _mm_movehl_ps(top, top));
  const float largest = _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
  *d = largest / 127.f;
  const __m256 inverse = _mm256_set1_ps(*d == 0.f ? 0.f : 1.f / *d);
  __m256i whole[4];
  for (int i = 0; i < 4; ++i) whole[i] = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));
  // packs interleave 128-bit lanes: the permute puts the 32 bytes back in order
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(whole[0], whole[1]), _mm256_packs_epi32(whole[2], whole[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  __m256i total = _mm256_add_epi32(_mm256_add_epi32(whole[0], whole[1]), _mm256_add_epi32(whole[2], whole[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  *sums8 = 8 * _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
#endif

// out = the rows of x [M, K] rounded to int8 per block of 32: d = max|x| / 127, q = rint(x / d).
inline void prepare_rows(const float* x, int64_t K, QuantRows* out) {
  for (int64_t m = 0; m < out->M; ++m) {
    for (int64_t k0 = 0; k0 < out->Kp; k0 += kQuantBlock) {
      const int64_t count = std::min<int64_t>(kQuantBlock, std::max<int64_t>(0, K - k0));
      const float* v = x + m * K + k0;
      const int64_t at = m * (out->Kp / kQuantBlock) + k0 / kQuantBlock;
#if defined(__AVX2__)
      if (count == kQuantBlock) {
        prepare_block(v, out->q + m * out->Kp + k0, out->d + at, out->sums8 + at);
        continue;
      }
#endif
      float amax = 0.f;
      for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, inverse = d == 0.f ? 0.f : 1.f / d;
      int8_t* q = out->q + m * out->Kp + k0;
      int32_t sum = 0;
      for (int64_t i = 0; i < kQuantBlock; ++i) {
        q[i] = i < count ? static_cast<int8_t>(__builtin_rintf(v[i] * inverse)) : 0;
        sum += q[i];
      }
      out->d[m * (out->Kp / kQuantBlock) + k0 / kQuantBlock] = d;
      out->sums8[m * (out->Kp / kQuantBlock) + k0 / kQuantBlock] = 8 * sum;
    }
  }
}

#if defined(__AVX2__)
// 32 weights of a block as signed bytes, in k order.
template <int BITS>
inline __m256i load_block(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 6) {  // only the last N % 8 rows: no need for speed
    int8_t q[kQuantBlock];
    for (int t = 0; t < kQuantBlock; ++t) q[t] = static_cast<int8_t>(block_weight(p, t, 6));
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8));
  }
}

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// sums + the products of 32 unsigned w and signed x bytes, in eight 32-bit lanes, exactly: with
// AVX-512 VNNI (or AVX-VNNI) one instruction; else pairs into 16 bits (at most 2 * 127 * 127, no
// saturation) and then fours.
inline __m256i dot_accumulate(__m256i sums, __m256i unsigned_w, __m256i signed_x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(sums, unsigned_w, signed_x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(sums, unsigned_w, signed_x);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_w, signed_x), _mm256_set1_epi16(1)));
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
        const __m256 dot = _mm256_cvtepi32_ps(dot_accumulate(_mm256_setzero_si256(), aw[j], _mm256_sign_epi8(xv, wq[j])));
        acc[i * WR + j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sw[j], dx), acc[i * WR + j]);
      }
    }
    if (++in_group == per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) y[i * y_stride + j] = sum8(acc[i * WR + j]);
}

// XR prepared x rows against the 8 interleaved rows from row n (a multiple of 8): lane l of acc[i] is
// y[i, n + l]. Per block, the 4 bytes of x that meet a 32-byte chunk (wint4 / wint6: its low nibbles,
// and the 4 that meet its high ones) are broadcast to every lane. The unsigned q + 8 (q + 32) times x
// sum exactly: wint4's in 16 bits (at most 16 x 15 x 127 < 2^15), wint6's in 16 bits a chunk at a
// time (4 x 63 x 127 < 2^15) and then in 32, with VNNI in 32; then the offset comes off:
// sum q x = sum (q + 8) x - 8 sum x.
template <int BITS, int XR>
inline void quant_group_tile(const QuantRows& x, int64_t x0, const QuantMatrix& w, int64_t n, float* y,
                             int64_t y_stride) {
  __m256 acc[XR];
  for (auto& a : acc) a = _mm256_setzero_ps();
  const int64_t blocks = w.Kp / kQuantBlock, per_group = w.group / kQuantBlock;
  const uint8_t* data = w.chunk(n, 0, 0);
  const uint16_t* scales = w.scales + n * (w.Kp / w.group);
  const int8_t* xq = x.q + x0 * x.Kp;
  const float* xd = x.d + x0 * blocks;
  const int32_t* xs = x.sums8 + x0 * blocks;
  const __m256i nibble = _mm256_set1_epi8(15), top_bits = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  constexpr int kBytes = BITS * kQuantBlock / 8 * kQuantRowGroup;  // a block of the 8 rows
  // sums += the products of 32 unsigned w and signed x bytes, in 32-bit lanes (with VNNI) or 16-bit ones.
  auto add_products = [](__m256i sums, __m256i unsigned_w, __m256i signed_x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(sums, unsigned_w, signed_x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(sums, unsigned_w, signed_x);
#else
    return _mm256_add_epi16(sums, _mm256_maddubs_epi16(unsigned_w, signed_x));
#endif
  };
  auto x4_of = [&](int i, int64_t b, int at) {  // x bytes at..at + 3 of block b, in every lane
    int32_t v;
    std::memcpy(&v, xq + i * x.Kp + b * kQuantBlock + at, 4);
    return _mm256_set1_epi32(v);
  };
  for (int64_t b = 0, g = 0, in_group = 0; b < blocks; ++b) {
    const uint8_t* p = data + b * kBytes;
    for (int line = 0; line < kBytes; line += 64) __builtin_prefetch(p + 8 * kBytes + line);
    __m256i sums[XR];
    for (auto& s : sums) s = _mm256_setzero_si256();
    if constexpr (BITS == 8) {  // |w| times x with w's sign, as in quant_tile: 32-bit sums
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
        const __m256i magnitude = _mm256_sign_epi8(v, v);
        for (int i = 0; i < XR; ++i) sums[i] = dot_accumulate(sums[i], magnitude, _mm256_sign_epi8(x4_of(i, b, 4 * c), v));
      }
    } else for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
      __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      if constexpr (BITS == 6) {  // the top bits of chunk c sit at bits 4 (c / 2) and 4 (c / 2) + 2
        const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * (c % 2)));
        low = _mm256_or_si256(low, _mm256_and_si256(c < 2 ? _mm256_slli_epi16(top, 4) : top, top_bits));
        high = _mm256_or_si256(high, _mm256_and_si256(c < 2 ? _mm256_slli_epi16(top, 2) : _mm256_srli_epi16(top, 2),
                                                      top_bits));
      }
      for (int i = 0; i < XR; ++i) {
        if (BITS == 6 && !kVnni) {
          const __m256i pair = add_products(add_products(_mm256_setzero_si256(), low, x4_of(i, b, 4 * c)), high,
                                            x4_of(i, b, 16 + 4 * c));
          sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(pair, ones));
        } else {
          sums[i] = add_products(add_products(sums[i], low, x4_of(i, b, 4 * c)), high, x4_of(i, b, 16 + 4 * c));
        }
      }
    }
    const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * kQuantRowGroup)));
    for (int i = 0; i < XR; ++i) {
      __m256i dot = sums[i];
      if constexpr (BITS == 4) {
        if (!kVnni) dot = _mm256_madd_epi16(dot, ones);
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(xs[i * blocks + b]));
      } else if constexpr (BITS == 6) {
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(4 * xs[i * blocks + b]));
      }
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, _mm256_set1_ps(xd[i * blocks + b])), acc[i]);
    }
    if (++in_group == per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < XR; ++i) _mm256_storeu_ps(y + i * y_stride, acc[i]);
}

template <int BITS>
inline void quant_group_rows(const QuantRows& x, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride) {
  int64_t m = 0;
  for (; m + 4 <= x.M; m += 4) quant_group_tile<BITS, 4>(x, m, w, n, y + m * y_stride, y_stride);
  switch (x.M - m) {
    case 3: quant_group_tile<BITS, 3>(x, m, w, n, y + m * y_stride, y_stride); break;
    case 2: quant_group_tile<BITS, 2>(x, m, w, n, y + m * y_stride, y_stride); break;
    case 1: quant_group_tile<BITS, 1>(x, m, w, n, y + m * y_stride, y_stride); break;
  }
}
#else
// Without AVX2: one block's integer dot product at a time, the same sums.
template <int BITS, int XR, int WR>
inline void quant_tile(const QuantRows& x, int64_t x0, const QuantMatrix& w, int64_t n, float* y, int64_t y_stride,
                       bool prefetch) {
  const int64_t blocks = w.Kp / kQuantBlock;
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      const int8_t* xq = x.q + (x0 + i) * x.Kp;
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t bytes[kQuantBlock];
        block_of(w, n + j, b, bytes);
        int32_t dot = 0;
        for (int t = 0; t < kQuantBlock; ++t) {
          dot += block_weight(bytes, t, BITS) * xq[b * kQuantBlock + t];
        }
        const float s = half_to_float(w.scale(n + j, b * kQuantBlock / w.group));
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
#if defined(__AVX2__)
  for (; n + kQuantRowGroup <= std::min(n1, w.grouped_rows()); n += kQuantRowGroup)
    quant_group_rows<BITS>(x, w, n, y + n, y_stride);
#endif
  for (; n + kQuantTileRows <= n1; n += kQuantTileRows)
    quant_rows<BITS, kQuantTileRows>(x, w, n, y + n, y_stride, n + 2 * kQuantTileRows <= w.N);
  for (; n < n1; ++n) quant_rows<BITS, 1>(x, w, n, y + n, y_stride, n + 2 <= w.N);
}

// y[m, n] for the M prepared rows and n0 <= n < n1 (rows of y y_stride floats apart).
inline void quant_matmul_range(const QuantRows& x, const QuantMatrix& w, float* y, int64_t y_stride, int64_t n0,
                               int64_t n1) {
  if (w.bits == 8) quant_columns<8>(x, w, y, y_stride, n0, n1);
  else if (w.bits == 6) quant_columns<6>(x, w, y, y_stride, n0, n1);
  else quant_columns<4>(x, w, y, y_stride, n0, n1);
}

}  // namespace ernie
