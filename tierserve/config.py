"""Configuration dataclasses, built once from CLI flags / LLM(...) keyword arguments and logged at start."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from tierserve.errors import ConfigError, InvalidRequestError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(value: str | int | float) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, 1e9 -> 1000000000 (bytes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidRequestError(f"memory size must be positive, got {value!r}", param="kv_cache_memory")
        return int(value)
    m = _SIZE_RE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise InvalidRequestError(
            f"cannot parse memory size {value!r}; use e.g. 2GiB, 512MiB, 1GB or a number of bytes",
            param="kv_cache_memory",
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidRequestError(f"memory size must be positive, got {value!r}", param="kv_cache_memory")
    return size


@dataclass
class ModelConfig:
    """Architecture of a Llama-family model (filled by the loaders from GGUF metadata or config.json)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, object] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    num_blocks: int | None = None
    """Overrides kv_cache_memory when set (tests use it to force preemption)."""


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step: the sum of new tokens over all scheduled requests."""
    max_num_seqs: int = 128
    policy: str = "fcfs"
    """Name of the scheduling policy (see core/policies.py)."""


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_model_len: int | None = None
    attention_backend: str = "auto"
    decode_graphs: str = "auto"
    """Decode-only steps on padded static buffers, captured as CUDA graphs: auto = on CUDA; off = always eager
    (``--enforce-eager``); padded = the padded buffers without graphs, on any device (tests, debugging)."""
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the setting for sizes that cannot work (a zero step budget scheduled
        nothing, ever: the engine spun without end; a zero block size divided by zero) and for a device this torch
        cannot use - before the model loads."""
        for name, value in (("max_num_seqs", self.scheduler.max_num_seqs),
                            ("max_num_batched_tokens", self.scheduler.max_num_batched_tokens),
                            ("block_size", self.cache.block_size), ("max_model_len", self.max_model_len),
                            ("threads", self.threads), ("num_kv_blocks", self.cache.num_blocks)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {self.device!r} is not a torch device ({e}); use cpu or cuda") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device {self.device!r}: tierserve runs on cpu or cuda")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r}: this torch ({torch.__version__}) sees no CUDA GPU")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(f"device {self.device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
