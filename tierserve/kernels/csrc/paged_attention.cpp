// Paged attention kernels for CPU. They read K/V in place through the block tables (no gather copy), accumulate in
// float32: scores for the visible keys, then a softmax and p.V over splits of 512 keys with an online rescale between
// splits, in the order and at the rounding points of torch's CPU flash attention (what transformers' SDPA runs), so
// bf16 outputs are bit-identical to SDPA's on 99.9-100% of elements (tested). Work is split over (sequence, kv head[,
// query tile]) items with torch's own thread pool (at::parallel_for).
//
// Cache layout per layer (the torch backend's): [2, Hkv, num_blocks, block_size, D], K then V.
// bf16 with AVX-512-BF16 uses dpbf16 dot products (bf16 x bf16 products are exact in fp32); other dtypes and CPUs
// take portable loops written for the compiler's vectoriser.

// torch's own SIMD vector types (fexp_u20, vec_reduce_all), so the softmax rounds like its flash attention's; they
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
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using tierserve_vec::f32;

// Keys per softmax split: torch's CPU flash attention's kv split size.
constexpr int64_t KV_SPLIT = 512;

#ifndef TS_KEY_PREFETCH_BLOCKS
#define TS_KEY_PREFETCH_BLOCKS 3
#endif
// How many blocks ahead pass 1 asks for keys: a block's scores take less time than a DRAM round trip.
constexpr int64_t KEY_PREFETCH_BLOCKS = TS_KEY_PREFETCH_BLOCKS;

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
  // Ask for the n rows of d elements from key t0 (within one block) ahead of their use. A block of one head is a
  // few KiB at a scattered address: too short for the hardware prefetcher to ramp up, so without this every block
  // starts with cache misses (decode attention ran at ~1/3 of the memory bandwidth, stalled on its first loads).
  template <int Locality>
  void prefetch(int64_t t0, int64_t n, int64_t d) const {
    const char* p = reinterpret_cast<const char*>(block(t0) + (t0 % block_size) * d);
    const int64_t bytes = n * d * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, Locality);
  }
};

#ifdef TS_AVX512_BF16
// v[j] -> lane j of the result = horizontal sum of v[j], for 16 vectors (a transpose-and-add tree: ~3 shuffles/adds
// per vector instead of a full horizontal reduction each).
inline __m512 hsum16(const __m512* v) {
  __m512 u[4];
  for (int g = 0; g < 4; ++g) {
    const __m512 a = v[4 * g], b = v[4 * g + 1], c = v[4 * g + 2], e = v[4 * g + 3];
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
    const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    u[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
  }
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

// Scores of one query row against n <= 16 consecutive keys (rows of d bf16, d % 32 == 0). Full: n is 16, known at
// compile time, so there is no key-count test inside and the accumulators stay in registers (the common case).
template <bool Full>
inline void scores16_bf16(const at::BFloat16* qr, const at::BFloat16* k, int64_t n, int64_t d, float scale,
                          float* out) {
  const int64_t cnt = Full ? 16 : n;
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t v = 0; v < d; v += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + v);
    for (int64_t j = 0; j < cnt; ++j) {
      acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512(k + j * d + v));
    }
  }
  const __m512 s = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
  if (Full) {
    _mm512_storeu_ps(out, s);
  } else {
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), s);
  }
}

// acc[r] += sum_j p[r][j] * v[j] for NR rows and n keys, D = 32 * DH, with bf16 dot products over pairs of keys:
// the rows of keys j and j+1 are interleaved (unpacklo/hi of 16-bit words) so that each fp32 lane holds one feature
// of both, and the row's (p[j], p[j+1]) pair is broadcast - one dpbf16 does two keys' multiply-adds. The p are
// already bf16 values (rounded like torch's SDPA), so the products are exact; pairs of keys are summed first, the
// order of a bf16 GEMM over the keys. The unpacks work within 128-bit lanes, so the accumulator holds the features
// permuted: see pv_index. acc is kept in that order between blocks.
template <int NR, int DH>
inline void values_block_bf16(const uint16_t* p, int64_t p_stride, const at::BFloat16* v, int64_t n, float* acc) {
  constexpr int64_t d = 32 * DH;
  __m512 a[NR][2 * DH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) a[r][c] = _mm512_loadu_ps(acc + r * d + 16 * c);
  for (int64_t j = 0; j < n; j += 2) {
    const bool pair = j + 1 < n;
    __m512i lo[DH], hi[DH];
    for (int h = 0; h < DH; ++h) {
      const __m512i v0 = _mm512_loadu_si512(v + j * d + 32 * h);
      const __m512i v1 = pair ? _mm512_loadu_si512(v + (j + 1) * d + 32 * h) : _mm512_setzero_si512();
      lo[h] = _mm512_unpacklo_epi16(v0, v1);
      hi[h] = _mm512_unpackhi_epi16(v0, v1);
    }
    for (int r = 0; r < NR; ++r) {
      int32_t p01;  // (p[j], p[j + 1]) as one dword; p[j + 1] meets a zero row when j is the block's last key
      std::memcpy(&p01, p + r * p_stride + j, sizeof(p01));
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(p01);
      for (int h = 0; h < DH; ++h) {
        a[r][2 * h] = _mm512_dpbf16_ps(a[r][2 * h], pp, (__m512bh)lo[h]);
        a[r][2 * h + 1] = _mm512_dpbf16_ps(a[r][2 * h + 1], pp, (__m512bh)hi[h]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) _mm512_storeu_ps(acc + r * d + 16 * c, a[r][c]);
}

template <int DH>
inline void values_rows_bf16(const uint16_t* p, int64_t p_stride, int64_t nr, const at::BFloat16* v, int64_t n,
                             float* acc) {
  constexpr int64_t d = 32 * DH;
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) values_block_bf16<4, DH>(p + r * p_stride, p_stride, v, n, acc + r * d);
  switch (nr - r) {
    case 3: values_block_bf16<3, DH>(p + r * p_stride, p_stride, v, n, acc + r * d); break;
    case 2: values_block_bf16<2, DH>(p + r * p_stride, p_stride, v, n, acc + r * d); break;
    case 1: values_block_bf16<1, DH>(p + r * p_stride, p_stride, v, n, acc + r * d); break;
    default: break;
  }
}
#endif

// Where values_block_bf16 keeps feature i of a row: 32-feature half h = i / 32, 128-bit lane q = (i % 32) / 8; the
// low four words of each lane went to the "lo" vector (2h), the high four to "hi" (2h + 1).
inline int64_t pv_index(int64_t i) {
  const int64_t h = i / 32, q = (i % 32) / 8, w = i % 8;
  return (2 * h + w / 4) * 16 + 4 * q + w % 4;
}

// One work item: nq query rows against the first ctx keys of a sequence of kv_total keys (>= ctx: a prefill tile
// sees the keys up to its last token); row r sees keys [0, limit[r]), limits nondecreasing in r. Writes row r to
// out + (r / G) * out_tok_stride + (r % G) * d.
template <typename T>
void attend(const Rows<T>& qs, int64_t nq, const int64_t* limit, const Span<T>& ks, const Span<T>& vs, int64_t ctx,
            int64_t kv_total, float scale, T* out, int64_t out_tok_stride, std::vector<float>& scratch) {
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  const int64_t ctx_even = (ctx + 2) / 2 * 2;  // p rows in bf16 for pass 2, with at least one zero past the end
  scratch.resize(static_cast<size_t>(nq * d + nq * ctx + nq * d + d + 2 * nq + nq * ctx_even / 2));
  float* qf = scratch.data();
  float* sc = qf + nq * d;
  float* acc = sc + nq * ctx;
  float* row = acc + nq * d;
  float* run_max = row + d;  // online softmax: running max and sum per row
  float* run_sum = run_max + nq;
  uint16_t* pb = reinterpret_cast<uint16_t*>(run_sum + nq);
#ifdef TS_AVX512_BF16
  constexpr bool fast_type = std::is_same_v<T, at::BFloat16>;
#else
  constexpr bool fast_type = false;
#endif
  const bool fast = fast_type && d % 32 == 0;
  if (!fast) {
    for (int64_t r = 0; r < nq; ++r) {
      load_row(qs.row(r), qf + r * d, d);
    }
  }
  // First row that sees key t (limits are nondecreasing).
  auto first_row = [&](int64_t t) {
    return static_cast<int64_t>(std::upper_bound(limit, limit + nq, t) - limit);
  };
  // Pass 1: scores.
  for (int64_t t0 = 0; t0 < std::min(ctx, KEY_PREFETCH_BLOCKS * bs); t0 += bs) {
    ks.template prefetch<3>(t0, std::min(bs, ctx - t0), d);  // the first blocks (the loop below asks further ahead)
  }
  for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
    const int64_t n = std::min(bs, ctx - t0), r0 = first_row(t0);
    if (r0 >= nq) break;
    const T* kb = ks.block(t0);
    const int64_t ahead = t0 + KEY_PREFETCH_BLOCKS * bs;  // keys a few blocks ahead, into L1
    if (ahead < ctx) ks.template prefetch<3>(ahead, std::min(bs, ctx - ahead), d);
    vs.template prefetch<2>(t0, n, d);  // this block's values, into L2 for pass 2
    if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
      if (fast) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t m = std::min<int64_t>(16, n - j0);
          for (int64_t r = r0; r < nq; ++r) {
            float* out = sc + r * ctx + t0 + j0;
            if (m == 16) {
              scores16_bf16<true>(qs.row(r), kb + j0 * d, m, d, scale, out);
            } else {
              scores16_bf16<false>(qs.row(r), kb + j0 * d, m, d, scale, out);
            }
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
  // 16 keys with at::vec's fexp_u20 (bf16), the rest with std::exp - summed lane-wise then the rest in order; e
  // stored in the storage dtype for p.V (a no-op for fp32); the division by z applied to the fp32 accumulator at the
  // end.
  // Invisible keys get weight 0.
  std::fill(run_sum, run_sum + nq, 0.f);
  std::fill(run_max, run_max + nq, -std::numeric_limits<float>::infinity());
  std::fill(acc, acc + nq * d, 0.f);
  bool permuted = false;  // acc in values_block_bf16's feature order
  for (int64_t n0 = 0; n0 < ctx; n0 += KV_SPLIT) {
    const int64_t width = std::min(KV_SPLIT, kv_total - n0);  // torch's kvBlockSize
    const int64_t nend = std::min(n0 + width, ctx);            // keys with scores here
    const int64_t vend = n0 + width / 16 * 16;                  // end of the vectorised exp
    const int64_t r_first = first_row(n0);
    for (int64_t r = r_first; r < nq; ++r) {
      float* s = sc + r * ctx;
      const int64_t lim = std::min(limit[r], nend);
      float bm = -std::numeric_limits<float>::infinity();
      int64_t t1 = n0;
#ifdef TS_AVX512_BF16
      {  // a scalar max is one long dependency chain (~8% of decode attention's time)
        __m512 mv = _mm512_set1_ps(bm);
        for (; t1 + 16 <= lim; t1 += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t1));
        bm = _mm512_reduce_max_ps(mv);
      }
#endif
      for (; t1 < lim; ++t1) bm = std::max(bm, s[t1]);
      const float m = std::max(run_max[r], bm);
      float z = 0.f;
      int64_t t = n0;
      int64_t pb_done = n0;  // p's bf16 bits are in pb up to here
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
          // bf16: torch's fast exp (its flash attention's; ~1e-5 relative, below bf16's rounding of p, but the sum
          // z sees it); other dtypes keep a ~1 ulp exp.
          const __m512 e = _mm512_maskz_mov_ps(k, std::is_same_v<T, at::BFloat16> ? __m512(Vec(xm).fexp_u20())
                                                                                 : tierserve_vec::exp512(xm));
          zv = zv + Vec(e);
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            const __m256i eb = tierserve_vec::to_bf16(e);
            _mm512_mask_storeu_ps(s + t, k, tierserve_vec::bf16x16_to_f32(eb));
            _mm256_mask_storeu_epi16(pb + r * ctx_even + t, k, eb);  // p's bf16 bits for pass 2
          } else {
            _mm512_mask_storeu_ps(s + t, k, e);
          }
        }
        pb_done = std::min(t, lim);  // a masked last vector may end past lim
        z = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, zv);
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
      if constexpr (std::is_same_v<T, at::BFloat16>) {  // the bf16 bits of p (exact: p is already bf16-valued)
        uint16_t* pr = pb + r * ctx_even;
        for (int64_t u = pb_done; u < nend; ++u) pr[u] = c10::BFloat16(s[u]).x;
        pr[nend] = 0;  // the partner of an odd block's last key (overwritten by the next split)
      }
    }
    // p.V over this split's keys, block by block.
    for (int64_t t0 = n0; t0 < nend;) {
      const int64_t off = t0 % bs, n = std::min(bs - off, nend - t0), r0 = first_row(t0);
      const T* vb = vs.block(t0) + off * d;
      if (r0 < nq) {
        bool done = false;
        if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
          if (fast && (d == 64 || d == 128)) {
            if (d == 64) {
              values_rows_bf16<2>(pb + r0 * ctx_even + t0, ctx_even, nq - r0, vb, n, acc + r0 * d);
            } else {
              values_rows_bf16<4>(pb + r0 * ctx_even + t0, ctx_even, nq - r0, vb, n, acc + r0 * d);
            }
            permuted = true;
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
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const float* ar = acc + r * d;
    const float inv_z = 1.f / run_sum[r];  // torch multiplies by the reciprocal too
    if (permuted) {
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(ar[pv_index(i)] * inv_z);
    } else {
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(ar[i] * inv_z);
    }
  }
}

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
        if (w + 1 < end) {  // the next item's first keys, while this one computes
          const int64_t b1 = (w + 1) / Hkv, h1 = (w + 1) % Hkv;
          const Span<scalar_t> k1{kp + h1 * head_stride, bt + b1 * max_blocks, bs, bs * D};
          k1.template prefetch<3>(0, std::min(bs, sl[b1]), D);
        }
        attend<scalar_t>(rows, G, limit.data(), ks, vs, ctx, ctx, static_cast<float>(scale), op + (b * H + h * G) * D,
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
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t qlen = qs[p + 1] - qs[p];
    TORCH_CHECK(qlen >= 0 && qlen <= sl[p] && sl[p] <= max_blocks * bs, "paged_prefill: lengths out of range");
    for (int64_t i = 0; i < qlen; i += tile) tiles.emplace_back(p, i);
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
        const int64_t qlen = qs[p + 1] - qs[p], n_tok = std::min(tile, qlen - i0);
        const int64_t first_pos = sl[p] - qlen + i0;  // position of the tile's first token
        const int64_t ctx = first_pos + n_tok;
        limit.resize(n_tok * G);
        for (int64_t r = 0; r < n_tok * G; ++r) limit[r] = first_pos + r / G + 1;
        const int64_t tok = qs[p] + i0;
        const Rows<scalar_t> rows{qp + (tok * H + h * G) * D, H * D, G, D};
        const Span<scalar_t> ks{kp + h * head_stride, bt + p * max_blocks, bs, bs * D};
        const Span<scalar_t> vs{kp + v_off + h * head_stride, bt + p * max_blocks, bs, bs * D};
        attend<scalar_t>(rows, n_tok * G, limit.data(), ks, vs, ctx, sl[p], static_cast<float>(scale),
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
