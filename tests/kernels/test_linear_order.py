"""AmxKChunks: oneDNN's K splits measured once per (shape, row count), tried nearest-first, kept on disk.

The file handling runs on any CPU (no probe is needed to read, validate or reject a cache file); the probes
themselves need AMX tiles and are checked bit for bit against torch's bf16 linear."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tierserve.kernels import cpu_ops
from tierserve.kernels.linear_order import AmxKChunks, amx_chunks_cache_file

ops = cpu_ops()
needs_amx = pytest.mark.skipif(not (ops is not None and ops.amx_available()), reason="needs a CPU with AMX tiles")


def _write(path: Path, entries: list[object]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_cache_file_entries_are_read_and_bad_ones_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Valid entries are used without probing (``ops`` is never called: None here); entries whose split no probe
    could have found (not a candidate for that K), at 32 rows or fewer, or of the wrong shape are skipped, logged."""
    path = tmp_path / "c.jsonl"
    _write(path, [[576, 576, 200, 288], [576, 1536, 300, -384], [192, 576, 1000, 0],
                  [576, 576, 201, 100], [576, 576, 16, 288], [576, 576, 300], "junk", [576, 576, 400, 1.5],
                  [576, 576, 500, True]])
    with path.open("a") as f:
        f.write("{not json\n\n")  # a torn line (a killed writer), and a blank one (ignored)
    with caplog.at_level(logging.WARNING, logger="tierserve.kernels.linear_order"):
        chunks = AmxKChunks(None, path)  # type: ignore[arg-type]  # never probes: every asked entry is known
    assert len(chunks) == 3
    assert chunks(576, 576, 200) == 288 and chunks(576, 1536, 300) == -384 and chunks(192, 576, 1000) == 0
    assert chunks(576, 576, 16) == 0  # up to 32 rows: one chain, never from the file
    assert chunks.probe_count == 0
    assert "7 malformed lines" in caplog.text


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"chunks": 7}', b"\xff\xfe[1, 2, 3, 4]"])
def test_unreadable_cache_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    """Nothing usable in the file (empty, not JSON, not an entry, not UTF-8) or no file: no entry, no error."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    assert len(AmxKChunks(None, path)) == 0  # type: ignore[arg-type]
    assert len(AmxKChunks(None, tmp_path / "missing.jsonl")) == 0  # type: ignore[arg-type]


def test_cache_file_is_keyed_by_threads_and_onednn_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN splits K between threads: another thread count is another file (so is another CPU or torch), and so is
    a oneDNN setting in the environment that can change its kernels (e.g. capping the ISA below AMX)."""
    assert amx_chunks_cache_file(2) != amx_chunks_cache_file(4)
    assert amx_chunks_cache_file(2) == amx_chunks_cache_file(2)
    plain = amx_chunks_cache_file(2)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert amx_chunks_cache_file(2) != plain


@needs_amx
def test_nearest_first_finds_the_bits_and_the_cache_file_serves_a_new_process(tmp_path: Path) -> None:
    """Row counts met in sequence (so each probe tries the nearest measured count's split first) give splits with
    which linear_amx equals F.linear bit for bit; they are written to the cache file, and a second instance
    (a restarted process) answers from it without a probe."""
    path = tmp_path / "sub" / "chunks.jsonl"
    first = AmxKChunks(ops, path)
    gen = torch.Generator().manual_seed(3)
    found = {}
    for n, k in [(576, 576), (576, 1536)]:
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        wp = ops.pack_vnni(w)
        for rows in (40, 41, 200, 300, 301, 700):
            c = first(n, k, rows)
            x = torch.randn(rows, k, generator=gen).bfloat16()
            assert torch.equal(ops.linear_amx(x, wp, None, c), F.linear(x, w)), (n, k, rows, c)
            found[(n, k, rows)] = c
    assert first.probe_count == 12 and first.probe_seconds > 0
    assert first.candidates_tried >= 12
    lines = path.read_text().splitlines()
    assert len(lines) == 12  # one line appended per probe
    assert {(n, k, r): c for n, k, r, c in map(json.loads, lines)} == found
    second = AmxKChunks(ops, path)
    assert all(second(*key) == c for key, c in found.items())
    assert second.probe_count == 0


@needs_amx
def test_unwritable_cache_file_still_measures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cache folder that cannot be created (a file stands in its way) is logged once; probes go on in memory."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    chunks = AmxKChunks(ops, blocker / "chunks.jsonl")
    with caplog.at_level(logging.WARNING, logger="tierserve.kernels.linear_order"):
        a, b = chunks(576, 576, 100), chunks(576, 576, 120)
    assert chunks.probe_count == 2 and chunks.cache_file is None
    assert caplog.text.count("could not write") == 1
    assert a % 32 == 0 and b % 32 == 0
