// A Paddle custom operator for the float32 matmuls of CPU decoding: a few rows (1 to 32) times a
// weight matrix that does not fit in cache. Such a product is bound by reading the weights once, so
// the kernel streams every weight byte exactly once, across all threads, while the rows stay in
// cache. Paddle's MKL reaches about 60% of the machine's read bandwidth on one row (on one core) and
// ~40 GFLOP/s on 8 rows; this reaches about 90% and ~60 GFLOP/s on the same 2 cores.
//
//   ernie_cpu_matmul(x [..., K], w [K, N], transpose_w=false) = x @ w        (the -Paddle layout)
//   ernie_cpu_matmul(x [..., K], w [N, K], transpose_w=true)  = x @ w^T      (the tied lm_head)
//
// Written with GCC vector extensions, not intrinsics: -march=native lowers them to AVX-512, AVX2 or
// NEON, whatever the machine has.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

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

// y[M, N] = x[M, K] @ w[K, N]. Each thread owns a range of w's rows, one contiguous block of memory
// that it streams eight rows at a time, adding x[m, k] * w[k, :] into a partial y that stays in
// L1/L2; the partial sums of the threads are added at the end.
constexpr int kRowsPerStep = 16;

// y[0:XR, n:n+16] += x[0:XR, k:k+rows] @ (the w vectors of rows k..k+rows). The XR accumulators are
// independent, so XR FMAs are in flight at once rather than one chain waiting on each result.
template <int XR>
inline void add_block(const float* x, const Vec* wv, int rows, float* y, int64_t K, int64_t N) {
  Vec acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = load(y + i * N);
  for (int j = 0; j < rows; ++j)
    for (int i = 0; i < XR; ++i) acc[i] += x[i * K + j] * wv[j];
  for (int i = 0; i < XR; ++i) store(y + i * N, acc[i]);
}

void add_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  std::memset(y, 0, M * N * sizeof(float));
  const int64_t n_vec = N / kLanes * kLanes;
  for (int64_t k = k0; k < k1; k += kRowsPerStep) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerStep, k1 - k));
    const float* wk = w + k * N;
    for (int64_t n = 0; n < n_vec; n += kLanes) {
      Vec wv[kRowsPerStep];
      for (int j = 0; j < rows; ++j) wv[j] = load(wk + j * N + n);
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) add_block<8>(x + m * K + k, wv, rows, y + m * N + n, K, N);
      switch (M - m) {
        case 7: add_block<7>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 6: add_block<6>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 5: add_block<5>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 4: add_block<4>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 3: add_block<3>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 2: add_block<2>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
        case 1: add_block<1>(x + m * K + k, wv, rows, y + m * N + n, K, N); break;
      }
    }
    for (int64_t n = n_vec; n < N; ++n)
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < rows; ++j) y[m * N + n] += x[m * K + k + j] * wk[j * N + n];
  }
}

void matmul_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, K / kRowsPerStep)));
  std::vector<float> partials((threads - 1) * M * N);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    int64_t k0, k1;
    share(K, t, used, kRowsPerStep, &k0, &k1);
    add_rows(x, w, t == 0 ? y : partials.data() + (t - 1) * M * N, M, K, N, k0, k1);
#pragma omp barrier
    int64_t i0, i1;
    share(M * N, t, used, kLanes, &i0, &i1);
    for (int p = 1; p < used; ++p) {
      const float* part = partials.data() + (p - 1) * M * N;
      for (int64_t i = i0; i < i1; ++i) y[i] += part[i];
    }
  }
}

// A tile of y = x @ w^T: `XR` rows of x against `WR` rows of w, as XR * WR dot products over K,
// each accumulated in one vector register.
template <int XR, int WR>
inline void dot_tile(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  Vec acc[XR][WR] = {};
  const int64_t k_vec = K / kLanes * kLanes;
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    Vec wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = load(w + j * K + k);
    for (int i = 0; i < XR; ++i) {
      const Vec xv = load(x + i * K + k);
      for (int j = 0; j < WR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) {
      float s = sum(acc[i][j]);
      for (int64_t k = k_vec; k < K; ++k) s += x[i * K + k] * w[j * K + k];
      y[i * N + j] = s;
    }
}

// The x rows of one tile of w rows, four at a time (16 accumulators), the tile staying in L1.
template <int WR>
inline void dot_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_tile<4, WR>(x + m * K, w, y + m * N, K, N);
  switch (M - m) {
    case 3: dot_tile<3, WR>(x + m * K, w, y + m * N, K, N); break;
    case 2: dot_tile<2, WR>(x + m * K, w, y + m * N, K, N); break;
    case 1: dot_tile<1, WR>(x + m * K, w, y + m * N, K, N); break;
  }
}

// y[M, N] = x[M, K] @ w[N, K]^T. Each thread owns a range of w's rows: every row is one contiguous
// stream, read once. One x row takes tiles of eight w rows (more streams in flight); several take
// tiles of four.
void matmul_rows_transposed(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                            int threads) {
  const int tile = M == 1 ? 8 : 4;
#pragma omp parallel num_threads(threads)
  {
    int64_t n0, n1;
    share(N, omp_get_thread_num(), omp_get_num_threads(), tile, &n0, &n1);
    int64_t n = n0;
    for (; n + tile <= n1; n += tile) {
      if (tile == 8) dot_rows<8>(x, w + n * K, y + n, M, K, N);
      else dot_rows<4>(x, w + n * K, y + n, M, K, N);
    }
    for (; n < n1; ++n) dot_rows<1>(x, w + n * K, y + n, M, K, N);
  }
}

std::vector<paddle::Tensor> CpuMatmul(const paddle::Tensor& x_in, const paddle::Tensor& w_in, bool transpose_w,
                                      int threads) {
  PD_CHECK(x_in.is_cpu() && w_in.is_cpu(), "ernie_cpu_matmul: tensors must be on the CPU");
  PD_CHECK(x_in.dtype() == paddle::DataType::FLOAT32 && w_in.dtype() == paddle::DataType::FLOAT32,
           "ernie_cpu_matmul: float32 only");
  PD_CHECK(w_in.shape().size() == 2, "ernie_cpu_matmul: w must be 2-D");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  const std::vector<int64_t> xs = x.shape();
  const int64_t K = xs.back();
  const int64_t N = transpose_w ? w.shape()[0] : w.shape()[1];
  PD_CHECK((transpose_w ? w.shape()[1] : w.shape()[0]) == K, "ernie_cpu_matmul: inner sizes differ");
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  std::vector<int64_t> ys(xs);
  ys.back() = N;
  paddle::Tensor y = paddle::empty(ys, paddle::DataType::FLOAT32, x.place());
  threads = std::max(1, threads);
  if (transpose_w) matmul_rows_transposed(x.data<float>(), w.data<float>(), y.data<float>(), M, K, N, threads);
  else matmul_rows(x.data<float>(), w.data<float>(), y.data<float>(), M, K, N, threads);
  return {y};
}

std::vector<std::vector<int64_t>> CpuMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                 bool transpose_w, int threads) {
  std::vector<int64_t> y(x);
  y.back() = transpose_w ? w[0] : w[1];
  return {y};
}

std::vector<paddle::DataType> CpuMatmulDtype(const paddle::DataType& x, const paddle::DataType& w) { return {x}; }

}  // namespace

PD_BUILD_OP(ernie_cpu_matmul)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"transpose_w: bool", "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuMatmul))
    .SetInferShapeFn(PD_INFER_SHAPE(CpuMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CpuMatmulDtype));
