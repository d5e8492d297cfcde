"""Incremental detokenization and stop-string handling for one completion.

Decoding token by token breaks multi-byte UTF-8 characters and BPE merges that change the text of earlier tokens,
so (like vLLM and TGI) we decode a sliding window: the text of ``tokens[prefix:]`` minus the text of
``tokens[prefix:read]``; while that ends in U+FFFD (an incomplete byte sequence), nothing is emitted. Text that
could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from tierserve.tokenizer import TokenizerWrapper


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerWrapper, stop: list[str], include_stop: bool, skip_special: bool) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special = skip_special
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        """All text decoded so far (may include held-back text)."""
        self.emitted = 0
        """Number of characters of ``text`` already handed out."""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token. Returns the stop string if one completed (text is then cut at it), else None. With
        ``check_stop`` False (``min_tokens`` not reached yet) the new text is not searched: as in vLLM, a stop string
        counts only once the minimum is met, and text before that stays whole."""
        self.tokens.append(token_id)
        prefix = self.tok.decode(self.tokens[self.prefix_offset:self.read_offset], self.skip_special)
        full = self.tok.decode(self.tokens[self.prefix_offset:], self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            start = max(0, len(self.text) - self.hold)
            self.text += new
            for s in self.stop if check_stop else ():
                idx = self.text.find(s, start)
                if idx != -1:
                    self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                    return s
        return None

    def flush(self, finished: bool) -> str:
        """New text safe to hand out now (all of it once the completion is finished)."""
        end = len(self.text) if finished or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
