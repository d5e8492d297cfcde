"""tierserve: an LLM inference and serving engine that manages KV memory like an operating system."""

from tierserve.engine.llm import LLM
from tierserve.engine.llm_engine import LLMEngine
from tierserve.outputs import CompletionOutput, Logprob, RequestOutput
from tierserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
