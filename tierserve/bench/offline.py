"""`tierserve bench throughput` (offline batch) and `tierserve bench latency` (one stream), in process.

Both measure this machine's GEMM peak and memory bandwidth first (same process), then report medians of
``--runs`` timed runs with the achieved fraction of the roofline (bench/roofline.py, docs/roofline.md) and the model
FLOP utilisation (MFU: useful FLOPs per second / measured bf16 GEMM peak).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tierserve.bench.roofline import (
    MachinePeaks,
    ModelCost,
    decode_bandwidth_roofline_s,
    device_name,
    measure_bandwidth,
    measure_gemm,
    measure_peaks,
    offline_roofline_seconds,
    with_bandwidth_of,
    with_gemm_of,
)


def _llm(args: argparse.Namespace) -> Any:
    from tierserve.cli import engine_kwargs
    from tierserve.engine.llm import LLM

    return LLM(**engine_kwargs(args))


def _prompts(args: argparse.Namespace, n: int, length: int) -> list[list[int]]:
    from tierserve.bench.peers.offline import prompt_ids

    return prompt_ids(args.model, n, length, args.seed)


def _header(llm: Any, peaks: MachinePeaks) -> dict[str, Any]:
    from tierserve.utils.cpu import cpu_info

    info = cpu_info()
    device = llm.engine.device
    graphs = llm.engine.runner.decode_graphs
    return {"cpu": info.model_name, "amx": info.has_amx, "avx512_bf16": info.has_avx512_bf16,
            "device": str(device), "device_name": device_name(device), "threads": llm.engine.num_threads,
            "dtype": str(llm.engine.dtype).replace("torch.", ""),
            "cuda_graphs": bool(graphs is not None and graphs.capture),
            "model": llm.engine.model_config.name, "peaks": peaks.to_json()}


def _machine_text(result: dict[str, Any]) -> str:
    """The report's first words: the CPU and its threads, or the GPU (with the host CPU beside it)."""
    if result["device"] == "cpu":
        return f"CPU: {result['cpu']} ({result['threads']} threads, {result['dtype']})"
    graphs = "decode steps as CUDA graphs" if result["cuda_graphs"] else "every step eager"
    return f"GPU: {result['device_name']} ({result['device']}, {result['dtype']}, {graphs}; host CPU {result['cpu']})"


def _reads_text(reads: list[float], unit: str = "GB/s", digits: int = 1) -> str:
    """A figure read at start and after each run: the median, how many reads and their range."""
    return (f"{statistics.median(reads):.{digits}f} {unit} (median of {len(reads)} reads: at start and after each "
            f"run; {min(reads):.{digits}f}-{max(reads):.{digits}f})")


def _other_peak(peaks: MachinePeaks, dtype: torch.dtype) -> str:
    """The GEMM peak of the dtype the engine does not compute in, as read at start (none: bf16 not measured)."""
    if dtype == torch.float32:
        bf16 = peaks.gemm_tflops_bf16
        return f" / {bf16:.3f} bf16 (at start)" if bf16 is not None else " (bf16: no native bf16 on this CPU)"
    return f" / {peaks.gemm_tflops_fp32:.3f} float32 (at start)"


def _json_writable(args: argparse.Namespace) -> bool:
    """Make --json's folder before the run (minutes of benchmark used to end in a traceback when it was missing);
    False, with a one-line error, when the file cannot be written there."""
    if not args.json:
        return True
    path = Path(args.json)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:
        print(f"error: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def cmd_throughput(args: argparse.Namespace) -> int:
    if not _json_writable(args):
        return 2
    llm = _llm(args)
    eng = llm.engine
    dtype = eng.dtype
    device = eng.device
    peaks = measure_peaks(dtype=dtype, device=device)
    cost = ModelCost.of(eng.model_config, dtype)
    prompts = _prompts(args, args.num_prompts, args.input_len)
    from tierserve import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    runs = []
    bandwidths = [peaks.mem_read_gbps]
    gemms = [peaks.gemm_tflops(dtype)]  # the GEMM peak of the engine's compute dtype
    for i in range(args.runs):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=not args.json)
        runs.append(time.perf_counter() - t)
        bandwidths.append(measure_bandwidth(3, device))
        gemms.append(measure_gemm(dtype, reps=3, device=device))
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        if n_out != args.num_prompts * args.output_len:
            print(f"error: run {i} produced {n_out} tokens, expected {args.num_prompts * args.output_len}",
                  file=sys.stderr)
            return 1
    med = statistics.median(runs)
    peaks = with_gemm_of(with_bandwidth_of(peaks, bandwidths), gemms, dtype)
    n_out, n_in = args.num_prompts * args.output_len, args.num_prompts * args.input_len
    roof = offline_roofline_seconds(cost, peaks, dtype, args.num_prompts, args.input_len, args.output_len,
                                    eng.config.scheduler.max_num_seqs, eng.config.scheduler.max_num_batched_tokens)
    useful_flops = 2 * cost.linear_params * (n_in + n_out) + 2 * cost.head_params * n_out
    result = {**_header(llm, peaks), "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                                  "output_len": args.output_len},
              "runs_s": runs, "mem_read_gbps_reads": bandwidths, "gemm_tflops_reads": gemms, "median_s": med,
              "output_throughput": n_out / med,
              "total_token_throughput": (n_in + n_out) / med, "roofline_s": roof,
              "roofline_output_throughput": n_out / roof, "roofline_fraction": roof / med,
              "mfu": useful_flops / med / (peaks.gemm_tflops(dtype) * 1e12)}
    _emit(args, result, [
        f"{_machine_text(result)}; measured GEMM peak "
        f"{_reads_text(gemms, 'TFLOP/s ' + result['dtype'], 3)}{_other_peak(peaks, dtype)}, read bandwidth "
        f"{_reads_text(bandwidths)}",
        f"{args.num_prompts} prompts x {args.input_len} tokens, {args.output_len} new: median {med:.2f} s over "
        f"{args.runs} runs ({', '.join(f'{r:.2f}' for r in runs)})",
        f"output {n_out / med:.1f} tok/s, total {(n_in + n_out) / med:.1f} tok/s",
        f"roofline {roof:.2f} s = {n_out / roof:.1f} output tok/s -> achieved {roof / med:.1%} of roofline, "
        f"MFU {result['mfu']:.1%}",
    ])
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    if not _json_writable(args):
        return 2
    llm = _llm(args)
    eng = llm.engine
    peaks = measure_peaks(dtype=eng.dtype, device=eng.device)
    cost = ModelCost.of(eng.model_config, eng.dtype)
    prompt = _prompts(args, 1, args.input_len)[0]
    from tierserve import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ttfts, tpots, e2es = [], [], []
    bandwidths = [peaks.mem_read_gbps]
    for i in range(args.runs):
        rid = f"latency-{i}"
        t0 = time.perf_counter()
        eng.add_request(rid, prompt, sp)
        first = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if first is None and o.outputs and o.outputs[0].token_ids:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        ttfts.append(first - t0)
        tpots.append((end - first) / (args.output_len - 1))
        e2es.append(end - t0)
        bandwidths.append(measure_bandwidth(3, eng.device))
    tpot = statistics.median(tpots)
    peaks = with_bandwidth_of(peaks, bandwidths)
    roof = decode_bandwidth_roofline_s(cost, peaks)
    result = {**_header(llm, peaks), "workload": {"input_len": args.input_len, "output_len": args.output_len},
              "ttft_s": statistics.median(ttfts), "tpot_s": tpot, "e2e_s": statistics.median(e2es),
              "decode_tok_s": 1 / tpot, "weight_bytes": cost.weight_bytes, "bandwidth_roofline_tpot_s": roof,
              "bandwidth_roofline_fraction": roof / tpot,
              "runs": {"ttft_s": ttfts, "tpot_s": tpots, "mem_read_gbps": bandwidths}}
    _emit(args, result, [
        f"{_machine_text(result)}; read bandwidth "
        f"{_reads_text(bandwidths)}",
        f"one stream, {args.input_len}-token prompt, {args.output_len} new, median of {args.runs}: "
        f"TTFT {result['ttft_s'] * 1e3:.1f} ms, TPOT {tpot * 1e3:.2f} ms ({1 / tpot:.1f} tok/s)",
        f"bandwidth roofline: {cost.weight_bytes / 1e6:.0f} MB of weights per token -> {roof * 1e3:.2f} ms; "
        f"achieved {roof / tpot:.1%}",
    ])
    return 0


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    for line in lines:
        print(line)


def register(sub: Any) -> None:
    """Register `bench throughput` and `bench latency` under the `bench` subparsers."""
    from tierserve.cli import add_engine_args, int_at_least, positive_int

    for name, fn, desc, defaults in (
        ("throughput", cmd_throughput,
         "Offline throughput: NUM_PROMPTS prompts of INPUT_LEN tokens (cut from real text), OUTPUT_LEN new tokens "
         "each (greedy, EOS ignored) through LLM.generate; median of RUNS timed runs, with the roofline fraction "
         "and MFU against this machine's measured peaks.", (64, 256, 128)),
        ("latency", cmd_latency,
         "One stream: a prompt of INPUT_LEN tokens and OUTPUT_LEN new tokens; median TTFT and TPOT of RUNS runs, "
         "and TPOT against the bandwidth roofline (weight bytes per token / measured read bandwidth).", (1, 32, 128)),
    ):
        p = sub.add_parser(name, help=desc.split(":")[0], description=desc,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "throughput":
            p.add_argument("--num-prompts", type=positive_int, default=defaults[0], help="prompts in the batch")
        p.add_argument("--input-len", type=positive_int, default=defaults[1], help="prompt length in tokens")
        if name == "latency":  # (TPOT is the time between tokens: it needs two)
            p.add_argument("--output-len", type=int_at_least(2), default=defaults[2],
                           help="new tokens (at least 2: TPOT is the time from the first to the last over the rest)")
        else:
            p.add_argument("--output-len", type=positive_int, default=defaults[2], help="new tokens per prompt")
        p.add_argument("--runs", type=positive_int, default=3, help="timed runs (the median is reported)")
        p.add_argument("--seed", type=int, default=0, help="seed of the prompt selection")
        p.add_argument("--json", default=None, help="write the result as JSON to this file")
        add_engine_args(p)
        p.set_defaults(func=fn)
