// Shared by the CPU operators: a float vector of 16 lanes written with GCC vector extensions, not
// intrinsics, so that -march=native lowers it to whatever the machine has: one AVX-512 register (the
// case measured), or two AVX2 / four NEON registers, where the widest tiles spill (not measured).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ernie {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }

// bfloat16 is the top half of a float32: widening is a 16-bit shift, exact. Weights read as bfloat16
// and computed in float32 give the same float32 results as the widened weights, from half the bytes.
typedef uint16_t Bf16 __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(sizeof(uint16_t))));
typedef uint32_t Bits __attribute__((vector_size(kLanes * sizeof(uint32_t))));
inline Vec load(const uint16_t* p) {
#if defined(__AVX512F__)  // GCC lowers the generic form to two 8-lane widenings and a merge: 2x slower
  return (Vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
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
// it (16 loads for a 4 x 4 tile instead of 8, at half the speed).
inline Vec in_register(Vec v) {
#if defined(__x86_64__) && defined(__AVX512F__)  // one register only with AVX-512 (else: no such constraint)
  asm("" : "+v"(v));
#endif
  return v;
}
inline void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
// The sum of the lanes, adding halves: lanes i and i + 8, then i and i + 4, ... The same order as
// sum_each in cpu_matmul.cc, so a dot product has the same bits whichever of the two adds it up.
inline float sum(Vec v) {
  float part[kLanes];
  for (int i = 0; i < kLanes; ++i) part[i] = v[i];
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int i = 0; i < half; ++i) part[i] += part[i + half];
  return part[0];
}

// The part [begin, end) of n items that thread t of `threads` takes, in multiples of `align`.
inline void share(int64_t n, int t, int threads, int64_t align, int64_t* begin, int64_t* end) {
  int64_t per = ((n + align - 1) / align + threads - 1) / threads * align;
  *begin = std::min(n, t * per);
  *end = std::min(n, *begin + per);
}

}  // namespace ernie
