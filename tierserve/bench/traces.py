"""Trace replay: Mooncake (arrival times, lengths, prefix hash ids) and Azure LLM inference CSV traces.

A CPU cannot replay production traces at full size, so lengths are divided by ``trace_length_scale`` (input and
output tokens; at least 1) and arrival times multiplied by ``trace_time_scale`` (> 1 slows the replay down; see
``arrivals.trace_arrivals``). The slice replayed is rows ``trace_offset .. trace_offset + num_requests``.

Mooncake prompts are synthesized from ``hash_ids``: in the trace each id names a 512-token block; here each id maps
to a fixed pseudo-random block of ``512 / trace_length_scale`` tokens seeded by the id (32 tokens at ÷16), and a
prompt is its blocks concatenated and cut to the scaled input length. Requests that share leading hash ids thus
share exactly that many blocks of token prefix. Blocks are drawn from whole-word tokens (" word") that the
tokenizer maps back to themselves, so the text the server re-tokenizes gives the same token ids.

Azure rows carry no prefix information: prompts are cut from real text with no accidental shared prefix.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from tierserve.bench.sources import TextCutter, WorkloadFileError, data_file, iter_jsonl
from tierserve.bench.workloads import Session, Turn, Workload, WorkloadConfig
from tierserve.tokenizer import TokenizerWrapper

MOONCAKE_FILE = "traces/mooncake_conversation_trace.jsonl"
AZURE_FILE = "traces/azure_llm_2023_conv.csv"
MOONCAKE_BLOCK_TOKENS = 512
_WORD = re.compile(r"^ [a-z]{2,}$")


def scaled(length: int, scale: float) -> int:
    return max(1, math.ceil(length / scale))


def clip(n_in: int, n_out: int, max_context: int | None) -> tuple[int, int]:
    """Fit a request into ``max_context`` tokens: output to at most half, input to the rest (a prefix cut)."""
    if max_context is None or n_in + n_out <= max_context:
        return n_in, n_out
    n_out = min(n_out, max(1, max_context // 2))
    return max(1, max_context - n_out), n_out


@functools.lru_cache(maxsize=4)
def word_vocab(tok: TokenizerWrapper) -> np.ndarray:
    """Ids of tokens that decode to ``" word"`` (lowercase letters) and encode back to themselves alone."""
    ids = range(tok.vocab_size)
    texts = tok.tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=True)
    cands = [(i, t) for i, t in zip(ids, texts, strict=True) if _WORD.match(t)]
    encs = tok.tokenizer.encode_batch([t for _, t in cands], add_special_tokens=False)
    good = [i for (i, _), e in zip(cands, encs, strict=True) if e.ids == [i]]
    if len(good) < 1000:
        raise ValueError(f"tokenizer has only {len(good)} whole-word tokens; cannot synthesize Mooncake prompts")
    return np.asarray(good, dtype=np.int64)


def hash_block(tok: TokenizerWrapper, hash_id: int, block_tokens: int) -> list[int]:
    """The fixed token block of a Mooncake hash id (the same id always gives the same tokens)."""
    vocab = word_vocab(tok)
    return vocab[np.random.default_rng(hash_id).integers(0, len(vocab), size=block_tokens)].tolist()


def _int_field(path: Path, line: int, row: dict, key: str, minimum: int) -> int:
    v = row.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise WorkloadFileError(f"{path}:{line}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def mooncake_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    path = data_file(cfg.dataset_path, MOONCAKE_FILE)
    block = max(1, round(MOONCAKE_BLOCK_TOKENS / cfg.trace_length_scale))
    sessions, stamps, clipped = [], [], 0
    for row_index, (line, row) in enumerate(iter_jsonl(path)):
        if row_index < cfg.trace_offset:
            continue
        ts = row.get("timestamp")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
            raise WorkloadFileError(f"{path}:{line}: 'timestamp' must be a number of ms >= 0, got {ts!r}")
        n_in = _int_field(path, line, row, "input_length", 1)
        n_out = _int_field(path, line, row, "output_length", 0)
        ids = row.get("hash_ids")
        if not isinstance(ids, list) or not all(isinstance(h, int) and h >= 0 for h in ids):
            raise WorkloadFileError(f"{path}:{line}: 'hash_ids' must be a list of integers >= 0")
        if len(ids) != math.ceil(n_in / MOONCAKE_BLOCK_TOKENS):
            raise WorkloadFileError(f"{path}:{line}: {len(ids)} hash_ids for input_length {n_in}; expected "
                                    f"ceil({n_in}/{MOONCAKE_BLOCK_TOKENS}) = {math.ceil(n_in / MOONCAKE_BLOCK_TOKENS)}")
        s_in, s_out = scaled(n_in, cfg.trace_length_scale), scaled(n_out, cfg.trace_length_scale)
        c_in, c_out = clip(s_in, s_out, cfg.max_context_tokens)
        clipped += (c_in, c_out) != (s_in, s_out)
        tokens = [t for h in ids for t in hash_block(tok, h, block)][:c_in]
        sessions.append(Session([Turn(tok.decode(tokens), len(tokens), c_out)]))
        stamps.append(ts / 1000.0)
        if len(sessions) == num:
            break
    if len(sessions) < num:
        raise ValueError(f"{path} has only {len(sessions)} rows after --trace-offset {cfg.trace_offset}")
    info = {"file": str(path), "length_scale": cfg.trace_length_scale, "time_scale": cfg.trace_time_scale,
            "offset": cfg.trace_offset, "block_tokens": block, "clipped": clipped}
    return Workload("mooncake", sessions, stamps, info)


def parse_azure_time(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` → POSIX seconds (the fraction may have more than 6 digits)."""
    whole, _, frac = text.strip().partition(".")
    t = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def azure_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    path = data_file(cfg.dataset_path, AZURE_FILE)
    cutter = TextCutter(tok, rng)
    sessions, stamps, clipped = [], [], 0
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise WorkloadFileError(f"{path}:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, "
                                    f"got {header!r}")
        for row in reader:
            line = reader.line_num
            if line - 1 <= cfg.trace_offset or not row:
                continue
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 fields, got {len(row)}")
                ts, n_in, n_out = parse_azure_time(row[0]), int(row[1]), int(row[2])
                if n_in < 1 or n_out < 0:
                    raise ValueError("token counts must be ContextTokens >= 1, GeneratedTokens >= 0")
            except ValueError as e:
                raise WorkloadFileError(f"{path}:{line}: bad row {','.join(row)!r}: {e}") from None
            s_in, s_out = scaled(n_in, cfg.trace_length_scale), scaled(n_out, cfg.trace_length_scale)
            c_in, c_out = clip(s_in, s_out, cfg.max_context_tokens)
            clipped += (c_in, c_out) != (s_in, s_out)
            text, n_tok = cutter.cut(c_in)
            sessions.append(Session([Turn(text, n_tok, c_out)]))
            stamps.append(ts)
            if len(sessions) == num:
                break
    if len(sessions) < num:
        raise ValueError(f"{path} has only {len(sessions)} rows after --trace-offset {cfg.trace_offset}")
    info = {"file": str(path), "length_scale": cfg.trace_length_scale, "time_scale": cfg.trace_time_scale,
            "offset": cfg.trace_offset, "clipped": clipped}
    return Workload("azure", sessions, stamps, info)
