"""Which sequences run in the next forward pass, and how many of their tokens (no torch).

Every step: running sequences first, in priority order, each with all its uncomputed tokens up to
the step's token budget (a decoding sequence needs one; a prefilling one takes a chunk); then
waiting sequences are admitted while budget, batch slots and KV blocks allow. When a decoding
sequence needs a block and none is free, the least urgent running sequence is preempted: its
blocks are freed and it waits to be recomputed (its registered prefix blocks usually survive in
the prefix cache, so recomputing is cheap). A waiting sequence more urgent than a running one
may preempt it too, so background work never holds interactive requests up.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from localvl.engine.blocks import BlockManager
from localvl.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Scheduled:
    sequence: Sequence
    start: int  # first token fed this step
    count: int
    samples: bool  # the chunk reaches the sequence's end: its last logits pick the next token

    @classmethod
    def of(cls, seq: Sequence, count: int) -> Scheduled:
        return cls(seq, seq.num_computed, count, seq.num_computed + count == len(seq))


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch_tokens: int, max_num_seqs: int) -> None:
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError("a step needs room for at least one token of one sequence")
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.running: list[Sequence] = []
        self._waiting: list[tuple[tuple[int, int], Sequence]] = []
        self.preemptions = 0

    @property
    def waiting(self) -> list[Sequence]:
        return [seq for _, seq in sorted(self._waiting, key=lambda item: item[0])]

    def sequences(self) -> list[Sequence]:
        """Every sequence, running then waiting, in no particular order (no sort: called every step)."""
        return [*self.running, *(seq for _, seq in self._waiting)]

    def __len__(self) -> int:
        return len(self.running) + len(self._waiting)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.order, seq))

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.table)
        elif seq.status is Status.WAITING:
            self._waiting = [item for item in self._waiting if item[1] is not seq]
            heapq.heapify(self._waiting)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.add(seq)

    def _least_urgent(self, exclude: set[int]) -> Sequence | None:
        candidates = [seq for seq in self.running if id(seq) not in exclude]
        return max(candidates, key=lambda seq: seq.order) if candidates else None

    def schedule(self) -> list[Scheduled]:
        batch: list[Scheduled] = []
        scheduled: set[int] = set()
        budget = self.max_batch_tokens
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            while not self.blocks.append_slot(seq.table, len(seq)):
                victim = self._least_urgent(scheduled) or seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            count = min(seq.uncomputed, budget)
            batch.append(Scheduled.of(seq, count))
            scheduled.add(id(seq))
            budget -= count

        while self._waiting and budget > 0:
            seq = self._waiting[0][1]
            admitted, preempted = self._admit(seq)
            for victim in preempted:  # a more urgent request took their place, in this step too
                for item in [b for b in batch if b.sequence is victim]:
                    batch.remove(item)
                    budget += item.count
            if not admitted:
                break
            heapq.heappop(self._waiting)
            count = min(seq.uncomputed, budget)
            batch.append(Scheduled.of(seq, count))
            budget -= count
        return batch

    def _admit(self, seq: Sequence) -> tuple[bool, list[Sequence]]:
        """Give a waiting sequence its blocks if it can have them; also return whom that preempted."""
        tokens = seq.tokens
        preempted: list[Sequence] = []
        while True:
            # Keep a block per running sequence spare, so admitting does not force decodes to preempt.
            reserve = min(len(self.running), self.blocks.num_blocks // 10)
            if len(self.running) < self.max_num_seqs and self.blocks.can_allocate(tokens, seq.images, reserve):
                break
            victim = self._least_urgent(set())
            if victim is None or victim.priority <= seq.priority:
                if not self.running and not self.blocks.can_allocate(tokens, seq.images):
                    raise MemoryError(f"sequence {seq.id} needs more KV-cache blocks than exist")
                return False, preempted
            self._preempt(victim)
            preempted.append(victim)
        seq.table = self.blocks.allocate(tokens, seq.images)
        if seq.preemptions == 0:  # usage reports what the first admission found
            seq.cache_read_tokens = seq.table.hashed * self.blocks.block_size
            seq.cache_settled_blocks = seq.table.hashed
        seq.num_computed = seq.table.hashed * self.blocks.block_size
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True, preempted

    def check(self) -> None:
        """Raise AssertionError if the block tables and the allocator disagree."""
        self.blocks.check([seq.table for seq in self.running])
        for seq in self.running:
            if len(seq.table.blocks) * self.blocks.block_size < seq.num_computed:
                raise AssertionError(f"{seq.id}: {seq.num_computed} computed tokens but only {len(seq.table.blocks)} blocks")
