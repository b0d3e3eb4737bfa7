// A Paddle custom operator for a whole decoder layer of CPU decoding, in one call:
//
//   ernie_cpu_decoder_layer(x [B, T, hidden], input_norm, qkv, qkv_scales, o, o_scales, cos, sin, keys, values,
//                           mask, post_norm, up_gate, up_gate_scales, down, down_scales,
//                           gate, bias, experts_up_gate, experts_up_gate_scales, experts_down, experts_down_scales)
//     = the layer's output
//
//   h = x + o_proj(attention(rms_norm(x, input_norm)))        (attention as ernie_cpu_attention: RoPE, the
//   n = rms_norm(h, post_norm)                                 KV cache written in place at `start`)
//   out = h + down(swiglu(up_gate(n)))                         a dense layer (empty gate)
//   out = h + (routed_experts(n) + down(swiglu(up_gate(n))))   a MoE layer: the router (gate, bias, top_k,
//                                                              norm_min) and the experts' stacks; up_gate and
//                                                              down are the shared experts, empty without them
//
// the same kernels in the same order as the model's separate operators (cpu_moe.cc: the router and
// the grouped experts), so the same bits. A weight matrix is float32 or bfloat16 with an empty scales
// tensor, or packed wint8 / wint4 data with its scales (kernels.h: project). Each Paddle operator call
// costs 25-30 us of dispatch, about what streaming a 1024 x 1024 wint4 matrix takes; called one by
// one, a dense layer's 8 of them were a third of a wint4 0.3B decoding step, and a MoE layer's ~30 a
// twelfth of a bf16 21B-A3B-shaped one.

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

// out [M, down.N] = down(swiglu(up_gate(n))): the MLP, or the shared experts.
void mlp(const float* n, int64_t M, const Matrix& up_gate, const Matrix& down, float* out, int threads) {
  std::vector<float> gate_up(M * up_gate.N), activated(M * down.K);
  project(n, M, up_gate, gate_up.data(), threads);
  swiglu(gate_up.data(), activated.data(), M, down.K, threads);
  project(activated.data(), M, down, out, threads);
}

paddle::Tensor rows(int64_t M, int64_t n, const paddle::Tensor& like) {
  return paddle::empty({M, n}, paddle::DataType::FLOAT32, like.place());
}

std::vector<paddle::Tensor> CpuDecoderLayer(
    const paddle::Tensor& x_in, const paddle::Tensor& input_norm, const paddle::Tensor& qkv_w,
    const paddle::Tensor& qkv_scales, const paddle::Tensor& o_w, const paddle::Tensor& o_scales,
    const paddle::Tensor& cos_in, const paddle::Tensor& sin_in, paddle::Tensor& keys, paddle::Tensor& values,
    const paddle::Tensor& mask_in, const paddle::Tensor& post_norm, const paddle::Tensor& up_gate_w,
    const paddle::Tensor& up_gate_scales, const paddle::Tensor& down_w, const paddle::Tensor& down_scales,
    const paddle::Tensor& gate_w, const paddle::Tensor& bias, const paddle::Tensor& experts_up_gate_w,
    const paddle::Tensor& experts_up_gate_scales, const paddle::Tensor& experts_down_w,
    const paddle::Tensor& experts_down_scales, int start, int heads, float scale, float eps, int top_k,
    float norm_min, int threads) {
  const char* op = "ernie_cpu_decoder_layer";
  PD_CHECK(x_in.is_cpu() && x_in.dtype() == paddle::DataType::FLOAT32 && !x_in.shape().empty(), op,
           ": x must be a float32 CPU tensor");
  const paddle::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous(),
                       mask = mask_in.contiguous();
  const int64_t hidden = x.shape().back(), M = hidden == 0 ? 0 : x.numel() / hidden;
  for (const paddle::Tensor* norm : {&input_norm, &post_norm})
    PD_CHECK(norm->is_cpu() && norm->dtype() == paddle::DataType::FLOAT32 && norm->is_contiguous() &&
                 norm->numel() == hidden, op, ": the norms' weights must be float32 [", hidden, "]");
  threads = std::max(1, threads);
  const Matrix qkv = matrix_of(qkv_w, qkv_scales, hidden, op);
  paddle::Tensor qkv_out = rows(M, qkv.N, x);
  const AttentionShape shape = attention_shape(qkv_out, cos, sin, keys, values, mask, start, heads, op);
  const Matrix o = matrix_of(o_w, o_scales, shape.H * shape.D, op);
  PD_CHECK(o.N == hidden, op, ": o_proj gives ", o.N, " values, not the hidden size ", hidden);

  const bool moe = gate_w.numel() > 0, dense = up_gate_w.numel() > 0;
  PD_CHECK(moe || dense, op, ": a layer needs an MLP (up_gate, down) or experts (gate, ...)");
  Matrix up_gate{}, down{}, gate{};
  Experts experts_up{}, experts_down{};
  if (dense) {
    up_gate = matrix_of(up_gate_w, up_gate_scales, hidden, op);
    PD_CHECK(up_gate.N % 2 == 0, op, ": up_gate_proj must have an even number of rows ([GATE | UP])");
    down = matrix_of(down_w, down_scales, up_gate.N / 2, op);
    PD_CHECK(down.N == hidden, op, ": down_proj gives ", down.N, " values, not the hidden size ", hidden);
  }
  if (moe) {
    gate = matrix_of(gate_w, paddle::empty({0}, paddle::DataType::FLOAT32, x.place()), hidden, op);
    PD_CHECK(gate.kind == Matrix::kFloat32 && bias.is_cpu() && bias.dtype() == paddle::DataType::FLOAT32 &&
                 bias.is_contiguous() && bias.numel() == gate.N, op,
             ": the router needs a float32 gate [E, hidden] and a float32 correction bias of E values");
    PD_CHECK(top_k >= 1 && top_k <= gate.N, op, ": top_k must be between 1 and the number of experts");
    experts_up = experts_of(experts_up_gate_w, experts_up_gate_scales, hidden, op);
    PD_CHECK(experts_up.E == gate.N && experts_up.first.N % 2 == 0, op,
             ": the experts' up_gate_proj must be a stack of E matrices with an even number of rows");
    experts_down = experts_of(experts_down_w, experts_down_scales, experts_up.first.N / 2, op);
    PD_CHECK(experts_down.E == gate.N && experts_down.first.N == hidden, op,
             ": the experts' down_proj must be a stack of E matrices giving the hidden size");
  }

  paddle::Tensor normed = rows(M, hidden, x), attended = rows(M, shape.H * shape.D, x);
  paddle::Tensor out = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  float *h = out.data<float>(), *n = normed.data<float>();
  rms_norm(x.data<float>(), input_norm.data<float>(), n, M, hidden, eps, threads);
  project(n, M, qkv, qkv_out.data<float>(), threads);
  attention(qkv_out.data<float>(), cos.data<float>(), sin.data<float>(), keys.data<float>(), values.data<float>(),
            mask.data<float>(), shape, start, scale, attended.data<float>(), threads);
  project(attended.data<float>(), M, o, h, threads);
  add(x.data<float>(), h, h, M * hidden);

  std::vector<float> second(M * hidden);
  rms_norm(h, post_norm.data<float>(), n, M, hidden, eps, threads);
  if (moe) {
    std::vector<int64_t> chosen(M * top_k);
    std::vector<float> weights(M * top_k);
    route(n, M, gate, bias.data<float>(), top_k, norm_min, chosen.data(), weights.data(), threads);
    routed_experts(n, M, chosen.data(), weights.data(), top_k, experts_up, experts_down, second.data(), threads);
    if (dense) {
      std::vector<float> shared(M * hidden);
      mlp(n, M, up_gate, down, shared.data(), threads);
      add(second.data(), shared.data(), second.data(), M * hidden);
    }
  } else {
    mlp(n, M, up_gate, down, second.data(), threads);
  }
  add(h, second.data(), h, M * hidden);
  return {out};
}

}  // namespace

PD_BUILD_OP(ernie_cpu_decoder_layer)
    .Inputs({"X", "InputNorm", "QKV", "QKVScales", "O", "OScales", "Cos", "Sin", "Keys", "Values", "Mask", "PostNorm",
             "UpGate", "UpGateScales", "Down", "DownScales", "Gate", "Bias", "ExpertsUpGate", "ExpertsUpGateScales",
             "ExpertsDown", "ExpertsDownScales"})
    .Outputs({"Out", "KeysOut", "ValuesOut"})
    .SetInplaceMap({{"Keys", "KeysOut"}, {"Values", "ValuesOut"}})
    .Attrs({"start: int", "heads: int", "scale: float", "eps: float", "top_k: int", "norm_min: float",
            "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuDecoderLayer));
