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
// Row n of a packed matrix, w.Kp values (the padding's are 0).
void dequantize_row(const QuantMatrix& w, int64_t n, float* out);

// A stack of experts' matrices [E, N, K], each of one kind as a Matrix holds it; `at(e)` is expert e's.
struct Experts {
  Matrix first;
  int64_t E;
  Matrix at(int64_t e) const;
};
// The stack that `data` holds ([E, N, K], or packed [E, N, bytes] with `scales` [E, N, groups]).
Experts experts_of(const paddle::Tensor& data, const paddle::Tensor& scales, int64_t K, const char* op);
// Rows offsets[e]..offsets[e + 1] of x [R, K] @ expert e's matrix^T into y [R, N]: each used expert's
// matrix streamed once for all its rows, the experts nobody chose not read (cpu_moe.cc).
void project_grouped(const float* x, const int64_t* offsets, const Experts& w, float* y, int threads);

// The router of a MoE layer, as model.MoE.route describes it: for each row of h [M, H], the `top_k`
// experts chosen [M, top_k] and their weights [M, top_k], from a float32 gate [E, H] and correction bias [E].
void route(const float* h, int64_t M, const Matrix& gate, const float* bias, int64_t top_k, float norm_min,
           int64_t* chosen, float* weights, int threads);
// y [M, H] = the routed experts' outputs for the rows of h [M, H], weighted and added in slot order.
void routed_experts(const float* h, int64_t M, const int64_t* chosen, const float* weights, int64_t top_k,
                    const Experts& up_gate, const Experts& down, float* y, int threads);

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
// RoPE's cos and sin [M, D] at integer positions [M], as model.Rope computes them: angle = position / ratio *
// freqs[d] (freqs repeated for each pair of channels), sin negated on even channels.
void rotation(const int64_t* positions, int64_t M, const float* freqs, int64_t D, float ratio, float* cos, float* sin);
void attention(const float* qkv, const float* cos, const float* sin, float* keys, float* values, const float* mask,
               const AttentionShape& shape, int64_t start, float scale, float* out, int threads);

}  // namespace ernie
