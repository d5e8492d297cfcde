"""Sampling features end to end on the real model: seeds, stops, penalties, logprobs, n, detokenization."""

from __future__ import annotations

import math

from tierserve import LLM, SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"


def _text(llm: LLM, prompts: list[str], sp: SamplingParams) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]


def test_seed_reproducible_whatever_the_batch(llm_fp32: LLM) -> None:
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    alone = _text(llm_fp32, [PROMPT], sp)[0]
    others = ["The history of Rome", "List three colours:", "def fibonacci(n):"]
    in_batch = llm_fp32.generate(others + [PROMPT],
                                 [SamplingParams(temperature=1.0, max_tokens=30)] * 3 + [sp], use_tqdm=False)
    assert in_batch[3].outputs[0].text == alone
    other_seed = _text(llm_fp32, [PROMPT], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=99))[0]
    assert other_seed != alone


def test_greedy_equals_top_k_1_and_tiny_min_p(llm_fp32: LLM) -> None:
    greedy = _text(llm_fp32, [PROMPT], SamplingParams(temperature=0, max_tokens=20))[0]
    assert _text(llm_fp32, [PROMPT], SamplingParams(temperature=0.8, top_k=1, max_tokens=20, seed=3))[0] == greedy
    assert _text(llm_fp32, [PROMPT], SamplingParams(temperature=0.8, min_p=1.0, max_tokens=20, seed=3))[0] == greedy


def test_stop_string_and_stop_token(llm_fp32: LLM) -> None:
    full = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    stop = words[3]
    cut = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                      include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + len(stop)]
    tid = full.token_ids[5]
    by_id = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tid]),
                              use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(tid) + 1] and by_id.stop_reason == tid


def test_max_tokens_and_eos(llm_fp32: LLM) -> None:
    out = llm_fp32.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                        use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm_fp32.engine.eos_token_ids
    assert "<|im_end|>" not in out.text
    forced = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == 7 and forced.finish_reason == "length"


def test_penalties_reduce_repetition(llm_fp32: LLM) -> None:
    prompt = "Repeat after me: cat cat cat cat cat cat cat cat"
    base = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    for kwargs in ({"repetition_penalty": 1.8}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.5}):
        pen = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, **kwargs),
                                use_tqdm=False)[0].outputs[0]
        assert len(set(pen.token_ids)) > len(set(base.token_ids)), kwargs


def test_logprobs_are_consistent(llm_fp32: LLM) -> None:
    out = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 8
    total = 0.0
    for tid, pos in zip(out.token_ids, out.logprobs):
        first_id, first = next(iter(pos.items()))
        assert first_id == tid and first.rank == 1  # greedy: the sampled token is the most likely
        assert all(lp.logprob <= 0 for lp in pos.values()) and 1 <= len(pos) <= 4
        total += first.logprob
    assert out.cumulative_logprob is not None and math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_n_completions_differ_and_are_indexed(llm_fp32: LLM) -> None:
    out = llm_fp32.generate([PROMPT], SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5),
                            use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({c.text for c in out.outputs}) > 1


def test_incremental_detokenization_matches_full_decode(llm_fp32: LLM) -> None:
    """Multi-byte UTF-8 (emoji, CJK, accents) streamed token by token equals decoding all at once."""
    eng = llm_fp32.engine
    text = "Emoji 😀🎉, 中文字符, café naïve — ok"
    ids = eng.tokenizer.encode(text)
    from tierserve.engine.detokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer(eng.tokenizer, [], False, True)
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.flush(False))
    pieces.append(d.flush(True))
    assert "".join(pieces) == eng.tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    stream = []
    eng.add_request("stream-1", PROMPT, SamplingParams(temperature=0, max_tokens=30))
    while eng.has_unfinished_requests():
        for o in eng.step():
            stream.append(o.outputs[0].text)
    whole = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    assert "".join(stream) == whole[0].outputs[0].text


def test_abort_frees_blocks(llm_fp32: LLM) -> None:
    eng = llm_fp32.engine
    free_before = eng.kv.pool.num_free_blocks
    eng.add_request("to-abort", PROMPT * 20, SamplingParams(max_tokens=100))
    eng.step()
    assert eng.kv.pool.num_free_blocks < free_before
    assert eng.abort("to-abort")
    assert eng.kv.pool.num_free_blocks == free_before and not eng.has_unfinished_requests()
    assert not eng.abort("to-abort")


def test_greedy_argmax_keeps_argmax_semantics() -> None:
    """The greedy path's faster row argmax (via ``max``) picks what ``argmax`` picks: the first of equal maxima, and
    the first NaN where a row has one, over vocab-sized rows."""
    import torch

    from tierserve.model_executor.sampler import _argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(65, 49152, generator=g)
    x[:, 1000] = 9.0
    x[:, 30000] = 9.0  # a tie: the first wins
    x[3, 77] = float("nan")
    x[3, 5] = float("nan")  # NaNs: the first NaN wins
    x[7] = -float("inf")  # a fully masked row
    x[8, 49151] = 50.0  # the last column
    got = _argmax(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[:3].tolist() == [1000] * 3 and got[3].item() == 5 and got[8].item() == 49151
    # the model's bf16 logits as they are (the plain greedy path): the same indices as on their float32 copy
    xb = x.bfloat16()
    assert torch.equal(_argmax(xb), xb.float().argmax(dim=-1))
