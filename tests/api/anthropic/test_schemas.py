"""parse_body and the Messages API request models: what is accepted, and where a 400 points."""

from __future__ import annotations

import json

import pytest

from localvl.api.anthropic import schemas as s
from localvl.api.anthropic.schemas import CountTokensRequest, MessagesRequest
from localvl.api.validation import parse_body
from localvl.errors import InvalidRequestError
from tests.helpers import image_b64

DROP = object()


def body(**changes):
    request = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    request.update(changes)
    return {k: v for k, v in request.items() if v is not DROP}


def parse(request, model=MessagesRequest):
    return parse_body(model, json.dumps(request).encode())


def error_of(request=None, raw: bytes | None = None, model=MessagesRequest) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(model, raw if raw is not None else json.dumps(request).encode())
    assert caught.value.status == 400
    return caught.value.message


def user(*blocks):
    return [{"role": "user", "content": list(blocks)}]


# ----------------------------------------------------------------------------- accepted


def test_minimal_request_parses():
    request = parse(body())
    assert request.model == "claude-test"
    assert request.max_tokens == 16
    assert request.messages[0].role == "user"
    assert request.messages[0].content == "hi"
    assert request.stream is False


def test_unknown_top_level_fields_are_accepted():
    request = parse(body(service_tier="auto", container={"id": "x"}, brand_new_field=[1, 2]))
    assert request.max_tokens == 16


def test_unknown_fields_inside_blocks_are_accepted():
    request = parse(body(messages=user({"type": "text", "text": "hi", "some_future_field": {"a": 1}})))
    assert isinstance(request.messages[0].content[0], s.TextBlockParam)


def test_unknown_fields_inside_messages_and_sources_are_accepted():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64(), "x": 1}}
    request = parse(body(messages=[{"role": "user", "content": [image], "name": "bob"}]))
    assert isinstance(request.messages[0].content[0], s.ImageBlockParam)


def test_cache_control_on_blocks_is_accepted():
    ephemeral = {"type": "ephemeral", "ttl": "1h"}
    request = parse(
        body(
            system=[{"type": "text", "text": "sys", "cache_control": ephemeral}],
            messages=user(
                {"type": "text", "text": "hi", "cache_control": ephemeral},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": image_b64()},
                    "cache_control": ephemeral,
                },
            ),
            tools=[{"name": "t", "input_schema": {"type": "object"}, "cache_control": ephemeral}],
        )
    )
    assert request.messages[0].content[0].cache_control == ephemeral


def test_each_modelled_block_type_parses_to_its_model():
    request = parse(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "t"},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}},
                        {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "c"}]},
                        {"type": "tool_result", "tool_use_id": "a", "content": "r"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "xyz"},
                        {"type": "tool_use", "id": "a", "name": "f", "input": {"x": 1}},
                    ],
                },
            ]
        )
    )
    kinds = [type(block) for message in request.messages for block in message.content]
    assert kinds == [
        s.TextBlockParam,
        s.ImageBlockParam,
        s.DocumentBlockParam,
        s.SearchResultBlockParam,
        s.ToolResultBlockParam,
        s.ThinkingBlockParam,
        s.RedactedThinkingBlockParam,
        s.ToolUseBlockParam,
    ]


@pytest.mark.parametrize(
    "block",
    [
        {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {"query": "q"}},
        {"type": "web_search_tool_result", "tool_use_id": "srv_1", "content": [{"type": "web_search_result"}]},
        {"type": "code_execution_tool_result", "tool_use_id": "srv_2", "content": {}},
        {"type": "mcp_tool_use", "id": "m", "name": "x", "server_name": "s", "input": {}},
        {"type": "container_upload", "file_id": "f"},
    ],
    ids=lambda b: b["type"],
)
def test_server_tool_blocks_are_accepted_as_ignored(block):
    request = parse(body(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": [block]}]))
    parsed = request.messages[1].content[0]
    assert isinstance(parsed, s.IgnoredBlockParam)
    assert parsed.type == block["type"]


def test_system_message_role_is_accepted():
    request = parse(body(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]))
    assert request.messages[0].role == "system"


def test_sampling_fields_parse():
    request = parse(body(temperature=0.5, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:"], stream=True))
    assert (request.temperature, request.top_p, request.top_k) == (0.5, 0.9, 40)
    assert request.stop_sequences == ["\n\nHuman:"]
    assert request.stream is True


def test_integer_temperature_is_accepted():
    assert parse(body(temperature=1)).temperature == 1.0


def test_count_tokens_request_needs_no_max_tokens():
    request = parse(body(max_tokens=DROP), model=CountTokensRequest)
    assert request.model == "claude-test"


# ----------------------------------------------------------------------------- refused, with the field path


@pytest.mark.parametrize("field", ["model", "max_tokens", "messages"])
def test_missing_required_field_is_named(field):
    assert error_of(body(**{field: DROP})).startswith(f"{field}:")


def test_empty_messages_list_is_refused():
    assert error_of(body(messages=[])).startswith("messages:")


@pytest.mark.parametrize("value", [0, -1, -1000])
def test_non_positive_max_tokens_is_refused(value):
    assert error_of(body(max_tokens=value)).startswith("max_tokens:")


@pytest.mark.parametrize("value", ["16", 16.5, True, None])
def test_max_tokens_of_the_wrong_type_is_refused(value):
    assert error_of(body(max_tokens=value)).startswith("max_tokens:")


def test_messages_as_an_object_is_refused():
    assert error_of(body(messages={"role": "user", "content": "hi"})).startswith("messages:")


def test_model_as_a_number_is_refused():
    assert error_of(body(model=3)).startswith("model:")


def test_unknown_role_is_refused():
    assert error_of(body(messages=[{"role": "tool", "content": "x"}])).startswith("messages.0.role")


def test_message_without_content_is_refused():
    assert error_of(body(messages=[{"role": "user"}])).startswith("messages.0.content")


def test_message_content_of_the_wrong_type_is_refused():
    message = error_of(body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]))
    assert message.startswith("messages.1.content")


@pytest.mark.parametrize(
    "block",
    [{"type": "video", "source": {}}, {"text": "no type"}, "a bare string", {"type": 3}],
    ids=["unknown_type", "no_type", "not_an_object", "type_not_a_string"],
)
def test_unknown_block_type_is_refused_at_the_block(block):
    assert error_of(body(messages=user({"type": "text", "text": "ok"}, block))).startswith("messages.0.content.1")


def test_bad_field_inside_a_block_names_the_block():
    message = error_of(body(messages=user({"type": "text", "text": "ok"}, {"type": "text", "text": 3})))
    assert message.startswith("messages.0.content.1")
    assert message.split(":")[0].endswith("text")


def test_bad_image_media_type_is_refused():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}
    message = error_of(body(messages=user(image)))
    assert message.startswith("messages.0.content.0")
    assert message.split(":")[0].endswith("media_type")


def test_unknown_image_source_type_is_refused():
    image = {"type": "image", "source": {"type": "ftp", "url": "ftp://x"}}
    assert error_of(body(messages=user(image))).startswith("messages.0.content.0")


def test_bad_block_inside_tool_result_is_refused_at_that_block():
    block = {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "ok"}, {"type": "tool_use"}]}
    message = error_of(body(messages=user(block)))
    assert message.startswith("messages.0.content.0")
    assert message.split(":")[0].endswith("content.1")


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 1.01), ("temperature", -0.1), ("top_p", 1.5), ("top_k", -1)],
)
def test_out_of_range_sampling_parameters_are_refused(field, value):
    assert error_of(body(**{field: value})).startswith(f"{field}:")


@pytest.mark.parametrize("field, value", [("stop_sequences", "STOP"), ("stream", "yes"), ("system", 3)])
def test_wrong_types_of_optional_fields_are_refused(field, value):
    assert error_of(body(**{field: value})).startswith(f"{field}:")


def test_tool_without_a_name_is_refused():
    assert error_of(body(tools=[{"input_schema": {"type": "object"}}])).startswith("tools.0.name")


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "m",}', b'{"model": "\xff"}', b"{} trailing"])
def test_invalid_json_is_refused(raw):
    assert "JSON" in error_of(raw=raw)


@pytest.mark.parametrize("raw", [b"[]", b"3", b'"a string"', b"null", b"true"])
def test_non_object_json_is_refused(raw):
    message = error_of(raw=raw)
    assert "object" in message
    assert ":" not in message.split(" ")[0]  # no field path: the body itself is wrong


@pytest.mark.parametrize("raw", [b"", b"   \n\t"])
def test_empty_body_is_refused(raw):
    assert "empty" in error_of(raw=raw)


def test_error_message_does_not_echo_request_content():
    secret = "do-not-echo-this-value"
    message = error_of(body(max_tokens=secret))
    assert secret not in message


def test_unknown_image_source_type_is_not_echoed():
    secret = "do-not-echo-this-value"
    image = {"type": "image", "source": {"type": secret}}
    assert secret not in error_of(body(messages=user(image)))


@pytest.mark.parametrize("kind", [{"a": 1}, ["text"], 3, None])
def test_a_type_that_is_not_a_string_is_a_400_not_a_500(kind):
    # found by fuzzing: a dict as a block's type made the tag lookup raise TypeError (unhashable)
    for request in (body(messages=user({"type": kind, "text": "x"})),
                    body(messages=user({"type": "image", "source": {"type": kind, "data": "x"}}))):
        assert error_of(request)
        assert error_of(request, model=CountTokensRequest)


def test_a_body_nested_past_the_parser_limit_is_named_for_that_not_as_invalid_json():
    deep = '{"a":' * 250 + "1" + "}" * 250
    raw = ('{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"metadata":' + deep + "}").encode()
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(MessagesRequest, raw)
    assert "nests deeper than" in caught.value.message
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_body(MessagesRequest, raw.replace(deep.encode(), b'{"a":1'))
