// A Paddle custom operator for the experts of a MoE layer on CPU: each row of x goes through one
// expert's matrix, and the rows are sorted by expert, so that every chosen expert's matrix is streamed
// once for all its rows and the experts nobody chose are not read at all.
//
//   ernie_cpu_grouped_matmul(x [R, K], w [E, N, K], offsets [E + 1]) = y [R, N]
//   y[r] = x[r] @ w[e]^T for offsets[e] <= r < offsets[e + 1]
//   ernie_cpu_grouped_quant_matmul(x [R, K], data [E, N, ...], scales [E, N, ...], offsets [E + 1])
//
// w is float32, or bfloat16 widened as it is read, like ernie_cpu_matmul, with the same register
// tiles (dot.h); or packed wint8 / wint4 (quant.h), like ernie_quant_matmul. Either way a row's result
// has the same bits whatever else is in the batch.

#include <omp.h>

#include <algorithm>
#include <vector>

#include "paddle/extension.h"
#include "dot.h"
#include "quant.h"
#include "vec.h"

namespace {

using namespace ernie;

// The experts with rows, each with its matrix cut into `tiles` tiles of `rows` rows: the work the
// threads share evenly, in order, so that each streams a contiguous stretch of one or two experts' weights.
struct Tiles {
  std::vector<int64_t> used;
  int64_t per_expert, rows;
  Tiles(const int64_t* offsets, int64_t E, int64_t N, int64_t rows) : per_expert((N + rows - 1) / rows), rows(rows) {
    for (int64_t e = 0; e < E; ++e)
      if (offsets[e + 1] > offsets[e]) used.push_back(e);
  }
  int64_t count() const { return static_cast<int64_t>(used.size()) * per_expert; }
  int64_t expert(int64_t t) const { return used[t / per_expert]; }
  int64_t first_row(int64_t t) const { return t % per_expert * rows; }
};

template <typename W>
void grouped_rows(const float* x, const W* w, const int64_t* offsets, float* y, int64_t E, int64_t K, int64_t N,
                  int threads) {
  const Tiles tiles(offsets, E, N, kTileRows);
#pragma omp parallel num_threads(threads)
  {
    int64_t t0, t1;
    share(tiles.count(), omp_get_thread_num(), omp_get_num_threads(), 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = tiles.expert(t), first = offsets[e], M = offsets[e + 1] - first;
      const W* we = w + e * N * K;
      int64_t n = tiles.first_row(t);
      if (n + kTileRows <= N) {
        dot_rows<kTileRows>(x + first * K, we + n * K, y + first * N + n, M, K, N, n + 2 * kTileRows <= N);
      } else {
        for (; n < N; ++n) dot_rows<1>(x + first * K, we + n * K, y + first * N + n, M, K, N, false);
      }
    }
  }
}

// The packed form: x's rows rounded to int8 blocks once (quant.h), then each thread's tiles through
// quant_matmul_range. Tiles of 16 rows (two of the interleaved groups of 8): a few hundred per expert
// matrix, enough to share evenly.
void grouped_quant_rows(const float* x, const QuantMatrix& stack, const int64_t* offsets, float* y, int64_t R,
                        int64_t E, int64_t K, int threads) {
  const int64_t N = stack.N, Kp = stack.Kp, blocks = Kp / kQuantBlock;
  std::vector<int8_t> q(R * Kp);
  std::vector<float> d(R * blocks);
  std::vector<int32_t> sums8(R * blocks);
  QuantRows all{q.data(), d.data(), sums8.data(), R, Kp};
  prepare_rows(x, K, &all);
  const Tiles tiles(offsets, E, N, 2 * kQuantRowGroup);  // tiles start at multiples of the interleaved rows
#pragma omp parallel num_threads(threads)
  {
    int64_t t0, t1;
    share(tiles.count(), omp_get_thread_num(), omp_get_num_threads(), 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = tiles.expert(t), first = offsets[e], n0 = tiles.first_row(t);
      QuantRows rows{all.q + first * Kp, all.d + first * blocks, all.sums8 + first * blocks, offsets[e + 1] - first, Kp};
      QuantMatrix w = stack;
      w.data += e * N * stack.row_bytes();
      w.scales += e * N * (Kp / stack.group);
      quant_matmul_range(rows, w, y + first * N, N, n0, std::min(N, n0 + tiles.rows));
    }
  }
}

// The checks both operators make of x and offsets; the rows of x.
int64_t check_rows(const paddle::Tensor& x, const paddle::Tensor& offsets_in, int64_t E, int64_t K, const char* op) {
  PD_CHECK(x.is_cpu() && offsets_in.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, op,
           ": x must be a float32 CPU tensor");
  PD_CHECK(offsets_in.dtype() == paddle::DataType::INT64 && offsets_in.numel() == E + 1, op,
           ": offsets must be int64 with E + 1 entries");
  PD_CHECK(x.shape().size() == 2 && x.shape()[1] == K, op, ": x must be [R, K] with the matrices' K");
  const int64_t R = x.shape()[0], *offsets = offsets_in.data<int64_t>();
  PD_CHECK(offsets[0] == 0 && offsets[E] == R, op, ": offsets must run from 0 to the rows of x");
  for (int64_t e = 0; e < E; ++e) PD_CHECK(offsets[e] <= offsets[e + 1], op, ": offsets must not decrease");
  return R;
}

std::vector<paddle::Tensor> GroupedMatmul(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                          const paddle::Tensor& offsets_in, int threads) {
  const bool bf16 = w_in.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(w_in.is_cpu() && w_in.shape().size() == 3 && (bf16 || w_in.dtype() == paddle::DataType::FLOAT32),
           "ernie_cpu_grouped_matmul: w must be a float32 or bfloat16 CPU tensor [E, N, K]");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  const int64_t E = w.shape()[0], N = w.shape()[1], K = w.shape()[2];
  const int64_t R = check_rows(x, offsets_in, E, K, "ernie_cpu_grouped_matmul");
  const int64_t* offsets = offsets_in.data<int64_t>();
  paddle::Tensor y = paddle::empty({R, N}, paddle::DataType::FLOAT32, x.place());
  if (K == 0) {
    std::fill(y.data<float>(), y.data<float>() + y.numel(), 0.f);
    return {y};
  }
  threads = std::max(1, threads);
  if (bf16) {
    grouped_rows(x.data<float>(), static_cast<const uint16_t*>(w.data()), offsets, y.data<float>(), E, K, N, threads);
  } else {
    grouped_rows(x.data<float>(), w.data<float>(), offsets, y.data<float>(), E, K, N, threads);
  }
  return {y};
}

std::vector<paddle::Tensor> GroupedQuantMatmul(const paddle::Tensor& x_in, const paddle::Tensor& data,
                                               const paddle::Tensor& scales, const paddle::Tensor& offsets_in,
                                               int threads) {
  const bool wint8 = data.dtype() == paddle::DataType::INT8;
  PD_CHECK(data.is_cpu() && scales.is_cpu() && (wint8 || data.dtype() == paddle::DataType::UINT8) &&
               scales.dtype() == paddle::DataType::FLOAT16 && data.shape().size() == 3 && scales.shape().size() == 3 &&
               data.is_contiguous() && scales.is_contiguous(),
           "ernie_cpu_grouped_quant_matmul: data int8 / uint8 [E, N, bytes] and scales float16 [E, N, groups] expected");
  const int64_t E = data.shape()[0], N = data.shape()[1];
  const int64_t Kp = wint8 ? data.shape()[2] : 2 * data.shape()[2], groups = scales.shape()[2];
  PD_CHECK(scales.shape()[0] == E && scales.shape()[1] == N && groups > 0 && Kp % groups == 0 &&
               (Kp / groups) % kQuantBlock == 0, "ernie_cpu_grouped_quant_matmul: scales do not fit data");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const int64_t K = x.shape().size() == 2 ? x.shape()[1] : -1;
  PD_CHECK(K > 0 && (K + Kp / groups - 1) / (Kp / groups) * (Kp / groups) == Kp,
           "ernie_cpu_grouped_quant_matmul: x's K does not match the packed rows");
  const int64_t R = check_rows(x, offsets_in, E, K, "ernie_cpu_grouped_quant_matmul");
  const QuantMatrix stack{static_cast<const uint8_t*>(data.data()), static_cast<const uint16_t*>(scales.data()), N, Kp,
                          Kp / groups, wint8 ? 8 : 4};
  paddle::Tensor y = paddle::empty({R, N}, paddle::DataType::FLOAT32, x.place());
  grouped_quant_rows(x.data<float>(), stack, offsets_in.data<int64_t>(), y.data<float>(), R, E, K, std::max(1, threads));
  return {y};
}

std::vector<std::vector<int64_t>> GroupedQuantMatmulShape(const std::vector<int64_t>& x,
                                                          const std::vector<int64_t>& data,
                                                          const std::vector<int64_t>& scales,
                                                          const std::vector<int64_t>& offsets, int threads) {
  return {{x[0], data[1]}};
}

std::vector<paddle::DataType> GroupedQuantMatmulDtype(const paddle::DataType& x, const paddle::DataType& data,
                                                      const paddle::DataType& scales, const paddle::DataType& offsets) {
  return {paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> GroupedMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                     const std::vector<int64_t>& offsets, int threads) {
  return {{x[0], w[1]}};
}

std::vector<paddle::DataType> GroupedMatmulDtype(const paddle::DataType& x, const paddle::DataType& w,
                                                 const paddle::DataType& offsets) {
  return {x};
}

}  // namespace

PD_BUILD_OP(ernie_cpu_grouped_matmul)
    .Inputs({"X", "W", "Offsets"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GroupedMatmul))
    .SetInferShapeFn(PD_INFER_SHAPE(GroupedMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GroupedMatmulDtype));

PD_BUILD_OP(ernie_cpu_grouped_quant_matmul)
    .Inputs({"X", "Data", "Scales", "Offsets"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GroupedQuantMatmul))
    .SetInferShapeFn(PD_INFER_SHAPE(GroupedQuantMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GroupedQuantMatmulDtype));
