"""LLMEngine: the incremental engine (``add_request`` / ``step`` / ``abort``), one step at a time.

Each step is three calls: ``Scheduler.schedule()`` decides, ``ModelRunner.execute()`` computes and samples, and
``_update()`` appends tokens, detokenizes incrementally, checks stop conditions and returns per-request deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from tierserve.config import EngineConfig
from tierserve.core.kv_cache_manager import KVCacheManager
from tierserve.core.scheduler import Scheduler, SchedulerOutput
from tierserve.engine.detokenizer import IncrementalDetokenizer
from tierserve.errors import ConfigError, InvalidRequestError, OutOfKVCacheMemoryError, PromptTooLongError
from tierserve.model_executor.loaders import load_checkpoint
from tierserve.model_executor.model_runner import ModelRunner, ModelRunnerOutput
from tierserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from tierserve.request import Request, RequestStatus
from tierserve.sampling_params import SamplingParams
from tierserve.utils.cpu import cpu_info, resolve_dtype, set_threads

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


@dataclass
class _Parent:
    """A user request; ``n > 1`` fans out into child requests that share it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request] = field(default_factory=list)
    detoks: list[IncrementalDetokenizer] = field(default_factory=list)
    arrival_time: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.num_threads = set_threads(config.threads) if config.device == "cpu" else torch.get_num_threads()
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.device = torch.device(config.device)
        info = cpu_info()
        logger.info("device=%s dtype=%s threads=%d cpu=%r amx=%s avx512_bf16=%s", config.device, self.dtype,
                    self.num_threads, info.model_name, info.has_amx, info.has_avx512_bf16)
        ckpt = load_checkpoint(config.model, self.dtype)
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.model_path = ckpt.path
        own = ckpt.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > own:  # (vLLM refuses it too)
            raise ConfigError(f"--max-model-len {config.max_model_len} is longer than the model's context of {own} "
                              "tokens (positions beyond it were never trained); leave it unset or lower it")
        self.max_model_len = config.max_model_len or own
        self.runner = ModelRunner(ckpt.config, config.cache, ckpt.tensors, self.dtype, self.device,
                                  self.max_model_len, config.attention_backend, config.decode_graphs,
                                  config.scheduler.max_num_seqs)
        del ckpt
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size)
        capacity = self.kv.num_blocks * self.kv.block_size
        if self.max_model_len > capacity:
            if config.max_model_len is not None:
                raise OutOfKVCacheMemoryError(
                    f"--max-model-len {self.max_model_len} needs {self.max_model_len} tokens of KV cache but "
                    f"--kv-cache-memory holds {capacity} tokens; raise --kv-cache-memory or lower --max-model-len")
            logger.warning("the KV cache holds %d tokens, less than the model's context of %d: capping "
                           "max_model_len to %d (raise --kv-cache-memory for more)", capacity, self.max_model_len,
                           capacity)
            self.max_model_len = capacity
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---------------------------------------------------------------- requests
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param="prompt")

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check a prompt can be served; returns the effective max_tokens."""
        n = len(token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: it must contain at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range for vocabulary size {vocab}", param="prompt")
        bad = next((t for t in params.stop_token_ids or [] if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"stop token id {bad} is out of range for vocabulary size {vocab}",
                                      param="stop_token_ids")
        limit = self.max_model_len
        if n >= limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {n} tokens "
                f"(no room left to generate); shorten the prompt", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, you requested {n + max_tokens} "
                f"tokens ({n} in the prompt, {max_tokens} in the completion); reduce the prompt or max_tokens",
                param="max_tokens")
        capacity = self.kv.num_blocks * self.kv.block_size
        if not self.kv.can_ever_fit(n + max_tokens):
            raise PromptTooLongError(
                f"the request needs up to {n + max_tokens} tokens of KV cache but the whole cache holds {capacity} "
                f"tokens; raise --kv-cache-memory or lower max_tokens", param="max_tokens")
        return max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequestError / PromptTooLongError at once if it can never be served."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        text, token_ids = self.tokenize_prompt(prompt)
        max_tokens = self.validate_prompt(token_ids, params)
        now = arrival_time if arrival_time is not None else time.monotonic()
        parent = _Parent(request_id, text, token_ids, arrival_time=now)
        for i in range(params.n):  # every child is built before any is queued: a failure leaves nothing behind
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = SamplingParams(**{**params.__dict__, "seed": params.seed + i, "n": 1})
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(cid, token_ids, child_params, max_tokens, self.eos_token_ids, prompt=text,
                          priority=priority, arrival_time=now, parent_id=request_id, index=i)
            parent.children.append(req)
            assert isinstance(child_params.stop, list)
            parent.detoks.append(IncrementalDetokenizer(self.tokenizer, child_params.stop,
                                                        child_params.include_stop_str_in_output,
                                                        child_params.skip_special_tokens))
        for req in parent.children:
            self._child_parent[req.request_id] = request_id
            self.scheduler.add(req)
        self._parents[request_id] = parent

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is unknown or already finished."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        for req in parent.children:
            self._child_parent.pop(req.request_id, None)
            if not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.usage,
                           self.kv.pool.num_free_blocks, self.kv.num_blocks, self.scheduler.num_preemptions,
                           self.prompt_tokens_total, self.generation_tokens_total)

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns deltas for the requests that produced text or finished."""
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        result = self.runner.execute(sched)
        return self._update(sched, result)

    def _update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        for s in sched.scheduled:
            r = s.request
            if r.num_computed_tokens < r.num_prompt_tokens:
                self.prompt_tokens_total += min(s.num_new_tokens, r.num_prompt_tokens - r.num_computed_tokens)
            r.num_computed_tokens += s.num_new_tokens
        so = result.sampler_output
        now = time.monotonic()
        deltas: dict[str, dict[int, CompletionOutput]] = {}
        for i, req in enumerate(result.sampled_requests):
            token = so.token_ids[i]
            req.append_token(token)
            self.generation_tokens_total += 1
            if req.first_token_time is None:
                req.first_token_time = now
            parent = self._parents[req.parent_id or req.request_id]
            detok = parent.detoks[req.index]
            lp: PositionLogprobs | None = None
            top = so.top_logprobs[i]
            if top is not None and so.sampled_logprobs is not None:
                req.cumulative_logprob += so.sampled_logprobs[i]
                lp = {}
                for tid, val, rank in top:
                    if tid not in lp:
                        lp[tid] = Logprob(val, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
            status, stop_reason = self._check_stop(req, token, detok)
            if status is not None:
                req.stop_reason = stop_reason
                self.scheduler.finish(req, status)
            text = detok.flush(req.is_finished)
            deltas.setdefault(parent.request_id, {})[req.index] = CompletionOutput(
                index=req.index, text=text, token_ids=[token],
                cumulative_logprob=req.cumulative_logprob if lp is not None else None,
                logprobs=[lp] if lp is not None else None,
                finish_reason=req.status.value if req.is_finished else None, stop_reason=req.stop_reason)
        return [self._make_output(pid, outs, now) for pid, outs in deltas.items()]

    def _check_stop(self, req: Request, token: int,
                    detok: IncrementalDetokenizer) -> tuple[RequestStatus | None, int | str | None]:
        sp = req.sampling_params
        min_ok = req.num_output_tokens >= sp.min_tokens
        if min_ok and not sp.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if min_ok and sp.stop_token_ids and token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
        hit = detok.add(token, check_stop=min_ok) if not (token in req.eos_token_ids and not sp.ignore_eos) else None
        if hit is not None:
            return RequestStatus.FINISHED_STOPPED, hit
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _make_output(self, parent_id: str, outs: dict[int, CompletionOutput], now: float) -> RequestOutput:
        parent = self._parents[parent_id]
        finished = all(c.is_finished for c in parent.children)
        first = min((c.first_token_time for c in parent.children if c.first_token_time), default=None)
        metrics = RequestMetrics(parent.arrival_time, first, now if finished else None,
                                 sum(c.num_preemptions for c in parent.children))
        if finished:
            del self._parents[parent_id]
            for c in parent.children:
                self._child_parent.pop(c.request_id, None)
        return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids,
                             [outs[i] for i in sorted(outs)], finished, metrics)
