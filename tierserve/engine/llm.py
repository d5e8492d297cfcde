"""LLM: the offline batch API (``LLM(model=...).generate(prompts, SamplingParams(...))``), shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig, parse_size
from tierserve.engine.llm_engine import LLMEngine
from tierserve.outputs import CompletionOutput, RequestOutput
from tierserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    >>> llm = LLM(model="smollm2-135m")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "auto",
        kv_cache_memory: str | int = "1GiB",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        max_model_len: int | None = None,
        threads: int | None = None,
        device: str = "cpu",
        attention_backend: str = "auto",
        scheduling_policy: str = "fcfs",
        enforce_eager: bool = False,
        decode_graphs: str = "auto",
    ) -> None:
        """``enforce_eager`` (vLLM's name): no CUDA graphs, every step eager (``decode_graphs="off"``);
        ``decode_graphs``: auto (CUDA graphs for decode steps on a GPU), off, or padded (their padded static buffers
        without graphs, on any device)."""
        config = EngineConfig(
            model=model, dtype=dtype, device=device, threads=threads, max_model_len=max_model_len,
            attention_backend=attention_backend, decode_graphs="off" if enforce_eager else decode_graphs,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_size(kv_cache_memory),
                              num_blocks=num_kv_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      policy=scheduling_policy),
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one accumulated RequestOutput per prompt, in input order.

        Every prompt is validated before any runs: a bad one raises and nothing is queued.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(prompt_list)} prompts but {len(params_list)} sampling params")
        for p, sp in zip(prompt_list, params_list):
            self.engine.validate_prompt(self.engine.tokenize_prompt(p)[1], sp)
        ids = [f"gen-{next(self._ids)}" for _ in prompt_list]
        for rid, p, sp in zip(ids, prompt_list, params_list):
            self.engine.add_request(rid, p, sp)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate.

        ``continue_final_message``: the last message is left open and generation continues it (a prefilled start
        of the answer; needs ``add_generation_prompt=False``). ``chat_template_kwargs``: extra template variables."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c, add_generation_prompt,  # type: ignore[arg-type]
                                                             continue_final_message, chat_template_kwargs)
                   for c in convs]
        token_prompts: list[Prompt] = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(token_prompts, sampling_params, use_tqdm)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    acc = results.get(delta.request_id)
                    if acc is None:
                        acc = results[delta.request_id] = RequestOutput(
                            delta.request_id, delta.prompt, delta.prompt_token_ids, [], False, delta.metrics)
                    _merge(acc, delta)
                    if delta.finished:
                        bar.update(1)
        finally:
            bar.close()
        return [results[i] for i in ids]


def _merge(acc: RequestOutput, delta: RequestOutput) -> None:
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(d.index, "", [], None, [] if d.logprobs is not None else None)
            acc.outputs.append(c)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None and c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason = d.finish_reason
        c.stop_reason = d.stop_reason
    acc.outputs.sort(key=lambda c: c.index)
    acc.finished = delta.finished
    acc.metrics = delta.metrics
