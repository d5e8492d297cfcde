"""Engine-speed bar 4: in bfloat16 (the default compute dtype on CPUs with native bf16), >= 90% of greedy tokens on
the exactness prompts equal transformers-bf16's on the same weights (tokens up to each prompt's first divergence
count as equal; bf16 rounding differs between the two implementations, so divergences are expected)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.reference import compare, exactness_prompts, hf_greedy, ours_generated
from tierserve import LLM, SamplingParams

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_bf16(gguf_path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)


def test_bf16_greedy_agreement(hf_bf16: Any, hf_tokenizer: Any) -> None:
    ids = [hf_tokenizer(p).input_ids for p in exactness_prompts()]
    refs = [hf_greedy(hf_bf16, i, NEW_TOKENS) for i in ids]
    llm = LLM(dtype="bfloat16", kv_cache_memory="256MiB")
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    c = compare(refs, [ours_generated(o.outputs[0]) for o in outs], [f"prompt {i}" for i in range(len(ids))])
    print(f"[bf16] identical tokens: {c.identical_tokens}/{c.total_tokens} = {c.fraction_identical:.2%}, "
          f"near-tie flips: {c.near_tie_flips}, other divergences: {len(c.failures)}")
    assert c.fraction_identical >= 0.90
