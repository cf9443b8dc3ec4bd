"""Constrained decoding in the batched engine: valid by construction, even from random weights."""

import asyncio
import dataclasses
import json

import jsonschema
import pytest

from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Tool, ToolChoice, Turn
from localvl.engine.events import Finished, TextDelta, ThinkingDelta, ToolCallEvent
from localvl.engine.local import LocalEngine
from localvl.errors import InvalidRequestError
from tests.engine.test_batching import assert_matches_reference, collect, mixed_conversations, run_engine

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
CLOCK = Tool("get_time", None, {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                                  "additionalProperties": False})
INVOICE = {
    "type": "object",
    "properties": {
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["total", "paid", "lines"],
    "additionalProperties": False,
}


def question(text="What is the weather like?", tools=(WEATHER, CLOCK), thinking=None):
    return Conversation([Turn("user", [Text(text)])], tools=list(tools), thinking=thinking)


async def events_of(engine, request):
    return [event async for event in await engine.submit(request)]


# Room for many calls: where parallel calls are allowed random weights write a geometric number of
# them (2 of 48 other seeds' Qwen3.5 turns ran past 400 tokens, the longest to 554), and a GPU draws
# other numbers than a CPU from the same seeds. Turns end long before it: a budget costs nothing.
def sampled(seed: int, max_tokens: int = 1200) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=seed)


# Hermes fallback template / the folder's own / Qwen3.5's XML calls
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_forced_tool_calls_validate_against_their_schemas_across_seeds(loaded_model, family):
    loaded = loaded_model(family)
    schemas = {WEATHER.name: WEATHER.input_schema, CLOCK.name: CLOCK.input_schema}
    # Qwen3.5 thinks unless told not to, and random weights seldom stop thinking
    asked = question(thinking=False if family == "qwen3_5" else None)

    async def body(engine):
        requests = [
            GenerationRequest(f"any{seed}", asked, sampled(seed), tool_choice=ToolChoice("any", parallel=seed % 2 == 0))
            for seed in range(8)
        ] + [
            GenerationRequest(f"tool{seed}", asked, sampled(seed), tool_choice=ToolChoice("tool", "get_weather"))
            for seed in range(4)
        ]
        return await asyncio.gather(*(events_of(engine, r) for r in requests)), requests

    results, requests = run_engine(loaded, body)
    for request, events in zip(requests, results):
        *body_events, finished = events
        assert isinstance(finished, Finished) and finished.reason == "tool_use", (request.id, events)
        assert body_events and all(isinstance(e, ToolCallEvent) for e in body_events)  # nothing but calls
        if not request.tool_choice.parallel:
            assert len(body_events) == 1
        for call in body_events:
            assert call.id.startswith("toolu_")
            if request.tool_choice.mode == "tool":
                assert call.name == "get_weather"
            jsonschema.validate(call.input, schemas[call.name])


def test_a_json_schema_answer_is_valid_json_for_it(loaded_model):
    loaded = loaded_model("qwen2_5_vl")

    async def body(engine):
        requests = [GenerationRequest(f"j{seed}", question("Read the invoice.", tools=()), sampled(seed), output_schema=INVOICE)
                    for seed in range(6)]
        return await asyncio.gather(*(events_of(engine, r) for r in requests))

    for events in run_engine(loaded, body):
        *deltas, finished = events
        assert finished.reason == "eos", events
        jsonschema.validate(json.loads("".join(d.text for d in deltas)), INVOICE)


def test_constrained_rows_leave_the_rest_of_the_batch_alone(loaded_model):
    """Greedy requests batched with constrained ones still equal the model alone."""
    loaded = loaded_model("qwen2_5_vl")
    convs = mixed_conversations(4)

    async def body(engine):
        constrained = [
            engine.submit(GenerationRequest(f"c{seed}", question(), sampled(seed), tool_choice=ToolChoice("any")))
            for seed in range(3)
        ]
        plain = [collect(engine, conv, f"p{i}") for i, conv in enumerate(convs)]
        streams = await asyncio.gather(*constrained)

        async def drain(stream):
            return [event async for event in stream]

        results = await asyncio.gather(*plain, *(drain(s) for s in streams))
        assert all(r[-1].reason == "tool_use" for r in results[len(convs) :])
        return results[: len(convs)]

    assert_matches_reference(loaded, convs, run_engine(loaded, body))


def test_the_thinking_budget_ends_thinking_and_the_answer_follows(loaded_model):
    loaded = dataclasses.replace(loaded_model("qwen3_vl"), eos_token_ids=frozenset())  # run to max_tokens

    async def body(engine):
        request = GenerationRequest("t", question(tools=(), thinking=True), sampled(3, max_tokens=40), thinking_budget=12)
        return await events_of(engine, request)

    events = run_engine(loaded, body)
    kinds = [type(e) for e in events]
    assert kinds[0] is ThinkingDelta and TextDelta in kinds and ToolCallEvent not in kinds
    first_text = kinds.index(TextDelta)
    assert all(k is ThinkingDelta for k in kinds[:first_text])  # thinking, then the answer
    assert all(k is not ThinkingDelta for k in kinds[first_text:])
    assert events[-1].usage.output_tokens == 40
    assert events[-1].usage.reasoning_tokens == 12  # the thinking, </think> included, spends the budget and no more


def test_a_schema_llguidance_cannot_use_is_a_client_error(loaded_model):
    loaded = loaded_model("qwen2_5_vl")

    async def body(engine):
        request = GenerationRequest("bad", question(tools=()), sampled(0), output_schema={"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}, "required": ["a"]})
        with pytest.raises(InvalidRequestError):
            await engine.submit(request)

    run_engine(loaded, body)


def test_a_schema_nested_thousands_deep_is_a_client_error(loaded_model):
    schema: dict = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}

    async def body(engine):
        with pytest.raises(InvalidRequestError, match="nested too deeply"):
            await engine.submit(GenerationRequest("deep", question(tools=()), sampled(0), output_schema=schema))

    run_engine(loaded_model("qwen2_5_vl"), body)


def model_writes(monkeypatch, written: list[int]) -> None:
    """Every request's model "samples" ``written``, token by token (forced), whatever its weights say."""
    make_job = LocalEngine._job

    def forced(self, *args):
        job = make_job(self, *args)
        job.forced = list(written)
        return job

    monkeypatch.setattr(LocalEngine, "_job", forced)


def test_without_parallel_calls_the_turn_ends_at_the_first_call(loaded_model, monkeypatch):
    """A model that writes two calls where one at most was allowed: the turn ends after the first."""
    loaded = loaded_model("qwen2_5_vl")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    written = loaded.tokenizer.encode("Checking.\n" + call + "\n" + call, add_special_tokens=False)
    model_writes(monkeypatch, written)

    async def body(engine):
        results = []
        for parallel in (False, True):
            request = GenerationRequest(f"p{parallel}", question(tools=(WEATHER,)), sampled(0, max_tokens=len(written)),
                                        tool_choice=ToolChoice("auto", parallel=parallel))
            results.append(await events_of(engine, request))
        return results

    single, parallel = run_engine(loaded, body)

    def kinds(events):
        out = [type(e) for e in events]
        return [k for i, k in enumerate(out) if i == 0 or k is not TextDelta or out[i - 1] is not TextDelta]

    assert kinds(single) == [TextDelta, ToolCallEvent, Finished]
    assert "".join(e.text for e in single if isinstance(e, TextDelta)) == "Checking."
    assert single[-2].input == {"city": "Paris", "days": 2} and single[-1].reason == "tool_use"
    assert single[-1].usage.output_tokens < len(written)  # it stopped there
    assert kinds(parallel) == [TextDelta, ToolCallEvent, ToolCallEvent, Finished]
    assert parallel[-1].reason == "max_tokens"  # all it was given to write, and no end of turn


def test_tool_choice_none_never_opens_a_tool_call(loaded_model, monkeypatch):
    """A model that would open a tool call at every step: under none it cannot."""
    from localvl.engine.qwen_vl import QwenVLRunner

    loaded = loaded_model("qwen2_5_vl")
    tag = loaded.tokenizer.convert_tokens_to_ids("<tool_call>")
    logits = QwenVLRunner.logits

    def eager_to_call(self, hidden):
        out = logits(self, hidden)
        out[:, tag] += 1000.0
        return out

    monkeypatch.setattr(QwenVLRunner, "logits", eager_to_call)
    sampled: dict[str, list[int]] = {}
    append = LocalEngine._append

    def recording(self, seq, token, *rest):
        sampled.setdefault(seq.id, []).append(token)
        return append(self, seq, token, *rest)

    monkeypatch.setattr(LocalEngine, "_append", recording)

    async def body(engine):
        out = {}
        for mode in ("auto", "none"):
            request = GenerationRequest(mode, question(tools=(WEATHER,)), SamplingParams(max_tokens=6, temperature=0),
                                        tool_choice=ToolChoice(mode))
            out[mode] = "".join(e.text for e in await events_of(engine, request) if isinstance(e, TextDelta))
        return out

    texts = run_engine(loaded, body)
    assert tag in sampled["auto"]  # the model opens a call whenever it may
    assert tag not in sampled["none"] and "<tool_call>" not in texts["none"]
    assert texts["auto"] == ""  # a call cut off before its name is never returned as markup


# pydantic's shape (what the SDK's beta_tool and LangChain emit): the tool's refs point into its own $defs
ROUTE = Tool("plan_route", None, {
    "type": "object",
    "properties": {"start": {"$ref": "#/$defs/Place"}, "stops": {"type": "array", "items": {"$ref": "#/$defs/Place"}, "maxItems": 2}},
    "required": ["start", "stops"],
    "additionalProperties": False,
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
                        "additionalProperties": False}},
})
# a recursive schema: "#" is the tool's own root, not the grammar's
TREE = Tool("make_tree", None, {
    "type": "object",
    "properties": {"label": {"type": "string", "maxLength": 4}, "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
    "required": ["label", "children"],
    "additionalProperties": False,
})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_forced_calls_to_tools_with_local_refs_validate_against_them(loaded_model, family):
    import jsonschema

    loaded = loaded_model(family)

    # A tree has no depth limit: random weights made one of 48 seeds' trees 324 tokens long, and a
    # GPU draws other numbers from the same seeds than a CPU, so the budget leaves room to spare.
    budget = 600

    async def body(engine):
        requests = [GenerationRequest(f"{tool.name}{seed}", question(tools=(tool, CLOCK), thinking=False), sampled(seed, budget),
                                      tool_choice=ToolChoice("tool", tool.name, parallel=False))
                    for tool in (ROUTE, TREE) for seed in range(3)]
        requests.append(GenerationRequest("both", question(tools=(ROUTE, TREE), thinking=False), sampled(9, budget),
                                          tool_choice=ToolChoice("any", parallel=False)))
        return await asyncio.gather(*(events_of(engine, r) for r in requests)), requests

    results, requests = run_engine(loaded, body)
    schemas = {ROUTE.name: ROUTE.input_schema, TREE.name: TREE.input_schema}
    for request, events in zip(requests, results):
        *calls, finished = events
        assert finished.reason == "tool_use" and len(calls) == 1, (request.id, events)
        jsonschema.validate(calls[0].input, schemas[calls[0].name])


def test_a_forced_call_to_a_tool_whose_schema_cannot_compile_is_a_json_object_unless_strict(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    tags = Tool("set_tags", None, {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}},
                                   "not": {"required": ["x"]}})

    async def body(engine):
        forced = await events_of(engine, GenerationRequest(
            "forced", question(tools=(tags,)), sampled(1, 200), tool_choice=ToolChoice("tool", "set_tags", parallel=False)))
        with pytest.raises(InvalidRequestError) as refused:
            await engine.submit(GenerationRequest("strict", question(tools=(tags,)), sampled(1, 200),
                                                  tool_choice=ToolChoice("auto"), strict_tools=("set_tags",)))
        return forced, refused.value.message

    forced, message = run_engine(loaded, body)
    *calls, finished = forced
    # any JSON object: a random model may still be writing it at max_tokens (then the call comes back cut off)
    assert finished.reason in ("tool_use", "max_tokens") and [c.name for c in calls] == ["set_tags"]
    assert isinstance(calls[0].input, dict)
    assert "Unimplemented keys" in message and len(message) < 400  # the reason, not the whole grammar


def test_stops_logprobs_and_reasoning_count_read_the_answer_not_thinking_or_markup(loaded_model, monkeypatch):
    """A thinking model (Qwen3.5: the prompt opens <think>) whose reasoning and tool-call markup hold
    the stop sequences: the turn goes on to its call; the logprobs are the answer text's tokens; the
    reasoning tokens are counted."""
    loaded = loaded_model("qwen3_5")
    tokenizer = loaded.tokenizer
    written = tokenizer.encode(
        "I should check the weather in Paris.\n</think>\n\nChecking.\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        add_special_tokens=False,
    )
    model_writes(monkeypatch, written)
    sampling = SamplingParams(max_tokens=len(written), temperature=0, logprobs=0, stop_sequences=("weather", "Paris", "function"))

    async def body(engine):
        return await events_of(engine, GenerationRequest("s", question(tools=(WEATHER,)), sampling))

    events = run_engine(loaded, body)
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    finished = events[-1]
    assert "weather in Paris" in thinking and "".join(d.text for d in deltas).strip() == "Checking."
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert finished.reason != "stop_sequence" and finished.stop_sequence is None
    logprobs = [entry.token for d in deltas for entry in d.logprobs]
    assert "".join(logprobs).strip() == "Checking."
    close = tokenizer.convert_tokens_to_ids("</think>")
    assert finished.usage.reasoning_tokens == written.index(close) + 1


def test_a_stop_in_the_answer_still_ends_it_after_thinking(loaded_model, monkeypatch):
    loaded = loaded_model("qwen3_5")
    written = loaded.tokenizer.encode("Think about it.\n</think>\n\nThe answer is 42. Then more.", add_special_tokens=False)
    model_writes(monkeypatch, written)

    async def body(engine):
        request = GenerationRequest("s", question(tools=()), SamplingParams(max_tokens=len(written), temperature=0, stop_sequences=("42", "about")))
        return await events_of(engine, request)

    events = run_engine(loaded, body)
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)).startswith("Think about it.")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "The answer is "
    assert events[-1].reason == "stop_sequence" and events[-1].stop_sequence == "42"


@pytest.mark.parametrize("split", ["boundaries", "mid-token"])
def test_the_logprobs_of_a_stop_sequences_tokens_are_not_returned(loaded_model, monkeypatch, split):
    """The logprobs cover the tokens of the text returned: a stop sequence's own tokens, whose text
    is cut, have no entries (whether the stop spans whole tokens or starts inside one, which then
    keeps its entry: part of its text was returned), streamed in pieces or not."""
    loaded = loaded_model("qwen2_5_vl")
    tokenizer = loaded.tokenizer
    pieces = ["Hello", " there", ",", " my", " friend", ".", " More", " text"]
    written = [t for piece in pieces for t in tokenizer.encode(piece, add_special_tokens=False)]
    shown_tokens = len(tokenizer.encode("Hello there,", add_special_tokens=False))
    stop = " my friend" if split == "boundaries" else "e,"  # from a token's middle: "ther|e,"
    model_writes(monkeypatch, written)

    async def body(engine):
        request = GenerationRequest("s", question(tools=()), SamplingParams(
            max_tokens=len(written), temperature=0, logprobs=0, stop_sequences=(stop, " friends")))
        return await events_of(engine, request)

    events = run_engine(loaded, body)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    entries = [entry.token for e in events if isinstance(e, TextDelta) for entry in e.logprobs]
    assert events[-1].reason == "stop_sequence" and events[-1].stop_sequence == stop
    assert text == "".join(pieces).split(stop)[0]
    kept = shown_tokens if split == "boundaries" else len(tokenizer.encode("Hello there", add_special_tokens=False))
    assert [tokenizer.decode([t]) for t in written[:kept]] == entries
    assert "".join(entries).startswith(text)


def test_a_tool_call_nested_past_jsons_depth_comes_back_as_text_not_a_failed_step(loaded_model, monkeypatch):
    loaded = loaded_model("qwen2_5_vl")
    deep = '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' + "[" * 1200 + "]" * 1200 + "}}\n</tool_call>"
    written = loaded.tokenizer.encode(deep, add_special_tokens=False)
    model_writes(monkeypatch, written)

    async def body(engine):
        request = GenerationRequest("deep", question(tools=(WEATHER,)), SamplingParams(max_tokens=len(written) + 1, temperature=0))
        return await events_of(engine, request)

    events = run_engine(loaded, body)
    assert isinstance(events[-1], Finished) and not [e for e in events if isinstance(e, ToolCallEvent)]
    assert "[" * 1200 in "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 151_936])
def test_a_bitmask_unpacks_to_the_tokens_its_bits_admit(vocab_size):
    import random

    import torch

    from localvl.engine.constraints import unpack_bitmask

    rng = random.Random(vocab_size)
    words = -(-vocab_size // 32)
    admitted = [sorted(rng.sample(range(vocab_size), min(vocab_size, k))) for k in (0, 1, 7, vocab_size)]
    bitmask = torch.zeros(len(admitted), words, dtype=torch.int32)
    for row, tokens in enumerate(admitted):
        for token in tokens:  # bit i of word j admits token 32j + i (llguidance's layout), bit 31 the sign bit
            word, bit = divmod(token, 32)
            bitmask[row, word] |= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    allowed = unpack_bitmask(bitmask, vocab_size, torch.device("cpu"))
    assert allowed.shape == (len(admitted), vocab_size) and allowed.dtype == torch.bool
    for row, tokens in enumerate(admitted):
        assert allowed[row].nonzero().flatten().tolist() == tokens
