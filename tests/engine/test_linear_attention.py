"""Per-sequence linear-attention state: slots taken, started over and given back as sequences come and go."""

import pytest
import torch

from localvl.engine.linear_attention import LinearChunk, LinearStates, Snapshot, linear_layers, make_step, mix
from localvl.engine.sequence import Sequence, Status


@pytest.fixture
def layers(loaded_model):
    return linear_layers(loaded_model("qwen3_5").model)


def running(name: str) -> Sequence:
    return Sequence(name, [1, 2, 3], status=Status.RUNNING)


def test_only_a_hybrid_decoder_has_linear_layers(loaded_model, layers):
    assert sorted(layers) == [0, 2]  # linear, full, linear, full
    assert linear_layers(loaded_model("qwen3_vl").model) == {}


def chunk(packed, count, seq, start, resume=None, keep_at=()):
    return LinearChunk(packed, count, seq, start, resume, keep_at)


def fill(states, slot, value):
    for tensor in (*states.conv.values(), *states.recurrent.values()):
        tensor[slot].fill_(value)


def holds_value(states, slot, value):
    return all(t[slot].eq(value).all() for t in (*states.conv.values(), *states.recurrent.values()))


def test_slots_are_taken_started_over_resumed_and_given_back(layers):
    states = LinearStates(layers, slots=2, dtype=torch.float32, device=torch.device("cpu"), snapshot_memory=1 << 20)
    a, b, c = running("a"), running("b"), running("c")
    step = make_step(states, [chunk(0, 5, a, 0), chunk(5, 3, b, 0, keep_at=(1, 3))], torch.device("cpu"))
    slot_a, slot_b = states.slot(a, 5), states.slot(b, 3)
    assert step.singles is None and step.chunks == [(0, 5, slot_a, ()), (5, 8, slot_b, (6, 8))]
    assert step.keeps == [(b, 1, slot_b, 6), (b, 3, slot_b, 8)]
    fill(states, slot_a, 1.0)
    step = make_step(states, [chunk(0, 1, a, 5)], torch.device("cpu"))  # a decodes on from its own state
    assert step.singles.tolist() == [0] and step.single_slots.tolist() == [slot_a] and holds_value(states, slot_a, 1.0)
    # preempted and back at its start: it starts over; back at a snapshot: it resumes from it
    assert states.slot(a, 0) == slot_a and holds_value(states, slot_a, 0.0)
    kept = Snapshot({i: torch.full_like(t[0], 2.0) for i, t in states.conv.items()},
                    {i: torch.full_like(t[0], 2.0) for i, t in states.recurrent.items()})
    assert states.keep(b"k" * 16, kept) and not states.keep(b"k" * 16, kept) and b"k" * 16 in states.resumable
    states.slot(a, 32, resume=b"k" * 16)
    assert holds_value(states, slot_a, 2.0) and states.restored == 1
    with pytest.raises(RuntimeError, match="no linear-attention state"):
        states.slot(a, 48)  # mid-sequence with neither its state nor a snapshot
    with pytest.raises(RuntimeError, match="state slots"):
        make_step(states, [chunk(0, 1, c, 0)], torch.device("cpu"))  # both slots held by running sequences
    a.status = Status.FINISHED  # finished, cancelled or preempted: its slot goes back at the next step
    make_step(states, [chunk(0, 1, c, 0)], torch.device("cpu"))
    assert states.holds(c) and not states.holds(a) and states.slot(c, 1) == slot_a


def test_snapshots_are_kept_within_their_memory_least_recently_used_first(layers):
    states = LinearStates(layers, slots=1, dtype=torch.float32, device=torch.device("cpu"))
    one = Snapshot({i: t[0].clone() for i, t in states.conv.items()}, {i: t[0].clone() for i, t in states.recurrent.items()})
    states.snapshot_memory = 2 * one.nbytes
    assert states.keep(b"a", one) and states.keep(b"b", one)
    states.restore(0, b"a")  # used: b is now the least recent
    assert states.keep(b"c", one)
    assert list(states.snapshots) == [b"a", b"c"] and states.resumable == {b"a", b"c"}
    assert states.snapshot_bytes == 2 * one.nbytes
    states.snapshot_memory = one.nbytes - 1
    assert not states.keep(b"d", one)  # one that can never fit is not kept


def test_a_hybrid_engine_keeps_keys_only_for_its_attention_layers(loaded_model):
    from localvl.engine.local import EngineConfig, LocalEngine

    from localvl.engine.kv_cache import PagedKVCache

    engine = LocalEngine(loaded_model("qwen3_5"), EngineConfig(kv_cache_memory=1 << 20, max_num_seqs=3))
    cache = engine.kv_cache
    assert [k.shape[0] > 0 for k in cache.keys] == [False, True, False, True]
    assert engine.linear_states.slots == 3 and engine.blocks.resumable is engine.linear_states.resumable
    # the budget is spent on the two layers that attend, not spread over all four
    per_block = PagedKVCache.bytes_per_block(num_layers=2, block_size=16, kv_heads=2, head_dim=16, dtype=torch.float32)
    assert cache.num_blocks == (1 << 20) // per_block
    held = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    assert held == (cache.num_blocks + 1) * per_block  # the scratch block too
    plain = LocalEngine(loaded_model("qwen3_vl"), EngineConfig(kv_cache_memory=1 << 20))
    assert plain.linear_states is None and plain.blocks.resumable is None


def test_states_are_kept_near_a_prompts_end_and_where_its_system_turn_ends():
    from localvl.engine.linear_attention import snapshot_points

    system = (7, 8)  # "<|im_start|>system"
    prompt = [7, 8, *range(20, 40), 7, *range(50, 70)]  # a 22-token system turn, then the rest: 43 tokens
    assert snapshot_points(prompt, 4, system) == (20, 32)  # before the turn at 22; 43 - 8 = 35, down to 32
    assert snapshot_points(prompt[2:], 4, system) == (32,)  # no system turn: near the end only
    assert snapshot_points(prompt[:10], 16, system) == ()  # too short for either


def test_a_packed_step_of_chunks_and_decodes_equals_the_stock_layer_per_sequence(layers):
    """Prompts of different lengths packed in one step (one with a state kept mid-chunk), then a
    decode step: every token's output equals the stock layer run over that sequence alone."""
    torch.manual_seed(0)
    layer = layers[0]
    device = layer.in_proj_qkv.weight.device
    hidden = layer.in_proj_qkv.in_features
    lengths = [70, 9, 130]  # length classes 64-128, 8-16, 128-256; the rule's 64-token chunks split
    seqs = [running(f"s{i}") for i in range(3)]
    prompts = [torch.randn(n, hidden).to(device) for n in lengths]
    nexts = [torch.randn(1, hidden).to(device) for _ in lengths]
    states = LinearStates(layers, slots=4, dtype=torch.float32, device=device, snapshot_memory=1 << 20)
    with torch.inference_mode():
        starts = [0, 70, 79]
        chunks = [chunk(at, n, seq, 0, keep_at=(48,) if i == 2 else ()) for i, (at, n, seq) in enumerate(zip(starts, lengths, seqs))]
        step = make_step(states, chunks, device)
        out = mix(layer, torch.cat(prompts).unsqueeze(0), step)[0]
        decoded = mix(layer, torch.cat(nexts).unsqueeze(0), make_step(states, [chunk(i, 1, s, n) for i, (s, n) in enumerate(zip(seqs, lengths))], device))[0]
        for i, at in enumerate(starts):
            whole = torch.cat([prompts[i], nexts[i]]).unsqueeze(0)
            stock = layer(whole)[0]  # outside a step: the stock layer, from a zero state
            torch.testing.assert_close(out[at : at + lengths[i]], stock[: lengths[i]], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(decoded[i], stock[-1], atol=1e-5, rtol=1e-4)
        # the state kept 48 tokens into the third prompt is that prompt's first 48 tokens' state
        alone = LinearStates(layers, slots=1, dtype=torch.float32, device=device)
        mix(layer, prompts[2][:48].unsqueeze(0), make_step(alone, [chunk(0, 48, running("x"), 0)], device))
        kept = step.captured[states.slot(seqs[2], 131), 79 + 48]
        torch.testing.assert_close(kept.recurrent[0].cpu(), alone.recurrent[0][0].cpu(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kept.conv[0].cpu(), alone.conv[0][0].cpu())
