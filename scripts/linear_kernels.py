"""Time the linear kernels side by side on the default model's projection shapes (a diagnostic, not a benchmark
of the engine): torch's F.linear, oneDNN with a prepacked weight, linear_vnni (AVX-512-BF16) and, where the CPU has
AMX, linear_amx - the median of --reps calls each, in one process, with the threads the engine would use. On a CPU
without native bf16 (the engine computes in float32 there), or with --float32: torch's F.linear (MKL) against
linear_f32 (AVX2), with the ratio; then a plain greedy step's LM head, linear_f32 + argmax_rows against its int8
screen (greedy_head_f32; the same tokens, checked).

    .venv/bin/python scripts/linear_kernels.py [--rows 1,16,64,512] [--reps 50] [--float32]

``--streamed``: instead, one decode step's projections as the engine runs them (30 layers of qkv, o, gate/up with the
SwiGLU epilogue, down, then the LM head; every weight its own copy in one huge-page arena, so each call reads its
weights from memory), timed per row count with ``linear_vnni``'s 16-row tiles and work chunks on (the default) and
off (``set_linear_wide_rows(0)``, ``set_linear_chunk(1)``), interleaved over --rounds; prints GB/s of weights and the
on/off ratio beside this machine's streaming read.

    .venv/bin/python scripts/linear_kernels.py --streamed --rows 1,12,16,24 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.utils.cpu import cpu_info

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,512", help="comma-separated row counts (default: 1,16,64,512)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per kernel and shape (default: 50)")
    ap.add_argument("--float32", action="store_true", help="float32 kernels (default without native bf16)")
    ap.add_argument("--streamed", action="store_true",
                    help="a decode step's projections with weights from memory, 16-row tiles/chunks on vs off")
    ap.add_argument("--rounds", type=int, default=6, help="--streamed: interleaved on/off rounds (default: 6)")
    args = ap.parse_args()
    ops = cpu_ops()
    if args.streamed:
        if ops is None or not getattr(ops, "has_avx512_bf16", False):
            raise SystemExit("--streamed needs the native kernels built for a CPU with AVX-512-BF16")
        streamed(ops, args)
        return
    if ops is not None and (args.float32 or not getattr(ops, "has_avx512_bf16", False)):
        float32(ops, args)
        return
    if ops is None or not getattr(ops, "has_avx512_bf16", False):
        raise SystemExit("needs the native kernels built for a CPU with AVX-512-BF16")
    info = cpu_info()
    amx = bool(ops.amx_available())
    print(f"{info.model_name}, {torch.get_num_threads()} threads, AMX tiles: {amx}; median us per call")
    kernels = ["F.linear", "oneDNN packed", "linear_vnni"] + (["linear_amx"] if amx else [])
    print(f"{'shape':>16} {'rows':>5} " + " ".join(f"{k:>14}" for k in kernels))
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        wp = ops.pack_vnni(w)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen).bfloat16()
            fns: list[Callable[[], object]] = [
                partial(F.linear, x, w),
                partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""),
                partial(ops.linear_vnni, x, wp, None, 0, 0, 0),
            ]
            if amx:
                fns.append(partial(ops.linear_amx, x, wp, None, 0))
            cells = " ".join(f"{median_us(fn, args.reps):>14.0f}" for fn in fns)
            print(f"{name + f' {n}x{k}':>16} {rows:>5} {cells}", flush=True)


def streamed(ops: Any, args: argparse.Namespace) -> None:
    from tierserve.bench.roofline import measure_bandwidth
    from tierserve.model_executor.models.llama import interleave_gate_up
    from tierserve.utils.hugepages import move_to_arena

    gen = torch.Generator().manual_seed(0)
    layer = [("qkv", False), ("o_proj", False), ("gate_up", True), ("down", False)]
    calls: list[tuple[torch.Tensor, int, bool]] = []
    for _ in range(30):
        for name, swiglu in layer:
            n, k = SHAPES[name]
            wp = ops.pack_vnni((torch.randn(n, k, generator=gen) * 0.05).bfloat16())
            calls.append((interleave_gate_up(wp) if swiglu else wp, k, swiglu))
    calls.append((ops.pack_vnni((torch.randn(*SHAPES["head"], generator=gen) * 0.05).bfloat16()), 576, False))
    arena = move_to_arena([w for w, _, _ in calls])  # (each weight now reads from its copy there)
    nbytes = arena.numel() * arena.element_size()
    wide, chunk = ops.linear_wide_rows(), ops.linear_chunk()
    print(f"{cpu_info().model_name}, {torch.get_num_threads()} threads; one step's projections, "
          f"{nbytes / 1e6:.0f} MB of weights from memory; best of 5 steps per round, median of {args.rounds} rounds")
    print(f"{'rows':>5} {'on ms':>8} {'off ms':>8} {'on GB/s':>8} {'on/off':>7}")
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in (576, 1536)}

            def step(xs: dict[int, torch.Tensor] = xs) -> None:
                for w, k, sw in calls:
                    ops.linear_vnni(xs[k], w, None, 0, 0, 0, sw)

            times: dict[bool, list[float]] = {True: [], False: []}
            ratios = []
            for r in range(args.rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    ops.set_linear_wide_rows(wide if on else 0)
                    ops.set_linear_chunk(chunk if on else 1)
                    step()
                    best = min(_timed(step) for _ in range(5))
                    times[on].append(best)
                ratios.append(times[True][-1] / times[False][-1])
            on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
            print(f"{rows:>5} {on_s * 1e3:>8.2f} {off_s * 1e3:>8.2f} {nbytes / on_s / 1e9:>8.1f} "
                  f"{statistics.median(ratios):>7.3f}", flush=True)
    finally:
        ops.set_linear_wide_rows(wide)
        ops.set_linear_chunk(chunk)
    print(f"streaming read: {measure_bandwidth(3):.1f} GB/s")


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def float32(ops: object, args: argparse.Namespace) -> None:
    if not getattr(ops, "has_avx2_fma", False):
        raise SystemExit("linear_f32 needs the native kernels built for a CPU with AVX2 and FMA")
    print(f"{cpu_info().model_name}, {torch.get_num_threads()} threads, float32; median us per call")
    print(f"{'shape':>16} {'rows':>5} {'F.linear':>10} {'linear_f32':>10} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        wp = ops.pack_f32(w)  # type: ignore[attr-defined]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen)
            reps = max(3, args.reps // 10) if name == "head" and rows > 64 else args.reps
            ref = median_us(partial(F.linear, x, w), reps)
            ours = median_us(partial(ops.linear_f32, x, wp), reps)  # type: ignore[attr-defined]
            print(f"{name + f' {n}x{k}':>16} {rows:>5} {ref:>10.0f} {ours:>10.0f} {ours / ref:>6.2f}", flush=True)
    # a plain greedy step's head: linear_f32 + argmax_rows against the int8 screen (greedy_head_f32), same tokens
    from tierserve.model_executor.models.llama import screen_weights

    n, k = SHAPES["head"]
    w = torch.randn(n, k, generator=gen) * 0.04
    wp, screen = ops.pack_f32(w), screen_weights(w)  # type: ignore[attr-defined]
    print(f"{'greedy head':>16} {'rows':>5} {'full':>10} {'screened':>10} {'ratio':>6}")
    for rows in (int(r) for r in args.rows.split(",")):
        # hidden states near one head row each, as a trained model's are (a flat row would keep more candidates)
        picks = torch.randint(0, n, (rows,), generator=gen)
        x = w[picks] * 25 + torch.randn(rows, k, generator=gen)
        full = partial(lambda x: ops.argmax_rows(ops.linear_f32(x, wp)), x)  # type: ignore[attr-defined]
        screened = partial(ops.greedy_head_f32, x, wp, *screen)  # type: ignore[attr-defined]
        if not torch.equal(full(), screened()):
            raise SystemExit("greedy_head_f32 gave other tokens than linear_f32 + argmax_rows")
        reps = max(3, args.reps // 10) if rows > 64 else args.reps
        a, b = median_us(full, reps), median_us(screened, reps)
        print(f"{f'{n}x{k}':>16} {rows:>5} {a:>10.0f} {b:>10.0f} {b / a:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
