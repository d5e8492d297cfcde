"""What measuring oneDNN's K splits costs on a CPU with AMX, for prompts of many lengths (ShareGPT's).

On the AMX path a prompt length the process has not met yet costs a probe per projection shape
(``tierserve.kernels.linear_order.AmxKChunks``) on the step that prefills it. This runs one batch of ShareGPT prompts
through ``LLM.generate`` three ways in one process, interleaved ``--rounds`` times, each with a fresh probe table:

* ``fixed``: candidates in the fixed order, nothing on disk (what every process did before);
* ``nearest``: the nearest measured row count's split tried first, nothing on disk (a first start);
* ``cached``: as ``nearest`` but with a cache file the previous ``nearest`` round filled (a restart);

and prints, per way, the probes run, the candidates checked, seconds spent probing and the batch's seconds.

    .venv/bin/python scripts/amx_probe_cost.py --num-prompts 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=100, help="ShareGPT prompts in the batch")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per prompt (greedy, EOS ignored)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three ways")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from tierserve import LLM, SamplingParams
    from tierserve.bench.workloads import WorkloadConfig, build_workload
    from tierserve.kernels.linear_order import AmxKChunks

    llm = LLM(kv_cache_memory="2GiB")
    model = llm.engine.runner.model
    ops = model.fused_ops
    if model.amx_chunks is None or ops is None:
        print("this CPU does not run the AMX path (no AMX tiles, or not bf16): nothing to measure", file=sys.stderr)
        return 1
    wl = build_workload(WorkloadConfig(name="sharegpt", tokenizer="SmolLM2-135M-Instruct",
                                       output_len=args.output_len), args.num_prompts, args.seed)
    prompts = [t.text for s in wl.sessions for t in s.turns]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    lengths = {len(o.prompt_token_ids) for o in llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)}
    print(f"{len(prompts)} ShareGPT prompts, {len(lengths)} distinct lengths ({min(lengths)}-{max(lengths)} tokens), "
          f"{args.output_len} tokens out; {args.rounds} interleaved rounds")
    results: dict[str, list[tuple[int, int, float, float]]] = {"fixed": [], "nearest": [], "cached": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "chunks.json"
            for way in ("fixed", "nearest", "cached"):
                chunks = AmxKChunks(ops, None if way == "fixed" else cache, nearest_first=way != "fixed")
                model.amx_chunks = chunks
                t = time.perf_counter()
                llm.generate(prompts, sp, use_tqdm=False)
                results[way].append((chunks.probe_count, chunks.candidates_tried, chunks.probe_seconds,
                                     time.perf_counter() - t))
    print("| way | probes | candidates checked | probing s (median) | batch s (median) |")
    print("|---|---|---|---|---|")
    for way, rows in results.items():
        print(f"| {way} | {rows[0][0]} | {rows[0][1]} | {statistics.median(r[2] for r in rows):.3f} "
              f"| {statistics.median(r[3] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
