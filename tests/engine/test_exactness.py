"""Bar 1 of the core engine: greedy tokens match transformers (float32, same GGUF weights) in four runs."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

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


def _decode_graphs(mode: str, prompt_ids: list[list[int]], references: list[Generated]) -> None:
    """Decode steps on the padded static buffers that CUDA graphs replay (``DecodeGraphs``): the 6 prompts under 500
    tokens with 64, 56, ..., 24 new tokens, 5 running at most, so the steps have 5, 4, 3 (padded to 4: a padded row
    writes only the scratch block), 2 and 1 rows; block tables padded to power-of-two widths."""
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", attention_backend="torch", decode_graphs=mode,
              max_num_seqs=5, device=TEST_DEVICE)
    runner = llm.engine.runner
    graphs = runner.decode_graphs
    assert graphs is not None
    assert runner.kv_caches[0].shape[2] == runner.num_blocks + 1  # the scratch block, beyond the manager's
    before = runner.kv_caches[0][:, :, graphs.scratch_block].clone()
    picked = [i for i, ids in enumerate(prompt_ids) if len(ids) < 500][:6]
    assert len(picked) == 6, [len(ids) for ids in prompt_ids]
    lengths = [NEW_TOKENS - 8 * j for j in range(len(picked))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=5) for m in lengths]
    outs = llm.generate([prompt_ids[i] for i in picked], params, use_tqdm=False)
    refs = [Generated(references[i].token_ids[:m], references[i].top5[:m]) for i, m in zip(picked, lengths)]
    _check(f"decode graphs {mode}", refs, outs)
    assert graphs.steps >= NEW_TOKENS // 2 and graphs.padded_rows > 0, (graphs.steps, graphs.padded_rows)
    if mode == "auto":
        assert len(graphs.graphs) >= 4, sorted(graphs.graphs)
        print(f"CUDA graphs captured (rows, blocks): {sorted(graphs.graphs)}")
    assert not torch.equal(runner.kv_caches[0][:, :, graphs.scratch_block], before), \
        "padded rows were meant to write their K/V into the scratch block"
    llm.engine.kv.pool.check_integrity()


def test_padded_decode_buffers(prompt_ids: list[list[int]], references: list[Generated]) -> None:
    _decode_graphs("padded", prompt_ids, references)


@pytest.mark.skipif(TEST_DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA GPU (TIERSERVE_TEST_DEVICE=cuda there: scripts/device/bar5.sh)")
def test_cuda_graphs(prompt_ids: list[list[int]], references: list[Generated]) -> None:
    _decode_graphs("auto", prompt_ids, references)


@pytest.mark.skipif(TEST_DEVICE != "cuda" or not torch.cuda.is_available()
                    or importlib.util.find_spec("triton") is None,
                    reason="the triton attention backend runs on a CUDA GPU with triton installed (its kernel alone is "
                           "checked on a CPU under Triton's interpreter: tests/kernels/test_triton_attention.py)")
def test_triton_attention_backend(prompt_ids: list[list[int]], references: list[Generated]) -> None:
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", attention_backend="triton", device=TEST_DEVICE)
    _check("triton attention backend", references, llm.generate(prompt_ids, GREEDY, use_tqdm=False))


def test_screened_greedy_head(llm_fp32: LLM, prompt_ids: list[list[int]], references: list[Generated]) -> None:
    """Plain greedy rows (no logprobs: the tests above ask for them, so they see every logit) take their tokens from
    the LM head's int8 screen (``greedy_head_f32``) where the float32 projections run the native AVX2 linear: the
    same tokens as the full head, in one batch and one at a time, and transformers' tokens."""
    model = llm_fp32.engine.runner.model
    if model.screen is None or model.f32 is None:
        pytest.skip("no float32 screen on this path (the native AVX2 linear does not run here, e.g. on a GPU)")
    assert model.screens(len(prompt_ids), len(prompt_ids)) and model.screens(1, 1)
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def run() -> list[list[int]]:
        batch = [list(o.outputs[0].token_ids) for o in llm_fp32.generate(prompt_ids, plain, use_tqdm=False)]
        alone = [list(llm_fp32.generate([ids], plain, use_tqdm=False)[0].outputs[0].token_ids)
                 for ids in prompt_ids[:3]]
        return batch + alone

    screened = run()
    saved, model.screen = model.screen, None  # the full head + argmax
    try:
        full = run()
    finally:
        model.screen = saved
    assert screened == full
    refs = [r.token_ids for r in references] + [r.token_ids for r in references[:3]]
    same = sum(a == b for s, r in zip(screened, refs) for a, b in zip(s, r))
    total = sum(len(s) for s in screened)
    print(f"[screened greedy head] identical to transformers: {same}/{total}")
    assert same / total >= 0.97
