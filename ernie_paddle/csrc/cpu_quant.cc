// Paddle custom operators for weight-only quantized (wint8 / wint6 / wint4) CPU decoding, over the packed
// layout of quant.h:
//
//   ernie_quant_matmul(x [..., K], data, scales) = x @ W^T       1 to 32 rows, W [N, K] as packed
//   ernie_dequantize(data, scales, K) = W, float32 [N, K]         for the prompt's matmuls (MKL)
//   ernie_dequantize_rows(data, scales, ids, K) = W[ids], [len(ids), K]     an embedding lookup
//
// data is int8 [N, Kp] for wint8, uint8 [N, Kp / 2] for wint4 and [N, 3 Kp / 4] for wint6 (told apart
// by its 24 bytes per scale: wint6 takes G = 32 only); scales float16 [N, Kp / G].
// And a plain C function (through ctypes, like cpu_transpose.cc) that quantizes at load time:
//
//   ernie_quantize(src, src_is_bf16, N, K, row_stride, col_stride, group, bits, data, scales, threads)
//
// W[n, k] = src[n * row_stride + k * col_stride] (float32, or bfloat16 bits), so a -Paddle [in, out]
// matrix quantizes from its transposed view without a copy. quant.py has the same rules in numpy.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "kernels.h"
#include "quant.h"
#include "vec.h"

using namespace ernie;

// The packed matrix the tensors hold, its K padded to Kp.
QuantMatrix ernie::packed_matrix(const paddle::Tensor& data, const paddle::Tensor& scales, const char* op) {
  const bool wint8 = data.dtype() == paddle::DataType::INT8;
  PD_CHECK(data.is_cpu() && scales.is_cpu() && (wint8 || data.dtype() == paddle::DataType::UINT8) &&
               scales.dtype() == paddle::DataType::FLOAT16, op,
           ": data must be int8 (wint8) or uint8 (wint4, wint6) and scales float16, on the CPU");
  PD_CHECK(data.shape().size() == 2 && scales.shape().size() == 2 && data.shape()[0] == scales.shape()[0], op,
           ": data [N, bytes] and scales [N, groups] expected");
  PD_CHECK(data.is_contiguous() && scales.is_contiguous(), op, ": data and scales must be contiguous");
  const int64_t N = data.shape()[0], width = data.shape()[1], groups = scales.shape()[1];
  const int bits = wint8 ? 8 : width == 24 * groups ? 6 : 4;
  const int64_t Kp = width * 8 / bits;
  PD_CHECK(groups > 0 && Kp % groups == 0 && (Kp / groups) % kQuantBlock == 0 && Kp * bits == width * 8, op,
           ": the groups must divide the row into multiples of ", kQuantBlock);
  return {static_cast<const uint8_t*>(data.data()), static_cast<const uint16_t*>(scales.data()), N, Kp, Kp / groups,
          bits};
}

void ernie::quant_matmul(const float* x, int64_t M, int64_t K, const QuantMatrix& w, float* y, int threads) {
  std::vector<int8_t> q(M * w.Kp);
  std::vector<float> d(M * w.Kp / kQuantBlock);
  std::vector<int32_t> sums8(M * w.Kp / kQuantBlock);
  QuantRows rows{q.data(), d.data(), sums8.data(), M, w.Kp};
  prepare_rows(x, K, &rows);
#pragma omp parallel num_threads(std::max(1, threads))
  {
    int64_t n0, n1;
    share(w.N, omp_get_thread_num(), omp_get_num_threads(), kQuantRowGroup, &n0, &n1);
    quant_matmul_range(rows, w, y, w.N, n0, n1);
  }
}

namespace {

void check_k(const QuantMatrix& w, int64_t K, const char* op) {
  PD_CHECK(K > 0 && (K + w.group - 1) / w.group * w.group == w.Kp, op, ": K = ", K,
           " does not match the packed rows (", w.Kp, " values in groups of ", w.group, ")");
}

std::vector<paddle::Tensor> QuantMatmul(const paddle::Tensor& x_in, const paddle::Tensor& data,
                                        const paddle::Tensor& scales, int threads) {
  const QuantMatrix w = packed_matrix(data, scales, "ernie_quant_matmul");
  PD_CHECK(x_in.is_cpu() && x_in.dtype() == paddle::DataType::FLOAT32, "ernie_quant_matmul: x must be float32");
  const paddle::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  std::vector<int64_t> shape = x.shape();
  const int64_t K = shape.back(), M = x.numel() / std::max<int64_t>(K, 1);
  check_k(w, K, "ernie_quant_matmul");
  shape.back() = w.N;
  paddle::Tensor y = paddle::empty(shape, paddle::DataType::FLOAT32, x.place());
  quant_matmul(x.data<float>(), M, K, w, y.data<float>(), threads);
  return {y};
}

std::vector<std::vector<int64_t>> QuantMatmulShape(const std::vector<int64_t>& x, const std::vector<int64_t>& data,
                                                   const std::vector<int64_t>& scales, int threads) {
  std::vector<int64_t> y(x);
  y.back() = data[0];
  return {y};
}

std::vector<paddle::DataType> QuantMatmulDtype(const paddle::DataType& x, const paddle::DataType& data,
                                               const paddle::DataType& scales) {
  return {paddle::DataType::FLOAT32};
}

// Row n of W into out[0, Kp): q * s, each product rounded once, sixteen at a time.
typedef float Floats __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(16 * sizeof(int32_t))));
typedef int8_t Bytes __attribute__((vector_size(16)));
typedef uint8_t UBytes __attribute__((vector_size(16)));

}  // namespace

void ernie::dequantize_row(const QuantMatrix& w, int64_t n, float* out) {
  // The layout's addresses, stepped along the row (QuantMatrix::chunk and scale per block: 2x as slow).
  const bool grouped = n < w.grouped_rows();
  const int bytes = w.block_bytes();
  const int64_t block_step = grouped ? kQuantRowGroup * bytes : bytes, chunk_step = grouped ? 32 : 4;
  const int64_t scale_step = grouped ? kQuantRowGroup : 1, per_group = w.group / kQuantBlock;
  const uint8_t* block = w.chunk(n, 0, 0);
  const uint16_t* scale = &w.scale(n, 0);
  for (int64_t k = 0, in_group = 0; k < w.Kp; k += kQuantBlock, block += block_step) {
    const Floats s = half_to_float(*scale) - Floats{};
    if (++in_group == per_group) in_group = 0, scale += scale_step;
    uint8_t q[kQuantBlock];
    for (int c = 0; c < bytes / 4; ++c) std::memcpy(q + 4 * c, block + c * chunk_step, 4);
    Floats low, high;
    if (w.bits != 4) {
      int8_t values[kQuantBlock];
      if (w.bits == 6) {
        for (int t = 0; t < kQuantBlock; ++t) values[t] = static_cast<int8_t>(block_weight(q, t, 6));
      } else {
        std::memcpy(values, q, kQuantBlock);
      }
      Bytes q0, q1;
      std::memcpy(&q0, values, 16);
      std::memcpy(&q1, values + 16, 16);
      low = __builtin_convertvector(__builtin_convertvector(q0, Ints), Floats) * s;
      high = __builtin_convertvector(__builtin_convertvector(q1, Ints), Floats) * s;
    } else {
      UBytes b;
      std::memcpy(&b, q, 16);
      const Ints v = __builtin_convertvector(b, Ints);
      low = __builtin_convertvector((v & 15) - 8, Floats) * s;
      high = __builtin_convertvector((v >> 4) - 8, Floats) * s;
    }
    std::memcpy(out + k, &low, sizeof(low));
    std::memcpy(out + k + 16, &high, sizeof(high));
  }
}

namespace {

std::vector<paddle::Tensor> Dequantize(const paddle::Tensor& data, const paddle::Tensor& scales, int64_t K,
                                       int threads) {
  const QuantMatrix w = packed_matrix(data, scales, "ernie_dequantize");
  check_k(w, K, "ernie_dequantize");
  paddle::Tensor out = paddle::empty({w.N, K}, paddle::DataType::FLOAT32, data.place());
  float* to = out.data<float>();
#pragma omp parallel num_threads(std::max(1, threads))
  {
    std::vector<float> row(w.Kp);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < w.N; ++n) {
      if (K == w.Kp) {
        dequantize_row(w, n, to + n * K);
      } else {
        dequantize_row(w, n, row.data());
        std::memcpy(to + n * K, row.data(), K * sizeof(float));
      }
    }
  }
  return {out};
}

std::vector<paddle::Tensor> DequantizeRows(const paddle::Tensor& data, const paddle::Tensor& scales,
                                           const paddle::Tensor& ids_in, int64_t K) {
  const char* op = "ernie_dequantize_rows";
  const QuantMatrix w = packed_matrix(data, scales, op);
  check_k(w, K, op);
  PD_CHECK(ids_in.is_cpu() && ids_in.dtype() == paddle::DataType::INT64, op, ": ids must be int64 on the CPU");
  const paddle::Tensor ids = ids_in.contiguous();
  const int64_t* id = ids.data<int64_t>();
  paddle::Tensor out = paddle::empty({ids.numel(), K}, paddle::DataType::FLOAT32, data.place());
  std::vector<float> row(w.Kp);
  for (int64_t r = 0; r < ids.numel(); ++r) {
    PD_CHECK(id[r] >= 0 && id[r] < w.N, op, ": id ", id[r], " is outside the table's ", w.N, " rows");
    dequantize_row(w, id[r], row.data());
    std::memcpy(out.data<float>() + r * K, row.data(), K * sizeof(float));
  }
  return {out};
}

std::vector<std::vector<int64_t>> DequantizeRowsShape(const std::vector<int64_t>& data,
                                                      const std::vector<int64_t>& scales,
                                                      const std::vector<int64_t>& ids, int64_t K) {
  int64_t n = 1;
  for (int64_t d : ids) n *= d;
  return {{n, K}};
}

std::vector<paddle::DataType> DequantizeRowsDtype(const paddle::DataType& data, const paddle::DataType& scales,
                                                  const paddle::DataType& ids) {
  return {paddle::DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> DequantizeShape(const std::vector<int64_t>& data, const std::vector<int64_t>& scales,
                                                  int64_t K, int threads) {
  return {{data[0], K}};
}

std::vector<paddle::DataType> DequantizeDtype(const paddle::DataType& data, const paddle::DataType& scales) {
  return {paddle::DataType::FLOAT32};
}

constexpr int kScaleCandidates = 8;

// The float16 scale for wint4 / wint6 (q in -levels .. levels - 1) of a group of weights v[0, G) whose
// value of largest magnitude is `extreme`: of s = extreme / -d for the divisors d = levels * (1 + j / 32),
// j = -7 .. 0, the one whose q = clamp(rint(v / s)) leave the least squared error, summed in order in
// float32 (the first of equals; a candidate whose error is not finite, a scale overflowing float16,
// never wins but when all are). d = levels is llama.cpp's Q4_0 rule; d > levels, which clips the
// extreme, gave the demo model a higher KL to float32 (0.035 against 0.032), and d <= levels 0.020.
// Without fused multiply-adds (GCC's attribute, clang's pragma), so that numpy (quant.py) gets the same bits.
__attribute__((optimize("fp-contract=off"))) uint16_t best_scale(const float* v, int64_t G, float extreme,
                                                                  float levels) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  typedef float Candidates __attribute__((vector_size(kScaleCandidates * sizeof(float))));
  uint16_t candidate[kScaleCandidates];
  Candidates s, inverse, error = {};
  for (int c = 0; c < kScaleCandidates; ++c) {
    candidate[c] = float_to_half(extreme / -(levels + (c - 7) * (levels / 32)));
    s[c] = half_to_float(candidate[c]);
    inverse[c] = s[c] == 0.f ? 0.f : 1.f / s[c];
  }
  const Candidates lo = -levels - Candidates{}, hi = levels - 1 - Candidates{};
  for (int64_t i = 0; i < G; ++i) {
    Candidates q = v[i] * inverse;
#if defined(__AVX__)
    q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // rintf's rounding, 8 at a time
#else
    for (int c = 0; c < kScaleCandidates; ++c) q[c] = __builtin_rintf(q[c]);
#endif
    q = q < lo ? lo : (q > hi ? hi : q);
    const Candidates d = v[i] - q * s;
    error += d * d;
  }
  int best = 0;
  for (int c = 0; c < kScaleCandidates; ++c) error[c] = error[c] <= __FLT_MAX__ ? error[c] : __builtin_inff();
  for (int c = 1; c < kScaleCandidates; ++c) best = error[c] < error[best] ? c : best;
  return candidate[best];
}

// One group of weights v[0, G) (zero-padded past K) into its scale and integers, the rules of quant.py:
// wint8 s = max|v| / 127, q = rint(v / s); wint4 and wint6 the scale of best_scale, q = clamp(rint(v / s),
// -8, 7) (-32, 31). s rounds to float16 first and q divides by that.
void quantize_group(const float* v, int64_t G, int bits, int8_t* q, uint16_t* scale) {  // scale: where it goes
  float amax = 0.f, extreme = 0.f;
  for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(v[i]));  // vectorised, unlike one pass for both
  for (int64_t i = 0; i < G && bits != 8; ++i) {
    if (std::fabs(v[i]) == amax) {
      extreme = v[i];
      break;
    }
  }
  const float levels = bits == 8 ? 127.f : 1 << (bits - 1);  // q's most negative value: -levels
  *scale = bits == 8 ? float_to_half(amax / levels) : best_scale(v, G, extreme, levels);
  const float s = half_to_float(*scale), inverse = s == 0.f ? 0.f : 1.f / s;
  const float lo = -levels, hi = bits == 8 ? levels : levels - 1;
  for (int64_t i = 0; i < G; ++i) q[i] = static_cast<int8_t>(std::min(hi, std::max(lo, __builtin_rintf(v[i] * inverse))));
}

template <typename T>
float widened(T v) {
  if constexpr (sizeof(T) == 2) return to_float(v);  // bfloat16 bits
  else return v;
}

template <typename T>
void gather(const T* src, int64_t stride, int64_t count, float* v) {
  if (stride == 1) {  // vectorised
    for (int64_t i = 0; i < count; ++i) v[i] = widened(src[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) v[i] = widened(src[i * stride]);
  }
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int ernie_quantize(
    const void* src, int src_is_bf16, int64_t N, int64_t K, int64_t row_stride, int64_t col_stride, int64_t group,
    int bits, void* data, uint16_t* scales, int threads) {
  if ((bits != 8 && bits != 6 && bits != 4) || group <= 0 || group % kQuantBlock != 0 || (bits == 6 && group != kQuantBlock))
    return 1;
  const int64_t groups = (K + group - 1) / group, Kp = groups * group;
  const QuantMatrix layout{static_cast<uint8_t*>(data), scales, N, Kp, group, bits};
#pragma omp parallel num_threads(std::max(1, threads))
  {
    std::vector<float> v(group);
    std::vector<int8_t> q(group);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group, count = std::min(group, K - k0);
        const int64_t at = n * row_stride + k0 * col_stride;
        if (src_is_bf16) gather(static_cast<const uint16_t*>(src) + at, col_stride, count, v.data());
        else gather(static_cast<const float*>(src) + at, col_stride, count, v.data());
        std::fill(v.begin() + count, v.end(), 0.f);
        quantize_group(v.data(), group, bits, q.data(), const_cast<uint16_t*>(&layout.scale(n, g)));
        for (int64_t b = 0; b < group; b += kQuantBlock) {
          uint8_t bytes[kQuantBlock];
          pack_block(q.data() + b, bits, bytes);
          for (int c = 0; c < layout.block_bytes() / 4; ++c)
            std::memcpy(const_cast<uint8_t*>(layout.chunk(n, (k0 + b) / kQuantBlock, c)), bytes + 4 * c, 4);
        }
      }
    }
  }
  return 0;
}

PD_BUILD_OP(ernie_quant_matmul)
    .Inputs({"X", "Data", "Scales"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(QuantMatmul))
    .SetInferShapeFn(PD_INFER_SHAPE(QuantMatmulShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(QuantMatmulDtype));

PD_BUILD_OP(ernie_dequantize_rows)
    .Inputs({"Data", "Scales", "Ids"})
    .Outputs({"Out"})
    .Attrs({"K: int64_t"})
    .SetKernelFn(PD_KERNEL(DequantizeRows))
    .SetInferShapeFn(PD_INFER_SHAPE(DequantizeRowsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DequantizeRowsDtype));

PD_BUILD_OP(ernie_dequantize)
    .Inputs({"Data", "Scales"})
    .Outputs({"Out"})
    .Attrs({"K: int64_t", "threads: int"})
    .SetKernelFn(PD_KERNEL(Dequantize))
    .SetInferShapeFn(PD_INFER_SHAPE(DequantizeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DequantizeDtype));
