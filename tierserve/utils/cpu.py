"""CPU feature detection and thread setup (never assume AMX: these machines differ)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class CPUInfo:
    model_name: str
    flags: frozenset[str]
    num_cores: int
    ident: dict[str, str] = field(default_factory=dict)
    """``cpu family``, ``model`` and ``stepping`` from /proc/cpuinfo where present (a VM may name every Xeon
    "Intel(R) Xeon(R) Processor")."""

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_tile" in self.flags

    @property
    def has_avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        return self.has_amx or self.has_avx512_bf16


def cpu_info() -> CPUInfo:
    name, flags = "unknown", frozenset[str]()
    ident: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name == "unknown":
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key in ("cpu family", "model", "stepping") and key not in ident:
                    ident[key] = value.strip()
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return CPUInfo(name, flags, cores, ident)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA or a CPU with native bf16 (AMX or AVX-512-BF16), else float32."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda") or cpu_info().native_bf16:
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def set_threads(threads: int | None) -> int:
    n = threads or cpu_info().num_cores
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
