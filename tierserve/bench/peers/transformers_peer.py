"""A plain Hugging Face transformers baseline, for reference: one request at a time when served
(``scripts/hf_server.py``), ``generate`` in batches of 16 offline (``scripts/hf_offline.py``).

It runs with the project's own interpreter, whose test dependencies already hold transformers; nothing is
installed for it except the safetensors copy of the weights (``weights.py``), shared with vLLM. Its dtype is the
faster one on the CPU: bfloat16 with native bf16 (AMX or AVX-512-BF16), else float32.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tierserve.bench.peers.base import SCRIPTS, Peer
from tierserve.bench.peers.weights import ensure_converted, is_converted, model_dir


def fastest_dtype() -> str:
    from tierserve.utils.cpu import cpu_info

    return "bfloat16" if cpu_info().native_bf16 else "float32"


class TransformersPeer(Peer):
    name = "transformers"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed in the project's environment; run: pip install -e '.[test]'"
        if not is_converted(self.settings):
            return f"no safetensors copy of the model at {model_dir(self.settings)}; " \
                   "run: bash scripts/peers/install.sh transformers"
        return None

    def install(self) -> None:
        ensure_converted(self.settings, self.root / "models" / "convert.log")

    def server_command(self, port: int, threads: int) -> list[str]:
        return [sys.executable, str(SCRIPTS / "hf_server.py"), "--model-dir", str(model_dir(self.settings)),
                "--port", str(port), "--threads", str(threads), "--dtype", fastest_dtype(),
                "--served-model-name", self.settings.model]

    def offline_command(self, spec_path: Path, out_path: Path) -> list[str]:
        return [sys.executable, str(SCRIPTS / "hf_offline.py"), str(spec_path), str(out_path)]

    def describe(self) -> dict[str, str]:
        import transformers

        return {"version": f"transformers {transformers.__version__}",
                "weights": f"safetensors {fastest_dtype()} (dequantized from the GGUF); served one request at "
                           "a time; offline batch 16"}
