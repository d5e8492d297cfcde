"""Offline batch through Hugging Face transformers ``generate`` in fixed batches (``batch_size``), greedy,
every prompt the same length (so no padding), exactly ``max_tokens`` new tokens (EOS ignored)."""

from __future__ import annotations

import time

from offline_io import WARMUP_PROMPTS, WARMUP_TOKENS, read_spec, timed_runs, write_result


def main() -> None:
    spec, out_path = read_spec()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        lens = []
        for i in range(0, len(prompts), spec["batch_size"]):
            ids = torch.tensor(prompts[i:i + spec["batch_size"]])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            lens += [out.shape[1] - ids.shape[1]] * ids.shape[0]
        return lens

    t0 = time.perf_counter()
    generate(spec["prompts"][:WARMUP_PROMPTS], WARMUP_TOKENS)
    warmup_s = time.perf_counter() - t0
    runs, total = timed_runs(spec, lambda: generate(spec["prompts"], spec["max_tokens"]))
    write_result(out_path, spec, engine="transformers", version=transformers.__version__, dtype=spec["dtype"],
                 load_s=load_s, warmup_s=warmup_s, runs_s=runs, output_tokens=total,
                 batch_size=spec["batch_size"])


if __name__ == "__main__":
    main()
