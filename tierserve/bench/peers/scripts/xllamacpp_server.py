"""llama.cpp's native server from the prebuilt ``xllamacpp`` wheel (runs in its venv), with the flags of
``llama-server``: ``python xllamacpp_server.py --model GGUF --port P --threads N --parallel S --ctx-size C``.

The wheel runs llama.cpp's own HTTP server (slots, continuous batching) in-process; this script only fills its
``CommonParams`` and keeps the process alive until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading

import xllamacpp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-size", type=int, default=8192)
    args = p.parse_args()
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx_size
    params.cont_batching = True
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    print(f"xllamacpp {xllamacpp.__version__ if hasattr(xllamacpp, '__version__') else ''}: "
          f"{xllamacpp.get_system_info()}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    done.wait()
    del server


if __name__ == "__main__":
    main()
