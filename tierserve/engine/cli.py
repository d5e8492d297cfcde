"""`tierserve generate` and `tierserve chat`: streaming text generation in the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tierserve.errors import PromptTooLongError, TierserveError
from tierserve.sampling_params import SamplingParams


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _stream(engine: Any, request_id: str, prompt: str | list[int], params: SamplingParams) -> str:
    engine.add_request(request_id, prompt, params)
    text = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                if c.text:
                    sys.stdout.write(c.text)
                    sys.stdout.flush()
                    text.append(c.text)
    return "".join(text)


def _engine(args: argparse.Namespace) -> Any:
    from tierserve.cli import engine_kwargs
    from tierserve.engine.llm import LLM

    return LLM(**engine_kwargs(args)).engine


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        params = _params(args)  # (checked before the model loads)
        engine = _engine(args)
        prompt: str | list[int] = args.prompt
        if not args.raw:
            prompt = engine.tokenizer.encode(
                engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]),
                add_special_tokens=False)
        _stream(engine, "cli-0", prompt, params)
    except TierserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)  # (a bad flag stops here - main() prints it, exit 2 - not on every turn)
    engine = _engine(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("tierserve chat — type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_special_tokens=False)
            reply = _stream(engine, f"chat-{turn}", prompt, params)
        except TierserveError as e:
            hint = (" - the conversation no longer fits the context: /reset clears the history"
                    if isinstance(e, PromptTooLongError) and len(messages) > 1 else "")
            print(f"\nerror: {e}{hint}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def register_generate(sub: Any) -> None:
    from tierserve.cli import add_engine_args, add_sampling_args

    p = sub.add_parser("generate", help="generate a reply to one prompt, streamed to the terminal",
                       description="Generate text for PROMPT and stream it to stdout. By default the prompt is "
                                   "wrapped in the model's chat template as a user message; --raw sends it as is.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text, without the chat template")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def register_chat(sub: Any) -> None:
    from tierserve.cli import add_engine_args, add_sampling_args

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal",
                       description="Chat with the model; each turn is sent with the whole history through the chat "
                                   "template. Commands: /reset, /exit.")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
