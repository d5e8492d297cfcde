// Fused per-layer CPU ops for the decoder: RMSNorm (+ residual add), RoPE + KV-cache write, SiLU-and-multiply,
// and the whole-step decode_layers. Each replaces a chain of torch ops (one parallel region and one pass over memory
// instead of several) and rounds to the tensor dtype exactly where the unfused torch/transformers code does, so bf16
// results follow the same rounding steps and float32 results are unchanged up to summation order.

// torch's own SIMD vector types (its Sleef exp), so SiLU rounds like F.silu; they must see the capability macros
// before any other torch header.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ts_silu.h"
#include "vec.h"

namespace {

using namespace tierserve_vec;  // NOLINT

// Round through the storage dtype (a no-op for float32), as a torch op producing that dtype would.
template <typename T>
inline float rnd(float x) {
  return f32(static_cast<T>(x));
}

// ---------------------------------------------------------------------------------------------------------------
// The sum torch computes for x.sum(-1) over a contiguous float row (ATen's cpu SumKernel: cascade_sum ->
// vectorized_inner_sum -> row_sum -> multi_row_sum), in its order, so the fp32 result is torch's bit for bit: the
// row as vectors of V lanes, the vectors in 4 interleaved accumulators, each a cascade of up to 4 levels that flush
// every 2^p vectors (p >= 4); then the accumulators added in order, the leftover scalars summed from 0, then the
// lanes added one by one. V = 8: torch's sum kernel is not registered for its AVX-512 dispatch, so it runs the AVX2
// build (8-float vectors) on AVX-512 CPUs too (and its default build has 32-byte vectors as well) - measured, and
// checked by tests/kernels/test_fused_ops.py against torch on the machine that runs them.
inline int64_t ceil_log2(int64_t x) {
  return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

template <int V>
float torch_row_sum(const float* a, int64_t n) {
  constexpr int kLevels = 4, kIlp = 4;
  const int64_t vec_size = n / V, size = vec_size / kIlp;
  float acc[kLevels][kIlp][V] = {};
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < V; ++l) acc[0][k][l] += a[(i * kIlp + k) * V + l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < V; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < V; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t e = size * kIlp; e < vec_size; ++e)
    for (int l = 0; l < V; ++l) acc[0][0][l] += a[e * V + l];
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < V; ++l) acc[0][0][l] += acc[0][k][l];
  float fin = 0.f;
  for (int64_t e = vec_size * V; e < n; ++e) fin += a[e];
  for (int l = 0; l < V; ++l) fin += acc[0][0][l];
  return fin;
}

constexpr int kTorchSumLanes = 8;

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm as in transformers' LlamaRMSNorm: h = w * to_dtype(x_f32 * rsqrt(mean(x_f32^2) + eps)), the mean as torch
// takes it (its sum, in its order, then / n), so bf16 outputs are transformers' bit for bit.
// With `delta`, first x += delta in place (the residual add, rounded to the dtype), then the norm of the new x.
template <typename T>
void rms_rows(T* x, const T* delta, const T* w, T* h, int64_t rows, int64_t n, int64_t x_stride, int64_t d_stride,
              float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t rb, int64_t re) {
    std::vector<float> sq(static_cast<size_t>(n));
    for (int64_t r = rb; r < re; ++r) {
      T* xr = x + r * x_stride;
      if (delta) {
        const T* dr = delta + r * d_stride;
        for (int64_t i = 0; i < n; ++i) xr[i] = static_cast<T>(f32(xr[i]) + f32(dr[i]));
      }
      for (int64_t i = 0; i < n; ++i) sq[i] = f32(xr[i]) * f32(xr[i]);
      const float ss = torch_row_sum<kTorchSumLanes>(sq.data(), n);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      T* hr = h + r * n;
      for (int64_t i = 0; i < n; ++i) hr[i] = static_cast<T>(f32(w[i]) * rnd<T>(f32(xr[i]) * inv));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& w,
                       double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm: x [T, n] with unit inner stride, w [n]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: dtypes differ");
  auto h = torch::empty({x.size(0), x.size(1)}, x.options());
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) {
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 && delta->scalar_type() == x.scalar_type(),
                "rms_norm: delta must match x");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), has_delta ? delta->data_ptr<scalar_t>() : nullptr,
                       w.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0),
                       has_delta ? delta->stride(0) : 0, static_cast<float>(eps));
  });
  return h;
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE (rotate-half form) in place on the q and k parts of a fused qkv [T, (H + 2 Hkv) * D], as transformers
// computes it in the dtype: x*cos + rotate_half(x)*sin, each product and the sum rounded. Then k and v are written to
// the paged cache [2, Hkv, num_blocks * block_size (flat), D] at slot_mapping[t].
void rope_and_cache(torch::Tensor qkv, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache,
                    const torch::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rope_and_cache: qkv [T, (H+2Hkv)*D]");
  const int64_t T = qkv.size(0);
  const int64_t D = cos.size(1), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && D <= 1024, "rope_and_cache: head_dim must be even and at most 1024");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * D, "rope_and_cache: qkv width disagrees with heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == T && sin.sizes() == cos.sizes(),
              "rope_and_cache: cos/sin [T, D]");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 5 && cache.size(1) == num_kv_heads && cache.size(4) == D,
              "rope_and_cache: cache [2, Hkv, NB, bs, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "rope_and_cache: int64 slot per token");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == cache.scalar_type(),
              "rope_and_cache: dtypes differ");
  const int64_t flat = cache.size(2) * cache.size(3);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < flat, "rope_and_cache: slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache", [&] {
    using T_ = scalar_t;
    T_* base = qkv.data_ptr<T_>();
    const T_* cp = cos.data_ptr<T_>();
    const T_* snp = sin.data_ptr<T_>();
    T_* kc = cache.data_ptr<T_>();
    T_* vc = kc + num_kv_heads * flat * D;
    const int64_t row = qkv.stride(0);
    at::parallel_for(0, T, 4, [&](int64_t tb, int64_t te) {
      float tmp[1024];
      for (int64_t t = tb; t < te; ++t) {
        T_* r = base + t * row;
        const T_* c = cp + t * D;
        const T_* s = snp + t * D;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          T_* x = r + h * D;
#ifdef TS_AVX512_BF16
          if constexpr (std::is_same_v<T_, at::BFloat16>) {
            if (half % 16 == 0) {  // the same roundings, 16 lanes at a time (both halves read before either is written)
              auto rv = [](__m512 v) { return bf16x16_to_f32(to_bf16(v)); };
              auto* xb = reinterpret_cast<at::BFloat16*>(x);
              const auto* cb = reinterpret_cast<const at::BFloat16*>(c);
              const auto* sb = reinterpret_cast<const at::BFloat16*>(s);
              const __m512 neg = _mm512_set1_ps(-0.f);
              for (int64_t i = 0; i < half; i += 16) {
                const __m512 x0 = load16_bf16(xb + i), x1 = load16_bf16(xb + half + i);
                const __m512 o0 = _mm512_add_ps(rv(_mm512_mul_ps(x0, load16_bf16(cb + i))),
                                                rv(_mm512_mul_ps(_mm512_xor_ps(x1, neg), load16_bf16(sb + i))));
                const __m512 o1 = _mm512_add_ps(rv(_mm512_mul_ps(x1, load16_bf16(cb + half + i))),
                                                rv(_mm512_mul_ps(x0, load16_bf16(sb + half + i))));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + i), to_bf16(o0));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + half + i), to_bf16(o1));
              }
              continue;
            }
          }
#endif
          for (int64_t i = 0; i < D; ++i) {
            const float rot = i < half ? -f32(x[i + half]) : f32(x[i - half]);
            tmp[i] = rnd<T_>(rnd<T_>(f32(x[i]) * f32(c[i])) + rnd<T_>(rot * f32(s[i])));
          }
          for (int64_t i = 0; i < D; ++i) x[i] = static_cast<T_>(tmp[i]);
        }
        const int64_t slot = sp[t];
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          std::memcpy(kc + (h * flat + slot) * D, r + (num_heads + h) * D, D * sizeof(T_));
          std::memcpy(vc + (h * flat + slot) * D, r + (num_heads + num_kv_heads + h) * D, D * sizeof(T_));
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU: gu [T, 2I] -> silu(gate) * up [T, I], with the rounding of F.silu(g) * u in the dtype.

torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0 && gu.stride(1) == 1, "silu_mul: gu [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gu.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t row = gu.stride(0);
    at::parallel_for(0, T, std::max<int64_t>(1, 2048 / std::max<int64_t>(I, 1)), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const scalar_t* gr = g + t * row;
        const scalar_t* ur = gr + I;
        scalar_t* orow = o + t * I;
        int64_t i = 0;
#ifdef TS_AVX512_BF16
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          for (; i + 16 <= I; i += 16) {
            const auto* gb = reinterpret_cast<const at::BFloat16*>(gr + i);
            const auto* ub = reinterpret_cast<const at::BFloat16*>(ur + i);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + i), silu_mul16(load16_bf16(gb), load16_bf16(ub)));
          }
        }
#endif
#ifdef TS_AVX2_FMA
        if constexpr (std::is_same_v<scalar_t, float>) {  // float32: g / (1 + exp(-g)) * u, 8 lanes at a time
          for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(reinterpret_cast<const float*>(gr + i));
            const __m256 e = tierserve_vec::exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 sv = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(reinterpret_cast<float*>(orow + i),
                             _mm256_mul_ps(sv, _mm256_loadu_ps(reinterpret_cast<const float*>(ur + i))));
          }
        }
#endif
        for (; i < I; ++i) {
          const float gv = f32(gr[i]);
          const float s = rnd<scalar_t>(gv / (1.f + std::exp(-gv)));
          orow[i] = static_cast<scalar_t>(s * f32(ur[i]));
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Greedy sampling: the index of each row's maximum, as torch's max(dim=-1).indices on the float32 logits gives it -
// the first of equal maxima, a NaN counting as the maximum (the first NaN) - read straight from the model's
// bf16 (or float32) logits: torch's reduction took ~2.5 ms for [64, 49152] and the float copy before it ~0.7 ms; this
// reads the bf16 row once at vector width (~0.25 ms; a 64-sequence decode step took 0.89-0.96x the time, BENCHMARKS.md).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t i = 0, best = 0;
  float bv = -std::numeric_limits<float>::infinity();
  bool seen = false;
#ifdef TS_AVX512_BF16
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>) {
    if (n >= 16) {
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                       15);
      const __m512i step = _mm512_set1_epi32(16);
      __mmask16 nan = 0;
      for (; i + 16 <= n; i += 16) {
        __m512 v;
        if constexpr (std::is_same_v<T, float>) {
          v = _mm512_loadu_ps(x + i);
        } else {
          v = tierserve_vec::load16_bf16(x + i);
        }
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strictly greater: each lane keeps its first
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        cur = _mm512_add_epi32(cur, step);
      }
      if (nan) {  // rare: find the first NaN the plain way
        for (int64_t j = 0; j < n; ++j)
          if (std::isnan(tierserve_vec::f32(x[j]))) return j;
      }
      alignas(64) float mv[16];
      alignas(64) int32_t iv[16];
      _mm512_store_ps(mv, vmax);
      _mm512_store_si512(iv, vidx);
      for (int l = 0; l < 16; ++l) {
        // lanes hold the first maximum of their own positions (a lane that never rose above -inf holds index 0 and
        // -inf: it only wins when the whole row is -inf, where index 0 is the right answer)
        if (!seen || mv[l] > bv || (mv[l] == bv && iv[l] < best)) {
          bv = mv[l];
          best = iv[l];
          seen = true;
        }
      }
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = tierserve_vec::f32(x[i]);
    if (std::isnan(v)) return i;  // the vector part had none (it returned its first), nor had the tail before i
    if (!seen || v > bv) {
      bv = v;
      best = i;
      seen = true;
    }
  }
  return best;
}

torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: logits [rows, vocab] with vocab > 0");
  TORCH_CHECK(logits.device().is_cpu(), "argmax_rows: CPU tensors only");
  const torch::Tensor x = logits.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  auto out = torch::empty({m}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_rows", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) o[r] = argmax_row<scalar_t>(p + r * n, n);
    });
  });
  return out;
}

}  // namespace

torch::Tensor ts_paged_decode(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables,
                              const torch::Tensor& seq_lens, double scale);  // paged_attention.cpp
torch::Tensor linear_vnni(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                          int64_t k_chunk, int64_t lead_rows, int64_t lead_k_chunk, bool swiglu);
torch::Tensor linear_amx(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                         int64_t k_chunk, bool swiglu, const c10::optional<torch::Tensor>& out);  // linear_amx.cpp

// Every decoder layer of a decode-only bf16 step in one call: the same kernels, in the same order and with the same
// rounding, as the per-op loop of LlamaForCausalLM._forward_fused, without a Python round trip (and a GIL hand-over)
// for each of the ~9 ops of each layer. `weights` holds 6 tensors per layer (input_norm, qkv, o_proj, post_norm,
// gate_up, down; the four projections packed by pack_vnni - with amx or swiglu, gate_up interleaved by
// interleave_gate_up and SiLU-and-multiply the projection's epilogue),
// `qkv_bias` one per layer or none, `k_chunks` the K chunk
// of each projection (4 per layer, linear_vnni's k_chunk; empty: none). x (the residual stream) is updated in place;
// returns the last layer's output delta (x + delta is the stream after the last layer).
torch::Tensor decode_layers(torch::Tensor x, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& qkv_bias, const std::vector<int64_t>& k_chunks,
                            const std::vector<torch::Tensor>& caches,
                            const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                            const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                            double eps, int64_t num_heads, int64_t num_kv_heads, bool amx, bool swiglu) {
  const int64_t L = static_cast<int64_t>(caches.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(weights.size()) == 6 * L,
              "decode_layers: 6 weights per layer and one cache per layer");
  TORCH_CHECK(qkv_bias.empty() || static_cast<int64_t>(qkv_bias.size()) == L, "decode_layers: one qkv bias per layer");
  TORCH_CHECK(k_chunks.empty() || static_cast<int64_t>(k_chunks.size()) == 4 * L,
              "decode_layers: 4 k chunks per layer or none");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: contiguous x [T, hidden]");
  const int64_t T = x.size(0), D = cos.size(1), q_size = num_heads * D;
  c10::optional<torch::Tensor> delta;
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = weights.data() + 6 * l;
    c10::optional<torch::Tensor> bias;
    if (!qkv_bias.empty()) bias = qkv_bias[l];
    const int64_t* kc = k_chunks.empty() ? nullptr : k_chunks.data() + 4 * l;
    auto chunk = [kc](int i) -> int64_t { return kc ? kc[i] : 0; };
    // the projections on AMX tiles where the caller asks (same packed weights, same K chunks)
    auto linear = [amx](const torch::Tensor& in, const torch::Tensor& wp, const c10::optional<torch::Tensor>& b,
                        int64_t k_chunk) {
      return amx ? linear_amx(in, wp, b, k_chunk, false, c10::nullopt) : linear_vnni(in, wp, b, k_chunk, 0, 0, false);
    };
    torch::Tensor h = rms_norm(x, delta, w[0], eps);
    torch::Tensor qkv = linear(h, w[1], bias, chunk(0));
    rope_and_cache(qkv, cos, sin, caches[l], slots, num_heads, num_kv_heads);
    torch::Tensor a = ts_paged_decode(qkv.narrow(1, 0, q_size).view({T, num_heads, D}), caches[l], block_tables,
                                      seq_lens, scale);
    delta = linear(a.view({T, q_size}), w[2], c10::nullopt, chunk(1));
    h = rms_norm(x, delta, w[3], eps);
    // on AMX (and with swiglu) the gate/up weight comes interleaved (gate and up block i side by side) and
    // SiLU-and-multiply is the projection's epilogue
    torch::Tensor act = amx      ? linear_amx(h, w[4], c10::nullopt, chunk(2), true, c10::nullopt)
                        : swiglu ? linear_vnni(h, w[4], c10::nullopt, chunk(2), 0, 0, true)
                                 : silu_mul(linear(h, w[4], c10::nullopt, chunk(2)));
    delta = linear(act, w[5], c10::nullopt, chunk(3));
  }
  return *delta;
}

void register_fused_ops(pybind11::module& m) {
  // The GIL is released while a kernel runs (as torch's own ops do), so the server's event loop is not stalled.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after an in-place residual add x += delta", pybind11::arg("x"),
        pybind11::arg("delta"), pybind11::arg("w"), pybind11::arg("eps"), release());
  m.def("rope_and_cache", &rope_and_cache, "RoPE in place on fused qkv, then k/v written to the paged cache",
        release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection", release());
  m.def("argmax_rows", &argmax_rows, "index of each row's maximum (first of equal maxima; a NaN counts as the "
        "maximum), as torch's max(dim=-1).indices on float32 gives it", release());
  m.def("decode_layers", &decode_layers, "all decoder layers of a bf16 decode step in one call (amx: the projections "
        "on AMX tiles)", pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("qkv_bias"),
        pybind11::arg("k_chunks"), pybind11::arg("caches"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("slots"), pybind11::arg("block_tables"), pybind11::arg("seq_lens"), pybind11::arg("scale"),
        pybind11::arg("eps"), pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"), pybind11::arg("amx") = false,
        pybind11::arg("swiglu") = false, release());
}
