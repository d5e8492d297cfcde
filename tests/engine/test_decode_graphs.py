"""``DecodeGraphs``' padding and bucketing (decode steps on the static buffers that CUDA graphs replay on a GPU).

The tokens they give are checked against transformers in ``test_exactness.py`` (``test_padded_decode_buffers`` on
any device, ``test_cuda_graphs`` on a CUDA GPU).
"""

from __future__ import annotations

import pytest
import torch

from tierserve.model_executor.decode_graphs import DecodeGraphs, batch_buckets


def test_buckets() -> None:
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(128)[-3:] == [64, 96, 128]
    g = DecodeGraphs(None, None, [], scratch_block=9, block_size=16, max_batch=6, max_blocks=20,
                     device=torch.device("cpu"), capture=False)
    assert g.bucket(1, 1) == (1, 1)
    assert g.bucket(3, 3) == (4, 4)
    assert g.bucket(5, 17) == (6, 20)  # the width bucket is capped at the model's longest table
    assert g.bucket(7, 1) is None and g.bucket(2, 21) is None and g.bucket(0, 1) is None
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(None, None, [], 9, 16, 6, 20, torch.device("cpu"), capture=True)
