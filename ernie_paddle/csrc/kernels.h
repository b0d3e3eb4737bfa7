// The CPU kernels as plain functions over contiguous float32 rows, for operators that chain several of
// them in one call (cpu_decoder.cc). Each is defined beside the Paddle operator that wraps it alone.
#pragma once

#include <cstdint>

#include "paddle/extension.h"
#include "quant.h"

namespace ernie {

// A weight matrix [N, K] as the model holds it: float32, bfloat16 (widened as it is read), or packed
// wint8 / wint4 (quant.h).
struct Matrix {
  enum Kind { kFloat32, kBfloat16, kPacked } kind;
  const void* data;
  QuantMatrix packed;  // for kPacked
  int64_t N, K;
};

// The matrix that `data` holds, with `scales` for a packed one (an empty tensor for a float matrix),
// multiplied by rows of K values.
Matrix matrix_of(const paddle::Tensor& data, const paddle::Tensor& scales, int64_t K, const char* op);
QuantMatrix packed_matrix(const paddle::Tensor& data, const paddle::Tensor& scales, const char* op);

// y [M, N] = x [M, K] @ W^T: the decoding kernel for the matrix's kind (cpu_matmul.cc, cpu_quant.cc).
void project(const float* x, int64_t M, const Matrix& w, float* y, int threads);
void quant_matmul(const float* x, int64_t M, int64_t K, const QuantMatrix& w, float* y, int threads);

void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, float eps, int threads);
void swiglu(const float* x, float* y, int64_t M, int64_t I, int threads);

// Attention of T new tokens per row over the KV cache, as ernie_cpu_attention computes it
// (cpu_attention.cc says what each array holds).
struct AttentionShape {
  int64_t B, T, H, KV, D, L, S;  // rows, new tokens, heads, kv heads, head size, cache length, mask length
};
// The shape of ernie_cpu_attention's arrays, checked (PD_CHECK names `op`); the arrays are contiguous.
AttentionShape attention_shape(const paddle::Tensor& qkv, const paddle::Tensor& cos, const paddle::Tensor& sin,
                               const paddle::Tensor& keys, const paddle::Tensor& values, const paddle::Tensor& mask,
                               int64_t start, int64_t heads, const char* op);
void attention(const float* qkv, const float* cos, const float* sin, float* keys, float* values, const float* mask,
               const AttentionShape& shape, int64_t start, float scale, float* out, int threads);

}  // namespace ernie
