// A Paddle custom operator for attention on the CPU, with the KV cache.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "dot.h"
#include "kernels.h"
#include "vec.h"

namespace {

using namespace ernie;

// x rotated by RoPE: pairs (2i, 2i+1), sin negated on even channels.
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  for (int64_t i = 0; i < D; i += 2) {
    out[i] = x[i] * cos[i] + x[i + 1] * sin[i];
    out[i + 1] = x[i + 1] * cos[i + 1] + x[i] * sin[i + 1];
  }
}

// softmax(p[0..last]) in place, a vector at a time (p has room for a whole last vector). A row with
// every key at -inf (no key to attend to) becomes zeros, not NaN. The total's lanes are added as sum()
// does, a tree of halves: a row's keys give the same bits at any offset in the cache (which rotates the
// lanes), after left padding or in a serving slot.
void softmax(float* p, int64_t last) {
  const int64_t n = last + 1, whole = n / kLanes * kLanes;
  Vec top_lanes = Vec{} - INFINITY;
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Vec v = load(p + j);
    top_lanes = v > top_lanes ? v : top_lanes;
  }
  float top = -INFINITY;
  for (int i = 0; i < kLanes; ++i) top = std::max(top, top_lanes[i]);
  for (int64_t j = whole; j < n; ++j) top = std::max(top, p[j]);
  if (top == -INFINITY) {
    std::fill(p, p + n, 0.f);
    return;
  }
  std::fill(p + n, p + whole + kLanes, -INFINITY);  // the last vector's padding: exp gives 0
  Vec total_lanes = {};
  for (int64_t j = 0; j < n; j += kLanes) {
    const Vec e = exp(load(p + j) - top);
    store(p + j, e);
    total_lanes += e;
  }
  const float total = sum(total_lanes);
  for (int64_t j = 0; j < n; j += kLanes) store(p + j, load(p + j) / total);
}

// out[i, :] = sum over keys j < n of p[i * ldp + j] * v[j, :] for XR query rows i: two vectors of D
// at a time, whose XR x 2 sums stay in registers while the values stream past once for all XR rows.
template <int XR>
void weigh_values(const float* p, int64_t ldp, const float* v_rows, int64_t n, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 2 * kLanes <= D; d += 2 * kLanes) {
    Vec a[XR] = {}, b[XR] = {};
    for (int64_t j = 0; j < n; ++j) {
      const Vec v0 = in_register(load(v_rows + j * D + d)), v1 = in_register(load(v_rows + j * D + d + kLanes));
      for (int i = 0; i < XR; ++i) {
        const Vec pi = splat(p[i * ldp + j]);
        a[i] = madd(pi, v0, a[i]);
        b[i] = madd(pi, v1, b[i]);
      }
    }
    for (int i = 0; i < XR; ++i) store(out + i * D + d, a[i]), store(out + i * D + d + kLanes, b[i]);
  }
  if (d < D) {  // one vector left
    Vec a[XR] = {};
    for (int64_t j = 0; j < n; ++j) {
      const Vec v0 = load(v_rows + j * D + d);
      for (int i = 0; i < XR; ++i) a[i] = madd(p[i * ldp + j], v0, a[i]);
    }
    for (int i = 0; i < XR; ++i) store(out + i * D + d, a[i]);
  }
}

// XR query heads that share a kv head (already rotated and scaled, rows of q) against its keys
// 0..last: scores into the rows of p, output rows into out (heads adjacent). Taking the heads of a
// group together reads each cached key and value once for all of them instead of once per head
// (from L2 when prefilling: 1.3-1.4x faster there). Needs D a multiple of kLanes.
template <int XR>
void attend_heads(const float* q, const float* k_rows, const float* v_rows, const float* mask, int64_t last,
                  float* p, int64_t ldp, float* out, int64_t D) {
  const int64_t n = last + 1;
  int64_t j = 0;
  for (; j + kTileRows <= n; j += kTileRows) dot_rows<kTileRows>(q, k_rows + j * D, p + j, XR, D, ldp, false);
  for (; j < n; ++j) dot_rows<1>(q, k_rows + j * D, p + j, XR, D, ldp, false);
  for (int i = 0; i < XR; ++i) {
    float* row = p + i * ldp;
    for (j = 0; j < n; ++j) row[j] += mask[j];
    softmax(row, last);
  }
  weigh_values<XR>(p, ldp, v_rows, n, D, out);
}

void attend_any(const float* q, const float* k_rows, const float* v_rows, const float* mask, int64_t last, float* p,
                float* out, int64_t D) {
  for (int64_t j = 0; j <= last; ++j) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < D; ++i) dot += q[i] * k_rows[j * D + i];
    p[j] = dot + mask[j];
  }
  softmax(p, last);
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j <= last; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) out[i] += p[j] * v_rows[j * D + i];
  }
}

}  // namespace

// Attention of T new tokens per row (a prompt, or one decoding step) over the KV cache: RoPE on the
// new queries and keys, the new keys and values written into the cache at start..start+T-1, then for
// the query at start+t, softmax(q k^T * scale + mask) v over cache positions 0..start+t: causal, the
// later keys are not read whatever the mask says. Replaces ~20 small Paddle ops per layer when
// decoding, and the full T x T score matrix (half of it masked) when prefilling.
//   qkv [B, T, (H + 2 KV) * D] as the fused projection gives it ([Q | K | V], head-major)
//   cos, sin [B, T, D]: RoPE at each token's position, sin negated on even channels (interleaved pairs)
//   keys, values [B, KV, L, D]: the cache, written in place
//   mask [B, T, S] additive, S >= start + T: key j of the query at start + t is masked by mask[b, t, j]
//   returns [B, T, H * D]
void ernie::attention(const float* x, const float* c, const float* s, float* k_cache, float* v_cache, const float* m,
                      const AttentionShape& shape, int64_t start, float scale, float* y, int threads) {
  const int64_t B = shape.B, T = shape.T, H = shape.H, KV = shape.KV, D = shape.D, L = shape.L, S = shape.S;
  const int64_t G = H / KV, row = (H + 2 * KV) * D;
  threads = std::max(1, threads);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * KV * T; ++task) {  // the new keys and values into the cache
      const int64_t b = task / (KV * T), g = task / T % KV, t = task % T;
      const float* token = x + (b * T + t) * row;
      const int64_t at = ((b * KV + g) * L + start + t) * D;
      rope(token + (H + g) * D, c + (b * T + t) * D, s + (b * T + t) * D, k_cache + at, D);
      std::memcpy(v_cache + at, token + (H + KV + g) * D, D * sizeof(float));
    }
    // Query heads in blocks of at most 4 (the dot tiles' rows) of one kv head's group, of near-equal
    // sizes, and into at least as many tasks as threads where the group allows.
    const int64_t wanted = std::min(G, std::max((G + 3) / 4, (threads + B * KV - 1) / (B * KV)));
    const int64_t per_block = (G + wanted - 1) / wanted, blocks = (G + per_block - 1) / per_block;
    const int64_t ldp = start + T + kLanes;  // softmax's padding
    std::vector<float> q(per_block * D), p(per_block * ldp);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * KV * blocks; ++task) {
      const int64_t b = task / (KV * blocks), g = task / blocks % KV, h0 = g * G + task % blocks * per_block;
      const int64_t rows = std::min(per_block, (g + 1) * G - h0);
      const float* k_rows = k_cache + (b * KV + g) * L * D;
      const float* v_rows = v_cache + (b * KV + g) * L * D;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < rows; ++i) {
          float* qi = q.data() + i * D;
          rope(x + (b * T + t) * row + (h0 + i) * D, c + (b * T + t) * D, s + (b * T + t) * D, qi, D);
          for (int64_t d = 0; d < D; ++d) qi[d] *= scale;
        }
        const int64_t last = start + t;
        float* yh = y + (b * T + t) * H * D + h0 * D;
        const float* mask_row = m + (b * T + t) * S;
        switch (D % kLanes == 0 ? rows : 0) {
          case 4: attend_heads<4>(q.data(), k_rows, v_rows, mask_row, last, p.data(), ldp, yh, D); break;
          case 3: attend_heads<3>(q.data(), k_rows, v_rows, mask_row, last, p.data(), ldp, yh, D); break;
          case 2: attend_heads<2>(q.data(), k_rows, v_rows, mask_row, last, p.data(), ldp, yh, D); break;
          case 1: attend_heads<1>(q.data(), k_rows, v_rows, mask_row, last, p.data(), ldp, yh, D); break;
          default:
            for (int64_t i = 0; i < rows; ++i)
              attend_any(q.data() + i * D, k_rows, v_rows, mask_row, last, p.data(), yh + i * D, D);
        }
      }
    }
  }
}

ernie::AttentionShape ernie::attention_shape(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                             const paddle::Tensor& sin, const paddle::Tensor& keys,
                                             const paddle::Tensor& values, const paddle::Tensor& mask, int64_t start,
                                             int64_t heads, const char* op) {
  for (const paddle::Tensor* t : {&qkv, &cos, &sin, &mask, &keys, &values})
    PD_CHECK(t->is_cpu() && t->dtype() == paddle::DataType::FLOAT32, op, ": float32 CPU tensors only");
  PD_CHECK(keys.shape() == values.shape() && keys.shape().size() == 4, op, ": the cache must be two [B, KV, L, D] tensors");
  const std::vector<int64_t> cs = keys.shape();
  const int64_t B = cs[0], KV = cs[1], L = cs[2], D = cs[3], H = heads;
  PD_CHECK(KV > 0 && H % KV == 0, op, ": heads must be a multiple of the cache's kv heads");
  const int64_t T = B == 0 ? 0 : qkv.numel() / (B * (H + 2 * KV) * D), S = mask.shape().back();
  PD_CHECK(qkv.numel() == B * T * (H + 2 * KV) * D && mask.numel() == B * T * S && start >= 0 && start + T <= L &&
               start + T <= S && cos.numel() == B * T * D && sin.numel() == B * T * D,
           op, ": shapes do not match the cache");
  return {B, T, H, KV, D, L, S};
}

void ernie::rotation(const int64_t* positions, int64_t M, const float* freqs, int64_t D, float ratio, float* cos,
                     float* sin) {
  for (int64_t m = 0; m < M; ++m) {
    float p = static_cast<float>(positions[m]);
    if (ratio != 1.f) p = p / ratio;
    for (int64_t d = 0; d < D; ++d) {
      const float angle = p * freqs[d];
      cos[m * D + d] = std::cos(angle);
      sin[m * D + d] = d % 2 == 0 ? -std::sin(angle) : std::sin(angle);
    }
  }
}

namespace {

std::vector<paddle::Tensor> Rotation(const paddle::Tensor& positions_in, const paddle::Tensor& freqs, float ratio) {
  const char* op = "ernie_rotation";
  PD_CHECK(positions_in.is_cpu() && positions_in.dtype() == paddle::DataType::INT64 && freqs.is_cpu() &&
               freqs.dtype() == paddle::DataType::FLOAT32 && freqs.is_contiguous() && freqs.shape().size() == 1, op,
           ": positions must be int64 and freqs float32 [D], on the CPU");
  const paddle::Tensor positions = positions_in.contiguous();
  std::vector<int64_t> shape = positions.shape();
  shape.insert(shape.end(), {1, freqs.numel()});
  paddle::Tensor cos = paddle::empty(shape, paddle::DataType::FLOAT32, freqs.place());
  paddle::Tensor sin = paddle::empty(shape, paddle::DataType::FLOAT32, freqs.place());
  rotation(positions.data<int64_t>(), positions.numel(), freqs.data<float>(), freqs.numel(), ratio, cos.data<float>(),
           sin.data<float>());
  return {cos, sin};
}

std::vector<paddle::Tensor> CpuAttention(const paddle::Tensor& qkv_in, const paddle::Tensor& cos_in,
                                         const paddle::Tensor& sin_in, paddle::Tensor& keys, paddle::Tensor& values,
                                         const paddle::Tensor& mask_in, int start, int heads, float scale,
                                         int threads) {
  const paddle::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous(),
                       mask = mask_in.contiguous();
  const AttentionShape shape = attention_shape(qkv, cos, sin, keys, values, mask, start, heads, "ernie_cpu_attention");
  paddle::Tensor out = paddle::empty({shape.B, shape.T, shape.H * shape.D}, paddle::DataType::FLOAT32, qkv.place());
  attention(qkv.data<float>(), cos.data<float>(), sin.data<float>(), keys.data<float>(), values.data<float>(),
            mask.data<float>(), shape, start, scale, out.data<float>(), threads);
  return {out};
}

}  // namespace

PD_BUILD_OP(ernie_cpu_attention)
    .Inputs({"QKV", "Cos", "Sin", "Keys", "Values", "Mask"})
    .Outputs({"Out", "KeysOut", "ValuesOut"})
    .SetInplaceMap({{"Keys", "KeysOut"}, {"Values", "ValuesOut"}})
    .Attrs({"start: int", "heads: int", "scale: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(CpuAttention));

PD_BUILD_OP(ernie_rotation)
    .Inputs({"Positions", "Freqs"})
    .Outputs({"Cos", "Sin"})
    .Attrs({"ratio: float"})
    .SetKernelFn(PD_KERNEL(Rotation));
