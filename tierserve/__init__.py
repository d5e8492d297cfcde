"""tierserve: an LLM inference and serving engine that manages KV memory like an operating system."""

import os

# OpenMP threads that spin while waiting stall parallel ops badly as soon as another process (a benchmark client)
# takes a core; passive waiting avoids that at some cost on an idle machine (BENCHMARKS.md). Must be set before
# torch loads libgomp; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tierserve.engine.llm import LLM
from tierserve.engine.llm_engine import LLMEngine
from tierserve.outputs import CompletionOutput, Logprob, RequestOutput
from tierserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
