"""Bar 1 of the core engine: greedy tokens match transformers (float32, same GGUF weights) in four runs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reference import TEST_DEVICE, Generated, compare, exactness_prompts, hf_greedy, ours_generated
from tierserve import LLM, SamplingParams

NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer: Any, llm_fp32: LLM) -> list[list[int]]:
    prompts = exactness_prompts()
    ref = [hf_tokenizer(p).input_ids for p in prompts]
    ours = [llm_fp32.tokenizer.encode(p) for p in prompts]
    assert ours == ref, "prompt token ids differ from the transformers tokenizer's"
    lens = [len(x) for x in ref]
    assert len(prompts) >= 8 and min(lens) >= 5 and max(lens) <= 1500, lens
    return ref


@pytest.fixture(scope="module")
def references(hf_model: Any, prompt_ids: list[list[int]]) -> list[Generated]:
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


def _check(label: str, refs: list[Generated], outs: list[Any]) -> None:
    got = [ours_generated(o.outputs[0]) for o in outs]
    c = compare(refs, got, [f"prompt {i}" for i in range(len(refs))])
    print(f"[{label}] identical tokens: {c.identical_tokens}/{c.total_tokens} = {c.fraction_identical:.2%}, "
          f"near-tie flips: {c.near_tie_flips}")
    assert not c.failures, c.failures
    assert c.fraction_identical >= 0.97, f"{label}: only {c.fraction_identical:.2%} identical"


def test_one_at_a_time(llm_fp32: LLM, prompt_ids: list[list[int]], references: list[Generated]) -> None:
    outs = [llm_fp32.generate([ids], GREEDY, use_tqdm=False)[0] for ids in prompt_ids]
    _check("one at a time", references, outs)


def test_one_batch(llm_fp32: LLM, prompt_ids: list[list[int]], references: list[Generated]) -> None:
    outs = llm_fp32.generate(prompt_ids, GREEDY, use_tqdm=False)
    _check("one batch", references, outs)


def test_chunked_prefill(llm_fp32: LLM, prompt_ids: list[list[int]], references: list[Generated]) -> None:
    cfg = llm_fp32.engine.scheduler.config
    old = cfg.max_num_batched_tokens
    cfg.max_num_batched_tokens = 96  # every prompt over 96 tokens is split across steps
    try:
        outs = llm_fp32.generate(prompt_ids, GREEDY, use_tqdm=False)
    finally:
        cfg.max_num_batched_tokens = old
    _check("chunked prefill", references, outs)


def test_preemption(prompt_ids: list[list[int]], references: list[Generated]) -> None:
    # 140 blocks x 16 tokens = 2240 tokens: the longest request (1480 + 64) fits alone, the batch (~3700) does not.
    llm = LLM(dtype="float32", num_kv_blocks=140, max_num_batched_tokens=512, device=TEST_DEVICE)
    outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    print(f"preemptions: {llm.engine.scheduler.num_preemptions}")
    _check("preemption", references, outs)
    llm.engine.kv.pool.check_integrity()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.kv.num_blocks


def test_torch_attention_backend(prompt_ids: list[list[int]], references: list[Generated]) -> None:
    """The plain-torch backend (the reference for the native kernels, and the one CUDA runs) is exact too."""
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", attention_backend="torch", device=TEST_DEVICE)
    assert llm.engine.runner.attention_backend == "torch"
    _check("torch attention backend", references, llm.generate(prompt_ids, GREEDY, use_tqdm=False))
