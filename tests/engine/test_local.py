import asyncio
import dataclasses
import time

import pytest

from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.events import Finished, TextDelta
from localvl.engine.local import EngineConfig, LocalEngine
from localvl.errors import ContextLengthError, InternalError, InvalidRequestError
from localvl.media.images import load_image
from localvl.prompt.render import Renderer
from tests.engine.reference import reference_text
from tests.helpers import image_bytes


def conversation(text="Describe the picture, please.", image=False) -> Conversation:
    parts = [load_image(image_bytes("PNG", size=(90, 60)), "image/png", "test")] if image else []
    return Conversation([Turn("user", [*parts, Text(text)])])


def run(coro):
    return asyncio.run(coro)


async def generate(engine, conv, request_id="r", **sampling):
    sampling.setdefault("max_tokens", 16)
    sampling.setdefault("temperature", 0.0)
    stream = await engine.submit(GenerationRequest(request_id, conv, SamplingParams(**sampling)))
    events = [event async for event in stream]
    return stream, events


async def with_engine(loaded, body, **kwargs):
    kwargs.setdefault("kv_cache_memory", 32 << 20)
    engine = LocalEngine(loaded, EngineConfig(**kwargs))
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.stop()


@pytest.mark.parametrize("image", [False, True])
def test_greedy_text_equals_generate_and_usage_is_exact(loaded_model, image):
    loaded = loaded_model("qwen2_5_vl")
    conv = conversation(image=image)

    async def body(engine):
        stream, events = await generate(engine, conv, max_tokens=20)
        return stream, events, await engine.count_tokens(conv)

    stream, events, counted = run(with_engine(loaded, body, max_batch_tokens=16))
    *deltas, finished = events
    assert isinstance(finished, Finished) and all(isinstance(d, TextDelta) and d.text for d in deltas)
    usage = finished.usage
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == counted
    assert stream.input_tokens == counted and usage.cache_read_input_tokens == 0  # the first request

    expected, count, ended = reference_text(loaded, Renderer(loaded.processor).render(conv), 20)
    assert usage.output_tokens == count
    assert "".join(d.text for d in deltas) == expected
    assert finished.reason == ("eos" if ended else "max_tokens")


def test_stop_sequence_cuts_the_text_before_it(loaded_model):
    loaded = loaded_model("qwen2_vl")
    conv = conversation("tell me a story")

    async def body(engine):
        _, events = await generate(engine, conv, max_tokens=40)
        full = "".join(e.text for e in events if isinstance(e, TextDelta))
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        _, stopped = await generate(engine, conv, max_tokens=40, stop_sequences=(stop, "never-appears"))
        return full, stop, stopped

    full, stop, stopped = run(with_engine(loaded, body))
    assert len(full) >= 4
    *deltas, finished = stopped
    assert finished.reason == "stop_sequence" and finished.stop_sequence == stop
    assert "".join(d.text for d in deltas) == full[: full.find(stop)]


def test_max_tokens_clamped_to_the_context_ends_with_context_window(loaded_model):
    base = loaded_model("qwen2_5_vl")
    conv = conversation("hi")

    async def measure(engine):
        return await engine.count_tokens(conv)

    prompt_tokens = run(with_engine(base, measure))
    small = dataclasses.replace(base, context_length=prompt_tokens + 3)

    async def body(engine):
        _, clamped = await generate(engine, conv, max_tokens=100)
        _, exact = await generate(engine, conv, max_tokens=3)
        return clamped[-1], exact[-1]

    eos_free = dataclasses.replace(small, eos_token_ids=frozenset())  # so the model cannot end early
    clamped, exact = run(with_engine(eos_free, body, block_size=4))
    assert clamped.reason == "context_window" and clamped.usage.output_tokens == 3
    assert exact.reason == "max_tokens" and exact.usage.output_tokens == 3


def test_a_prompt_that_fills_the_context_lists_no_logprob_for_the_token_it_could_not_write(loaded_model):
    """The step still samples after such a prompt; that token is dropped, and so must its entry be."""
    base = loaded_model("qwen2_5_vl")
    conv = conversation("hi")

    async def measure(engine):
        return await engine.count_tokens(conv)

    full = dataclasses.replace(base, context_length=run(with_engine(base, measure)))

    async def body(engine):
        return (await generate(engine, conv, max_tokens=5, logprobs=2))[1]

    *deltas, finished = run(with_engine(full, body, block_size=4))
    assert finished.reason == "context_window" and finished.usage.output_tokens == 0
    assert [entry for delta in deltas for entry in delta.logprobs] == []


def test_a_prompt_longer_than_the_context_is_refused(loaded_model):
    base = loaded_model("qwen2_5_vl")
    conv = conversation("word " * 50)

    async def body(engine):
        n = await engine.count_tokens(conv)
        engine.frontend.facts = dataclasses.replace(engine.frontend.facts, context_length=n - 1)
        with pytest.raises(InvalidRequestError) as caught:
            await engine.submit(GenerationRequest("r", conv, SamplingParams(max_tokens=5)))
        return n, caught.value

    n, error = run(with_engine(base, body))
    assert error.message == f"prompt is too long: {n} tokens > {n - 1} maximum"
    assert isinstance(error, ContextLengthError)  # OpenAI's envelope calls it context_length_exceeded


def test_seeded_sampling_is_reproducible(loaded_model):
    loaded = loaded_model("qwen3_vl")
    conv = conversation()

    async def body(engine):
        runs = []
        for seed in (7, 7, 8):
            _, events = await generate(engine, conv, temperature=1.0, seed=seed, max_tokens=24)
            runs.append("".join(e.text for e in events if isinstance(e, TextDelta)))
        return runs

    a, b, c = run(with_engine(loaded, body))
    assert a == b and a != c


def test_seeds_past_64_bits_are_folded_into_them_and_the_engine_goes_on(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    conv = conversation()

    async def body(engine):
        runs = []
        for seed in (7, 2**64 + 7, -(2**70), 2**63 - 1):
            _, events = await asyncio.wait_for(generate(engine, conv, temperature=1.0, seed=seed, max_tokens=24), 60)
            assert isinstance(events[-1], Finished)
            runs.append("".join(e.text for e in events if isinstance(e, TextDelta)))
        return runs

    seven, folded, _, _ = run(with_engine(loaded, body))
    assert folded == seven  # 2**64 + 7 is 7 in 64 bits


def test_a_request_whose_admission_fails_fails_alone(loaded_model, monkeypatch):
    loaded = loaded_model("qwen2_5_vl")

    async def body(engine):
        admit = engine._admit

        def failing(seq):
            if seq.id == "bad":
                raise ValueError("a bug in admission")
            admit(seq)

        monkeypatch.setattr(engine, "_admit", failing)
        with pytest.raises(InternalError):  # within a minute: a dead engine thread hangs every request
            await asyncio.wait_for(generate(engine, conversation(), "bad"), 60)
        _, events = await asyncio.wait_for(generate(engine, conversation(), "good"), 60)
        return events, engine.alive, engine.stats()["waiting"]

    events, alive, waiting = run(with_engine(loaded, body))
    assert isinstance(events[-1], Finished) and alive and waiting == 0


def test_a_request_for_an_engine_thread_that_ended_is_refused_not_queued_forever(loaded_model):
    import threading

    from localvl.errors import ServiceUnavailableError

    async def body(engine):
        live = engine._thread
        engine._thread = threading.Thread(target=lambda: None)  # as if the engine thread had died
        engine._thread.start()
        engine._thread.join()
        try:
            with pytest.raises(ServiceUnavailableError, match="not running"):
                await asyncio.wait_for(generate(engine, conversation(), "late"), 60)
        finally:
            engine._thread = live

    run(with_engine(loaded_model("qwen2_5_vl"), body))


def test_a_vanishing_temperature_samples_greedily_beside_other_requests(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    conv = conversation()

    async def body(engine):
        greedy = await generate(engine, conv, "greedy", temperature=0.0, max_tokens=12)
        tiny, other = await asyncio.wait_for(asyncio.gather(
            generate(engine, conv, "tiny", temperature=1e-40, max_tokens=12),
            generate(engine, conversation("another question"), "other", temperature=1.0, seed=3, max_tokens=12),
        ), 60)
        return greedy[1], tiny[1], other[1]

    greedy, tiny, other = run(with_engine(loaded, body))
    text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
    assert isinstance(tiny[-1], Finished) and isinstance(other[-1], Finished)
    assert text(tiny) == text(greedy)


def test_a_top_k_past_any_vocabulary_keeps_every_token_and_fails_no_neighbour(loaded_model):
    """(2**63 overflowed the batch's int64 tensor: the step failed, and every request in it.)"""
    loaded = loaded_model("qwen2_5_vl")

    async def body(engine):
        return await asyncio.wait_for(asyncio.gather(
            generate(engine, conversation(), "huge", temperature=1.0, top_k=2**63, seed=5, max_tokens=8),
            generate(engine, conversation(), "all", temperature=1.0, top_k=0, seed=5, max_tokens=8),
            generate(engine, conversation("another question"), "other", max_tokens=8),
        ), 60)

    (_, huge), (_, everything), (_, other) = run(with_engine(loaded, body))
    text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
    assert all(isinstance(events[-1], Finished) for events in (huge, everything, other))
    assert text(huge) == text(everything)  # no cut at all, as top_k 0 means


def test_logit_bias_steers_greedy_decoding_and_respects_bans(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    tokenizer = loaded.processor.tokenizer
    favourite = tokenizer.encode("hello", add_special_tokens=False)[0]
    conv = conversation()

    async def body(engine):
        _, plain = await generate(engine, conv, "plain", max_tokens=5)
        _, pushed = await generate(engine, conv, "pushed", max_tokens=5, logit_bias=((favourite, 100.0),))
        first = tokenizer.encode("".join(e.text for e in plain if isinstance(e, TextDelta)), add_special_tokens=False)[0]
        _, pulled = await generate(engine, conv, "pulled", max_tokens=1, logit_bias=((first, -100.0),))
        return plain, pushed, pulled, first

    plain, pushed, pulled, first = run(with_engine(loaded, body))
    text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
    assert text(pushed) == tokenizer.decode([favourite] * 5)
    assert tokenizer.encode(text(pulled), add_special_tokens=False)[:1] != [first]


def test_a_logit_bias_outside_the_vocabulary_is_a_400(loaded_model):
    loaded = loaded_model("qwen2_5_vl")

    async def body(engine):
        with pytest.raises(InvalidRequestError, match="logit_bias: token ids must be below"):
            await generate(engine, conversation(), logit_bias=((10**9, 5.0),))

    run(with_engine(loaded, body))


def test_closing_a_stream_stops_its_generation(loaded_model):
    loaded = dataclasses.replace(loaded_model("qwen2_5_vl"), eos_token_ids=frozenset())

    async def body(engine):
        stream = await engine.submit(GenerationRequest("long", conversation(), SamplingParams(max_tokens=100_000, temperature=0)))
        await stream.__anext__()
        await stream.aclose()
        deadline = time.monotonic() + 30
        while "long" in engine._active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stopped_at = engine.steps
        await asyncio.sleep(0.2)
        return "long" in engine._active, stopped_at, engine.steps, engine.blocks.used_blocks

    still_active, stopped_at, later, used = run(with_engine(loaded, body))
    assert not still_active and used == 0
    assert stopped_at == later < 100_000


def test_concurrent_requests_queue_and_all_complete(loaded_model):
    loaded = loaded_model("qwen2_vl")

    async def body(engine):
        convs = [conversation(f"question number {i}", image=i % 2 == 0) for i in range(4)]
        results = await asyncio.gather(*(generate(engine, c, f"r{i}", max_tokens=8) for i, c in enumerate(convs)))
        counts = [await engine.count_tokens(c) for c in convs]
        return results, counts

    results, counts = run(with_engine(loaded, body))
    for (stream, events), count in zip(results, counts):
        usage = events[-1].usage
        assert isinstance(events[-1], Finished)
        assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == count


def test_submit_after_stop_is_refused(loaded_model):
    from localvl.errors import ServiceUnavailableError

    async def body():
        engine = LocalEngine(loaded_model("qwen2_vl"))
        await engine.start()
        await engine.stop()
        with pytest.raises(ServiceUnavailableError):
            await engine.submit(GenerationRequest("r", conversation(), SamplingParams(max_tokens=2)))

    run(body())


def test_the_step_budget_defaults_by_device_and_a_setting_overrides_it(loaded_model):
    import torch

    from localvl.engine.local import default_batch_tokens

    loaded = loaded_model("qwen2_5_vl")
    engine = LocalEngine(loaded, EngineConfig())
    assert engine.scheduler.max_batch_tokens == default_batch_tokens(loaded.model.device)
    assert (default_batch_tokens(torch.device("cpu")), default_batch_tokens(torch.device("cuda", 0))) == (1024, 2048)
    assert LocalEngine(loaded, EngineConfig(max_batch_tokens=300)).scheduler.max_batch_tokens == 300
