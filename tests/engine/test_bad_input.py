"""Bar 3: bad input gets a clear, typed error naming the value and the limit."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tierserve import LLM, SamplingParams
from tierserve.errors import (
    ConfigError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelLoadError,
    PromptTooLongError,
)
from tierserve.model_executor.loaders import load_checkpoint


def test_empty_prompt(llm_fp32: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm_fp32.generate([""], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm_fp32.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)


def test_prompt_over_context(llm_fp32: LLM) -> None:
    limit = llm_fp32.engine.max_model_len
    with pytest.raises(PromptTooLongError, match=str(limit)):
        llm_fp32.generate([[1] * (limit + 5)], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(PromptTooLongError, match=f"{limit - 10} in the prompt, 100 in the completion"):
        llm_fp32.generate([[1] * (limit - 10)], SamplingParams(max_tokens=100), use_tqdm=False)
    assert not llm_fp32.engine.has_unfinished_requests()  # nothing was queued


def test_request_larger_than_whole_cache() -> None:
    llm = LLM(dtype="float32", num_kv_blocks=4, block_size=16)
    with pytest.raises(PromptTooLongError, match="64 tokens"):
        llm.generate([[1] * 60], SamplingParams(max_tokens=10), use_tqdm=False)


def test_out_of_vocab_token(llm_fp32: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm_fp32.generate([[1, 10**7]], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**63 - 2, "n": 3}, "seed"),  # choice i draws with seed + i: a 64-bit seed each
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.param == field
    assert field in str(e.value)


def test_unknown_model_path() -> None:
    with pytest.raises(ModelLoadError, match="neither a known name"):
        load_checkpoint("/nonexistent/model.gguf", dtype=__import__("torch").float32)


def test_corrupt_and_truncated_gguf(tmp_path: Path, gguf_path: Path) -> None:
    import torch

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_checkpoint(str(garbage), torch.float32)
    truncated = tmp_path / "truncated.gguf"
    with gguf_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(3_000_000))  # header and part of the tensors
    with pytest.raises(ModelLoadError, match=r"truncated|corrupt|not a readable"):
        load_checkpoint(str(truncated), torch.float32)
    empty_dir = tmp_path / "hf"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_checkpoint(str(empty_dir), torch.float32)
    shutil.rmtree(empty_dir)


def test_failed_add_leaves_nothing_behind(llm_fp32: LLM) -> None:
    """A request refused at add time (here: a stop token id beyond the vocabulary, which once crashed the sampler
    under min_tokens) leaves no state: the next generate runs normally."""
    vocab = llm_fp32.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="stop token id") as e:
        llm_fp32.generate(["hi"], SamplingParams(max_tokens=3, min_tokens=2, stop_token_ids=[vocab]), use_tqdm=False)
    assert e.value.param == "stop_token_ids"
    assert not llm_fp32.engine.has_unfinished_requests()
    out = llm_fp32.generate(["hi"], SamplingParams(max_tokens=3, n=2, seed=7), use_tqdm=False)
    assert [len(c.token_ids) for c in out[0].outputs] == [3, 3]


def test_lone_surrogate_is_invalid_text(llm_fp32: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="not valid Unicode") as e:
        llm_fp32.generate(["a \ud83d b"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert e.value.param == "prompt"


def test_stop_string_before_min_tokens_is_kept(llm_fp32: LLM) -> None:
    """A stop string met before min_tokens is reached neither stops nor cuts the text (vLLM's rule): the output is
    the unconstrained one, whole."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm_fp32.generate(["The capital of France is"], greedy, use_tqdm=False)[0].outputs[0]
    stop = next(ch for ch in base.text.strip() if not ch.isspace())  # a character met in the first tokens
    held = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, min_tokens=24, stop=[stop])
    out = llm_fp32.generate(["The capital of France is"], held, use_tqdm=False)[0].outputs[0]
    assert out.text == base.text and out.finish_reason == "length", (stop, base.text, out.text)
    late = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    cut = llm_fp32.generate(["The capital of France is"], late, use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text  # without min_tokens it stops there


@pytest.mark.parametrize("kwargs, name", [
    ({"max_num_seqs": 0}, "max_num_seqs"),  # nothing could ever be scheduled: the engine spun without end
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"block_size": 0}, "block_size"),  # was a ZeroDivisionError
    ({"max_model_len": -5}, "max_model_len"),
    ({"threads": 0}, "threads"),
])
def test_engine_sizes_must_be_positive(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        LLM(dtype="float32", **kwargs)  # type: ignore[arg-type]


def test_cli_sizes_must_be_positive() -> None:
    import subprocess
    import sys

    for args in (["--max-num-batched-tokens", "0"], ["--block-size", "-3"], ["--max-model-len", "x"]):
        r = subprocess.run([sys.executable, "-m", "tierserve", "generate", "hi", *args], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and args[0] in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("device, words", [("tpu9", "is not a torch device"), ("mps", "runs on cpu or cuda")]
                         + ([("cuda", "sees no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_unusable_device_is_a_config_error(device: str, words: str) -> None:
    """Before the model loads, and a ConfigError (a TierserveError: the CLI prints it), not torch's RuntimeError."""
    with pytest.raises(ConfigError, match=words):
        LLM(dtype="float32", device=device)


def test_context_longer_than_the_models_is_refused(llm_fp32: LLM) -> None:
    """--max-model-len beyond the model's trained positions was silently cut to them (vLLM refuses it)."""
    own = llm_fp32.engine.model_config.max_position_embeddings
    with pytest.raises(ConfigError, match=f"--max-model-len {own + 1} is longer than the model's context of {own}"):
        LLM(dtype="float32", max_model_len=own + 1, kv_cache_memory="64MiB")


def test_chat_template_with_non_text_content_is_a_clear_error(llm_fp32: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="content must be text") as e:
        llm_fp32.chat([{"role": "user", "content": None}], use_tqdm=False)  # type: ignore[dict-item]
    assert e.value.param == "messages"


def test_cli_bad_settings_exit_2_without_a_traceback() -> None:
    """Bench sizes that cannot work are argparse errors (they were a ZeroDivisionError or an empty median after the
    model had loaded); a bad device or sampling flag is one line and exit 2 - chat too (it exited 0, failing each
    turn)."""
    import subprocess
    import sys

    cases = [(["bench", "latency", "--output-len", "1"], "--output-len"),
             (["bench", "throughput", "--runs", "0"], "--runs"),
             (["bench", "throughput", "--input-len", "0"], "--input-len"),
             (["generate", "hi", "--device", "tpu9"], "tpu9"), (["chat", "--top-p", "0"], "top_p")]
    for args, words in cases:
        r = subprocess.run([sys.executable, "-m", "tierserve", *args], capture_output=True, text=True, timeout=120,
                           input="hi\n")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
