import pydantic
import pytest

from localvl.api.openai.convert import UNLIMITED, conversation_from, generation_requests
from localvl.api.openai.schemas import ChatCompletionRequest
from localvl.conversation import Image, Text
from localvl.errors import InvalidRequestError
from tests.helpers import image_b64


def body(**fields):
    fields.setdefault("model", "m")
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(fields)


def test_roles_map_to_turns_and_consecutive_ones_merge():
    conv = conversation_from(body(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "and kind"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64("PNG"), "detail": "low"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more"},
    ]))
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user"]
    assert [type(p) for p in conv.turns[0].parts] == [Text, Text]
    assert isinstance(conv.turns[1].parts[1], Image) and conv.turns[1].parts[1].media_type == "image/png"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type: only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice: 'required' needs"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages.1.tool_calls.0.function.arguments: not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}, "messages.1.tool_call_id"),
        ({"messages": [{"role": "function", "name": "f", "content": "42"}]}, "messages.0.role: legacy function"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "messages.0.content.0.image_url.url: the image was not fetched"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         "messages.0.content.0.image_url.url: expected a data: URL or an http"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
         "only base64 data URLs"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "content parts of type 'input_audio' are not supported yet"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "at least one user message"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content: user messages must have non-empty content"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         'tools.0.function.parameters: must be a JSON schema of type "object"'),
        ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
         "tools.1.function.name: function names must be unique"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": ["f"]}}},
         "tool_choice.function.name: tool \\['f'\\] is not in tools"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":' + "[" * 5000 + "]" * 5000 + "}"}}]}]},
         "messages.1.tool_calls.0.function.arguments: not valid JSON"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name: string does not match pattern"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto"}, "functions: legacy functions"),
        ({"function_call": "none"}, "function_call: legacy functions"),
        ({"modalities": ["text", "audio"]}, r'modalities: only \["text"\]'),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio: audio output is not supported"),
        ({"top_logprobs": 3}, "top_logprobs: logprobs must be set to true"),
        ({"top_logprobs": 3, "logprobs": False}, "top_logprobs: logprobs must be set to true"),
    ],
)
def test_what_cannot_be_honoured_is_a_clear_400(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        generation_requests("c", body(**fields))


def test_one_request_per_choice_with_consecutive_seeds_and_stop_strings():
    requests = generation_requests("chatcmpl-x", body(n=3, seed=10, stop="END", max_completion_tokens=7, max_tokens=99))
    assert [r.id for r in requests] == ["chatcmpl-x-0", "chatcmpl-x-1", "chatcmpl-x-2"]
    assert [r.sampling.seed for r in requests] == [10, 11, 12]
    assert all(r.sampling.stop_sequences == ("END",) and r.sampling.max_tokens == 7 for r in requests)
    assert generation_requests("c", body())[0].sampling.max_tokens == UNLIMITED


def test_n_null_is_one_choice_and_a_seed_must_fit_64_bits():
    assert len(generation_requests("c", body(n=None))) == 1
    assert generation_requests("c", body(seed=-(2**63)))[0].sampling.seed == -(2**63)
    for seed in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(pydantic.ValidationError, match="seed"):
            body(seed=seed)


def test_a_data_urls_image_is_read_by_its_bytes_whatever_its_label():
    from tests.helpers import image_bytes

    import base64

    jpeg = base64.b64encode(image_bytes("JPEG")).decode()
    # the bytes decide, as OpenAI's API and vLLM read them: a JPEG labelled PNG is a JPEG
    for header in ("image/jpg", "IMAGE/JPEG", "image/jpeg", "image/png", "application/octet-stream", ""):
        content = [{"type": "image_url", "image_url": {"url": f"data:{header};base64,{jpeg}"}}, {"type": "text", "text": "hi"}]
        (request,) = generation_requests("c", body(messages=[{"role": "user", "content": content}]))
        image = request.conversation.turns[0].parts[0]
        assert isinstance(image, Image) and image.media_type == "image/jpeg"
    with pytest.raises(InvalidRequestError, match="not a supported image"):  # what is no image stays a 400
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"%PDF-1.7").decode()}}]
        generation_requests("c", body(messages=[{"role": "user", "content": content}]))


def test_penalties_pass_through_and_unknown_fields_are_accepted():
    (request,) = generation_requests("c", body(presence_penalty=0.5, frequency_penalty=-1, user="u", store=True, metadata={"a": "b"}))
    assert (request.sampling.presence_penalty, request.sampling.frequency_penalty) == (0.5, -1.0)
    assert request.sampling.repetition_penalty is None  # the model folder's


def test_a_key_error_speaks_of_openais_header_not_anthropics():
    from localvl.api.openai.errors import error_json
    from localvl.errors import AuthenticationError

    wrong, missing = error_json(AuthenticationError("invalid x-api-key")), error_json(AuthenticationError("x-api-key header is required"))
    assert wrong["code"] == missing["code"] == "invalid_api_key" and "x-api-key" not in wrong["message"] + missing["message"]
    assert wrong["message"] == "Incorrect API key provided." and "Bearer" in missing["message"]


def test_a_model_not_served_is_named_in_openais_words():
    from localvl.api.openai.errors import error_json
    from localvl.errors import NotFoundError

    missing = error_json(NotFoundError("model: gpt-4o"))
    assert missing["code"] == "model_not_found" and missing["param"] is None
    assert missing["message"] == "The model `gpt-4o` does not exist or you do not have access to it."
    assert error_json(NotFoundError("no route /v1/embeddings"))["message"] == "no route /v1/embeddings"


def test_a_prompt_too_long_is_context_length_exceeded_in_openais_words():
    from localvl.api.openai.errors import error_json
    from localvl.errors import ContextLengthError

    body = error_json(ContextLengthError("prompt is too long: 10 tokens > 5 maximum", tokens=10, limit=5))
    assert body == {"message": "This model's maximum context length is 5 tokens. However, your messages resulted in 10 tokens. "
                               "Please reduce the length of the messages.",
                    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
    assert error_json(InvalidRequestError("x"))["code"] is None


def test_logit_bias_takes_token_ids_as_strings_and_biases_within_100():
    assert generation_requests("c", body(logit_bias={"12": 5, "7": -100}))[0].sampling.logit_bias == ((12, 5.0), (7, -100.0))
    for bias, message in (({"abc": 1}, "'abc' is not a token id"), ({"5": 101}, "logit_bias.5: 101"),
                          ({"²": 1}, "'²' is not a token id"), ({"9" * 5000: 1}, "is not a token id")):
        with pytest.raises(InvalidRequestError, match=message):
            generation_requests("c", body(logit_bias=bias))


def test_a_400_names_its_field_as_param():
    from localvl.api.openai.errors import error_json

    assert error_json(InvalidRequestError("temperature: Input should be less than or equal to 2"))["param"] == "temperature"
    assert error_json(InvalidRequestError("messages.0.content: user messages must have non-empty content"))["param"] == "messages.0.content"
    assert error_json(InvalidRequestError("the model's chat template rejected the conversation: x"))["param"] is None


def test_tool_calls_and_tool_messages_pair_up_as_openais_api_requires():
    user = {"role": "user", "content": "hi"}
    asked = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}

    def refused(messages):
        with pytest.raises(InvalidRequestError) as caught:
            conversation_from(body(messages=messages))
        return caught.value.message

    answer = lambda id: {"role": "tool", "tool_call_id": id, "content": "42"}  # noqa: E731
    assert refused([user, answer("call_1")]).startswith("messages.1.role: messages with role 'tool' must be a response")
    assert refused([user, asked, answer("call_9")]).startswith("messages.2.tool_call_id: 'call_9' not found in 'tool_calls'")
    assert refused([user, asked, answer("call_2"), user]).endswith("did not have response messages: call_1")
    conv = conversation_from(body(messages=[user, asked, answer("call_2"), answer("call_1"), user]))
    assert [t.role for t in conv.turns] == ["user", "assistant", "user"]
    conversation_from(body(messages=[user, asked]))  # a prefill's calls, not yet answered


def test_a_cut_off_calls_unclosed_arguments_sent_back_render_as_far_as_they_go():
    from localvl.conversation import ToolCall

    def sent_back(arguments):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "r"}]
        (request,) = generation_requests("c", body(messages=messages))
        return [p.input for turn in request.conversation.turns for p in turn.parts if isinstance(p, ToolCall)]

    assert sent_back('{"city": "Par') == [{"city": "Par"}]
    assert sent_back('{"days": [1, 2') == [{"days": [1, 2]}]
    assert sent_back('{"city":') == [{}]
    for unreadable in ("not json", "[1, 2"):
        with pytest.raises(InvalidRequestError, match="arguments: not valid JSON"):
            sent_back(unreadable)


def test_an_earlier_refusal_in_the_history_is_skipped_not_refused():
    history = [{"role": "user", "content": "hi"}, None, {"role": "user", "content": "ok"}]
    for refusal in ({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                    {"role": "assistant", "content": None, "refusal": "I can't help with that"}):
        history[1] = refusal
        assert [t.role for t in conversation_from(body(messages=history)).turns] == ["user"]


def test_an_earlier_answer_that_said_nothing_is_taken_back():
    # This API answers "" when a turn wrote no text (max_tokens 1, say); an agent loop sends it back.
    for said_nothing in ("", [], [{"type": "text", "text": ""}]):
        history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": said_nothing, "refusal": None},
                   {"role": "user", "content": "again"}]
        turns = conversation_from(body(messages=history)).turns
        assert turns[0].role == "user" and turns[-1].role == "user" and len(turns) in (1, 3)
    with pytest.raises(InvalidRequestError, match="messages.1.content: assistant messages must have non-empty content"):
        conversation_from(body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                                         {"role": "user", "content": "again"}]))  # null without calls: OpenAI's 400 too


def test_reasoning_sent_back_with_a_tool_call_is_the_turns_thinking():
    """A tool loop sends back the answer it got, reasoning_content and all: a thinking template
    renders that reasoning in the turns after the last user message, as the model wrote it."""
    from localvl.conversation import Thinking, ToolCall

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer = {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "need f"}
    history = [{"role": "user", "content": "hi"}, answer, {"role": "tool", "tool_call_id": "c1", "content": "r"}]
    assert conversation_from(body(messages=history)).turns[1].parts == [Thinking("need f"), ToolCall("c1", "f", {})]
    # reasoning alone, with no answer, stays skipped as an empty answer is
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "reasoning_content": "hm"},
               {"role": "user", "content": "again"}]
    assert [t.role for t in conversation_from(body(messages=history)).turns] == ["user"]
    with pytest.raises(InvalidRequestError, match=r"messages.1.reasoning_content: Input should be a valid string"):
        conversation_from(body(messages=[{"role": "user", "content": "hi"}, {**answer, "reasoning_content": 3},
                                         {"role": "tool", "tool_call_id": "c1", "content": "r"}]))
