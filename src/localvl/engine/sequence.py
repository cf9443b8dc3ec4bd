"""One request as the scheduler sees it: tokens, how many are computed, its blocks (no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from localvl.engine.blocks import BlockTable, ImageSpan

INTERACTIVE = 0  # priorities: lower runs first
BACKGROUND = 10

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens ``[0, num_computed)`` have keys and values in the cache; the rest are fed next.

    A running sequence whose only uncomputed token is its last sampled one is decoding; one with
    more is prefilling (a new prompt, or the whole history again after a preemption).
    """

    id: str
    prompt: list[int]
    images: tuple[ImageSpan, ...] = ()
    max_new_tokens: int = 16
    priority: int = INTERACTIVE
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    table: BlockTable = field(default_factory=BlockTable)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    preemptions: int = 0
    cache_read_tokens: int = 0  # prompt tokens the prefix cache supplied at first admission
    cache_created_tokens: int = 0  # prompt tokens this sequence added to the prefix cache
    cache_settled_blocks: int = 0  # leading blocks its usage counts (read or created): never counted twice
    payload: Any = None  # the engine's per-request state (sampling, detokenizer, event queue)

    @property
    def tokens(self) -> list[int]:
        """Prompt and outputs (a new list when there are outputs: prefer ``token``/``span`` per step)."""
        return self.prompt + self.outputs if self.outputs else self.prompt

    def token(self, index: int) -> int:
        length = len(self.prompt)
        return self.prompt[index] if index < length else self.outputs[index - length]

    def span(self, start: int, end: int) -> list[int]:
        length = len(self.prompt)
        if end <= length:
            return self.prompt[start:end]
        if start >= length:
            return self.outputs[start - length : end - length]
        return self.prompt[start:] + self.outputs[: end - length]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.outputs)

    @property
    def uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def order(self) -> tuple[int, int]:
        return (self.priority, self.arrival)
