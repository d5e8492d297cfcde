"""Request bodies of the OpenAI-compatible API (pydantic), and their mapping to ``SamplingParams``.

Unknown fields are ignored, as OpenAI does. Types are checked here (a wrong type is a 400); value ranges are
checked once, by ``SamplingParams.validate``. Fields that would change the meaning of a request but are not
supported (``suffix``, ``logit_bias``, ``tools``, ...) are rejected with a 400 naming them, never silently dropped.
"""

from __future__ import annotations

import json
import typing
from typing import Any, ClassVar, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierserve.errors import InvalidRequestError
from tierserve.sampling_params import SamplingParams
from tierserve.server.errors import APIError, validation_error

Prompt = str | list[str] | list[int] | list[list[int]]


def _allows_none(annotation: Any) -> bool:
    """Whether a field's type takes None itself (``max_tokens: int | None``, where null means "no limit")."""
    return annotation is Any or annotation is None or type(None) in typing.get_args(annotation)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[dict[str, str]] = {}
    """Fields (not modelled) whose setting gets a 400 naming them: ``parse_body`` checks them."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit JSON null means the field's default, as OpenAI and vLLM take it (SDKs that send every field
        send ``"n": null``, ``"stream": null``, ...)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if not (v is None and k in fields and not _allows_none(fields[k].annotation))}
        return data


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with ``include_usage``, every chunk also carries the usage so far (not only the last one)."""


_UNSUPPORTED: dict[str, str] = {
    "guided_json": "guided decoding", "guided_regex": "guided decoding", "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding", "structured_outputs": "structured outputs",
    "allowed_token_ids": "allowed_token_ids", "bad_words": "bad_words", "use_beam_search": "beam search",
    "truncate_prompt_tokens": "prompt truncation", "prompt_logprobs": "prompt logprobs",
    "logits_processors": "logits processors", "return_tokens_as_token_ids": "return_tokens_as_token_ids",
}
"""Fields of vLLM's API that change what comes back, which this server does not implement: a request that sets one
(to anything but null / false / empty) gets a 400 naming it rather than an answer that silently ignores it."""

_UNSUPPORTED_CHAT: dict[str, str] = {
    "echo": "echo in chat completions", "chat_template": "a per-request chat template",
    "documents": "documents for the chat template",
}


def _reject_unsupported(data: dict[str, Any], table: dict[str, str]) -> None:
    for name, what in table.items():
        value = data.get(name)
        if not (value is None or value is False or (isinstance(value, (str, list, dict)) and not value)):
            raise InvalidRequestError(f"{name}: {what} is not supported by this server", param=name)


class _SamplingFields(_Body):
    """Fields shared by completions and chat; ``None`` means "the SamplingParams default"."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None
    priority: int = 0
    """vLLM's field: lower is served first under ``--scheduling-policy priority`` (ignored under fcfs)."""
    unsupported: ClassVar[dict[str, str]] = _UNSUPPORTED

    def _check_common(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server", param="logit_bias")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("only response_format type 'text' is supported by this server",
                                      param="response_format")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(f"best_of ({self.best_of}) != n ({self.n}) is not supported by this server",
                                      param="best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        optional: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            **{k: v for k, v in optional.items() if v is not None},
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def chunk_usage(self, usage: Any) -> dict[str, Any]:
        """The ``usage`` field of a streamed chunk that carries choices: absent without ``include_usage``, null
        with it, the usage so far with ``continuous_usage_stats`` too (vLLM's)."""
        if not self.include_usage:
            return {}
        assert self.stream_options is not None
        return {"usage": usage.to_dict() if self.stream_options.continuous_usage_stats else None}


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a string or a list of token ids each)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be an empty list", param="prompt")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo with logprobs needs prompt logprobs, which this server does not "
                                      "compute; drop one of them", param="echo")
        return self._params(self.max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template expects it: text parts joined by newlines (as vLLM does), and
        ``developer`` (OpenAI's new name for ``system``) as ``system``."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """vLLM's: the last message is left open (no end-of-turn after it) and the model continues it - a prefilled
    start of the answer. Needs ``add_generation_prompt`` false."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (vLLM's), e.g. a template's own switches."""
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    unsupported: ClassVar[dict[str, str]] = {**_UNSUPPORTED, **_UNSUPPORTED_CHAT}

    def to_sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.tools:
            raise InvalidRequestError("tools (function calling) are not supported by this server", param="tools")
        for name in ("functions", "function_call"):  # the legacy form of the same
            if getattr(self, name):
                raise InvalidRequestError(f"{name} (function calling) is not supported by this server", param=name)
        if self.tool_choice not in (None, "none", "auto"):  # "auto" with no tools means plain text, as OpenAI does
            raise InvalidRequestError("tool_choice needs tools (function calling), which this server does not support",
                                      param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                      param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        try:
            return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        except InvalidRequestError as e:
            if e.param == "max_tokens" and self.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            raise

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


class TokenizeRequest(_Body):
    """Exactly one of ``prompt`` (raw text) or ``messages`` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


Body = TypeVar("Body", bound=_Body)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """Read a JSON object into ``model``, whatever the Content-Type (curl -d sends a form type); 400 if it fails."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _reject_unsupported(data, model.unsupported)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
