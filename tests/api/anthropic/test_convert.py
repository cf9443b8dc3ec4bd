"""Anthropic request bodies -> the neutral Conversation / GenerationRequest."""

from __future__ import annotations

import base64
import json

import pytest

from localvl.api.anthropic.convert import conversation_from, generation_request
from localvl.api.anthropic.schemas import CountTokensRequest, MessagesRequest
from localvl.api.validation import parse_body
from localvl.conversation import Image, Text, Thinking, Tool, ToolCall, ToolResult
from localvl.errors import InvalidRequestError
from localvl.prompt.render import template_tools, tool_definition
from tests.helpers import image_b64


def request(messages, **fields):
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 32, "messages": messages, **fields}, strict=False)


def convert(messages, **fields):
    return conversation_from(request(messages, **fields))


def refused(messages, **fields) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        convert(messages, **fields)
    return caught.value.message


def roles(conversation):
    return [turn.role for turn in conversation.turns]


def image_block(fmt="PNG", media_type="image/png", **kwargs):
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": image_b64(fmt, **kwargs)}}


USER = {"role": "user", "content": "hello"}


# ----------------------------------------------------------------------------- turns


def test_plain_user_message():
    conversation = convert([USER])
    assert roles(conversation) == ["user"]
    assert conversation.turns[0].parts == [Text("hello")]
    assert conversation.prefill is None
    assert conversation.tools == []


def test_system_string_becomes_a_leading_system_turn():
    conversation = convert([USER], system="be brief")
    assert roles(conversation) == ["system", "user"]
    assert conversation.turns[0].parts == [Text("be brief")]


def test_system_blocks_become_one_leading_system_turn():
    conversation = convert([USER], system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])
    assert roles(conversation) == ["system", "user"]
    assert conversation.turns[0].text == "one\ntwo"


@pytest.mark.parametrize("system", ["", []])
def test_empty_system_adds_no_turn(system):
    assert roles(convert([USER], system=system)) == ["user"]


def test_system_role_message_stays_in_place():
    conversation = convert(
        [USER, {"role": "assistant", "content": "hi"}, {"role": "system", "content": "new rule"}, {"role": "user", "content": "ok"}]
    )
    assert roles(conversation) == ["user", "assistant", "system", "user"]
    assert conversation.turns[2].parts == [Text("new rule")]


def test_leading_system_message_follows_the_system_field():
    conversation = convert([{"role": "system", "content": "b"}, USER], system="a")
    assert roles(conversation) == ["system", "user"]
    assert conversation.turns[0].parts == [Text("a"), Text("b")]


def test_consecutive_same_role_messages_merge():
    conversation = convert(
        [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "five"},
        ]
    )
    assert roles(conversation) == ["user", "assistant", "user"]
    assert conversation.turns[0].parts == [Text("one"), Text("two")]
    assert conversation.turns[1].parts == [Text("three"), Text("four")]


def test_final_assistant_turn_is_a_prefill():
    conversation = convert([USER, {"role": "assistant", "content": "The answer is"}])
    assert roles(conversation) == ["user", "assistant"]
    assert conversation.prefill is conversation.turns[-1]
    assert conversation.prefill.text == "The answer is"


@pytest.mark.parametrize("content", ["", [], [{"type": "text", "text": ""}]], ids=["string", "list", "empty_block"])
def test_empty_final_assistant_turn_is_dropped(content):
    conversation = convert([USER, {"role": "assistant", "content": content}])
    assert roles(conversation) == ["user"]
    assert conversation.prefill is None


def test_empty_assistant_turn_before_the_end_is_refused():
    message = refused([USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}])
    assert message.startswith("messages.1")


def test_first_non_system_turn_from_assistant_is_refused():
    assert refused([{"role": "assistant", "content": "hi"}, USER]).startswith("messages")


def test_assistant_first_after_a_system_message_is_refused():
    assert refused([{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}]).startswith("messages")


def test_only_system_messages_are_refused():
    assert refused([{"role": "system", "content": "s"}], system="t").startswith("messages")


@pytest.mark.parametrize("content", ["", []], ids=["string", "list"])
def test_empty_user_content_is_refused(content):
    assert refused([{"role": "user", "content": content}]).startswith("messages.0")


def test_empty_user_text_block_is_refused_at_the_block():
    message = refused([{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": ""}]}])
    assert message.startswith("messages.0.content.1")


def test_empty_text_block_inside_assistant_turn_is_skipped():
    conversation = convert([USER, {"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "x"}]}])
    assert conversation.turns[1].parts == [Text("x")]


# ----------------------------------------------------------------------------- tools


def test_tool_use_in_assistant_turn_becomes_a_tool_call():
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    conversation = convert([USER, {"role": "assistant", "content": [call]}])
    assert conversation.turns[1].parts == [ToolCall("toolu_1", "get_weather", {"city": "Oslo"})]


def test_tool_use_in_user_turn_is_refused():
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    assert refused([{"role": "user", "content": [{"type": "text", "text": "x"}, call]}]).startswith("messages.0.content.1")


def test_tool_result_in_assistant_turn_is_refused():
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}
    assert refused([USER, {"role": "assistant", "content": [result]}]).startswith("messages.1.content.0")


def answered(*results):
    """A user turn answering calls of the assistant turn before it: the turns for ``convert``."""
    calls = [{"type": "tool_use", "id": r["tool_use_id"], "name": "f", "input": {}} for r in results]
    return [USER, {"role": "assistant", "content": calls}, {"role": "user", "content": list(results)}]


def test_tool_result_with_string_content():
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    part = convert(answered(result)).turns[2].parts[0]
    assert part == ToolResult("toolu_1", (Text("sunny"),), False)


def test_tool_result_with_text_and_image_blocks():
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "is_error": True,
        "content": [{"type": "text", "text": "see"}, image_block(size=(20, 10))],
    }
    part = convert(answered(result)).turns[2].parts[0]
    assert isinstance(part, ToolResult)
    assert part.tool_call_id == "toolu_1"
    assert part.is_error is True
    assert part.content[0] == Text("see")
    assert isinstance(part.content[1], Image)
    assert part.content[1].size == (20, 10)


def test_tool_result_without_content_is_empty():
    part = convert(answered({"type": "tool_result", "tool_use_id": "a"})).turns[2].parts[0]
    assert part == ToolResult("a", (), False)


def test_a_tool_search_result_of_tool_references_reads_as_the_definitions_it_found():
    """A deferred tool is in no list the model saw: the reference brings its definition, where
    Anthropic expands it; a listed tool's reference names it."""
    tools = [{"name": n, "description": f"does {n}", "input_schema": {"type": "object"}, "defer_loading": n != "f"}
             for n in ("f", "g", "h")]
    refs = [{"type": "tool_reference", "tool_name": "g"}, {"type": "tool_reference", "tool_name": "f"}]
    conversation = convert(answered({"type": "tool_result", "tool_use_id": "a", "content": refs}), tools=tools)
    found, named = conversation.turns[2].parts[0].content
    assert json.loads(found.text) == tool_definition(conversation.tools[1]) and named == Text("\nf")
    assert [t.deferred for t in conversation.tools] == [False, True, True]
    assert [t["function"]["name"] for t in template_tools(conversation)] == ["f"]  # the list leaves deferred ones out
    stray = answered({"type": "tool_result", "tool_use_id": "a", "content": [{"type": "tool_reference", "tool_name": "zz"}]})
    assert refused(stray, tools=tools).startswith("messages.2.content.0.content.0.tool_name: ")


def test_every_tool_deferred_lists_them_all():
    """Only a client's own search can find deferred tools; with no tool listed there is none."""
    tools = [{"name": n, "input_schema": {"type": "object"}, "defer_loading": True} for n in ("g", "h")]
    conversation = convert([{"role": "user", "content": "hi"}], tools=tools)
    assert not any(t.deferred for t in conversation.tools) and len(template_tools(conversation)) == 2


def test_tool_result_image_is_found_by_conversation_images():
    result = {"type": "tool_result", "tool_use_id": "a", "content": [image_block()]}
    assert len(convert(answered(result)).images()) == 1


def test_calls_and_results_pair_up_as_anthropics_api_requires():
    call = lambda id: {"type": "tool_use", "id": id, "name": "f", "input": {}}  # noqa: E731
    result = lambda id: {"type": "tool_result", "tool_use_id": id, "content": "r"}  # noqa: E731
    text = {"type": "text", "text": "and?"}
    assert refused([{"role": "user", "content": [result("t1")]}]) == (
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: t1. Each `tool_result` "
        "block must have a corresponding `tool_use` block in the previous message."
    )
    assert refused([USER, {"role": "assistant", "content": [call("t1")]}, {"role": "user", "content": [text, result("t1")]}]) == (
        "messages.2: Did not find 1 `tool_result` block(s) at the beginning of this message. Messages following "
        "`tool_use` blocks must begin with a matching number of `tool_result` blocks."
    )
    assert refused([USER, {"role": "assistant", "content": [call("t1"), call("t2")]}, {"role": "user", "content": [result("t2")]}]) == (
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: t1. Each `tool_use` "
        "block must have a corresponding `tool_result` block in the next message."
    )
    assert refused([USER, {"role": "assistant", "content": [call("t1"), call("t1")]}]).startswith("messages.1.content.1: `tool_use` ids must be unique")
    later = [{"role": "assistant", "content": [call("t2")]}, {"role": "user", "content": [result("t2"), result("t1")]}]
    assert refused(answered(result("t1")) + later).startswith("messages.4.content.1: unexpected `tool_use_id`")  # not an older call
    # Answered in any order, text after the results, and a prefill's calls not yet answered: fine.
    convert([USER, {"role": "assistant", "content": [call("a"), call("b")]}, {"role": "user", "content": [result("b"), result("a"), text]}])
    convert([USER, {"role": "assistant", "content": [call("a")]}])


def test_tools_with_input_schema_become_tools_and_server_tools_are_dropped():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    conversation = convert(
        [USER],
        tools=[
            {"name": "get_weather", "description": "weather", "input_schema": schema},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            {"name": "no_description", "input_schema": {"type": "object"}},
        ],
    )
    assert conversation.tools == [
        Tool("get_weather", "weather", schema),
        Tool("no_description", None, {"type": "object"}),
    ]


# ----------------------------------------------------------------------------- images and documents


@pytest.mark.parametrize(
    "fmt, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_base64_image_block_becomes_an_image_part(fmt, media_type):
    conversation = convert([{"role": "user", "content": [image_block(fmt, media_type, size=(30, 20)), {"type": "text", "text": "what?"}]}])
    image, text = conversation.turns[0].parts
    assert isinstance(image, Image)
    assert image.size == (30, 20)
    assert image.media_type == media_type
    assert text == Text("what?")


def test_image_with_mismatched_media_type_is_refused_at_the_source():
    message = refused([{"role": "user", "content": [image_block("PNG", "image/jpeg")]}])
    assert message.startswith("messages.0.content.0.source")


def test_image_with_invalid_base64_is_refused_at_the_data():
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@not base64@@"}}
    assert refused([{"role": "user", "content": [block]}]).startswith("messages.0.content.0.source.data")


def test_file_sources_read_what_the_route_loaded():
    message = refused([{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "file_123"}}]}])
    assert message.startswith("messages.0.content.0.source.file_id: the file was not loaded")


def test_url_images_are_found_wherever_they_sit_and_read_from_what_was_fetched():
    from localvl.api.anthropic import schemas as s
    from localvl.api.anthropic.convert import conversation_from, image_urls
    from tests.helpers import image_bytes

    url = {"type": "image", "source": {"type": "url", "url": "https://img.example/a.png"}}
    body = s.MessagesRequest.model_validate({"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": [url, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [url]},
                                     {"type": "document", "source": {"type": "content", "content": [url]}}]},
    ]}, strict=False)
    assert image_urls(body) == [
        ("https://img.example/a.png", "messages.0.content.0.source.url"),
        ("https://img.example/a.png", "messages.2.content.0.content.0.source.url"),
        ("https://img.example/a.png", "messages.2.content.1.source.content.0.source.url"),
    ]
    from localvl.media.context import Media

    conv = conversation_from(body, media=Media(fetched={"https://img.example/a.png": image_bytes("PNG")}))
    assert len(conv.images()) == 3 and conv.images()[0].media_type == "image/png"
    with pytest.raises(InvalidRequestError, match="not fetched"):
        conversation_from(body)


def test_uploaded_images_are_found_inside_content_documents_and_tool_results():
    from localvl.api.anthropic.convert import file_ids

    picture = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    body = request([
        {"role": "user", "content": [{"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "p"}, picture]}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "document", "source": {"type": "content", "content": [picture]}}]}]},
    ])
    assert file_ids(body) == [
        ("file_1", "messages.0.content.0.source.content.1.source.file_id"),
        ("file_1", "messages.2.content.0.content.0.source.content.0.source.file_id"),
    ]


@pytest.mark.parametrize("item", [None, "a", 5, ["x"]])
def test_a_content_document_item_that_is_no_block_is_refused_where_it_is(item):
    from localvl.api.anthropic.convert import file_ids, image_urls

    for kind in ("content", "text"):  # the media finders look into any source's content list
        body = request([{"role": "user", "content": [{"type": "document", "source": {"type": kind, "content": [item]}}]}])
        assert image_urls(body) == [] and file_ids(body) == []
    message = refused([{"role": "user", "content": [{"type": "document", "source": {"type": "content", "content": [item]}}]}])
    assert message.startswith("messages.0.content.0.source.content.0: ")


def test_document_with_text_source_becomes_text():
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "the body"}}
    assert convert([{"role": "user", "content": [document]}]).turns[0].parts == [Text("the body")]


def test_document_title_and_context_come_before_the_body():
    document = {
        "type": "document",
        "title": "Title",
        "context": "Context",
        "source": {"type": "text", "media_type": "text/plain", "data": "the body"},
    }
    parts = convert([{"role": "user", "content": [document]}]).turns[0].parts
    assert parts[-1] == Text("the body")
    heading = "".join(p.text for p in parts[:-1])
    assert heading.index("Title") < heading.index("Context")


def test_document_with_string_content_source_becomes_text():
    document = {"type": "document", "source": {"type": "content", "content": "inline body"}}
    assert convert([{"role": "user", "content": [document]}]).turns[0].parts == [Text("inline body")]


def test_document_with_content_blocks_becomes_text_and_image_parts():
    document = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": "page one"}, image_block(size=(12, 8))]},
    }
    parts = convert([{"role": "user", "content": [document]}]).turns[0].parts
    assert parts[0] == Text("page one")
    assert isinstance(parts[1], Image)
    assert parts[1].size == (12, 8)


def test_document_content_block_of_another_type_is_refused():
    document = {"type": "document", "source": {"type": "content", "content": [{"type": "tool_use"}]}}
    assert refused([{"role": "user", "content": [document]}]).startswith("messages.0.content.0.source.content.0")


def test_pdf_documents_become_pages_with_title_and_context():
    from tests.helpers import pdf_bytes

    data = base64.b64encode(pdf_bytes(["Total 99 EUR"])).decode()
    document = {"type": "document", "title": "Invoice", "context": "from ACME",
                "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    parts = convert([{"role": "user", "content": [document]}]).turns[0].parts
    assert parts[0] == Text("Invoice\nfrom ACME\n") and parts[1] == Text("Page 1:\n")
    assert isinstance(parts[2], Image) and "Total 99 EUR" in parts[3].text
    not_pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjcK"}}
    assert refused([{"role": "user", "content": [not_pdf]}]).startswith("messages.0.content.0.source: the PDF could not be read")
    wrong_type = {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": "aGk="}}
    assert refused([{"role": "user", "content": [wrong_type]}]).startswith("messages.0.content.0.source.media_type")


def test_malformed_image_inside_a_document_is_refused_as_invalid_request():
    bad_image = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": image_b64()}}
    document = {"type": "document", "source": {"type": "content", "content": [bad_image]}}
    with pytest.raises(InvalidRequestError):
        convert([{"role": "user", "content": [document]}])


def test_search_result_becomes_text_with_title_source_and_content():
    block = {
        "type": "search_result",
        "source": "https://example.com",
        "title": "Result",
        "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
    }
    (part,) = convert([{"role": "user", "content": [block]}]).turns[0].parts
    assert isinstance(part, Text)
    for piece in ("Result", "https://example.com", "first", "second"):
        assert piece in part.text


# ----------------------------------------------------------------------------- thinking and ignored blocks


def test_thinking_block_becomes_thinking_part():
    thinking = {"type": "thinking", "thinking": "let me see", "signature": "sig"}
    conversation = convert([USER, {"role": "assistant", "content": [thinking, {"type": "text", "text": "42"}]}])
    assert conversation.turns[1].parts == [Thinking("let me see", "sig"), Text("42")]


def test_redacted_thinking_and_server_tool_blocks_are_dropped():
    blocks = [
        {"type": "redacted_thinking", "data": "xyz"},
        {"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}},
        {"type": "web_search_tool_result", "tool_use_id": "srv", "content": []},
        {"type": "text", "text": "found it"},
    ]
    conversation = convert([USER, {"role": "assistant", "content": blocks}])
    assert conversation.turns[1].parts == [Text("found it")]


def test_an_assistant_turn_of_only_unreadable_blocks_is_skipped_not_refused():
    server_only = {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xyz"}]}
    conversation = convert([USER, server_only, {"role": "user", "content": "next"}])
    assert roles(conversation) == ["user"]
    assert conversation.turns[0].parts == [Text("hello"), Text("next")]
    assert "non-empty" in refused([USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------- generation_request


def test_generation_request_carries_sampling_parameters():
    generation = generation_request(
        "msg_1",
        request([USER], temperature=0.3, top_p=0.8, top_k=20, stop_sequences=["END", "\n\n"], max_tokens=77),
    )
    assert generation.id == "msg_1"
    sampling = generation.sampling
    assert sampling.max_tokens == 77
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.3, 0.8, 20)
    assert sampling.stop_sequences == ("END", "\n\n")
    assert roles(generation.conversation) == ["user"]


def test_unset_sampling_parameters_stay_none():
    sampling = generation_request("msg_1", request([USER])).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (None, None, None)
    assert sampling.stop_sequences == ()


def test_top_k_zero_means_unset():
    assert generation_request("msg_1", request([USER], top_k=0)).sampling.top_k is None


def test_temperature_zero_is_kept():
    assert generation_request("msg_1", request([USER], temperature=0)).sampling.temperature == 0


def test_works_from_a_parsed_json_body():
    raw = json.dumps({"model": "m", "max_tokens": 5, "system": "s", "messages": [USER]}).encode()
    generation = generation_request("msg_2", parse_body(MessagesRequest, raw))
    assert roles(generation.conversation) == ["system", "user"]


def test_count_tokens_request_converts_too():
    raw = json.dumps({"model": "m", "messages": [USER]}).encode()
    assert roles(conversation_from(parse_body(CountTokensRequest, raw))) == ["user"]


@pytest.mark.parametrize("fields, message", [
    ({"tool_choice": {"type": "zzz"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool", "name": "not_a_tool"}, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tool_choice.tool.name: Field required"),
    ({"tool_choice": {"type": "any"}, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
      "thinking": {"type": "enabled", "budget_tokens": 1024}}, "Thinking may not be enabled when tool_choice forces tool use"),
])
def test_count_tokens_refuses_what_messages_refuses(fields, message):
    raw = json.dumps({"model": "m", "messages": [USER], **fields}).encode()
    with pytest.raises(InvalidRequestError, match=message):
        conversation_from(parse_body(CountTokensRequest, raw))
    with pytest.raises(InvalidRequestError, match=message):
        generation_request("msg_3", parse_body(MessagesRequest, json.dumps({"model": "m", "max_tokens": 2048, "messages": [USER], **fields}).encode()))


def test_images_and_documents_belong_to_user_turns():
    for block in (image_block("PNG", "image/png"), {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}):
        message = refused([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [block]}, {"role": "user", "content": "q"}])
        assert message == f"messages.1.content.0: {block['type']} blocks may only appear in user messages"


@pytest.mark.parametrize(
    "tools, message",
    [
        ([{"name": "f", "input_schema": {"type": "string"}}], "tools.0.input_schema.type: Input should be 'object'"),
        ([{"name": "f", "input_schema": {"type": "object"}}, {"name": "f", "input_schema": {"type": "object"}}],
         "tools.1.name: tool names must be unique"),
        ([{"name": "a>b", "input_schema": {"type": "object"}}], "tools.0.name: String should match pattern"),
        ([{"name": "a\nb", "input_schema": {"type": "object"}}], "tools.0.name: String should match pattern"),
        ([{"name": "x" * 129, "input_schema": {"type": "object"}}], "tools.0.name: String should match pattern"),
    ],
)
def test_tools_a_call_could_not_honour_are_refused(tools, message):
    assert refused([{"role": "user", "content": "hi"}], tools=tools).startswith(message)
    assert convert([{"role": "user", "content": "hi"}], tools=[{"name": "g", "input_schema": {"properties": {}}}]).tools[0].name == "g"


@pytest.mark.parametrize("thinking, message", [
    ({"type": "enabled"}, "thinking.enabled.budget_tokens: Field required"),
    ({"type": "enabled", "budget_tokens": 1024.0}, "thinking.enabled.budget_tokens: Input should be a valid integer"),
    ({"type": "enabled", "budget_tokens": "1024"}, "thinking.enabled.budget_tokens: Input should be a valid integer"),
    ({"type": "enabled", "budget_tokens": 100}, "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"),
    ({"type": "enabled", "budget_tokens": 1024, "display": "omit"}, "thinking.enabled.display: Input should be 'summarized' or 'omitted'"),
    ({"type": "adaptive", "display": "hidden"}, "thinking.adaptive.display: Input should be 'summarized' or 'omitted'"),
])
def test_a_thinking_budget_under_1024_or_an_unknown_display_is_named_for_what_it_is(thinking, message):
    assert refused([USER], thinking=thinking).startswith(message)


@pytest.mark.parametrize("kind, asked", [("adaptive", None), ("between_tools", None), ("disabled", False)])
def test_every_thinking_type_of_the_sdk_is_taken(kind, asked):
    assert convert([USER], thinking={"type": kind}).thinking is asked


@pytest.mark.parametrize("tools", [
    [{"type": "web_search_20250305", "name": "web_search"}],
    [{"type": "web_search_20250305", "name": "web_search"}, {"name": "f", "input_schema": {"type": "object"}}],
])
def test_forcing_a_server_tool_is_refused_for_what_it_is(tools):
    message = refused([USER], tools=tools, tool_choice={"type": "tool", "name": "web_search"})
    assert message.startswith("tool_choice.name: 'web_search' is one of Anthropic's server tools")


def test_toolsets_without_a_name_are_dropped_as_server_tools_and_client_tools_need_one():
    toolsets = [{"type": "mcp_toolset", "mcp_server_name": "ex"}, {"type": "computer_toolset_20260801"},
                {"type": "browser_toolset_20260801"}, {"name": "f", "input_schema": {"type": "object"}}]
    assert [t.name for t in convert([USER], tools=toolsets).tools] == ["f"]
    for nameless in ({"input_schema": {"type": "object"}}, {"type": "custom", "input_schema": {"type": "object"}}):
        with pytest.raises(InvalidRequestError, match=r"^tools\.0\.name: Field required$"):
            parse_body(MessagesRequest, json.dumps({"model": "m", "max_tokens": 1, "messages": [USER], "tools": [nameless]}).encode())
