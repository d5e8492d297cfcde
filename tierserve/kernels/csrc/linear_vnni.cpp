// bf16 linear layers for decode batches (a few to a few dozen rows) from weights packed once at load in the pair-
// interleaved ("VNNI") layout that AVX-512-BF16's dot product reads: for each block of 16 output features and each
// pair of input features k, k+1, the 16 x 2 weights are 64 contiguous bytes. One vector of weights then serves every
// row of x (the row's pair of inputs broadcast), each output lane accumulates its own dot product in fp32 in k order,
// and no horizontal reduction is needed; the weights stream from memory once per call. Against oneDNN's packed GEMM
// at 16 rows (what larger decode batches used before) it does the same FLOPs without oneDNN's small-M overheads.
//
// Packed layout: [N / 16, ceil(K / 2), 16, 2] bf16 (an odd K is padded with a zero input feature).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace {

constexpr int64_t kLanes = 16;

#ifdef TS_AVX512_BF16
// Rows [m0, m0 + MR) of x against NB consecutive 16-output blocks; x rows are pair-padded (stride xs, even).
template <int MR, int NB>
inline void tile(const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t kp_count, const float* bias,
                 at::BFloat16* y, int64_t ys) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t block_stride = kp_count * 2 * kLanes;  // elements per 16-output block
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    __m512bh w[NB];
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wp + j * block_stride + kp * 2 * kLanes);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * xs + 2 * kp, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xb, w[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      const __m512 out = bias ? _mm512_add_ps(acc[r][j], _mm512_loadu_ps(bias + kLanes * j)) : acc[r][j];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ys + kLanes * j), tierserve_vec::to_bf16(out));
    }
}

template <int NB>
void rows_tile(int64_t mr, const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t kp_count,
               const float* bias, at::BFloat16* y, int64_t ys) {
  switch (mr) {
    case 1: tile<1, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 2: tile<2, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 3: tile<3, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 4: tile<4, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 5: tile<5, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 6: tile<6, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    case 7: tile<7, NB>(x, xs, wp, kp_count, bias, y, ys); break;
    default: tile<8, NB>(x, xs, wp, kp_count, bias, y, ys); break;
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

// y [M, N] = x [M, K] @ w^T (+ bias), w given packed by pack_vnni; bf16 in and out, fp32 accumulation.
torch::Tensor linear_vnni(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_vnni: x must be [M, K] bf16");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == kLanes && wp.size(3) == 2 && wp.is_contiguous() &&
                  wp.scalar_type() == at::kBFloat16,
              "linear_vnni: weight must come from pack_vnni");
  const int64_t M = x.size(0), K = x.size(1), KP = wp.size(1), NBLK = wp.size(0), N = NBLK * kLanes;
  TORCH_CHECK((K + 1) / 2 == KP, "linear_vnni: x has ", K, " features, the packed weight ", 2 * KP);
  auto y = torch::empty({M, N}, x.options());
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
  constexpr int64_t kGroup = 2;
  const int64_t groups = (NBLK + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t b0 = g * kGroup, nb = std::min(kGroup, NBLK - b0);
      const at::BFloat16* wg = w + b0 * block_elems;
      const float* bg = bp ? bp + b0 * kLanes : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mr = std::min<int64_t>(8, M - m0);
        at::BFloat16* yg = yp + m0 * N + b0 * kLanes;
        if (nb == 2) {
          rows_tile<2>(mr, xp + m0 * xs, xs, wg, KP, bg, yg, N);
        } else {
          rows_tile<1>(mr, xp + m0 * xs, xs, wg, KP, bg, yg, N);
        }
      }
    }
  });
#else
  // Portable: the same order of accumulation (per output, k pairs in order), one element at a time.
  at::parallel_for(0, NBLK, 1, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b) {
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t l = 0; l < kLanes; ++l) {
          float s = 0.f;
          for (int64_t kp = 0; kp < KP; ++kp) {
            const at::BFloat16* wv = w + b * block_elems + (kp * kLanes + l) * 2;
            s += tierserve_vec::f32(xp[m * xs + 2 * kp]) * tierserve_vec::f32(wv[0]) +
                 tierserve_vec::f32(xp[m * xs + 2 * kp + 1]) * tierserve_vec::f32(wv[1]);
          }
          yp[m * N + b * kLanes + l] = static_cast<at::BFloat16>(bp ? s + bp[b * kLanes + l] : s);
        }
      }
    }
  });
#endif
  return y;
}

void register_linear_vnni(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("pack_vnni", &pack_vnni, "pack a bf16 weight [N, K] for linear_vnni (N a multiple of 16)", release());
  m.def("linear_vnni", &linear_vnni, "x @ w.T (+ bias) for decode batches from a pack_vnni weight, bf16",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(), release());
}
