"""``decode_layers`` (every decoder layer of a bf16 decode step in one native call) against the per-op loop
it replaces: identical tokens and identical log-probabilities, on the real model."""

from __future__ import annotations

import pytest
import torch

from tierserve import LLM, SamplingParams
from tierserve.kernels import cpu_ops

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None or not getattr(ops, "has_avx512_bf16", False),
                                reason="linear_vnni (and decode_layers) needs the AVX-512-BF16 kernels")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Memory is the bottleneck of serving because"]


def run(llm: LLM, fused: bool, prompts: list[str]) -> list[tuple[list[int], list[float]]]:
    model = llm.engine.runner.model
    model.fused_decode = fused
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)]) for o in outs]


def test_one_call_equals_the_op_loop() -> None:
    llm = LLM(dtype="bfloat16", kv_cache_memory="64MiB", attention_backend="cpu")
    model = llm.engine.runner.model
    assert model.vnni is not None
    # without an oneDNN path the unpacked projection weights are released (only the packed copies are read)
    assert model.vnni_max_rows is not None or all(la.qkv.numel() == 0 and la.down.numel() == 0 for la in model.layers)
    # SiLU-and-multiply is the gate/up projection's epilogue in both paths wherever every step runs the native linear
    assert model.swiglu == (model.vnni_max_rows is None)
    for prompts in (PROMPTS[:1], PROMPTS, PROMPTS * 4):  # one sequence, and batches of 3 and 12 rows
        assert run(llm, True, prompts) == run(llm, False, prompts)


def test_bad_arguments_raise() -> None:
    assert ops is not None
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 1, 4, 16, 64, dtype=torch.bfloat16)
    cos = torch.ones(1, 64, dtype=torch.bfloat16)
    args = (cos, cos, torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
            torch.ones(1, dtype=torch.long), 0.125, 1e-5, 1, 1)
    with pytest.raises(RuntimeError, match="6 weights per layer"):
        ops.decode_layers(x, [x] * 5, [], [], [cache], *args)
    with pytest.raises(RuntimeError, match="one qkv bias per layer"):
        ops.decode_layers(x, [x] * 6, [x, x], [], [cache], *args)
