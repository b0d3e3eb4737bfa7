// A Paddle custom operator for RMSNorm on the CPU:
//   ernie_rms_norm(x [..., H], w [H]) = w * (x / sqrt(mean(x^2) + eps))
// in one pass over each row instead of Paddle's six ops (a decoding step has 37 norms). Paddle's own
// fused_rms_norm runs AVX-512 code on every CPU and stops with SIGILL on the others.
// Each output is w * (x * s), s = 1 / sqrt(mean + eps), as the reference computes it; only the order
// in which the squares are added differs (one running sum per vector lane).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "paddle/extension.h"
#include "kernels.h"
#include "vec.h"

namespace {

using namespace ernie;

constexpr int64_t kPerThread = 65536;  // values below which a second thread costs more than it saves

void NormRow(const float* x, const float* w, float* y, int64_t H, float eps) {
  const int64_t whole = H / kLanes * kLanes;
  Vec squares = {};
  for (int64_t i = 0; i < whole; i += kLanes) {
    const Vec v = load(x + i);
    squares += v * v;
  }
  float total = sum(squares);
  for (int64_t i = whole; i < H; ++i) total += x[i] * x[i];
  const float s = 1.f / std::sqrt(total / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < whole; i += kLanes) store(y + i, load(w + i) * (load(x + i) * s));
  for (int64_t i = whole; i < H; ++i) y[i] = w[i] * (x[i] * s);
}

}  // namespace

void ernie::rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, float eps, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, M * H / kPerThread)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < M; ++r) NormRow(x + r * H, w, y + r * H, H, eps);
}

namespace {

std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x_in, const paddle::Tensor& w_in, float eps, int threads) {
  PD_CHECK(x_in.is_cpu() && x_in.dtype() == paddle::DataType::FLOAT32 && w_in.is_cpu() &&
               w_in.dtype() == paddle::DataType::FLOAT32,
           "ernie_rms_norm: float32 CPU tensors expected");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  PD_CHECK(!x.shape().empty() && w.numel() == x.shape().back(), "ernie_rms_norm: the weight must have x's last size");
  const int64_t H = x.shape().back(), rows = H == 0 ? 0 : x.numel() / H;
  paddle::Tensor out = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  rms_norm(x.data<float>(), w.data<float>(), out.data<float>(), rows, H, eps, threads);
  return {out};
}

std::vector<std::vector<int64_t>> RmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w, float eps,
                                               int threads) {
  return {x};
}

std::vector<paddle::DataType> RmsNormDtype(const paddle::DataType& x, const paddle::DataType& w) { return {x}; }

}  // namespace

PD_BUILD_OP(ernie_rms_norm)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"eps: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(RmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormDtype));
