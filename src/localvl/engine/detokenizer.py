"""Incremental detokenisation that never splits a character and never yields empty text.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character. Text is decoded
over a short window of recent tokens and released only once it no longer ends in an incomplete
character, so the concatenation of everything released equals the decoded whole (but for text
broken for ``MAX_HELD`` tokens on end, released as it stands).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from localvl.models.byte_level import bytes_to_unicode

_REPLACEMENT = "\ufffd"
# A character is at most 4 bytes, so at most 4 byte tokens: text still unfinished after this many
# held tokens is broken, not waiting for its end. Releasing it then keeps each step's decode short:
# held on, a model writing stray bytes for thousands of tokens (a logit bias can make it) would be
# decoded whole at every step, work growing with the square of its length in the engine's thread.
MAX_HELD = 16


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_token_ids: Iterable[int] = ()) -> None:
        self._decode = decoder(tokenizer)
        self._skip = frozenset(skip_token_ids)
        self._ids: list[int] = []
        self._prefix = 0  # window start: everything before it has been released
        self._read = 0  # tokens up to here have been released as text
        self._seen = ""  # the window's released part, decoded: it changes only when text is released

    def add(self, token_id: int) -> str:
        """Feed one generated token; return newly complete text (possibly "")."""
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        seen = self._seen
        text = self._decode(self._ids[self._prefix :])
        if text.endswith(_REPLACEMENT) or len(text) <= len(seen):
            return self.flush() if len(self._ids) - self._read >= MAX_HELD else ""
        self._prefix, self._read = self._read, len(self._ids)
        self._seen = self._decode(self._ids[self._prefix : self._read])
        return text[len(seen) :]

    def flush(self) -> str:
        """Whatever is still held at the end of generation (an incomplete character decodes as U+FFFD)."""
        seen = self._seen
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self._seen = ""
        return text[len(seen) :] if len(text) > len(seen) else ""


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode`` of ids as they are (special tokens spelled out, no clean-up).

    A transformers tokenizer backed by the ``tokenizers`` library is decoded by that library
    directly: the same text without transformers' per-call Python (~10 µs a call on this project's
    CPU machine, two calls per generated token).
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the slow path is still right
        TokenizersBackend = PreTrainedTokenizerBase = None  # type: ignore[assignment,misc]
    cls = type(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        TokenizersBackend is not None
        and isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
        and backend is not None
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every added token marked special: what ``decode(skip_special_tokens=True)`` drops.

    (``all_special_ids`` lists only the named ones such as eos and pad, not ``<|im_start|>``.)
    """
    ids = {int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return frozenset(ids | set(tokenizer.all_special_ids))


BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}  # stand-in → byte


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes one token stands for (a multi-byte character may span tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if token_id in added:
        return str(added[token_id].content).encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and all(ch in BYTE_LEVEL for ch in piece):
        return bytes(BYTE_LEVEL[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")
