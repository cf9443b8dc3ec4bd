import pytest

from localvl.engine.blocks import BlockManager, ImageSpan, block_hashes


def test_full_blocks_are_shared_once_registered_and_the_last_block_never_is():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # blocks [0-3] [4-7] [8-9]
    first = bm.allocate(prompt, ())
    assert len(first.blocks) == 3 and bm.free_blocks == 7
    assert bm.cached_prefix(prompt, ()) == []  # nothing registered before it is computed
    created = bm.register(first, prompt, (), computed=10, prompt_length=10)
    assert created == 8  # two full prompt blocks
    second = bm.allocate(prompt, ())
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert second.hashed == 2
    # a prompt of exactly two blocks reuses only the first: its last token's block is recomputed
    assert bm.cached_prefix(list(range(8)), ()) == first.blocks[:1]
    bm.check([first, second])


def test_a_different_token_or_image_breaks_the_chain():
    bm = BlockManager(num_blocks=20, block_size=4)
    prompt = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6]
    image = ImageSpan(4, 4, "cat")
    table = bm.allocate(prompt, (image,))
    bm.register(table, prompt, (image,), computed=10, prompt_length=10)
    assert len(bm.cached_prefix(prompt, (image,))) == 2
    assert len(bm.cached_prefix(prompt, (ImageSpan(4, 4, "dog"),))) == 1  # same tokens, other picture
    assert len(bm.cached_prefix([1, 2, 3, 5, 9, 9, 9, 9, 5, 6], (image,))) == 0
    changed_late = [1, 2, 3, 4, 9, 9, 9, 8, 5, 6]
    assert len(bm.cached_prefix(changed_late, (image,))) == 1


def test_block_hashes_are_chained():
    a = block_hashes([1, 2, 3, 4, 5, 6], (), 3, 2)
    b = block_hashes([9, 2, 3, 4, 5, 6], (), 3, 2)
    assert a[0] != b[0] and a[1] != b[1]  # the second block differs only through its prefix


def test_freed_blocks_stay_hittable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    table = bm.allocate(prompt, ())
    bm.register(table, prompt, (), computed=5, prompt_length=5)
    bm.free(table)
    assert bm.free_blocks == 4
    again = bm.allocate(prompt, ())
    assert again.hashed == 2  # found in freed blocks
    bm.check([again])
    bm.free(again)
    other = bm.allocate([7, 8, 9, 10, 11, 12, 13, 14], ())  # needs all four: the old content goes
    assert bm.cached_prefix(prompt, ()) == []
    bm.check([other])


def test_can_allocate_counts_free_blocks_a_hit_takes_back():
    bm = BlockManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    table = bm.allocate(prompt, ())
    bm.register(table, prompt, (), computed=5, prompt_length=5)
    bm.free(table)
    assert bm.can_allocate(prompt, ())
    assert not bm.can_allocate([1, 2, 3, 4, 5, 6, 7], ())  # 4 blocks > 3
    with pytest.raises(MemoryError):
        bm.allocate([1, 2, 3, 4, 5, 6, 7], ())
    bm.check([])


def test_append_slot_grows_and_reports_exhaustion():
    bm = BlockManager(num_blocks=2, block_size=2)
    table = bm.allocate([1, 2], ())
    assert bm.append_slot(table, 3) and len(table.blocks) == 2
    assert not bm.append_slot(table, 5)
    bm.check([table])


def test_check_catches_books_that_disagree():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = bm.allocate([1, 2, 3], ())
    with pytest.raises(AssertionError):
        bm.check([])  # two blocks in use by nobody
    twice = type(table)(blocks=table.blocks + table.blocks[:1])
    with pytest.raises(AssertionError):
        bm.check([twice])


def test_a_hybrid_prefix_is_reused_only_up_to_a_block_with_a_kept_state():
    resumable: set[bytes] = set()
    bm = BlockManager(num_blocks=20, block_size=4, resumable=resumable)
    prompt = list(range(17))  # four full blocks, then the last token's
    table = bm.allocate(prompt, ())
    bm.register(table, prompt, (), computed=17, prompt_length=17)
    assert bm.cached_prefix(prompt, ()) == []  # registered, but no state kept anywhere
    hashes = block_hashes(prompt, (), 4, 4)
    resumable.add(hashes[1])  # a state kept where block 1 ends (token 8)
    assert bm.cached_prefix(prompt, ()) == table.blocks[:2]
    resumable.add(hashes[3])
    assert bm.cached_prefix(prompt, ()) == table.blocks[:4]
    resumable.discard(hashes[3])  # let go (LRU): back to the earlier one
    again = bm.allocate(prompt, ())
    assert again.hashed == 2 and again.tail == hashes[1]  # the snapshot to resume from
    bm.check([table, again])


def test_blocks_a_preempted_sequence_already_counted_are_not_created_again():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(13))  # three full prompt blocks
    table = bm.allocate(prompt, ())
    assert bm.register(table, prompt, (), computed=13, prompt_length=13, settled=2) == 4  # block 2 alone
