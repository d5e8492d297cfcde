"""GGUF loader: config from metadata, tensors dequantized (gguf-py's numpy reference code) to the compute dtype."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tierserve.config import ModelConfig
from tierserve.errors import ModelLoadError, UnsupportedModelError
from tierserve.tokenizer import TokenizerWrapper, tokenizer_from_gguf

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = {"llama", "qwen2", "mistral"}

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def _hf_name(name: str) -> str | None:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        mapped = _LAYER_MAP.get(rest)
        if mapped is not None:
            return f"model.layers.{idx}.{mapped}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs) back to the HF rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
                             "corrupt — re-download or re-convert it") from e


def _config_from_gguf(reader: Any, path: Path) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    n_head = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    head_dim = int(get(f"{arch}.attention.key_length", 0) or get(f"{arch}.rope.dimension_count", 0)
                   or hidden // n_head)
    tokens = get("tokenizer.ggml.tokens") or []
    rope_scaling: dict[str, object] | None = None
    stype = get(f"{arch}.rope.scaling.type")
    if stype == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get(f"{arch}.rope.scaling.factor", 1.0))}
    elif stype == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(get(f"{arch}.rope.scaling.factor", 1.0)),
                        "original_max_position_embeddings": int(get(f"{arch}.rope.scaling.original_context_length"))}
    names = {t.name for t in reader.tensors}
    eos = get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(get(f"{arch}.vocab_size", 0) or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=n_head,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        rope_scaling=rope_scaling,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        name=str(get("general.name", path.stem)),
    )


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], TokenizerWrapper]:
    from gguf import GGMLQuantizationType, dequantize

    reader = _open(path)
    cfg = _config_from_gguf(reader, path)
    tokenizer = tokenizer_from_gguf(reader)
    if tokenizer.eos_token_ids:
        cfg.eos_token_ids = tokenizer.eos_token_ids
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"Loading {path.name}", unit="tensor", leave=False):
        name = _hf_name(t.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        qtype = GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            arr = dequantize(t.data, qtype) if qtype not in (GGMLQuantizationType.F32,) else np.asarray(t.data)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"{path}: tensor {t.name} has type {qtype.name}, which gguf-py cannot "
                                        "dequantize") from e
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is truncated or corrupt ({e})") from e
        arr = np.asarray(arr)
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError(f"{path}: tensor {t.name} has {arr.size} values, expected shape {shape}")
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        if cfg.architecture in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = _unpermute(w, cfg.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = _unpermute(w, cfg.num_kv_heads)
        tensors[name] = w.to(dtype)
    return cfg, tensors, tokenizer
