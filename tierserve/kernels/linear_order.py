"""Find the order in which torch's bf16 linear (oneDNN on CPU) sums each output, so ``linear_vnni`` sums the same way.

A bf16 linear accumulates in fp32; which partial sums it forms decides the last bits of each output, and in a model
those bits decide near-tied greedy tokens. oneDNN's AVX-512-BF16 kernels sum each output's K features in one chain
per K block (each pair of features in VDPBF16PS order, the block sums then added in order), and pick the block size
from the shape: measured on the EPYC with torch 2.13, 512 for K = 576 at any row count, and for K = 1536 512 at one
row but 1024 at two or more. That depends on the CPU, the oneDNN version and the threads, so it is measured here, at
load, in the process that will run the model: for each weight shape, one probe per candidate block size whose result
differs between block sizes, checked against ``F.linear``.

The probe: x is all ones; each output column holds +2^25, -2^25 and 1 at three random features. The 1 survives only
if it is added after both large terms cancelled, or in a partial sum of its own - so the column's bf16 result (0 or
1) tells where the three features fall in the summation order, and a few hundred columns tell the block size. A
second probe on random data then checks the whole result, bit for bit.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_BIG = 2.0**25


def _probe_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.zeros(n, k)
    # three distinct features per column
    a = torch.randint(0, k, (n,), generator=gen)
    b = torch.randint(0, k - 1, (n,), generator=gen)
    b += b >= a
    c = torch.randint(0, k - 2, (n,), generator=gen)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    c += c >= lo
    c += c >= hi
    rows = torch.arange(n)
    w[rows, a] = _BIG
    w[rows, b] = -_BIG
    w[rows, c] = 1.0
    return w.bfloat16()


def candidate_chunks(k: int) -> list[int]:
    """0 (one chain over all of K), then every multiple of 32 below K."""
    return [0] + list(range(32, k, 32))


def torch_k_chunk(ops: ModuleType, n: int, k: int, rows: int, seed: int = 0) -> int | None:
    """The ``k_chunk`` with which ``ops.linear_vnni`` equals ``F.linear`` bit for bit on [rows, k] x [n, k] bf16, or
    None if no block size does (another kernel family, e.g. AMX tiles)."""
    gen = torch.Generator().manual_seed(seed)
    probes = [(torch.ones(rows, k, dtype=torch.bfloat16), _probe_weight(n, k, gen)),
              (torch.randn(rows, k, generator=gen).bfloat16(), (torch.randn(n, k, generator=gen) * 0.05).bfloat16())]
    refs = [F.linear(x, w) for x, w in probes]
    packed = [ops.pack_vnni(w) for _, w in probes]
    for c in candidate_chunks(k):
        if all(torch.equal(ops.linear_vnni(x, wp, None, c, 0, 0), ref)
               for (x, _), wp, ref in zip(probes, packed, refs)):
            return c
    return None


def torch_k_chunks(ops: ModuleType, n: int, k: int, rows: tuple[int, ...] = (2, 64)) -> tuple[int, int]:
    """(block size at one row, block size at several rows) for an [n, k] weight; 0 where not found (one chain).
    The several-row probes (``rows``; none: same as one row) must agree, else 0."""
    one = torch_k_chunk(ops, n, k, 1)
    multi = {torch_k_chunk(ops, n, k, r) for r in rows} if rows else {one}
    many = multi.pop() if len(multi) == 1 else None
    if one is None or many is None:
        logger.info("linear_vnni cannot reproduce torch's bf16 linear order for [%d, %d] on this CPU "
                    "(one row: %s, several: %s); summing in one chain", n, k, one, many)
    return (one or 0, many or 0)


class AmxKChunks:
    """The K blocking of torch's bf16 linear on a CPU with AMX, where oneDNN's tile kernels sum each output over K in
    order, 32 features per tile step (what ``ops.linear_amx`` does with no chunk) - up to 32 rows; above that oneDNN
    splits K between threads for mid-sized M and adds the parts (measured with torch 2.13 on a 2-core Xeon: K = 576
    in halves for 33 to a few hundred rows, K = 1536 in thirds or quarters by M - at ~260-340 rows quarters added as
    a pairwise tree, two threads' halves - one chain again for large M). The
    split follows oneDNN's own heuristics of M, N, K and the threads, so it is measured, per shape and row count, the
    first time that row count is asked for (a few ms; remembered), with the probe of ``torch_k_chunk`` against
    ``linear_amx``: prefill rows then sum as transformers' single call over the whole prompt does."""

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops
        self._chunks: dict[tuple[int, int, int], int] = {}
        self._probes: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._random: dict[int, torch.Tensor] = {}

    def _random_rows(self, rows: int, k: int) -> torch.Tensor:
        """rows x k random bf16 probe rows: the first rows of one matrix per k, grown (doubled) as needed. Drawing
        fresh normals for every new row count took ~a quarter of a probe (15 of ~67 ms for four shapes at ~1200
        rows), and a probe runs on the first step that meets a new prompt length."""
        have = self._random.get(k)
        if have is None or have.shape[0] < rows:
            size = max(rows, 2 * (0 if have is None else have.shape[0]), 64)
            self._random[k] = torch.randn(size, k, generator=torch.Generator().manual_seed(k)).bfloat16()
        return self._random[k][:rows]

    def candidates(self, k: int) -> list[int]:
        """One chain first, then even splits of K (most likely), the same with the parts added as a pairwise tree
        (negative: K split between threads, measured for K = 1536 in quarters at ~260-340 rows), then every multiple
        of 32."""
        splits = [k // s for s in range(2, 9) if k % s == 0 and (k // s) % 32 == 0]
        trees = [-c for c in splits if k // c >= 4]
        return [0] + splits + trees + [c for c in range(32, k, 32) if c not in splits]

    def __call__(self, n: int, k: int, rows: int) -> int:
        """The k_chunk for ``linear_amx`` that gives torch's bits for an [rows, k] x [n, k] call (0: one chain; also
        when nothing matches, which is logged once)."""
        key = (n, k, rows)
        if key in self._chunks:
            return self._chunks[key]
        if rows <= 32:
            self._chunks[key] = 0
            return 0
        if (n, k) not in self._probes:
            gen = torch.Generator().manual_seed(0)
            ws = [_probe_weight(n, k, gen), (torch.randn(n, k, generator=gen) * 0.05).bfloat16()]
            self._probes[(n, k)] = [(w, self.ops.pack_vnni(w)) for w in ws]
        xs = [torch.ones(rows, k, dtype=torch.bfloat16), self._random_rows(rows, k)]
        refs = [F.linear(x, w) for x, (w, _) in zip(xs, self._probes[(n, k)])]
        found = 0
        for c in self.candidates(k):
            if all(torch.equal(self.ops.linear_amx(x, wp, None, c), ref)
                   for x, (_, wp), ref in zip(xs, self._probes[(n, k)], refs)):
                found = c
                break
        else:
            logger.info("linear_amx cannot reproduce torch's bf16 linear order for [%d, %d] x %d rows; one chain",
                        n, k, rows)
        self._chunks[key] = found
        return found
