"""Benchmark workloads: what each session sends. Token counts use the model's own tokenizer.

A workload is a list of ``Session``s; a session is one request (``random``, ``sharegpt``, ``prefix``, traces) or a
conversation of several turns (``multiturn``), sent closed loop: turn k+1 goes out after turn k's answer arrives and
carries turns 1..k with the model's actual answers as history (the runner builds that history). Trace workloads
(``mooncake``, ``azure``) live in ``traces.py``; text sources and file readers in ``sources.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierserve.bench.sources import (
    TextCutter,
    WorkloadFileError,
    count_tokens,
    data_file,
    iter_json_array,
    iter_jsonl,
    load_tokenizer,
    ranged,
)
from tierserve.tokenizer import TokenizerWrapper

SHAREGPT_FILE = "conversations/sharegpt_v3_first1000.json"
MTBENCH_FILE = "conversations/mt_bench_questions.jsonl"
DEFAULT_OUTPUT_LEN = 128


@dataclass
class WorkloadConfig:
    """How to build the requests. Lengths are tokens of ``tokenizer``; see ``docs/benchmarking.md``."""

    name: str = "random"
    tokenizer: str = "smollm2-135m"
    dataset_path: str | None = None
    input_len: int = 200
    output_len: int | None = None
    range_ratio: float = 0.0
    prefix_groups: int = 4
    prefix_len: int = 512
    multiturn_source: str = "sharegpt"
    max_turns: int = 8
    trace_length_scale: float = 16.0
    trace_time_scale: float = 1.0
    trace_offset: int = 0
    max_context_tokens: int | None = None


@dataclass
class Turn:
    """One request of a session: the user text of this turn and how many tokens to ask for."""

    text: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Session:
    """A request, or a conversation whose turns are sent one after another (closed loop)."""

    turns: list[Turn]


@dataclass
class Workload:
    """Sessions in send order; ``timestamps_s`` are a trace's own arrival times (unscaled), else ``None``."""

    name: str
    sessions: list[Session]
    timestamps_s: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


Builder = Callable[[WorkloadConfig, int, np.random.Generator, TokenizerWrapper], Workload]


def random_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    """Prompts of ``input_len`` (± ``range_ratio``) tokens cut from real text; ``output_len`` tokens asked."""
    cutter = TextCutter(tok, rng)
    ins = ranged(rng, cfg.input_len, cfg.range_ratio, num)
    outs = ranged(rng, cfg.output_len or DEFAULT_OUTPUT_LEN, cfg.range_ratio, num)
    sessions = []
    for n_in, n_out in zip(ins, outs, strict=True):
        text, n_tok = cutter.cut(n_in)
        sessions.append(Session([Turn(text, n_tok, n_out)]))
    return Workload("random", sessions)


def prefix_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    """``prefix_groups`` long prefixes of ``prefix_len`` tokens; request i uses prefix i mod groups and a distinct
    suffix of ``input_len`` tokens (± ``range_ratio``). Groups interleave, so reuse happens across other groups."""
    if cfg.prefix_groups < 1:
        raise ValueError(f"--prefix-groups must be >= 1, got {cfg.prefix_groups}")
    cutter = TextCutter(tok, rng)
    prefixes = [cutter.cut(cfg.prefix_len)[0] for _ in range(cfg.prefix_groups)]
    ins = ranged(rng, cfg.input_len, cfg.range_ratio, num)
    outs = ranged(rng, cfg.output_len or DEFAULT_OUTPUT_LEN, cfg.range_ratio, num)
    sessions = []
    for i, (n_in, n_out) in enumerate(zip(ins, outs, strict=True)):
        text = prefixes[i % cfg.prefix_groups] + "\n\n" + cutter.cut(n_in)[0]
        sessions.append(Session([Turn(text, count_tokens(tok, text), n_out)]))
    return Workload("prefix", sessions, info={"prefix_groups": cfg.prefix_groups, "prefix_len": cfg.prefix_len})


def _sharegpt_pairs(cfg: WorkloadConfig) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Each record as (id, [(human text, the gpt reply that follows or None)]); leading gpt turns are dropped."""
    path = data_file(cfg.dataset_path, SHAREGPT_FILE)
    records = []
    for line, rec in iter_json_array(path):
        convs = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(convs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("from"), str) and isinstance(m.get("value"), str) for m in convs
        ):
            raise WorkloadFileError(f"{path}:{line}: a ShareGPT record needs 'conversations': "
                                    "[{'from': 'human'|'gpt', 'value': str}, ...]")
        pairs: list[tuple[str, str | None]] = []
        for m in convs:
            if m["from"] == "human":
                pairs.append((m["value"], None))
            elif m["from"] == "gpt" and pairs and pairs[-1][1] is None:
                pairs[-1] = (pairs[-1][0], m["value"])
        records.append((str(rec.get("id", line)), pairs))
    return records


def sharegpt_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    """First human turn of ShareGPT records as prompts; output length = the recorded reply's tokens unless
    ``output_len`` is set. Filtered as vLLM does: prompt and reply ≥ 4 tokens, prompt ≤ 1024, sum ≤ 2048
    (or ``max_context_tokens``)."""
    records = _sharegpt_pairs(cfg)
    limit = cfg.max_context_tokens or 2048
    sessions = []
    for idx in rng.permutation(len(records)):
        pairs = records[idx][1]
        if not pairs or pairs[0][1] is None:
            continue
        prompt, reply = pairs[0]
        n_in = count_tokens(tok, prompt)
        n_out = cfg.output_len or count_tokens(tok, reply or "")
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > limit:
            continue
        sessions.append(Session([Turn(prompt, n_in, n_out)]))
        if len(sessions) == num:
            break
    if len(sessions) < num:
        raise ValueError(f"only {len(sessions)} ShareGPT prompts pass the length filter; ask for fewer requests")
    return Workload("sharegpt", sessions)


def multiturn_workload(cfg: WorkloadConfig, num: int, rng: np.random.Generator, tok: TokenizerWrapper) -> Workload:
    """Conversations (ShareGPT records with ≥ 2 human turns, or MT-Bench's two-turn questions), at most
    ``max_turns`` turns each, until ``num`` turns in all. The runner sends each turn with the earlier turns and the
    model's own answers as history. Output length per turn: ``output_len``, else ShareGPT's recorded reply."""
    convs: list[list[tuple[str, str | None]]]
    if cfg.multiturn_source == "mtbench":
        path = data_file(cfg.dataset_path, MTBENCH_FILE)
        convs = []
        for line, q in iter_jsonl(path):
            turns = q.get("turns")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise WorkloadFileError(f"{path}:{line}: an MT-Bench question needs 'turns': [str, ...]")
            convs.append([(t, None) for t in turns])
    elif cfg.multiturn_source == "sharegpt":
        convs = [pairs for _, pairs in _sharegpt_pairs(cfg) if len(pairs) >= 2]
    else:
        raise ValueError(f"--multiturn-source must be sharegpt or mtbench, got {cfg.multiturn_source!r}")
    sessions: list[Session] = []
    left = num
    for idx in rng.permutation(len(convs)):
        if left <= 0:
            break
        turns = []
        for text, reply in convs[idx][: min(cfg.max_turns, left)]:
            n_out = cfg.output_len or (count_tokens(tok, reply) if reply else DEFAULT_OUTPUT_LEN)
            turns.append(Turn(text, count_tokens(tok, text), max(1, n_out)))
        sessions.append(Session(turns))
        left -= len(turns)
    if left > 0:
        raise ValueError(f"the {cfg.multiturn_source} conversations hold only {num - left} turns "
                         f"(max {cfg.max_turns} each); ask for fewer requests or raise --max-turns")
    return Workload("multiturn", sessions, info={"source": cfg.multiturn_source, "max_turns": cfg.max_turns})


def builders() -> dict[str, Builder]:
    from tierserve.bench.traces import azure_workload, mooncake_workload

    return {"random": random_workload, "sharegpt": sharegpt_workload, "prefix": prefix_workload,
            "multiturn": multiturn_workload, "mooncake": mooncake_workload, "azure": azure_workload}


WORKLOADS = ("random", "sharegpt", "prefix", "multiturn", "mooncake", "azure")


def build_workload(cfg: WorkloadConfig, num_requests: int, seed: int) -> Workload:
    """The same ``(cfg, num_requests, seed)`` always gives the same requests."""
    table = builders()
    if cfg.name not in table:
        raise ValueError(f"unknown workload {cfg.name!r}; choose one of {', '.join(WORKLOADS)}")
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    for flag, value, low in (("--input-len", cfg.input_len, 1), ("--output-len", cfg.output_len, 1),
                             ("--trace-offset", cfg.trace_offset, 0), ("--prefix-len", cfg.prefix_len, 1),
                             ("--max-context-tokens", cfg.max_context_tokens, 2)):
        if value is not None and value < low:  # (0 output tokens was taken as "not set": 128 were asked for)
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not cfg.trace_length_scale > 0:  # (also nan)
        raise ValueError(f"--trace-length-scale must be > 0, got {cfg.trace_length_scale}")
    tok = load_tokenizer(cfg.tokenizer)
    return table[cfg.name](cfg, num_requests, np.random.default_rng(seed), tok)
