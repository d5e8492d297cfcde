// Paged attention kernels for CPU. They read K/V in place through the block tables (no gather copy), accumulate in
// float32 and use an exact two-pass softmax (scores for the visible keys, then p.V). Work is split over
// (sequence, kv head[, query tile]) items with torch's own thread pool (at::parallel_for).
//
// Cache layout per layer (the torch backend's): [2, Hkv, num_blocks, block_size, D], K then V.
// bf16 with AVX-512-BF16 uses dpbf16 dot products (bf16 x bf16 products are exact in fp32); other dtypes and CPUs
// take portable loops written for the compiler's vectoriser.

// torch's own SIMD vector types (exp_u20, vec_reduce_all), so the softmax rounds like its flash attention's; they
// must see the capability macros before any other torch header.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using tierserve_vec::f32;

// Keys per softmax split: torch's CPU flash attention's kv split size.
constexpr int64_t KV_SPLIT = 512;

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = f32(src[i]);
}

template <>
inline void load_row<at::BFloat16>(const at::BFloat16* __restrict src, float* __restrict dst, int64_t d) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < d; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
}

// Rows of one work item: row r is query token r / G, head r % G of the kv head's group.
template <typename T>
struct Rows {
  const T* q;           // first row
  int64_t tok_stride;   // elements between query tokens
  int64_t group;        // G
  int64_t d;
  const T* row(int64_t r) const { return q + (r / group) * tok_stride + (r % group) * d; }
};

template <typename T>
struct Span {  // where one item's K (or V) blocks live
  const T* base;
  const int64_t* blocks;
  int64_t block_size;
  int64_t block_stride;
  const T* block(int64_t t0) const { return base + blocks[t0 / block_size] * block_stride; }
};

#ifdef TS_AVX512_BF16
// In-register transpose of a 16 x 16 matrix of 32-bit elements: r[i] holds row i, afterwards r[c] holds column c.
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], 128-bit lane L: rows g..g+3 of column 4L + c
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(v, v2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v, v2, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(w, w2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(w, w2, 0xDD);
  }
}

// n <= 16 key rows of d bf16 (d % 32 == 0) -> kt[d][16] in fp32, one key per lane (lanes >= n are zero).
inline void transpose_keys(const at::BFloat16* k, int64_t n, int64_t d, float* kt) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t h = 0; h < d; h += 32) {
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i) r[i] = i < n ? _mm512_loadu_si512(k + i * d + h) : _mm512_setzero_si512();
    transpose16(r);  // r[c]: features h + 2c (low half) and h + 2c + 1 (high half) of the 16 keys
    for (int c = 0; c < 16; ++c) {
      _mm512_storeu_si512(kt + (h + 2 * c) * 16, _mm512_slli_epi32(r[c], 16));
      _mm512_storeu_si512(kt + (h + 2 * c + 1) * 16, _mm512_and_si512(r[c], hi_mask));
    }
  }
}

// Scores of one fp32 query row against the 16 keys of kt, summed the way torch's reference bf16 GEMM (the one its
// CPU flash attention calls) sums a dot product: four partial sums over features i % 4, each in feature order,
// then (s0 + s2) + (s1 + s3) (matched against its logsumexp output). Products of bf16 values are exact in fp32, so an FMA adds exactly what it adds.
inline __m512 scores16_rows(const float* qf, const float* kt, int64_t d) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= d; i += 4) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(kt + i * 16), _mm512_set1_ps(qf[i]), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(kt + (i + 1) * 16), _mm512_set1_ps(qf[i + 1]), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(kt + (i + 2) * 16), _mm512_set1_ps(qf[i + 2]), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(kt + (i + 3) * 16), _mm512_set1_ps(qf[i + 3]), a3);
  }
  for (; i < d; ++i) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(kt + i * 16), _mm512_set1_ps(qf[i]), a0);
  return _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
}

// acc[r] += p[r][j] * v[j] for NR rows and n keys, key by key in order (torch's reference GEMM order for p.V),
// d = 64 * DC features (DC zmm chunks of 16 per 64). p holds bf16-valued floats, so every product is exact.
template <int NR>
inline void values_seq(const float* p, int64_t p_stride, const at::BFloat16* v, int64_t n, int64_t d, float* acc) {
  for (int64_t f0 = 0; f0 < d; f0 += 64) {
    const int nc = static_cast<int>(std::min<int64_t>(4, (d - f0) / 16));
    __m512 a[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nc; ++c) a[r][c] = _mm512_loadu_ps(acc + r * d + f0 + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
      __m512 vv[4];
      for (int c = 0; c < nc; ++c) vv[c] = tierserve_vec::load16_bf16(v + j * d + f0 + 16 * c);
      for (int r = 0; r < NR; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * p_stride + j]);
        for (int c = 0; c < nc; ++c) a[r][c] = _mm512_fmadd_ps(vv[c], pj, a[r][c]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(acc + r * d + f0 + 16 * c, a[r][c]);
  }
}

// acc[r] += p[r][t] * v[t] for the keys t of vt (nt <= 4 row pointers, missing keys zero), the way MKL's bf16
// GEMV (torch's flash attention at one query row, i.e. decode) sums a group of four keys: acc + ((x0 + x2) + (x1 + x3)).
inline void values_group4(const float* p, int64_t p_stride, int64_t nr, const at::BFloat16* const* vt, int64_t nt,
                          int64_t d, float* acc) {
  for (int64_t f = 0; f < d; f += 16) {
    __m512 v[4];
    for (int64_t i = 0; i < 4; ++i) v[i] = i < nt ? tierserve_vec::load16_bf16(vt[i] + f) : _mm512_setzero_ps();
    for (int64_t r = 0; r < nr; ++r) {
      const float* pr = p + r * p_stride;
      const __m512 p0 = _mm512_set1_ps(pr[0]), p1 = _mm512_set1_ps(nt > 1 ? pr[1] : 0.f);
      const __m512 p2 = _mm512_set1_ps(nt > 2 ? pr[2] : 0.f), p3 = _mm512_set1_ps(nt > 3 ? pr[3] : 0.f);
      const __m512 x02 = _mm512_fmadd_ps(v[2], p2, _mm512_mul_ps(v[0], p0));
      const __m512 x13 = _mm512_fmadd_ps(v[3], p3, _mm512_mul_ps(v[1], p1));
      float* a = acc + r * d + f;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_add_ps(x02, x13)));
    }
  }
}

// acc[r] += p[r] * v for one key (an FMA: the product is exact).
inline void values_one(const float* p, int64_t p_stride, int64_t nr, const at::BFloat16* v, int64_t d, float* acc) {
  for (int64_t f = 0; f < d; f += 16) {
    const __m512 vv = tierserve_vec::load16_bf16(v + f);
    for (int64_t r = 0; r < nr; ++r) {
      float* a = acc + r * d + f;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(vv, _mm512_set1_ps(p[r * p_stride]), _mm512_loadu_ps(a)));
    }
  }
}

inline void values_rows(const float* p, int64_t p_stride, int64_t nr, const at::BFloat16* v, int64_t n, int64_t d,
                        float* acc) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) values_seq<4>(p + r * p_stride, p_stride, v, n, d, acc + r * d);
  for (; r < nr; ++r) values_seq<1>(p + r * p_stride, p_stride, v, n, d, acc + r * d);
}
#endif

// One work item: nq query rows against the first ctx keys of a sequence of kv_total keys (>= ctx: a prefill tile
// sees the keys up to its last token); row r sees keys [0, limit[r]), limits nondecreasing in r. Writes row r to out + (r / G) * out_tok_stride + (r % G) * d.
template <typename T>
void attend(const Rows<T>& qs, int64_t nq, const int64_t* limit, const Span<T>& ks, const Span<T>& vs, int64_t ctx,
            int64_t kv_total, bool one_row_order, float scale, T* out, int64_t out_tok_stride,
            std::vector<float>& scratch) {
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  scratch.resize(static_cast<size_t>(nq * d + nq * ctx + nq * d + d + 2 * nq + 16 * d));
  float* qf = scratch.data();
  float* sc = qf + nq * d;
  float* acc = sc + nq * ctx;
  float* row = acc + nq * d;
  float* inv_z = row + d;
  float* run_sum = inv_z + nq;
  float* kt = run_sum + nq;  // 16 keys transposed, [d][16]
#ifdef TS_AVX512_BF16
  constexpr bool fast_type = std::is_same_v<T, at::BFloat16>;
#else
  constexpr bool fast_type = false;
#endif
  const bool fast = fast_type && d % 32 == 0;
  for (int64_t r = 0; r < nq; ++r) load_row(qs.row(r), qf + r * d, d);
  // First row that sees key t (limits are nondecreasing).
  auto first_row = [&](int64_t t) {
    return static_cast<int64_t>(std::upper_bound(limit, limit + nq, t) - limit);
  };
  // Pass 1: scores.
  for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
    const int64_t n = std::min(bs, ctx - t0), r0 = first_row(t0);
    if (r0 >= nq) break;
    const T* kb = ks.block(t0);
    if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
      if (fast) {
        const __m512 sv = _mm512_set1_ps(scale);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t m = std::min<int64_t>(16, n - j0);
          const __mmask16 mk = static_cast<__mmask16>((1u << m) - 1u);
          transpose_keys(kb + j0 * d, m, d, kt);
          for (int64_t r = r0; r < nq; ++r) {
            _mm512_mask_storeu_ps(sc + r * ctx + t0 + j0, mk, _mm512_mul_ps(scores16_rows(qf + r * d, kt, d), sv));
          }
        }
        continue;
      }
#endif
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* k = kb + j * d;
      load_row(k, row, d);
      for (int64_t r = r0; r < nq; ++r) {
        const float* qr = qf + r * d;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d; ++i) s += qr[i] * row[i];
        sc[r * ctx + t0 + j] = s * scale;  // scaled after the dot product, as torch's flash kernel does
      }
    }
  }
  // Softmax and p.V in torch's CPU flash-attention order (what transformers' SDPA runs), so that bf16 results round
  // like it: keys in splits of KV_SPLIT with an online softmax across splits (running max m, sum z, acc rescaled by
  // exp(m_old - m_new)); within a split e = exp(s - m) over the split's kv_total-based width - the first multiple of
  // 16 keys with at::vec's exp_u20, the rest with std::exp - summed lane-wise then the rest in order; e stored in the
  // storage dtype for p.V (a no-op for fp32); the division by z applied to the fp32 accumulator at the end.
  // Invisible keys get weight 0.
  float* run_max = inv_z;  // inv_z doubles as the running max until the end
  std::fill(run_sum, run_sum + nq, 0.f);
  std::fill(run_max, run_max + nq, -std::numeric_limits<float>::infinity());
  std::fill(acc, acc + nq * d, 0.f);
  for (int64_t n0 = 0; n0 < ctx; n0 += KV_SPLIT) {
    const int64_t width = std::min(KV_SPLIT, kv_total - n0);  // torch's kvBlockSize
    const int64_t nend = std::min(n0 + width, ctx);            // keys with scores here
    const int64_t vend = n0 + width / 16 * 16;                  // end of the vectorised exp
    const int64_t r_first = first_row(n0);
    for (int64_t r = r_first; r < nq; ++r) {
      float* s = sc + r * ctx;
      const int64_t lim = std::min(limit[r], nend);
      float bm = -std::numeric_limits<float>::infinity();
      for (int64_t t = n0; t < lim; ++t) bm = std::max(bm, s[t]);
      const float m = std::max(run_max[r], bm);
      float z = 0.f;
      int64_t t = n0;
#ifdef TS_AVX512_BF16
      {
        using Vec = at::vec::Vectorized<float>;
        const __m512 mv = _mm512_set1_ps(m);
        Vec zv(0.f);
        for (; t < std::min(vend, lim); t += 16) {
          const __mmask16 k = lim - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (lim - t)) - 1u);
          const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), k, s + t);
          const __m512 xm = _mm512_sub_ps(x, mv);
          // bf16: torch's fast exp (its flash attention's, ~1e-5 relative - below bf16's rounding of p, but z sees
          // it); other dtypes keep a ~1 ulp exp.
          const __m512 e = _mm512_maskz_mov_ps(k, std::is_same_v<T, at::BFloat16> ? __m512(Vec(xm).fexp_u20())
                                                                                 : tierserve_vec::exp512(xm));
          zv = zv + Vec(e);
          const __m512 stored = std::is_same_v<T, at::BFloat16>
                                    ? tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(e)) : e;
          _mm512_mask_storeu_ps(s + t, k, stored);
        }
        z = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, zv);
        t = std::max(t, n0);
      }
#endif
      for (; t < lim; ++t) {
        const float e = std::exp(s[t] - m);
        z += e;
        s[t] = tierserve_vec::f32(static_cast<T>(e));
      }
      for (int64_t u = std::max(lim, n0); u < nend; ++u) s[u] = 0.f;
      const float rescale = std::exp(run_max[r] - m);
      run_sum[r] = z + rescale * run_sum[r];
      run_max[r] = m;
      if (n0 > 0) {
        float* a = acc + r * d;
        for (int64_t i = 0; i < d; ++i) a[i] *= rescale;
      }
    }
    // p.V over this split's keys.
#ifdef TS_AVX512_BF16
    if (fast && one_row_order) {
      // Decode: MKL's GEMV order - groups of four keys from the split's start, then the keys past the last whole
      // group (of the split's torch width) one at a time from the last one back.
      const int64_t gend = n0 + width / 4 * 4, vis = std::min(n0 + width, nend);
      auto vrow = [&](int64_t t) { return vs.block(t) + (t % bs) * d; };
      for (int64_t t = n0; t < std::min(gend, nend); t += 4) {
        const int64_t r0 = first_row(t), nt = std::min<int64_t>(4, nend - t);
        if (r0 >= nq) break;
        const at::BFloat16* vt[4];
        for (int64_t i = 0; i < nt; ++i) vt[i] = reinterpret_cast<const at::BFloat16*>(vrow(t + i));
        values_group4(sc + r0 * ctx + t, ctx, nq - r0, vt, nt, d, acc + r0 * d);
      }
      for (int64_t t = vis - 1; t >= gend; --t) {
        const int64_t r0 = first_row(t);
        if (r0 < nq) {
          values_one(sc + r0 * ctx + t, ctx, nq - r0, reinterpret_cast<const at::BFloat16*>(vrow(t)), d,
                     acc + r0 * d);
        }
      }
      continue;
    }
#endif
    for (int64_t t0 = n0; t0 < nend;) {
      const int64_t off = t0 % bs, n = std::min(bs - off, nend - t0), r0 = first_row(t0);
      const T* vb = vs.block(t0) + off * d;
      if (r0 < nq) {
        bool done = false;
        if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
          if (fast) {
            values_rows(sc + r0 * ctx + t0, ctx, nq - r0, vb, n, d, acc + r0 * d);
            done = true;
          }
#endif
        }
        if (!done) {
          for (int64_t j = 0; j < n; ++j) {
            load_row(vb + j * d, row, d);
            for (int64_t r = r0; r < nq; ++r) {
              const float p = sc[r * ctx + t0 + j];
              float* a = acc + r * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) a[i] += p * row[i];
            }
          }
        }
      }
      t0 += n;
    }
  }
  for (int64_t r = 0; r < nq; ++r) inv_z[r] = 1.f / run_sum[r];
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const float* ar = acc + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(ar[i] * inv_z[r]);
  }
}


// ---- prefill through MKL's bf16 GEMM, with torch's flash-attention call shapes ----
// torch's CPU wheels run SDPA's bf16 GEMMs through MKL (cblas_gemm_bf16bf16f32), whose summation order depends on
// the shapes it is called with. For prefill, where those shapes are large and the GEMMs efficient, we call it with
// the same shapes as torch (per query head: a q block of torch's q split size against a key split of up to 512), so
// a prompt's attention rounds exactly as transformers' does. Looked up at run time; absent -> the SIMD kernel.
using gemm_bf16_fn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                              float*, int);

gemm_bf16_fn mkl_gemm_bf16() {
  static const gemm_bf16_fn fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, "cblas_gemm_bf16bf16f32") : nullptr;
    return reinterpret_cast<gemm_bf16_fn>(sym);
  }();
  return fn;
}
constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112;

// torch's q split size for a query of q_len tokens (FlashAttentionKernel.cpp).
inline int64_t torch_q_split(int64_t q_len) { return q_len >= 768 ? 256 : q_len >= 192 ? 64 : 32; }

#ifdef TS_AVX512_BF16
// n_tok query tokens at positions first_pos.. of a sequence of kv_total keys, heads g = 0..G-1 of one kv head (row
// t, g at q + t * tok_stride + g * d); causal. Output row (t, g) at out + t * out_tok_stride + g * d.
template <typename T>
void attend_prefill_mkl(gemm_bf16_fn gemm, const T* q, int64_t tok_stride, int64_t G, int64_t d, int64_t n_tok,
                        int64_t first_pos, const Span<T>& ks, const Span<T>& vs, int64_t kv_total, float scale, T* out,
                        int64_t out_tok_stride, std::vector<float>& scratch) {
 if constexpr (std::is_same_v<T, at::BFloat16>) {
  using Vec = at::vec::Vectorized<float>;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t bs = ks.block_size, num_keys = std::min(first_pos + n_tok, kv_total);
  const int64_t split = std::min(KV_SPLIT, kv_total);
  const int64_t span = std::min(kv_total, (num_keys + KV_SPLIT - 1) / KV_SPLIT * KV_SPLIT);  // keys the GEMMs read
  scratch.resize(static_cast<size_t>(span * d + n_tok * split + n_tok * d + 2 * n_tok + n_tok * split / 2 + 16));
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(scratch.data());  // the keys' K rows then V rows, bf16
  uint16_t* vbuf = kbuf + span * d;
  float* qk = scratch.data() + span * d;
  float* dst = qk + n_tok * split;
  float* mx = dst + n_tok * d;
  float* sm = mx + n_tok;
  uint16_t* pb = reinterpret_cast<uint16_t*>(sm + n_tok);
  for (int64_t t = 0; t < span;) {  // gathered once for the group's heads
    const int64_t off = t % bs, n = std::min(bs - off, span - t);
    std::memcpy(kbuf + t * d, ks.block(t) + off * d, static_cast<size_t>(n * d) * sizeof(uint16_t));
    std::memcpy(vbuf + t * d, vs.block(t) + off * d, static_cast<size_t>(n * d) * sizeof(uint16_t));
    t += n;
  }
  for (int64_t g = 0; g < G; ++g) {
    std::fill(mx, mx + n_tok, ninf);
    std::fill(sm, sm + n_tok, 0.f);
    for (int64_t n0 = 0; n0 < num_keys; n0 += KV_SPLIT) {
      const int64_t kvb = std::min(KV_SPLIT, kv_total - n0);
      gemm(kColMajor, kTrans, kNoTrans, static_cast<int>(kvb), static_cast<int>(n_tok), static_cast<int>(d), 1.f,
           kbuf + n0 * d, static_cast<int>(d), reinterpret_cast<const uint16_t*>(q + g * d), static_cast<int>(tok_stride),
           0.f, qk, static_cast<int>(kvb));
      if (num_keys - n0 <= KV_SPLIT) {  // causal mask
        for (int64_t r = 0; r < n_tok; ++r) {
          for (int64_t c = std::max<int64_t>(0, first_pos + r - n0 + 1); c < kvb; ++c) qk[r * kvb + c] = ninf;
        }
      }
      const int64_t nv = kvb / 16 * 16;
      for (int64_t r = 0; r < n_tok; ++r) {
        float* s = qk + r * kvb;
        Vec vm(ninf);
        float m = ninf;
        for (int64_t c = 0; c < nv; c += 16) {
          const Vec x = Vec::loadu(s + c) * Vec(scale);
          vm = at::vec::maximum(vm, x);
          x.store(s + c);
        }
        for (int64_t c = nv; c < kvb; ++c) {
          s[c] *= scale;
          m = std::max(m, s[c]);
        }
        m = std::max(m, at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm));
        m = mx[r] > m ? mx[r] : m;
        uint16_t* pr = pb + r * kvb;
        Vec zv(0.f);
        for (int64_t c = 0; c < nv; c += 16) {
          const Vec e = (Vec::loadu(s + c) - Vec(m)).fexp_u20();
          zv = zv + e;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), tierserve_vec::to_bf16(e));
        }
        float z = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, zv);
        for (int64_t c = nv; c < kvb; ++c) {
          const float e = std::exp(s[c] - m);
          z += e;
          pr[c] = c10::BFloat16(e).x;
        }
        const float et = std::exp(mx[r] - m);
        sm[r] = z + et * sm[r];
        mx[r] = m;
        if (n0 > 0) {
          for (int64_t i = 0; i < d; ++i) dst[r * d + i] *= et;
        }
      }
      gemm(kColMajor, kNoTrans, kNoTrans, static_cast<int>(d), static_cast<int>(n_tok), static_cast<int>(kvb), 1.f,
           vbuf + n0 * d, static_cast<int>(d), pb, static_cast<int>(kvb), n0 == 0 ? 0.f : 1.f, dst, static_cast<int>(d));
    }
    for (int64_t r = 0; r < n_tok; ++r) {
      const float inv = 1.f / sm[r];
      at::BFloat16* o = out + r * out_tok_stride + g * d;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<at::BFloat16>(dst[r * d + i] * inv);
    }
  }
 }
}
#endif

void check_common(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5, "paged attention: q [T,H,D], cache [2,Hkv,NB,bs,D]");
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "paged attention: CPU tensors only");
  TORCH_CHECK(cache.is_contiguous() && block_tables.is_contiguous(), "paged attention: contiguous cache/tables");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong, "paged attention: int64 block tables");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "paged attention: q and cache dtypes differ");
  TORCH_CHECK(cache.size(4) == q.size(2) && q.size(1) % cache.size(1) == 0, "paged attention: head shapes disagree");
}

// Decode: q [B, H, D] (one token per sequence), block_tables [B, max_blocks], seq_lens [B] (context incl. the new
// token, already written to the cache) -> [B, H, D].
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables,
                           const torch::Tensor& seq_lens, double scale) {
  check_common(q, cache, block_tables);
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(), "paged_decode: int64 seq_lens");
  auto qc = q.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2);
  const int64_t Hkv = cache.size(1), NB = cache.size(2), bs = cache.size(3);
  const int64_t G = H / Hkv, max_blocks = block_tables.size(1);
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode: batch sizes disagree");
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] > 0 && sl[b] <= max_blocks * bs, "paged_decode: sequence length out of range");
  }
  auto out = torch::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t head_stride = NB * bs * D, v_off = Hkv * head_stride;
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      std::vector<int64_t> limit(G);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / Hkv, h = w % Hkv, ctx = sl[b];
        std::fill(limit.begin(), limit.end(), ctx);
        const Rows<scalar_t> rows{qp + (b * H + h * G) * D, H * D, G, D};
        const Span<scalar_t> ks{kp + h * head_stride, bt + b * max_blocks, bs, bs * D};
        const Span<scalar_t> vs{kp + v_off + h * head_stride, bt + b * max_blocks, bs, bs * D};
        attend<scalar_t>(rows, G, limit.data(), ks, vs, ctx, ctx, true, static_cast<float>(scale), op + (b * H + h * G) * D,
                         H * D, scratch);
      }
    });
  });
  return out;
}

// Prefill chunks: q [T, H, D] holds the chunks back to back (chunk p is tokens query_start[p]..query_start[p+1]),
// chunk p ends at position seq_lens[p] (its earlier context already cached; its own K/V written) -> [T, H, D],
// causal. Chunks are split into query tiles of `tile` tokens for load balance.
torch::Tensor paged_prefill(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables,
                            const torch::Tensor& query_start, const torch::Tensor& seq_lens, double scale,
                            int64_t tile) {
  check_common(q, cache, block_tables);
  TORCH_CHECK(query_start.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  query_start.is_contiguous() && seq_lens.is_contiguous(),
              "paged_prefill: int64 query_start / seq_lens");
  auto qc = q.contiguous();
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2);
  const int64_t Hkv = cache.size(1), NB = cache.size(2), bs = cache.size(3);
  const int64_t G = H / Hkv, P = seq_lens.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(block_tables.size(0) == P && query_start.size(0) == P + 1, "paged_prefill: batch sizes disagree");
  TORCH_CHECK(tile > 0, "paged_prefill: tile must be positive");
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* qs = query_start.data_ptr<int64_t>();
  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  TORCH_CHECK(qs[0] == 0 && qs[P] == T, "paged_prefill: query_start must span q");
  // Work items (chunk, first token of the tile); kv heads are the inner index.
#ifdef TS_AVX512_BF16
  const gemm_bf16_fn mkl = q.scalar_type() == at::kBFloat16 ? mkl_gemm_bf16() : nullptr;
#else
  const gemm_bf16_fn mkl = nullptr;
#endif
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t qlen = qs[p + 1] - qs[p];
    TORCH_CHECK(qlen >= 0 && qlen <= sl[p] && sl[p] <= max_blocks * bs, "paged_prefill: lengths out of range");
    for (int64_t i = 0; i < qlen; i += mkl ? torch_q_split(qlen) : tile) tiles.emplace_back(p, i);
  }
  auto out = torch::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_prefill", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t head_stride = NB * bs * D, v_off = Hkv * head_stride;
    const int64_t n_items = static_cast<int64_t>(tiles.size()) * Hkv;
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      std::vector<int64_t> limit;
      for (int64_t w = begin; w < end; ++w) {
        const auto [p, i0] = tiles[w / Hkv];
        const int64_t h = w % Hkv;
        const int64_t qlen = qs[p + 1] - qs[p];
        const int64_t n_tok = std::min(mkl ? torch_q_split(qlen) : tile, qlen - i0);
        const int64_t first_pos = sl[p] - qlen + i0;  // position of the tile's first token
        const int64_t ctx = first_pos + n_tok;
        limit.resize(n_tok * G);
        for (int64_t r = 0; r < n_tok * G; ++r) limit[r] = first_pos + r / G + 1;
        const int64_t tok = qs[p] + i0;
        const Rows<scalar_t> rows{qp + (tok * H + h * G) * D, H * D, G, D};
        const Span<scalar_t> ks{kp + h * head_stride, bt + p * max_blocks, bs, bs * D};
        const Span<scalar_t> vs{kp + v_off + h * head_stride, bt + p * max_blocks, bs, bs * D};
#ifdef TS_AVX512_BF16
        if (std::is_same_v<scalar_t, at::BFloat16>) {
          if (mkl) {
            attend_prefill_mkl<scalar_t>(mkl, qp + tok * H * D + h * G * D, H * D, G, D, n_tok, first_pos, ks, vs, sl[p],
                               static_cast<float>(scale), op + tok * H * D + h * G * D, H * D, scratch);
            continue;
          }
        }
#endif
        attend<scalar_t>(rows, n_tok * G, limit.data(), ks, vs, ctx, sl[p], false, static_cast<float>(scale),
                         op + (tok * H + h * G) * D, H * D, scratch);
      }
    });
  });
  return out;
}

}  // namespace

// For decode_layers (fused_ops.cpp): the decode kernel with external linkage.
torch::Tensor ts_paged_decode(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables,
                              const torch::Tensor& seq_lens, double scale) {
  return paged_decode(q, cache, block_tables, seq_lens, scale);
}

void register_fused_ops(pybind11::module& m);    // fused_ops.cpp
void register_linear_vnni(pybind11::module& m);  // linear_vnni.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_fused_ops(m);
  register_linear_vnni(m);
#ifdef TS_AVX512_BF16
  m.attr("has_avx512_bf16") = true;
#else
  m.attr("has_avx512_bf16") = false;
#endif
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, "Paged decode attention reading K/V in place (CPU)", release());
  m.def("paged_prefill", &paged_prefill, "Paged causal attention for prefill chunks, K/V read in place (CPU)",
        release());
}
