"""Decode steps on fixed-shape buffers, captured once per shape as CUDA graphs and replayed.

On a GPU a small model's decode step is bound by kernel launches - some 30 per layer, each a few microseconds of
Python and driver work - not by the GPU. So a decode-only step runs on static buffers: the batch padded up to a
bucket (1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to ``max_batch``) and the block tables padded to a power-of-two
width; each (batch, width) pair is captured as a CUDA graph the first time it is met and replayed after that, one
launch per step (vLLM's and SGLang's approach). Padded rows decode a dummy token into slot 0 of a scratch block that
the KV cache manager never hands out (the cache holds one block more than the manager's), with a context of that one
token; their logits are dropped. Prefill and mixed steps stay eager.

``capture=False`` runs the same padded buffers without graphs - on a CPU, where there are none, the tests use it to
check the padding and bucketing (the same tokens as unpadded steps); on a GPU it tells graph bugs from padding bugs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tierserve.model_executor.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes for ``max_batch`` rows at most: the standard buckets below it, then itself."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Static-shape decode steps for one model runner (see the module docstring)."""

    def __init__(self, model: Any, attn: Any, kv_caches: list[torch.Tensor], scratch_block: int, block_size: int,
                 max_batch: int, max_blocks: int, device: torch.device, capture: bool) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use capture=False elsewhere")
        self.model, self.attn, self.kv_caches = model, attn, kv_caches
        self.device, self.capture = device, capture
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max(1, max_blocks)
        b = self.buckets[-1]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        i64 = torch.long
        self.input_ids = torch.zeros(b, dtype=i64, device=device)
        self.positions = torch.zeros(b, dtype=i64, device=device)
        self.slots = torch.full((b,), self.scratch_slot, dtype=i64, device=device)
        self.tables = torch.full((b * self.max_blocks,), scratch_block, dtype=i64, device=device)
        """Block tables, flat: a (batch, width) step reads the first batch * width entries as a contiguous
        [batch, width] table (kernels that take a table's rows at a fixed stride see what they expect)."""
        self.seq_lens = torch.ones(b, dtype=i64, device=device)
        self.logits_idx = torch.arange(b, dtype=i64, device=device)
        self._empty = torch.empty(0, dtype=i64, device=device)
        self._zero = torch.zeros(1, dtype=i64, device=device)
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0
        self.padded_rows = 0
        """Rows added by padding over all steps (a measure of the buckets' waste; the tests check it happens)."""

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The (padded batch, padded width) a decode step of ``rows`` rows and ``width`` blocks runs at, or None if
        it is larger than the buffers."""
        if rows < 1 or rows > self.buckets[-1] or width > self.max_blocks:
            return None
        b = next(x for x in self.buckets if x >= rows)
        return b, min(1 << max(width - 1, 0).bit_length(), self.max_blocks)  # the next power of two

    def _table(self, b: int, w: int) -> torch.Tensor:
        return self.tables[: b * w].view(b, w)

    def _meta(self, b: int, w: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], num_decode_tokens=b,
                                 decode_block_tables=self._table(b, w), decode_seq_lens=self.seq_lens[:b],
                                 prefill_query_lens=[], prefill_seq_lens=[], prefill_block_tables=self._empty,
                                 prefill_query_start=self._zero)

    def _forward(self, b: int, w: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self.attn, self._meta(b, w),
                          self.logits_idx[:b])

    def _capture(self, b: int, w: int) -> tuple[Any, torch.Tensor]:
        # warm-up off the capture (lazy cuBLAS / allocator work must not be recorded). It computes this step for
        # real: writing this step's K/V twice leaves the same values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(b, w)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, w)
        logger.info("captured a CUDA graph for decode steps of %d rows x %d blocks (%d graphs)", b, w,
                    len(self.graphs) + 1)
        return graph, out

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            shape: tuple[int, int]) -> torch.Tensor:
        """A decode-only step (``meta`` as the runner built it, all rows decoding, every row sampled) at ``shape``,
        the step's ``bucket`` -> logits [rows, vocab]."""
        n = int(input_ids.shape[0])
        width = int(meta.decode_block_tables.shape[1])
        b, w = shape
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        table = self._table(b, w)
        table[:n, :width].copy_(meta.decode_block_tables)
        if width < w:
            table[:n, width:].fill_(self.scratch_block)
        if n < b:  # padded rows: a one-token context in the scratch block
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.scratch_slot)
            self.seq_lens[n:b].fill_(1)
            table[n:].fill_(self.scratch_block)
        self.steps += 1
        self.padded_rows += b - n
        if not self.capture:
            return self._forward(b, w)[:n]
        entry = self.graphs.get((b, w))
        if entry is None:
            entry = self.graphs[(b, w)] = self._capture(b, w)
        graph, out = entry
        graph.replay()
        return out[:n]
