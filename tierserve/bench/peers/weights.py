"""The safetensors copy of tierserve's GGUF that vLLM and the transformers baseline load (same weights).

The GGUF (Q4_1 for the default model) is dequantized once with transformers and cast to bfloat16, into
``<peers>/models/<model>-bf16``; bfloat16 is what vLLM's CPU backend computes in, and what tierserve computes
in on a CPU with native bf16. The conversion runs in the project's environment (transformers and gguf are test
dependencies), never installing anything there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tierserve.bench.peers.base import SCRIPTS, PeerSettings, run_logged


def model_dir(settings: PeerSettings) -> Path:
    name = Path(settings.model).stem if settings.model.endswith(".gguf") else Path(settings.model).name
    return settings.root / "models" / f"{name}-bf16"


def is_converted(settings: PeerSettings) -> bool:
    return (model_dir(settings) / "config.json").exists()


def ensure_converted(settings: PeerSettings, log_path: Path) -> Path:
    """Convert the GGUF behind ``settings.model`` unless already done; returns the folder."""
    out = model_dir(settings)
    if is_converted(settings):
        return out
    from tierserve.bench.peers.llamacpp import gguf_path

    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged([sys.executable, str(SCRIPTS / "convert_gguf.py"), str(gguf_path(settings.model)), str(out),
                "bfloat16"], log_path, "converting the GGUF to safetensors (transformers)")
    return out
