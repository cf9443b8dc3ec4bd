"""Constrained decoding inside the batched engine: one llguidance matcher per constrained request.

Each step, the sampler asks every constrained request's matcher which tokens may come next, masks
the other logits of that request's row to -inf, samples as usual, and feeds the chosen token back to
the matcher. Unconstrained rows of the same batch are untouched, so constraints never fall back to
one request at a time.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from localvl.errors import InvalidRequestError
from localvl.prompt.grammar import TagIds


class Constraints:
    """The model's tokenizer as llguidance sees it (built once, on first use: ~1 s for Qwen's
    vocabulary) and the ids of the tags grammars refer to."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll: Any = None
        self._lock = threading.Lock()
        self.tags = TagIds.of(tokenizer)

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for ``grammar``; a grammar llguidance rejects (say, an unsupported JSON
        schema keyword) is the client's error."""
        import llguidance

        matcher = llguidance.LLMatcher(self._ll_tokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():  # its first line: the rest quotes the whole grammar, every schema in it
            reason = matcher.get_error().split("\n", 1)[0][:300]
            raise InvalidRequestError(f"the schema cannot be used to constrain the output: {reason}")
        return matcher


def allowed_tokens(matchers: list[Any], vocab_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``[len(matchers), vocab_size]`` bool on ``device`` (default CPU): the tokens each matcher admits next."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        llt.fill_next_token_bitmask(matcher, bitmask, row)
    return unpack_bitmask(bitmask, vocab_size, device or torch.device("cpu"))


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """llguidance's ``[rows, words]`` int32 bitmask (bit ``i`` of word ``j``: token ``32j + i``) as
    ``[rows, vocab_size]`` bool on ``device``.

    Read a byte at a time through a 256-entry table: shifting every word by 0..31 made a
    ``[rows, vocab, 32]`` intermediate, 20 ms for one row of Qwen's 151,936 tokens on a CPU core,
    every step of every constrained request. Only the packed bytes travel to a GPU."""
    rows = bitmask.shape[0]
    if sys.byteorder != "little":  # the bytes of a word in the other order: shift, the slow way
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.view(rows, -1)[:, :vocab_size].bool().to(device)
    table = _BYTE_BITS.get(device)
    if table is None:  # bit b of byte n (little-endian words): token 8n + b
        table = _BYTE_BITS[device] = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool().to(device)
    packed = bitmask.view(torch.uint8).flatten().to(device, non_blocking=True)
    return table.index_select(0, packed.int()).view(rows, -1)[:, :vocab_size]
