"""Workloads: exact lengths from the model's tokenizer, prefix sharing where intended (and only there),
trace scaling, and clear errors naming file and line for malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve.bench.sources import PREFIX_GUARD_TOKENS, WorkloadFileError, data_dir, load_tokenizer
from tierserve.bench.traces import hash_block
from tierserve.bench.workloads import WorkloadConfig, build_workload


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("smollm2-135m")


def ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return tok.encode(text, add_special_tokens=False)


def test_random_lengths_and_no_accidental_prefix(tok) -> None:  # type: ignore[no-untyped-def]
    w = build_workload(WorkloadConfig(name="random", input_len=64, output_len=8), 40, seed=3)
    turns = [s.turns[0] for s in w.sessions]
    assert len(turns) == 40 and all(t.max_tokens == 8 for t in turns)
    assert all(abs(t.prompt_tokens - 64) <= 1 for t in turns)
    assert all(t.prompt_tokens == len(ids(tok, t.text)) for t in turns)
    starts = {tuple(ids(tok, t.text)[:PREFIX_GUARD_TOKENS - 2]) for t in turns}
    assert len(starts) == 40
    again = build_workload(WorkloadConfig(name="random", input_len=64, output_len=8), 40, seed=3)
    assert [s.turns[0].text for s in again.sessions] == [t.text for t in turns]
    other = build_workload(WorkloadConfig(name="random", input_len=64, output_len=8), 40, seed=4)
    assert other.sessions[0].turns[0].text != turns[0].text


def test_random_ranged_lengths() -> None:
    w = build_workload(WorkloadConfig(name="random", input_len=100, output_len=20, range_ratio=0.5), 50, seed=0)
    ins = [s.turns[0].prompt_tokens for s in w.sessions]
    outs = [s.turns[0].max_tokens for s in w.sessions]
    assert 49 <= min(ins) and max(ins) <= 151 and len(set(ins)) > 10
    assert 10 <= min(outs) and max(outs) <= 30


def test_prefix_groups_share_a_long_prefix(tok) -> None:  # type: ignore[no-untyped-def]
    w = build_workload(WorkloadConfig(name="prefix", prefix_groups=3, prefix_len=100, input_len=20), 9, seed=0)
    tok_ids = [ids(tok, s.turns[0].text) for s in w.sessions]

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    assert common(tok_ids[0], tok_ids[3]) >= 99 and common(tok_ids[0], tok_ids[6]) >= 99
    assert common(tok_ids[0], tok_ids[1]) < PREFIX_GUARD_TOKENS
    assert common(tok_ids[0], tok_ids[3]) < 100 + 5  # suffixes differ
    assert all(115 <= s.turns[0].prompt_tokens <= 125 for s in w.sessions)


def test_sharegpt_first_turns() -> None:
    w = build_workload(WorkloadConfig(name="sharegpt"), 10, seed=0)
    assert len(w.sessions) == 10
    for s in w.sessions:
        (t,) = s.turns
        assert 4 <= t.prompt_tokens <= 1024 and t.max_tokens >= 4 and t.prompt_tokens + t.max_tokens <= 2048


def test_multiturn_counts_turns() -> None:
    w = build_workload(WorkloadConfig(name="multiturn", multiturn_source="mtbench", output_len=16), 7, seed=0)
    assert w.num_requests == 7 and [len(s.turns) for s in w.sessions] == [2, 2, 2, 1]
    w = build_workload(WorkloadConfig(name="multiturn", max_turns=3), 10, seed=0)
    assert w.num_requests == 10 and all(len(s.turns) <= 3 for s in w.sessions)


def write_trace(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mooncake_hash_ids_give_shared_token_prefixes(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    rows = [{"timestamp": 0, "input_length": 1500, "output_length": 160, "hash_ids": [0, 1, 2]},
            {"timestamp": 3000, "input_length": 1100, "output_length": 16, "hash_ids": [0, 1, 3]},
            {"timestamp": 3000, "input_length": 300, "output_length": 1, "hash_ids": [4]}]
    path = write_trace(tmp_path / "t.jsonl", rows)
    cfg = WorkloadConfig(name="mooncake", dataset_path=str(path), trace_length_scale=16, trace_time_scale=2)
    w = build_workload(cfg, 3, seed=0)
    a, b, c = (s.turns[0] for s in w.sessions)
    assert (a.prompt_tokens, a.max_tokens) == (94, 10)  # ceil(1500/16), ceil(160/16)
    assert (b.prompt_tokens, c.prompt_tokens, c.max_tokens) == (69, 19, 1)
    ta, tb, tc = (ids(tok, t.text) for t in (a, b, c))
    assert len(ta) == 94 and len(tb) == 69 and len(tc) == 19  # text re-encodes to the same tokens
    assert ta[:64] == tb[:64] and ta[64:69] != tb[64:69]  # two shared 32-token blocks, then different
    assert ta[:32] == hash_block(tok, 0, 32) and tc == hash_block(tok, 4, 32)[:19]
    assert w.timestamps_s == [0.0, 3.0, 3.0]
    assert w.info["block_tokens"] == 32


def test_real_mooncake_slice_shares_system_prompt(tok) -> None:  # type: ignore[no-untyped-def]
    w = build_workload(WorkloadConfig(name="mooncake", max_context_tokens=256), 8, seed=0)
    first = [ids(tok, s.turns[0].text)[:32] for s in w.sessions]
    assert all(f == first[0] for f in first)  # every conversation-trace request starts with hash id 0
    assert all(s.turns[0].prompt_tokens + s.turns[0].max_tokens <= 256 for s in w.sessions)
    assert w.info["clipped"] > 0


def test_azure_trace(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,1600,109\n")
    w = build_workload(WorkloadConfig(name="azure", dataset_path=str(path), trace_length_scale=4), 2, seed=0)
    assert [s.turns[0].max_tokens for s in w.sessions] == [11, 28]
    assert abs(w.sessions[1].turns[0].prompt_tokens - 400) <= 1
    assert w.timestamps_s is not None
    assert w.timestamps_s[1] - w.timestamps_s[0] == pytest.approx(4.314579, abs=1e-6)


@pytest.mark.parametrize(("name", "content", "where", "message"), [
    ("mooncake", '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{"timestamp": 1,\n',
     ":2:", "invalid JSON"),
    ("mooncake", '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n\n'
     '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [0]}\n', ":3:", "hash_ids"),
    ("mooncake", '{"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [0]}\n', ":1:", "input_length"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,abc,4\n",
     ":3:", "bad row"),
    ("azure", "time,in,out\n", ":1:", "header"),
    ("sharegpt", '[\n{"id": "a", "conversations": []},\n{"id": "b", "conversations": [}\n]\n', ":3:", "invalid JSON"),
    ("sharegpt", '[\n{"id": "a", "conversations": []},\n{"id": "b", "conversations": "hi"}\n]\n', ":3:",
     "conversations"),
    ("multiturn", '{"question_id": 1, "turns": ["a", "b"]}\n{"question_id": 2, "turns": "b"}\n', ":2:", "turns"),
])
def test_malformed_files_name_file_and_line(tmp_path: Path, name: str, content: str, where: str,
                                            message: str) -> None:
    path = tmp_path / "bad.data"
    path.write_text(content)
    cfg = WorkloadConfig(name=name, dataset_path=str(path), multiturn_source="mtbench")
    with pytest.raises(WorkloadFileError, match=message) as e:
        build_workload(cfg, 2, seed=0)
    assert f"{path}{where}" in str(e.value)


def test_missing_file_and_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WorkloadFileError, match=r"nope\.jsonl: no such file"):
        build_workload(WorkloadConfig(name="mooncake", dataset_path=str(tmp_path / "nope.jsonl")), 1, seed=0)
    monkeypatch.setenv("TIERSERVE_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(WorkloadFileError, match="TIERSERVE_DATA_DIR"):
        build_workload(WorkloadConfig(name="azure"), 1, seed=0)


def test_offline_prompts_distinct_windows_or_a_clear_error() -> None:
    from tierserve.bench.peers.offline import prompt_ids

    got = prompt_ids("smollm2-135m", 8, 64, seed=1)
    assert len(got) == 8 and all(len(p) == 64 for p in got) and len({tuple(p) for p in got}) == 8
    assert prompt_ids("smollm2-135m", 8, 64, seed=1) == got
    with pytest.raises(WorkloadFileError, match=r"fewer than the 100000 prompts asked for"):
        prompt_ids("smollm2-135m", 100_000, 256, seed=0)
