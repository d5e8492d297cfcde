"""Shared fixtures: the default model loaded once per session (float32, for exactness)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reference import TEST_DEVICE

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from tierserve.model_executor.loaders import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def llm_fp32() -> Iterator[object]:
    from tierserve import LLM

    llm = LLM(dtype="float32", kv_cache_memory="512MiB", device=TEST_DEVICE)
    yield llm


@pytest.fixture(scope="session")
def hf_model(gguf_path: Path) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.to(TEST_DEVICE)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
