"""Command line: ``tierserve generate | chat | serve | bench``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from tierserve import __version__
from tierserve.errors import TierserveError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
"""argparse type: an integer >= 1 (a zero step budget or block size cannot work)."""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m), a .gguf file or a Hugging Face folder with config.json and "
                        "*.safetensors (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 on CUDA or a CPU with AMX/AVX-512-BF16, else float32")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: the cores this process may run on)")
    g.add_argument("--kv-cache-memory", default="1GiB",
                   help="memory for the paged KV cache, e.g. 512MiB, 2GiB (default: %(default)s)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length limit, at most the model's own (default: the model's own)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="token budget of one engine step; longer prompts are prefilled in chunks "
                        "(default: %(default)s)")
    g.add_argument("--max-num-seqs", type=positive_int, default=128,
                   help="most requests running at once (default: %(default)s)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch", "reference", "triton"],
                   help="attention kernels: cpu = native paged kernels built on first use (K/V read in place), "
                        "torch = plain torch ops (any device), reference = the native model path with torch's SDPA "
                        "called per sequence as transformers does (bf16 tokens equal transformers-bf16's; slow, for "
                        "checking numerics), triton = torch's prefill with a Triton paged decode kernel (CUDA; "
                        "K/V read in place), auto = cpu on a CPU where the kernels build, else torch "
                        "(default: %(default)s)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run every step eagerly instead of replaying decode steps as CUDA graphs "
                        "(captured once per padded batch size and context width)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="order of admission and preemption (default: %(default)s)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, max_model_len=args.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                attention_backend=args.attention_backend, scheduling_policy=args.scheduling_policy,
                enforce_eager=args.enforce_eager)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierserve",
        description="tierserve: LLM inference and serving with a paged, tiered KV cache. "
                    "Run `tierserve <command> --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"tierserve {__version__}")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="DEBUG, INFO, WARNING, ERROR (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    from tierserve.engine.cli import register_chat, register_generate

    register_generate(sub)
    register_chat(sub)
    from tierserve.server.cli import register as register_serve

    register_serve(sub)
    from tierserve.bench.cli import register as register_bench

    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except TierserveError as e:  # a setting or input that cannot work: its message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
