// The x side of the LM head's int8 screen, shared by greedy_head (linear_vnni.cpp, bf16) and greedy_head_f32
// (linear_f32.cpp, float32): each row quantised per row to int16 pairs for the int32 dot products against the int8
// weights of screen_weights (tierserve/model_executor/models/llama.py), with the figures its bounds need.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tierserve_screen {

// The largest |x16| for which no int32 sum of 2 * KP products with int8 weights (|w8| <= 127) can overflow.
inline int64_t x_qmax(int64_t KP) { return std::min<int64_t>(32767, int64_t{2147483647} / (127 * 2 * KP)); }

// Row x (value(i) for i < K; zero from K up to 2 * KP) to KP dwords of int16 pairs (feature 2 kp in the low word),
// |x_i - sx * x16_i| <= 0.51 sx (the rounding of x / sx included), and h1 >= sum |x_i| with twice the bound of that
// sum's rounding. Returns false (sx = 1, h1 = 0, xq untouched) for a row that is not finite, or a K so large that
// qmax < 127 (over ~130000 features): the caller then computes that row's every logit.
template <typename Value>
inline bool quantize_row(Value&& value, int64_t K, int64_t KP, int64_t qmax, int32_t* xq, float& sx, float& h1) {
  float amax = 0.f, sum = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    const float v = std::fabs(value(i));
    amax = std::max(amax, v);  // (a NaN is not taken by max: the sum below catches it)
    sum += v;
  }
  if (!std::isfinite(sum) || !std::isfinite(amax) || qmax < 127) {
    sx = 1.f;
    h1 = 0.f;
    return false;
  }
  sx = amax > 0.f ? amax / static_cast<float>(qmax) : 1.f;
  h1 = sum * (1.0f + static_cast<float>(4 * KP) * 0x1p-24f);
  const float inv = 1.0f / sx;
  for (int64_t kp = 0; kp < KP; ++kp) {
    const long lo = std::lrintf(value(2 * kp) * inv);
    const long hi = 2 * kp + 1 < K ? std::lrintf(value(2 * kp + 1) * inv) : 0;
    const int64_t clo = std::clamp<long>(lo, -qmax, qmax), chi = std::clamp<long>(hi, -qmax, qmax);
    xq[kp] = static_cast<int32_t>((static_cast<uint32_t>(chi) << 16) | (static_cast<uint32_t>(clo) & 0xffff));
  }
  return true;
}

}  // namespace tierserve_screen
