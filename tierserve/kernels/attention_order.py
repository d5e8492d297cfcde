"""Find the order in which torch's SDPA sums a decode step's attention in bf16, so the native decode kernel follows it.

torch's CPU flash attention runs each query block's two products (q.K^T, p.V) through its BLAS; for a one-row block -
every decode step in transformers - MKL picks a gemv kernel by CPU, and the kernels sum in different orders: on an
AMD EPYC Zen 4 "gemv4" (4 interleaved chains per score; p.V in groups of 4 keys), on a Xeon with AMX "ymm8" (8 lanes
of pairs with two alternating accumulators per score; p.V in chains of 8 keys) - see ``csrc/paged_attention.cpp``.
Which one this process's torch uses is measured, once, the way ``linear_order`` measures the linear layers.

Random data hardly tells the orders apart (a score's last bits rarely survive the rounding of p and of the output
to bf16), so the probes are built to: each sequence holds +2^25, -2^25 and 1 at three random places - in one key's
features (q all ones: the score is 1 or 0 depending on whether the 1 is added after the two large terms cancel), or
in three keys' first value feature (q zero: p.V gives 1 or 0 the same way) - and the output shows which.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from tierserve.kernels.linear_order import _BIG

logger = logging.getLogger(__name__)

ORDERS = {0: "gemv4", 1: "ymm8"}


def _probes(head_dim: int, length: int, n: int, on_values: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """n sequences of ``length`` keys (1 kv head, a GQA group of 3) in a paged cache of 16-token blocks, in shuffled
    blocks: q [n, 3, D], k and v [n, length, D], cache [2, 1, n * nb, 16, D], block tables [n, nb], seq lens [n]."""
    bs = 16
    nb = (length + bs - 1) // bs
    q = torch.zeros(n, 3, head_dim) if on_values else torch.ones(n, 3, head_dim)
    k = torch.zeros(n, length, head_dim)
    v = torch.zeros(n, length, head_dim)
    for i in range(n):
        if on_values:  # three keys' first value feature
            a, b, c = torch.randperm(length, generator=gen)[:3].tolist()
            v[i, a, 0], v[i, b, 0], v[i, c, 0] = _BIG, -_BIG, 1.0
        else:  # three features of one key, whose value alone is nonzero
            t = int(torch.randint(0, length, (1,), generator=gen))
            a, b, c = torch.randperm(head_dim, generator=gen)[:3].tolist()
            k[i, t, a], k[i, t, b], k[i, t, c] = _BIG, -_BIG, 1.0
            v[i, t, 0] = 1.0
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    tables = torch.randperm(n * nb, generator=gen).view(n, nb)
    cache = torch.zeros(2, 1, n * nb, bs, head_dim, dtype=torch.bfloat16)
    for i in range(n):
        for j in range(nb):
            m = min(bs, length - j * bs)
            cache[0, 0, tables[i, j], :m] = k[i, j * bs:j * bs + m]
            cache[1, 0, tables[i, j], :m] = v[i, j * bs:j * bs + m]
    return q, k, v, cache, tables.long(), torch.full((n,), length, dtype=torch.long)


def torch_decode_order(ops: ModuleType, head_dim: int, lengths: tuple[int, ...] = (16, 45, 300, 600),
                       n: int = 48) -> int | None:
    """The ``set_decode_order`` value whose ``paged_decode`` equals SDPA (called as transformers calls it for a
    decode step) bit for bit on the probes at these context lengths, or None if neither does."""
    gen = torch.Generator().manual_seed(0)
    problems = [_probes(head_dim, length, n, on_values, gen) for length in lengths for on_values in (False, True)]
    refs = [F.scaled_dot_product_attention(q.unsqueeze(2), k.unsqueeze(1), v.unsqueeze(1), scale=1.0,
                                           enable_gqa=True).squeeze(2) for q, k, v, *_ in problems]
    before = ops.decode_order()
    try:
        for order in ORDERS:
            ops.set_decode_order(order)
            if all(torch.equal(ops.paged_decode(q, cache, tables, lens, 1.0), ref)
                   for (q, _, _, cache, tables, lens), ref in zip(problems, refs)):
                return order
    finally:
        ops.set_decode_order(before)
    return None


def use_torch_decode_order(ops: ModuleType, head_dim: int) -> int | None:
    """Measure the order (``torch_decode_order``) and set it for this process; logs what it found."""
    order = torch_decode_order(ops, head_dim)
    if order is None:
        logger.info("decode attention: no native order reproduces torch's SDPA bit for bit here; keeping %s",
                    ORDERS[ops.decode_order()])
        return None
    ops.set_decode_order(order)
    logger.info("decode attention sums in torch's %s order on this CPU", ORDERS[order])
    return order
