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


def test_a_prefix_computed_twice_at_once_stays_hittable_while_either_copy_lives():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))  # two full blocks and a last one
    first, second = bm.allocate(prompt, ()), bm.allocate(prompt, ())  # both before either is computed
    assert set(first.blocks).isdisjoint(second.blocks)
    assert bm.register(first, prompt, (), computed=9, prompt_length=9) == 8
    assert bm.register(second, prompt, (), computed=9, prompt_length=9) == 0  # a copy creates nothing new
    bm.check([first, second])
    assert bm.cached_prefix(prompt, ()) == first.blocks[:2]
    bm.free(first)
    hog = bm.allocate(list(range(100, 100 + 4 * bm.free_blocks)), ())  # every free block reused: first's copy is gone
    assert set(hog.blocks) >= set(first.blocks)
    bm.check([second, hog])
    assert bm.cached_prefix(prompt, ()) == second.blocks[:2]  # before, nothing: only the first copy was indexed
    kept = second.blocks[:2]
    bm.free(hog)
    bm.free(second)
    assert bm.cached_prefix(prompt, ()) == kept  # freed, still hittable until reused
    bm.check([])


def test_a_freed_copy_is_reused_before_blocks_whose_content_is_held_nowhere_else():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    first, second = bm.allocate(prompt, ()), bm.allocate(prompt, ())
    bm.register(first, prompt, (), computed=9, prompt_length=9)
    bm.register(second, prompt, (), computed=9, prompt_length=9)
    copies = second.blocks[:2]
    bm.free(second)  # its first two blocks are stand-ins for first's
    taken = bm.allocate(list(range(50, 58)), ())  # two blocks
    assert set(taken.blocks) == set(copies)
    bm.check([first, taken])
    assert bm.cached_prefix(prompt, ()) == first.blocks[:2]
