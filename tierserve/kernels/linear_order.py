"""Find the order in which torch's bf16 linear (oneDNN on CPU) sums each output, so ``linear_vnni`` sums the same way.

A bf16 linear accumulates in fp32; which partial sums it forms decides the last bits of each output, and in a model
those bits decide near-tied greedy tokens. oneDNN's AVX-512-BF16 kernels sum each output's K features in one chain
per K block (each pair of features in VDPBF16PS order, the block sums then added in order), and pick the block size
from the shape: measured on the EPYC with torch 2.13, 512 for K = 576 at any row count, and for K = 1536 512 at one
row but 1024 at two or more. That depends on the CPU, the oneDNN version and the threads, so it is measured here, at
load, in the process that will run the model: for each weight shape, one probe per candidate block size whose result
differs between block sizes, checked against ``F.linear``.

The probe: x is all ones; each output column holds +2^25, -2^25 and 1 at three random features. The 1 survives only
if it is added after both large terms cancelled, or in a partial sum of its own - so the column's bf16 result (0 or
1) tells where the three features fall in the summation order, and a few hundred columns tell the block size. A
second probe on random data then checks the whole result, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_BIG = 2.0**25


def _probe_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.zeros(n, k)
    # three distinct features per column
    a = torch.randint(0, k, (n,), generator=gen)
    b = torch.randint(0, k - 1, (n,), generator=gen)
    b += b >= a
    c = torch.randint(0, k - 2, (n,), generator=gen)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    c += c >= lo
    c += c >= hi
    rows = torch.arange(n)
    w[rows, a] = _BIG
    w[rows, b] = -_BIG
    w[rows, c] = 1.0
    return w.bfloat16()


def candidate_chunks(k: int) -> list[int]:
    """0 (one chain over all of K), then every multiple of 32 below K."""
    return [0] + list(range(32, k, 32))


def torch_k_chunk(ops: ModuleType, n: int, k: int, rows: int, seed: int = 0) -> int | None:
    """The ``k_chunk`` with which ``ops.linear_vnni`` equals ``F.linear`` bit for bit on [rows, k] x [n, k] bf16, or
    None if no block size does (another kernel family, e.g. AMX tiles)."""
    gen = torch.Generator().manual_seed(seed)
    probes = [(torch.ones(rows, k, dtype=torch.bfloat16), _probe_weight(n, k, gen)),
              (torch.randn(rows, k, generator=gen).bfloat16(), (torch.randn(n, k, generator=gen) * 0.05).bfloat16())]
    refs = [F.linear(x, w) for x, w in probes]
    packed = [ops.pack_vnni(w) for _, w in probes]
    for c in candidate_chunks(k):
        if all(torch.equal(ops.linear_vnni(x, wp, None, c, 0, 0), ref)
               for (x, _), wp, ref in zip(probes, packed, refs)):
            return c
    return None


def torch_k_chunks(ops: ModuleType, n: int, k: int, rows: tuple[int, ...] = (2, 64)) -> tuple[int, int]:
    """(block size at one row, block size at several rows) for an [n, k] weight; 0 where not found (one chain).
    The several-row probes (``rows``; none: same as one row) must agree, else 0."""
    one = torch_k_chunk(ops, n, k, 1)
    multi = {torch_k_chunk(ops, n, k, r) for r in rows} if rows else {one}
    many = multi.pop() if len(multi) == 1 else None
    if one is None or many is None:
        logger.info("linear_vnni cannot reproduce torch's bf16 linear order for [%d, %d] on this CPU "
                    "(one row: %s, several: %s); summing in one chain", n, k, one, many)
    return (one or 0, many or 0)


def _cache_sizes() -> str:
    """This CPU's cache sizes as the OS reports them (oneDNN's blocking heuristics read them too)."""
    sizes = []
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            sizes.append(f"L{(idx / 'level').read_text().strip()}{(idx / 'type').read_text().strip()[0]}="
                         f"{(idx / 'size').read_text().strip()}")
        except OSError:
            continue
    return ",".join(sizes)


def amx_chunks_cache_file(threads: int) -> Path:
    """Where ``AmxKChunks`` keeps what it measured, for later processes on a machine like this one: one file per CPU
    model (family / model / stepping too), feature set, cache sizes, torch (and so oneDNN) version, oneDNN settings
    in the environment (e.g. ``ONEDNN_MAX_CPU_ISA``) and thread count - everything oneDNN's choice of K split
    depends on - under the kernels' cache folder."""
    from tierserve.kernels import cache_dir
    from tierserve.utils.cpu import cpu_info

    info = cpu_info()
    onednn_env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_")))
    key = "|".join([info.model_name, repr(sorted(info.ident.items())), _cache_sizes(), " ".join(sorted(info.flags)),
                    " ".join(onednn_env), torch.__version__, str(threads)])
    return cache_dir() / "amx_k_chunks" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


class AmxKChunks:
    """The K blocking of torch's bf16 linear on a CPU with AMX, where oneDNN's tile kernels sum each output over K in
    order, 32 features per tile step (what ``ops.linear_amx`` does with no chunk) - up to 32 rows; above that oneDNN
    splits K between threads for mid-sized M and adds the parts (measured with torch 2.13 on a 2-core Xeon: K = 576
    in halves for 33 to a few hundred rows, K = 1536 in thirds or quarters by M - at ~260-340 rows quarters added as
    a pairwise tree, two threads' halves - one chain again for large M). The
    split follows oneDNN's own heuristics of M, N, K and the threads, so it is measured, per shape and row count, the
    first time that row count is asked for (remembered), with the probe of ``torch_k_chunk`` against
    ``linear_amx``: prefill rows then sum as transformers' single call over the whole prompt does.

    A probe runs on the engine step that first meets a prompt length, so it stalls that step's decodes too: ~80 ms
    for the five shapes at ~1000 rows when the split was far down the candidate list. Two things keep it off most
    steps: the split found for the nearest row count already measured is tried first (the split is a step function
    of M, so it is usually right: one candidate instead of up to eight), and with ``cache_file`` what was measured is
    kept on disk (``amx_chunks_cache_file``: keyed by everything the split depends on) and read back by the next
    process, so a restarted server probes only lengths it has never met."""

    def __init__(self, ops: ModuleType, cache_file: Path | None = None, nearest_first: bool = True) -> None:
        self.ops = ops
        self.cache_file = cache_file
        self.nearest_first = nearest_first
        """False: candidates in the fixed order only (to measure what trying the nearest row count's first saves)."""
        self._chunks: dict[tuple[int, int, int], int] = {}
        self._probes: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._random: dict[int, torch.Tensor] = {}
        self.probe_count = 0
        """Row counts measured in this process (not read from the cache file)."""
        self.probe_seconds = 0.0
        """Time spent measuring them."""
        self.candidates_tried = 0
        """Candidate splits checked against torch over all probes (one each when the nearest row count's is right)."""
        if cache_file is not None:
            self._chunks.update(self._read(cache_file))

    def __len__(self) -> int:
        """(shape, row count) pairs above 32 rows whose splits are known, measured or read from the cache file."""
        return sum(1 for key in self._chunks if key[2] > 32)

    def _read(self, path: Path) -> dict[tuple[int, int, int], int]:
        """The entries of a cache file - one JSON line ``[n, k, rows, k_chunk]`` per measurement - whose values are
        splits this class could have found; lines that do not parse or hold anything else are skipped (logged)."""
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("ignoring the AMX K-split cache %s (%s)", path, exc)
            return {}
        out: dict[tuple[int, int, int], int] = {}
        bad = 0
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                e = None
            if (isinstance(e, list) and len(e) == 4 and all(type(v) is int for v in e)
                    and e[0] > 0 and e[1] > 0 and e[2] > 32 and (e[3] == 0 or e[3] in self.candidates(e[1]))):
                out[(e[0], e[1], e[2])] = e[3]
            elif line.strip():
                bad += 1
        if bad:
            logger.warning("the AMX K-split cache %s had %d malformed lines (skipped)", path, bad)
        return out

    def _append(self, key: tuple[int, int, int], chunk: int) -> None:
        """Add one measurement to the cache file: a single short line appended (O_APPEND), so the cost does not grow
        with the file and processes sharing it never corrupt it. A failure to write is logged once, not raised."""
        path = self.cache_file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps([*key, chunk]) + "\n")
        except OSError as exc:
            logger.warning("could not write the AMX K-split cache %s (%s); measuring in memory only", path, exc)
            self.cache_file = None

    def _random_rows(self, rows: int, k: int) -> torch.Tensor:
        """rows x k random bf16 probe rows: the first rows of one matrix per k, grown (doubled) as needed. Drawing
        fresh normals for every new row count took ~a quarter of a probe (15 of ~67 ms for four shapes at ~1200
        rows), and a probe runs on the first step that meets a new prompt length."""
        have = self._random.get(k)
        if have is None or have.shape[0] < rows:
            size = max(rows, 2 * (0 if have is None else have.shape[0]), 64)
            self._random[k] = torch.randn(size, k, generator=torch.Generator().manual_seed(k)).bfloat16()
        return self._random[k][:rows]

    def candidates(self, k: int, first: int | None = None) -> list[int]:
        """One chain first, then even splits of K (most likely), the same with the parts added as a pairwise tree
        (negative: K split between threads, measured for K = 1536 in quarters at ~260-340 rows), then every multiple
        of 32. ``first``: a split to try before all of them (the nearest measured row count's)."""
        splits = [k // s for s in range(2, 9) if k % s == 0 and (k // s) % 32 == 0]
        trees = [-c for c in splits if k // c >= 4]
        order = [0] + splits + trees + [c for c in range(32, k, 32) if c not in splits]
        if first is not None and first in order:
            order.remove(first)
            order.insert(0, first)
        return order

    def _nearest(self, n: int, k: int, rows: int) -> int | None:
        """The split measured for the row count closest to ``rows`` (above 32) for this shape, if any."""
        best: tuple[int, int] | None = None
        for (n1, k1, r1), c in self._chunks.items():
            if n1 == n and k1 == k and r1 > 32 and (best is None or abs(r1 - rows) < best[0]):
                best = (abs(r1 - rows), c)
        return None if best is None else best[1]

    def __call__(self, n: int, k: int, rows: int) -> int:
        """The k_chunk for ``linear_amx`` that gives torch's bits for an [rows, k] x [n, k] call (0: one chain; also
        when nothing matches, which is logged once)."""
        key = (n, k, rows)
        if key in self._chunks:
            return self._chunks[key]
        if rows <= 32:
            self._chunks[key] = 0
            return 0
        t0 = time.perf_counter()
        if (n, k) not in self._probes:
            gen = torch.Generator().manual_seed(0)
            ws = [_probe_weight(n, k, gen), (torch.randn(n, k, generator=gen) * 0.05).bfloat16()]
            self._probes[(n, k)] = [(w, self.ops.pack_vnni(w)) for w in ws]
        xs = [torch.ones(rows, k, dtype=torch.bfloat16), self._random_rows(rows, k)]
        refs = [F.linear(x, w) for x, (w, _) in zip(xs, self._probes[(n, k)])]
        # the structured probe's rows are all alike, so a candidate is checked on its first 32 (ruling most out
        # cheaply); the one that passes is then checked on every random row
        (_, wp0), (_, wp1) = self._probes[(n, k)]
        few = xs[0][:32]
        found = 0
        for c in self.candidates(k, self._nearest(n, k, rows) if self.nearest_first else None):
            self.candidates_tried += 1
            if (torch.equal(self.ops.linear_amx(few, wp0, None, c), refs[0][:32])
                    and torch.equal(self.ops.linear_amx(xs[1], wp1, None, c), refs[1])):
                found = c
                break
        else:
            logger.info("linear_amx cannot reproduce torch's bf16 linear order for [%d, %d] x %d rows; one chain",
                        n, k, rows)
        self._chunks[key] = found
        self.probe_count += 1
        self.probe_seconds += time.perf_counter() - t0
        self._append(key, found)
        return found
