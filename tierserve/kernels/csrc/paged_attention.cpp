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

#include "parallel.h"
#include "tile_f32.h"
#include "vec.h"

namespace {

using tierserve_vec::f32;


// The summation order of torch's bf16 BLAS for one-row query blocks (decode), which MKL picks by CPU: 0 "gemv4"
// (measured on an AMD EPYC Zen 4), 1 "ymm8" (a Xeon with AMX). Set once per process from Python
// (set_decode_order), after a probe against SDPA (tierserve.kernels.attention_order).
int g_decode_order = 0;

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
  int shift;  // log2(block_size) where it is a power of two (every size the engine uses), else -1
  Span(const T* base_, const int64_t* blocks_, int64_t block_size_, int64_t block_stride_)
      : base(base_), blocks(blocks_), block_size(block_size_), block_stride(block_stride_),
        shift(block_size_ > 0 && (block_size_ & (block_size_ - 1)) == 0
                  ? __builtin_ctzll(static_cast<uint64_t>(block_size_))
                  : -1) {}
  // a shift and a mask instead of a 64-bit division: p.V asks for every key's row (an idiv per key pair was a large
  // part of prefill attention's time). (Forcing these inline made decode attention from memory 1.3-1.6x slower.)
  int64_t block_of(int64_t t) const { return shift >= 0 ? t >> shift : t / block_size; }
  int64_t offset_of(int64_t t) const { return shift >= 0 ? t & (block_size - 1) : t % block_size; }
  const T* block(int64_t t0) const { return base + blocks[block_of(t0)] * block_stride; }
  const T* row(int64_t t, int64_t d) const { return block(t) + offset_of(t) * d; }
  // Ask for the n rows of d elements from key t0 (within one block) ahead of their use. A block of one head is a
  // few KiB at a scattered address: too short for the hardware prefetcher to ramp up, so without this every block
  // starts with cache misses (decode attention ran at ~1/3 of the memory bandwidth, stalled on its first loads).
  template <int Locality>
  void prefetch(int64_t t0, int64_t n, int64_t d) const {
    const char* p = reinterpret_cast<const char*>(row(t0, d));
    const int64_t bytes = n * d * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, Locality);
  }
};

#ifdef TS_AVX512_BF16
// The summation orders of torch's CPU flash attention (what transformers' SDPA runs), measured on its bf16 GEMMs
// (MKL): which order a query row gets depends on how many rows its GEMM call has (its query block: 32 rows for
// prompts under 192 tokens, 64 under 768, else 256; the last block has the rest).
//  * a block of >= 4 rows ("gemm" order): each score is one chain over the features in order; p.V sums each kv
//    split's keys in chunks (one up to 192 keys, two halves up to 384, else 192-key chunks and the rest), each a
//    chain over its keys in order from zero, each chunk's sum then added to the output.
//  * a block of 1-3 rows - every decode step, and a prompt's last 1-3 tokens when its last block is that small
//    ("gemv" order): each score sums the features in 4 interleaved chains (feature i in chain i % 4) combined as
//    (c0 + c2) + (c1 + c3); with one row, p.V adds the keys to the output in groups of 4, each group summed as
//    (k0 + k2) + (k1 + k3), and a split's last 1-3 keys one at a time from the last (2-3 rows: the gemm's p.V,
//    which is close to but not always the library's).
//  * short kv splits (a prompt of a few tokens, or a last split of a few keys): scores take the gemv order up to 11
//    keys, and with 2-3 keys (and >= 2 rows) 8 interleaved chains combined as a halving tree.
// Both come from VDPBF16PS, which adds a dword's high bf16 product first, then the low one: the operands are laid out
// so that its fp32 additions are exactly those (bf16 x bf16 products are exact in fp32).

// Within each 128-bit lane, words f0..f7 -> dwords j = (low f4+j, high fj): chain j then takes fj before f4+j.
inline __m512i gemv_perm(__m512i x) {
  const __m512i ctl = _mm512_broadcast_i32x4(_mm_setr_epi8(8, 9, 0, 1, 10, 11, 2, 3, 12, 13, 4, 5, 14, 15, 6, 7));
  return _mm512_shuffle_epi8(x, ctl);
}

// a[r] (the 128-bit lanes of 4 vectors) -> t[u] = lane u of a[0..3]
inline void transpose4x128(const __m512i* a, __m512i* t) {
  const __m512i t0 = _mm512_shuffle_i32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_i32x4(a[0], a[1], 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(a[2], a[3], 0x44), t3 = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
  t[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  t[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  t[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  t[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

// A query row for gemv scores: step u (features 8u..8u+7, permuted) in every 128-bit lane; 4 * DH steps.
template <int DH>
inline void gemv_prepare_q(const at::BFloat16* q, __m512i* out) {
  for (int h = 0; h < DH; ++h) {
    const __m512i x = gemv_perm(_mm512_loadu_si512(q + 32 * h));
    out[4 * h] = _mm512_shuffle_i32x4(x, x, 0x00);
    out[4 * h + 1] = _mm512_shuffle_i32x4(x, x, 0x55);
    out[4 * h + 2] = _mm512_shuffle_i32x4(x, x, 0xAA);
    out[4 * h + 3] = _mm512_shuffle_i32x4(x, x, 0xFF);
  }
}

// Gemv-order scores of nrows prepared rows against n <= 4 * NG consecutive keys (rows of 32 * DH bf16), n > 4 * (NG -
// 1): NG groups of 4 keys at once, so that 3 * NG chains are in flight (a chain's dot-product latency is several times
// its issue rate) and each q step is loaded once for all groups.
template <int DH, int NG = 1>
inline void scores_gemv4(const __m512i* qprep, int64_t nrows, const at::BFloat16* k, int n, float scale, float* out,
                         int64_t out_stride) {
  constexpr int64_t d = 32 * DH;
  __m512i t[NG][4 * DH];
  for (int g = 0; g < NG; ++g) {
    for (int h = 0; h < DH; ++h) {
      __m512i a[4];
      for (int r = 0; r < 4; ++r)  // key r in lane r; step u of every key in t[g][u]
        a[r] = 4 * g + r < n ? gemv_perm(_mm512_loadu_si512(k + (4 * g + r) * d + 32 * h)) : _mm512_setzero_si512();
      transpose4x128(a, t[g] + 4 * h);
    }
  }
  const __m128 sc = _mm_set1_ps(scale);
  auto finish = [&](__m512 acc, int64_t i, int g) __attribute__((always_inline)) {
    const __m512 x = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0x4E));  // c0 + c2, c1 + c3
    const __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));      // (c0 + c2) + (c1 + c3)
    const __m128 s = _mm_mul_ps(_mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, y)), sc);
    const int ng = n - 4 * g;
    if (ng >= 4) {
      _mm_storeu_ps(out + i * out_stride + 4 * g, s);
    } else {
      _mm_mask_storeu_ps(out + i * out_stride + 4 * g, static_cast<__mmask8>((1u << ng) - 1u), s);
    }
  };
  int64_t i = 0;
  for (; i + 3 <= nrows; i += 3) {  // three rows' chains interleaved (a GQA group), so their latencies overlap
    const __m512i* q = qprep + i * 4 * DH;
    __m512 a[NG][3];
    for (int g = 0; g < NG; ++g) a[g][0] = a[g][1] = a[g][2] = _mm512_setzero_ps();
    for (int u = 0; u < 4 * DH; ++u) {
      const __m512i q0 = q[u], q1 = q[4 * DH + u], q2 = q[8 * DH + u];
      for (int g = 0; g < NG; ++g) {
        a[g][0] = _mm512_dpbf16_ps(a[g][0], (__m512bh)q0, (__m512bh)t[g][u]);
        a[g][1] = _mm512_dpbf16_ps(a[g][1], (__m512bh)q1, (__m512bh)t[g][u]);
        a[g][2] = _mm512_dpbf16_ps(a[g][2], (__m512bh)q2, (__m512bh)t[g][u]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      finish(a[g][0], i, g);
      finish(a[g][1], i + 1, g);
      finish(a[g][2], i + 2, g);
    }
  }
  for (; i < nrows; ++i) {
    const __m512i* q = qprep + i * 4 * DH;
    __m512 a[NG];
    for (int g = 0; g < NG; ++g) a[g] = _mm512_setzero_ps();
    for (int u = 0; u < 4 * DH; ++u)
      for (int g = 0; g < NG; ++g) a[g] = _mm512_dpbf16_ps(a[g], (__m512bh)q[u], (__m512bh)t[g][u]);
    for (int g = 0; g < NG; ++g) finish(a[g], i, g);
  }
}

inline uint32_t swap_words(uint32_t x) { return (x << 16) | (x >> 16); }

// Gemm-order scores of nrows rows (each d/2 dwords, words swapped so the even feature is added first) against n <= 16
// consecutive keys; tb: scratch for the keys transposed (dword u of key j at tb[16 u + j]).
template <int DH>
inline void scores_gemm16(const uint32_t* qdw, int64_t nrows, const at::BFloat16* k, int n, float scale, float* out,
                          int64_t out_stride, uint32_t* tb) {
  constexpr int U = 16 * DH;  // dwords per row
  const uint32_t* kd = reinterpret_cast<const uint32_t*>(k);
  // each 16 x 16 dword block transposed in registers (words swapped by a rotate): 32-bit and 64-bit unpacks, then a
  // 4 x 4 transpose of 128-bit lanes (a scalar loop here took ~40% of prefill attention's score time)
  for (int h = 0; h < DH; ++h) {
    __m512i r[16], t[16];
    for (int j = 0; j < 16; ++j)
      r[j] = j < n ? _mm512_rol_epi32(_mm512_loadu_si512(kd + j * U + 16 * h), 16) : _mm512_setzero_si512();
    for (int j = 0; j < 16; j += 2) {  // lane L: (r_j, r_j+1) at columns 4L, 4L + 1 | 4L + 2, 4L + 3
      t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int g = 0; g < 16; g += 4) {  // r[g + c], lane L: column 4L + c of rows g..g+3
      r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
      r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
      r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
      r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of the four row groups' vectors
      const __m512i a[4] = {r[c], r[4 + c], r[8 + c], r[12 + c]};
      __m512i o[4];
      transpose4x128(a, o);
      for (int L = 0; L < 4; ++L) _mm512_storeu_si512(tb + (16 * h + 4 * L + c) * 16, o[L]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) {  // four independent chains hide the dot product's latency
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint32_t* q = qdw + i * U;
    for (int u = 0; u < U; ++u) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(tb + 16 * u);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[u])), kv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[U + u])), kv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[2 * U + u])), kv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[3 * U + u])), kv);
    }
    _mm512_mask_storeu_ps(out + i * out_stride, keep, _mm512_mul_ps(a0, sc));
    _mm512_mask_storeu_ps(out + (i + 1) * out_stride, keep, _mm512_mul_ps(a1, sc));
    _mm512_mask_storeu_ps(out + (i + 2) * out_stride, keep, _mm512_mul_ps(a2, sc));
    _mm512_mask_storeu_ps(out + (i + 3) * out_stride, keep, _mm512_mul_ps(a3, sc));
  }
  for (; i < nrows; ++i) {
    __m512 a0 = _mm512_setzero_ps();
    const uint32_t* q = qdw + i * U;
    for (int u = 0; u < U; ++u)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[u])),
                            (__m512bh)_mm512_loadu_si512(tb + 16 * u));
    _mm512_mask_storeu_ps(out + i * out_stride, keep, _mm512_mul_ps(a0, sc));
  }
}

// The chunks (relative to the split's first key) in which a gemm sums a kv split of w keys for p.V.
inline int chunks_of(int64_t w, int64_t* bounds) {  // bounds[0..n] (n <= 3 for w <= 512)
  const int64_t n = std::max<int64_t>(1, (w + 191) / 192);
  bounds[0] = 0;
  if (n <= 2) {
    if (n == 2) bounds[1] = w / 2;
    bounds[n] = w;
    return static_cast<int>(n);
  }
  for (int64_t c = 1; c < n; ++c) bounds[c] = 192 * c;
  bounds[n] = w;
  return static_cast<int>(n);
}

// acc[r] (pv_index layout) += p.V in gemm order over keys [c0, c1) of one chunk, for NR rows: the chunk's sum from
// zero (key pairs j, j + 1 with key j in the high word, so j is added first), then added to acc.
template <int NR, int DH, typename V>
inline void values_gemm_chunk(const uint16_t* p, int64_t p_stride, const V& vrow, int64_t c0, int64_t c1, float* acc) {
  constexpr int64_t d = 32 * DH;
  __m512 z[NR][2 * DH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) z[r][c] = _mm512_setzero_ps();
  auto step = [&](int64_t j, auto is_pair) __attribute__((always_inline)) {
    constexpr bool pair = decltype(is_pair)::value;
    const at::BFloat16* v0 = vrow(j);
    __m512i lo[DH], hi[DH];
    for (int h = 0; h < DH; ++h) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * h);
      const __m512i b = pair ? _mm512_loadu_si512(vrow(j + 1) + 32 * h) : _mm512_setzero_si512();
      // low word key j + 1, high word key j
      lo[h] = _mm512_unpacklo_epi16(b, a);
      hi[h] = _mm512_unpackhi_epi16(b, a);
    }
    for (int r = 0; r < NR; ++r) {
      // p[j] (low word in memory) to the high word, p[j + 1] to the low: one load and a rotate
      uint32_t w;
      if constexpr (pair) {
        __builtin_memcpy(&w, p + r * p_stride + j, sizeof(w));
        w = (w << 16) | (w >> 16);
      } else {
        w = static_cast<uint32_t>(p[r * p_stride + j]) << 16;
      }
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
      for (int h = 0; h < DH; ++h) {
        z[r][2 * h] = _mm512_dpbf16_ps(z[r][2 * h], pp, (__m512bh)lo[h]);
        z[r][2 * h + 1] = _mm512_dpbf16_ps(z[r][2 * h + 1], pp, (__m512bh)hi[h]);
      }
    }
  };
  const int64_t pairs_end = c0 + (c1 - c0) / 2 * 2;
  for (int64_t j = c0; j < pairs_end; j += 2) step(j, std::true_type{});
  if (pairs_end < c1) step(pairs_end, std::false_type{});
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) {
      float* a = acc + r * d + 16 * c;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), z[r][c]));
    }
}

// The ymm8 order's p.V for NR rows over the keys [n0, nend) of one split: chunks of 8 keys from n0, each summed from
// zero (key pairs, the later key in the high word: added first) and then added to acc (pv_index layout) - the
// arithmetic of a gemm-order chunk with the key order in each pair swapped, with acc held in registers across the
// split's chunks instead of loaded, added and stored back per chunk, and each key pair's two p values broadcast as one
// dword (p rows are dword-aligned and chunks start at even keys, so keys j, j + 1 are the dword at p + j: low word j,
// high word j + 1) instead of two loads, a shift and an or.
template <int NR, int DH, typename V>
inline void values_ymm8_split(const uint16_t* p, int64_t p_stride, const V& vrow, int64_t n0, int64_t nend,
                              float* acc) {
  constexpr int64_t d = 32 * DH;
  __m512 a[NR][2 * DH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) a[r][c] = _mm512_loadu_ps(acc + r * d + 16 * c);
  for (int64_t c0 = n0; c0 < nend; c0 += 8) {
    const int64_t c1 = std::min(c0 + 8, nend);
    // a chunk lies inside one block (blocks are multiples of 16 keys, chunks start at multiples of 8): its values
    // are consecutive rows
    const at::BFloat16* vc = vrow(c0);
    __m512 z[NR][2 * DH];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 2 * DH; ++c) z[r][c] = _mm512_setzero_ps();
    int64_t j = c0;
    for (; j + 1 < c1; j += 2) {
      const at::BFloat16* v0 = vc + (j - c0) * d;
      __m512i lo[DH], hi[DH];
      for (int h = 0; h < DH; ++h) {
        const __m512i x0 = _mm512_loadu_si512(v0 + 32 * h), x1 = _mm512_loadu_si512(v0 + d + 32 * h);
        lo[h] = _mm512_unpacklo_epi16(x0, x1);  // low word key j, high word key j + 1
        hi[h] = _mm512_unpackhi_epi16(x0, x1);
      }
      for (int r = 0; r < NR; ++r) {
        int32_t pair;
        std::memcpy(&pair, p + r * p_stride + j, sizeof(pair));
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
        for (int h = 0; h < DH; ++h) {
          z[r][2 * h] = _mm512_dpbf16_ps(z[r][2 * h], pp, (__m512bh)lo[h]);
          z[r][2 * h + 1] = _mm512_dpbf16_ps(z[r][2 * h + 1], pp, (__m512bh)hi[h]);
        }
      }
    }
    if (j < c1) {  // an odd last key: alone in the low word
      const at::BFloat16* v0 = vc + (j - c0) * d;
      const __m512i zero = _mm512_setzero_si512();
      __m512i lo[DH], hi[DH];
      for (int h = 0; h < DH; ++h) {
        const __m512i x0 = _mm512_loadu_si512(v0 + 32 * h);
        lo[h] = _mm512_unpacklo_epi16(x0, zero);
        hi[h] = _mm512_unpackhi_epi16(x0, zero);
      }
      for (int r = 0; r < NR; ++r) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * p_stride + j]));
        for (int h = 0; h < DH; ++h) {
          z[r][2 * h] = _mm512_dpbf16_ps(z[r][2 * h], pp, (__m512bh)lo[h]);
          z[r][2 * h + 1] = _mm512_dpbf16_ps(z[r][2 * h + 1], pp, (__m512bh)hi[h]);
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 2 * DH; ++c) a[r][c] = _mm512_add_ps(a[r][c], z[r][c]);
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) _mm512_storeu_ps(acc + r * d + 16 * c, a[r][c]);
}

// acc[r] (pv_index layout) += p.V in gemv order over a whole split of w keys from key n0 (n0 and block_size multiples
// of 4): groups of 4 keys, each (k0 + k2) + (k1 + k3), added in order; then the last w % 4 keys from the last.
template <int NR, int DH, typename V>
inline void values_gemv_split(const uint16_t* p, int64_t p_stride, const V& vrow, int64_t n0, int64_t w, float* acc) {
  constexpr int64_t d = 32 * DH;
  __m512 a[NR][2 * DH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) a[r][c] = _mm512_loadu_ps(acc + r * d + 16 * c);
  const int64_t g_end = n0 + w / 4 * 4;
  for (int64_t g = n0; g < g_end; g += 4) {
    const at::BFloat16* vb = vrow(g);  // 4 consecutive keys of one block
    __m512i lo02[DH], hi02[DH], lo13[DH], hi13[DH];
    for (int h = 0; h < DH; ++h) {
      const __m512i v0 = _mm512_loadu_si512(vb + 32 * h), v1 = _mm512_loadu_si512(vb + d + 32 * h);
      const __m512i v2 = _mm512_loadu_si512(vb + 2 * d + 32 * h), v3 = _mm512_loadu_si512(vb + 3 * d + 32 * h);
      lo02[h] = _mm512_unpacklo_epi16(v2, v0);  // high word key 0: added first
      hi02[h] = _mm512_unpackhi_epi16(v2, v0);
      lo13[h] = _mm512_unpacklo_epi16(v3, v1);
      hi13[h] = _mm512_unpackhi_epi16(v3, v1);
    }
    for (int r = 0; r < NR; ++r) {
      const uint16_t* pr = p + r * p_stride + g;
      const __m512bh p02 = (__m512bh)_mm512_set1_epi32(static_cast<int>((uint32_t(pr[0]) << 16) | pr[2]));
      const __m512bh p13 = (__m512bh)_mm512_set1_epi32(static_cast<int>((uint32_t(pr[1]) << 16) | pr[3]));
      for (int h = 0; h < DH; ++h) {
        const __m512 z = _mm512_setzero_ps();
        const __m512 lo = _mm512_add_ps(_mm512_dpbf16_ps(z, p02, (__m512bh)lo02[h]),
                                        _mm512_dpbf16_ps(z, p13, (__m512bh)lo13[h]));
        const __m512 hi = _mm512_add_ps(_mm512_dpbf16_ps(z, p02, (__m512bh)hi02[h]),
                                        _mm512_dpbf16_ps(z, p13, (__m512bh)hi13[h]));
        a[r][2 * h] = _mm512_add_ps(a[r][2 * h], lo);
        a[r][2 * h + 1] = _mm512_add_ps(a[r][2 * h + 1], hi);
      }
    }
  }
  // the last 1-3 keys, from the last: pairs (high word added first) (e1, e0) then (e0 alone)
  int64_t e = n0 + w;  // one past the next key to add
  while (e > g_end) {
    const bool pair = e - 2 >= g_end;
    const int64_t hi_key = e - 1, lo_key = e - 2;  // lo_key only when pair
    const __m512i zero = _mm512_setzero_si512();
    __m512i lo[DH], hi[DH];
    for (int h = 0; h < DH; ++h) {
      const __m512i vh = _mm512_loadu_si512(vrow(hi_key) + 32 * h);
      const __m512i vl = pair ? _mm512_loadu_si512(vrow(lo_key) + 32 * h) : zero;
      lo[h] = _mm512_unpacklo_epi16(vl, vh);
      hi[h] = _mm512_unpackhi_epi16(vl, vh);
    }
    for (int r = 0; r < NR; ++r) {
      const uint32_t ph = p[r * p_stride + hi_key], pl = pair ? p[r * p_stride + lo_key] : 0u;
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>((ph << 16) | pl));
      for (int h = 0; h < DH; ++h) {
        a[r][2 * h] = _mm512_dpbf16_ps(a[r][2 * h], pp, (__m512bh)lo[h]);
        a[r][2 * h + 1] = _mm512_dpbf16_ps(a[r][2 * h + 1], pp, (__m512bh)hi[h]);
      }
    }
    e -= pair ? 2 : 1;
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * DH; ++c) _mm512_storeu_ps(acc + r * d + 16 * c, a[r][c]);
}

// The "ymm8" order for one-row query blocks (measured with torch 2.13's MKL on a Xeon with AMX, Sapphire Rapids
// family; tests/kernels probe it against SDPA): each score is summed in 8 lanes of pairs (VDPBF16PS on 256 bits,
// the high word of a pair first) with two accumulators taking alternate 16-feature steps, the two added lane by lane
// and the 8 lanes reduced as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); p.V sums each 8 keys of a split as a
// chain from zero (key pairs, the later key first) and adds that to the output. A 512-bit dot product over the
// features in order holds both accumulators: lanes 0-7 the first, 8-15 the second.
//
// The tree reduction of 16 such vectors (A[j]: key j), in registers -> the 16 scores in key order.
__attribute__((always_inline)) inline __m512 reduce16_ymm8(const __m512* A) {
  __m512 b[8], c[4], f[2];
  for (int m = 0; m < 8; ++m)  // lane i + lane i + 8: [key 2m: 8 sums, key 2m + 1: 8 sums]
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(A[2 * m], A[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(A[2 * m], A[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // adjacent pairs (l0 + l1), (l2 + l3), ...
    c[m] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0x88),
                         _mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // (l0 + l1) + (l2 + l3) and (l4 + l5) + (l6 + l7)
    f[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x88),
                         _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xDD));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], 0x88), _mm512_shuffle_f32x4(f[0], f[1], 0xDD));
  // s holds keys 0 2 4 6 1 3 5 7 8 10 12 14 9 11 13 15
  const __m512i idx = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  return _mm512_permutexvar_ps(idx, s);
}

// ymm8-order scores of nrows rows (row r at q + r * q_stride) against n <= 16 consecutive keys.
template <int DH, bool Full = false>
inline void scores_ymm8(const at::BFloat16* q, int64_t q_stride, int64_t nrows, const at::BFloat16* k, int n,
                        float scale, float* out, int64_t out_stride) {
  if constexpr (Full) n = 16;  // a whole 16-key step: no per-key bound checks
  constexpr int64_t d = 32 * DH;
  const __mmask16 keep = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < nrows; ++r) {
    __m512i qv[DH];
    for (int h = 0; h < DH; ++h) qv[h] = _mm512_loadu_si512(q + r * q_stride + 32 * h);
    __m512 A[16];
    for (int j = 0; j < 16; ++j) {
      A[j] = _mm512_setzero_ps();
      if (j < n)
        for (int h = 0; h < DH; ++h)
          A[j] = _mm512_dpbf16_ps(A[j], (__m512bh)qv[h], (__m512bh)_mm512_loadu_si512(k + j * d + 32 * h));
    }
    _mm512_mask_storeu_ps(out + r * out_stride, keep, _mm512_mul_ps(reduce16_ymm8(A), sc));
  }
}

// Rows [0, nr) in groups of up to 4 (their accumulators stay in registers).
template <typename F>
inline void by_rows(int64_t nr, F&& f) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) f(std::integral_constant<int, 4>{}, r);
  switch (nr - r) {
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}
#endif

// Where the p.V kernels keep feature i of a row: 32-feature half h = i / 32, 128-bit lane q = (i % 32) / 8; the
// low four words of each lane went to the "lo" vector (2h), the high four to "hi" (2h + 1).
inline int64_t pv_index(int64_t i) {
  const int64_t h = i / 32, q = (i % 32) / 8, w = i % 8;
  return (2 * h + w / 4) * 16 + 4 * q + w % 4;
}

#ifdef TS_AVX512_BF16
// o[i] = bf16(acc[pv_index(i)] * inv_z) for i < d (a multiple of 32), 16 outputs per vector: within a 32-feature
// half the sources are its two accumulator vectors, picked by one two-source permute. The product and its rounding
// are the scalar loop's (c10::BFloat16's conversion, denormals and NaN included).
inline void write_unpermuted(const float* acc, float inv_z, int64_t d, uint16_t* o) {
  alignas(64) int32_t ix[32];
  for (int j = 0; j < 32; ++j) ix[j] = static_cast<int32_t>(pv_index(j));
  const __m512i i0 = _mm512_load_si512(ix), i1 = _mm512_load_si512(ix + 16);
  const __m512 z = _mm512_set1_ps(inv_z);
  for (int64_t h = 0; h < d; h += 32) {
    const __m512 a = _mm512_loadu_ps(acc + h), b = _mm512_loadu_ps(acc + h + 16);
    for (int u = 0; u < 2; ++u) {
      const __m512 v = _mm512_mul_ps(_mm512_permutex2var_ps(a, u ? i1 : i0, b), z);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + h + 16 * u), tierserve_vec::to_bf16_like_c10(v));
    }
  }
}
#endif

#ifdef TS_AVX2_FMA
// float32 with AVX2 + FMA (the compute dtype of CPUs without native bf16; everywhere for the exactness tests): the
// same work item as attend below (its arguments' meanings), with a simpler order since no bf16 rounding is to be
// matched: scores as dot products (8 keys at a time, each key's lanes summed by a horizontal-add tree), one softmax
// over all of a row's visible keys (max, vector exp, sum), then p.V with the row's accumulators in registers, keys in
// chunks that stay in L1 while every row passes over them. head_dim must be a multiple of 8.
constexpr int64_t kF32KeyChunk = 64;

// Scores of one query row against keys k + j * d for j < m (m <= 8), times scale, to o[0..m).
inline void scores8_f32(const float* q, const float* k, int64_t m, int64_t d, float scale, float* o) {
  const float* kr[8];
  for (int64_t j = 0; j < 8; ++j) kr[j] = k + std::min<int64_t>(j, m - 1) * d;  // past m: repeat a valid key
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 x = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[0] + i), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[1] + i), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[2] + i), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[3] + i), a3);
    a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[4] + i), a4);
    a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[5] + i), a5);
    a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[6] + i), a6);
    a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kr[7] + i), a7);
  }
  const __m256 s = _mm256_mul_ps(tierserve_vec::hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale));
  if (m == 8) {
    _mm256_storeu_ps(o, s);
  } else {
    _mm256_maskstore_ps(o, tierserve_vec::lanes_below(m), s);
  }
}

// acc[0..8*NV) (+)= sum over keys t in [t0, t1) of p[t] * v(t)[f0 ..], v(t) a row of the value cache.
template <int NV>
inline void pv_f32(const float* p, const Span<float>& vs, int64_t t0, int64_t t1, int64_t d, int64_t f0, bool first,
                   float* acc) {
  __m256 a[NV];
#pragma GCC unroll 16
  for (int u = 0; u < NV; ++u) a[u] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + 8 * u);
  const int64_t bs = vs.block_size;
  for (int64_t t = t0; t < t1;) {
    const int64_t n = std::min(bs - vs.offset_of(t), t1 - t);
    const float* v = vs.row(t, d) + f0;
    for (int64_t j = 0; j < n; ++j, v += d) {
      const __m256 pj = _mm256_set1_ps(p[t + j]);
#pragma GCC unroll 16
      for (int u = 0; u < NV; ++u) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * u), a[u]);
    }
    t += n;
  }
#pragma GCC unroll 16
  for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc + 8 * u, a[u]);
}

void attend_f32(const Rows<float>& qs, int64_t nq, const int64_t* limit, const Span<float>& ks, const Span<float>& vs,
                int64_t ctx, float scale, float* out, int64_t out_tok_stride, std::vector<float>& scratch) {
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  // score rows padded to whole groups of 8 and one more, so that pass 2 reads and writes whole vectors (AVX2's masked
  // stores are slow on AMD)
  const int64_t cs = (ctx + 7) / 8 * 8 + 8;
  scratch.resize(static_cast<size_t>(nq * cs + nq * d + 2 * nq));
  float* sc = scratch.data();
  float* acc = sc + nq * cs;
  float* inv_z = acc + nq * d;
  auto first_row = [&](int64_t t) {  // first row that sees key t (limits are nondecreasing)
    return static_cast<int64_t>(std::upper_bound(limit, limit + nq, t) - limit);
  };
  // Pass 1: scores, a block of keys at a time (in L1) for every row that sees its first key.
  for (int64_t t0 = 0; t0 < std::min(ctx, KEY_PREFETCH_BLOCKS * bs); t0 += bs) {
    ks.template prefetch<3>(t0, std::min(bs, ctx - t0), d);
  }
  for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
    const int64_t n = std::min(bs, ctx - t0), r0 = first_row(t0);
    if (r0 >= nq) break;
    const int64_t ahead = t0 + KEY_PREFETCH_BLOCKS * bs;
    if (ahead < ctx) ks.template prefetch<3>(ahead, std::min(bs, ctx - ahead), d);
    vs.template prefetch<2>(t0, n, d);  // this block's values, into L2 for pass 3
    const float* kb = ks.block(t0);
    for (int64_t r = r0; r < nq; ++r) {
      const int64_t seen = std::min(n, limit[r] - t0);  // keys of this block the row sees
      for (int64_t j = 0; j < seen; j += 8) {
        scores8_f32(qs.row(r), kb + j * d, std::min<int64_t>(8, seen - j), d, scale, sc + r * cs + t0 + j);
      }
    }
  }
  // Pass 2: softmax numerators in place, 1 / sum per row.
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < nq; ++r) {
    float* s = sc + r * cs;
    const int64_t lim = std::min(limit[r], ctx);
    __m256 mv = ninf;
    for (int64_t t = 0; t < lim; t += 8) {
      const __m256i k = tierserve_vec::lanes_below(lim - t);
      mv = _mm256_max_ps(mv, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + t), _mm256_castsi256_ps(k)));
    }
    mv = _mm256_max_ps(mv, _mm256_permute2f128_ps(mv, mv, 1));
    mv = _mm256_max_ps(mv, _mm256_permute_ps(mv, 0x4E));
    mv = _mm256_max_ps(mv, _mm256_permute_ps(mv, 0xB1));
    __m256 zv = _mm256_setzero_ps();
    for (int64_t t = 0; t < lim; t += 8) {
      const __m256i k = tierserve_vec::lanes_below(lim - t);
      const __m256 e = _mm256_and_ps(tierserve_vec::exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)),
                                     _mm256_castsi256_ps(k));
      zv = _mm256_add_ps(zv, e);
      _mm256_storeu_ps(s + t, e);
    }
    inv_z[r] = 1.f / tierserve_vec::hsum(zv);
  }
  // Pass 3: p.V, kF32KeyChunk keys at a time for every row that sees them, 64 features per register set.
  for (int64_t c0 = 0; c0 < ctx; c0 += kF32KeyChunk) {
    const int64_t c1 = std::min(ctx, c0 + kF32KeyChunk);
    for (int64_t r = first_row(c0); r < nq; ++r) {
      const int64_t t1 = std::min(c1, limit[r]);
      const float* p = sc + r * cs;
      for (int64_t f0 = 0; f0 < d; f0 += 64) {
        float* a = acc + r * d + f0;
        switch (std::min<int64_t>(64, d - f0) / 8) {
          case 8: pv_f32<8>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 7: pv_f32<7>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 6: pv_f32<6>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 5: pv_f32<5>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 4: pv_f32<4>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 3: pv_f32<3>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          case 2: pv_f32<2>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
          default: pv_f32<1>(p, vs, c0, t1, d, f0, c0 == 0, a); break;
        }
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const __m256 z = _mm256_set1_ps(inv_z[r]);
    for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + i), z));
  }
}

// ---- float32 prefill items (many query rows): scores and p.V as small register-tiled GEMMs --------------------------
// A prefill work item has tens of rows (a tile of query tokens times the GQA group) against the same keys, so it is
// compute-bound, and the dot-product form above (each score a horizontal-add tree, each key row loaded once per query
// row) ran at ~37% of the FMA peak. Here each group of 16 keys is transposed once into [d][16], and every 6 rows x 16
// keys of scores come from linear_f32's tile (tile_f32.h: 12 accumulators, one FMA per feature, row and 8 keys); p.V
// takes 6 rows x 16 features per register set over chunks of keys that stay in L1. Each score still sums its features
// in order, each output its keys in order.

// o[i * os + j] = rows[j][i] for j < 8, i < d (d a multiple of 8); a null row gives zeros.
inline void transpose8_f32(const float* const* rows, int64_t d, float* o, int64_t os) {
  for (int64_t i0 = 0; i0 < d; i0 += 8, o += 8 * os) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = rows[j] ? _mm256_loadu_ps(rows[j] + i0) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(o + 0 * os, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(o + 1 * os, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(o + 2 * os, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(o + 3 * os, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(o + 4 * os, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(o + 5 * os, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(o + 6 * os, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(o + 7 * os, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
}

// kt[i][j] = k_j[i] for the n (<= 16) key rows from k (stride d), zero for j >= n.
inline void transpose_keys16(const float* k, int64_t n, int64_t d, float* kt) {
  for (int64_t j0 = 0; j0 < 16; j0 += 8) {
    const float* kr[8];
    for (int64_t j = 0; j < 8; ++j) kr[j] = j0 + j < n ? k + (j0 + j) * d : nullptr;
    transpose8_f32(kr, d, kt + j0, 16);
  }
}

// acc_r[0..16) (+)= sum over keys t in [t0, t1) of p_r[t] * v(t)[f0 .. f0 + 16) for R (1-6) rows (row r's p at
// p + r * ps, its accumulators at acc + r * as); keys in order. first: start from zero instead of acc.
template <int R>
inline void pv_tile_f32(const float* p, int64_t ps, const Span<float>& vs, int64_t t0, int64_t t1, int64_t d,
                        int64_t f0, bool first, float* acc, int64_t as) {
  auto init = [&](int r, int u) {
    return (first || r >= R) ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + r * as + 8 * u);
  };
  __m256 a00 = init(0, 0), a01 = init(0, 1), a10 = init(1, 0), a11 = init(1, 1), a20 = init(2, 0), a21 = init(2, 1),
         a30 = init(3, 0), a31 = init(3, 1), a40 = init(4, 0), a41 = init(4, 1), a50 = init(5, 0), a51 = init(5, 1);
  const float *p0 = p, *p1 = p + (R > 1 ? ps : 0), *p2 = p + (R > 2 ? 2 * ps : 0), *p3 = p + (R > 3 ? 3 * ps : 0),
              *p4 = p + (R > 4 ? 4 * ps : 0), *p5 = p + (R > 5 ? 5 * ps : 0);
  const int64_t bs = vs.block_size;
  for (int64_t t = t0; t < t1;) {
    const int64_t n = std::min(bs - vs.offset_of(t), t1 - t);
    const float* v = vs.row(t, d) + f0;
    for (int64_t j = t; j < t + n; ++j, v += d) {
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
      __m256 pb = _mm256_broadcast_ss(p0 + j);
      a00 = _mm256_fmadd_ps(pb, v0, a00);
      a01 = _mm256_fmadd_ps(pb, v1, a01);
      if constexpr (R > 1) {
        pb = _mm256_broadcast_ss(p1 + j);
        a10 = _mm256_fmadd_ps(pb, v0, a10);
        a11 = _mm256_fmadd_ps(pb, v1, a11);
      }
      if constexpr (R > 2) {
        pb = _mm256_broadcast_ss(p2 + j);
        a20 = _mm256_fmadd_ps(pb, v0, a20);
        a21 = _mm256_fmadd_ps(pb, v1, a21);
      }
      if constexpr (R > 3) {
        pb = _mm256_broadcast_ss(p3 + j);
        a30 = _mm256_fmadd_ps(pb, v0, a30);
        a31 = _mm256_fmadd_ps(pb, v1, a31);
      }
      if constexpr (R > 4) {
        pb = _mm256_broadcast_ss(p4 + j);
        a40 = _mm256_fmadd_ps(pb, v0, a40);
        a41 = _mm256_fmadd_ps(pb, v1, a41);
      }
      if constexpr (R > 5) {
        pb = _mm256_broadcast_ss(p5 + j);
        a50 = _mm256_fmadd_ps(pb, v0, a50);
        a51 = _mm256_fmadd_ps(pb, v1, a51);
      }
    }
    t += n;
  }
  const __m256 out[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * as, out[r][0]);
    _mm256_storeu_ps(acc + r * as + 8, out[r][1]);
  }
}

// attend_f32's work item by the tiles above (nq >= kF32GemmRows rows).
constexpr int64_t kF32GemmRows = 6;

void attend_f32_gemm(const Rows<float>& qs, int64_t nq, const int64_t* limit, const Span<float>& ks,
                     const Span<float>& vs, int64_t ctx, float scale, float* out, int64_t out_tok_stride,
                     std::vector<float>& scratch) {
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  // score row stride: whole 16-key groups, plus one (with blocks of 8 keys, a group may start 8 keys before the end)
  const int64_t cs = (ctx + 15) / 16 * 16 + 16;
  scratch.resize(static_cast<size_t>(nq * cs + nq * d + nq + d * 16));
  float* sc = scratch.data();
  float* acc = sc + nq * cs;
  float* inv_z = acc + nq * d;
  float* kt = inv_z + nq;
  auto first_row = [&](int64_t t) {
    return static_cast<int64_t>(std::upper_bound(limit, limit + nq, t) - limit);
  };
  // Pass 1: scores, 16 keys at a time, for every row that sees the first of them.
  for (int64_t t0 = 0; t0 < ctx;) {
    const int64_t r0 = first_row(t0);
    if (r0 >= nq) break;
    const int64_t n = std::min<int64_t>({16, ctx - t0, bs - ks.offset_of(t0)});
    transpose_keys16(ks.row(t0, d), n, d, kt);
    for (int64_t r = r0; r < nq; r += 6) {  // linear_f32's tile: the keys as a [d][16] weight block
      const int64_t mr = std::min<int64_t>(6, nq - r);
      const float* qr[6];
      for (int64_t u = 0; u < 6; ++u) qr[u] = qs.row(r + std::min(u, mr - 1));
      float* o = sc + r * cs + t0;  // unscaled (the scale is applied in pass 2, after the dot product as attend_f32)
      switch (mr) {
        case 6: tierserve_f32::tile<6>(qr, kt, d, nullptr, o, cs); break;
        case 5: tierserve_f32::tile<5>(qr, kt, d, nullptr, o, cs); break;
        case 4: tierserve_f32::tile<4>(qr, kt, d, nullptr, o, cs); break;
        case 3: tierserve_f32::tile<3>(qr, kt, d, nullptr, o, cs); break;
        case 2: tierserve_f32::tile<2>(qr, kt, d, nullptr, o, cs); break;
        default: tierserve_f32::tile<1>(qr, kt, d, nullptr, o, cs); break;
      }
    }
    t0 += n;
  }
  // Pass 2: softmax numerators in place (zero from the row's limit on, so that a p.V tile of rows with different
  // limits adds nothing past each row's own), 1 / sum per row.
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), sv = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < nq; ++r) {
    float* s = sc + r * cs;
    const int64_t lim = std::min(limit[r], ctx);
    __m256 mv = ninf;
    // plain loads and stores of whole groups of 8 (the row has room; AVX2's masked stores are slow on AMD), lanes
    // past lim masked out of the max and the sum
    for (int64_t t = 0; t < lim; t += 8) {  // scale (after the dot product, as attend_f32 does), then max
      const __m256i k = tierserve_vec::lanes_below(lim - t);
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + t), sv);
      _mm256_storeu_ps(s + t, x);
      mv = _mm256_max_ps(mv, _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(k)));
    }
    mv = _mm256_max_ps(mv, _mm256_permute2f128_ps(mv, mv, 1));
    mv = _mm256_max_ps(mv, _mm256_permute_ps(mv, 0x4E));
    mv = _mm256_max_ps(mv, _mm256_permute_ps(mv, 0xB1));
    __m256 zv = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t < lim; t += 8) {
      const __m256i k = tierserve_vec::lanes_below(lim - t);
      const __m256 e = _mm256_and_ps(tierserve_vec::exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)),
                                     _mm256_castsi256_ps(k));
      zv = _mm256_add_ps(zv, e);
      _mm256_storeu_ps(s + t, e);  // zero past lim within this group of 8 (cs is a multiple of 8)
    }
    for (; t < cs; t += 8) _mm256_storeu_ps(s + t, _mm256_setzero_ps());
    inv_z[r] = 1.f / tierserve_vec::hsum(zv);
  }
  // Pass 3: p.V over chunks of kF32KeyChunk keys (in L1 while the rows pass), 6 rows x 16 features at a time, each
  // tile over the keys of the chunk its last row sees (limits are nondecreasing; the other rows' p is zero past theirs).
  for (int64_t c0 = 0; c0 < ctx; c0 += kF32KeyChunk) {
    const int64_t c1 = std::min(ctx, c0 + kF32KeyChunk);
    for (int64_t r = first_row(c0); r < nq; r += 6) {
      const int64_t mr = std::min<int64_t>(6, nq - r);
      const int64_t t1 = std::min(c1, limit[r + mr - 1]);
      const float* p = sc + r * cs;
      // every row sees key 0, so each row's first chunk is c0 == 0: there its accumulators start from zero
      const bool first = c0 == 0;
      int64_t f0 = 0;
      for (; f0 + 16 <= d; f0 += 16) {
        float* a = acc + r * d + f0;
        switch (mr) {
          case 6: pv_tile_f32<6>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
          case 5: pv_tile_f32<5>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
          case 4: pv_tile_f32<4>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
          case 3: pv_tile_f32<3>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
          case 2: pv_tile_f32<2>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
          default: pv_tile_f32<1>(p, cs, vs, c0, t1, d, f0, first, a, d); break;
        }
      }
      for (int64_t u = 0; f0 < d && u < mr; ++u)  // the last 8 features, a row at a time
        pv_f32<1>(p + u * cs, vs, c0, t1, d, f0, first, acc + (r + u) * d + f0);
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const __m256 z = _mm256_set1_ps(inv_z[r]);
    for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + i), z));
  }
}
#endif

// One work item: nq query rows against the first ctx keys of a sequence of kv_total keys (>= ctx: a prefill tile
// sees the keys up to its last token); row r sees keys [0, limit[r]), limits nondecreasing in r; rows from gemv_from
// on belong to a query block of gemv_block (1-3) rows in transformers' call (the gemv order above), the others to
// blocks of >= 4 (the gemm order). Writes row r to
// out + (r / G) * out_tok_stride + (r % G) * d.
template <typename T>
void attend(const Rows<T>& qs, int64_t nq, const int64_t* limit, const Span<T>& ks, const Span<T>& vs, int64_t ctx,
            int64_t kv_total, int64_t gemv_from, int64_t gemv_block, float scale, T* out, int64_t out_tok_stride,
            std::vector<float>& scratch) {
#ifdef TS_AVX2_FMA
  if constexpr (std::is_same_v<T, float>) {
    if (qs.d % 8 == 0) {
      if (nq >= kF32GemmRows) {
        attend_f32_gemm(qs, nq, limit, ks, vs, ctx, scale, out, out_tok_stride, scratch);
      } else {
        attend_f32(qs, nq, limit, ks, vs, ctx, scale, out, out_tok_stride, scratch);
      }
      return;
    }
  }
#endif
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  const int64_t ctx_even = (ctx + 1) / 2 * 2;  // p rows in bf16 for pass 2 (even length: dword-aligned rows)
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
  const bool fast = fast_type && (d == 64 || d == 128) && ks.block_size % 16 == 0 && KV_SPLIT % ks.block_size == 0;
  if (!fast) {
    for (int64_t r = 0; r < nq; ++r) {
      load_row(qs.row(r), qf + r * d, d);
    }
  }
  gemv_from = std::clamp<int64_t>(gemv_from, 0, nq);
  // the ymm8 order (g_decode_order 1) where every row is a one-row block (decode); rows of one item are a GQA group
  // of one token, contiguous (qs.row(r) = q + r * d)
  const bool ymm8 = fast && g_decode_order == 1 && gemv_from == 0 && gemv_block == 1 && nq <= qs.group;
#ifdef TS_AVX512_BF16
  // the query rows laid out for the two score kernels
  static thread_local std::vector<__m512i> qprep;  // gemv rows: 4 * d / 32 vectors each
  static thread_local std::vector<uint32_t> qdw, tb;  // gemm rows: d / 2 dwords each; keys transposed
  if (fast) {
    const int64_t steps = d / 8, dw = d / 2;
    qprep.resize(static_cast<size_t>(nq * steps));  // every row: a short split takes the gemv order for all
    qdw.resize(static_cast<size_t>(gemv_from * dw));
    tb.resize(static_cast<size_t>(16 * dw));
    for (int64_t r = 0; r < nq; r += qs.group) {  // every token's rows at once, not one miss after another
      const char* src = reinterpret_cast<const char*>(qs.row(r));
      for (int64_t off = 0; off < qs.group * d * static_cast<int64_t>(sizeof(T)); off += 64)
        __builtin_prefetch(src + off, 0, 3);
    }
    for (int64_t r = 0; r < gemv_from; ++r) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(qs.row(r));
      for (int64_t u = 0; u < dw; ++u) qdw[r * dw + u] = swap_words(src[u]);
    }
    for (int64_t r = 0; r < (ymm8 ? 0 : nq); ++r) {  // (the ymm8 scores read q as it is)
      __m512i* dst = qprep.data() + r * steps;
      if (d == 64) {
        gemv_prepare_q<2>(reinterpret_cast<const at::BFloat16*>(qs.row(r)), dst);
      } else {
        gemv_prepare_q<4>(reinterpret_cast<const at::BFloat16*>(qs.row(r)), dst);
      }
    }
  }
#endif
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
        const auto* kbb = reinterpret_cast<const at::BFloat16*>(kb);
        if (ymm8) {  // decode rows, every split width alike
          for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int m = static_cast<int>(std::min<int64_t>(16, n - j0));
            const auto* q0 = reinterpret_cast<const at::BFloat16*>(qs.row(r0));
            float* o = sc + r0 * ctx + t0 + j0;
            if (d == 64) {
              if (m == 16) scores_ymm8<2, true>(q0, d, nq - r0, kbb + j0 * d, m, scale, o, ctx);
              else scores_ymm8<2>(q0, d, nq - r0, kbb + j0 * d, m, scale, o, ctx);
            } else {
              if (m == 16) scores_ymm8<4, true>(q0, d, nq - r0, kbb + j0 * d, m, scale, o, ctx);
              else scores_ymm8<4>(q0, d, nq - r0, kbb + j0 * d, m, scale, o, ctx);
            }
          }
          continue;
        }
        // the kv split's width decides the order for short splits
        const int64_t w = std::min(KV_SPLIT, kv_total - t0 / KV_SPLIT * KV_SPLIT);
        const int64_t gv0 = w <= 11 ? r0 : std::max(r0, gemv_from);  // rows [gv0, nq): gemv order
        const int64_t tree_end = w <= 3 && gemv_block > 1 ? nq : (w <= 3 ? std::max(r0, gemv_from) : r0);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int m = static_cast<int>(std::min<int64_t>(16, n - j0));
          if (gv0 > r0 && w > 11) {  // gemm rows [r0, gv0)
            const uint32_t* q = qdw.data() + r0 * (d / 2);
            float* o = sc + r0 * ctx + t0 + j0;
            if (d == 64) {
              scores_gemm16<2>(q, gv0 - r0, kbb + j0 * d, m, scale, o, ctx, tb.data());
            } else {
              scores_gemm16<4>(q, gv0 - r0, kbb + j0 * d, m, scale, o, ctx, tb.data());
            }
          }
          const int64_t g0 = std::max(gv0, w <= 3 ? tree_end : gv0);  // gemv rows not in the 8-chain tree case
          for (int j1 = 0; g0 < nq && j1 < m; j1 += 8) {  // 8 keys at a time (two groups of 4)
            const int m8 = std::min(8, m - j1);
            const __m512i* q = qprep.data() + g0 * (d / 8);
            const at::BFloat16* kj = kbb + (j0 + j1) * d;
            float* o = sc + g0 * ctx + t0 + j0 + j1;
            if (d == 64) {
              if (m8 > 4) scores_gemv4<2, 2>(q, nq - g0, kj, m8, scale, o, ctx);
              else scores_gemv4<2>(q, nq - g0, kj, m8, scale, o, ctx);
            } else {
              if (m8 > 4) scores_gemv4<4, 2>(q, nq - g0, kj, m8, scale, o, ctx);
              else scores_gemv4<4>(q, nq - g0, kj, m8, scale, o, ctx);
            }
          }
          for (int64_t r = r0; r < std::min(tree_end, nq); ++r) {  // 2-3 key splits, >= 2 rows: 8 chains, tree
            const at::BFloat16* qr = reinterpret_cast<const at::BFloat16*>(qs.row(r));
            for (int j = 0; j < m; ++j) {
              const at::BFloat16* kr = kbb + (j0 + j) * d;
              float l[8] = {};
              for (int64_t x = 0; x < d; ++x) l[x % 8] += f32(qr[x]) * f32(kr[x]);
              for (int h = 4; h >= 1; h /= 2)
                for (int i = 0; i < h; ++i) l[i] = l[i] + l[i + h];
              sc[r * ctx + t0 + j0 + j] = l[0] * scale;
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
  bool permuted = false;  // acc in the p.V kernels' feature order (pv_index)
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
        // z in torch's order (bf16): 32-key steps into two accumulators (keys 0-15 and 16-31 of each), a last
        // 16-key vector into a third that joins the first, then the two added and the lanes reduced
        Vec zv[3] = {Vec(0.f), Vec(0.f), Vec(0.f)};
        const int64_t vend2 = n0 + width / 32 * 32;
        for (; t < std::min(vend, lim); t += 16) {
          const __mmask16 k = lim - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (lim - t)) - 1u);
          const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), k, s + t);
          const __m512 xm = _mm512_sub_ps(x, mv);
          // bf16: torch's fast exp (its flash attention's; ~1e-5 relative, below bf16's rounding of p, but the sum
          // z sees it); other dtypes keep a ~1 ulp exp.
          const __m512 e = _mm512_maskz_mov_ps(k, std::is_same_v<T, at::BFloat16> ? __m512(Vec(xm).fexp_u20())
                                                                                 : tierserve_vec::exp512(xm));
          Vec& za = zv[std::is_same_v<T, at::BFloat16> ? (t >= vend2 ? 2 : ((t - n0) / 16) % 2) : 0];
          za = za + Vec(e);
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            const __m256i eb = tierserve_vec::to_bf16(e);
            _mm512_mask_storeu_ps(s + t, k, tierserve_vec::bf16x16_to_f32(eb));
            _mm256_mask_storeu_epi16(pb + r * ctx_even + t, k, eb);  // p's bf16 bits for pass 2
          } else {
            _mm512_mask_storeu_ps(s + t, k, e);
          }
        }
        pb_done = std::min(t, lim);  // a masked last vector may end past lim
        const Vec zsum = (zv[0] + zv[2]) + zv[1];
        z = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, zsum);
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
      }
    }
    // p.V over this split's keys.
#ifdef TS_AVX512_BF16
    if (fast) {
      if constexpr (fast_type) {
        auto vrow = [&](int64_t t) { return reinterpret_cast<const at::BFloat16*>(vs.row(t, d)); };
        if (ymm8) {  // chunks of 8 keys from the split's start, each summed from zero and added
          const int64_t r1 = first_row(n0);
          auto run = [&](auto nr, int64_t r) {
            constexpr int NR = decltype(nr)::value;
            const uint16_t* pr = pb + (r1 + r) * ctx_even;
            if (d == 64) {
              values_ymm8_split<NR, 2>(pr, ctx_even, vrow, n0, nend, acc + (r1 + r) * d);
            } else {
              values_ymm8_split<NR, 4>(pr, ctx_even, vrow, n0, nend, acc + (r1 + r) * d);
            }
          };
          by_rows(nq - r1, run);
          permuted = true;
          continue;
        }
        const int64_t gv_from = gemv_block == 1 ? gemv_from : nq;  // rows of 1-row blocks: groups of 4
        const int64_t r1 = first_row(n0), gm_end = std::max(r1, gv_from), gv0 = std::max(r1, gv_from);
        if (gm_end > r1) {  // gemm rows: chunk sums added to acc; keys no row of them sees have p = 0 (skipped)
          const int64_t kend = std::min(nend, limit[gm_end - 1]);
          int64_t bnd[8];
          const int nc = chunks_of(width, bnd);
          for (int c = 0; c < nc; ++c) {
            const int64_t c0 = n0 + bnd[c], c1 = std::min(n0 + bnd[c + 1], kend);
            if (c0 >= c1) break;
            const int64_t rr = first_row(c0);
            auto run = [&](auto nr, int64_t r) {
              constexpr int NR = decltype(nr)::value;
              const uint16_t* pr = pb + (rr + r) * ctx_even;
              if (d == 64) {
                values_gemm_chunk<NR, 2>(pr, ctx_even, vrow, c0, c1, acc + (rr + r) * d);
              } else if constexpr (NR <= 4) {  // (6-row groups are for head_dim 64 only)
                values_gemm_chunk<NR, 4>(pr, ctx_even, vrow, c0, c1, acc + (rr + r) * d);
              }
            };
            if (rr < gm_end) {
              if (d == 64) {  // 6 rows' accumulators fit the registers: each V pair unpacked once for 6 rows
                int64_t r6 = 0;
                for (; r6 + 6 <= gm_end - rr; r6 += 6) run(std::integral_constant<int, 6>{}, r6);
                by_rows(gm_end - rr - r6, [&](auto nr, int64_t r) { run(nr, r6 + r); });
              } else {
                by_rows(gm_end - rr, run);
              }
            }
          }
        }
        if (gv0 < nq) {  // gemv rows: the whole split (their tile ends at the last key: nend == n0 + width)
          TORCH_CHECK(nend == n0 + width, "paged attention: gemv rows must see the whole kv split");
          auto run = [&](auto nr, int64_t r) {
            constexpr int NR = decltype(nr)::value;
            const uint16_t* pr = pb + (gv0 + r) * ctx_even;
            if (d == 64) {
              values_gemv_split<NR, 2>(pr, ctx_even, vrow, n0, width, acc + (gv0 + r) * d);
            } else {
              values_gemv_split<NR, 4>(pr, ctx_even, vrow, n0, width, acc + (gv0 + r) * d);
            }
          };
          by_rows(nq - gv0, run);
        }
        permuted = true;
      }
      continue;
    }
#endif
    for (int64_t t0 = n0; t0 < nend;) {
      const int64_t off = vs.offset_of(t0), n = std::min(bs - off, nend - t0), r0 = first_row(t0);
      const T* vb = vs.block(t0) + off * d;
      if (r0 < nq) {
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
      t0 += n;
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const float* ar = acc + r * d;
    const float inv_z = 1.f / run_sum[r];  // torch multiplies by the reciprocal too
    if (permuted) {
#ifdef TS_AVX512_BF16
      if constexpr (std::is_same_v<T, at::BFloat16>) {  // d is 64 or 128 here (the p.V kernels' layout)
        write_unpermuted(ar, inv_z, d, reinterpret_cast<uint16_t*>(o));
        continue;
      }
#endif
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
    // (sequence, kv head) items handed out a sequence at a time (sequences differ in length; within a chunk the
    // next item's keys are prefetched) - or one at a time where the batch has too few sequences to keep every thread
    // busy (one stream: its kv heads on different threads, not all on one while the others wait)
    const int64_t per_chunk = B >= 2 * at::get_num_threads() ? Hkv : 1;
    tierserve_par::dynamic_for(B * Hkv, per_chunk, [&](auto each) {
      std::vector<float> scratch;
      std::vector<int64_t> limit(G);
      each([&](int64_t begin, int64_t end) {
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
          attend<scalar_t>(rows, G, limit.data(), ks, vs, ctx, ctx, 0, 1, static_cast<float>(scale),
                           op + (b * H + h * G) * D, H * D, scratch);
        }
      });
    });
  });
  return out;
}

// Prefill chunks: q [T, H, D] holds the chunks back to back (chunk p is tokens query_start[p]..query_start[p+1]),
// chunk p ends at position seq_lens[p] (its earlier context already cached; its own K/V written) -> [T, H, D],
// causal. Chunks are split into query tiles of `tile` tokens for load balance. ref_lens[p] (default seq_lens[p]):
// the length of the whole prompt the chunk belongs to - transformers attends over it in one call, whose shape
// decides the summation orders (a prompt prefilled in chunks or after a prefix-cache hit then sums the same way).
torch::Tensor paged_prefill(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& block_tables,
                            const torch::Tensor& query_start, const torch::Tensor& seq_lens, double scale,
                            int64_t tile, const c10::optional<torch::Tensor>& ref_lens) {
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
  const bool has_ref = ref_lens.has_value() && ref_lens->defined();
  TORCH_CHECK(!has_ref || (ref_lens->scalar_type() == at::kLong && ref_lens->is_contiguous() &&
                           ref_lens->numel() == P),
              "paged_prefill: ref_lens must be int64 [chunks]");
  const int64_t* rl = has_ref ? ref_lens->data_ptr<int64_t>() : sl;
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(rl[p] >= sl[p], "paged_prefill: ref_lens below seq_lens");
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
    // handed out dearest first (a prompt's last tiles see the most keys; the cheap first tiles fill in at the end),
    // one at a time: split in two fixed shares, a single prompt gave one thread 1/4 of the work and the other 3/4
    tierserve_par::dynamic_for(n_items, 1, [&](auto each) {
      std::vector<float> scratch;
      std::vector<int64_t> limit;
      each([&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t w = n_items - 1 - item;
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
          // transformers' SDPA call for the prompt: its last query block takes the gemv order if it has 1-3 rows
          const int64_t L = rl[p], qsplit = L >= 768 ? 256 : (L >= 192 ? 64 : 32);
          const int64_t last_block = (L - 1) / qsplit * qsplit, gemv_pos = L - last_block <= 3 ? last_block : L;
          const int64_t gemv_from = std::clamp<int64_t>(gemv_pos - first_pos, 0, n_tok) * G;
          attend<scalar_t>(rows, n_tok * G, limit.data(), ks, vs, ctx, L, gemv_from, L - last_block,
                           static_cast<float>(scale),
                           op + (tok * H + h * G) * D, H * D, scratch);
        }
      });
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
void register_linear_amx(pybind11::module& m);   // linear_amx.cpp
void register_linear_f32(pybind11::module& m);   // linear_f32.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_fused_ops(m);
  register_linear_vnni(m);
  register_linear_amx(m);
  register_linear_f32(m);
#ifdef TS_AVX512_BF16
  m.attr("has_avx512_bf16") = true;
#else
  m.attr("has_avx512_bf16") = false;
#endif
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("set_decode_order", [](int64_t order) {
    TORCH_CHECK(order == 0 || order == 1, "set_decode_order: 0 (gemv4) or 1 (ymm8)");
    g_decode_order = static_cast<int>(order);
  }, "The summation order of one-row (decode) attention in bf16: 0 gemv4, 1 ymm8 (see paged_attention.cpp)");
  m.def("decode_order", []() { return g_decode_order; });
  m.def("paged_decode", &paged_decode, "Paged decode attention reading K/V in place (CPU)", release());
  m.def("paged_prefill", &paged_prefill, "Paged causal attention for prefill chunks, K/V read in place (CPU)",
        pybind11::arg("q"), pybind11::arg("cache"), pybind11::arg("block_tables"), pybind11::arg("query_start"),
        pybind11::arg("seq_lens"), pybind11::arg("scale"), pybind11::arg("tile"),
        pybind11::arg("ref_lens") = pybind11::none(), release());
}
