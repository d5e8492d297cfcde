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
#include <cstdint>

#include "parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TS_AVX2_FMA 1
#endif

namespace {

constexpr int64_t kBlock = 16;

#ifdef TS_AVX2_FMA
// R (1-6) rows of x (xr[r]) against one 16-output block (wb: [K, 16]); up to 12 accumulators of 8 lanes, held in
// named registers (an accumulator array made GCC store all twelve to the stack at every k, which halved the speed).
// Each output sums its k in order with one FMA per k (the same order at any row count and any thread count).
template <int R>
inline void tile(const float* const* xr, const float* wb, int64_t K, const float* bias, float* y, int64_t ys) {
  const float *x0 = xr[0], *x1 = xr[R > 1 ? 1 : 0], *x2 = xr[R > 2 ? 2 : 0], *x3 = xr[R > 3 ? 3 : 0],
              *x4 = xr[R > 4 ? 4 : 0], *x5 = xr[R > 5 ? 5 : 0];
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wb + k * kBlock), w1 = _mm256_loadu_ps(wb + k * kBlock + 8);
    __m256 xb = _mm256_broadcast_ss(x0 + k);
    a00 = _mm256_fmadd_ps(xb, w0, a00);
    a01 = _mm256_fmadd_ps(xb, w1, a01);
    if constexpr (R > 1) {
      xb = _mm256_broadcast_ss(x1 + k);
      a10 = _mm256_fmadd_ps(xb, w0, a10);
      a11 = _mm256_fmadd_ps(xb, w1, a11);
    }
    if constexpr (R > 2) {
      xb = _mm256_broadcast_ss(x2 + k);
      a20 = _mm256_fmadd_ps(xb, w0, a20);
      a21 = _mm256_fmadd_ps(xb, w1, a21);
    }
    if constexpr (R > 3) {
      xb = _mm256_broadcast_ss(x3 + k);
      a30 = _mm256_fmadd_ps(xb, w0, a30);
      a31 = _mm256_fmadd_ps(xb, w1, a31);
    }
    if constexpr (R > 4) {
      xb = _mm256_broadcast_ss(x4 + k);
      a40 = _mm256_fmadd_ps(xb, w0, a40);
      a41 = _mm256_fmadd_ps(xb, w1, a41);
    }
    if constexpr (R > 5) {
      xb = _mm256_broadcast_ss(x5 + k);
      a50 = _mm256_fmadd_ps(xb, w0, a50);
      a51 = _mm256_fmadd_ps(xb, w1, a51);
    }
  }
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ys, bias ? _mm256_add_ps(acc[r][0], b0) : acc[r][0]);
    _mm256_storeu_ps(y + r * ys + 8, bias ? _mm256_add_ps(acc[r][1], b1) : acc[r][1]);
  }
}

// Rows [m0, m0 + mr) (mr 1-6) of x against one block.
inline void tile_rows(const float* x, int64_t m0, int64_t mr, const float* wb, int64_t K, const float* bias, float* y,
                      int64_t ys) {
  const float* xr[6];
  for (int64_t r = 0; r < 6; ++r) xr[r] = x + (m0 + std::min(r, mr - 1)) * K;
  switch (mr) {
    case 6: tile<6>(xr, wb, K, bias, y, ys); break;
    case 5: tile<5>(xr, wb, K, bias, y, ys); break;
    case 4: tile<4>(xr, wb, K, bias, y, ys); break;
    case 3: tile<3>(xr, wb, K, bias, y, ys); break;
    case 2: tile<2>(xr, wb, K, bias, y, ys); break;
    default: tile<1>(xr, wb, K, bias, y, ys); break;
  }
}

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

void register_linear_f32(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("pack_f32", &pack_f32, "pack a float32 weight [N, K] for linear_f32 (N a multiple of 16)", release());
  m.def("linear_f32", &linear_f32, "x @ w.T (+ bias) from a pack_f32 weight, float32, each output summed in k order",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(), release());
#ifdef TS_AVX2_FMA
  m.attr("has_avx2_fma") = true;
#else
  m.attr("has_avx2_fma") = false;
#endif
}
