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



def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 byte values (GPT-2's scheme): printable Latin-1 bytes stand
    for themselves, the others take the code points from 256 up, in byte order. -> character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF = _byte_level_alphabet()
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
        self._bytes: dict[int, bytes] = {}
        added = tokenizer.get_added_tokens_decoder()
        self._added = set(added)
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        """Tokens ``decode(skip_special_tokens=True)`` leaves out of the text."""
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for. A token may hold part of a UTF-8 character (an emoji is often
        three tokens), where ``decode([token_id])`` can only show U+FFFD: OpenAI's logprob ``bytes`` are these."""
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._token_bytes(token_id)
        return found

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added:
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's jinja2 chat template.

        ``continue_final_message``: leave the last message open - the text ends with its content, without the
        end-of-turn the template puts after it - so that generation continues it (a prefilled start of an answer;
        Hugging Face's and vLLM's option of that name). It excludes ``add_generation_prompt``. ``template_kwargs``:
        extra template variables (vLLM's ``chat_template_kwargs``)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true (set "
                                      "add_generation_prompt to false)", param="continue_final_message")
        kwargs = dict(template_kwargs or {})
        reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & kwargs.keys()
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs may not set {sorted(reserved)}",
                                      param="chat_template_kwargs")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            self._template = env.from_string(self.chat_template)
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except (TypeError, jinja2.TemplateError) as e:  # e.g. a content that is not text: the template's + fails
            raise InvalidRequestError(f"the chat template cannot render these messages ({type(e).__name__}: {e}); "
                                      "each message's content must be text", param="messages") from None
        return _open_final_message(text, messages[-1].get("content")) if continue_final_message else text

def _open_final_message(text: str, content: Any) -> str:
    """``text`` cut right after the last occurrence of the final message's content (stripped, if the template
    strips it): what follows it there is the template's end of that turn."""
    if not isinstance(content, str) or not content.strip():
        raise InvalidRequestError("continue_final_message needs a last message with text to continue",
                                  param="messages")
    for piece in (content, content.strip()):
        at = text.rfind(piece)
        if at >= 0:
            return text[: at + len(piece)]
    raise InvalidRequestError("continue_final_message: the chat template does not reproduce the last message's text",
                              param="messages")


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
