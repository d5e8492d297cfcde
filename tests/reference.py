"""Reference outputs from Hugging Face transformers on the same weights, and the comparison rule.

The rule is vLLM's (tests/models/utils.py `check_logprobs_close`): greedy tokens must be identical; where float
rounding flips a near-tie, the two sides may differ only if each side's token is among the other side's top-5
log-probabilities at that position; after such a flip the sequences are no longer comparable and the check stops.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).parent / "data"

TEST_DEVICE = os.environ.get("TIERSERVE_TEST_DEVICE", "cpu")
"""Where the exactness tests run, the engine and transformers alike: cpu, or cuda on a GPU machine
(``scripts/device/bar5.sh`` runs the float32 exactness tests there)."""


def exactness_prompts() -> list[str]:
    return [p["text"] for p in json.loads((DATA / "exactness_prompts.json").read_text())["prompts"]]


@dataclass
class Generated:
    token_ids: list[int]
    top5: list[set[int]]
    """Per generated position: the 5 most likely token ids."""


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> Generated:
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    new = out.sequences[0, len(prompt_ids):].tolist()
    top5 = [set(s[0].topk(5).indices.tolist()) for s in out.scores]
    return Generated(new, top5)


def ours_generated(completion: Any) -> Generated:
    """From a CompletionOutput generated with logprobs=5."""
    top5 = [{tid for tid, lp in pos.items() if lp.rank <= 5} for pos in completion.logprobs or []]
    return Generated(list(completion.token_ids), top5)


@dataclass
class Comparison:
    identical_tokens: int
    total_tokens: int
    near_tie_flips: int
    failures: list[str]

    @property
    def fraction_identical(self) -> float:
        return self.identical_tokens / max(1, self.total_tokens)


def compare(refs: list[Generated], ours: list[Generated], names: list[str]) -> Comparison:
    """Tokens up to the first divergence count as identical; a divergence is allowed only as a near-tie."""
    identical = total = flips = 0
    failures: list[str] = []
    for name, ref, got in zip(names, refs, ours):
        total += len(ref.token_ids)
        if len(got.token_ids) != len(ref.token_ids):
            failures.append(f"{name}: {len(got.token_ids)} tokens, reference {len(ref.token_ids)}")
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            if a == b:
                identical += 1
                continue
            ok = b in ref.top5[i] and (not got.top5 or a in got.top5[i])
            if ok:
                flips += 1
            else:
                failures.append(f"{name}: position {i}: ours {b}, transformers {a} (not a near-tie)")
            break
    return Comparison(identical, total, flips, failures)
