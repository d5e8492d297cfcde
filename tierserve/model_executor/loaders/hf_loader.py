"""Hugging Face folder loader: config.json, *.safetensors (sharded too), tokenizer.json, tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from tierserve.config import ModelConfig
from tierserve.errors import ModelLoadError, UnsupportedModelError
from tierserve.tokenizer import TokenizerWrapper, tokenizer_from_hf_dir

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def config_from_hf(raw: dict[str, Any], path: Path) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        arch = raw.get("model_type") if raw.get("model_type") in SUPPORTED.values() else None
    if arch is None:
        raise UnsupportedModelError(f"{path}: architecture {archs or raw.get('model_type')!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED)})")
    n_head = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    rope_scaling = raw.get("rope_scaling") or None
    rope_theta = raw.get("rope_theta")
    params = raw.get("rope_parameters")  # transformers >= 5 folds theta and scaling into one dict
    if isinstance(params, dict):
        rope_theta = params.get("rope_theta", rope_theta)
        if params.get("rope_type", "default") != "default":
            rope_scaling = dict(params)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=n_head,
        num_kv_heads=int(raw.get("num_key_value_heads") or n_head),
        head_dim=int(raw.get("head_dim") or hidden // n_head),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta or 10000.0),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        rope_scaling=rope_scaling,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
        name=path.name,
    )


def load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], TokenizerWrapper]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path} has no config.json (expected a Hugging Face model folder or a .gguf file)")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()), path)
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{cfg_file} is not a valid model config ({type(e).__name__}: {e})") from e
    gen = path / "generation_config.json"
    if gen.exists():
        for eid in _ids(json.loads(gen.read_text()).get("eos_token_id")):
            if eid not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(eid)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (.bin pickles are not loaded, by design)")
    tensors: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc=f"Loading {path.name}", unit="shard", leave=False):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f} is corrupt or truncated ({e})") from e
        for k, v in part.items():
            tensors[k] = v.to(dtype)
    tok = tokenizer_from_hf_dir(path, cfg.eos_token_ids)
    cfg.eos_token_ids = tok.eos_token_ids
    return cfg, tensors, tok
