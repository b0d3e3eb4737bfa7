// A Paddle custom operator for the float32 matmuls of CPU decoding: a few rows (1 to 32) times a
// weight matrix that does not fit in cache. Such a product is bound by reading the weights once, so
// the kernel streams every weight byte exactly once, across all threads, while the rows stay in
// cache. Over the 0.3B model's bf16 layer matrices at 8 rows this reaches ~80 GFLOP/s on 2 cores of
// an AVX2 EPYC, where Paddle's MKL reaches 30-55 on the widened matrices.
//
//   ernie_cpu_matmul(x [..., K], w [N, K]) = x @ w^T      (w as transformers holds a Linear weight)
//
// x is float32; w is float32, or bfloat16 widened as it is read (the same float32 arithmetic, on
// weights that take half the bytes to stream). ernie_bf16_to_f32(w) widens a whole matrix, for the
// prompt's matmuls, which MKL computes in float32.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "dot.h"
#include "kernels.h"
#include "vec.h"

namespace {

using namespace ernie;

// y[M, N] = x[M, K] @ w[N, K]^T. Each thread owns a range of w's rows, each row a contiguous stream
// read once, in tiles of kTileRows w rows by 4 x rows (dot.h). One x row takes the same tiles, so a
// row's result has the same bits in a batch of any size. On the 0.3B model's matrices this layout
// decodes 8 rows 1.5-1.7x as fast as the [K, N] one an earlier kernel read (partial sums over blocks
// of w's rows), and one row as fast.
template <typename W>
void matmul_rows(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int threads) {
#pragma omp parallel num_threads(threads)
  {
    int64_t n0, n1;
    share(N, omp_get_thread_num(), omp_get_num_threads(), kTileRows, &n0, &n1);
    int64_t n = n0;
    for (; n + kTileRows <= n1; n += kTileRows)
      dot_rows<kTileRows>(x, w + n * K, y + n, M, K, N, n + 2 * kTileRows <= N);
    for (; n < n1; ++n) dot_rows<1>(x, w + n * K, y + n, M, K, N, n + 2 <= N);
  }
}

}  // namespace

ernie::Matrix ernie::matrix_of(const paddle::Tensor& data, const paddle::Tensor& scales, int64_t K, const char* op) {
  PD_CHECK(data.is_cpu() && data.is_contiguous(), op, ": weight matrices must be contiguous CPU tensors");
  if (scales.numel() > 0) {
    const QuantMatrix packed = packed_matrix(data, scales, op);
    PD_CHECK((K + packed.group - 1) / packed.group * packed.group == packed.Kp, op, ": a packed matrix's rows do not hold ",
             K, " values");
    return {Matrix::kPacked, data.data(), packed, packed.N, K};
  }
  const bool bf16 = data.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(bf16 || data.dtype() == paddle::DataType::FLOAT32, op, ": weight matrices must be float32, bfloat16 or packed");
  PD_CHECK(data.shape().size() == 2 && data.shape()[1] == K, op, ": a weight matrix is not [N, ", K, "]");
  return {bf16 ? Matrix::kBfloat16 : Matrix::kFloat32, data.data(), {}, data.shape()[0], K};
}

void ernie::project(const float* x, int64_t M, const Matrix& w, float* y, int threads) {
  switch (w.kind) {
    case Matrix::kFloat32: matmul_rows(x, static_cast<const float*>(w.data), y, M, w.K, w.N, threads); break;
    case Matrix::kBfloat16: matmul_rows(x, static_cast<const uint16_t*>(w.data), y, M, w.K, w.N, threads); break;
    case Matrix::kPacked: quant_matmul(x, M, w.K, w.packed, y, threads); break;
  }
}

namespace {

std::vector<paddle::Tensor> CpuMatmul(const paddle::Tensor& x_in, const paddle::Tensor& w_in, int threads) {
  PD_CHECK(x_in.is_cpu() && w_in.is_cpu(), "ernie_cpu_matmul: tensors must be on the CPU");
  const bool bf16 = w_in.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(x_in.dtype() == paddle::DataType::FLOAT32 && (bf16 || w_in.dtype() == paddle::DataType::FLOAT32),
           "ernie_cpu_matmul: x must be float32 and w float32 or bfloat16");
  PD_CHECK(w_in.shape().size() == 2, "ernie_cpu_matmul: w must be 2-D");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const paddle::Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  const std::vector<int64_t> xs = x.shape();
  const int64_t K = xs.back();
  const int64_t N = w.shape()[0];
  PD_CHECK(w.shape()[1] == K, "ernie_cpu_matmul: inner sizes differ");
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  std::vector<int64_t> ys(xs);
  ys.back() = N;
  paddle::Tensor y = paddle::empty(ys, paddle::DataType::FLOAT32, x.place());
  if (K == 0) {  // an empty sum
    std::fill(y.data<float>(), y.data<float>() + y.numel(), 0.f);
    return {y};
  }
  threads = std::max(1, threads);
  if (bf16) matmul_rows(x.data<float>(), static_cast<const uint16_t*>(w.data()), y.data<float>(), M, K, N, threads);
  else matmul_rows(x.data<float>(), w.data<float>(), y.data<float>(), M, K, N, threads);
  return {y};
}

std::vector<std::vector<int64_t>> CpuMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                 int threads) {
  std::vector<int64_t> y(x);
  y.back() = w[0];
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
    .Attrs({"threads: int"})
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
