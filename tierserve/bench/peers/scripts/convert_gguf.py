"""Convert a GGUF checkpoint to a dense safetensors folder (weights dequantized, then cast to ``DTYPE``) with
transformers, plus its tokenizer: ``python convert_gguf.py FILE.gguf OUT_DIR [DTYPE]``.

vLLM cannot serve this GGUF directly, and the transformers baseline should run dense weights, so both read the
folder this writes. transformers >= 5 keeps GGUF weights packed unless told ``GgufConfig(dequantize=True)``
(and then refuses ``save_pretrained``); older releases always dequantize.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(f"usage: {sys.argv[0]} FILE.gguf OUT_DIR [bfloat16|float32]")
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    dtype = getattr(torch, sys.argv[3] if len(sys.argv) == 4 else "bfloat16")
    kwargs = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
