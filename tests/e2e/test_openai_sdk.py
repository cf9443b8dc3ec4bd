"""The official ``openai`` SDK against a running ``localvl serve`` — only the base URL changed."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import image_b64

USER = [{"role": "user", "content": "Describe a cat in one sentence."}]


def image_messages(text: str = "What is in this image?") -> list[dict]:
    url = "data:image/png;base64," + image_b64("PNG", size=(120, 80))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_create_returns_a_well_formed_completion(oai, server):
    completion = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=8, temperature=0)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == "tiny-vl" and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert 0 < usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the same rendering path as Anthropic's count_tokens
    counted = anthropic.Anthropic(base_url=server.url, api_key=API_KEY).messages.count_tokens(model="tiny-vl", messages=USER)
    assert usage.prompt_tokens == counted.input_tokens


def test_an_image_as_a_data_url_is_read_and_counted(oai):
    with_image = oai.chat.completions.create(model="tiny-vl", messages=image_messages(), max_tokens=4)
    text_only = oai.chat.completions.create(
        model="tiny-vl", messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=4
    )
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    # clients label every image "image/jpeg" (OpenAI's own examples do): the PNG bytes decide, as at OpenAI
    mislabelled = image_messages()
    part = mislabelled[0]["content"][0]["image_url"]
    part["url"] = part["url"].replace("data:image/png;", "data:image/jpeg;")
    assert oai.chat.completions.create(model="tiny-vl", messages=mislabelled, max_tokens=4).usage.prompt_tokens == (
        with_image.usage.prompt_tokens)


def test_streaming_equals_the_whole_answer_and_ends_with_usage(oai):
    whole = oai.chat.completions.create(model="tiny-vl", messages=image_messages(), max_tokens=12, temperature=0)
    chunks = list(oai.chat.completions.create(
        model="tiny-vl", messages=image_messages(), max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_n_choices_with_a_seed_are_reproducible(oai):
    def ask():
        return oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=10, n=3, temperature=1.0, seed=5)

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # each choice has its own seed
    assert 3 <= first.usage.completion_tokens <= 30  # summed over the choices


def test_streamed_choices_arrive_by_index(oai):
    chunks = list(oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=6, n=2, temperature=1.0, seed=1, stream=True))
    indexes = {c.choices[0].index for c in chunks if c.choices}
    assert indexes == {0, 1}
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 2


def test_more_choices_than_the_queue_holds_run_on_an_idle_server(one_at_a_time_server):
    """--max-queue 1 --max-num-seqs 1: the limit admits the request, all 16 choices (n's most) or none."""
    client = openai.OpenAI(base_url=one_at_a_time_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    ask = dict(model="tiny-vl", messages=USER, max_tokens=4, n=16, temperature=1.0, seed=3)
    assert [c.index for c in client.chat.completions.create(**ask).choices] == list(range(16))
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == list(range(16))
    # every choice ended and left the queue: a request on its own is admitted after them
    assert client.chat.completions.create(**{**ask, "n": 1}).choices[0].index == 0


def test_a_stop_string_cuts_the_answer(oai):
    full = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=30, temperature=0).choices[0].message.content
    assert len(full) >= 4
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_stop_strings_tokens_have_no_logprobs(oai):
    """The logprobs are those of the text returned: the tokens of the stop, cut from the text, are
    not listed (streamed or not)."""
    ask = dict(model="tiny-vl", messages=USER, max_tokens=30, temperature=0, logprobs=True)
    full = oai.chat.completions.create(**ask).choices[0]
    tokens = [entry.token for entry in full.logprobs.content]
    text = full.message.content
    # a stop made of two whole tokens, met first where they stand (a random model's text may hold
    # U+FFFD halves, where token texts and the text part ways: such spots are passed over)
    cuts = [k for k in range(1, len(tokens) - 2) if "".join(tokens[:k + 2]) == text[: len("".join(tokens[:k + 2]))]
            and text.find(tokens[k] + tokens[k + 1]) == len("".join(tokens[:k]))]
    assert cuts
    k = cuts[len(cuts) // 2]
    stop = tokens[k] + tokens[k + 1]
    cut = oai.chat.completions.create(**ask, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == "".join(tokens[:k])
    assert [entry.token for entry in cut.logprobs.content] == tokens[:k]
    chunks = list(oai.chat.completions.create(**ask, stop=[stop], stream=True))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == tokens[:k]


def test_max_completion_tokens_ends_with_length(oai):
    completion = oai.chat.completions.create(model="tiny-vl", messages=USER, max_completion_tokens=2, temperature=0)
    assert completion.usage.completion_tokens <= 2
    if completion.usage.completion_tokens == 2:
        assert completion.choices[0].finish_reason == "length"


def test_a_repeated_prompt_reports_cached_tokens(oai):
    messages = [{"role": "user", "content": "A question long enough to fill a few cache blocks. " * 6}]
    oai.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=2)
    again = oai.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_errors_map_to_the_sdk_exception_classes(oai, server):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="no-such-model", messages=USER)
    assert missing.value.body["code"] == "model_not_found" and "`no-such-model` does not exist" in missing.value.body["message"]
    assert missing.value.request_id and missing.value.request_id.startswith("req_")  # the SDK reads x-request-id
    assert oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=2)._request_id.startswith("req_")
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny-vl", messages=[])
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["message"].startswith("messages")
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        oai.chat.completions.create(model="tiny-vl", messages=USER, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(model="tiny-vl", messages=USER)


def test_an_endpoint_this_server_lacks_is_a_404_in_openais_envelope_without_a_model_code(oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.embeddings.create(model="tiny-vl", input="hello")
    assert missing.value.type == "invalid_request_error" and missing.value.code is None
    assert "/v1/embeddings" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as stored:  # what a `store: true` user tries next
        oai.chat.completions.retrieve("chatcmpl-abc")
    assert stored.value.code is None


def test_models_list_serves_both_sdks(oai, server):
    models = oai.models.list()
    assert "tiny-vl" in [m.id for m in models.data]
    model = oai.models.retrieve("tiny-vl")
    assert model.object == "model" and model.owned_by == "localvl" and model.created > 0
    listed = anthropic.Anthropic(base_url=server.url, api_key=API_KEY).models.list()
    assert "tiny-vl" in [m.id for m in listed.data]
    with pytest.raises(openai.NotFoundError) as missing:  # each SDK reads its own error envelope
        oai.models.retrieve("nope")
    assert missing.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as gone:
        anthropic.Anthropic(base_url=server.url, api_key=API_KEY).models.retrieve("nope")
    assert gone.value.body["error"]["type"] == "not_found_error"


def test_logit_bias_reaches_the_sampler(oai):
    pushed = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=4, temperature=0, logprobs=True,
                                         logit_bias={"300": 100})
    tokens = [entry.token for entry in pushed.choices[0].logprobs.content]
    assert len(tokens) == 4 and len(set(tokens)) == 1 and pushed.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=2, logit_bias={"999999999": 1})


def test_logprobs_have_openais_shape_streamed_or_not(oai):
    whole = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    ended = whole.choices[0].finish_reason == "stop"
    assert len(content) == whole.usage.completion_tokens - ended  # the end-of-turn token has no entry
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
    chunks = list(oai.chat.completions.create(
        model="tiny-vl", messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
    ))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as alone:  # alternatives asked for without logprobs: none would come
        oai.chat.completions.create(model="tiny-vl", messages=USER, max_tokens=2, top_logprobs=2)
    assert alone.value.param == "top_logprobs"


def test_a_streaming_client_that_leaves_stops_every_choice(server):
    import time

    import httpx

    aborted_before = server.log().count(" aborted")
    payload = {"model": "tiny-vl", "max_tokens": 30000, "stream": True, "n": 2, "temperature": 1,
               "messages": [{"role": "user", "content": "Write a very long story."}]}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=payload, headers=headers, timeout=60) as response:
        # Leave at the first text: the longer a client stays, the likelier a random model at
        # temperature 1 ends a choice itself (then only the other one is aborted).
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break
    deadline = time.monotonic() + 30
    while server.log().count(" aborted") < aborted_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count(" aborted") == aborted_before + 2  # both choices of the request


def test_a_prompt_past_the_context_is_context_length_exceeded_in_openais_sentence(small_context_server):
    """Clients read OpenAI's sentence for the two numbers (and LiteLLM-based ones for the kind)."""
    client = openai.OpenAI(base_url=small_context_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "many words " * 60}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=4)
    counted = anthropic.Anthropic(base_url=small_context_server.url, api_key=API_KEY).messages.count_tokens(
        model="tiny-vl", messages=messages).input_tokens
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    assert f"maximum context length is 64 tokens. However, your messages resulted in {counted} tokens" in caught.value.message
