"""Where benchmark text comes from: the shared data folder, the model's tokenizer, files read with line numbers,
and exact-length prompts cut from real text.

Data files are read from ``$TIERSERVE_DATA_DIR`` or ``<repo>/../shared/data`` (see that folder's README).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.errors import TierserveError
from tierserve.tokenizer import TokenizerWrapper

# Random prompts differ in their first PREFIX_GUARD_TOKENS tokens, so no two share a KV block by accident.
PREFIX_GUARD_TOKENS = 16


class WorkloadFileError(TierserveError, ValueError):
    """A workload, dataset or trace file that is missing or malformed; the message names the file and line."""


# Where this project's machines keep the shared data when the checkout is not beside it (e.g. a CI clone elsewhere).
_WORKPLACE_DATA = Path("/work/shared/data")


def data_dir() -> Path:
    """``$TIERSERVE_DATA_DIR``, else ``shared/data`` beside the repository root, else the workplace's copy."""
    env = os.environ.get("TIERSERVE_DATA_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not beside.is_dir() and _WORKPLACE_DATA.is_dir():
        return _WORKPLACE_DATA
    return beside


def data_file(path: str | Path | None, default: str) -> Path:
    """``path`` if given, else ``data_dir() / default``; a clear error if it does not exist."""
    p = Path(path) if path is not None else data_dir() / default
    if not p.is_file():
        hint = "" if path is not None else " (set TIERSERVE_DATA_DIR to the shared data folder or pass --dataset-path)"
        raise WorkloadFileError(f"{p}: no such file{hint}")
    return p


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> TokenizerWrapper:
    """A model name (``smollm2-135m``), a ``.gguf`` file, or a folder holding ``tokenizer.json``."""
    import gguf

    from tierserve.model_executor.loaders import resolve_model_path
    from tierserve.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir

    path = resolve_model_path(name)
    if path.is_dir():
        return tokenizer_from_hf_dir(path, [])
    return tokenizer_from_gguf(gguf.GGUFReader(path))


def count_tokens(tok: TokenizerWrapper, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, element)`` for each element of a top-level JSON list; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    seen = [0, 1]  # position counted up to, line number there (elements come in order: count incrementally)

    def line_of(pos: int) -> int:
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise WorkloadFileError(f"{path}:{line_of(pos)}: expected a JSON list of records")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise WorkloadFileError(f"{path}:{line_of(pos)}: JSON list is not closed with ']'")
        if text[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise WorkloadFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line_of(pos), obj
        pos = end


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, object)`` for each non-empty line of a JSON-lines file."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadFileError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise WorkloadFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


class TextCutter:
    """Cuts prompts of exact token lengths out of real text (the Paul Graham essays), at random offsets.

    Every cut starts somewhere new: no two cuts share their first ``PREFIX_GUARD_TOKENS`` tokens, so prompts never
    share a prefix by accident (a shared prefix is the ``prefix`` workload's job).
    """

    def __init__(self, tok: TokenizerWrapper, rng: np.random.Generator) -> None:
        self.tok = tok
        self.rng = rng
        self.ids = _essay_ids(tok)
        self._starts: set[tuple[int, ...]] = set()

    def cut(self, num_tokens: int) -> tuple[str, int]:
        """Text of ``num_tokens`` consecutive tokens, and its token count when re-encoded (± a boundary token)."""
        if not 1 <= num_tokens <= len(self.ids) - 1:
            raise ValueError(f"prompt length {num_tokens} tokens is outside 1..{len(self.ids) - 1}, "
                             "the size of the text corpus")
        for _ in range(1000):
            start = int(self.rng.integers(0, len(self.ids) - num_tokens))
            key = tuple(self.ids[start:start + min(num_tokens, PREFIX_GUARD_TOKENS)])
            if key in self._starts:
                continue
            self._starts.add(key)
            text = self.tok.decode(self.ids[start:start + num_tokens])
            return text, count_tokens(self.tok, text)
        raise ValueError(f"could not find a fresh {num_tokens}-token window; the corpus is exhausted")


def _essay_ids(tok: TokenizerWrapper) -> list[int]:
    return _essay_ids_cached(id(tok), tok)


@functools.lru_cache(maxsize=4)
def _essay_ids_cached(_key: int, tok: TokenizerWrapper) -> list[int]:
    folder = data_dir() / "longcontext" / "paul_graham_essays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise WorkloadFileError(f"{folder}: no essays (*.txt) to cut prompts from; set TIERSERVE_DATA_DIR")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return tok.encode(text, add_special_tokens=False)


def ranged(rng: np.random.Generator, length: int, ratio: float, num: int) -> list[int]:
    """``num`` integers uniform in [length·(1−ratio), length·(1+ratio)], at least 1 (vLLM's --random-range-ratio)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, round(length * (1 - ratio))), max(1, round(length * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=num).tolist()
