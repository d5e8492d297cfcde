"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with q/k/v bias) over paged attention.

Weights are held fused: one QKV projection and one gate/up projection per layer (fewer, larger GEMMs). The LM head
runs only on the positions that are sampled (``logits_indices``). RMSNorm and logits are computed in float32.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.config import ModelConfig
from tierserve.errors import ModelLoadError
from tierserve.model_executor.attention.base import AttentionBackend, AttentionMetadata
from tierserve.model_executor.attention.cpu_backend import CpuAttentionBackend
from tierserve.model_executor.models.rope import apply_rope, rope_cos_sin


def interleave_gate_up(wp: torch.Tensor) -> torch.Tensor:
    """A packed gate/up weight [2 * nb, K / 2, 16, 2] (gate blocks, then up blocks) with gate block i and up block i
    side by side, so that each output pair of ``linear_amx`` is (gate, up) of the same 16 features."""
    nb = wp.shape[0] // 2
    return torch.stack([wp[:nb], wp[nb:]], dim=1).reshape(wp.shape).contiguous()


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest float32 at or above each value."""
    f = x.float()
    return torch.where(f.double() < x, torch.nextafter(f, torch.tensor(float("inf"))), f)


def screen_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 screen of an LM head weight [N, K] (N a multiple of 16) for the native ``greedy_head``: ``(w8, scale,
    a, c)`` - w8 = round(w_v / s_v) per row v (s_v = max|w_v| / 127), [ceil(N / 64), ceil(K / 2), 64, 2] (64 outputs'
    pairs side by side: one stream per group); a[v] = max_i |w_vi -
    s_v w8_vi| + gamma_K max|w_v| (the quantisation error and the fp32 accumulation bound of the exact kernel, both
    per unit of sum |x|); c[v] = 0.51 s_v sum |w8_v| (per unit of x's int16 step). Computed in float64 and rounded
    up to float32, so the bounds ``greedy_head`` builds from them hold (see ``csrc/linear_vnni.cpp``)."""
    wd = w.detach().to(torch.float64)
    n, k = wd.shape
    m = wd.abs().amax(1)
    s = (m / 127).float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    sd = s.double()[:, None]
    q = torch.round(wd / sd).clamp_(-127, 127)
    err = (wd - q * sd).abs().amax(1)
    kk = k + k % 2
    u = 2.0 ** -24
    a = err + kk * u / (1 - kk * u) * m
    c = 0.51 * sd[:, 0] * q.abs().sum(1)
    ng = (n + 63) // 64  # groups of 64 outputs (4 of linear_vnni's blocks), each one run of [KP, 64, 2]
    w8 = torch.nn.functional.pad(q.to(torch.int8), (0, kk - k, 0, ng * 64 - n))
    w8 = w8.view(ng, 64, kk // 2, 2).permute(0, 2, 1, 3).contiguous()
    return w8, s.contiguous(), _round_up_f32(a).contiguous(), _round_up_f32(c).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size = cfg.num_heads * d
        self.kv_size = cfg.num_kv_heads * d
        self.input_norm = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.post_norm = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.qkv = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, h, dtype=dtype), requires_grad=False)
        self.qkv_bias = (
            nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, dtype=dtype), requires_grad=False)
            if cfg.attention_bias else None
        )
        self.o_proj = nn.Parameter(torch.empty(h, self.q_size, dtype=dtype), requires_grad=False)
        self.gate_up = nn.Parameter(torch.empty(2 * cfg.intermediate_size, h, dtype=dtype), requires_grad=False)
        self.down = nn.Parameter(torch.empty(h, cfg.intermediate_size, dtype=dtype), requires_grad=False)
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.inter = cfg.intermediate_size

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        h = rms_norm(x, self.input_norm, self.eps)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        a = attn.forward(q, k, v, kv_cache, meta)
        x = x + F.linear(a, self.o_proj)
        h = rms_norm(x, self.post_norm, self.eps)
        gu = F.linear(h, self.gate_up)
        g, u = gu.split([self.inter, self.inter], dim=-1)
        return x + F.linear(F.silu(g) * u, self.down)


class LlamaForCausalLM(nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor
    fused_ops: ModuleType | None = None
    """Native fused CPU ops (``tierserve.kernels``); set by the model runner where they apply, else plain torch."""
    vnni: dict[int, torch.Tensor] | None = None
    """Pair-interleaved copies of the bf16 projection and head weights (id(weight) -> packed) for the native
    ``linear_vnni`` (AVX-512-BF16), made by ``pack_vnni_weights``: bit-identical to torch's bf16 linear on
    99.99% of outputs and faster than oneDNN at every batch size measured on the EPYC (1 to 2048 rows)."""
    vnni_k_chunks: dict[int, tuple[int, int]] | None = None
    """Per ``vnni`` weight (id -> (one row, several rows)): the K block sizes in which torch's bf16 linear sums on
    this CPU at one row and at several (``tierserve.kernels.linear_order``), so ``linear_vnni`` gives its bits. Rows
    that transformers would compute one at a time (decode tokens, sampled positions in the head) use the first."""
    vnni_max_rows: int | None = None
    """Largest step (rows) that uses ``linear_vnni``; None for all. Set where oneDNN has AMX tiles for larger ones."""
    fused_decode: bool = True
    """With ``vnni``, a decode-only step runs every layer in one native call (``decode_layers``: the same kernels in
    the same order, without a Python round trip per op)."""
    amx_chunks: Any = None
    """On CPUs with AMX (a ``tierserve.kernels.linear_order.AmxKChunks``): every projection runs ``linear_amx`` on the
    ``vnni`` copies (the same layout is the AMX weight tile), K summed in the chunks oneDNN uses for that row count."""
    swiglu: bool = False
    """The ``vnni`` gate/up copies are interleaved (``pack_vnni_weights``) and silu(gate) * up is the gate/up
    projection's epilogue (``linear_amx``'s or ``linear_vnni``'s), so the [T, 2I] activations are never stored."""
    screen: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """An int8 screen of the LM head (``screen_weights``) for the native ``greedy_head`` (bf16, ``vnni``: plain greedy
    steps of up to ``screen_max_rows`` rows get their tokens from it, the same tokens, reading half the head's bytes)
    or ``greedy_head_f32`` (float32, ``f32``: every plain greedy step; a quarter of the head's bytes, and int16
    multiply-adds in place of float32 FMAs - the head of the default model: 0.33-0.50x the time of linear_f32 + argmax
    at 1-8 rows, 0.72-0.80x at 64 rows on an AVX2 Zen 3, ``scripts/linear_kernels.py --float32``)."""
    screen_max_rows: int = 8
    """Most sampled rows of a step that take ``greedy_head`` (0: never). The head alone, weights from memory (Zen 5
    EPYC, ad hoc): 1-2 rows 0.51x the time of linear_vnni + argmax, 4 rows 0.74x, 8 rows 0.88x, 16 rows 1.25x (the
    int8 dot products cost more than the reads save)."""
    f32: dict[int, torch.Tensor] | None = None
    """On CPUs without native bf16 (AVX2 + FMA; the engine computes in float32 there): packed copies of the float32
    projection and head weights (id(weight) -> packed) for the native ``linear_f32``, made by ``pack_f32_weights``."""
    f32_max_rows: int | None = None
    """Largest step (rows) that uses ``linear_f32``; larger ones take torch's F.linear (MKL). None for all."""
    packed: dict[int, torch.Tensor] | None = None
    """oneDNN-packed copies of the projection weights (id(weight) -> packed), made by ``pack_weights`` (AMX CPUs)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(LlamaLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head: nn.Parameter | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        cos, sin = rope_cos_sin(cfg, max_positions)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self._decode_args: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None
        self._part_widths: dict[int, tuple[int, ...]] | None = None

    def _layers(self) -> list[LlamaLayer]:
        return [cast(LlamaLayer, m) for m in self.layers]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionBackend,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
        greedy: bool = False,
    ) -> torch.Tensor:
        """-> logits [len(logits_indices), vocab] in the compute dtype; with ``greedy`` (only where ``screens`` says
        so) the int64 greedy tokens [len(logits_indices)] instead, from ``greedy_head``."""
        if self.fused_ops is not None and hasattr(attn, "attend"):
            return self._forward_fused(self.fused_ops, input_ids, positions, kv_caches, attn, meta, logits_indices,
                                       greedy)
        assert not greedy, "greedy tokens come from the fused path's greedy_head"
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        for layer, cache in zip(self._layers(), kv_caches):
            x = layer(x, cos, sin, attn, cache, meta)
        x = rms_norm(x.index_select(0, logits_indices), self.norm, self.cfg.rms_norm_eps)
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(x, head)

    def screens(self, rows: int, step_tokens: int) -> bool:
        """Whether a plain greedy step of ``step_tokens`` tokens sampling ``rows`` rows may take its tokens from the
        screened head (``forward(greedy=True)``): ``greedy_head_f32`` wherever the step runs ``linear_f32`` (whose sums
        it reproduces); ``greedy_head`` where the head would run ``linear_vnni`` and the rows are few enough that
        reading the head's weights, not computing, sets its time."""
        ops = self.fused_ops
        if ops is None or self.screen is None or rows <= 0:
            return False
        if self.f32 is not None:  # every step that runs linear_f32 (compute-bound steps gain too)
            return self.f32_max_rows is None or step_tokens <= self.f32_max_rows
        return (self.vnni is not None and self.amx_chunks is None
                and (self.vnni_max_rows is None or step_tokens <= self.vnni_max_rows)
                and rows <= self.screen_max_rows)

    def _decode_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Per layer (input_norm, qkv, o_proj, post_norm, gate_up, down; the projections as ``vnni`` copies), the
        qkv biases if any, and the projections' one-row K chunks: the argument lists of the native ``decode_layers``
        (built once)."""
        if self._decode_args is None:
            assert self.vnni is not None
            layers = self._layers()
            v = self.vnni
            weights: list[torch.Tensor] = [
                w for la in layers
                for w in (la.input_norm, v[id(la.qkv)], v[id(la.o_proj)], la.post_norm, v[id(la.gate_up)],
                          v[id(la.down)])]
            biases: list[torch.Tensor] = [la.qkv_bias for la in layers if la.qkv_bias is not None]
            chunks = self.vnni_k_chunks or {}
            k_chunks = [chunks.get(id(w), (0, 0))[0] for la in layers for w in (la.qkv, la.o_proj, la.gate_up, la.down)]
            self._decode_args = (weights, biases, k_chunks)
        return self._decode_args

    def weights_in_step_order(self) -> list[torch.Tensor]:
        """Every weight once, in the order a decode step reads them (layer by layer, then the final norm and the
        LM head; the embedding is the head when they are tied)."""
        out: list[torch.Tensor] = []
        for la in self._layers():
            out += [la.input_norm, la.qkv] + ([la.qkv_bias] if la.qkv_bias is not None else [])
            out += [la.o_proj, la.post_norm, la.gate_up, la.down]
        out.append(self.norm)
        if self.lm_head is not None:
            out.append(self.lm_head)
        out.append(self.embed)
        return out

    def place_weights_in_arena(self) -> int:
        """Move the weights (CPU) into one huge-page arena in step order, so that a step streams them as one sequence
        from 2 MiB pages (a bf16 weight stream ran 1.7x faster than from scattered 4 KiB-page tensors on the EPYC;
        see ``tierserve.utils.hugepages``). The ``vnni`` copies, which bf16 steps read instead, get their own arena.
        Returns the arena's bytes."""
        from tierserve.utils.hugepages import move_to_arena

        self._decode_args = None
        return move_to_arena(self.weights_in_step_order()).numel()

    def _parts(self, w: torch.Tensor, n: int) -> tuple[int, ...]:
        """The output widths of the separate linears a fused projection stands for (q, k, v; gate, up), as
        transformers runs them; (n,) for the others, and where a part is not whole 16-output weight tiles (then the
        fused split is used)."""
        if self._part_widths is None:
            self._part_widths = {}
            for la in self._layers():
                for fused, parts in ((la.qkv, (la.q_size, la.kv_size, la.kv_size)), (la.gate_up, (la.inter,) * 2)):
                    if all(p % 16 == 0 for p in parts):
                        self._part_widths[id(fused)] = parts
        return self._part_widths.get(id(w), (n,))

    def _projections(self) -> list[torch.Tensor]:
        """The weights that go through ``linear``: the layers' projections in step order, then the LM head."""
        weights: list[torch.Tensor] = [
            w for layer in self._layers() for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        weights.append(self.embed if self.lm_head is None else self.lm_head)
        return weights

    def pack_vnni_weights(self, ops: ModuleType, measure_chunks: bool = True, swiglu: bool = False,
                          screen: bool = True) -> int:
        """Keep ``linear_vnni`` copies of the bf16 projection and head weights, in one huge-page arena in step order,
        and measure the K blocking of torch's linear for each shape (``vnni_k_chunks``). Returns the bytes held.
        ``swiglu``: the gate/up copies are laid out for the SwiGLU epilogue of ``linear_amx`` / ``linear_vnni``
        instead (gate and up block i side by side), and the model calls it for silu(gate) * up. ``screen``: also the
        LM head's int8 screen for ``greedy_head`` (where the kernels have it; not on AMX tiles, which never use it)."""
        from tierserve.kernels.linear_order import torch_k_chunks
        from tierserve.utils.hugepages import move_to_arena

        weights = self._projections()
        gate_ups = {id(la.gate_up) for la in self._layers()} if swiglu else set()
        packed = [interleave_gate_up(ops.pack_vnni(w.data)) if id(w) in gate_ups else ops.pack_vnni(w.data)
                  for w in weights]
        self.swiglu = swiglu
        arena = move_to_arena(packed)
        self.vnni = {id(w): p for w, p in zip(weights, packed)}
        head = weights[-1]
        self.screen = screen_weights(head.data) if screen and getattr(ops, "has_screen", False) else None
        by_shape: dict[tuple[int, int, bool], tuple[int, int]] = {}
        self.vnni_k_chunks = {}
        for w in weights if measure_chunks else []:
            key = (w.shape[0], w.shape[1], w is head)  # the head only ever runs rows that are one row in transformers
            if key not in by_shape:
                by_shape[key] = torch_k_chunks(ops, key[0], key[1], rows=() if w is head else (2, 64))
            self.vnni_k_chunks[id(w)] = by_shape[key]
        self._decode_args = None
        return arena.numel()

    def pack_f32_weights(self, ops: ModuleType) -> int:
        """Keep ``linear_f32`` copies of the float32 projection and head weights, in one huge-page arena in step
        order (AVX2 CPUs, where MKL's float32 GEMV runs generic code on AMD CPUs). Returns the bytes held."""
        from tierserve.utils.hugepages import move_to_arena

        weights = self._projections()
        packed = [ops.pack_f32(w.data) for w in weights]
        arena = move_to_arena(packed)
        self.f32 = {id(w): p for w, p in zip(weights, packed)}
        head = weights[-1].data
        # the screen's bounds need finite weights (a NaN logit must win, as in argmax_rows: the full head finds it)
        self.screen = (screen_weights(head) if hasattr(ops, "greedy_head_f32") and bool(torch.isfinite(head).all())
                       else None)
        return arena.numel() * arena.element_size() + (sum(t.numel() * t.element_size() for t in self.screen)
                                                       if self.screen is not None else 0)

    def drop_plain_projections(self) -> int:
        """Once every projection goes through the ``vnni`` (or ``f32``) copies (``vnni_max_rows`` / ``f32_max_rows``
        None: no other path), the plain layer projection weights are never read again: release them (the embedding,
        which is also the tied LM head's plain copy, the norms and the biases stay, re-laid in a fresh arena). Returns
        the bytes released."""
        assert (self.vnni is not None and self.vnni_max_rows is None) or (
            self.f32 is not None and self.f32_max_rows is None)
        freed = 0
        for la in self._layers():
            for w in (la.qkv, la.o_proj, la.gate_up, la.down):
                freed += w.numel() * w.element_size()
                w.data = w.data.new_empty((0, w.shape[1]))
        self.place_weights_in_arena()
        return freed

    def pack_weights(self, batch_hint: int = 64) -> int:
        """Keep oneDNN-blocked copies of the bf16 projection and head weights for large GEMMs on AMX CPUs, where
        oneDNN's tile kernels beat ``linear_vnni`` (bit-identical to ``F.linear`` on the plain layout). Returns the
        extra bytes held."""
        if not (self.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()):
            return 0
        pack = torch.ops.mkldnn._reorder_linear_weight
        self.packed = {}
        extra = 0
        for w in self._projections():
            self.packed[id(w)] = pack(w.data, batch_hint)
            extra += w.numel() * w.element_size()
        return extra

    def _forward_fused(
        self,
        ops: ModuleType,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: Any,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
        greedy: bool = False,
    ) -> torch.Tensor:
        """The same computation as the layer loop above, with the per-layer op chains fused in native code:
        (residual add +) RMSNorm, RoPE + K/V cache write, SiLU-and-multiply, and the bf16 linear ``linear_vnni``.
        Rounding to the compute dtype happens at the same points, so results match the unfused path."""
        t = input_ids.shape[0]
        vnni = self.vnni if self.vnni and (self.vnni_max_rows is None or t <= self.vnni_max_rows) else None
        f32 = self.f32 if self.f32 and (self.f32_max_rows is None or t <= self.f32_max_rows) else None
        packed = self.packed or {}
        pointwise = torch.ops.mkldnn._linear_pointwise if packed else None
        chunks = self.vnni_k_chunks or {}

        amx = self.amx_chunks if vnni is not None else None
        # rows of the step as transformers would compute them: (first row, rows, rows of that call) - decode tokens
        # one at a time, each prefill chunk inside its whole prompt
        nd = meta.num_decode_tokens
        segments = [(0, nd, 1)] if nd else []
        if amx is not None and meta.prefill_query_lens:
            refs = (meta.prefill_ref_lens_t.tolist() if meta.prefill_ref_lens_t is not None
                    else meta.prefill_seq_lens)
            start = nd
            for qlen, ref in zip(meta.prefill_query_lens, refs):
                segments.append((start, qlen, ref))
                start += qlen

        plans: dict[tuple[tuple[int, ...], int], list[tuple[int, int, tuple[int, ...]]]] = {}

        def linear_amx(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, one_row_rows: int,
                       swiglu: bool = False) -> torch.Tensor:
            assert vnni is not None and amx is not None
            wp = vnni[id(w)]
            k = wp.shape[1] * 2
            if one_row_rows >= h.shape[0]:
                return ops.linear_amx(h, wp, b, 0, swiglu)
            # transformers runs the fused projections as separate linears (q, k, v; gate, up), and oneDNN's K split
            # depends on N: the chunks are per part; consecutive segments with the same chunks share a call. The plan
            # depends only on the shape, so the layers share it within the step.
            parts = self._parts(w, wp.shape[0] * 16)
            calls = plans.get((parts, k))
            if calls is None:
                calls = []
                for first, rows, ref in segments:
                    c = tuple(amx(n, k, ref) for n in parts)
                    if calls and calls[-1][2] == c:
                        calls[-1] = (calls[-1][0], calls[-1][1] + rows, c)
                    else:
                        calls.append((first, rows, c))
                plans[(parts, k)] = calls

            if len(calls) == 1 and len(set(calls[0][2])) == 1:
                return ops.linear_amx(h, wp, b, calls[0][2][0], swiglu)
            # several calls, each writing its rows / output parts of one result in place (no concatenation)
            y = h.new_empty(h.shape[0], wp.shape[0] * 16 // (2 if swiglu else 1))
            for first, rows, c in calls:
                x, out = h[first:first + rows], y[first:first + rows]
                if len(set(c)) == 1:
                    ops.linear_amx(x, wp, b, c[0], swiglu, out)
                    continue
                if swiglu:  # gate and up have one shape, so one K split; an interleaved weight cannot be cut in parts
                    raise RuntimeError(f"linear_amx: gate and up asked for different K chunks {c}")
                off = 0
                for n, cn in zip(parts, c):
                    ops.linear_amx(x, wp[off // 16:(off + n) // 16], None if b is None else b[off:off + n], cn, False,
                                   out[:, off:off + n])
                    off += n
            return y

        def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                   one_row_rows: int = meta.num_decode_tokens) -> torch.Tensor:
            if amx is not None:
                return linear_amx(h, w, b, one_row_rows)
            if vnni is not None:
                one, several = chunks.get(id(w), (0, 0))
                return ops.linear_vnni(h, vnni[id(w)], b, several, one_row_rows, one)
            if f32 is not None:
                return ops.linear_f32(h, f32[id(w)], b)
            wp = packed.get(id(w))
            return F.linear(h, w, b) if wp is None or pointwise is None else pointwise(h, wp, b, "none", [], "")

        x = F.embedding(input_ids, self.embed)
        cos = self.cos.index_select(0, positions)
        sin = self.sin.index_select(0, positions)
        delta: torch.Tensor | None = None
        if (vnni is not None and self.fused_decode and meta.num_decode_tokens == t
                and isinstance(attn, CpuAttentionBackend) and attn.native_decode):
            # a decode-only step: all layers in one native call (same kernels, same order)
            weights, biases, k_chunks = self._decode_weights()
            assert amx is None or self.swiglu, "decode_layers on AMX takes the gate/up weights interleaved"
            delta = ops.decode_layers(x, weights, biases, k_chunks, kv_caches, cos, sin, meta.slot_mapping,
                                      meta.decode_block_tables, meta.decode_seq_lens, attn.scale, self.cfg.rms_norm_eps,
                                      self.cfg.num_heads, self.cfg.num_kv_heads, amx is not None, self.swiglu)
        else:
            for layer, cache in zip(self._layers(), kv_caches):
                h = ops.rms_norm(x, delta, layer.input_norm, layer.eps)  # x += delta first
                qkv = linear(h, layer.qkv, layer.qkv_bias)
                ops.rope_and_cache(qkv, cos, sin, cache, meta.slot_mapping, layer.num_heads, layer.num_kv_heads)
                q = qkv[:, : layer.q_size].view(t, layer.num_heads, layer.head_dim)
                k = qkv[:, layer.q_size: layer.q_size + layer.kv_size].view(t, layer.num_kv_heads, layer.head_dim)
                v = qkv[:, layer.q_size + layer.kv_size:].view(t, layer.num_kv_heads, layer.head_dim)
                delta = linear(attn.attend(q, cache, meta, (k, v)), layer.o_proj)
                h = ops.rms_norm(x, delta, layer.post_norm, layer.eps)
                if amx is not None and self.swiglu:  # silu(gate) * up as the gate/up projection's epilogue
                    act = linear_amx(h, layer.gate_up, None, meta.num_decode_tokens, swiglu=True)
                elif vnni is not None and self.swiglu:  # the same on AVX-512-BF16
                    one, several = chunks.get(id(layer.gate_up), (0, 0))
                    act = ops.linear_vnni(h, vnni[id(layer.gate_up)], None, several, meta.num_decode_tokens, one, True)
                else:
                    act = ops.silu_mul(linear(h, layer.gate_up))
                delta = linear(act, layer.down)
        assert delta is not None
        x = (x.index_select(0, logits_indices) + delta.index_select(0, logits_indices))
        h = ops.rms_norm(x, None, self.norm, self.cfg.rms_norm_eps)
        head = self.embed if self.lm_head is None else self.lm_head
        if greedy:
            assert self.screen is not None and amx is None and (vnni is not None or f32 is not None)
            if f32 is not None:
                return ops.greedy_head_f32(h, f32[id(head)], *self.screen)
            assert vnni is not None
            return ops.greedy_head(h, vnni[id(head)], *self.screen, chunks.get(id(head), (0, 0))[0])
        return linear(h, head, one_row_rows=h.shape[0])

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Missing or misshapen tensors raise ModelLoadError."""

        def take(name: str) -> torch.Tensor:
            try:
                return tensors[name]
            except KeyError:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}") from None

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ModelLoadError(f"tensor {name}: shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
            param.data.copy_(value)

        put(self.embed, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm, take("model.norm.weight"), "model.norm.weight")
        if self.lm_head is not None:
            put(self.lm_head, take("lm_head.weight"), "lm_head.weight")
        for i, layer in enumerate(self._layers()):
            p = f"model.layers.{i}."
            put(layer.input_norm, take(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(layer.post_norm, take(p + "post_attention_layernorm.weight"), p + "post_attention_layernorm.weight")
            qkv = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            put(layer.qkv, qkv, p + "self_attn.qkv")
            if layer.qkv_bias is not None:
                put(layer.qkv_bias, torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]), p + "qkv_bias")
            put(layer.o_proj, take(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj.weight")
            gu = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            put(layer.gate_up, gu, p + "mlp.gate_up")
            put(layer.down, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj.weight")
