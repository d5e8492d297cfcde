"""A plain transformers baseline behind a minimal OpenAI-style server: one request at a time, no batching.

``python hf_server.py --model-dir DIR --port P --threads N [--dtype bfloat16] [--served-model-name NAME]``

Serves ``GET /health``, ``GET /v1/models`` and streaming or plain ``POST /v1/completions`` (``prompt`` as text,
``max_tokens``, ``temperature``, ``ignore_eos``, ``stream_options.include_usage``). Requests are accepted
concurrently but generated strictly one after another (a lock), the way a script that calls ``generate`` serves
users: time spent queueing counts in TTFT. Decoding is a KV-cached loop over the model's forward, one token
per step, so every token streams as soon as it exists. Stand-alone: imports nothing from tierserve.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

LOCK = threading.Lock()


class Engine:
    def __init__(self, model_dir: str, dtype: str, name: str) -> None:
        self.name = name
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.eos = self.tok.eos_token_id

    def tokens(self, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool) -> Any:
        """Yield token ids, one per forward step (greedy when ``temperature`` is 0)."""
        ids = torch.tensor([self.tok(prompt).input_ids])
        past = None
        with torch.inference_mode():
            for _ in range(max_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                if temperature > 0:
                    nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
                else:
                    nxt = int(logits.argmax())
                yield nxt
                if nxt == self.eos and not ignore_eos:
                    return
                ids = torch.tensor([[nxt]])


class Handler(BaseHTTPRequestHandler):
    engine: Engine
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.engine.name, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            self._json(404, {"error": {"message": f"no route {self.path}; only /v1/completions"}})
            return
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if not isinstance(req.get("prompt"), str):
            self._json(400, {"error": {"message": "prompt must be a string"}})
            return
        args = (req["prompt"], int(req.get("max_tokens") or 16), float(req.get("temperature") or 0.0),
                bool(req.get("ignore_eos", False)))
        with LOCK:
            if req.get("stream"):
                self._stream(*args, include_usage=bool((req.get("stream_options") or {}).get("include_usage")))
            else:
                ids = list(self.engine.tokens(*args))
                self._json(200, self._chunk(self.decode(ids), self._usage(req["prompt"], len(ids))))

    def decode(self, ids: list[int]) -> str:
        return str(self.engine.tok.decode(ids))

    def _usage(self, prompt: str, num_out: int) -> dict[str, int]:
        num_in = len(self.engine.tok(prompt).input_ids)
        return {"prompt_tokens": num_in, "completion_tokens": num_out, "total_tokens": num_in + num_out}

    def _chunk(self, text: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": self.engine.name, "choices": choices, "usage": usage}

    def _send_event(self, obj: Any) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool,
                include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ids: list[int] = []
        sent = ""
        for tid in self.engine.tokens(prompt, max_tokens, temperature, ignore_eos):
            ids.append(tid)
            text = self.decode(ids)
            if not text.endswith("\ufffd") and len(text) > len(sent):
                self._send_event(self._chunk(text[len(sent):]))
                sent = text
        if include_usage:
            self._send_event(self._chunk(None, self._usage(prompt, len(ids))))
        self._send_event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--served-model-name", default="transformers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Handler.engine = Engine(args.model_dir, args.dtype, args.served_model_name)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"transformers baseline serving {args.model_dir} ({args.dtype}, {args.threads} threads) "
          f"on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
