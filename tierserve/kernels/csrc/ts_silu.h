// silu(g) * u for 16 bf16-valued lanes, rounded as transformers' bf16 F.silu(g) * u rounds it: silu in fp32 with
// torch's own exp (its Sleef vector exp, 1 ulp: F.silu's vector path is x / (1 + exp(-x))), rounded to bf16, times u,
// rounded to bf16. Shared by silu_mul (fused_ops.cpp) and the SwiGLU epilogue of linear_amx (linear_amx.cpp).
//
// The including file must define CPU_CAPABILITY (as fused_ops.cpp does) before any torch header, so that at::vec's
// exp is the AVX-512 one torch itself runs.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "vec.h"

#ifdef TS_AVX512_BF16
namespace tierserve_vec {

// g, u: bf16 values held as floats -> the bf16 result (16 lanes).
inline __m256i silu_mul16(__m512 g, __m512 u) {
  const __m512 e = at::vec::Vectorized<float>(_mm512_sub_ps(_mm512_setzero_ps(), g)).exp();
  const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return to_bf16(_mm512_mul_ps(bf16x16_to_f32(to_bf16(s)), u));
}

}  // namespace tierserve_vec
#endif
