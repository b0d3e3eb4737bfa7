// Paddle custom operators for the MoE layers on CPU, and the plain functions (kernels.h) that
// cpu_decoder.cc chains into the decoder:
//
//   ernie_cpu_grouped_matmul(x [R, K], w [E, N, K], offsets [E + 1]) = y [R, N]
//   y[r] = x[r] @ w[e]^T for offsets[e] <= r < offsets[e + 1]
//   ernie_cpu_grouped_quant_matmul(x [R, K], data [E, N, ...], scales [E, N, ...], offsets [E + 1])
//   ernie_cpu_route(h [M, H], gate [E, H], bias [E]) = chosen [M, top_k] int64, weights [M, top_k]
//
// The rows of a grouped matmul are sorted by expert, so that every chosen expert's matrix is streamed
// once for all its rows and the experts nobody chose are not read at all. w is float32, or bfloat16
// widened as it is read, like ernie_cpu_matmul, with the same register tiles (dot.h); or packed wint8 /
// wint4 (quant.h), like ernie_quant_matmul. Either way a row's result has the same bits whatever else
// is in the batch.
//
// The router is an operator, not Paddle's softmax and topk, so that the decoder operator, which routes
// with the same function, gives the bits of the operators one by one: Paddle's CPU softmax takes its
// exponentials from MKL.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "paddle/extension.h"
#include "dot.h"
#include "kernels.h"
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
void grouped_quant_rows(const float* x, const Experts& stack, const int64_t* offsets, float* y, int threads) {
  const int64_t E = stack.E, R = offsets[E], N = stack.first.N, Kp = stack.first.packed.Kp, blocks = Kp / kQuantBlock;
  std::vector<int8_t> q(R * Kp);
  std::vector<float> d(R * blocks);
  std::vector<int32_t> sums8(R * blocks);
  QuantRows all{q.data(), d.data(), sums8.data(), R, Kp};
  prepare_rows(x, stack.first.K, &all);
  const Tiles tiles(offsets, E, N, 2 * kQuantRowGroup);  // tiles start at multiples of the interleaved rows
#pragma omp parallel num_threads(threads)
  {
    int64_t t0, t1;
    share(tiles.count(), omp_get_thread_num(), omp_get_num_threads(), 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = tiles.expert(t), first = offsets[e], n0 = tiles.first_row(t);
      QuantRows rows{all.q + first * Kp, all.d + first * blocks, all.sums8 + first * blocks, offsets[e + 1] - first, Kp};
      quant_matmul_range(rows, stack.at(e).packed, y + first * N, N, n0, std::min(N, n0 + tiles.rows));
    }
  }
}

// The scores' softmax in place, in float32: e^(s - max) / their sum, added in order.
void softmax(float* s, int64_t E) {
  const float top = *std::max_element(s, s + E);
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = std::exp(s[e] - top);
    total += s[e];
  }
  for (int64_t e = 0; e < E; ++e) s[e] /= total;
}

// The `k` largest of `choice` (value, index) first, largest first, as paddle.topk (phi's CPU top_k
// kernel) puts them, ties and NaNs included: the same algorithm on the same input in the same order.
void take_largest(std::vector<std::pair<float, int64_t>>& choice, int64_t k) {
  const auto larger = [](const std::pair<float, int64_t>& l, const std::pair<float, int64_t>& r) {
    return (std::isnan(l.first) && !std::isnan(r.first)) || l.first > r.first;
  };
  if (k * 64 < static_cast<int64_t>(choice.size())) {
    std::partial_sort(choice.begin(), choice.begin() + k, choice.end(), larger);
  } else {
    std::nth_element(choice.begin(), choice.begin() + k - 1, choice.end(), larger);
    std::sort(choice.begin(), choice.begin() + k - 1, larger);
  }
}

}  // namespace

Matrix ernie::Experts::at(int64_t e) const {
  Matrix m = first;
  const int64_t n = e * first.N;
  switch (first.kind) {
    case Matrix::kFloat32: m.data = static_cast<const float*>(first.data) + n * first.K; break;
    case Matrix::kBfloat16: m.data = static_cast<const uint16_t*>(first.data) + n * first.K; break;
    case Matrix::kPacked:
      m.packed.data += n * first.packed.row_bytes();
      m.packed.scales += n * (first.packed.Kp / first.packed.group);
      m.data = m.packed.data;
      break;
  }
  return m;
}

Experts ernie::experts_of(const paddle::Tensor& data, const paddle::Tensor& scales, int64_t K, const char* op) {
  PD_CHECK(data.is_cpu() && data.is_contiguous() && data.shape().size() == 3, op,
           ": the experts' matrices must be one contiguous CPU stack [E, N, K]");
  const int64_t E = data.shape()[0], N = data.shape()[1];
  if (scales.numel() > 0) {
    const bool wint8 = data.dtype() == paddle::DataType::INT8;
    PD_CHECK(scales.is_cpu() && scales.is_contiguous() && (wint8 || data.dtype() == paddle::DataType::UINT8) &&
                 scales.dtype() == paddle::DataType::FLOAT16 && scales.shape().size() == 3 &&
                 scales.shape()[0] == E && scales.shape()[1] == N,
             op, ": packed experts need data int8 / uint8 [E, N, bytes] and scales float16 [E, N, groups]");
    const int64_t Kp = wint8 ? data.shape()[2] : 2 * data.shape()[2], groups = scales.shape()[2];
    PD_CHECK(groups > 0 && Kp % groups == 0 && (Kp / groups) % kQuantBlock == 0, op,
             ": the experts' scales do not fit their data");
    const int64_t G = Kp / groups;
    PD_CHECK(K > 0 && (K + G - 1) / G * G == Kp, op, ": the packed experts' rows do not hold ", K, " values");
    const QuantMatrix packed{static_cast<const uint8_t*>(data.data()), static_cast<const uint16_t*>(scales.data()),
                             N, Kp, G, wint8 ? 8 : 4};
    return {{Matrix::kPacked, data.data(), packed, N, K}, E};
  }
  const bool bf16 = data.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(bf16 || data.dtype() == paddle::DataType::FLOAT32, op,
           ": the experts' matrices must be float32, bfloat16 or packed");
  PD_CHECK(data.shape()[2] == K, op, ": the experts' matrices are not [E, N, ", K, "]");
  return {{bf16 ? Matrix::kBfloat16 : Matrix::kFloat32, data.data(), {}, N, K}, E};
}

void ernie::project_grouped(const float* x, const int64_t* offsets, const Experts& w, float* y, int threads) {
  const Matrix& m = w.first;
  switch (m.kind) {
    case Matrix::kFloat32:
      grouped_rows(x, static_cast<const float*>(m.data), offsets, y, w.E, m.K, m.N, threads);
      break;
    case Matrix::kBfloat16:
      grouped_rows(x, static_cast<const uint16_t*>(m.data), offsets, y, w.E, m.K, m.N, threads);
      break;
    case Matrix::kPacked: grouped_quant_rows(x, w, offsets, y, threads); break;
  }
}

void ernie::route(const float* h, int64_t M, const Matrix& gate, const float* bias, int64_t top_k, float norm_min,
                  int64_t* chosen, float* weights, int threads) {
  const int64_t E = gate.N;
  std::vector<float> scores(M * E);
  project(h, M, gate, scores.data(), threads);
  std::vector<std::pair<float, int64_t>> choice(E);
  for (int64_t m = 0; m < M; ++m) {
    float* s = scores.data() + m * E;
    softmax(s, E);
    for (int64_t e = 0; e < E; ++e) choice[e] = {s[e] + bias[e], e};
    take_largest(choice, top_k);
    int64_t* c = chosen + m * top_k;
    float* w = weights + m * top_k;
    float total = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      c[j] = choice[j].second;
      w[j] = s[c[j]];
      total += w[j];
    }
    total = total < norm_min ? norm_min : total;  // paddle.clip(min=norm_min); NaN stays NaN
    for (int64_t j = 0; j < top_k; ++j) w[j] /= total;
  }
}

// Each row through its top_k experts as model.routed_experts computes it: the (row, slot) pairs sorted
// by expert as a stable argsort sorts them, the grouped matmuls and swiglu over the sorted rows, then
// each row's outputs times their weights (each product rounded: Paddle's multiply) added in slot order
// from zero (Paddle's sum over the slot axis).
void ernie::routed_experts(const float* h, int64_t M, const int64_t* chosen, const float* weights, int64_t top_k,
                           const Experts& up_gate, const Experts& down, float* y, int threads) {
  const int64_t E = up_gate.E, H = up_gate.first.K, I = down.first.K, R = M * top_k;
  std::vector<int64_t> offsets(E + 1, 0), position(R);
  for (int64_t r = 0; r < R; ++r) ++offsets[chosen[r] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  std::vector<float> by_expert(R * H), gate_up(R * 2 * I), activated(R * I), out(R * H);
  for (int64_t r = 0; r < R; ++r) {
    position[r] = next[chosen[r]]++;
    std::memcpy(by_expert.data() + position[r] * H, h + r / top_k * H, H * sizeof(float));
  }
  project_grouped(by_expert.data(), offsets.data(), up_gate, gate_up.data(), threads);
  swiglu(gate_up.data(), activated.data(), R, I, threads);
  project_grouped(activated.data(), offsets.data(), down, out.data(), threads);
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * H;
    for (int64_t i = 0; i < H; i += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, H - i);
      Vec total = {};
      for (int64_t j = 0; j < top_k; ++j) {
        const float* o = out.data() + position[m * top_k + j] * H + i;
        const Vec v = count == kLanes ? load(o) : load_partial(o, count);
        total += in_register(v * splat(weights[m * top_k + j]));  // in a register: not fused into the add
      }
      if (count == kLanes) store(ym + i, total);
      else std::memcpy(ym + i, &total, count * sizeof(float));
    }
  }
}

namespace {

// The checks both grouped operators make of x and offsets.
void check_rows(const paddle::Tensor& x, const paddle::Tensor& offsets_in, const Experts& w, const char* op) {
  PD_CHECK(x.is_cpu() && offsets_in.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, op,
           ": x must be a float32 CPU tensor");
  PD_CHECK(offsets_in.dtype() == paddle::DataType::INT64 && offsets_in.numel() == w.E + 1, op,
           ": offsets must be int64 with E + 1 entries");
  PD_CHECK(x.shape().size() == 2 && x.shape()[1] == w.first.K, op, ": x must be [R, K] with the matrices' K");
  const int64_t* offsets = offsets_in.data<int64_t>();
  PD_CHECK(offsets[0] == 0 && offsets[w.E] == x.shape()[0], op, ": offsets must run from 0 to the rows of x");
  for (int64_t e = 0; e < w.E; ++e) PD_CHECK(offsets[e] <= offsets[e + 1], op, ": offsets must not decrease");
}

paddle::Tensor no_scales() { return paddle::empty({0}, paddle::DataType::FLOAT32, paddle::CPUPlace()); }

paddle::Tensor grouped(const paddle::Tensor& x_in, const paddle::Tensor& data, const paddle::Tensor& scales,
                       const paddle::Tensor& offsets, int threads, const char* op) {
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  PD_CHECK(x.shape().size() == 2, op, ": x must be [R, K]");
  const Experts w = experts_of(data.is_contiguous() ? data : data.contiguous(), scales, x.shape()[1], op);
  check_rows(x, offsets, w, op);
  paddle::Tensor y = paddle::empty({x.shape()[0], w.first.N}, paddle::DataType::FLOAT32, x.place());
  project_grouped(x.data<float>(), offsets.data<int64_t>(), w, y.data<float>(), std::max(1, threads));
  return y;
}

std::vector<paddle::Tensor> GroupedMatmul(const paddle::Tensor& x, const paddle::Tensor& w,
                                          const paddle::Tensor& offsets, int threads) {
  return {grouped(x, w, no_scales(), offsets, threads, "ernie_cpu_grouped_matmul")};
}

std::vector<paddle::Tensor> GroupedQuantMatmul(const paddle::Tensor& x, const paddle::Tensor& data,
                                               const paddle::Tensor& scales, const paddle::Tensor& offsets,
                                               int threads) {
  PD_CHECK(scales.numel() > 0, "ernie_cpu_grouped_quant_matmul: scales expected");
  return {grouped(x, data, scales, offsets, threads, "ernie_cpu_grouped_quant_matmul")};
}

std::vector<paddle::Tensor> Route(const paddle::Tensor& h_in, const paddle::Tensor& gate_w, const paddle::Tensor& bias,
                                  int top_k, float norm_min, int threads) {
  const char* op = "ernie_cpu_route";
  PD_CHECK(h_in.is_cpu() && h_in.dtype() == paddle::DataType::FLOAT32 && h_in.shape().size() == 2, op,
           ": h must be a float32 CPU tensor [M, H]");
  const paddle::Tensor h = h_in.contiguous();
  const Matrix gate = matrix_of(gate_w, no_scales(), h.shape()[1], op);
  PD_CHECK(gate.kind == Matrix::kFloat32, op, ": the gate must be float32");
  PD_CHECK(bias.is_cpu() && bias.dtype() == paddle::DataType::FLOAT32 && bias.is_contiguous() &&
               bias.numel() == gate.N, op, ": the correction bias must be float32 with one value per expert");
  PD_CHECK(top_k >= 1 && top_k <= gate.N, op, ": top_k must be between 1 and the number of experts");
  const int64_t M = h.shape()[0];
  paddle::Tensor chosen = paddle::empty({M, top_k}, paddle::DataType::INT64, h.place());
  paddle::Tensor weights = paddle::empty({M, top_k}, paddle::DataType::FLOAT32, h.place());
  route(h.data<float>(), M, gate, bias.data<float>(), top_k, norm_min, chosen.data<int64_t>(), weights.data<float>(),
        std::max(1, threads));
  return {chosen, weights};
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

std::vector<std::vector<int64_t>> RouteShape(const std::vector<int64_t>& h, const std::vector<int64_t>& gate,
                                             const std::vector<int64_t>& bias, int top_k, float norm_min,
                                             int threads) {
  return {{h[0], top_k}, {h[0], top_k}};
}

std::vector<paddle::DataType> RouteDtype(const paddle::DataType& h, const paddle::DataType& gate,
                                         const paddle::DataType& bias) {
  return {paddle::DataType::INT64, paddle::DataType::FLOAT32};
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

PD_BUILD_OP(ernie_cpu_route)
    .Inputs({"H", "Gate", "Bias"})
    .Outputs({"Chosen", "Weights"})
    .Attrs({"top_k: int", "norm_min: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(Route))
    .SetInferShapeFn(PD_INFER_SHAPE(RouteShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RouteDtype));
