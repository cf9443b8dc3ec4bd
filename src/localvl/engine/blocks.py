"""The KV-cache block allocator: which pool blocks hold which sequence's keys and values.

Pure bookkeeping (no torch): the pool itself lives in ``kv_cache.py``. A block holds
``block_size`` consecutive tokens of one sequence. Full blocks whose keys and values have been
computed are registered under a chained hash of everything up to and including them (token ids
and the content keys of any image inside), so a later sequence with the same prefix maps the
same blocks instead of recomputing them. Freed blocks keep their hash until they are reused, so a
prefix stays hittable for as long as memory allows.

Sequences that compute one prefix at the same time (``n`` choices, identical concurrent requests)
each hold a copy. One copy is published; the others are kept as its stand-ins, so the prefix
stays hittable while any copy lives, and a freed stand-in is the first block reused.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class ImageSpan:
    """An image's tokens in a sequence: ``[start, start + length)``, keyed by the image's content."""

    start: int
    length: int
    key: str

    @property
    def end(self) -> int:
        return self.start + self.length


def chain_hash(previous: bytes, tokens: Sequence[int], image_keys: Sequence[str]) -> bytes:
    """The hash of one full block given the hash of the block before it."""
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for key in image_keys:  # image tokens all share one id: the picture itself must be in the hash
        h.update(b"|" + key.encode())
    return h.digest()


def block_hashes(
    tokens: Sequence[int], images: Sequence[ImageSpan], block_size: int, count: int, first: int = 0, previous: bytes = b""
) -> list[bytes]:
    """Chained hashes of full blocks ``first`` to ``count - 1`` of ``tokens``, ``previous`` being
    the hash of block ``first - 1``."""
    hashes: list[bytes] = []
    for index in range(first, count):
        start, end = index * block_size, (index + 1) * block_size
        keys = [f"{span.key}@{start - span.start}" for span in images if span.start < end and span.end > start]
        previous = chain_hash(previous, tokens[start:end], keys)
        hashes.append(previous)
    return hashes


@dataclass
class _Block:
    ref_count: int = 0
    hash: bytes | None = None


@dataclass
class BlockTable:
    """One sequence's blocks, and how much of it the prefix cache supplied or it registered."""

    blocks: list[int] = field(default_factory=list)
    hashed: int = 0  # leading blocks known computed: found in the prefix cache or registered since
    tail: bytes = b""  # the chained hash of block ``hashed - 1``: registering goes on from there


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, resumable: set[bytes] | None = None) -> None:
        """``resumable``: a hybrid decoder's, whose sequences also carry state that blocks alone
        cannot restore: a cached prefix is reused only up to a block whose hash is in it (a state
        snapshot was kept there, ``linear_attention.py``). The set is its owner's to change."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.resumable = resumable
        self.block_size = block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        # Free blocks, least recently freed first (dict order; O(1) removal when a hit revives one).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self._copies: dict[bytes, set[int]] = {}  # unpublished blocks holding a published hash's content

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:  # its old content is about to be overwritten
            copies = self._copies.get(block.hash)
            if self._by_hash.get(block.hash) == block_id:
                if copies:  # another block holds the same content: the prefix stays hittable
                    self._by_hash[block.hash] = copies.pop()
                else:
                    del self._by_hash[block.hash]
            elif copies is not None:
                copies.discard(block_id)
            if copies is not None and not copies:
                del self._copies[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def cached_prefix(self, tokens: Sequence[int], images: Sequence[ImageSpan]) -> list[int]:
        """The pool blocks already holding this prompt's leading full blocks.

        The block holding the last token is never taken from the cache: its logits are needed, so
        it is always computed.
        """
        usable = (len(tokens) - 1) // self.block_size
        found: list[int] = []
        digests: list[bytes] = []
        for digest in block_hashes(tokens, images, self.block_size, usable):
            block_id = self._by_hash.get(digest)
            if block_id is None:
                break
            found.append(block_id)
            digests.append(digest)
        if self.resumable is not None:
            while digests and digests[-1] not in self.resumable:
                digests.pop()
                found.pop()
        return found

    def can_allocate(self, tokens: Sequence[int], images: Sequence[ImageSpan], reserve: int = 0) -> bool:
        hits = self.cached_prefix(tokens, images)
        reusable_free = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        needed = self.blocks_for(len(tokens)) - len(hits)
        return needed + reusable_free + reserve <= self.free_blocks

    def allocate(self, tokens: Sequence[int], images: Sequence[ImageSpan]) -> BlockTable:
        """Blocks for every token of a new (or re-admitted) sequence, reusing cached prefix blocks."""
        if not self.can_allocate(tokens, images):
            raise MemoryError("not enough free KV-cache blocks")
        hits = self.cached_prefix(tokens, images)
        for block_id in hits:
            self._acquire(block_id)
        tail = self._blocks[hits[-1]].hash or b"" if hits else b""
        table = BlockTable(blocks=list(hits), hashed=len(hits), tail=tail)
        while len(table.blocks) < self.blocks_for(len(tokens)):
            table.blocks.append(self._take_free())
        return table

    def append_slot(self, table: BlockTable, length: int) -> bool:
        """Make room for a sequence growing to ``length`` tokens; False if no block is free."""
        while len(table.blocks) < self.blocks_for(length):
            if not self._free:
                return False
            table.blocks.append(self._take_free())
        return True

    def register(
        self,
        table: BlockTable,
        tokens: Sequence[int],
        images: Sequence[ImageSpan],
        computed: int,
        prompt_length: int,
        *,
        settled: int = 0,
    ) -> int:
        """Publish the hashes of full blocks whose keys and values are now computed.

        Returns how many prompt tokens this newly added to the prefix cache, from block ``settled``
        on: a preempted sequence recomputes blocks its usage already counts, as read or as created.
        """
        full = min(computed // self.block_size, len(table.blocks))
        if full <= table.hashed:
            return 0
        created = 0
        hashes = block_hashes(tokens, images, self.block_size, full, table.hashed, table.tail)
        for index, digest in zip(range(table.hashed, full), hashes):
            block_id = table.blocks[index]
            block = self._blocks[block_id]
            block.hash = digest
            published = self._by_hash.setdefault(digest, block_id)
            if published != block_id:
                self._copies.setdefault(digest, set()).add(block_id)
            elif index >= settled and (index + 1) * self.block_size <= prompt_length:
                created += self.block_size
        table.hashed = full
        table.tail = hashes[-1]
        return created

    def free(self, table: BlockTable) -> None:
        # Released in reverse so a sequence's tail is reused before its (more shareable) head.
        for block_id in reversed(table.blocks):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is not None and self._by_hash.get(block.hash) != block_id:
                    self._free.move_to_end(block_id, last=False)  # a stand-in: its content is kept elsewhere
        table.blocks = []
        table.hashed = 0
        table.tail = b""

    def check(self, tables: Sequence[BlockTable]) -> None:
        """Raise AssertionError if the allocator's books disagree with the live block tables."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block_id in table.blocks:
                counts[block_id] += 1
        free = self._free
        for block_id, block in enumerate(self._blocks):
            if block.ref_count != counts[block_id]:
                raise AssertionError(f"block {block_id}: ref_count {block.ref_count} but {counts[block_id]} users")
            if (block.ref_count == 0) != (block_id in free):
                raise AssertionError(f"block {block_id}: ref_count {block.ref_count} disagrees with the free list")
        for digest, block_id in self._by_hash.items():
            if self._blocks[block_id].hash != digest:
                raise AssertionError(f"hash index points at block {block_id}, which holds other content")
        for block_id, block in enumerate(self._blocks):
            if block.hash is not None and self._by_hash.get(block.hash) != block_id \
                    and block_id not in self._copies.get(block.hash, ()):
                raise AssertionError(f"block {block_id} holds registered content that nothing indexes")
        for digest, copies in self._copies.items():
            for block_id in copies:
                if self._blocks[block_id].hash != digest or self._by_hash.get(digest) in (None, block_id):
                    raise AssertionError(f"block {block_id} stands in for content it does not hold, or unpublished")
