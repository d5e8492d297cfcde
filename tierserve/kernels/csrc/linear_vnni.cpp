// bf16 linear layers for decode batches (a few to a few dozen rows) from weights packed once at load in the pair-
// interleaved ("VNNI") layout that AVX-512-BF16's dot product reads: for each block of 16 output features and each
// pair of input features k, k+1, the 16 x 2 weights are 64 contiguous bytes. One vector of weights then serves every
// row of x (the row's pair of inputs broadcast), each output lane accumulates its own dot product in fp32 in k order,
// and no horizontal reduction is needed; the weights stream from memory once per call. Against oneDNN's packed GEMM
// at 16 rows (what larger decode batches used before) it does the same FLOPs without oneDNN's small-M overheads.
//
// Packed layout: [N / 16, ceil(K / 2), 16, 2] bf16 (an odd K is padded with a zero input feature).
//
// SwiGLU epilogue (`swiglu`): for a gate/up weight packed with gate block i and up block i side by side
// (interleave_gate_up), each 2-block group is (gate, up) of the same 16 features, so the tile writes silu(gate) * up
// (ts_silu.h: rounded as transformers' bf16 F.silu(gate) * up) and the [M, 2I] activations are never stored.

// at::vec's exp (ts_silu.h) must be the AVX-512 one torch runs: the capability macros before any torch header.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "screen.h"
#include "ts_silu.h"
#include "vec.h"

namespace {

constexpr int64_t kLanes = 16;

// Software prefetch distance, in k pairs (64-byte lines per 16-output block), of the first row tile of each group:
// that tile reads the group's weights from memory (the later ones from L1/L2), and the hardware prefetchers alone
// left it latency-bound. Past the end of a block the lines prefetched are the next block's, and past the group's
// last block the next group's. 0: none. Set by set_linear_prefetch (A/B). On the Zen 5 EPYC, weights streamed from
// memory (60 copies of a projection, huge pages), ad hoc: 8 rows 0.66-0.83x the time, 64 rows 0.85-0.95x; at one
// row no gain (0.9-1.1x), so one to three rows go without.
int64_t g_prefetch = 64;

// Up to this many rows (from 9), a call takes one pass of 16-row tiles over each single 16-output block instead of
// 8-row tiles over block pairs: every weight vector streamed in serves all rows at once, where the second 8-row tile
// used to wait for the first to bring the weights in. Same sums, bit for bit. Zen 5 EPYC, weights streamed (a model
// step's projections), ad hoc: 12-16 rows 0.91-0.96x the time, 24-32 rows 1.02-1.04x (so not there); the engine's
// 16-sequence decode step 0.91-0.93x (scripts/kernel_build_ab.py --per-step, same tokens). 0: never (A/B).
int64_t g_wide_rows = 16;

// Groups per work chunk handed out at once: 0 picks a quarter of each thread's share for calls of up to 16 rows (each
// thread's weights then stream in runs of several groups, not one 2-block group and a skip over the other thread's),
// one group for larger calls (where the rows' compute, not the stream, sets the time). Settable for A/B.
int64_t g_chunk = 0;

// Up to this many rows, a call's parallel unit is 4 output blocks (64 features), not 2: at one row each block's sum
// is one chain of dot products as long as K (its order is the library's, so it cannot be split), and 4 chains in
// flight instead of 2 keep more of the weights' stream going per core. Same sums. 0: never (A/B).
int64_t g_quad_rows = 2;

#ifdef TS_AVX512_BF16
// Rows [m0, m0 + MR) of x against NB consecutive 16-output blocks; x rows are pair-padded (stride xs, even). The k
// pairs are summed in chunks of kc pairs, each from zero, the chunk sums added in order (kc >= kp_count: one chunk).
// SW (NB == 2, no bias): the two blocks are gate and up of 16 features; y receives silu(gate) * up for them.
template <int MR, int NB, bool SW = false>
inline void tile(const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t kp_count, int64_t kc,
                 const float* bias, at::BFloat16* y, int64_t ys, int64_t pf) {
  __m512 acc[MR][NB];
  alignas(64) float tot[MR][NB][kLanes];
  const int64_t block_stride = kp_count * 2 * kLanes;  // elements per 16-output block
  for (int64_t c0 = 0; c0 < kp_count; c0 += kc) {
    const int64_t c1 = std::min(kp_count, c0 + kc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t kp = c0; kp < c1; ++kp) {
      if (pf)
        for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(wp + j * block_stride + (kp + pf) * 2 * kLanes), _MM_HINT_T0);
      __m512bh w[NB];
      for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wp + j * block_stride + kp * 2 * kLanes);
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * xs + 2 * kp, sizeof(pair));
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xb, w[j]);
      }
    }
    if (c0 > 0)
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_add_ps(_mm512_load_ps(tot[r][j]), acc[r][j]);
    if (c1 < kp_count)
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NB; ++j) _mm512_store_ps(tot[r][j], acc[r][j]);
  }
  if constexpr (SW) {
    static_assert(NB % 2 == 0, "the SwiGLU epilogue takes (gate, up) block pairs");
    for (int r = 0; r < MR; ++r)  // gate and up each rounded to bf16 as their own linears' outputs are
      for (int j = 0; j < NB; j += 2) {
        const __m512 g = tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(acc[r][j]));
        const __m512 u = tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(acc[r][j + 1]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ys + kLanes * (j / 2)), tierserve_vec::silu_mul16(g, u));
      }
    return;
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      const __m512 out = bias ? _mm512_add_ps(acc[r][j], _mm512_loadu_ps(bias + kLanes * j)) : acc[r][j];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ys + kLanes * j), tierserve_vec::to_bf16(out));
    }
}

template <int NB, bool SW = false>
void rows_tile(int64_t mr, const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t kp_count, int64_t kc,
               const float* bias, at::BFloat16* y, int64_t ys, int64_t pf) {
  switch (mr) {
    case 1: tile<1, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 2: tile<2, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 3: tile<3, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 4: tile<4, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 5: tile<5, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 6: tile<6, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 7: tile<7, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    default: tile<8, NB, SW>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
  }
}

// One 16-output block, up to 16 rows per tile (16 accumulators).
void rows_tile16(int64_t mr, const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t kp_count, int64_t kc,
                 const float* bias, at::BFloat16* y, int64_t ys, int64_t pf) {
  switch (mr) {
    case 9: tile<9, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 10: tile<10, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 11: tile<11, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 12: tile<12, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 13: tile<13, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 14: tile<14, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 15: tile<15, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    case 16: tile<16, 1>(x, xs, wp, kp_count, kc, bias, y, ys, pf); break;
    default: rows_tile<1>(mr, x, xs, wp, kp_count, kc, bias, y, ys, pf); break;  // 1-8 rows
  }
}
#endif

}  // namespace

// w [N, K] bf16 -> packed [N / 16, ceil(K / 2), 16, 2]. N must be a multiple of 16.
torch::Tensor pack_vnni(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_vnni: w must be [N, K] bf16");
  const int64_t N = w.size(0), K = w.size(1), KP = (K + 1) / 2;
  TORCH_CHECK(N % kLanes == 0 && N > 0 && K > 0, "pack_vnni: N must be a positive multiple of 16");
  auto wc = w.contiguous();
  // [N, K] -> pad K to even -> [N/16, 16, KP, 2] -> [N/16, KP, 16, 2]
  auto padded = K % 2 ? torch::constant_pad_nd(wc, {0, 1}) : wc;
  return padded.view({N / kLanes, kLanes, KP, 2}).permute({0, 2, 1, 3}).contiguous();
}

// y [M, N] = x [M, K] @ w^T (+ bias), w given packed by pack_vnni; bf16 in and out, fp32 accumulation. Each output
// sums its k in chunks of k_chunk features (0: one chunk), each chunk in k-pair order from zero, the chunk sums then
// added in order; rows [0, lead_rows) use lead_k_chunk instead. This reproduces a GEMM library's K blocking where it
// is known (oneDNN's, measured by tierserve.kernels.linear_order), so the sums are the library's bit for bit.
// swiglu: wp is a gate/up weight interleaved by interleave_gate_up; y [M, N / 2] = silu(gate) * up (no bias).
torch::Tensor linear_vnni(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                          int64_t k_chunk, int64_t lead_rows, int64_t lead_k_chunk, bool swiglu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_vnni: x must be [M, K] bf16");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == kLanes && wp.size(3) == 2 && wp.is_contiguous() &&
                  wp.scalar_type() == at::kBFloat16,
              "linear_vnni: weight must come from pack_vnni");
  const int64_t M = x.size(0), K = x.size(1), KP = wp.size(1), NBLK = wp.size(0), N = NBLK * kLanes;
  TORCH_CHECK((K + 1) / 2 == KP, "linear_vnni: x has ", K, " features, the packed weight ", 2 * KP);
  TORCH_CHECK(k_chunk >= 0 && k_chunk % 2 == 0 && lead_k_chunk >= 0 && lead_k_chunk % 2 == 0,
              "linear_vnni: k chunks must be even and >= 0 (0: none)");
  TORCH_CHECK(lead_rows >= 0, "linear_vnni: lead_rows must be >= 0");
  TORCH_CHECK(!swiglu || (NBLK % 2 == 0 && !(bias.has_value() && bias->defined())),
              "linear_vnni: swiglu needs whole (gate, up) block pairs and no bias");
#ifndef TS_AVX512_BF16
  TORCH_CHECK(!swiglu, "linear_vnni: the SwiGLU epilogue needs AVX-512-BF16");
#endif
  const int64_t NO = swiglu ? N / 2 : N;  // output columns
  // k pairs per chunk for rows [0, lead) and [lead, M)
  const int64_t lead = std::min(lead_rows, M);
  const int64_t kc_lead = lead_k_chunk ? lead_k_chunk / 2 : KP, kc_rest = k_chunk ? k_chunk / 2 : KP;
  auto y = torch::empty({M, NO}, x.options());
  if (M == 0) return y;
  // x with rows padded to an even length (the last pair of an odd K reads a zero)
  auto xc = (K % 2 ? torch::constant_pad_nd(x, {0, 1}) : x).contiguous();
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_vnni: bias must have ", N, " elements");
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* w = wp.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t xs = 2 * KP, block_elems = KP * 2 * kLanes;
#ifdef TS_AVX512_BF16
  // Groups of 2 output blocks (32 features) are the parallel unit; within one, all rows of x, 8 at a time
  // (16 accumulators), so each group's weights (a few tens of KiB) come from memory once and from L1/L2 after.
  const int64_t kGroup = M <= g_quad_rows ? 4 : 2;
  const int64_t groups = (NBLK + kGroup - 1) / kGroup;
  int64_t chunk = g_chunk;
  if (chunk == 0)
    chunk = M <= 16 ? std::max<int64_t>(1, groups / (4 * at::get_num_threads())) : 1;
  tierserve_par::dynamic_for(groups, chunk, [&](auto each) {
    each([&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t b0 = g * kGroup, nb = std::min(kGroup, NBLK - b0);
        const at::BFloat16* wg = w + b0 * block_elems;
        const float* bg = bp ? bp + b0 * kLanes : nullptr;
        if (M > 8 && M <= g_wide_rows) {  // 16-row tiles, one output block at a time
          for (int64_t m0 = 0; m0 < M;) {
            const int64_t mend = m0 < lead ? lead : M, mr = std::min<int64_t>(16, mend - m0);
            const int64_t kc = m0 < lead ? kc_lead : kc_rest;
            const int64_t pf = m0 == 0 ? g_prefetch : 0;
            if (swiglu) {  // gate and up rounded to bf16 (as the 2-block tile's epilogue does), then silu(gate) * up
              alignas(64) at::BFloat16 gt[16 * kLanes], ut[16 * kLanes];
              rows_tile16(mr, xp + m0 * xs, xs, wg, KP, kc, nullptr, gt, kLanes, pf);
              rows_tile16(mr, xp + m0 * xs, xs, wg + block_elems, KP, kc, nullptr, ut, kLanes, pf);
              at::BFloat16* yg = yp + m0 * NO + b0 / 2 * kLanes;
              for (int64_t r = 0; r < mr; ++r)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(yg + r * NO),
                                    tierserve_vec::silu_mul16(tierserve_vec::load16_bf16(gt + r * kLanes),
                                                              tierserve_vec::load16_bf16(ut + r * kLanes)));
            } else {
              for (int64_t j = 0; j < nb; ++j)
                rows_tile16(mr, xp + m0 * xs, xs, wg + j * block_elems, KP, kc, bg ? bg + j * kLanes : nullptr,
                            yp + m0 * NO + (b0 + j) * kLanes, NO, pf);
            }
            m0 += mr;
          }
          continue;
        }
        for (int64_t m0 = 0; m0 < M;) {
          // 8-row tiles that do not straddle the lead rows' end
          const int64_t mend = m0 < lead ? lead : M, mr = std::min<int64_t>(8, mend - m0);
          const int64_t kc = m0 < lead ? kc_lead : kc_rest;
          at::BFloat16* yg = yp + m0 * NO + (swiglu ? b0 / 2 : b0) * kLanes;
          // the first row tile streams the weights in; at one to three rows the hardware prefetchers keep up
          const int64_t pf = m0 == 0 && M >= 4 ? g_prefetch : 0;
          if (nb == 4 && mr <= 2) {  // (kGroup 4: calls of 1-2 rows)
            if (swiglu) {
              if (mr == 1) tile<1, 4, true>(xp + m0 * xs, xs, wg, KP, kc, nullptr, yg, NO, pf);
              else tile<2, 4, true>(xp + m0 * xs, xs, wg, KP, kc, nullptr, yg, NO, pf);
            } else {
              if (mr == 1) tile<1, 4>(xp + m0 * xs, xs, wg, KP, kc, bg, yg, NO, pf);
              else tile<2, 4>(xp + m0 * xs, xs, wg, KP, kc, bg, yg, NO, pf);
            }
          } else if (nb > 2) {  // a 4-block group's last 3 blocks (or a larger call's): pairs, then one
            for (int64_t j = 0; j < nb; j += 2) {
              const int64_t nj = std::min<int64_t>(2, nb - j);
              at::BFloat16* yj = yg + (swiglu ? j / 2 : j) * kLanes;
              const float* bj = bg ? bg + j * kLanes : nullptr;
              if (swiglu) rows_tile<2, true>(mr, xp + m0 * xs, xs, wg + j * block_elems, KP, kc, nullptr, yj, NO, pf);
              else if (nj == 2) rows_tile<2>(mr, xp + m0 * xs, xs, wg + j * block_elems, KP, kc, bj, yj, NO, pf);
              else rows_tile<1>(mr, xp + m0 * xs, xs, wg + j * block_elems, KP, kc, bj, yj, NO, pf);
            }
          } else if (swiglu) {
            rows_tile<2, true>(mr, xp + m0 * xs, xs, wg, KP, kc, nullptr, yg, NO, pf);
          } else if (nb == 2) {
            rows_tile<2>(mr, xp + m0 * xs, xs, wg, KP, kc, bg, yg, NO, pf);
          } else {
            rows_tile<1>(mr, xp + m0 * xs, xs, wg, KP, kc, bg, yg, NO, pf);
          }
          m0 += mr;
        }
      }
    });
  });
#else
  // Portable: the same order of accumulation (per output, chunks of k pairs, within a pair the odd feature first
  // as VDPBF16PS does), one element at a time.
  at::parallel_for(0, NBLK, 1, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b) {
      for (int64_t m = 0; m < M; ++m) {
        const int64_t kc = m < lead ? kc_lead : kc_rest;
        for (int64_t l = 0; l < kLanes; ++l) {
          float s = 0.f;
          for (int64_t c0 = 0; c0 < KP; c0 += kc) {
            float c = 0.f;
            for (int64_t kp = c0; kp < std::min(KP, c0 + kc); ++kp) {
              const at::BFloat16* wv = w + b * block_elems + (kp * kLanes + l) * 2;
              c += tierserve_vec::f32(xp[m * xs + 2 * kp + 1]) * tierserve_vec::f32(wv[1]);
              c += tierserve_vec::f32(xp[m * xs + 2 * kp]) * tierserve_vec::f32(wv[0]);
            }
            s = c0 ? s + c : c;
          }
          yp[m * N + b * kLanes + l] = static_cast<at::BFloat16>(bp ? s + bp[b * kLanes + l] : s);
        }
      }
    }
  });
#endif
  return y;
}

// ---- Greedy LM head by screening ----------------------------------------------------------------------------------
// A plain greedy step needs only the argmax of each row's logits, and at a few rows the LM head's cost is reading its
// weights (the largest matrix of a small model: 56 MB of the default model's 269). greedy_head reads an int8 copy
// instead (half the bytes) to get every logit within a proven bound, then computes exactly - with the same tile and
// K chunks as linear_vnni, so bit for bit the same bf16 values - only the 16-output blocks that can hold the maximum.
// The token is the one linear_vnni + argmax_rows would give (first of equal maxima), never an approximation.
//
// Screen weights (tierserve.model_executor.models.llama.screen_weights): w8 [ceil(N/64), KP, 64, 2] int8 (each group
// of 4 blocks one sequential run: four 9 KiB streams per group read at 26 GB/s, one at 35), row v = round(w_v / s_v)
// with s_v = max|w_v| / 127; per row a[v] and c[v] (fp32, rounded up) such that for any x with H1 = sum |x_i| and
// the x quantisation below (|x_i - s_x x16_i| <= 0.51 s_x),
//   |bf16 logit_v - l'_v| <= B_v,  l'_v = s_v s_x sum_i w8_vi x16_i (int32, exact)
// with E = a_v H1 + c_v s_x (a_v: max_i |w_vi - s_v w8_vi| plus the fp32 accumulation bound gamma_K max|w_v|; c_v:
// 0.51 s_v sum |w8_v|) and B_v = E (1 + 2^-10) + (|l'_v| + E)(2^-8 + 2^-18) (the rounding of the logit to bf16, and of
// l', H1 and B themselves, inside the margins). T = max_v (l'_v - B_v) is then at most the largest logit, and every
// v with l'_v + B_v < T is below it: only the other blocks are computed. On the default model's logits a row keeps a
// median of ~4 candidate outputs (p99 ~40) of 49152.
#if defined(TS_AVX512_BF16) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TS_SCREEN 1
#endif

namespace {
#ifdef TS_SCREEN
// Screened logits l' and bounds B of rows [0, MR) (MR 1 or 2) against a group of 4 consecutive 16-output blocks
// (nb <= 4 of them real), the group's int8 weights one run of [KP, 64, 2]. Named accumulators, not an array: GCC
// kept an array of them on the stack (a load and a store around every dot product).
template <int MR>
inline void screen_tile(const int32_t* xq, int64_t xqs, const int8_t* wg, int64_t kp_count, int nb, const float* s,
                        const float* a, const float* c, const float* sx, const float* h1, float* lq, float* bnd,
                        int64_t ls, __m512* tmax) {
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  auto wv = [](const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    const int8_t* p = wg + kp * 8 * kLanes;
    const __m512i v0 = wv(p), v1 = wv(p + 2 * kLanes), v2 = wv(p + 4 * kLanes), v3 = wv(p + 6 * kLanes);
    const __m512i x0 = _mm512_set1_epi32(xq[kp]);
    a00 = _mm512_dpwssd_epi32(a00, x0, v0);
    a01 = _mm512_dpwssd_epi32(a01, x0, v1);
    a02 = _mm512_dpwssd_epi32(a02, x0, v2);
    a03 = _mm512_dpwssd_epi32(a03, x0, v3);
    if constexpr (MR == 2) {
      const __m512i x1 = _mm512_set1_epi32(xq[xqs + kp]);
      a10 = _mm512_dpwssd_epi32(a10, x1, v0);
      a11 = _mm512_dpwssd_epi32(a11, x1, v1);
      a12 = _mm512_dpwssd_epi32(a12, x1, v2);
      a13 = _mm512_dpwssd_epi32(a13, x1, v3);
    }
  }
  const __m512i acc[2][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}};
  const __m512 m1 = _mm512_set1_ps(1.0f + 0x1p-10f), m2 = _mm512_set1_ps(0x1p-8f + 0x1p-18f);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int j = 0; j < nb; ++j) {
    const __m512 av = _mm512_loadu_ps(a + j * kLanes), cv = _mm512_loadu_ps(c + j * kLanes);
    const __m512 sv = _mm512_loadu_ps(s + j * kLanes);
    for (int r = 0; r < MR; ++r) {
      const __m512 l = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), sv), _mm512_set1_ps(sx[r]));
      const __m512 e = _mm512_fmadd_ps(av, _mm512_set1_ps(h1[r]), _mm512_mul_ps(cv, _mm512_set1_ps(sx[r])));
      const __m512 b = _mm512_fmadd_ps(_mm512_add_ps(_mm512_and_ps(l, abs_mask), e), m2, _mm512_mul_ps(e, m1));
      _mm512_storeu_ps(lq + r * ls + j * kLanes, l);
      _mm512_storeu_ps(bnd + r * ls + j * kLanes, b);
      tmax[r] = _mm512_max_ps(tmax[r], _mm512_sub_ps(l, b));
    }
  }
}
#endif
}  // namespace

// tokens [M] int64 = argmax_rows(linear_vnni(x, wp, None, 0, M, k_chunk)) for a bf16 x [M, K], through the screen.
torch::Tensor greedy_head(const torch::Tensor& x, const torch::Tensor& wp, const torch::Tensor& w8,
                          const torch::Tensor& scale, const torch::Tensor& a, const torch::Tensor& c,
                          int64_t k_chunk) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "greedy_head: x must be [M, K] bf16");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == kLanes && wp.size(3) == 2 && wp.is_contiguous() &&
                  wp.scalar_type() == at::kBFloat16, "greedy_head: weight must come from pack_vnni");
  const int64_t M = x.size(0), K = x.size(1), KP = wp.size(1), NBLK = wp.size(0), N = NBLK * kLanes;
  TORCH_CHECK(w8.dim() == 4 && w8.size(0) == (NBLK + 3) / 4 && w8.size(1) == KP && w8.size(2) == 4 * kLanes &&
                  w8.size(3) == 2 && w8.scalar_type() == at::kChar && w8.is_contiguous(),
              "greedy_head: w8 must be int8 [ceil(N / 64), KP, 64, 2] (screen_weights)");
  TORCH_CHECK((K + 1) / 2 == KP, "greedy_head: x has ", K, " features, the packed weight ", 2 * KP);
  for (const auto* t : {&scale, &a, &c})
    TORCH_CHECK(t->dim() == 1 && t->numel() == N && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "greedy_head: scale, a and c must be float32 [N]");
  TORCH_CHECK(k_chunk >= 0 && k_chunk % 2 == 0, "greedy_head: k_chunk must be even and >= 0 (0: none)");
#ifndef TS_SCREEN
  TORCH_CHECK(false, "greedy_head needs AVX-512-BF16 and AVX-512 VNNI (has_screen is false on this CPU)");
  return torch::Tensor();
#else
  auto out = torch::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return out;
  int64_t* tok = out.data_ptr<int64_t>();
  auto xc = (K % 2 ? torch::constant_pad_nd(x, {0, 1}) : x).contiguous();
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* w = wp.data_ptr<at::BFloat16>();
  const int64_t xs = 2 * KP, block_elems = KP * 2 * kLanes, kc = k_chunk ? k_chunk / 2 : KP;
  // exact bf16 outputs of block b for row r (linear_vnni's tile: the same sums)
  auto exact_block = [&](int64_t r, int64_t b, at::BFloat16* o) {
    tile<1, 1>(xp + r * xs, xs, w + b * block_elems, KP, kc, nullptr, o, kLanes, 0);
  };
  // argmax over the given blocks (ascending) of row r, as argmax_rows: first of equal maxima, a NaN wins at once
  auto argmax_blocks = [&](int64_t r, const std::vector<int64_t>& blocks) {
    int64_t best = -1;
    float bv = 0.f;
    alignas(64) at::BFloat16 o[kLanes];
    for (int64_t b : blocks) {
      exact_block(r, b, o);
      for (int64_t l = 0; l < kLanes; ++l) {
        const float v = tierserve_vec::f32(o[l]);
        if (std::isnan(v)) return b * kLanes + l;
        if (best < 0 || v > bv) best = b * kLanes + l, bv = v;
      }
    }
    return best;
  };
  std::vector<int64_t> all_blocks;
  auto full_row = [&](int64_t r) {
    if (all_blocks.empty())
      for (int64_t b = 0; b < NBLK; ++b) all_blocks.push_back(b);
    return argmax_blocks(r, all_blocks);
  };
  // x quantised per row to int16 pairs (dwords), small enough that no int32 sum can overflow
  const int64_t qmax = tierserve_screen::x_qmax(KP);
  std::vector<int32_t> xq(static_cast<size_t>(M * KP));
  std::vector<float> sx(M), h1(M);
  std::vector<char> screened(M, 1);
  for (int64_t r = 0; r < M; ++r) {
    const at::BFloat16* xr = xp + r * xs;  // (padded to 2 KP features with a zero)
    screened[r] = tierserve_screen::quantize_row([&](int64_t i) { return tierserve_vec::f32(xr[i]); }, 2 * KP, KP,
                                                 qmax, xq.data() + r * KP, sx[r], h1[r]);
  }
  const int8_t* w8p = w8.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  // kept between calls: fresh pages for these (0.4 MB a row) cost more than the screen
  static thread_local std::vector<float> lq_buf, bnd_buf;
  if (lq_buf.size() < static_cast<size_t>(M * N)) {
    lq_buf.resize(static_cast<size_t>(M * N));
    bnd_buf.resize(static_cast<size_t>(M * N));
  }
  float* lqp = lq_buf.data();
  float* bndp = bnd_buf.data();
  const int threads = at::get_num_threads();
  std::vector<float> tmax(static_cast<size_t>(threads * M), -std::numeric_limits<float>::infinity());
  constexpr int64_t kGroup = 4;
  const int64_t groups = (NBLK + kGroup - 1) / kGroup;
  const int64_t chunk = std::max<int64_t>(1, groups / (4 * threads));
  std::atomic<int> slot{0};
  tierserve_par::dynamic_for(groups, chunk, [&](auto each) {
    const int me = slot.fetch_add(1);
    __m512 tm[2];
    std::vector<__m512> tv(static_cast<size_t>(M), _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    each([&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t b0 = g * kGroup, nb = std::min(kGroup, NBLK - b0);
        const int8_t* wg = w8p + g * KP * 8 * kLanes;
        for (int64_t r0 = 0; r0 < M; r0 += 2) {  // the group's int8 weights from memory once, then from L1/L2
          const int64_t mr = std::min<int64_t>(2, M - r0);
          for (int r = 0; r < mr; ++r) tm[r] = tv[r0 + r];
          const int32_t* xr = xq.data() + r0 * KP;
          const float* sv = sp + b0 * kLanes;
          const float* av = ap + b0 * kLanes;
          const float* cv = cp + b0 * kLanes;
          float* l = lqp + r0 * N + b0 * kLanes;
          float* bb = bndp + r0 * N + b0 * kLanes;
          if (mr == 2) {
            screen_tile<2>(xr, KP, wg, KP, static_cast<int>(nb), sv, av, cv, sx.data() + r0, h1.data() + r0, l, bb,
                           N, tm);
          } else {
            screen_tile<1>(xr, KP, wg, KP, static_cast<int>(nb), sv, av, cv, sx.data() + r0, h1.data() + r0, l, bb,
                           N, tm);
          }
          for (int r = 0; r < mr; ++r) tv[r0 + r] = tm[r];
        }
      }
    });
    for (int64_t r = 0; r < M; ++r) tmax[me * M + r] = _mm512_reduce_max_ps(tv[r]);
  });
  at::parallel_for(0, M, 1, [&](int64_t rb, int64_t re) {
    std::vector<int64_t> blocks;
    for (int64_t r = rb; r < re; ++r) {
      if (!screened[r]) {
        tok[r] = -1;
        continue;
      }
      float t = -std::numeric_limits<float>::infinity();
      for (int i = 0; i < threads; ++i) t = std::max(t, tmax[i * M + r]);
      blocks.clear();
      const float* l = lqp + r * N;
      const float* bb = bndp + r * N;
      const __m512 tv = _mm512_set1_ps(t);
      for (int64_t b = 0; b < NBLK; ++b) {
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(l + b * kLanes),
                                                                _mm512_loadu_ps(bb + b * kLanes)), tv, _CMP_GE_OQ);
        if (keep) blocks.push_back(b);
      }
      tok[r] = blocks.empty() || !std::isfinite(t) ? -1 : argmax_blocks(r, blocks);
    }
  });
  for (int64_t r = 0; r < M; ++r)
    if (tok[r] < 0) tok[r] = full_row(r);  // not screened (a non-finite input) or nothing kept: every block
  return out;
#endif
}

void register_linear_vnni(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("set_linear_prefetch", [](int64_t k_pairs) {
    TORCH_CHECK(k_pairs >= 0, "set_linear_prefetch: a distance >= 0 (0: none)");
    g_prefetch = k_pairs;
  }, "linear_vnni's software prefetch distance in k pairs for each group's first row tile (0: none)");
  m.def("linear_prefetch", []() { return g_prefetch; });
  m.def("set_linear_wide_rows", [](int64_t rows) {
    TORCH_CHECK(rows >= 0, "set_linear_wide_rows: a row count >= 0 (0: never)");
    g_wide_rows = rows;
  }, "linear_vnni's largest call (from 9 rows) taken in one pass of 16-row tiles per output block (0: never)");
  m.def("linear_wide_rows", []() { return g_wide_rows; });
  m.def("set_linear_chunk", [](int64_t groups) {
    TORCH_CHECK(groups >= 0, "set_linear_chunk: groups >= 0 (0: by row count)");
    g_chunk = groups;
  }, "linear_vnni's work chunk in 32-output groups (0: by row count)");
  m.def("linear_chunk", []() { return g_chunk; });
  m.def("set_linear_quad_rows", [](int64_t rows) {
    // (up to 8: the 16-row tiles of 9-16-row calls take their SwiGLU pairs from 2-block groups)
    TORCH_CHECK(rows >= 0 && rows <= 8, "set_linear_quad_rows: a row count in [0, 8] (0: never)");
    g_quad_rows = rows;
  }, "linear_vnni's largest call taken in 4-block (64-output) groups, each block's dot products in flight together");
  m.def("linear_quad_rows", []() { return g_quad_rows; });
  m.def("greedy_head", &greedy_head,
        "greedy tokens of x @ w.T through an int8 screen (see linear_vnni.cpp): argmax_rows(linear_vnni(x, wp, None, "
        "0, M, k_chunk)) without computing every logit",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("w8"), pybind11::arg("scale"), pybind11::arg("a"),
        pybind11::arg("c"), pybind11::arg("k_chunk") = 0, release());
#ifdef TS_SCREEN
  m.attr("has_screen") = true;
#else
  m.attr("has_screen") = false;
#endif
  m.def("pack_vnni", &pack_vnni, "pack a bf16 weight [N, K] for linear_vnni (N a multiple of 16)", release());
  m.def("linear_vnni", &linear_vnni,
        "x @ w.T (+ bias) from a pack_vnni weight, bf16; K summed in chunks of k_chunk (lead_k_chunk for the first "
        "lead_rows rows), 0: one chunk; swiglu: silu(gate) * up of a weight interleaved by interleave_gate_up",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("k_chunk") = 0,
        pybind11::arg("lead_rows") = 0, pybind11::arg("lead_k_chunk") = 0, pybind11::arg("swiglu") = false,
        release());
}
