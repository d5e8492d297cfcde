"""Bar 2: tiny randomly initialised Llama / Qwen2 (q/k/v bias) / Llama-3-rope checkpoints saved by transformers as
safetensors load in tierserve and match transformers' greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.reference import compare, hf_greedy, ours_generated
from tierserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "Paged attention keeps the KV cache in blocks",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36"]


def _save_tiny(kind: str, out: Path, hf_tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, initializer_range=0.3, rms_norm_eps=1e-5,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)  # make sure the bias path matters
    elif kind == "llama3-rope":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    model = model.float().eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2MB")  # sharded on purpose
    hf_tokenizer.save_pretrained(out)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3-rope"])
def test_tiny_checkpoint_matches_transformers(kind: str, tmp_path: Path, hf_tokenizer: Any) -> None:
    model = _save_tiny(kind, tmp_path, hf_tokenizer)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="16MiB")
    ids = [hf_tokenizer(p).input_ids for p in PROMPTS]
    assert [llm.tokenizer.encode(p) for p in PROMPTS] == ids
    refs = [hf_greedy(model, i, 24) for i in ids]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    c = compare(refs, [ours_generated(o.outputs[0]) for o in outs], PROMPTS)
    assert not c.failures, c.failures
    assert c.fraction_identical >= 0.9, c
