"""The paged attention against plain causal attention over each sequence's whole history."""

import pytest
import torch
import torch.nn.functional as F

from localvl.engine.kv_cache import AttentionBatch, PagedKVCache, PrefillChunk, paged_attention, stepping
from tests.conftest import TEST_DEVICE

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 16, 4


class Layer(torch.nn.Module):
    layer_idx = 0


def reference(q, k, v):
    """q [heads, n, dim] are the last n of k/v [kv_heads, m, dim]; causal."""
    n, m = q.shape[1], k.shape[1]
    mask = torch.arange(m).unsqueeze(0) <= (torch.arange(n).unsqueeze(1) + m - n)
    k = k.repeat_interleave(HEADS // KV_HEADS, 0)
    v = v.repeat_interleave(HEADS // KV_HEADS, 0)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.to(q.device)).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if TEST_DEVICE != "cpu" else [torch.float32])
def test_rows_and_chunks_attend_to_their_own_history(dtype):
    torch.manual_seed(0)
    device = torch.device(TEST_DEVICE)
    cache = PagedKVCache(num_layers=1, num_blocks=64, block_size=BLOCK, kv_heads=KV_HEADS, head_dim=DIM, dtype=dtype, device=device)
    cache.touch(63)  # as the runner does before a step: blocks in use are zeroed before first use
    # (history already cached, new tokens this step): two decodes, a short chunk, then long chunks
    # with no history, a history shorter than the chunk, and one longer
    shapes = [(9, 1), (3, 1), (5, 6), (0, 21), (7, 12), (30, 5)]
    free = iter(range(64))
    histories, tables = [], []
    for cached, new in shapes:
        total = cached + new
        tables.append([next(free) for _ in range(-(-total // BLOCK))])
        histories.append((torch.randn(KV_HEADS, total, DIM, dtype=dtype, device=device),
                          torch.randn(KV_HEADS, total, DIM, dtype=dtype, device=device),
                          torch.randn(HEADS, new, DIM, dtype=dtype, device=device)))
    for (cached, _), (k, v, _), table in zip(shapes, histories, tables):
        for i in range(cached):
            slot = table[i // BLOCK] * BLOCK + i % BLOCK
            cache.keys[0][slot] = k[:, i]
            cache.values[0][slot] = v[:, i]

    slots, queries, keys, values = [], [], [], []
    for (cached, new), (k, v, q), table in zip(shapes, histories, tables):
        slots += [table[i // BLOCK] * BLOCK + i % BLOCK for i in range(cached, cached + new)]
        queries.append(q)
        keys.append(k[:, cached:])
        values.append(v[:, cached:])
    batch = AttentionBatch(cache, torch.tensor(slots, device=device))
    # rows: the first three sequences (1, 1 and 6 new tokens); padded to 6 queries
    rows = 3
    width = max(len(t) for t in tables[:rows])
    batch.rows = rows
    batch.row_blocks = torch.tensor([t + [cache.scratch_block] * (width - len(t)) for t in tables[:rows]], device=device)
    counts = torch.tensor([new for _, new in shapes[:rows]])
    ends = torch.tensor([c + n for c, n in shapes[:rows]])
    t = torch.minimum(torch.arange(6).unsqueeze(0), (counts - 1).unsqueeze(1))
    mask = torch.arange(width * BLOCK).view(1, 1, -1) <= ((ends - counts).unsqueeze(1) + t).unsqueeze(2)
    batch.row_mask = mask.unsqueeze(1).to(device)
    starts = torch.tensor([0, 1, 2])
    batch.row_queries = (starts.unsqueeze(1) + t).to(device)
    real = (torch.arange(6).unsqueeze(0) < counts.unsqueeze(1)).flatten()
    batch.row_sources = real.nonzero().flatten().to(device)
    batch.row_targets = batch.row_queries.flatten().cpu()[real].to(device)
    batch.prefills = []
    start = sum(new for _, new in shapes[:rows])
    for (cached, new), table in zip(shapes[rows:], tables[rows:]):
        batch.prefills.append(PrefillChunk(start, start + new, torch.tensor(table, device=device), cached + new))
        start += new

    q = torch.cat(queries, dim=1).unsqueeze(0)
    new_keys, new_values = torch.cat(keys, 1).unsqueeze(0), torch.cat(values, 1).unsqueeze(0)
    with stepping(batch):
        out, _ = paged_attention(Layer(), q, new_keys, new_values, None, scaling=DIM**-0.5)
        # The same attention as a compiled decoder's opaque op (it writes the same slots again).
        op = torch.ops.localvl.paged_attention(q, new_keys, new_values, 0, DIM**-0.5)
    expected = torch.cat([reference(q_, k_, v_) for k_, v_, q_ in histories])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[0].float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(op, out)


def test_the_custom_op_outside_a_step_says_so():
    q = torch.randn(1, HEADS, 2, DIM)
    with pytest.raises(RuntimeError, match="outside an engine step"):
        torch.ops.localvl.paged_attention(q, q[:, :KV_HEADS], q[:, :KV_HEADS], 0, 1.0)


def test_without_step_metadata_it_is_plain_sdpa():
    q, k, v = torch.randn(1, HEADS, 5, DIM), torch.randn(1, HEADS, 5, DIM), torch.randn(1, HEADS, 5, DIM)
    layer = Layer()
    layer.is_causal = True
    out, _ = paged_attention(layer, q, k, v, None, scaling=DIM**-0.5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_decode_kernel_passes_its_self_test(dtype):
    pytest.importorskip("triton")
    from localvl.engine.triton_decode import usable

    assert usable(torch.device("cuda"), dtype, block_size=16, heads=16, kv_heads=2, dim=128)
    assert not usable(torch.device("cuda"), dtype, block_size=4, heads=16, kv_heads=2, dim=128)  # tl.dot needs 16


def test_the_triton_decode_kernel_is_never_used_off_a_gpu():
    from localvl.engine.triton_decode import usable

    assert not usable(torch.device("cpu"), torch.float32, block_size=16, heads=16, kv_heads=2, dim=128)


def test_touch_zeroes_each_block_once_before_its_first_use():
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=4, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for tensor in (*cache.keys, *cache.values):
        tensor[:32].fill_(float("nan"))
    cache.touch(2)
    assert cache.zeroed == 3 and all(bool((t[:12] == 0).all()) and bool(t[12:32].isnan().all()) for t in cache.keys)
    cache.keys[0][0] = 5.0  # written since: a later touch must not wipe it
    cache.touch(1)
    cache.touch(5)
    assert cache.keys[0][0, 0, 0] == 5.0 and bool((cache.values[1][:24] == 0).all()) and cache.zeroed == 6
    assert bool((cache.keys[0][32:] == 0).all())  # the scratch block, zeroed at construction
