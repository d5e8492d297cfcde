// bf16 linear layers on Intel AMX tiles, from the same packed weights as linear_vnni: its layout
// [N / 16, K / 2, 16, 2] is exactly an AMX B tile per 16 outputs and 32 input features (16 rows of 16 pairs, 64 bytes
// each), so no second copy of the weights is needed.
//
// Each output is one tile accumulator over K in order, 32 features per TDPBF16PS - the order oneDNN's AMX kernels
// sum in for up to 32 rows on the Xeons measured, so decode rows come out as torch's bf16 linear gives them (checked
// bit for bit in tests/kernels/test_fused_ops.py where the CPU has AMX). Against oneDNN it skips the per-call weight
// reorder of F.linear and the small-M overheads: at one row it streams the weights once, like linear_vnni, and at 16
// rows it does the same at AMX's rate instead of 16 AVX-512 dot products per weight vector.
//
// Rows are padded to a multiple of 16 (the A tile); K must be a multiple of 32 (callers fall back otherwise).
//
// SwiGLU epilogue (`swiglu`): for a gate/up projection whose packed weight has gate block i and up block i side by
// side (interleave_gate_up), an output pair is (gate, up) of the same 16 features, so the pair's epilogue writes
// silu(gate) * up directly - rounded at the same points as transformers' bf16 F.silu(gate) * up (ts_silu.h) - and the
// [M, 2I] gate/up activations are never stored and read back.

// at::vec's exp (ts_silu.h) must be the AVX-512 one torch runs: the capability macros before any torch header.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "ts_silu.h"
#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(TS_AVX512_BF16)
#define TS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kLanes = 16;

#ifdef TS_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX tile state only on request (once per process).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0-3: C[mi][nj] (rows x 16 fp32); 4, 5: A for row blocks 0, 1 (rows x 32 bf16); 6, 7: B for output blocks
// 0, 1 (16 x 16 pairs). `rows` < 16 only for a single short block (a small decode batch: the tile unit then does
// that many rows' work, not 16).
void configure_tiles(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t < 6 ? rows : 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Weight tiles a streaming block asks for ahead of their use (K steps of 32 features, 1 KiB per output block).
constexpr int64_t kWeightPrefetchSteps = 4;

// MB row blocks (of 16) x NB output blocks (of 16); x rows at stride xs elements (>= K), wp the first output block's
// packed weights (block stride bs elements); the fp32 sums land in c [32][32]. Stream: the weights pass once (a
// decode-sized call, <= 64 rows), so the block prefetches its weight tiles a few K steps ahead - 0.76-0.96x the time
// of 30 layers' projections from DRAM at 1 and 16 rows, 0.92-1.01x at 64, bit-identical (ad hoc, interleaved builds);
// at 256 and 2048 rows, where the weights come back from L2 for every row chunk, it cost 2-3% and is off.
//
// side(): called once per K step after its tile instructions are issued - the previous block's epilogue, a few rows
// at a time, so its vector work (bf16 conversion; SwiGLU's exp and division) runs while the tile unit computes
// instead of between blocks.
template <int MB, int NB, bool Stream, typename Side>
inline void amx_block(const at::BFloat16* x, int64_t xs, const at::BFloat16* wp, int64_t bs, int64_t s0, int64_t s1,
                      float* c, Side&& side) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MB > 1) _tile_zero(2);
  if constexpr (MB > 1 && NB > 1) _tile_zero(3);
  for (int64_t s = s0; s < s1; ++s) {
    if constexpr (Stream) {  // past the block's end this reads ahead into the next output pair (prefetches never fault)
      const char* ahead = reinterpret_cast<const char*>(wp + (s + kWeightPrefetchSteps) * 16 * 2 * kLanes);
      for (int l = 0; l < 1024; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      if constexpr (NB > 1)
        for (int l = 0; l < 1024; l += 64) _mm_prefetch(ahead + bs * 2 + l, _MM_HINT_T0);
    }
    if constexpr (Stream) {
      _tile_loadd(4, x + s * 32, xs * 2);
      if constexpr (MB > 1) _tile_loadd(5, x + 16 * xs + s * 32, xs * 2);
    } else {  // x rows pass once per output pair: loaded with the non-temporal hint, so the pair's weights stay in L1
      _tile_stream_loadd(4, x + s * 32, xs * 2);
      if constexpr (MB > 1) _tile_stream_loadd(5, x + 16 * xs + s * 32, xs * 2);
    }
    _tile_loadd(6, wp + s * 16 * 2 * kLanes, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MB > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, wp + bs + s * 16 * 2 * kLanes, 64);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (MB > 1) _tile_dpbf16ps(3, 5, 7);
    }
    side();
  }
  _tile_stored(0, c, 32 * 4);
  if constexpr (NB > 1) _tile_stored(1, c + 16, 32 * 4);
  if constexpr (MB > 1) _tile_stored(2, c + 16 * 32, 32 * 4);
  if constexpr (MB > 1 && NB > 1) _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
}
#endif

}  // namespace

bool amx_available() {
#ifdef TS_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// y [M, N] = x [M, K] @ w^T (+ bias) on AMX tiles, w packed by pack_vnni; bf16 in and out, fp32 accumulation, each
// output summed over K in order, 32 features at a time; with k_chunk (a multiple of 32; 0: none) K is summed in
// chunks of that many features, each from zero, the chunk sums then added in order (a GEMM library's K blocking);
// a negative k_chunk: chunks of -k_chunk features whose sums are added as a pairwise tree, ((c0 + c1) + (c2 + c3))
// (a K split between threads whose parts are reduced pairwise; at most 8 chunks).
//
// out: where to write y (a [M, N] bf16 view with unit column stride, any row stride: rows or columns of a larger
// result, so that callers splitting a linear by rows or by output parts need no concatenation); y itself is returned.
torch::Tensor linear_amx(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                         int64_t k_chunk, bool swiglu, const c10::optional<torch::Tensor>& out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_amx: x must be [M, K] bf16");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == kLanes && wp.size(3) == 2 && wp.is_contiguous() &&
                  wp.scalar_type() == at::kBFloat16,
              "linear_amx: weight must come from pack_vnni");
  const int64_t M = x.size(0), K = x.size(1), KP = wp.size(1), NBLK = wp.size(0), N = NBLK * kLanes;
  TORCH_CHECK(K == 2 * KP && K % 32 == 0, "linear_amx: K must match the packed weight and be a multiple of 32");
  TORCH_CHECK(k_chunk % 32 == 0, "linear_amx: k_chunk must be a multiple of 32 (0: none)");
  const bool tree = k_chunk < 0;
  k_chunk = tree ? -k_chunk : k_chunk;
  TORCH_CHECK(!tree || (K + k_chunk - 1) / k_chunk <= 8, "linear_amx: a pairwise tree of at most 8 K chunks");
#ifndef TS_AMX
  TORCH_CHECK(false, "linear_amx: this build has no AMX (compiled for a CPU without AMX tiles)");
  return {};
#else
  TORCH_CHECK(amx_permitted(), "linear_amx: the kernel refused the AMX tile state (arch_prctl)");
  TORCH_CHECK(!swiglu || (NBLK % 2 == 0 && !(bias.has_value() && bias->defined())),
              "linear_amx: swiglu needs whole (gate, up) block pairs and no bias");
  const int64_t NO = swiglu ? N / 2 : N;  // output columns
  torch::Tensor y;
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->dim() == 2 && out->size(0) == M && out->size(1) == NO && out->scalar_type() == at::kBFloat16 &&
                    out->stride(1) == 1 && out->stride(0) >= NO,
                "linear_amx: out must be a [", M, ", ", NO, "] bf16 view with unit column stride");
    y = *out;
  } else {
    y = torch::empty({M, NO}, x.options());
  }
  const int64_t ldy = y.stride(0);
  if (M == 0) return y;
  // rows in whole 16-row tiles (fewer than 16: one short tile); the last 32-row block, if the rows end inside it,
  // is read from a zero-padded copy of its rows (copying all of x to pad it cost a copy per call)
  const int tile_rows = static_cast<int>(std::min<int64_t>(M, 16));
  const int64_t Mp = M < 16 ? M : (M + 15) / 16 * 16;
  const torch::Tensor xc = x.contiguous();
  const int64_t m_last = (Mp - 1) / 32 * 32;
  torch::Tensor tail;
  if (Mp != M) {
    tail = torch::zeros({Mp - m_last, K}, x.options());
    tail.narrow(0, 0, M - m_last).copy_(xc.narrow(0, m_last, M - m_last));
  }
  const at::BFloat16* tp = Mp != M ? tail.data_ptr<at::BFloat16>() : nullptr;
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_amx: bias must have ", N, " elements");
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* w = wp.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t bs = KP * 2 * kLanes, ksteps = K / 32, kc = k_chunk ? std::min(k_chunk / 32, ksteps) : ksteps;
  const int64_t pairs = (NBLK + 1) / 2;
  // Work items (row chunk, output pair), row chunks outermost: the threads walk the output pairs for one chunk of
  // rows, which stays in their L2 (~512 KiB of x; ~256 KiB before x's tiles took the non-temporal hint) while the
  // weights stream past; without the chunks
  // a large prefill's x (MBs) came back from L3 once per output pair (1.1-1.5x slower per shape at 2048 rows, ad hoc
  // timings, min of 20 calls). Packing the chunk's rows as whole tiles, or prefetching them, measured no faster.
  const int64_t mc = std::max<int64_t>(32, (512 * 1024 / (2 * K)) / 32 * 32);
  const int64_t mchunks = (Mp + mc - 1) / mc;
  const bool stream = Mp <= 64;
  // Items handed out from a shared counter (tierserve_par::dynamic_for): split in two fixed shares, 2048 rows in
  // 224-row chunks gave one thread 1120 rows and the other 928.
  // A SwiGLU pair writes 16 bf16 columns, half a cache line: pairs go out two at a time so that one thread writes
  // both halves of each output line (alternate pairs on the two threads had both writing every line).
  tierserve_par::dynamic_for(mchunks * pairs, swiglu && pairs % 2 == 0 ? 2 : 1, [&](auto each) {
    configure_tiles(tile_rows);
    alignas(64) float cbuf[2][32 * 32];
    alignas(64) float part[32 * 32];
    std::vector<float> parts(tree ? 8 * 32 * 32 : 0);  // the tree's chunk sums
    // The block whose sums wait in cbuf for their epilogue (rows [done, rows) still to write), done a few rows per K
    // step of the next block (amx_block's side) and the rest, if any, before that block's sums overwrite anything.
    struct Pending {
      const float* c = nullptr;
      int64_t m0 = 0, rows = 0, done = 0, p = 0, b0 = 0, nb = 0, per_step = 1;
    } pend;
    auto epilogue = [&](int64_t r1) {
      const float* c = pend.c;
      for (int64_t r = pend.done; r < r1; ++r) {
        if (swiglu) {  // gate in c's first 16 columns, up in the next 16: each rounded to bf16 as its own linear
          const __m512 g = tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(_mm512_load_ps(c + r * 32)));
          const __m512 u = tierserve_vec::bf16x16_to_f32(tierserve_vec::to_bf16(_mm512_load_ps(c + r * 32 + 16)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (pend.m0 + r) * ldy + pend.p * kLanes),
                              tierserve_vec::silu_mul16(g, u));
          continue;
        }
        for (int64_t j = 0; j < pend.nb; ++j) {
          __m512 v = _mm512_load_ps(c + r * 32 + 16 * j);
          if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + (pend.b0 + j) * kLanes));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (pend.m0 + r) * ldy + (pend.b0 + j) * kLanes),
                              tierserve_vec::to_bf16(v));
        }
      }
      pend.done = r1;
    };
    auto side = [&] {
      if (pend.done < pend.rows) epilogue(std::min(pend.rows, pend.done + pend.per_step));
    };
    int cur = 0;
    each([&](int64_t ib, int64_t ie) {
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t p = item % pairs, m_begin = item / pairs * mc, m_end = std::min(Mp, m_begin + mc);
        const int64_t b0 = 2 * p, nb = std::min<int64_t>(2, NBLK - b0);
        const at::BFloat16* wb = w + b0 * bs;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += 32) {
          const int64_t mb = Mp - m0 > 16 ? 2 : 1;
          const at::BFloat16* xb = tp && m0 == m_last ? tp : xp + m0 * K;
          const int64_t rows = std::min<int64_t>(32, M - m0);
          float* c = cbuf[cur];
          int64_t nparts = 0;
          for (int64_t s0 = 0; s0 < ksteps; s0 += kc) {
            const int64_t s1 = std::min(ksteps, s0 + kc);
            float* dst = tree ? parts.data() + (nparts++) * 32 * 32 : (s0 ? part : c);
            auto block = [&](auto streaming, auto&& sd) {
              constexpr bool S = decltype(streaming)::value;
              if (mb == 2 && nb == 2) amx_block<2, 2, S>(xb, K, wb, bs, s0, s1, dst, sd);
              else if (mb == 2) amx_block<2, 1, S>(xb, K, wb, bs, s0, s1, dst, sd);
              else if (nb == 2) amx_block<1, 2, S>(xb, K, wb, bs, s0, s1, dst, sd);
              else amx_block<1, 1, S>(xb, K, wb, bs, s0, s1, dst, sd);
            };
            auto none = [] {};
            if (swiglu) {
              if (stream) block(std::true_type{}, side);
              else block(std::false_type{}, side);
            } else if (stream) {
              block(std::true_type{}, none);
            } else {
              block(std::false_type{}, none);
            }
            if (s0 && !tree)
              for (int64_t r = 0; r < rows; ++r)
                for (int64_t j = 0; j < 2 * kLanes; j += kLanes)
                  _mm512_store_ps(c + r * 32 + j, _mm512_add_ps(_mm512_load_ps(c + r * 32 + j),
                                                                _mm512_load_ps(part + r * 32 + j)));
          }
          if (tree) {  // pairwise: parts[i] += parts[i + h] at strides 1, 2, 4 -> c
            for (int64_t h = 1; h < nparts; h *= 2)
              for (int64_t i = 0; i + h < nparts; i += 2 * h) {
                float* a = parts.data() + i * 32 * 32;
                const float* b = parts.data() + (i + h) * 32 * 32;
                for (int64_t r = 0; r < rows; ++r)
                  for (int64_t j = 0; j < 2 * kLanes; j += kLanes)
                    _mm512_storeu_ps(a + r * 32 + j, _mm512_add_ps(_mm512_loadu_ps(a + r * 32 + j),
                                                                   _mm512_loadu_ps(b + r * 32 + j)));
              }
            std::memcpy(c, parts.data(), 32 * 32 * sizeof(float));
          }
          epilogue(pend.rows);  // what the K steps did not finish of the previous block
          pend = Pending{c, m0, rows, 0, p, b0, nb, (rows + ksteps - 1) / ksteps};
          cur ^= 1;
          if (!swiglu) epilogue(rows);
        }
      }
    });
    epilogue(pend.rows);
    _tile_release();
  });
  return y;
#endif
}

void register_linear_amx(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("amx_available", &amx_available, "whether this build has AMX kernels and the OS granted the tile state");
  m.def("linear_amx", &linear_amx,
        "x @ w.T (+ bias) on AMX tiles from a pack_vnni weight, bf16; K (a multiple of 32) summed in order; swiglu: "
        "w is a gate/up weight with its blocks interleaved, and the result is silu(gate) * up [M, N / 2]; out: a view to "
        "write the result into (unit column stride, any row stride)",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("k_chunk") = 0,
        pybind11::arg("swiglu") = false, pybind11::arg("out") = pybind11::none(), release());
}
