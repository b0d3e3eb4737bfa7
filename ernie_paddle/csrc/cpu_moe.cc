// A Paddle custom operator for the experts of a MoE layer on CPU: each row of x goes through one
// expert's matrix, and the rows are sorted by expert, so that every chosen expert's matrix is streamed
// once for all its rows and the experts nobody chose are not read at all.
//
//   ernie_cpu_grouped_matmul(x [R, K], w [E, N, K], offsets [E + 1]) = y [R, N]
//   y[r] = x[r] @ w[e]^T for offsets[e] <= r < offsets[e + 1]
//
// w is float32, or bfloat16 widened as it is read, like ernie_cpu_matmul, with the same register
// tiles (dot.h): a row's result has the same bits whatever else is in the batch.

#include <omp.h>

#include <algorithm>
#include <vector>

#include "paddle/extension.h"
#include "dot.h"
#include "vec.h"

namespace {

using namespace ernie;

// The tiles of kTileRows rows of every used expert's matrix are split evenly over the threads, in
// order, so that each thread streams a contiguous stretch of one or two experts' weights.
template <typename W>
void grouped_rows(const float* x, const W* w, const int64_t* offsets, float* y, int64_t E, int64_t K, int64_t N,
                  int threads) {
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (offsets[e + 1] > offsets[e]) used.push_back(e);
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t total = static_cast<int64_t>(used.size()) * tiles;
#pragma omp parallel num_threads(threads)
  {
    int64_t t0, t1;
    share(total, omp_get_thread_num(), omp_get_num_threads(), 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = used[t / tiles], first = offsets[e], M = offsets[e + 1] - first;
      const W* we = w + e * N * K;
      int64_t n = t % tiles * kTileRows;
      if (n + kTileRows <= N) {
        dot_rows<kTileRows>(x + first * K, we + n * K, y + first * N + n, M, K, N, n + 2 * kTileRows <= N);
      } else {
        for (; n < N; ++n) dot_rows<1>(x + first * K, we + n * K, y + first * N + n, M, K, N, false);
      }
    }
  }
}

std::vector<paddle::Tensor> GroupedMatmul(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                          const paddle::Tensor& offsets_in, int threads) {
  PD_CHECK(x_in.is_cpu() && w_in.is_cpu() && offsets_in.is_cpu(), "ernie_cpu_grouped_matmul: tensors must be on the CPU");
  const bool bf16 = w_in.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(x_in.dtype() == paddle::DataType::FLOAT32 && (bf16 || w_in.dtype() == paddle::DataType::FLOAT32),
           "ernie_cpu_grouped_matmul: x must be float32 and w float32 or bfloat16");
  PD_CHECK(offsets_in.dtype() == paddle::DataType::INT64, "ernie_cpu_grouped_matmul: offsets must be int64");
  PD_CHECK(x_in.shape().size() == 2 && w_in.shape().size() == 3, "ernie_cpu_grouped_matmul: x [R, K], w [E, N, K]");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  const int64_t R = x.shape()[0], K = x.shape()[1], E = w.shape()[0], N = w.shape()[1];
  PD_CHECK(w.shape()[2] == K, "ernie_cpu_grouped_matmul: inner sizes differ");
  PD_CHECK(offsets_in.numel() == E + 1, "ernie_cpu_grouped_matmul: offsets must have E + 1 entries");
  const int64_t* offsets = offsets_in.data<int64_t>();
  PD_CHECK(offsets[0] == 0 && offsets[E] == R, "ernie_cpu_grouped_matmul: offsets must run from 0 to the rows of x");
  for (int64_t e = 0; e < E; ++e)
    PD_CHECK(offsets[e] <= offsets[e + 1], "ernie_cpu_grouped_matmul: offsets must not decrease");
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
