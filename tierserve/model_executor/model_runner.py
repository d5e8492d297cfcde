"""ModelRunner: owns the weights, the KV cache tensors and the per-step tensors; runs one step.

It receives the scheduler's decision (which requests, how many new tokens each), lays the tokens out flat
(decodes first, then prefill chunks), builds the attention metadata, runs the model and samples the requests whose
step reaches their last token. It never changes scheduling state; the engine applies the results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tierserve.config import CacheConfig, ModelConfig
from tierserve.core.scheduler import ScheduledRequest, SchedulerOutput
from tierserve.errors import OutOfKVCacheMemoryError
from tierserve.model_executor.attention import AttentionMetadata, get_backend, resolve_backend_name
from tierserve.model_executor.attention.cpu_backend import CpuAttentionBackend
from tierserve.model_executor.decode_graphs import DecodeGraphs
from tierserve.model_executor.models.llama import LlamaForCausalLM
from tierserve.model_executor.sampler import SamplerOutput, plain_greedy, sample
from tierserve.request import Request
from tierserve.utils.cpu import cpu_info
from tierserve.utils.hugepages import thp_mode

logger = logging.getLogger(__name__)


AMX_VNNI_MAX_ROWS = 32
"""On an AMX CPU whose kernel build lacks linear_amx: steps up to this many rows use linear_vnni, larger ones oneDNN's
AMX GEMM (a fallback; with linear_amx every step runs on the tiles, see docs/architecture.md)."""
F32_MAX_ROWS: int | None = None
"""float32 on an AVX2 CPU (no native bf16): steps up to this many rows use linear_f32, larger ones MKL's GEMM (None:
every step; on the Zen 3 measured linear_f32 took 0.22-0.62x MKL's time at 1-16 rows, 0.43-0.98x at 64, 0.78-1.01x at
256 and 0.82-1.12x at 1024 - scripts/linear_kernels.py)."""


def _ref_len(s: ScheduledRequest) -> int:
    """The whole prompt's length for a chunk inside it (transformers prefills a prompt in one call), else the
    chunk's end (a recomputed sequence after preemption has no such call)."""
    end = s.request.num_computed_tokens + s.num_new_tokens
    n = s.request.num_prompt_tokens
    return n if end <= n else end


@dataclass
class ModelRunnerOutput:
    sampled_requests: list[Request]
    sampler_output: SamplerOutput


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        attention_backend: str = "auto",
        decode_graphs: str = "auto",
        max_num_seqs: int = 128,
    ) -> None:
        self.cfg = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.model = LlamaForCausalLM(model_config, dtype, max_model_len).to(device)
        self.model.load_weights(tensors)
        self.attention_backend = resolve_backend_name(attention_backend, str(device))
        self.attn = get_backend(self.attention_backend)(
            model_config.num_heads, model_config.num_kv_heads, model_config.head_dim, self.block_size
        )
        per_block = self.attn.bytes_per_block(model_config.num_kv_heads, model_config.head_dim, self.block_size,
                                              dtype) * model_config.num_layers
        if cache_config.num_blocks is not None:
            num_blocks = cache_config.num_blocks
        else:
            num_blocks = cache_config.kv_cache_memory // per_block
        if num_blocks < 1:
            raise OutOfKVCacheMemoryError(
                f"kv_cache_memory={cache_config.kv_cache_memory} bytes holds no block "
                f"(one block of {self.block_size} tokens needs {per_block} bytes); raise --kv-cache-memory"
            )
        self.num_blocks = int(num_blocks)
        self.kv_bytes = self.num_blocks * per_block
        if decode_graphs not in ("auto", "off", "padded"):
            raise ValueError(f"decode_graphs must be auto, off or padded, got {decode_graphs!r}")
        graphs = decode_graphs == "padded" or (decode_graphs == "auto" and device.type == "cuda")
        # with decode graphs, one block more than the KV manager's: the padded rows' scratch block
        self.kv_caches = self.attn.allocate_kv_cache(model_config.num_layers, self.num_blocks + int(graphs), dtype,
                                                     device)
        self.decode_graphs: DecodeGraphs | None = None
        if graphs:
            self.decode_graphs = DecodeGraphs(self.model, self.attn, self.kv_caches, self.num_blocks, self.block_size,
                                              max_num_seqs, -(-max_model_len // self.block_size), device,
                                              capture=decode_graphs == "auto")
            logger.info("decode steps on padded static buffers%s (batch buckets up to %d)",
                        ", replayed as CUDA graphs" if decode_graphs == "auto" else "", max_num_seqs)
        if device.type == "cpu":
            arena = self.model.place_weights_in_arena()
            logger.info("weights: %.0f MiB in one arena (transparent huge pages: %s)", arena / 2**20, thp_mode())
        if self.attention_backend in ("cpu", "reference") and device.type == "cpu":
            from tierserve.kernels import cpu_ops

            self.model.fused_ops = cpu_ops()
            ops = self.model.fused_ops
            if ops is not None and dtype == torch.bfloat16 and getattr(ops, "has_avx512_bf16", False):
                amx = cpu_info().has_amx and self._amx_fits() and ops.amx_available()
                # SiLU-and-multiply as the gate/up projection's epilogue wherever every step runs the native linear
                # (not on AMX CPUs without the tile kernel, whose large steps take oneDNN on the plain weights)
                swiglu = amx or not cpu_info().has_amx
                extra = self.model.pack_vnni_weights(ops, measure_chunks=not amx, swiglu=swiglu, screen=not amx)
                logger.info("packed %.0f MiB of bf16 weights for the native AVX-512-BF16 / AMX linear", extra / 2**20)
                if amx:
                    # the same packed weights are AMX weight tiles: every projection on the tile unit
                    from tierserve.kernels.linear_order import AmxKChunks, amx_chunks_cache_file

                    cache = amx_chunks_cache_file(torch.get_num_threads())
                    self.model.amx_chunks = AmxKChunks(ops, cache)
                    logger.info("projections on AMX tiles (linear_amx); %d of oneDNN's K splits (shape, row count) "
                                "read from %s", len(self.model.amx_chunks), cache)
                elif cpu_info().has_amx:
                    # AMX without the native tile kernel: oneDNN's tiles beat AVX-512 dot products on large GEMMs
                    self.model.vnni_max_rows = AMX_VNNI_MAX_ROWS
                    extra = self.model.pack_weights()
                    logger.info("packed %.0f MiB of bf16 weights for oneDNN (AMX) GEMMs", extra / 2**20)
                # decode attention in the order this CPU's BLAS gives torch's SDPA for one-row blocks (measured)
                from tierserve.kernels.attention_order import use_torch_decode_order

                use_torch_decode_order(ops, model_config.head_dim)
                if cpu_info().has_amx and isinstance(self.attn, CpuAttentionBackend):
                    # torch's flash attention sums on AMX tiles here: prefill through it, decode stays native
                    self.attn.sdpa_prefill = True
                if self.model.vnni_max_rows is None:
                    freed = self.model.drop_plain_projections()
                    logger.info("released the %.0f MiB of unpacked projection weights", freed / 2**20)
            elif ops is not None and dtype == torch.float32 and getattr(ops, "has_avx2_fma", False) and \
                    self._f32_fits():
                # no native bf16 here (float32 compute): projections through the packed AVX2 linear
                extra = self.model.pack_f32_weights(ops)
                self.model.f32_max_rows = F32_MAX_ROWS
                logger.info("packed %.0f MiB of float32 weights for the native AVX2 linear (steps up to %s rows)",
                            extra / 2**20, F32_MAX_ROWS or "any number of")
                if F32_MAX_ROWS is None:
                    freed = self.model.drop_plain_projections()
                    logger.info("released the %.0f MiB of unpacked projection weights", freed / 2**20)
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s); attention backend %s", self.num_blocks,
                    self.block_size, self.kv_bytes / 2**20, dtype, self.attention_backend)

    def _f32_fits(self) -> bool:
        """linear_f32 needs every projection's (and the head's) output width to be a multiple of 16."""
        return all(w.shape[0] % 16 == 0 for w in self.model._projections())

    def _amx_fits(self) -> bool:
        """linear_amx needs every projection's (and the head's) input width to be a multiple of 32."""
        c = self.cfg
        return all(k % 32 == 0 for k in (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size))

    def _block_table(self, reqs: list[Request]) -> torch.Tensor:
        width = max((len(r.block_ids) for r in reqs), default=1)
        rows = [r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs]
        return torch.tensor(rows, dtype=torch.long).view(len(reqs), max(width, 1))

    def _prepare(self, items: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                               list[int], list[Request]]:
        decodes = [s for s in items if s.num_new_tokens == 1 and s.request.num_computed_tokens > 0]
        prefills = [s for s in items if not (s.num_new_tokens == 1 and s.request.num_computed_tokens > 0)]
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        sampled: list[Request] = []
        qstart = [0]
        for s in decodes + prefills:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            ids.extend(r.all_token_ids[start:end])
            positions = range(start, end)
            pos.extend(positions)
            bids = r.block_ids
            slots.extend(bids[p // bs] * bs + p % bs for p in positions)
            if s.completes:
                logits_idx.append(len(ids) - 1)
                sampled.append(r)
        for s in prefills:
            qstart.append(qstart[-1] + s.num_new_tokens)
        dreqs = [s.request for s in decodes]
        preqs = [s.request for s in prefills]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._block_table(dreqs).to(self.device) if dreqs else torch.empty(0),
            decode_seq_lens=torch.tensor([r.num_computed_tokens + 1 for r in dreqs], dtype=torch.long,
                                         device=self.device),
            prefill_query_lens=[s.num_new_tokens for s in prefills],
            prefill_seq_lens=[s.request.num_computed_tokens + s.num_new_tokens for s in prefills],
            prefill_block_tables=self._block_table(preqs).to(self.device) if preqs else torch.empty(0),
            prefill_query_start=torch.tensor(qstart, dtype=torch.long, device=self.device),
            prefill_seq_lens_t=torch.tensor([s.request.num_computed_tokens + s.num_new_tokens for s in prefills],
                                            dtype=torch.long),
            prefill_ref_lens_t=torch.tensor([_ref_len(s) for s in prefills], dtype=torch.long),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions_t = torch.tensor(pos, dtype=torch.long, device=self.device)
        return input_ids, positions_t, meta, logits_idx, sampled

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, meta, logits_idx, sampled = self._prepare(sched.scheduled)
        if not logits_idx:
            self.model(input_ids, positions, self.kv_caches, self.attn, meta,
                       torch.empty(0, dtype=torch.long, device=self.device))
            return ModelRunnerOutput([], SamplerOutput([], None, []))
        graphs = self.decode_graphs
        n = len(input_ids)
        shape = (graphs.bucket(n, int(meta.decode_block_tables.shape[1]))
                 if graphs is not None and meta.num_decode_tokens == n and len(logits_idx) == n else None)
        if graphs is not None and shape is not None:
            return ModelRunnerOutput(sampled, sample(graphs.run(input_ids, positions, meta, shape), sampled))
        idx = torch.tensor(logits_idx, dtype=torch.long, device=self.device)
        # (size first: where the screen declines, sample() makes the only plain_greedy pass over the rows)
        if self.model.screens(len(sampled), len(input_ids)) and plain_greedy(sampled):
            tokens = self.model(input_ids, positions, self.kv_caches, self.attn, meta, idx, greedy=True)
            return ModelRunnerOutput(sampled, SamplerOutput(tokens.tolist(), None, [None] * len(sampled)))
        logits = self.model(input_ids, positions, self.kv_caches, self.attn, meta, idx)
        return ModelRunnerOutput(sampled, sample(logits, sampled))
