"""BlockPool: the KV cache's blocks, their reference counts and the free queue.

Invariant (checked by ``check_integrity``): a block is in the free queue iff its ``ref_count`` is 0.
The free queue is an insertion-ordered dict (O(1) append, pop-oldest and removal from the middle), so a later prefix
cache can revive a freed-but-still-valid block without an O(n) scan. ``Block.block_hash`` is that prefix cache's seam:
the block is the unit of allocation, hashing and tier transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

from tierserve.errors import TierserveError

BlockId = NewType("BlockId", int)


@dataclass
class Block:
    block_id: BlockId
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise TierserveError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        self._free: dict[BlockId, None] = {BlockId(i): None for i in range(num_blocks)}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[BlockId]:
        """Take ``n`` blocks from the head of the free queue (ref_count 0 -> 1). Caller checks availability."""
        if n > len(self._free):
            raise TierserveError(f"asked for {n} KV blocks, only {len(self._free)} free")
        out: list[BlockId] = []
        for _ in range(n):
            bid = next(iter(self._free))
            del self._free[bid]
            block = self.blocks[bid]
            block.ref_count = 1
            block.block_hash = None
            out.append(bid)
        return out

    def free(self, block_ids: list[BlockId]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue's tail (in the order given)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise TierserveError(f"block {bid} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self._free
            if (block.ref_count == 0) != in_free:
                raise AssertionError(f"block {block.block_id}: ref_count={block.ref_count}, in free queue={in_free}")
