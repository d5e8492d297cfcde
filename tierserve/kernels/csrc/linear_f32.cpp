// float32 linear layers for CPUs without native bf16 (AVX2 + FMA: AMD Zen 2/3, older Xeons), where the engine computes
// in float32. torch's F.linear goes to MKL there, and on AMD CPUs MKL runs its generic ("def") code for the GEMV of a
// one-token decode step (a decode token took ~2.8x its bandwidth roofline on the Zen 3 measured) and repacks the
// weight on every call of a small GEMM. Here the weights are packed once at load so that each block of 16 output
// features reads 16 contiguous floats per input feature: one ymm pair of weights serves every row of x (the row's
// input broadcast), each output lane accumulates its own dot product in k order with FMA, and the weights stream
// from memory once per call.
//
// Packed layout: [N / 16, K, 16] float32.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "screen.h"
#include "tile_f32.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TS_AVX2_FMA 1
#endif

namespace {

using tierserve_f32::kBlock;

#ifdef TS_AVX2_FMA
using tierserve_f32::tile_rows;

// One row against two blocks at once: four independent FMA chains, so a decode step's GEMV is bound by the weight
// stream rather than by the FMA latency of two chains.
inline void tile_1x2(const float* x, const float* wb0, const float* wb1, int64_t K, const float* bias, float* y) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xb = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wb0 + k * kBlock), a0);
    a1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wb0 + k * kBlock + 8), a1);
    a2 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wb1 + k * kBlock), a2);
    a3 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(wb1 + k * kBlock + 8), a3);
  }
  if (bias) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(bias));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(bias + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(bias + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(bias + 24));
  }
  _mm256_storeu_ps(y, a0);
  _mm256_storeu_ps(y + 8, a1);
  _mm256_storeu_ps(y + 16, a2);
  _mm256_storeu_ps(y + 24, a3);
}

#endif

}  // namespace

// w [N, K] float32 -> packed [N / 16, K, 16]. N must be a multiple of 16.
torch::Tensor pack_f32(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_f32: w must be [N, K] float32");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kBlock == 0 && N > 0 && K > 0, "pack_f32: N must be a positive multiple of 16");
  return w.contiguous().view({N / kBlock, kBlock, K}).permute({0, 2, 1}).contiguous();
}

// y [M, N] = x [M, K] @ w^T (+ bias), w given packed by pack_f32; float32 in and out. Every output sums its k in
// order (one FMA each), whatever M and the thread count.
torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "linear_f32: x must be [M, K] float32");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kBlock && wp.is_contiguous() && wp.scalar_type() == at::kFloat,
              "linear_f32: weight must come from pack_f32");
  const int64_t M = x.size(0), K = x.size(1), NBLK = wp.size(0), N = NBLK * kBlock;
  TORCH_CHECK(wp.size(1) == K, "linear_f32: x has ", K, " features, the packed weight ", wp.size(1));
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xc = x.contiguous();
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_f32: bias must have ", N, " elements");
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const float* xp = xc.data_ptr<float>();
  const float* w = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t block_elems = K * kBlock;
#ifdef TS_AVX2_FMA
  if (M == 1) {
    // pairs of blocks per work item (a single row: the weight stream is the cost)
    const int64_t pairs = (NBLK + 1) / 2;
    tierserve_par::dynamic_for(pairs, 4, [&](auto each) {
      each([&](int64_t pb, int64_t pe) {
        for (int64_t p = pb; p < pe; ++p) {
          const int64_t b = 2 * p;
          const float* bb = bp ? bp + b * kBlock : nullptr;
          if (b + 1 < NBLK) {
            tile_1x2(xp, w + b * block_elems, w + (b + 1) * block_elems, K, bb, yp + b * kBlock);
          } else {
            tile_rows(xp, 0, 1, w + b * block_elems, K, bb, yp + b * kBlock, N);
          }
        }
      });
    });
    return y;
  }
  // One 16-output block per work item; within it all rows of x, up to 6 at a time, so the block's weights (K * 64 bytes)
  // come from memory once and from L1/L2 for the later row tiles. Tall x: rows in slabs of ~256 KiB, so a slab of x
  // stays in L2 (512 KiB per core on the Zen 3) while the blocks pass.
  const int64_t kSlab = std::max<int64_t>(6, (256 * 1024 / (K * 4)) / 6 * 6);
  for (int64_t s0 = 0; s0 < M; s0 += kSlab) {
    const int64_t s1 = std::min(M, s0 + kSlab);
    tierserve_par::dynamic_for(NBLK, 1, [&](auto each) {
      each([&](int64_t bb0, int64_t be) {
        for (int64_t b = bb0; b < be; ++b) {
          const float* wb = w + b * block_elems;
          const float* bb = bp ? bp + b * kBlock : nullptr;
          // ceil(rows / 6) tiles with the rows spread evenly (16 rows: 6 + 5 + 5, where 6 + 6 + 4 padded to 18
          // would compute two rows for nothing; with >= 4 rows a tile has the 8 FMA chains the latency needs)
          const int64_t rows = s1 - s0, tiles = (rows + 5) / 6;
          for (int64_t i = 0, m0 = s0; i < tiles; ++i) {
            const int64_t mr = rows / tiles + (i < rows % tiles ? 1 : 0);
            tile_rows(xp, m0, mr, wb, K, bb, yp + m0 * N + b * kBlock, N);
            m0 += mr;
          }
        }
      });
    });
  }
#else
  at::parallel_for(0, NBLK, 1, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t l = 0; l < kBlock; ++l) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s = std::fma(xp[m * K + k], w[b * block_elems + k * kBlock + l], s);
          yp[m * N + b * kBlock + l] = bp ? s + bp[b * kBlock + l] : s;
        }
  });
#endif
  return y;
}

// ---- Greedy LM head by screening (float32) ------------------------------------------------------------------------
// greedy_head_f32 is greedy_head (linear_vnni.cpp) for linear_f32's float32 logits on AVX2: the same int8 screen
// (screen_weights: w8 [ceil(N/64), KP, 64, 2], per-row scale s, bounds a and c) gives every logit within a proven
// bound, and only the 16-output blocks that can hold the row's maximum are computed exactly - with linear_f32's tile,
// so bit for bit linear_f32's values - and the token is the one linear_f32 + argmax_rows gives (first of equal
// maxima). The screen's dot products are int16 pairs (x quantised per row to int16, w8 widened) on VPMADDWD: two of
// them a cycle and adds on the other vector pipes, 32 multiply-adds a cycle where float32 FMA does 16, and a quarter
// of the head's bytes - the head is ~20% of a decode token's multiply-adds on the default model and ~20% of its
// weight bytes. The bound: with E = a_v H1 + c_v s_x (H1 = sum |x_i|; see screen_weights), the float32 logit is within
// B_v = E (1 + 2^-10) + (|l'_v| + E) 2^-18 of l'_v = s_v s_x sum_i w8_vi x16_i (the margins cover the rounding of l',
// E, B and of the sums and differences below; the float32 logit itself is not rounded further).
#ifdef TS_AVX2_FMA
namespace {

constexpr int64_t kScreenGroup = 64;  // outputs per run of screen_weights' layout (4 blocks of 16)

// int32 sums of R (1-4) rows of int16-pair x (xq + r * xqs, KP dwords each) against one 16-output block of the screen
// (wb: the block's 32 bytes at kp = 0; the next kp 128 bytes on), to acc[2 r], acc[2 r + 1] (outputs 0-7, 8-15).
template <int R>
inline void screen_tile_f32(const int32_t* xq, int64_t xqs, const int8_t* wb, int64_t KP, __m256i* acc) {
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const int32_t *x0 = xq, *x1 = xq + (R > 1 ? xqs : 0), *x2 = xq + (R > 2 ? 2 * xqs : 0),
                *x3 = xq + (R > 3 ? 3 * xqs : 0);
  for (int64_t kp = 0; kp < KP; ++kp, wb += 2 * kScreenGroup) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16)));
    __m256i x = _mm256_set1_epi32(x0[kp]);
    a00 = _mm256_add_epi32(a00, _mm256_madd_epi16(x, w0));
    a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(x, w1));
    if constexpr (R > 1) {
      x = _mm256_set1_epi32(x1[kp]);
      a10 = _mm256_add_epi32(a10, _mm256_madd_epi16(x, w0));
      a11 = _mm256_add_epi32(a11, _mm256_madd_epi16(x, w1));
    }
    if constexpr (R > 2) {
      x = _mm256_set1_epi32(x2[kp]);
      a20 = _mm256_add_epi32(a20, _mm256_madd_epi16(x, w0));
      a21 = _mm256_add_epi32(a21, _mm256_madd_epi16(x, w1));
    }
    if constexpr (R > 3) {
      x = _mm256_set1_epi32(x3[kp]);
      a30 = _mm256_add_epi32(a30, _mm256_madd_epi16(x, w0));
      a31 = _mm256_add_epi32(a31, _mm256_madd_epi16(x, w1));
    }
  }
  acc[0] = a00, acc[1] = a01;
  if constexpr (R > 1) acc[2] = a10, acc[3] = a11;
  if constexpr (R > 2) acc[4] = a20, acc[5] = a21;
  if constexpr (R > 3) acc[6] = a30, acc[7] = a31;
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

}  // namespace
#endif

// tokens [M] int64 = argmax_rows(linear_f32(x, wp)) for a float32 x [M, K], through the screen (see above).
torch::Tensor greedy_head_f32(const torch::Tensor& x, const torch::Tensor& wp, const torch::Tensor& w8,
                              const torch::Tensor& scale, const torch::Tensor& a, const torch::Tensor& c) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "greedy_head_f32: x must be [M, K] float32");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kBlock && wp.is_contiguous() && wp.scalar_type() == at::kFloat,
              "greedy_head_f32: weight must come from pack_f32");
  const int64_t M = x.size(0), K = x.size(1), NBLK = wp.size(0), N = NBLK * kBlock, KP = (K + 1) / 2;
  TORCH_CHECK(wp.size(1) == K, "greedy_head_f32: x has ", K, " features, the packed weight ", wp.size(1));
  TORCH_CHECK(w8.dim() == 4 && w8.size(0) == (N + 64 - 1) / 64 && w8.size(1) == KP &&
                  w8.size(2) == 64 && w8.size(3) == 2 && w8.scalar_type() == at::kChar &&
                  w8.is_contiguous(),
              "greedy_head_f32: w8 must be int8 [ceil(N / 64), ceil(K / 2), 64, 2] (screen_weights)");
  for (const auto* t : {&scale, &a, &c})
    TORCH_CHECK(t->dim() == 1 && t->numel() == N && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "greedy_head_f32: scale, a and c must be float32 [N]");
#ifndef TS_AVX2_FMA
  TORCH_CHECK(false, "greedy_head_f32 needs AVX2 and FMA (has_avx2_fma is false on this CPU)");
  return torch::Tensor();
#else
  auto out = torch::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return out;
  int64_t* tok = out.data_ptr<int64_t>();
  auto xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* w = wp.data_ptr<float>();
  const int64_t block_elems = K * kBlock;
  // argmax over the given blocks (ascending) of row r with linear_f32's sums, as argmax_rows: first of equal maxima,
  // a NaN wins at once
  auto argmax_blocks = [&](int64_t r, const std::vector<int64_t>& blocks) {
    int64_t best = -1;
    float bv = 0.f;
    alignas(32) float o[kBlock];
    for (int64_t b : blocks) {
      tile_rows(xp, r, 1, w + b * block_elems, K, nullptr, o, kBlock);
      for (int64_t l = 0; l < kBlock; ++l) {
        if (std::isnan(o[l])) return b * kBlock + l;
        if (best < 0 || o[l] > bv) best = b * kBlock + l, bv = o[l];
      }
    }
    return best;
  };
  // x quantised per row to int16 pairs (dwords), small enough that no int32 sum can overflow
  const int64_t qmax = tierserve_screen::x_qmax(KP);
  std::vector<int32_t> xq(static_cast<size_t>(M * KP));
  std::vector<float> sx(M), h1(M);
  std::vector<char> screened(M, 1);
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = xp + r * K;
    screened[r] = tierserve_screen::quantize_row([&](int64_t i) { return xr[i]; }, K, KP, qmax, xq.data() + r * KP,
                                                 sx[r], h1[r]);
  }
  const int8_t* w8p = w8.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  std::vector<float> umax(static_cast<size_t>(M * NBLK));  // per (row, block): the largest upper bound l' + B
  const int threads = at::get_num_threads();
  std::vector<float> tmax(static_cast<size_t>(threads * M), -std::numeric_limits<float>::infinity());
  std::atomic<int> slot{0};
  const __m256 m1 = _mm256_set1_ps(1.0f + 0x1p-10f), m2 = _mm256_set1_ps(0x1p-18f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  tierserve_par::dynamic_for(NBLK, 16, [&](auto each) {
    const int me = slot.fetch_add(1);
    std::vector<__m256> tv(static_cast<size_t>(M), _mm256_set1_ps(-std::numeric_limits<float>::infinity()));
    each([&](int64_t bb, int64_t be) {
      for (int64_t b = bb; b < be; ++b) {  // the block's int8 weights from memory once, then from L1 for later rows
        const int8_t* wb = w8p + (b / 4) * KP * 2 * kScreenGroup + (b % 4) * 2 * kBlock;
        const __m256 s0 = _mm256_loadu_ps(sp + b * kBlock), s1 = _mm256_loadu_ps(sp + b * kBlock + 8);
        const __m256 a0 = _mm256_loadu_ps(ap + b * kBlock), a1 = _mm256_loadu_ps(ap + b * kBlock + 8);
        const __m256 c0 = _mm256_loadu_ps(cp + b * kBlock), c1 = _mm256_loadu_ps(cp + b * kBlock + 8);
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
          const int64_t mr = std::min<int64_t>(4, M - r0);
          __m256i acc[8];
          const int32_t* xr = xq.data() + r0 * KP;
          switch (mr) {
            case 4: screen_tile_f32<4>(xr, KP, wb, KP, acc); break;
            case 3: screen_tile_f32<3>(xr, KP, wb, KP, acc); break;
            case 2: screen_tile_f32<2>(xr, KP, wb, KP, acc); break;
            default: screen_tile_f32<1>(xr, KP, wb, KP, acc); break;
          }
          for (int64_t u = 0; u < mr; ++u) {
            const int64_t r = r0 + u;
            const __m256 sxv = _mm256_set1_ps(sx[r]), h1v = _mm256_set1_ps(h1[r]);
            __m256 up = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
            for (int h = 0; h < 2; ++h) {
              const __m256 l = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[2 * u + h]), h ? s1 : s0), sxv);
              const __m256 e = _mm256_fmadd_ps(h ? a1 : a0, h1v, _mm256_mul_ps(h ? c1 : c0, sxv));
              const __m256 bnd = _mm256_fmadd_ps(_mm256_add_ps(_mm256_and_ps(l, abs_mask), e), m2, _mm256_mul_ps(e, m1));
              up = _mm256_max_ps(up, _mm256_add_ps(l, bnd));
              tv[r] = _mm256_max_ps(tv[r], _mm256_sub_ps(l, bnd));
            }
            umax[r * NBLK + b] = hmax8(up);
          }
        }
      }
    });
    for (int64_t r = 0; r < M; ++r) tmax[me * M + r] = hmax8(tv[r]);
  });
  at::parallel_for(0, M, 1, [&](int64_t rb, int64_t re) {
    std::vector<int64_t> blocks;
    for (int64_t r = rb; r < re; ++r) {
      float t = -std::numeric_limits<float>::infinity();
      for (int i = 0; i < threads; ++i) t = std::max(t, tmax[i * M + r]);
      if (!screened[r] || !std::isfinite(t)) {
        tok[r] = -1;
        continue;
      }
      blocks.clear();
      const float* u = umax.data() + r * NBLK;
      for (int64_t b = 0; b < NBLK; ++b)
        if (u[b] >= t) blocks.push_back(b);
      tok[r] = blocks.empty() ? -1 : argmax_blocks(r, blocks);
    }
  });
  std::vector<int64_t> all_blocks;
  for (int64_t r = 0; r < M; ++r) {
    if (tok[r] >= 0) continue;  // not screened (a non-finite input) or nothing kept: every block
    if (all_blocks.empty())
      for (int64_t b = 0; b < NBLK; ++b) all_blocks.push_back(b);
    tok[r] = argmax_blocks(r, all_blocks);
  }
  return out;
#endif
}

void register_linear_f32(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("pack_f32", &pack_f32, "pack a float32 weight [N, K] for linear_f32 (N a multiple of 16)", release());
  m.def("linear_f32", &linear_f32, "x @ w.T (+ bias) from a pack_f32 weight, float32, each output summed in k order",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(), release());
  m.def("greedy_head_f32", &greedy_head_f32,
        "greedy tokens of x @ w.T through an int8 screen (see linear_f32.cpp): argmax_rows(linear_f32(x, wp)) "
        "without computing every logit", pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("w8"),
        pybind11::arg("scale"), pybind11::arg("a"), pybind11::arg("c"), release());
#ifdef TS_AVX2_FMA
  m.attr("has_avx2_fma") = true;
#else
  m.attr("has_avx2_fma") = false;
#endif
}
