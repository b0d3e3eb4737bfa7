// Dot products of rows, in register tiles: shared by the decoding matmul (x @ w^T) and the attention
// scores (q @ k^T over the cached keys).
#pragma once

#include <cstring>

#include "vec.h"

namespace ernie {

// w rows per tile: 4 with AVX-512; with AVX2's 16 registers 3 (12 accumulators for 4 x rows beside
// 3 w vectors and an x vector: 1.25x as fast as 2 x 4 in cache, the lm_head at 8 rows 1.2x).
constexpr int kTileRows = kLanes == 16 ? 4 : 3;

template <typename W>
inline Vec load_partial(const W* p, int64_t count) {  // the tail vector of a row, zero-padded
  W v[kLanes] = {};
  std::memcpy(v, p, count * sizeof(W));
  return load(v);
}

// A tile of y = x @ w^T: `XR` rows of x against `WR` rows of w, as XR * WR dot products over K,
// each accumulated in one vector register. While it runs, the next WR rows of w are prefetched when
// there are any (`prefetch`): the tile's few short row streams leave the hardware prefetcher behind
// (lm_head at 8 rows: 1.5x faster).
template <int XR, int WR, typename W>
inline void dot_tile(const float* x, const W* w, float* y, int64_t K, int64_t N, bool prefetch) {
  Vec acc[XR * WR] = {};
  const int64_t k_vec = K / kLanes * kLanes;
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    Vec wv[WR];
    for (int j = 0; j < WR; ++j) {
      if (prefetch) __builtin_prefetch(w + (WR + j) * K + k);
      wv[j] = in_register(load(w + j * K + k));
    }
    for (int i = 0; i < XR; ++i) {
      const Vec xv = in_register(load(x + i * K + k));
      for (int j = 0; j < WR; ++j) acc[i * WR + j] = madd(xv, wv[j], acc[i * WR + j]);
    }
  }
  if (k_vec < K) {  // the tail, zero-padded to a vector
    Vec wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = load_partial(w + j * K + k_vec, K - k_vec);
    for (int i = 0; i < XR; ++i) {
      const Vec xv = load_partial(x + i * K + k_vec, K - k_vec);
      for (int j = 0; j < WR; ++j) acc[i * WR + j] = madd(xv, wv[j], acc[i * WR + j]);
    }
  }
  if constexpr (XR * WR == kLanes) {
    const Vec sums = sum_each(acc);
    for (int i = 0; i < XR; ++i)
      for (int j = 0; j < WR; ++j) y[i * N + j] = sums[i * WR + j];
  } else {
    for (int i = 0; i < XR; ++i)
      for (int j = 0; j < WR; ++j) y[i * N + j] = sum(acc[i * WR + j]);
  }
}

// The x rows of one tile of w rows, 4 at a time, the tile staying in L1.
template <int WR, typename W>
inline void dot_rows(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, bool prefetch) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_tile<4, WR>(x + m * K, w, y + m * N, K, N, prefetch);
  switch (M - m) {
    case 3: dot_tile<3, WR>(x + m * K, w, y + m * N, K, N, prefetch); break;
    case 2: dot_tile<2, WR>(x + m * K, w, y + m * N, K, N, prefetch); break;
    case 1: dot_tile<1, WR>(x + m * K, w, y + m * N, K, N, prefetch); break;
  }
}

}  // namespace ernie
