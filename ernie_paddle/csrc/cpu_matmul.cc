// A Paddle custom operator for the float32 matmuls of CPU decoding: a few rows (1 to 32) times a
// weight matrix that does not fit in cache. Such a product is bound by reading the weights once, so
// the kernel streams every weight byte exactly once, across all threads, while the rows stay in
// cache. Paddle's MKL runs a one-row product on one core, and reaches ~40 GFLOP/s on 8 rows where
// this reaches ~80 (2-core EPYC).
//
//   ernie_cpu_matmul(x [..., K], w [K, N], transpose_w=false) = x @ w        (the -Paddle layout)
//   ernie_cpu_matmul(x [..., K], w [N, K], transpose_w=true)  = x @ w^T      (the tied lm_head)

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "paddle/extension.h"
#include "vec.h"

namespace {

using namespace ernie;

// y[M, N] = x[M, K] @ w[K, N]. Each thread owns a range of w's rows, one contiguous block of memory
// that it streams kStep rows at a time, adding x[m, k] * w[k, :] into its own partial y; the
// partial sums of the threads are added at the end. The partial y is laid out in blocks of (up to)
// 8 rows x 16 columns, and each step's x values are transposed into a small table, so the inner loop
// addresses both at constant offsets from one pointer and keeps the w vectors in registers.
constexpr int kStep = 8;  // rows of w per step; 8 beat 2, 4 and 16 in decoding on a 2-core EPYC
constexpr int kBlock = 8;  // rows of x per block (8 independent accumulator chains)
constexpr int kBlockFloats = kBlock * kLanes;

inline Vec load_partial(const float* p, int64_t count) {  // the tail vector of a row, zero-padded
  Vec v = {};
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}

// acc[0:XR] += xt[j][0:XR] * wv[j] over the kStep rows j of one step.
template <int XR>
inline void add_block(const float* xt, const Vec* wv, float* acc_block) {
  Vec acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = load(acc_block + i * kLanes);
  for (int j = 0; j < kStep; ++j)
    for (int i = 0; i < XR; ++i) acc[i] += xt[j * kBlock + i] * wv[j];
  for (int i = 0; i < XR; ++i) store(acc_block + i * kLanes, acc[i]);
}

template <int... XR>
inline void add_block_of(int rows, const float* xt, const Vec* wv, float* acc_block,
                         std::integer_sequence<int, XR...>) {
  ((rows == XR + 1 ? add_block<XR + 1>(xt, wv, acc_block) : void()), ...);
}

// Where row m, columns 16v..16v+15 of a partial y start: blocks of 8 rows (the last one shorter), each
// [vectors][rows in the block][kLanes].
inline int64_t acc_offset(int64_t m, int64_t v, int64_t M, int64_t vectors) {
  const int64_t b = m / kBlock, rows = std::min<int64_t>(kBlock, M - b * kBlock);
  return b * vectors * kBlockFloats + (v * rows + m % kBlock) * kLanes;
}

// The partial y of rows k0..k1 of w, into `acc` (M * vectors * kLanes floats, see acc_offset).
void add_rows(const float* x, const float* w, float* acc, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  const int64_t blocks = (M + kBlock - 1) / kBlock, vectors = (N + kLanes - 1) / kLanes;
  std::fill(acc, acc + M * vectors * kLanes, 0.f);
  std::vector<float> xt(blocks * kStep * kBlock);
  for (int64_t k = k0; k < k1; k += kStep) {
    const int rows = static_cast<int>(std::min<int64_t>(kStep, k1 - k));
    std::fill(xt.begin(), xt.end(), 0.f);  // rows past K and x rows past M stay zero
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < rows; ++j) xt[(m / kBlock * kStep + j) * kBlock + m % kBlock] = x[m * K + k + j];
    const float* wk = w + k * N;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t n = v * kLanes, width = std::min<int64_t>(kLanes, N - n);
      Vec wv[kStep] = {};
      for (int j = 0; j < rows; ++j)
        wv[j] = width == kLanes ? load(wk + j * N + n) : load_partial(wk + j * N + n, width);
      for (int64_t b = 0; b < blocks; ++b) {
        const int block_rows = static_cast<int>(std::min<int64_t>(kBlock, M - b * kBlock));
        float* acc_block = acc + acc_offset(b * kBlock, v, M, vectors);
        if (block_rows == kBlock) add_block<kBlock>(xt.data() + b * kStep * kBlock, wv, acc_block);
        else add_block_of(block_rows, xt.data() + b * kStep * kBlock, wv, acc_block,
                          std::make_integer_sequence<int, kBlock - 1>());
      }
    }
  }
}

void matmul_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (K + kStep - 1) / kStep)));
  const int64_t vectors = (N + kLanes - 1) / kLanes, size = M * vectors * kLanes;
  // Reused across calls (a fresh buffer this size would be mmap'ed and page-faulted every call);
  // one per calling thread, shared with its OpenMP workers.
  static thread_local std::vector<float> partials;
  if (static_cast<int64_t>(partials.size()) < threads * size) partials.resize(threads * size);
  float* all = partials.data();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    int64_t k0, k1;
    share(K, t, used, kStep, &k0, &k1);
    add_rows(x, w, all + t * size, M, K, N, k0, k1);
#pragma omp barrier
    int64_t r0, r1;  // vectors of y: sum over the threads' partials, write the valid columns
    share(M * vectors, t, used, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t m = r / vectors, v = r % vectors, at = acc_offset(m, v, M, vectors);
      Vec total = load(all + at);
      for (int p = 1; p < used; ++p) total += load(all + p * size + at);
      const int64_t n = v * kLanes, width = std::min<int64_t>(kLanes, N - n);
      if (width == kLanes) store(y + m * N + n, total);
      else std::memcpy(y + m * N + n, &total, width * sizeof(float));
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
  if (K == 0) {  // an empty sum
    std::fill(y.data<float>(), y.data<float>() + y.numel(), 0.f);
    return {y};
  }
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

