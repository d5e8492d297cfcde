"""Decode attention (the native ``paged_decode``) alone: is it memory-bound or compute-bound on this machine?

Times 30 layers of decode attention for ``--batch`` sequences of ``--min-len``..``--max-len`` tokens (bf16, the
default model's heads: 9 query heads, 3 kv heads, head_dim 64), with the K/V cache on huge pages like the engine's:

- ``dram contiguous``: each sequence's blocks consecutive (a prefilled prompt), the 30 layers' K/V far beyond the
  caches;
- ``dram scattered``: blocks in random order (what decode appends look like);
- ``hot``: the same number of (sequence, layer) items, but 8 sequences of one layer over and over, so K/V stay in L2:
  the kernel's compute alone.

Each is printed as ms per 30 layers and as GB/s of K/V read, beside this machine's streaming-read bandwidth (the
roofline's). If ``dram`` is close to ``hot``, the kernel is compute-bound; if ``hot`` is far below ``dram`` and
``dram`` is near the streaming read, memory-bound.

``--compare DIGEST`` also loads another build of the kernels from ``~/.cache/tierserve/kernels/DIGEST`` (e.g. the
build of an older source tree; ``tierserve.kernels.build_dir()`` names a tree's) and times both in this process,
interleaved over ``--rounds``, after checking that their outputs are bit-identical (or within ``--max-diff``).

``--prefill LEN`` times prefill attention instead (``paged_prefill``): ``--batch`` prompts of LEN tokens each, in
one call per layer (30 layers), as a prefill step of the offline benchmark runs them (64 x 256 there), in ms and
as attention TFLOP/s (the causal half of QK^T and p.V).

    .venv/bin/python scripts/decode_attention_bench.py
    .venv/bin/python scripts/decode_attention_bench.py --compare 2e34dbf4750d69e3 --rounds 7
    .venv/bin/python scripts/decode_attention_bench.py --prefill 256 --compare 2e34dbf4750d69e3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType


def _best_of(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="sequences decoding at once")
    p.add_argument("--min-len", type=int, default=250, help="shortest context (tokens)")
    p.add_argument("--max-len", type=int, default=400, help="longest context (tokens)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are printed)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the engine's --block-size)")
    p.add_argument("--compare", metavar="DIGEST", help="another kernel build to time against this tree's")
    p.add_argument("--max-diff", type=float, default=0.0,
                   help="with --compare: the largest elementwise difference accepted between the two builds' outputs "
                        "(default 0: bit-identical; a kernel that sums in another order needs e.g. 1e-5 in float32)")
    p.add_argument("--prefill", type=int, metavar="LEN", help="time prefill attention of --batch prompts of LEN tokens")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="K/V, query and compute dtype (float32: what an AVX2-only CPU computes in)")
    args = p.parse_args()
    if args.prefill:
        args.min_len = args.max_len = args.prefill

    import torch

    from tierserve.bench.roofline import measure_bandwidth
    from tierserve.kernels import build_dir, cpu_ops, load_build
    from tierserve.kernels.attention_order import torch_decode_order
    from tierserve.utils.hugepages import host_buffer

    ops = cpu_ops()
    dt = getattr(torch, args.dtype)
    if ops is None or (dt == torch.bfloat16 and not ops.has_avx512_bf16):
        print("error: needs the native kernels (and for bfloat16 a CPU with AVX-512-BF16)", file=sys.stderr)
        return 1
    builds = {"this tree": ops}
    if args.compare:
        builds = {"other": load_build(args.compare), "this tree": ops}
    found = torch_decode_order(ops, 64)
    order = ops.decode_order() if found is None else found
    for mod in builds.values():
        mod.set_decode_order(order)

    torch.manual_seed(0)
    layers, bs, hkv, heads, d, b = 30, args.block_size, 3, 9, 64, args.batch
    max_blocks = (args.max_len + bs - 1) // bs
    nb = 2 * b * max_blocks
    per = 2 * hkv * nb * bs * d
    esz = torch.empty((), dtype=dt).element_size()
    buf = host_buffer(layers * per * esz, populate=True).view(dt)
    buf.copy_(torch.randn(layers * per).to(dt))
    caches = list(buf.view(layers, 2, hkv, nb, bs, d).unbind(0))
    seq_lens = torch.randint(args.min_len, args.max_len + 1, (b,))
    q = torch.randn(b, heads, d).to(dt)
    contiguous = torch.arange(b * max_blocks).view(b, max_blocks).contiguous()
    scattered = torch.randperm(nb)[: b * max_blocks].view(b, max_blocks).contiguous()
    kv_bytes = int(seq_lens.sum()) * hkv * 2 * d * esz * layers
    hot_b = min(8, b)
    hot_reps = max(1, layers * b // hot_b)
    hot_bytes = int(seq_lens[:hot_b].sum()) * hkv * 2 * d * esz * hot_reps

    # --prefill: every prompt whole in one chunk, its K/V already in the cache (the fused RoPE op writes them first)
    qp = torch.randn(b * args.max_len, heads, d).to(dt)
    q_start = torch.arange(0, b * args.max_len + 1, args.max_len)
    flops = b * heads * d * 2 * 2 * (args.max_len * (args.max_len + 1) // 2) * layers

    def cases(mod: ModuleType) -> dict[str, Callable[[], object]]:
        if args.prefill:
            return {"prefill": lambda: [mod.paged_prefill(qp, c, contiguous, q_start, seq_lens, 0.125, 32, None)
                                        for c in caches]}
        return {
            "dram contiguous": lambda: [mod.paged_decode(q, c, contiguous, seq_lens, 0.125) for c in caches],
            "dram scattered": lambda: [mod.paged_decode(q, c, scattered, seq_lens, 0.125) for c in caches],
            "hot (compute)": lambda: [mod.paged_decode(q[:hot_b], caches[0], scattered[:hot_b], seq_lens[:hot_b], 0.125)
                                      for _ in range(hot_reps)],
        }

    if len(builds) == 2:
        a, n = builds.values()
        worst = 0.0
        for table in (contiguous, scattered):
            for c in caches[:3]:
                if args.prefill:
                    oa = a.paged_prefill(qp, c, table, q_start, seq_lens, 0.125, 32, None)
                    on = n.paged_prefill(qp, c, table, q_start, seq_lens, 0.125, 32, None)
                else:
                    oa = a.paged_decode(q, c, table, seq_lens, 0.125)
                    on = n.paged_decode(q, c, table, seq_lens, 0.125)
                if not torch.equal(oa, on):
                    diff = float((oa.float() - on.float()).abs().max())
                    if diff > args.max_diff:
                        print(f"error: the two builds' outputs differ by up to {diff:.3g} (> --max-diff "
                              f"{args.max_diff:g})", file=sys.stderr)
                        return 1
                    worst = max(worst, diff)
        print(f"outputs of {args.compare} and {build_dir().name} (this tree): "
              + ("bit-identical" if worst == 0 else f"within {worst:.3g} of each other (a different summation order)"))

    stream = measure_bandwidth(3)
    print(f"{b} sequences of {args.min_len}-{args.max_len} tokens, 30 layers, K/V {kv_bytes / 1e6:.0f} MB; "
          f"streaming read {stream:.1f} GB/s; decode order {order}")
    times: dict[str, dict[str, list[float]]] = {name: {case: [] for case in cases(ops)} for name in builds}
    for r in range(args.rounds):
        names = list(builds) if r % 2 == 0 else list(reversed(builds))
        for case in cases(ops):
            for name in names:
                times[name][case].append(_best_of(cases(builds[name])[case]))
    for name in builds:
        parts = []
        for case, ts in times[name].items():
            nbytes = hot_bytes if case.startswith("hot") else kv_bytes
            med = statistics.median(ts)
            rate = f"{flops / med / 1e12:.3f} TFLOP/s" if args.prefill else f"{nbytes / med / 1e9:.1f} GB/s"
            parts.append(f"{case} {med * 1e3:.1f} ms ({rate})")
        print(f"{name}: " + ", ".join(parts))
    if len(builds) == 2:
        other, mine = (times[k] for k in builds)
        for case in mine:
            ratios = sorted(m / o for o, m in zip(other[case], mine[case]))
            print(f"  {case}: this tree / other, median of rounds {statistics.median(ratios):.3f} "
                  f"({ratios[0]:.3f}-{ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
