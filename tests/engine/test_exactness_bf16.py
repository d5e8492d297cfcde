"""bfloat16 (the default compute dtype on CPUs with native bf16) against transformers-bf16 on the same weights.

bf16 greedy decoding of a 135M model is fragile: transformers-bf16 itself leaves transformers-fp32's greedy path on
4 of the 8 prompts (at tokens 1, 16, 27 and 55). So the test asserts what must hold — every divergence is a near-tie
(each side's token in the other's top-5) — and reports the fraction of tokens identical up to each first
divergence (measured: 80% with the native CPU kernels, 65% before them; the engine-speed issue asks for 90%, not met,
see BENCHMARKS.md).
"""

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
    assert not c.failures, c.failures
    assert c.fraction_identical >= 0.5
