// A Paddle custom operator for a whole decoder layer of CPU decoding, in one call:
//
//   ernie_cpu_decoder_layer(x [B, T, hidden], input_norm, qkv, qkv_scales, o, o_scales, cos, sin, keys, values,
//                           mask, post_norm, up_gate, up_gate_scales, down, down_scales) = the layer's output
//
//   h = x + o_proj(attention(rms_norm(x, input_norm)))        (attention as ernie_cpu_attention: RoPE, the
//   out = h + down(swiglu(up_gate(rms_norm(h, post_norm))))   KV cache written in place at `start`)
//
// the same kernels in the same order as the model's separate operators, so the same bits. A weight
// matrix is float32 or bfloat16 with an empty scales tensor, or packed wint8 / wint4 data with its
// scales (kernels.h: project). With an empty post_norm the layer stops at h: a MoE layer, whose experts
// run as their own operators. Each Paddle operator call costs 25-30 us of dispatch, about what
// streaming a 1024 x 1024 wint4 matrix takes; called one by one, a layer's 8 of them were a third of a
// wint4 0.3B decoding step.

#include <algorithm>
#include <vector>

#include "paddle/extension.h"
#include "kernels.h"

namespace {

using namespace ernie;

// The residual: out = a + b, as Paddle adds it.
void add(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

paddle::Tensor rows(int64_t M, int64_t n, const paddle::Tensor& like) {
  return paddle::empty({M, n}, paddle::DataType::FLOAT32, like.place());
}

std::vector<paddle::Tensor> CpuDecoderLayer(
    const paddle::Tensor& x_in, const paddle::Tensor& input_norm, const paddle::Tensor& qkv_w,
    const paddle::Tensor& qkv_scales, const paddle::Tensor& o_w, const paddle::Tensor& o_scales,
    const paddle::Tensor& cos_in, const paddle::Tensor& sin_in, paddle::Tensor& keys, paddle::Tensor& values,
    const paddle::Tensor& mask_in, const paddle::Tensor& post_norm, const paddle::Tensor& up_gate_w,
    const paddle::Tensor& up_gate_scales, const paddle::Tensor& down_w, const paddle::Tensor& down_scales, int start,
    int heads, float scale, float eps, int threads) {
  const char* op = "ernie_cpu_decoder_layer";
  PD_CHECK(x_in.is_cpu() && x_in.dtype() == paddle::DataType::FLOAT32 && !x_in.shape().empty(), op,
           ": x must be a float32 CPU tensor");
  const paddle::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous(),
                       mask = mask_in.contiguous();
  const int64_t hidden = x.shape().back(), M = hidden == 0 ? 0 : x.numel() / hidden;
  const bool mlp = post_norm.numel() > 0;
  for (const paddle::Tensor* norm : {&input_norm, &post_norm})
    PD_CHECK(norm->is_cpu() && norm->dtype() == paddle::DataType::FLOAT32 && norm->is_contiguous() &&
                 (norm->numel() == hidden || (norm == &post_norm && !mlp)),
             op, ": the norms' weights must be float32 [", hidden, "]");
  threads = std::max(1, threads);
  const Matrix qkv = matrix_of(qkv_w, qkv_scales, hidden, op);
  paddle::Tensor qkv_out = rows(M, qkv.N, x);
  const AttentionShape shape = attention_shape(qkv_out, cos, sin, keys, values, mask, start, heads, op);
  const Matrix o = matrix_of(o_w, o_scales, shape.H * shape.D, op);
  PD_CHECK(o.N == hidden, op, ": o_proj gives ", o.N, " values, not the hidden size ", hidden);

  paddle::Tensor normed = rows(M, hidden, x), attended = rows(M, shape.H * shape.D, x);
  paddle::Tensor out = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  float *h = out.data<float>(), *n = normed.data<float>();
  rms_norm(x.data<float>(), input_norm.data<float>(), n, M, hidden, eps, threads);
  project(n, M, qkv, qkv_out.data<float>(), threads);
  attention(qkv_out.data<float>(), cos.data<float>(), sin.data<float>(), keys.data<float>(), values.data<float>(),
            mask.data<float>(), shape, start, scale, attended.data<float>(), threads);
  project(attended.data<float>(), M, o, h, threads);
  add(x.data<float>(), h, h, M * hidden);
  if (!mlp) return {out};

  const Matrix up_gate = matrix_of(up_gate_w, up_gate_scales, hidden, op);
  PD_CHECK(up_gate.N % 2 == 0, op, ": up_gate_proj must have an even number of rows ([GATE | UP])");
  const Matrix down = matrix_of(down_w, down_scales, up_gate.N / 2, op);
  PD_CHECK(down.N == hidden, op, ": down_proj gives ", down.N, " values, not the hidden size ", hidden);
  paddle::Tensor gate_up = rows(M, up_gate.N, x), activated = rows(M, down.K, x), mlp_out = rows(M, hidden, x);
  rms_norm(h, post_norm.data<float>(), n, M, hidden, eps, threads);
  project(n, M, up_gate, gate_up.data<float>(), threads);
  swiglu(gate_up.data<float>(), activated.data<float>(), M, down.K, threads);
  project(activated.data<float>(), M, down, mlp_out.data<float>(), threads);
  add(h, mlp_out.data<float>(), h, M * hidden);
  return {out};
}

}  // namespace

PD_BUILD_OP(ernie_cpu_decoder_layer)
    .Inputs({"X", "InputNorm", "QKV", "QKVScales", "O", "OScales", "Cos", "Sin", "Keys", "Values", "Mask", "PostNorm",
             "UpGate", "UpGateScales", "Down", "DownScales"})
    .Outputs({"Out", "KeysOut", "ValuesOut"})
    .SetInplaceMap({{"Keys", "KeysOut"}, {"Values", "ValuesOut"}})
    .Attrs({"start: int", "heads: int", "scale: float", "eps: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuDecoderLayer));
