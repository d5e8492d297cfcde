// Paged attention kernels for CPU. They read K/V in place through the block tables (no gather copy), accumulate in
// float32 and use an exact two-pass softmax (scores for the visible keys, then p.V). Work is split over
// (sequence, kv head[, query tile]) items with torch's own thread pool (at::parallel_for).
//
// Cache layout per layer (the torch backend's): [2, Hkv, num_blocks, block_size, D], K then V.
// bf16 with AVX-512-BF16 uses dpbf16 dot products (bf16 x bf16 products are exact in fp32); other dtypes and CPUs
// take portable loops written for the compiler's vectoriser.

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

// Scores of one query row against n <= 16 consecutive keys (rows of d bf16, d % 32 == 0).
inline void scores16_bf16(const at::BFloat16* qr, const at::BFloat16* k, int64_t n, int64_t d, float scale,
                          float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t v = 0; v < d; v += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + v);
    for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512(k + j * d + v));
  }
  const __m512 s = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), s);
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

// One work item: nq query rows against the first ctx keys of a sequence; row r sees keys [0, limit[r]), limits
// nondecreasing in r. Writes row r to out + (r / G) * out_tok_stride + (r % G) * d.
template <typename T>
void attend(const Rows<T>& qs, int64_t nq, const int64_t* limit, const Span<T>& ks, const Span<T>& vs, int64_t ctx,
            float scale, T* out, int64_t out_tok_stride, std::vector<float>& scratch) {
  const int64_t d = qs.d, G = qs.group, bs = ks.block_size;
  const int64_t ctx_even = (ctx + 2) / 2 * 2;  // p rows in bf16 for pass 2, with at least one zero past the end
  scratch.resize(static_cast<size_t>(nq * d + nq * ctx + nq * d + d + nq + nq * ctx_even / 2));
  float* qf = scratch.data();
  float* sc = qf + nq * d;
  float* acc = sc + nq * ctx;
  float* row = acc + nq * d;
  float* inv_z = row + d;
  uint16_t* pb = reinterpret_cast<uint16_t*>(inv_z + nq);
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
  for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
    const int64_t n = std::min(bs, ctx - t0), r0 = first_row(t0);
    if (r0 >= nq) break;
    const T* kb = ks.block(t0);
    if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
      if (fast) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t m = std::min<int64_t>(16, n - j0);
          for (int64_t r = r0; r < nq; ++r) {
            scores16_bf16(qs.row(r), kb + j0 * d, m, d, scale, sc + r * ctx + t0 + j0);
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
  // Softmax per row over its visible keys, rounded where torch's CPU flash attention (what transformers' SDPA runs)
  // rounds: e = exp(s - max) in fp32, the sum z over the unrounded e, e stored in the storage dtype for the p.V
  // product (a no-op for fp32), and the division by z applied to the fp32 output accumulator at the end.
  // Invisible keys get weight 0.
  for (int64_t r = 0; r < nq; ++r) {
    float* s = sc + r * ctx;
    const int64_t lim = limit[r];
    float m = -std::numeric_limits<float>::infinity();
    int64_t t = 0;
#ifdef TS_AVX512_BF16
    {  // a scalar max is one long dependency chain (~8% of decode attention's time)
      __m512 mv = _mm512_set1_ps(m);
      for (; t + 16 <= lim; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
      m = _mm512_reduce_max_ps(mv);
    }
#endif
    for (; t < lim; ++t) m = std::max(m, s[t]);
    float z = 0.f;
    t = 0;
#ifdef TS_AVX512_BF16
    {
      const __m512 mv = _mm512_set1_ps(m);
      __m512 zv = _mm512_setzero_ps();
      for (; t + 16 <= lim; t += 16) {
        const __m512 e = tierserve_vec::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
        zv = _mm512_add_ps(zv, e);
        _mm512_storeu_ps(s + t, std::is_same_v<T, at::BFloat16>
                                    ? tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(e)) : e);
      }
      z = _mm512_reduce_add_ps(zv);
    }
#endif
    for (; t < lim; ++t) {
      const float e = std::exp(s[t] - m);
      z += e;
      s[t] = tierserve_vec::f32(static_cast<T>(e));
    }
    inv_z[r] = 1.f / z;
    for (int64_t t = lim; t < ctx; ++t) s[t] = 0.f;
    if constexpr (std::is_same_v<T, at::BFloat16>) {  // the bf16 bits of p (exact: p is already bf16-valued)
      uint16_t* pr = pb + r * ctx_even;
      for (int64_t t = 0; t < ctx; ++t) pr[t] = c10::BFloat16(s[t]).x;
      for (int64_t t = ctx; t < ctx_even; ++t) pr[t] = 0;
    }
  }
  // Pass 2: out = p.V.
  std::fill(acc, acc + nq * d, 0.f);
  bool permuted = false;  // acc in values_block_bf16's feature order
  for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
    const int64_t n = std::min(bs, ctx - t0), r0 = first_row(t0);
    if (r0 >= nq) break;
    const T* vb = vs.block(t0);
    if constexpr (fast_type) {
#ifdef TS_AVX512_BF16
      if (fast && (d == 64 || d == 128)) {
        if (d == 64) {
          values_rows_bf16<2>(pb + r0 * ctx_even + t0, ctx_even, nq - r0, vb, n, acc + r0 * d);
        } else {
          values_rows_bf16<4>(pb + r0 * ctx_even + t0, ctx_even, nq - r0, vb, n, acc + r0 * d);
        }
        permuted = true;
        continue;
      }
#endif
    }
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
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + (r / G) * out_tok_stride + (r % G) * d;
    const float* ar = acc + r * d;
    if (permuted) {
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(ar[pv_index(i)] * inv_z[r]);
    } else {
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(ar[i] * inv_z[r]);
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
        attend<scalar_t>(rows, G, limit.data(), ks, vs, ctx, static_cast<float>(scale), op + (b * H + h * G) * D,
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
        attend<scalar_t>(rows, n_tok * G, limit.data(), ks, vs, ctx, static_cast<float>(scale),
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
