// A Paddle custom operator for the float32 matmuls of CPU decoding: a few rows (1 to 32) times a
// weight matrix that does not fit in cache. Such a product is bound by reading the weights once, so
// the kernel streams every weight byte exactly once, across all threads, while the rows stay in
// cache. Paddle's MKL runs a one-row product on one core, and reaches ~40 GFLOP/s on 8 rows where
// this reaches 85-120 over the 0.3B model's matrices (2-core EPYC; 140-160 on matrices in cache).
//
//   ernie_cpu_matmul(x [..., K], w [K, N], transpose_w=false) = x @ w        (the -Paddle layout)
//   ernie_cpu_matmul(x [..., K], w [N, K], transpose_w=true)  = x @ w^T      (the tied lm_head)
//
// x is float32; w is float32, or bfloat16 widened as it is read (the same float32 arithmetic, on
// weights that take half the bytes to stream). ernie_bf16_to_f32(w) widens a whole matrix, for the
// prompt's matmuls, which MKL computes in float32.

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
// 8 rows x one vector of columns, and each step's x values are transposed into a small table, so the inner loop
// addresses both at constant offsets from one pointer and keeps the partial sums in registers.
constexpr int kStep = 8;  // rows of w per step; 8 beat 2, 4 and 16 in decoding on a 2-core EPYC
constexpr int kBlock = 8;  // rows of x per block (8 independent accumulator chains)
constexpr int kBlockFloats = kBlock * kLanes;

template <typename W>
inline Vec load_partial(const W* p, int64_t count) {  // the tail vector of a row, zero-padded
  W v[kLanes] = {};
  std::memcpy(v, p, count * sizeof(W));
  return load(v);
}

// acc[0:XR] += xt[j][0:XR] * w[j, 0:width] over the `rows` rows j of one step: the accumulators stay
// in registers and one w vector at a time is live (parking the kStep vectors in a table first ran at
// half the speed).
template <int XR, typename W>
inline void add_block(const float* xt, const W* w, int64_t N, int rows, int64_t width, float* acc_block) {
  Vec acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = load(acc_block + i * kLanes);
  if (rows == kStep && width == kLanes) {
    for (int j = 0; j < kStep; ++j) {
      const Vec wj = load(w + j * N);
      for (int i = 0; i < XR; ++i) acc[i] = madd(xt[j * kBlock + i], wj, acc[i]);
    }
  } else {
    for (int j = 0; j < rows; ++j) {
      const Vec wj = load_partial(w + j * N, width);
      for (int i = 0; i < XR; ++i) acc[i] = madd(xt[j * kBlock + i], wj, acc[i]);
    }
  }
  for (int i = 0; i < XR; ++i) store(acc_block + i * kLanes, acc[i]);
}

// add_block for two adjacent full w vectors at once, XR rows: each x value broadcast feeds two
// multiply-adds. With AVX2's 16 registers (XR = 4: 8 accumulators) this needs 6 loads per 8
// multiply-adds where add_block<8> needs 9.
template <int XR, typename W>
inline void add_block_pair(const float* xt, const W* w, int64_t N, int rows, float* acc0, float* acc1) {
  Vec a[XR], b[XR];
  for (int i = 0; i < XR; ++i) a[i] = load(acc0 + i * kLanes), b[i] = load(acc1 + i * kLanes);
  for (int j = 0; j < rows; ++j) {
    const Vec wa = in_register(load(w + j * N)), wb = in_register(load(w + j * N + kLanes));
    for (int i = 0; i < XR; ++i) {
      const Vec xi = splat(xt[j * kBlock + i]);
      a[i] = madd(xi, wa, a[i]);
      b[i] = madd(xi, wb, b[i]);
    }
  }
  for (int i = 0; i < XR; ++i) store(acc0 + i * kLanes, a[i]), store(acc1 + i * kLanes, b[i]);
}

template <typename W, int... XR>
inline void add_block_of(int block_rows, const float* xt, const W* w, int64_t N, int rows, int64_t width,
                         float* acc_block, std::integer_sequence<int, XR...>) {
  ((block_rows == XR + 1 ? add_block<XR + 1>(xt, w, N, rows, width, acc_block) : void()), ...);
}

// Where row m, columns 16v..16v+15 of a partial y start: blocks of 8 rows (the last one shorter), each
// [vectors][rows in the block][kLanes].
inline int64_t acc_offset(int64_t m, int64_t v, int64_t M, int64_t vectors) {
  const int64_t b = m / kBlock, rows = std::min<int64_t>(kBlock, M - b * kBlock);
  return b * vectors * kBlockFloats + (v * rows + m % kBlock) * kLanes;
}

// The partial y of rows k0..k1 of w, into `acc` (M * vectors * kLanes floats, see acc_offset).
template <typename W>
void add_rows(const float* x, const W* w, float* acc, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  const int64_t blocks = (M + kBlock - 1) / kBlock, vectors = (N + kLanes - 1) / kLanes;
  std::fill(acc, acc + M * vectors * kLanes, 0.f);
  std::vector<float> xt(blocks * kStep * kBlock);
  for (int64_t k = k0; k < k1; k += kStep) {
    const int rows = static_cast<int>(std::min<int64_t>(kStep, k1 - k));
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < rows; ++j) xt[(m / kBlock * kStep + j) * kBlock + m % kBlock] = x[m * K + k + j];
    const W* wk = w + k * N;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t n = v * kLanes, width = std::min<int64_t>(kLanes, N - n);
      const bool pair = kLanes == 8 && n + 2 * kLanes <= N;
      for (int64_t b = 0; b < blocks; ++b) {
        const int block_rows = static_cast<int>(std::min<int64_t>(kBlock, M - b * kBlock));
        const float* xt_block = xt.data() + b * kStep * kBlock;
        float* acc_block = acc + acc_offset(b * kBlock, v, M, vectors);
        if (pair && block_rows == kBlock) {
          for (int half = 0; half < kBlock; half += kBlock / 2)
            add_block_pair<kBlock / 2>(xt_block + half, wk + n, N, rows, acc_block + half * kLanes,
                                       acc_block + (kBlock + half) * kLanes);
          continue;
        }
        for (int64_t u = v; u <= v + pair; ++u) {
          float* acc_u = acc + acc_offset(b * kBlock, u, M, vectors);
          if (block_rows == kBlock) add_block<kBlock>(xt_block, wk + u * kLanes, N, rows, u == v ? width : kLanes, acc_u);
          else add_block_of(block_rows, xt_block, wk + u * kLanes, N, rows, u == v ? width : kLanes, acc_u,
                            std::make_integer_sequence<int, kBlock - 1>());
        }
      }
      v += pair;
    }
  }
}

// add_rows for one row of x (decoding one sequence), with no transposed x table: the same sums in the
// same order as add_rows. Where a row of w is shorter than 4 KB (bf16 o_proj and down_proj: 2 KB), the
// kStep row streams of a step are too short for the hardware prefetcher: those matrices are read one
// row at a time, a single sequential stream (1.3-1.5x faster there; slower for wide rows, whose partial
// sums no longer fit in L1 beside the stream).
template <typename W>
void add_rows_of_one(const float* x, const W* w, float* acc, int64_t N, int64_t k0, int64_t k1) {
  const int64_t vectors = (N + kLanes - 1) / kLanes, whole = N / kLanes * kLanes;
  std::fill(acc, acc + vectors * kLanes, 0.f);
  if (N * static_cast<int64_t>(sizeof(W)) < 4096) {
    for (int64_t k = k0; k < k1; ++k) {
      const W* wk = w + k * N;
      for (int64_t n = 0; n < whole; n += kLanes) store(acc + n, madd(x[k], load(wk + n), load(acc + n)));
      if (whole < N) store(acc + whole, madd(x[k], load_partial(wk + whole, N - whole), load(acc + whole)));
    }
    return;
  }
  for (int64_t k = k0; k < k1; k += kStep) {
    const int rows = static_cast<int>(std::min<int64_t>(kStep, k1 - k));
    const W* wk = w + k * N;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t n = v * kLanes, width = std::min<int64_t>(kLanes, N - n);
      Vec a = load(acc + n);
      if (rows == kStep && width == kLanes)
        for (int j = 0; j < kStep; ++j) a = madd(x[k + j], load(wk + j * N + n), a);
      else
        for (int j = 0; j < rows; ++j) a = madd(x[k + j], load_partial(wk + j * N + n, width), a);
      store(acc + n, a);
    }
  }
}

template <typename W>
void matmul_rows(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int threads) {
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
    if (M == 1) add_rows_of_one(x, w, all + t * size, N, k0, k1);
    else add_rows(x, w, all + t * size, M, K, N, k0, k1);
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

// x . w for one row each: one sequential stream through w (four accumulators), which reads bfloat16
// weights 1.7x faster than the eight interleaved row streams of a tile; float32 ones as fast.
template <typename W>
inline float dot_one(const float* x, const W* w, int64_t K) {
  Vec acc[4] = {};
  int64_t k = 0;
  for (; k + 4 * kLanes <= K; k += 4 * kLanes)
    for (int i = 0; i < 4; ++i) acc[i] = madd(load(x + k + i * kLanes), load(w + k + i * kLanes), acc[i]);
  for (; k < K; k += kLanes) {
    const int64_t width = std::min<int64_t>(kLanes, K - k);
    acc[0] = madd(load_partial(x + k, width), load_partial(w + k, width), acc[0]);
  }
  return sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// y[M, N] = x[M, K] @ w[N, K]^T. Each thread owns a range of w's rows, each row a contiguous stream
// read once: one at a time for one x row, in tiles for several. A tile is 4 x 4 dot products with
// AVX-512; with AVX2's 16 registers 4 x 3 (12 accumulators beside 3 w vectors and an x vector:
// 1.25x as fast as 2 x 4 in cache, and the lm_head at 8 rows 1.2x).
template <typename W>
void matmul_rows_transposed(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N,
                            int threads) {
  constexpr int tile = kLanes == 16 ? 4 : 3;
#pragma omp parallel num_threads(threads)
  {
    int64_t n0, n1;
    share(N, omp_get_thread_num(), omp_get_num_threads(), tile, &n0, &n1);
    int64_t n = n0;
    if (M == 1)
      for (; n < n1; ++n) y[n] = dot_one(x, w + n * K, K);
    for (; n + tile <= n1; n += tile) dot_rows<tile>(x, w + n * K, y + n, M, K, N, n + 2 * tile <= N);
    for (; n < n1; ++n) dot_rows<1>(x, w + n * K, y + n, M, K, N, n + 2 <= N);
  }
}

std::vector<paddle::Tensor> CpuMatmul(const paddle::Tensor& x_in, const paddle::Tensor& w_in, bool transpose_w,
                                      int threads) {
  PD_CHECK(x_in.is_cpu() && w_in.is_cpu(), "ernie_cpu_matmul: tensors must be on the CPU");
  const bool bf16 = w_in.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(x_in.dtype() == paddle::DataType::FLOAT32 && (bf16 || w_in.dtype() == paddle::DataType::FLOAT32),
           "ernie_cpu_matmul: x must be float32 and w float32 or bfloat16");
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
  const auto run = [&](auto* w_data) {
    if (transpose_w) matmul_rows_transposed(x.data<float>(), w_data, y.data<float>(), M, K, N, threads);
    else matmul_rows(x.data<float>(), w_data, y.data<float>(), M, K, N, threads);
  };
  if (bf16) run(static_cast<const uint16_t*>(w.data()));
  else run(w.data<float>());
  return {y};
}

std::vector<std::vector<int64_t>> CpuMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                 bool transpose_w, int threads) {
  std::vector<int64_t> y(x);
  y.back() = transpose_w ? w[0] : w[1];
  return {y};
}

std::vector<paddle::DataType> CpuMatmulDtype(const paddle::DataType& x, const paddle::DataType& w) { return {x}; }

std::vector<paddle::Tensor> Bf16ToF32(const paddle::Tensor& w_in, int threads) {
  PD_CHECK(w_in.is_cpu() && w_in.dtype() == paddle::DataType::BFLOAT16,
           "ernie_bf16_to_f32: a bfloat16 CPU tensor expected");
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  paddle::Tensor out = paddle::empty(w.shape(), paddle::DataType::FLOAT32, w.place());
  const uint16_t* from = static_cast<const uint16_t*>(w.data());
  float* to = out.data<float>();
  const int64_t n = w.numel(), whole = n / kLanes * kLanes;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t i = 0; i < whole; i += kLanes) store(to + i, load(from + i));
  for (int64_t i = whole; i < n; ++i) to[i] = to_float(from[i]);
  return {out};
}

std::vector<std::vector<int64_t>> Bf16ToF32Shape(const std::vector<int64_t>& w, int threads) { return {w}; }

std::vector<paddle::DataType> Bf16ToF32Dtype(const paddle::DataType& w) { return {paddle::DataType::FLOAT32}; }


}  // namespace

PD_BUILD_OP(ernie_cpu_matmul)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"transpose_w: bool", "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuMatmul))
    .SetInferShapeFn(PD_INFER_SHAPE(CpuMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CpuMatmulDtype));


PD_BUILD_OP(ernie_bf16_to_f32)
    .Inputs({"W"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(Bf16ToF32))
    .SetInferShapeFn(PD_INFER_SHAPE(Bf16ToF32Shape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Bf16ToF32Dtype));
