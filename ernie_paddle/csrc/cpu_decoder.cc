// A Paddle custom operator for CPU decoding: the decoder layers, and then the final norm and the lm_head,
// in one call:
//
//   ernie_cpu_decoder(x, positions [B, T], freqs, mask, embedding, embedding_scales, final_norm, head, head_scales,
//                     one list per layer weight: input_norms, qkvs, qkv_scales, os, o_scales, post_norms,
//                     up_gates, up_gate_scales, downs, down_scales, gates, biases, experts_up_gates,
//                     experts_up_gate_scales, experts_downs, experts_down_scales; keys, values)
//     = logits [B, T, V] ([B, V] with last_only), or with an empty final_norm the hidden states [B, T, hidden]
//
// where x is the hidden states [B, T, hidden], or token ids [B, T] (int64) looked up in the embedding table
// (float32, bfloat16 or packed, as F.embedding and Packed.dequantized give them), RoPE is at `positions`
// (kernels.h: rotation, with freqs and rope_ratio), and each layer computes
//
//   h = x + o_proj(attention(rms_norm(x, input_norm)))        (attention as ernie_cpu_attention: RoPE, the
//   n = rms_norm(h, post_norm)                                 layer's KV cache written in place at `start`)
//   out = h + down(swiglu(up_gate(n)))                         a dense layer (empty gate)
//   out = h + (routed_experts(n) + down(swiglu(up_gate(n))))   a MoE layer: the router (gate, bias, top_k,
//                                                              norm_min) and the experts' stacks; up_gate and
//                                                              down are the shared experts, empty without them
//
// with the same kernels in the same order as the model's separate operators (cpu_moe.cc: the router and
// the grouped experts), so the same bits. A weight matrix is float32 or bfloat16 with an empty scales
// tensor, or packed wint8 / wint4 / wint6 data with its scales (kernels.h: project). Each Paddle operator
// call costs 25-30 us of dispatch, and each layer as a Python call as much again: called layer by layer,
// a wint4 0.3B decoding step spent a tenth of its time between the layers.

#include <algorithm>
#include <vector>

#include "paddle/extension.h"
#include "kernels.h"
#include "vec.h"

namespace {

using namespace ernie;

using Tensors = std::vector<paddle::Tensor>;

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

const float* norm_weight(const paddle::Tensor& w, int64_t hidden, const char* op) {
  PD_CHECK(w.is_cpu() && w.dtype() == paddle::DataType::FLOAT32 && w.is_contiguous() && w.numel() == hidden, op,
           ": the norms' weights must be float32 [", hidden, "]");
  return w.data<float>();
}

// One layer's weights, checked.
struct Layer {
  const float *input_norm, *post_norm, *bias = nullptr;
  Matrix qkv, o, up_gate{}, down{}, gate{};
  Experts experts_up{}, experts_down{};
  bool moe, dense;
};

// The lists of every layer weight, in the operator's order (the header comment).
enum { kInputNorm, kQKV, kQKVScales, kO, kOScales, kPostNorm, kUpGate, kUpGateScales, kDown, kDownScales, kGate,
       kBias, kExpertsUpGate, kExpertsUpGateScales, kExpertsDown, kExpertsDownScales, kLists };

Layer layer_at(const std::vector<const Tensors*>& lists, size_t i, int64_t hidden, int64_t attended, int top_k,
               const char* op) {
  auto at = [&](int list) -> const paddle::Tensor& { return (*lists[list])[i]; };
  Layer l;
  l.input_norm = norm_weight(at(kInputNorm), hidden, op);
  l.post_norm = norm_weight(at(kPostNorm), hidden, op);
  l.qkv = matrix_of(at(kQKV), at(kQKVScales), hidden, op);
  l.o = matrix_of(at(kO), at(kOScales), attended, op);
  PD_CHECK(l.o.N == hidden, op, ": o_proj gives ", l.o.N, " values, not the hidden size ", hidden);
  l.moe = at(kGate).numel() > 0;
  l.dense = at(kUpGate).numel() > 0;
  PD_CHECK(l.moe || l.dense, op, ": a layer needs an MLP (up_gate, down) or experts (gate, ...)");
  if (l.dense) {
    l.up_gate = matrix_of(at(kUpGate), at(kUpGateScales), hidden, op);
    PD_CHECK(l.up_gate.N % 2 == 0, op, ": up_gate_proj must have an even number of rows ([GATE | UP])");
    l.down = matrix_of(at(kDown), at(kDownScales), l.up_gate.N / 2, op);
    PD_CHECK(l.down.N == hidden, op, ": down_proj gives ", l.down.N, " values, not the hidden size ", hidden);
  }
  if (l.moe) {
    const paddle::Tensor& bias = at(kBias);
    l.gate = matrix_of(at(kGate), paddle::empty({0}, paddle::DataType::FLOAT32, bias.place()), hidden, op);
    PD_CHECK(l.gate.kind == Matrix::kFloat32 && bias.is_cpu() && bias.dtype() == paddle::DataType::FLOAT32 &&
                 bias.is_contiguous() && bias.numel() == l.gate.N, op,
             ": the router needs a float32 gate [E, hidden] and a float32 correction bias of E values");
    PD_CHECK(top_k >= 1 && top_k <= l.gate.N, op, ": top_k must be between 1 and the number of experts");
    l.bias = bias.data<float>();
    l.experts_up = experts_of(at(kExpertsUpGate), at(kExpertsUpGateScales), hidden, op);
    PD_CHECK(l.experts_up.E == l.gate.N && l.experts_up.first.N % 2 == 0, op,
             ": the experts' up_gate_proj must be a stack of E matrices with an even number of rows");
    l.experts_down = experts_of(at(kExpertsDown), at(kExpertsDownScales), l.experts_up.first.N / 2, op);
    PD_CHECK(l.experts_down.E == l.gate.N && l.experts_down.first.N == hidden, op,
             ": the experts' down_proj must be a stack of E matrices giving the hidden size");
  }
  return l;
}

// out [M, hidden] = the layer applied to x [M, hidden]; n, attended and second are scratch rows.
void decoder_layer(const float* x, const Layer& l, const AttentionShape& shape, const float* cos, const float* sin,
                   float* keys, float* values, const float* mask, int start, float scale, float eps, int top_k,
                   float norm_min, float* qkv_out, float* n, float* attended, float* second, float* out,
                   int64_t M, int64_t hidden, int threads) {
  rms_norm(x, l.input_norm, n, M, hidden, eps, threads);
  project(n, M, l.qkv, qkv_out, threads);
  attention(qkv_out, cos, sin, keys, values, mask, shape, start, scale, attended, threads);
  project(attended, M, l.o, out, threads);
  add(x, out, out, M * hidden);

  rms_norm(out, l.post_norm, n, M, hidden, eps, threads);
  if (l.moe) {
    std::vector<int64_t> chosen(M * top_k);
    std::vector<float> weights(M * top_k);
    route(n, M, l.gate, l.bias, top_k, norm_min, chosen.data(), weights.data(), threads);
    routed_experts(n, M, chosen.data(), weights.data(), top_k, l.experts_up, l.experts_down, second, threads);
    if (l.dense) {
      std::vector<float> shared(M * hidden);
      mlp(n, M, l.up_gate, l.down, shared.data(), threads);
      add(second, shared.data(), second, M * hidden);
    }
  } else {
    mlp(n, M, l.up_gate, l.down, second, threads);
  }
  add(out, second, out, M * hidden);
}

// Row `id` of an embedding table [V, hidden] as float32.
void embedding_row(const Matrix& table, int64_t id, float* out, std::vector<float>& row) {
  const int64_t K = table.K;
  switch (table.kind) {
    case Matrix::kFloat32: std::copy_n(static_cast<const float*>(table.data) + id * K, K, out); break;
    case Matrix::kBfloat16:
      for (int64_t k = 0; k < K; ++k)
        out[k] = to_float(static_cast<const uint16_t*>(table.data)[id * K + k]);
      break;
    case Matrix::kPacked:
      row.resize(table.packed.Kp);
      dequantize_row(table.packed, id, row.data());
      std::copy_n(row.data(), K, out);
      break;
  }
}

paddle::Tensor floats(const std::vector<int64_t>& shape, const paddle::Tensor& like) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, like.place());
}

std::vector<paddle::Tensor> CpuDecoder(
    const paddle::Tensor& x_in, const paddle::Tensor& positions_in, const paddle::Tensor& freqs,
    const paddle::Tensor& mask_in, const paddle::Tensor& embedding_w, const paddle::Tensor& embedding_scales,
    const paddle::Tensor& final_norm, const paddle::Tensor& head_w,
    const paddle::Tensor& head_scales, const Tensors& input_norms, const Tensors& qkvs, const Tensors& qkv_scales,
    const Tensors& os, const Tensors& o_scales, const Tensors& post_norms, const Tensors& up_gates,
    const Tensors& up_gate_scales, const Tensors& downs, const Tensors& down_scales, const Tensors& gates,
    const Tensors& biases, const Tensors& experts_up_gates, const Tensors& experts_up_gate_scales,
    const Tensors& experts_downs, const Tensors& experts_down_scales, Tensors& keys, Tensors& values, int start,
    int heads, float scale, float eps, float rope_ratio, int top_k, float norm_min, bool last_only, int threads) {
  const char* op = "ernie_cpu_decoder";
  const bool ids = x_in.dtype() == paddle::DataType::INT64;
  PD_CHECK(x_in.is_cpu() && (ids ? x_in.shape().size() == 2 : x_in.dtype() == paddle::DataType::FLOAT32 &&
                                                                  x_in.shape().size() == 3), op,
           ": x must be float32 hidden states [B, T, hidden] or int64 token ids [B, T], on the CPU");
  PD_CHECK(positions_in.is_cpu() && positions_in.dtype() == paddle::DataType::INT64 && freqs.is_cpu() &&
               freqs.dtype() == paddle::DataType::FLOAT32 && freqs.is_contiguous(), op,
           ": positions must be int64 and freqs float32, on the CPU");
  const std::vector<const Tensors*> lists = {
      &input_norms, &qkvs, &qkv_scales, &os, &o_scales, &post_norms, &up_gates, &up_gate_scales, &downs,
      &down_scales, &gates, &biases, &experts_up_gates, &experts_up_gate_scales, &experts_downs,
      &experts_down_scales};
  const size_t layers = input_norms.size();
  PD_CHECK(layers > 0, op, ": no layers");
  for (const Tensors* list : lists)
    PD_CHECK(list->size() == layers, op, ": every list of layer weights must have one tensor per layer (", layers, ")");
  PD_CHECK(keys.size() == layers && values.size() == layers, op, ": ", keys.size(), " keys and ", values.size(),
           " values caches for ", layers, " layers");
  const paddle::Tensor x = x_in.contiguous(), positions = positions_in.contiguous(), mask = mask_in.contiguous();
  const int64_t B = x.shape()[0], T = x.shape()[1], M = B * T, D = freqs.numel();
  const int64_t hidden = input_norms[0].numel();
  PD_CHECK(M > 0, op, ": x has no tokens");
  PD_CHECK(ids || x.shape()[2] == hidden, op, ": x has ", x.shape()[2], " values a row, not the hidden size ", hidden);
  PD_CHECK(!ids || embedding_w.numel() > 0, op, ": token ids need the embedding table");
  PD_CHECK(positions.numel() == M, op, ": positions must be [B, T] like x");
  threads = std::max(1, threads);

  // Every input checked before a layer writes its keys and values: a bad one leaves the cache as it was.
  paddle::Tensor cos = floats({B, T, 1, D}, freqs), sin = floats({B, T, 1, D}, freqs);
  std::vector<Layer> stack;
  std::vector<AttentionShape> shapes;
  std::vector<paddle::Tensor> qkv_outs;
  for (size_t i = 0; i < layers; ++i) {
    qkv_outs.push_back(floats({M, matrix_of(qkvs[i], qkv_scales[i], hidden, op).N}, freqs));
    shapes.push_back(attention_shape(qkv_outs[i], cos, sin, keys[i], values[i], mask, start, heads, op));
    PD_CHECK(shapes[i].B == B && shapes[i].T == T, op, ": layer ", i, "'s KV cache holds ", shapes[i].B,
             " rows, x ", B);
    stack.push_back(layer_at(lists, i, hidden, shapes[i].H * shapes[i].D, top_k, op));
  }
  const bool logits = final_norm.numel() > 0;
  const float* final_weight = logits ? norm_weight(final_norm, hidden, op) : nullptr;
  const Matrix head = logits ? matrix_of(head_w, head_scales, hidden, op) : Matrix{};

  std::vector<float> h(M * hidden), next(M * hidden), n(M * hidden), second(M * hidden), attended, row;
  if (ids) {
    const Matrix table = matrix_of(embedding_w, embedding_scales, hidden, op);
    const int64_t* id = x.data<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      PD_CHECK(id[m] >= 0 && id[m] < table.N, op, ": token id ", id[m], " is outside the embedding's ", table.N, " rows");
      embedding_row(table, id[m], h.data() + m * hidden, row);
    }
  } else {
    std::copy_n(x.data<float>(), M * hidden, h.data());
  }
  rotation(positions.data<int64_t>(), M, freqs.data<float>(), D, rope_ratio, cos.data<float>(), sin.data<float>());
  for (size_t i = 0; i < layers; ++i) {
    attended.resize(M * shapes[i].H * shapes[i].D);
    decoder_layer(h.data(), stack[i], shapes[i], cos.data<float>(), sin.data<float>(), keys[i].data<float>(),
                  values[i].data<float>(), mask.data<float>(), start, scale, eps, top_k, norm_min,
                  qkv_outs[i].data<float>(), n.data(), attended.data(), second.data(), next.data(), M, hidden,
                  threads);
    h.swap(next);
  }

  if (!logits) {
    paddle::Tensor out = floats({B, T, hidden}, freqs);
    std::copy(h.begin(), h.end(), out.data<float>());
    return {out};
  }
  // The logits of every position, or with last_only of each row's last (moved to the front).
  const int64_t rows = last_only ? B : M;
  if (last_only && T > 1)
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(h.data() + ((b + 1) * T - 1) * hidden, hidden, h.data() + b * hidden);
  rms_norm(h.data(), final_weight, n.data(), rows, hidden, eps, threads);
  paddle::Tensor out = last_only ? floats({B, head.N}, freqs) : floats({B, T, head.N}, freqs);
  project(n.data(), rows, head, out.data<float>(), threads);
  return {out};
}

}  // namespace

PD_BUILD_OP(ernie_cpu_decoder)
    .Inputs({"X", "Positions", "Freqs", "Mask", "Embedding", "EmbeddingScales", "FinalNorm", "Head", "HeadScales",
             paddle::Vec("InputNorms"), paddle::Vec("QKVs"), paddle::Vec("QKVScales"), paddle::Vec("Os"), paddle::Vec("OScales"),
             paddle::Vec("PostNorms"), paddle::Vec("UpGates"), paddle::Vec("UpGateScales"), paddle::Vec("Downs"),
             paddle::Vec("DownScales"), paddle::Vec("Gates"), paddle::Vec("Biases"), paddle::Vec("ExpertsUpGates"),
             paddle::Vec("ExpertsUpGateScales"), paddle::Vec("ExpertsDowns"), paddle::Vec("ExpertsDownScales"),
             paddle::Vec("Keys"), paddle::Vec("Values")})
    .Outputs({"Out", paddle::Vec("KeysOut"), paddle::Vec("ValuesOut")})
    .SetInplaceMap({{paddle::Vec("Keys"), paddle::Vec("KeysOut")}, {paddle::Vec("Values"), paddle::Vec("ValuesOut")}})
    .Attrs({"start: int", "heads: int", "scale: float", "eps: float", "rope_ratio: float", "top_k: int",
            "norm_min: float", "last_only: bool", "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuDecoder));
