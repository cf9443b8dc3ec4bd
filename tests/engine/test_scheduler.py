import random
import subprocess
import sys

from localvl.engine.blocks import BlockManager
from localvl.engine.scheduler import Scheduler
from localvl.engine.sequence import BACKGROUND, INTERACTIVE, Sequence, Status


def make(num_blocks=64, block_size=4, budget=32, seqs=8):
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_tokens=budget, max_num_seqs=seqs)


def step(scheduler, sample=lambda seq: 7):
    """What the engine does after a forward pass: mark tokens computed, append sampled tokens."""
    batch = scheduler.schedule()
    for s in batch:
        seq = s.sequence
        seq.num_computed += s.count
        scheduler.blocks.register(seq.table, seq.tokens, seq.images, seq.num_computed, len(seq.prompt))
        if s.samples:
            seq.outputs.append(sample(seq))
            if len(seq.outputs) >= seq.max_new_tokens:
                scheduler.remove(seq)
    scheduler.check()
    return batch


def test_modules_import_no_torch():
    code = (
        "import sys; import localvl.engine.scheduler, localvl.engine.blocks, localvl.engine.sequence;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_prefill_is_chunked_by_the_token_budget_and_decodes_ride_along():
    s = make(budget=10)
    long = Sequence("long", list(range(25)), max_new_tokens=3)
    s.add(long)
    assert [(b.start, b.count, b.samples) for b in step(s)] == [(0, 10, False)]
    assert [(b.start, b.count, b.samples) for b in step(s)] == [(10, 10, False)]
    short = Sequence("short", [1, 2, 3], max_new_tokens=5)
    s.add(short)
    batch = step(s)  # long's last 5 tokens, then short's whole prompt
    assert [(b.sequence.id, b.count, b.samples) for b in batch] == [("long", 5, True), ("short", 3, True)]
    batch = step(s)  # both decode: one token each
    assert [(b.sequence.id, b.start, b.count) for b in batch] == [("long", 25, 1), ("short", 3, 1)]


def test_admission_stops_at_the_batch_size():
    s = make(seqs=2)
    for i in range(3):
        s.add(Sequence(f"r{i}", [i, 1, 2], max_new_tokens=4))
    batch = step(s)
    assert [b.sequence.id for b in batch] == ["r0", "r1"] and len(s.waiting) == 1
    while s.running:
        step(s)
    assert [seq.id for seq in s.running] == [] and len(s.waiting) == 1
    step(s)
    assert [seq.id for seq in s.running] == ["r2"]


def test_out_of_blocks_the_least_urgent_is_preempted_and_recomputed_later():
    s = make(num_blocks=6, block_size=2, budget=64)
    a = Sequence("a", [1, 2, 3], max_new_tokens=6)
    b = Sequence("b", [4, 5, 6], max_new_tokens=6)
    s.add(a)
    s.add(b)
    step(s)
    for _ in range(10):
        if s.preemptions:
            break
        step(s)
    assert s.preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0
    assert b.status is Status.WAITING and b.num_computed == 0 and b.table.blocks == []
    outputs_at_preemption = list(b.outputs)
    while s.running or s.waiting:
        step(s)
    assert len(a.outputs) == 6 and len(b.outputs) == 6 and b.outputs[: len(outputs_at_preemption)] == outputs_at_preemption
    assert s.blocks.free_blocks == 6


def test_recomputation_feeds_prompt_and_outputs_again():
    s = make(num_blocks=4, block_size=2, budget=64, seqs=4)
    seq = Sequence("x", [1, 2, 3], max_new_tokens=10, outputs=[8, 9])
    s.add(seq)
    (chunk,) = step(s)
    assert (chunk.start, chunk.count, chunk.samples) == (0, 5, True)


def test_interactive_requests_preempt_background_work():
    s = make(seqs=1)
    background = Sequence("batch", [1, 2, 3], max_new_tokens=50, priority=BACKGROUND)
    s.add(background)
    step(s)
    interactive = Sequence("chat", [4, 5, 6], max_new_tokens=2, priority=INTERACTIVE)
    s.add(interactive)
    batch = step(s)
    assert [b.sequence.id for b in batch] == ["chat"] and background.status is Status.WAITING
    step(s)
    step(s)
    assert interactive.status is Status.FINISHED and background.status is Status.RUNNING


def test_background_never_preempts_interactive():
    s = make(seqs=1)
    chat = Sequence("chat", [4, 5, 6], max_new_tokens=5)
    s.add(chat)
    step(s)
    s.add(Sequence("batch", [1, 2, 3], max_new_tokens=5, priority=BACKGROUND))
    assert [b.sequence.id for b in step(s)] == ["chat"]


def test_prefix_hits_skip_computed_tokens():
    s = make(block_size=4, budget=64)
    first = Sequence("first", list(range(13)), max_new_tokens=1)
    s.add(first)
    step(s)
    second = Sequence("second", list(range(13)) + [99], max_new_tokens=1)
    s.add(second)
    (chunk,) = step(s)
    assert chunk.start == 12 and chunk.count == 2 and second.cache_read_tokens == 12


def test_removing_waiting_and_running_sequences_frees_everything():
    s = make()
    a, b = Sequence("a", [1, 2, 3, 4, 5]), Sequence("b", [6, 7])
    s.add(a)
    step(s)
    s.add(b)
    s.remove(b)
    s.remove(a)
    assert not s.running and not s.waiting and s.blocks.free_blocks == s.blocks.num_blocks
    s.check()


def test_random_workloads_keep_the_books_straight():
    rng = random.Random(0)
    for trial in range(20):
        s = make(num_blocks=rng.randint(12, 40), block_size=rng.choice([1, 2, 4]), budget=rng.randint(4, 40), seqs=rng.randint(1, 6))
        capacity = s.blocks.num_blocks * s.blocks.block_size
        seqs = []
        for i in range(rng.randint(1, 12)):
            prefix = [1, 2, 3, 4, 5, 6, 7, 8][: rng.randint(0, 8)]
            prompt = prefix + [rng.randint(0, 50) for _ in range(rng.randint(1, 10))]
            prompt = prompt[: capacity - 1]
            new = rng.randint(1, max(1, min(12, capacity - len(prompt))))
            seq = Sequence(f"{trial}-{i}", prompt, max_new_tokens=new, priority=rng.choice([INTERACTIVE, BACKGROUND]))
            seqs.append(seq)
            s.add(seq)
        for _ in range(2000):
            if not (s.running or s.waiting):
                break
            if rng.random() < 0.05 and (s.running or s.waiting):
                s.remove(rng.choice(s.running + s.waiting))
                s.check()
                continue
            step(s, sample=lambda seq: rng.randint(0, 50))
        assert not s.running and not s.waiting
        assert s.blocks.free_blocks == s.blocks.num_blocks
        for seq in seqs:
            assert seq.status is Status.FINISHED


def test_token_and_span_read_across_prompt_and_outputs():
    seq = Sequence("s", [1, 2, 3], outputs=[4, 5])
    assert [seq.token(i) for i in range(5)] == seq.tokens == [1, 2, 3, 4, 5]
    for start in range(6):
        for end in range(start, 6):
            assert seq.span(start, end) == seq.tokens[start:end]
