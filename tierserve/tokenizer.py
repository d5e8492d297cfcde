"""Tokenizer: a `tokenizers` object plus the model's chat template, from GGUF metadata or a HF folder."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tierserve.errors import InvalidRequestError, ModelLoadError

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (the names llama.cpp's converter writes).
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_PATTERNS = {"llama-bpe": _LLAMA3_PAT, "llama3": _LLAMA3_PAT, "qwen2": _QWEN2_PAT, "smaug-bpe": _LLAMA3_PAT}
_DIGIT_SPLIT = {"smollm", "starcoder", "refact"}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class TokenizerWrapper:
    """Encode, decode and render chat templates. ``tokenizer`` is a ``tokenizers.Tokenizer``."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_ids = eos_token_ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone UTF-16 surrogate (JSON "\ud83d" alone) is not text
                    raise InvalidRequestError(
                        f"the text is not valid Unicode: {e.reason} at character {e.start} "
                        f"({text[e.start:e.end]!a})", param="prompt") from None
            raise

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's jinja2 chat template."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )


def _raise_template_error(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {message}", param="messages")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def tokenizer_from_gguf(reader: Any) -> TokenizerWrapper:
    """Build a byte-level BPE (`tokenizer.ggml.model` == "gpt2") tokenizer from GGUF vocabulary and merges."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is); "
            "use the model's Hugging Face folder with tokenizer.json instead"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges_raw: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = [(a, b) for a, b in (m.split(" ", 1) for m in merges_raw)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pattern = _PRE_PATTERNS.get(pre, _GPT2_PAT)
    splits: list[Any] = []
    if pre in _DIGIT_SPLIT:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False))
    splits.append(byte_level)
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, ty in enumerate(types)
        if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_special_tokens(special)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    eos_ids = [int(eos_id)] if eos_id is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    return TokenizerWrapper(tok, _field(reader, "tokenizer.chat_template"), bos, eos, eos_ids)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def tokenizer_from_hf_dir(path: Path, eos_token_ids: list[int]) -> TokenizerWrapper:
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise ModelLoadError(f"{path} has no tokenizer.json (tierserve reads the fast-tokenizer format)")
    tok = Tokenizer.from_file(str(tj))
    cfg: dict[str, Any] = {}
    tc = path / "tokenizer_config.json"
    if tc.exists():
        cfg = json.loads(tc.read_text())
    template = cfg.get("chat_template")
    ct = path / "chat_template.jinja"
    if template is None and ct.exists():
        template = ct.read_text()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    bos = _token_str(cfg.get("bos_token"))
    eos = _token_str(cfg.get("eos_token"))
    ids = list(eos_token_ids)
    if eos is not None:
        eid = tok.token_to_id(eos)
        if eid is not None and eid not in ids:
            ids.append(eid)
    return TokenizerWrapper(tok, template, bos, eos, ids)
