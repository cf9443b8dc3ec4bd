"""Per-sequence linear-attention state: slots taken, started over and given back as sequences come and go."""

import pytest
import torch

from localvl.engine.linear_attention import LinearStates, linear_layers, make_step
from localvl.engine.sequence import Sequence, Status


@pytest.fixture
def layers(loaded_model):
    return linear_layers(loaded_model("qwen3_5").model)


def running(name: str) -> Sequence:
    return Sequence(name, [1, 2, 3], status=Status.RUNNING)


def test_only_a_hybrid_decoder_has_linear_layers(loaded_model, layers):
    assert sorted(layers) == [0, 2]  # linear, full, linear, full
    assert linear_layers(loaded_model("qwen3_vl").model) == {}


def test_slots_are_taken_started_over_and_given_back(layers):
    states = LinearStates(layers, slots=2, dtype=torch.float32, device=torch.device("cpu"))
    a, b, c = running("a"), running("b"), running("c")
    step = make_step(states, [(0, 1, a, False), (1, 5, b, True)], torch.device("cpu"))
    assert step.singles.tolist() == [0] and step.chunks == [(1, 6, step.single_slots.tolist()[0] ^ 1)]
    slot_a = states.slot(a, fresh=False)
    for tensor in (*states.conv.values(), *states.recurrent.values()):
        tensor[slot_a].fill_(1.0)
    assert states.slot(a, fresh=False) == slot_a and all(t[slot_a].eq(1).all() for t in states.conv.values())
    states.slot(a, fresh=True)  # a first chunk (a new sequence, or one preempted) starts from nothing
    assert all(t[slot_a].eq(0).all() for t in (*states.conv.values(), *states.recurrent.values()))
    with pytest.raises(RuntimeError, match="state slots"):
        make_step(states, [(0, 1, c, True)], torch.device("cpu"))  # both slots held by running sequences
    a.status = Status.FINISHED  # finished, cancelled or preempted: its slot goes back at the next step
    make_step(states, [(0, 1, c, True)], torch.device("cpu"))
    assert states.holds(c) and not states.holds(a) and states.slot(c, fresh=False) == slot_a


def test_a_hybrid_engine_keeps_keys_only_for_its_attention_layers(loaded_model):
    from localvl.engine.local import EngineConfig, LocalEngine

    from localvl.engine.kv_cache import PagedKVCache

    engine = LocalEngine(loaded_model("qwen3_5"), EngineConfig(kv_cache_memory=1 << 20, max_num_seqs=3))
    cache = engine.kv_cache
    assert [k.shape[0] > 0 for k in cache.keys] == [False, True, False, True]
    assert engine.linear_states.slots == 3 and not engine.blocks.prefix_cache
    # the budget is spent on the two layers that attend, not spread over all four
    per_block = PagedKVCache.bytes_per_block(num_layers=2, block_size=16, kv_heads=2, head_dim=16, dtype=torch.float32)
    assert cache.num_blocks == (1 << 20) // per_block
    held = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    assert held == (cache.num_blocks + 1) * per_block  # the scratch block too
    plain = LocalEngine(loaded_model("qwen3_vl"), EngineConfig(kv_cache_memory=1 << 20))
    assert plain.linear_states is None and plain.blocks.prefix_cache
