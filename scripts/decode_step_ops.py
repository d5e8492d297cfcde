"""Where a decode step's time goes, op by op (a diagnostic, not a benchmark).

Runs ``--sequences`` greedy requests of ``--input-len`` -> ``--output-len`` tokens through the engine with the
per-op loop instead of the fused ``decode_layers`` (the same kernels, one Python call per op: slightly slower in
total) and times every native call of the decode-only steps: each projection shape (with its weight bytes and the
rate they stream at), attention, the norms, RoPE + cache write, the LM head, and what is left outside the ops (the
runner's Python, the scheduler is not in it). Prints milliseconds per step.

    .venv/bin/python scripts/decode_step_ops.py --sequences 16 --input-len 200
    .venv/bin/python scripts/decode_step_ops.py --sequences 1 --input-len 32
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=16, help="requests decoding together (default 16)")
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=2, help="timed runs of the batch (default 2)")
    args = p.parse_args()

    from tierserve import LLM, SamplingParams
    from tierserve.bench.peers.offline import prompt_ids

    llm = LLM(kv_cache_memory="1GiB", max_num_seqs=max(1, args.sequences))
    runner = llm.engine.runner
    model = runner.model
    real = model.fused_ops
    if real is None or not hasattr(runner.attn, "ops"):
        print("error: the engine does not run the native CPU kernels here", file=sys.stderr)
        return 1
    model.fused_decode = False
    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    weight_bytes: dict[str, int] = {}
    timing = [False]

    class Timed:
        """The kernels module, each call timed (while a decode step runs) under a name."""

        def __getattr__(self, name: str) -> Any:
            f = getattr(real, name)
            if not callable(f):
                return f

            def call(*a: Any, **k: Any) -> Any:
                if not timing[0]:
                    return f(*a, **k)
                t = time.perf_counter()
                out = f(*a, **k)
                dt = time.perf_counter() - t
                key = name
                if name == "linear_vnni":
                    n, kp = a[1].shape[0] * 16, a[1].shape[1] * 2
                    swiglu = k.get("swiglu", a[6] if len(a) > 6 else False)
                    key = f"linear {n} x {kp}" + (" (+SwiGLU)" if swiglu else "")
                    weight_bytes[key] = a[1].numel() * a[1].element_size()
                total[key] += dt
                calls[key] += 1
                return out

            return call

    timed_ops = Timed()
    model.fused_ops = timed_ops  # type: ignore[assignment]
    runner.attn.ops = timed_ops
    steps: list[float] = []
    execute = runner.execute

    def timed_execute(sched: Any) -> Any:
        decode = all(s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 for s in sched.scheduled)
        timing[0] = decode
        t = time.perf_counter()
        out = execute(sched)
        if decode:
            steps.append(time.perf_counter() - t)
        timing[0] = False
        return out

    runner.execute = timed_execute  # type: ignore[method-assign]
    prompts = prompt_ids("smollm2-135m", args.sequences, args.input_len, 0)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    total.clear()
    calls.clear()
    steps.clear()
    for _ in range(args.runs):
        llm.generate(prompts, sp, use_tqdm=False)
    n = len(steps)
    if n == 0:
        print("error: no decode-only steps ran", file=sys.stderr)
        return 1
    print(f"{n} decode steps of {args.sequences} sequences: median {statistics.median(steps) * 1e3:.2f} ms, "
          f"mean {sum(steps) / n * 1e3:.2f} ms (op loop; decode_layers runs the same kernels in one call)")
    in_ops = 0.0
    for key, t in sorted(total.items(), key=lambda kv: -kv[1]):
        in_ops += t
        rate = f", weights {weight_bytes[key] / (t / calls[key]) / 1e9:5.1f} GB/s" if key in weight_bytes else ""
        print(f"  {key:34s} {t / n * 1e3:7.3f} ms/step ({calls[key] / n:4.0f} calls){rate}")
    print(f"  {'outside the ops':34s} {(sum(steps) - in_ops) / n * 1e3:7.3f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
