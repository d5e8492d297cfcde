"""Offline batch through tierserve's ``LLM.generate`` (runs in the project's environment)."""

from __future__ import annotations

import time

from offline_io import WARMUP_PROMPTS, WARMUP_TOKENS, read_spec, timed_runs, write_result

from tierserve import LLM, SamplingParams, __version__


def main() -> None:
    spec, out_path = read_spec()
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], threads=spec["threads"], kv_cache_memory=f"{spec['kv_cache_gib']}GiB")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate(spec["prompts"][:WARMUP_PROMPTS], warm, use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)

    def run_once() -> list[int]:
        outs = llm.generate(spec["prompts"], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    runs, total = timed_runs(spec, run_once)
    write_result(out_path, spec, engine="tierserve", version=__version__, dtype=str(llm.engine.dtype),
                 load_s=load_s, warmup_s=warmup_s, runs_s=runs, output_tokens=total)


if __name__ == "__main__":
    main()
