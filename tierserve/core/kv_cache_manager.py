"""KVCacheManager: the scheduler's three verbs over block bookkeeping.

``allocate_slots(request, num_new_tokens)`` makes sure the request's block table covers
``request.num_computed_tokens + num_new_tokens`` tokens (block i holds tokens [i*block_size, (i+1)*block_size)),
``free(request)`` returns its blocks tail-first, ``can_ever_fit(num_tokens)`` says whether a request of that size
fits in the whole cache. The manager owns block ids; the model runner owns the tensors they index.
"""

from __future__ import annotations

from tierserve.core.block_pool import BlockPool
from tierserve.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table for ``num_new_tokens`` more tokens. False (nothing changed) if short."""
        need = self.num_blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free_blocks:
            return False
        if need:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, last block first (chain ends are the first to be reused)."""
        if request.block_ids:
            self.pool.free(list(reversed(request.block_ids)))
            request.block_ids = []

    def can_ever_fit(self, num_tokens: int) -> bool:
        return cdiv(num_tokens, self.block_size) <= self.pool.num_blocks
