// float32 register tiles shared by linear_f32 (linear_f32.cpp) and the float32 prefill attention
// (paged_attention.cpp): R rows of x against one block of 16 outputs whose weights are laid out [K][16].
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace tierserve_f32 {

constexpr int64_t kBlock = 16;

#if defined(__AVX2__) && defined(__FMA__)
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

#endif

}  // namespace tierserve_f32
