"""Source trees against each other on the offline batch, in alternating processes.

For changes outside the native kernels (``scripts/kernel_build_ab.py`` swaps kernel builds inside one process; a
change to the model code needs a process per tree). Each TREE is a checkout of tierserve (e.g. a ``git worktree`` at
an older commit); every round starts one process per tree, in turn (the order alternating between rounds), with
``PYTHONPATH`` set to it and this venv's Python. A process loads the engine, warms up, and times ``--runs`` batches
of ``--num-prompts`` x ``--input-len`` -> ``--output-len`` (greedy). Prints each process's times, then each tree's
median and, for the second tree on, the median of the per-round ratios against the first tree (sum of the round's
runs), and whether every process gave the same tokens.

    git worktree add /tmp/base 2699657
    .venv/bin/python scripts/tree_ab.py /tmp/base . --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import hashlib, json, sys, time
from tierserve import LLM, SamplingParams
from tierserve.bench.peers.offline import prompt_ids
n, inp, out, runs = (int(a) for a in sys.argv[1:5])
llm = LLM(kv_cache_memory="2GiB")
prompts = prompt_ids("smollm2-135m", n, inp, 0)
llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
sp = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
times, digest = [], ""
for _ in range(runs):
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    times.append(time.perf_counter() - t)
    digest = hashlib.sha256(json.dumps([list(o.outputs[0].token_ids) for o in outs]).encode()).hexdigest()[:16]
print("RESULT " + json.dumps({"times": times, "tokens": digest}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="+", metavar="TREE", help="tierserve checkouts; the first is the baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=2, help="timed batches per process")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()
    trees = [str(Path(t).resolve()) for t in args.trees]
    if len(trees) < 2:
        p.error("give at least two trees")
    rounds: list[dict[str, list[float]]] = []
    digests: set[str] = set()
    for r in range(args.rounds):
        this: dict[str, list[float]] = {}
        for tree in trees if r % 2 == 0 else list(reversed(trees)):
            env = dict(os.environ, PYTHONPATH=tree)
            cmd = [sys.executable, "-c", CHILD, str(args.num_prompts), str(args.input_len), str(args.output_len),
                   str(args.runs)]
            proc = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"error: {tree} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            res = json.loads(line[len("RESULT "):])
            this[tree] = res["times"]
            digests.add(res["tokens"])
            print(f"round {r} {tree}: " + ", ".join(f"{t:.2f} s" for t in res["times"]), flush=True)
        rounds.append(this)
    base = trees[0]
    for tree in trees:
        med = statistics.median(t for rd in rounds for t in rd[tree])
        line = f"{tree}: median {med:.2f} s"
        if tree != base:
            ratios = sorted(sum(rd[tree]) / sum(rd[base]) for rd in rounds)
            line += f", / {Path(base).name}: median of rounds {statistics.median(ratios):.3f} " \
                    f"({ratios[0]:.3f}-{ratios[-1]:.3f})"
        print(line)
    same = len(digests) == 1
    print(f"same tokens in every process: {same} ({hashlib.sha256(''.join(sorted(digests)).encode()).hexdigest()[:8]})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
