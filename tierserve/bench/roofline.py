"""Roofline of a model on this machine: measured GEMM peak and memory bandwidth, FLOPs and bytes per step.

A step costs at least max(FLOPs / peak, bytes / bandwidth). FLOPs count every linear layer for every token computed
(the LM head only at sampled positions) plus attention (QK^T and PV: 4 · heads · head_dim · context per query token
per layer). Bytes count the weights read once per step plus the KV cache read by attention. See docs/roofline.md.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from tierserve.config import ModelConfig
from tierserve.utils.hugepages import host_buffer


@dataclass
class MachinePeaks:
    gemm_tflops_bf16: float | None
    """None where it was not measured: a CPU without native bf16 (no AMX, no AVX-512-BF16) runs a bf16 GEMM in
    emulation at under 1 GFLOP/s (a 2048^3 GEMM took ~25 s on a Zen 3), and the engine computes in float32 there."""
    gemm_tflops_fp32: float
    mem_read_gbps: float
    threads: int

    def gemm_tflops(self, dtype: torch.dtype) -> float:
        if dtype == torch.float32:
            return self.gemm_tflops_fp32
        if self.gemm_tflops_bf16 is None:
            raise ValueError("the bf16 GEMM peak was not measured (no native bf16 on this CPU)")
        return self.gemm_tflops_bf16

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: object, reps: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls; on CUDA each call is timed to the end of its kernels."""
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


GPU_GEMM_N = 8192
"""The GEMM size of the peak on a GPU: a 2048^3 product is over in microseconds there, far from the tensor cores'
rate (an H200 ran 8192^3 bf16 at ~790 TFLOP/s)."""


def measure_gemm(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str | torch.device = "cpu") -> float:
    """TFLOP/s of an n³ GEMM in ``dtype`` on ``device``, median of ``reps`` after one warm-up (on a GPU n is at least
    ``GPU_GEMM_N``)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        n = max(n, GPU_GEMM_N)
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    a @ b
    return 2 * n**3 / _median_time(lambda: a @ b, reps, dev) / 1e12


def measure_peaks(n: int = 2048, reps: int = 5, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> MachinePeaks:
    """GEMM n³ in bf16 and fp32 and a streaming read of 1 GiB (4 GiB on a GPU), medians of ``reps`` (after one
    warm-up), on ``device``. On a CPU the bf16 GEMM only where it has native bf16 or ``dtype`` (the engine's compute
    dtype) is bf16."""
    from tierserve.utils.cpu import cpu_info

    dev = torch.device(device)
    native = dev.type != "cpu" or cpu_info().native_bf16
    bf16 = measure_gemm(torch.bfloat16, n, reps, dev) if native or dtype == torch.bfloat16 else None
    return MachinePeaks(bf16, measure_gemm(torch.float32, n, reps, dev), measure_bandwidth(reps, dev),
                        torch.get_num_threads())


def measure_bandwidth(reps: int = 5, device: str | torch.device = "cpu") -> float:
    """Streaming read of 1 GiB (far beyond the caches), GB/s, median of ``reps`` after one warm-up. On a shared
    machine the bandwidth left to this process moves with the neighbours' traffic (31-61 GB/s seen on one EPYC), so
    benchmarks measure it again around their timed runs. The buffer is on transparent huge pages where the OS offers
    them, like the engine's weights and KV cache (``tierserve.utils.hugepages``): the same memory conditions, and the
    higher of the two (4 KiB pages read 5-25% slower on the EPYC), so the roofline is not flattered. On a GPU: 4 GiB
    of device memory (far beyond its L2), read by a sum."""
    dev = torch.device(device)
    if dev.type == "cpu":
        x = host_buffer(2**30).view(torch.float32)
        x.fill_(1.0)
    else:
        x = torch.ones(2**30, dtype=torch.float32, device=dev)
    x.sum()
    return x.numel() * 4 / _median_time(x.sum, reps, dev) / 1e9


def device_name(device: str | torch.device) -> str:
    """What the benchmark ran on, for its report: the GPU's name, or the CPU's model name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from tierserve.utils.cpu import cpu_info

    return cpu_info().model_name


def with_gemm_of(peaks: MachinePeaks, reads: list[float], dtype: torch.dtype = torch.bfloat16) -> MachinePeaks:
    """``peaks`` with the median of ``reads`` (``dtype`` GEMM TFLOP/s, taken at start and after each timed run) as
    its GEMM peak in that dtype. On a shared machine the tile or vector units left to this process move with the
    neighbours (one 2-core Xeon read 0.80 and 2.15 TFLOP/s two minutes apart), so one reading at start can make the
    roofline of a whole benchmark too tight or too loose."""
    if dtype == torch.float32:
        return replace(peaks, gemm_tflops_fp32=statistics.median(reads))
    return replace(peaks, gemm_tflops_bf16=statistics.median(reads))


def with_bandwidth_of(peaks: MachinePeaks, reads: list[float]) -> MachinePeaks:
    """``peaks`` with the median of ``reads`` (GB/s, taken at start and after each timed run) as its bandwidth: the
    bandwidth this process had during the runs, not at one moment."""
    return replace(peaks, mem_read_gbps=statistics.median(reads))


@dataclass
class ModelCost:
    """Per-token costs of one model in one dtype."""

    linear_params: int
    """Parameters of the linear layers run for every token (all layers' projections)."""
    head_params: int
    weight_bytes: int
    """All weights read by one step (layers + norms + LM head)."""
    kv_bytes_per_token: int
    """KV cache bytes of one token over all layers."""
    attn_flops_per_ctx: int
    """Attention FLOPs of one query token per token of context, over all layers."""

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype) -> ModelCost:
        h, d = cfg.hidden_size, cfg.head_dim
        qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        per_layer = qkv + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size
        linear = per_layer * cfg.num_layers
        head = cfg.vocab_size * h
        esize = torch.empty((), dtype=dtype).element_size()
        weights = (linear + head + (2 * cfg.num_layers + 1) * h) * esize
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * d * esize
        return cls(linear, head, weights, kv, 4 * cfg.num_layers * cfg.num_heads * d)

    def step_seconds(self, peaks: MachinePeaks, dtype: torch.dtype, num_tokens: int, num_sampled: int,
                     attn_ctx_tokens: int, kv_read_tokens: int) -> float:
        """Lower bound of one step: ``num_tokens`` computed, ``num_sampled`` logits rows, ``attn_ctx_tokens`` =
        sum over query tokens of their context length, ``kv_read_tokens`` = cached tokens read."""
        flops = 2 * self.linear_params * num_tokens + 2 * self.head_params * num_sampled
        flops += self.attn_flops_per_ctx * attn_ctx_tokens
        nbytes = self.weight_bytes + self.kv_bytes_per_token * kv_read_tokens
        return max(flops / (peaks.gemm_tflops(dtype) * 1e12), nbytes / (peaks.mem_read_gbps * 1e9))


def offline_roofline_seconds(cost: ModelCost, peaks: MachinePeaks, dtype: torch.dtype, num_prompts: int,
                             prompt_len: int, output_len: int, max_num_seqs: int, token_budget: int) -> float:
    """Ideal schedule of the offline batch: prefill every prompt in chunks of ``token_budget`` tokens, then decode
    all sequences together (``max_num_seqs`` at a time), each step at its roofline."""
    total = 0.0
    waves = [min(max_num_seqs, num_prompts - i) for i in range(0, num_prompts, max_num_seqs)]
    for batch in waves:
        prefill_tokens = batch * prompt_len
        ctx = batch * prompt_len * (prompt_len + 1) // 2  # causal: query i sees i + 1 tokens
        chunks = max(1, -(-prefill_tokens // token_budget))
        for c in range(chunks):
            n = min(token_budget, prefill_tokens - c * token_budget)
            last = c == chunks - 1
            total += cost.step_seconds(peaks, dtype, n, batch if last else 0, ctx * n // prefill_tokens,
                                       prompt_len * batch // chunks)
        for step in range(output_len - 1):  # the first token comes from the prefill's logits
            length = prompt_len + step + 1
            total += cost.step_seconds(peaks, dtype, batch, batch, batch * length, batch * length)
    return total


def decode_bandwidth_roofline_s(cost: ModelCost, peaks: MachinePeaks) -> float:
    """One stream's decode step at the bandwidth roofline: every weight byte read once per token."""
    return cost.weight_bytes / (peaks.mem_read_gbps * 1e9)
