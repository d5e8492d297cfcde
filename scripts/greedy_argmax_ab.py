"""The greedy fast path against the float32 path it replaced, in one process: decode-step time at a few batch sizes.

``new``: a batch of plain greedy rows takes ``argmax_rows`` on the model's bf16 logits (what the engine does).
``old``: the float32 copy of the logits and torch's ``max(dim=-1)`` (what it did before). Both ways run the same
prompts, interleaved over ``--rounds``; the tokens must be equal. Prints the median decode-step time of each way and
the median of the per-round ratios (new / old).

    .venv/bin/python scripts/greedy_argmax_ab.py --batch 64,16,1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="64,16,1", help="sequences decoding at once (comma-separated)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens of each sequence")
    p.add_argument("--output-len", type=int, default=48, help="new tokens per sequence (decode steps per round)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    from tierserve import LLM, SamplingParams
    from tierserve.model_executor import model_runner, sampler

    llm = LLM(kv_cache_memory="2GiB")
    steps: list[float] = []
    execute = model_runner.ModelRunner.execute

    def timed(self: Any, sched: Any) -> Any:
        t = time.perf_counter()
        out = execute(self, sched)
        if all(s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 for s in sched.scheduled):
            steps.append(time.perf_counter() - t)
        return out

    model_runner.ModelRunner.execute = timed  # type: ignore[method-assign]
    new_argmax, new_plain = sampler._argmax, sampler.plain_greedy

    def use(way: str) -> None:
        old = way == "old"
        sampler._argmax = (lambda x: x.max(dim=-1).indices) if old else new_argmax  # type: ignore[assignment]
        sampler.plain_greedy = (lambda reqs: False) if old else new_plain  # type: ignore[assignment]

    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for b in (int(x) for x in args.batch.split(",")):
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            prompts = [[100 + (i * 7 + j * 3 + r) % 5000 for j in range(args.prompt_len)] for i in range(b)]
            tokens = []
            for way in ("old", "new") if r % 2 == 0 else ("new", "old"):
                use(way)
                steps.clear()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                times[way].append(statistics.median(steps))
                tokens.append([o.outputs[0].token_ids for o in outs])
            if tokens[0] != tokens[1]:
                print(f"batch {b}: the two ways gave different tokens", file=sys.stderr)
                return 1
        ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
        print(f"batch {b} x {args.prompt_len} tokens: decode step old {statistics.median(times['old']) * 1e3:.2f} ms, "
              f"new {statistics.median(times['new']) * 1e3:.2f} ms; new / old {ratio:.3f} (median of {args.rounds} "
              f"rounds), same tokens", flush=True)
    use("new")
    return 0


if __name__ == "__main__":
    sys.exit(main())
