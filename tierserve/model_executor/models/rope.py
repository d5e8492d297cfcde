"""Rotary position embeddings (HF rotate-half layout) with the scaling variants Llama checkpoints use."""

from __future__ import annotations

import math

import torch

from tierserve.config import ModelConfig
from tierserve.errors import UnsupportedModelError


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, object]) -> torch.Tensor:
    factor = float(scaling["factor"])  # type: ignore[arg-type]
    low = float(scaling.get("low_freq_factor", 1.0))  # type: ignore[arg-type]
    high = float(scaling.get("high_freq_factor", 4.0))  # type: ignore[arg-type]
    old_len = float(scaling.get("original_max_position_embeddings", 8192))  # type: ignore[arg-type]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos/sin tables, each [max_positions, head_dim]."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    rtype = str(scaling.get("rope_type", scaling.get("type", "default")))
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    if rtype == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rtype == "linear":
        positions = positions / float(scaling["factor"])  # type: ignore[arg-type]
    elif rtype != "default":
        raise UnsupportedModelError(f"rope scaling {rtype!r} is not supported (default, linear and llama3 are)")
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D] already gathered at the tokens' positions and cast to x's dtype."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]
