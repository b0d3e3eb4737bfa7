// Shared by the CPU operators: a float vector of 16 lanes written with GCC vector extensions, not
// intrinsics, so that -march=native lowers it to whatever the machine has: one AVX-512 register (the
// case measured), or two AVX2 / four NEON registers, where the widest tiles spill (not measured).
#pragma once

#include <algorithm>
#include <cstdint>

namespace ernie {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
inline float sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The part [begin, end) of n items that thread t of `threads` takes, in multiples of `align`.
inline void share(int64_t n, int t, int threads, int64_t align, int64_t* begin, int64_t* end) {
  int64_t per = ((n + align - 1) / align + threads - 1) / threads * align;
  *begin = std::min(n, t * per);
  *end = std::min(n, *begin + per);
}

}  // namespace ernie
