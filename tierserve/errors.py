"""Typed, actionable errors: each names the value, the limit and, where there is one, the fix."""

from __future__ import annotations


class TierserveError(Exception):
    """Base class of every error tierserve raises on purpose."""


class InvalidRequestError(TierserveError, ValueError):
    """A request (prompt or sampling parameters) that can never be served as given.

    ``param`` names the offending field so the server can report it (OpenAI error bodies carry it).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt (plus the tokens asked for) exceeds the context length or the whole KV cache."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range or not a number."""


class ConfigError(TierserveError, ValueError):
    """An engine setting that cannot work (a zero budget, an unknown device, a context longer than the model's)."""


class ModelLoadError(TierserveError):
    """The model path, file or checkpoint cannot be loaded (missing, corrupt, unsupported)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture or tensor type is not supported."""


class OutOfKVCacheMemoryError(TierserveError):
    """The KV cache budget cannot hold even one maximal request."""
