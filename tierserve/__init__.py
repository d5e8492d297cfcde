"""tierserve: an LLM inference and serving engine that manages KV memory like an operating system."""

import os

# OpenMP worker threads spin briefly between parallel regions, then sleep. A decode step is hundreds of short
# parallel ops back to back: sleeping at once (OMP_WAIT_POLICY=PASSIVE) pays a futex wake-up per op (small ops
# several times slower), while libgomp's default spin (300k rounds) or ACTIVE keep spinning when another process (a
# benchmark client) needs the core. A short spin keeps both. Must be set before torch loads libgomp; the user's own
# settings win.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from tierserve.engine.llm import LLM
from tierserve.engine.llm_engine import LLMEngine
from tierserve.outputs import CompletionOutput, Logprob, RequestOutput
from tierserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
