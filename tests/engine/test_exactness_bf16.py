"""bfloat16 (the default compute dtype on CPUs with native bf16) against transformers-bf16 on the same weights.

bf16 greedy decoding of a 135M model is fragile: transformers-bf16 itself leaves transformers-fp32's greedy path on
4 of the 8 prompts, and agrees with *itself* on only ~55% of tokens when the same prompts run as one padded batch
(last test): any difference in a last bit flips a near-tie sooner or later. So the engine follows torch's summation
order in every op of the bf16 path - linear_vnni sums K in the blocks oneDNN uses for the shape (measured at load),
RMSNorm sums like torch's reduction, the paged attention kernels follow torch's flash attention and its BLAS (query
blocks, gemm vs gemv orders, p.V chunks, the softmax sum's two accumulators), RoPE and SiLU round at the same points
- and its greedy tokens are transformers-bf16's: 512/512 identical here, batched 8 at a time with chunked prefill
(before these orders: 65-82%). The reference attention backend (torch's SDPA per sequence) gives the same.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.reference import Generated, compare, exactness_prompts, hf_greedy, ours_generated
from tierserve import LLM, SamplingParams
from tierserve.utils.cpu import cpu_info

NEW_TOKENS = 64

pytestmark = pytest.mark.skipif(
    not cpu_info().native_bf16,
    reason="no native bf16 on this CPU (no AMX, no AVX-512-BF16): the engine computes in float32 here (the float32 "
           "exactness tests apply); bf16 would run in emulation, transformers' and ours, many minutes per test (on the "
           "AVX2-only Zen 3 of 2026-12-02 the default-path agreement also fell below the floor; not investigated)")

FLOOR = 0.9
"""The issue's bar. Measured: 512/512 on both CPU kinds - the AMD EPYC Zen 4 (AVX-512-BF16) and a Xeon with AMX, where
torch's bf16 ops take other kernels: the linear layers follow oneDNN's AMX tiles there (linear_amx, with K split as
oneDNN splits it for each of transformers' separate q/k/v and gate/up calls), prefill attention runs torch's SDPA,
and decode attention sums in the order MKL's one-row kernel uses on that CPU (measured at load,
tierserve.kernels.attention_order)."""


@pytest.fixture(scope="module")
def hf_bf16(gguf_path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer: Any) -> list[list[int]]:
    return [hf_tokenizer(p).input_ids for p in exactness_prompts()]


@pytest.fixture(scope="module")
def refs(hf_bf16: Any, prompt_ids: list[list[int]]) -> list[Generated]:
    return [hf_greedy(hf_bf16, i, NEW_TOKENS) for i in prompt_ids]


def _agreement(refs: list[Generated], ids: list[list[int]], **engine: Any) -> Any:
    # a step budget that takes every prompt whole (transformers prefills each prompt in one call)
    llm = LLM(dtype="bfloat16", kv_cache_memory="256MiB", **engine)
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    c = compare(refs, [ours_generated(o.outputs[0]) for o in outs], [f"prompt {i}" for i in range(len(ids))])
    print(f"[bf16 {engine or 'default'}] identical tokens: {c.identical_tokens}/{c.total_tokens} = "
          f"{c.fraction_identical:.2%}, near-tie flips: {c.near_tie_flips}, other divergences: {len(c.failures)}")
    return c


def test_bf16_greedy_agreement(refs: list[Generated], prompt_ids: list[list[int]]) -> None:
    """The default path (native paged attention and linear, fused decode, chunked prefill): the engine-speed issue
    asks for >= 90% of greedy tokens identical to transformers-bf16's (measured: all of them)."""
    c = _agreement(refs, prompt_ids)
    assert not c.failures, c.failures
    assert c.fraction_identical >= FLOOR, c.fraction_identical


def test_bf16_reference_attention_equals_transformers(refs: list[Generated], prompt_ids: list[list[int]]) -> None:
    """With attention as transformers calls it (``--attention-backend reference``: SDPA per sequence), the rest of
    the native path gives transformers-bf16's tokens: the check that isolates attention from the other ops."""
    c = _agreement(refs, prompt_ids, attention_backend="reference")
    assert not c.failures, c.failures
    assert c.fraction_identical >= FLOOR, c.fraction_identical


def test_transformers_bf16_against_itself(hf_bf16: Any, refs: list[Generated], prompt_ids: list[list[int]]) -> None:
    """The yardstick for the figure above: transformers-bf16 run on the same prompts as one left-padded batch
    instead of one at a time (only the GEMM shapes and the padding change) agrees with itself on ~55% of tokens
    up to the first divergence (measured), every divergence again a near-tie."""
    width = max(len(i) for i in prompt_ids)
    ids = torch.tensor([[0] * (width - len(i)) + i for i in prompt_ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in prompt_ids])
    with torch.inference_mode():
        out = hf_bf16.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    batched = [Generated(out.sequences[b, width:].tolist(), [set(s[b].topk(5).indices.tolist()) for s in out.scores])
               for b in range(len(prompt_ids))]
    c = compare(refs, batched, [f"prompt {i}" for i in range(len(prompt_ids))])
    print(f"[bf16] transformers batched vs one at a time: {c.identical_tokens}/{c.total_tokens} = "
          f"{c.fraction_identical:.2%}, near-tie flips: {c.near_tie_flips}")
    assert not c.failures, c.failures


def test_bf16_screened_greedy_head_gives_the_same_tokens(refs: list[Generated], prompt_ids: list[list[int]]) -> None:
    """Plain greedy rows (no logprobs: the other tests ask for them) take their tokens from the LM head's int8
    screen (``greedy_head``) where the native kernels have it: the same tokens as the full head, and transformers'."""
    llm = LLM(dtype="bfloat16", kv_cache_memory="256MiB")
    model = llm.engine.runner.model
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    if model.screen is None:
        pytest.skip("no int8 screen on this path (no AVX-512 VNNI, or the head does not run linear_vnni)")
    assert model.screens(len(prompt_ids), len(prompt_ids))
    screened = [list(o.outputs[0].token_ids) for o in llm.generate(prompt_ids, sp, use_tqdm=False)]
    model.screen_max_rows = 0
    try:
        full = [list(o.outputs[0].token_ids) for o in llm.generate(prompt_ids, sp, use_tqdm=False)]
    finally:
        model.screen_max_rows = type(model).screen_max_rows
    assert screened == full
    same = sum(a == b for s, r in zip(screened, refs) for a, b in zip(s, r.token_ids))
    assert same / sum(len(s) for s in screened) >= FLOOR
