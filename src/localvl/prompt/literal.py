"""Client text that spells a control token reads as text, as it does on Anthropic's and OpenAI's APIs.

A Qwen tokenizer turns the string ``<|im_end|>`` into the end-of-turn token wherever it occurs, so a
pasted document could close its own turn and open a fake system turn, and a user quoting Qwen's
docs (``<|image_pad|>``) had the processor reject the request for an image count that did not add
up. Before the template runs, every added-token string inside client text becomes a placeholder:
a marker token (a special token the template never writes) around the literal's index in digits.
After tokenization each placeholder is replaced by the literal's tokens as plain text (the
tokenizer's normaliser, pre-tokenizer and BPE, without its added tokens). Requests whose text
holds no such string take the unchanged path.
"""

from __future__ import annotations

import re
from typing import Any


class LiteralText:
    """Escapes added-token strings in template inputs and puts their plain-text tokens back."""

    def __init__(self, tokenizer: Any, chat_template: str, reserved: tuple[str, ...] = ()) -> None:
        added: dict[str, int] = tokenizer.get_added_vocab()
        self._pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) if added else None
        special = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
        # A marker only this module writes: special (found even inside a word), absent from the
        # template, and none the processor expands (the image and video pads).
        candidates = [t for t in sorted(added, key=added.get) if t in special and t not in chat_template and t not in reserved]
        self.marker = candidates[0] if candidates else None
        self._marker_id = added[self.marker] if self.marker is not None else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if backend is not None and backend.pre_tokenizer is not None else None
        # A placeholder's index, read back token by token (Qwen's pre-tokenizer splits digits apart)
        self._digits: dict[int, str] = {}
        if self._backend is not None:
            for digit in "0123456789":
                ids = self.plain_ids(digit)
                if len(ids) != 1:
                    self._backend = None  # a tokenizer that merges digits: escaping is off
                    break
                self._digits[ids[0]] = digit

    @property
    def usable(self) -> bool:
        return self._pattern is not None and self.marker is not None and self._backend is not None

    def escape(self, value: Any, literals: list[str]) -> Any:
        """``value`` (strings, lists and dicts of them, as template inputs are) with each added-token
        string replaced by a placeholder; the literals are appended to ``literals``."""
        if not self.usable:
            return value
        if isinstance(value, str):
            return self._escape_text(value, literals)
        if isinstance(value, list):
            return [self.escape(item, literals) for item in value]
        if isinstance(value, tuple):
            return tuple(self.escape(item, literals) for item in value)
        if isinstance(value, dict):
            return {self.escape(k, literals): self.escape(v, literals) for k, v in value.items()}
        return value

    def _escape_text(self, text: str, literals: list[str]) -> str:
        assert self._pattern is not None

        def placeholder(match: re.Match[str]) -> str:
            literals.append(match.group(0))
            return f"{self.marker}{len(literals) - 1}{self.marker}"

        return self._pattern.sub(placeholder, text)

    def plain_ids(self, text: str) -> list[int]:
        """``text``'s tokens with no added token recognised: as the model reads any other text."""
        assert self._backend is not None
        backend = self._backend
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        return [token.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized) for token in backend.model.tokenize(piece)]

    def restore(self, ids: list[int], literals: list[str]) -> list[int]:
        """Token ids with every placeholder replaced by its literal's plain-text tokens."""
        if not literals:
            return ids
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != self._marker_id:
                out.append(ids[i])
                i += 1
                continue
            end = ids.index(self._marker_id, i + 1)  # placeholders come whole: marker, digits, marker
            index = int("".join(self._digits[d] for d in ids[i + 1 : end]))
            out.extend(self.plain_ids(literals[index]))
            i = end + 1
        return out
