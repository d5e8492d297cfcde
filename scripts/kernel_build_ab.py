"""This tree's native kernels against another build of them, in one engine process: the offline batch, builds swapped
per run.

The engine loads this tree's build as usual; ``OTHER`` (a folder name under ``~/.cache/tierserve/kernels/``, e.g. the
build of an older source tree - ``tierserve.kernels.build_dir()`` names a tree's) is loaded beside it, and each run
of ``--num-prompts`` x ``--input-len`` -> ``--output-len`` (greedy) goes through one or the other, alternating which
goes first in each of ``--rounds``. Prints the batch time, the median decode-step time (steps whose every sequence
decodes one token) and the prefill/mixed steps' total per run, the median of the per-round ratios (this tree /
other), and whether the two builds gave the same tokens.

    .venv/bin/python scripts/kernel_build_ab.py 2e34dbf4750d69e3 --rounds 4
    .venv/bin/python scripts/kernel_build_ab.py 2e34dbf4750d69e3 --rounds 4 --per-step
    .venv/bin/python scripts/kernel_build_ab.py fused_decode=0 --per-step  # decode_layers vs the op loop

With ``OTHER`` as ``NAME=VALUE`` both sides run this tree's build and differ in the model's attribute ``NAME``
(``--set NAME=VALUE`` sets "this tree"'s side).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import ModuleType
from typing import Any


def _parse(value: str, like: Any) -> Any:
    """VALUE as the type of the attribute's current value (bools: 1/0, true/false)."""
    if isinstance(like, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(like)(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", metavar="OTHER", help="folder name of the other build under ~/.cache/tierserve/kernels/")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-step", action="store_true",
                   help="swap the builds every engine step instead of every run (adjacent steps are compared, so a "
                        "machine whose speed drifts over seconds cancels out); prints medians of adjacent-step ratios")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a model attribute before the runs (this tree's side of a NAME=VALUE comparison)")
    args = p.parse_args()

    from tierserve import LLM, SamplingParams
    from tierserve.bench.peers.offline import prompt_ids
    from tierserve.kernels import build_dir, load_build

    llm = LLM(kv_cache_memory="2GiB")
    runner = llm.engine.runner
    model = runner.model
    mine = model.fused_ops
    for item in args.set:
        name, value = item.split("=", 1)
        setattr(model, name, _parse(value, getattr(model, name)))
    if mine is None or not hasattr(runner.attn, "ops"):
        print("error: the engine does not run the native CPU kernels here", file=sys.stderr)
        return 1
    # OTHER as NAME=VALUE: this tree's build both ways, the model's attribute NAME (e.g. fused_decode) at its own
    # value ("this tree") against VALUE ("other")
    knob = args.other.split("=", 1) if "=" in args.other else None
    # with a knob, "other" is a stand-in module that `use` maps back to this build with the knob's VALUE
    other = ModuleType("other") if knob else load_build(args.other)
    builds: dict[str, ModuleType] = {"this tree": mine, "other": other}
    settings: dict[int, Any] = {}
    if knob:
        settings = {id(mine): getattr(model, knob[0]), id(other): _parse(knob[1], getattr(model, knob[0]))}
    for mod in builds.values():
        if hasattr(mod, "set_decode_order"):
            mod.set_decode_order(mine.decode_order())

    attn: Any = runner.attn

    def use(mod: ModuleType) -> None:
        if knob:
            setattr(model, knob[0], settings[id(mod)])
            mod = mine
        model.fused_ops = mod
        attn.ops = mod

    steps: list[tuple[bool, float]] = []
    execute = runner.execute

    alternate: list[str] = []  # --per-step: the build order of this run's steps (step i takes alternate[i % 2])
    which: list[str] = []

    def timed(sched: Any) -> Any:
        if alternate:
            which.append(alternate[len(steps) % 2])
            use(builds[which[-1]])
        t = time.perf_counter()
        out = execute(sched)
        decode = all(s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 for s in sched.scheduled)
        steps.append((decode, time.perf_counter() - t))
        return out

    runner.execute = timed  # type: ignore[method-assign]
    prompts = prompt_ids("smollm2-135m", args.num_prompts, args.input_len, 0)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for mod in builds.values():  # warm-up (and the other build's first AMX/threads use)
        use(mod)
        llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print(f"this tree: {build_dir().name}, other: {args.other}")
    if args.per_step:
        return per_step(args.rounds, builds, alternate, which, steps, lambda: llm.generate(prompts, sp, use_tqdm=False),
                        use, mine)
    res: dict[str, list[tuple[float, float, float]]] = {name: [] for name in builds}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name in list(builds) if r % 2 == 0 else list(reversed(builds)):
            use(builds[name])
            steps.clear()
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            total = time.perf_counter() - t
            tokens.setdefault(name, [list(o.outputs[0].token_ids) for o in outs])
            decode = [d for is_decode, d in steps if is_decode]
            prefill = sum(d for is_decode, d in steps if not is_decode)
            res[name].append((total, statistics.median(decode), prefill))
            step_ms = statistics.median(decode) * 1e3
            print(f"round {r} {name}: batch {total:.2f} s, decode step median {step_ms:.1f} ms, "
                  f"prefill/mixed steps {prefill:.2f} s", flush=True)
    use(mine)
    print(f"same tokens: {tokens['this tree'] == tokens['other']}")
    for i, what in enumerate(("batch", "decode step", "prefill/mixed")):
        ratios = sorted(m[i] / o[i] for m, o in zip(res["this tree"], res["other"]))
        print(f"{what}: this tree / other, median of rounds {statistics.median(ratios):.3f} "
              f"({ratios[0]:.3f}-{ratios[-1]:.3f})")
    return 0 if tokens["this tree"] == tokens["other"] else 1


def per_step(rounds: int, builds: dict[str, ModuleType], alternate: list[str], which: list[str],
             steps: list[tuple[bool, float]], generate: Any, use: Any, mine: ModuleType) -> int:
    """Runs whose steps alternate between the builds (which goes first alternates per round). A decode step is
    compared with the decode step just before it (the other build's; both see nearly the same batch); the prefill and
    mixed steps of a run are summed per build, and the rounds swap which build gets which of them."""
    use(mine)
    ref = [list(o.outputs[0].token_ids) for o in generate()]  # this tree alone: the tokens to match
    decode_ratios: list[float] = []
    prefill: dict[str, float] = {name: 0.0 for name in builds}
    same = True
    for r in range(rounds):
        alternate[:] = list(builds) if r % 2 == 0 else list(reversed(builds))
        which.clear()
        steps.clear()
        outs = generate()
        same = same and [list(o.outputs[0].token_ids) for o in outs] == ref
        for i in range(1, len(steps)):
            (d0, t0), (d1, t1) = steps[i - 1], steps[i]
            if d0 and d1:
                mine_t, other_t = (t1, t0) if which[i] == "this tree" else (t0, t1)
                decode_ratios.append(mine_t / other_t)
        for (is_decode, t), name in zip(steps, which):
            if not is_decode:
                prefill[name] += t
        print(f"round {r}: {len(steps)} steps, decode ratio median so far {statistics.median(decode_ratios):.3f}",
              flush=True)
    alternate.clear()
    use(mine)
    print(f"same tokens: {same}")
    q = statistics.quantiles(decode_ratios, n=4)
    print(f"decode step: this tree / other, median of {len(decode_ratios)} adjacent pairs "
          f"{statistics.median(decode_ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    print(f"prefill/mixed steps: this tree {prefill['this tree']:.2f} s, other {prefill['other']:.2f} s, "
          f"ratio {prefill['this tree'] / prefill['other']:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
