// Shared by the CPU operators: a float vector as wide as the machine's vector registers, written with GCC
// vector extensions, not intrinsics, so that -march=native lowers it to whatever the machine has: 16
// lanes in one AVX-512 register, else 8 lanes (one AVX2 register, two SSE / NEON ones). A 16-lane
// vector on AVX2 spilled the kernels' register tiles: on a 2-core Zen 3, an 8-row decoding step took
// 2x as long, and one bf16 row 1.4x.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace ernie {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }

// bfloat16 is the top half of a float32: widening is a 16-bit shift, exact. Weights read as bfloat16
// and computed in float32 give the same float32 results as the widened weights, from half the bytes.
typedef uint16_t Bf16 __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(sizeof(uint16_t))));
typedef uint32_t Bits __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t Bits32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
inline Vec load(const uint16_t* p) {
#if defined(__AVX512F__)  // GCC lowers the generic form to two 8-lane widenings and a merge: 2x slower
  return (Vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)  // and to two 4-lane widenings and an insert
  return (Vec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  return (Vec)(__builtin_convertvector(*reinterpret_cast<const Bf16*>(p), Bits) << 16);
#endif
}
inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}
// The value in a register of its own: stops GCC from folding a load into every multiply-add that uses
// it (16 loads for a 4 x 4 tile of 16-lane vectors instead of 8, at half the speed; on AVX2 the 4-row
// batch tile loaded each w vector 4 times).
inline Vec in_register(Vec v) {
#if defined(__x86_64__) && (defined(__AVX512F__) || defined(__AVX__))
  asm("" : "+v"(v));
#endif
  return v;
}
// a * b + c rounded once. Explicit: GCC fuses a written a * b + c only where it sees fit (not after a
// zero-padded tail load, say), and a sum must round the same way over bf16 and float32 weights.
inline Vec madd(Vec a, Vec b, Vec c) {
#if defined(__AVX512F__)
  return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__x86_64__) || defined(__i386__)
  return a * b + c;  // no fused instruction to fuse it into
#else
  Vec r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return r;
#endif
}
// Every lane a. Not Vec{} + a: adding +0 changes -0, so GCC computed that addition for every broadcast
// (4 extra additions per 8 multiply-adds in the batch tile).
inline Vec splat(float a) {
#if defined(__AVX512F__)
  return (Vec)_mm512_set1_ps(a);
#elif defined(__AVX__)
  return (Vec)_mm256_set1_ps(a);
#else
  return a - Vec{};  // x - +0 is x for every x, -0 included: nothing to compute
#endif
}
inline Vec madd(float a, Vec b, Vec c) { return madd(splat(a), b, c); }
inline void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
// The sum of the lanes, adding halves: lanes i and i + 8, then i and i + 4, ... The same order as
// sum_each, so a dot product has the same bits whichever of the two adds it up.
inline float sum(Vec v) {
  float part[kLanes];
  for (int i = 0; i < kLanes; ++i) part[i] = v[i];
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int i = 0; i < half; ++i) part[i] += part[i + half];
  return part[0];
}

// Lane i of the result is sum(v[i]), for kLanes vectors, added in the same order as sum(): each level
// adds the two halves of the lane groups of a pair of vectors, kLanes - 1 vector additions in all
// instead of kLanes x (kLanes - 1) scalar ones. __builtin_shufflevector needs GCC 12 or clang; else lane by lane.
#if defined(__has_builtin)  // nested: an older preprocessor cannot even parse the test
#if __has_builtin(__builtin_shufflevector)
#define ERNIE_HAS_SHUFFLEVECTOR 1
#endif
#endif
inline Vec sum_each(const Vec* v) {
#if defined(ERNIE_HAS_SHUFFLEVECTOR) && !defined(__AVX512F__)
  Vec halves[4], quarters[2];
  for (int p = 0; p < 4; ++p)
    halves[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(v[2 * p], v[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int p = 0; p < 2; ++p)
    quarters[p] = __builtin_shufflevector(halves[2 * p], halves[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(halves[2 * p], halves[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(quarters[0], quarters[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(quarters[0], quarters[1], 1, 3, 5, 7, 9, 11, 13, 15);
#elif defined(ERNIE_HAS_SHUFFLEVECTOR)
  Vec halves[8], quarters[4], eighths[2];
  for (int p = 0; p < 8; ++p)
    halves[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(v[2 * p], v[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int p = 0; p < 4; ++p)
    quarters[p] = __builtin_shufflevector(halves[2 * p], halves[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(halves[2 * p], halves[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int p = 0; p < 2; ++p)
    eighths[p] = __builtin_shufflevector(quarters[2 * p], quarters[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(quarters[2 * p], quarters[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(eighths[0], eighths[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(eighths[0], eighths[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  Vec sums;
  for (int i = 0; i < kLanes; ++i) sums[i] = sum(v[i]);
  return sums;
#endif
}

// e^x in each lane, within 1.1 ulp of the exact value (32 million values tested): 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2,
// e^r by its Taylor-like polynomial (the Cephes expf coefficients), 2^n added to the exponent bits.
// 0 below -87.3 (where e^x leaves the normal floats) and for -inf; inf above 88.7; NaN stays NaN.
inline Vec exp(Vec x) {
  const Vec lo = Vec{} - 87.3f, hi = Vec{} + 88.7f;
  const Vec clamped = x > lo ? (x < hi ? x : hi) : lo;  // NaN becomes lo here: no NaN reaches the int conversion
  const Bits32 whole = __builtin_convertvector(clamped * 1.44269504f + (clamped < 0 ? Vec{} - 0.5f : Vec{} + 0.5f), Bits32);
  const Vec n = __builtin_convertvector(whole, Vec);
  const Vec r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const Vec scaled = (Vec)((Bits)p + ((Bits)whole << 23));  // p * 2^n: n added to the exponent
  return x < lo ? Vec{} : (x > hi ? Vec{} + __builtin_inff() : (x == x ? scaled : x));
}

// The part [begin, end) of n items that thread t of `threads` takes, in multiples of `align`.
inline void share(int64_t n, int t, int threads, int64_t align, int64_t* begin, int64_t* end) {
  int64_t per = ((n + align - 1) / align + threads - 1) / threads * align;
  *begin = std::min(n, t * per);
  *end = std::min(n, *begin + per);
}

}  // namespace ernie
