"""Anthropic request bodies -> the neutral conversation (images decoded and validated on the way)."""

from __future__ import annotations

import dataclasses
import itertools
import json

from typing import Any, Callable, Sequence

from localvl.api.anthropic import schemas as s
from localvl.conversation import (
    Conversation,
    GenerationRequest,
    Image,
    Part,
    TOOL_NAME,
    TOOL_NAME_PATTERN,
    SamplingParams,
    Text,
    Thinking,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
    Turn,
)
from localvl.errors import InvalidRequestError
from localvl.api.validation import parse_value
from localvl.media.context import MEDIA, Media, converting
from localvl.media.documents import pdf_parts
from localvl.media.images import check_images, sniff_media_type
from localvl.media.images import decode_base64, load_image
from localvl.prompt.render import tool_definition


def _image(block: s.ImageBlockParam, where: str) -> Image:
    source = block.source
    if isinstance(source, s.Base64ImageSource):
        return load_image(decode_base64(source.data, f"{where}.source.data"), source.media_type, f"{where}.source")
    if isinstance(source, s.URLImageSource):
        data = MEDIA.get().fetched.get(source.url)
        if data is None:
            raise InvalidRequestError(f"{where}.source.url: the image was not fetched")
        return load_image(data, None, f"{where}.source.url")
    data = MEDIA.get().fetched.get(FILE + source.file_id)
    if data is None:
        raise InvalidRequestError(f"{where}.source.file_id: the file was not loaded")
    return load_image(data, None, f"{where}.source.file_id")


FILE = "file:"  # the key of an uploaded file's bytes among a request's fetched media


def file_ids(body: s._ConversationFields) -> list[tuple[str, str]]:
    """``(file_id, where)`` of every image or document source that refers to an uploaded file."""
    found: list[tuple[str, str]] = []

    def visit(block: Any, at: str) -> None:
        if isinstance(block, s.ImageBlockParam) and isinstance(block.source, s.FileImageSource):
            found.append((block.source.file_id, f"{at}.source.file_id"))
        elif isinstance(block, s.DocumentBlockParam) and block.source.get("type") == "file":
            found.append((str(block.source.get("file_id")), f"{at}.source.file_id"))
        elif isinstance(block, s.DocumentBlockParam) and isinstance(block.source.get("content"), list):
            # a `content` document's images may name uploaded files too
            for k, item in enumerate(block.source["content"]):
                source = item.get("source") if isinstance(item, dict) else None  # (others: a 400 in _document)
                if isinstance(source, dict) and item.get("type") == "image" and source.get("type") == "file":
                    found.append((str(source.get("file_id")), f"{at}.source.content.{k}.source.file_id"))
        elif isinstance(block, s.ToolResultBlockParam) and isinstance(block.content, list):
            for k, item in enumerate(block.content):
                visit(item, f"{at}.content.{k}")

    for i, message in enumerate(body.messages):
        for j, block in enumerate(message.content if isinstance(message.content, list) else []):
            visit(block, f"messages.{i}.content.{j}")
    return found


def _file_document(file_id: str, where: str) -> list[Text | Image]:
    data = MEDIA.get().fetched.get(FILE + file_id)
    if data is None:
        raise InvalidRequestError(f"{where}: the file was not loaded")
    if data.lstrip()[:5] == b"%PDF-":
        return pdf_parts(data, where)
    if sniff_media_type(data) is not None:
        return [load_image(data, None, where)]
    try:
        return [Text(data.decode("utf-8-sig"))]  # a byte order mark (Windows editors write one) is no text
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{where}: the file is not a PDF, an image or UTF-8 text") from None


def document_urls(body: s._ConversationFields) -> list[tuple[str, str]]:
    """``(url, where)`` of every document given by URL."""
    found: list[tuple[str, str]] = []
    for i, message in enumerate(body.messages):
        for j, block in enumerate(message.content if isinstance(message.content, list) else []):
            blocks = [(block, f"messages.{i}.content.{j}")]
            if isinstance(block, s.ToolResultBlockParam) and isinstance(block.content, list):
                blocks += [(item, f"messages.{i}.content.{j}.content.{k}") for k, item in enumerate(block.content)]
            for item, at in blocks:
                if isinstance(item, s.DocumentBlockParam) and item.source.get("type") == "url":
                    found.append((str(item.source.get("url")), f"{at}.source.url"))
    return found


def image_urls(body: s._ConversationFields) -> list[tuple[str, str]]:
    """``(url, where)`` of every image given by URL, wherever it sits (tool results, documents)."""
    found: list[tuple[str, str]] = []

    def visit(block: Any, at: str) -> None:
        if isinstance(block, s.ImageBlockParam) and isinstance(block.source, s.URLImageSource):
            found.append((block.source.url, f"{at}.source.url"))
        elif isinstance(block, s.ToolResultBlockParam) and isinstance(block.content, list):
            for k, item in enumerate(block.content):
                visit(item, f"{at}.content.{k}")
        elif isinstance(block, s.DocumentBlockParam) and isinstance(block.source.get("content"), list):
            for k, item in enumerate(block.source["content"]):
                source = item.get("source") if isinstance(item, dict) else None  # (others: a 400 in _document)
                if isinstance(source, dict) and item.get("type") == "image" and source.get("type") == "url":
                    found.append((str(source.get("url")), f"{at}.source.content.{k}.source.url"))

    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, block in enumerate(message.content):
                visit(block, f"messages.{i}.content.{j}")
    return found


def _document(block: s.DocumentBlockParam, where: str) -> list[Text | Image]:
    source = block.source
    kind = source.get("type")
    parts: list[Text | Image] = []
    heading = "\n".join(x for x in (block.title, block.context) if x)
    if heading:
        parts.append(Text(heading + "\n"))
    if kind == "text" and isinstance(source.get("data"), str):
        parts.append(Text(source["data"]))
    elif kind == "base64" and isinstance(source.get("data"), str):
        if source.get("media_type") != "application/pdf":
            raise InvalidRequestError(f"{where}.source.media_type: base64 documents must be application/pdf")
        parts.extend(pdf_parts(decode_base64(source["data"], f"{where}.source.data"), f"{where}.source"))
    elif kind == "file" and isinstance(source.get("file_id"), str):
        parts.extend(_file_document(source["file_id"], f"{where}.source.file_id"))
    elif kind == "url" and isinstance(source.get("url"), str):
        data = MEDIA.get().fetched.get(source["url"])
        if data is None:
            raise InvalidRequestError(f"{where}.source.url: the document was not fetched")
        parts.extend(pdf_parts(data, f"{where}.source.url"))
    elif kind == "content" and isinstance(source.get("content"), (str, list)):
        content = source["content"]
        if isinstance(content, str):
            parts.append(Text(content))
        else:
            for j, item in enumerate(content):
                tag = item.get("type") if isinstance(item, dict) else None
                if tag == "text" and isinstance(item.get("text"), str):
                    parts.append(Text(item["text"]))
                elif tag == "image":
                    at = f"{where}.source.content.{j}"
                    parts.append(_image(parse_value(s.ImageBlockParam, item, at), at))
                else:
                    raise InvalidRequestError(f"{where}.source.content.{j}: expected a text or image block")
    else:
        raise InvalidRequestError(
            f"{where}.source.type: document sources of type {kind!r} are not supported yet "
            "(supported: base64 PDF, url PDF, file, text, content)"
        )
    return parts


def _search_result(block: s.SearchResultBlockParam) -> Text:
    body = "\n".join(t.text for t in block.content)
    return Text(f"{block.title}\n{block.source}\n{body}")


def _readable(block: Any, at: str) -> list[Text | Image] | None:
    """Text, image, document and search-result blocks, wherever they sit; None for other blocks."""
    if isinstance(block, s.TextBlockParam):
        return [Text(block.text)] if block.text else []
    if isinstance(block, s.ImageBlockParam):
        return [_image(block, at)]
    if isinstance(block, s.DocumentBlockParam):
        return _document(block, at)
    if isinstance(block, s.SearchResultBlockParam):
        return [_search_result(block)]
    return None


# (thinking, signature) -> the thinking the block stands for, or None if the signature does not hold
Verifier = Callable[[str, str], "str | None"]


def _parts(role: str, content: str | list[Any], where: str, verify: Verifier | None = None,
           definitions: dict[str, str] | None = None) -> list[Part]:
    if isinstance(content, str):
        return [Text(content)] if content else []
    parts: list[Part] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if isinstance(block, s.TextBlockParam) and not block.text and role != "assistant":
            raise InvalidRequestError(f"{at}.text: text content blocks must be non-empty")
        if role == "assistant" and isinstance(block, (s.ImageBlockParam, s.DocumentBlockParam)):
            # a model's turn is text it wrote: the templates render no images there
            raise InvalidRequestError(f"{at}: {block.type} blocks may only appear in user messages")
        readable = _readable(block, at)
        if readable is not None:
            parts.extend(readable)
        elif isinstance(block, s.ToolUseBlockParam):
            if role != "assistant":
                raise InvalidRequestError(f"{at}: tool_use blocks may only appear in assistant messages")
            parts.append(ToolCall(block.id, block.name, block.input))
        elif isinstance(block, s.ToolResultBlockParam):
            if role != "user":
                raise InvalidRequestError(f"{at}: tool_result blocks may only appear in user messages")
            parts.append(_tool_result(block, at, definitions or {}))
        elif isinstance(block, s.ThinkingBlockParam):
            if role != "assistant":
                raise InvalidRequestError(f"{at}: thinking blocks may only appear in assistant messages")
            thinking = block.thinking if verify is None else verify(block.thinking, block.signature)
            if thinking is None:
                raise InvalidRequestError(f"{at}.signature: invalid signature in thinking block")
            parts.append(Thinking(thinking, block.signature))
        # redacted_thinking and Anthropic's server-tool blocks carry nothing a local model can read.
    return parts


def _tool_result(block: s.ToolResultBlockParam, where: str, definitions: dict[str, str]) -> ToolResult:
    content: list[Text | Image] = []
    if isinstance(block.content, str):
        content.append(Text(block.content))
    elif block.content:
        for k, item in enumerate(block.content):
            if isinstance(item, s.ToolReferenceBlockParam):
                # Anthropic expands a reference into the tool's definition where it stands: a
                # deferred tool is in no list the model has seen; a listed one is named.
                found = definitions.get(item.tool_name, item.tool_name)
                content.append(Text(("\n" if content else "") + found))
            else:
                content.extend(_readable(item, f"{where}.content.{k}") or [])
    return ToolResult(block.tool_use_id, tuple(content), bool(block.is_error))


def _check_tool_references(body: s._ConversationFields) -> None:
    """A tool_reference must name a tool of the request, as Anthropic resolves it against ``tools``."""
    names = {t.name for t in body.tools or () if t.name is not None}
    for i, message in enumerate(body.messages):
        for j, block in enumerate(message.content if isinstance(message.content, list) else []):
            if not isinstance(block, s.ToolResultBlockParam) or not isinstance(block.content, list):
                continue
            for k, item in enumerate(block.content):
                if isinstance(item, s.ToolReferenceBlockParam) and item.tool_name not in names:
                    raise InvalidRequestError(
                        f"messages.{i}.content.{j}.content.{k}.tool_name: tool {item.tool_name!r} is not in tools"
                    )


def _system_turn(system: str | list[s.TextBlockParam] | None) -> Turn | None:
    if system is None:
        return None
    text = system if isinstance(system, str) else "\n".join(b.text for b in system)
    return Turn("system", [Text(text)]) if text else None


def conversation_from(body: s._ConversationFields, verify: Verifier | None = None, media: Media | None = None) -> Conversation:
    """Build the neutral conversation; consecutive turns of one role merge, as Anthropic's API does.

    ``verify(thinking, signature)`` checks the signature of every thinking block sent back;
    ``media``: the bytes of the URL sources (``image_urls``, ``document_urls``), fetched beforehand,
    and the media limits.
    """
    with converting(media) as context:
        conversation = _conversation(body, verify)
        check_images(conversation.images(), context.images)
        return conversation


def _check_tool_pairs(messages: Sequence[s.MessageParam]) -> None:
    """Anthropic's rules for tool calls across messages, with its messages: an assistant message's
    tool_use blocks are answered by tool_result blocks at the start of the next message, every
    tool_result answers a tool_use of the message before it, and no two tool_use blocks share an id.
    (A last assistant message, a prefill, may end in calls no one has answered yet.)"""
    ids: set[str] = set()
    asked: set[str] = set()  # the tool_use ids of the message before
    for i, message in enumerate(messages):
        blocks = message.content if isinstance(message.content, list) else []
        if message.role == "user":
            for j, block in enumerate(blocks):
                if isinstance(block, s.ToolResultBlockParam) and block.tool_use_id not in asked:
                    raise InvalidRequestError(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.tool_use_id}. Each `tool_result` block must have a corresponding `tool_use` block "
                        "in the previous message."
                    )
            asked = set()
            continue
        calls: list[str] = []
        for j, block in enumerate(blocks):
            if isinstance(block, s.ToolUseBlockParam):
                if block.id in ids:
                    raise InvalidRequestError(f"messages.{i}.content.{j}: `tool_use` ids must be unique")
                ids.add(block.id)
                calls.append(block.id)
        if calls and i + 1 < len(messages):
            following = messages[i + 1]
            answers = following.content if following.role == "user" and isinstance(following.content, list) else []
            leading = list(itertools.takewhile(lambda b: isinstance(b, s.ToolResultBlockParam), answers))
            if not leading:
                raise InvalidRequestError(
                    f"messages.{i + 1}: Did not find {len(calls)} `tool_result` block(s) at the beginning of this "
                    "message. Messages following `tool_use` blocks must begin with a matching number of "
                    "`tool_result` blocks."
                )
            answered = {block.tool_use_id for block in leading}
            missing = [call for call in calls if call not in answered]
            if missing:
                raise InvalidRequestError(
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in "
                    "the next message."
                )
        asked = set(calls)


def _conversation(body: s._ConversationFields, verify: Verifier | None) -> Conversation:
    _check_tool_pairs(body.messages)
    _check_tool_references(body)
    turns: list[Turn] = []
    if (system := _system_turn(body.system)) is not None:
        turns.append(system)
    tools = _tools(body.tools or [])
    definitions = {t.name: json.dumps(tool_definition(t), ensure_ascii=False) for t in tools if t.deferred}
    for i, message in enumerate(body.messages):
        parts = _parts(message.role, message.content, f"messages.{i}", verify, definitions)
        if not parts:
            empty_prefill = message.role == "assistant" and i == len(body.messages) - 1
            # e.g. only redacted thinking or Anthropic's server-tool blocks: nothing a local model reads
            unreadable_reply = message.role == "assistant" and isinstance(message.content, list) and bool(message.content)
            if not (empty_prefill or unreadable_reply):
                raise InvalidRequestError(f"messages.{i}: {message.role} messages must have non-empty content")
            continue
        if turns and turns[-1].role == message.role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(message.role, parts))
    dialogue = [t for t in turns if t.role != "system"]
    if not dialogue:
        raise InvalidRequestError("messages: at least one user message is required")
    if dialogue[0].role != "user":
        raise InvalidRequestError('messages: the first message must use the "user" role')
    forced = _tool_choice(body.tool_choice, tools, _server_tools(body)).mode in ("any", "tool")  # (checked here for count_tokens too)
    thinking = _thinking(body.thinking)[0]
    if thinking and forced:
        raise InvalidRequestError("Thinking may not be enabled when tool_choice forces tool use.")
    if thinking is None and forced:  # a forced call is the whole answer: a template thinking by default is told not to
        thinking = False
    return Conversation(turns=turns, tools=tools, thinking=thinking)


def _tools(tools: Sequence[s.ToolParam]) -> list[Tool]:
    # Anthropic's server tools (web search, code execution, ...) have no schema and no local runner.
    out: list[Tool] = []
    for k, t in enumerate(tools):
        if t.input_schema is None or t.name is None:  # (a nameless toolset is one of Anthropic's)
            continue
        if t.input_schema.get("type", "object") != "object":  # a call's input is always an object
            raise InvalidRequestError(f"tools.{k}.input_schema.type: Input should be 'object'")
        if not TOOL_NAME.fullmatch(t.name):
            raise InvalidRequestError(f"tools.{k}.name: String should match pattern '{TOOL_NAME_PATTERN}'")
        if any(t.name == seen.name for seen in out):
            raise InvalidRequestError(f"tools.{k}.name: tool names must be unique ({t.name!r} appears twice)")
        out.append(Tool(t.name, t.description, t.input_schema, deferred=(t.model_extra or {}).get("defer_loading") is True))
    if all(t.deferred for t in out):
        # Deferred tools wait for a search to find them; with no client tool listed there is no
        # search here (Anthropic's server search tool does not run locally): list them all.
        out = [dataclasses.replace(t, deferred=False) for t in out]
    return out


def _thinking(thinking: dict[str, Any] | None) -> tuple[bool | None, int | None]:
    """(ask the template to think?, budget) from ``thinking``; adaptive leaves it to the model.
    Left out, as in Anthropic's API, there is no thinking: a template that thinks unless told not
    to (Qwen3.5) is told not to; a model that thinks regardless still does."""
    if thinking is None:
        return False, None
    kind = thinking.get("type")
    if kind != "disabled" and thinking.get("display") not in (None, "summarized", "omitted"):
        # else a misspelt "omitted" would show the thinking its client meant to hide
        raise InvalidRequestError(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if budget is None:
            raise InvalidRequestError("thinking.enabled.budget_tokens: Field required")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise InvalidRequestError("thinking.enabled.budget_tokens: Input should be a valid integer")
        if budget < 1024:
            raise InvalidRequestError("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        return True, budget
    if kind == "disabled":
        return False, None
    if kind in ("adaptive", "between_tools"):  # between_tools (SDK 2.14): no budget to hold, so as adaptive
        return None, None
    raise InvalidRequestError("thinking.type: Input should be 'enabled', 'disabled', 'adaptive' or 'between_tools'")


def _server_tools(body: s._ConversationFields) -> frozenset[str]:
    """Names of Anthropic's hosted tools (a versioned ``type``, no schema), which ``_tools`` drops."""
    return frozenset(t.name for t in body.tools or () if t.name and t.input_schema is None and t.type not in (None, "custom"))


def _tool_choice(choice: dict[str, Any] | None, tools: list[Tool], server_tools: frozenset[str] = frozenset()) -> ToolChoice:
    if choice is None:
        return ToolChoice()
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequestError("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    name = choice.get("name") if kind == "tool" else None
    if isinstance(name, str) and name in server_tools:  # dropped by _tools: nothing here runs it
        raise InvalidRequestError(f"tool_choice.name: {name!r} is one of Anthropic's server tools, which this server does not run")
    if kind in ("any", "tool") and not tools:
        raise InvalidRequestError(f"tool_choice: {kind!r} requires at least one tool in tools")
    if kind == "tool":
        if name is None:
            raise InvalidRequestError("tool_choice.tool.name: Field required")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise InvalidRequestError(f"tool_choice.name: tool {name!r} is not in tools")
    return ToolChoice(kind, name, parallel)


def generation_request(
    request_id: str, body: s.MessagesRequest, verify: Verifier | None = None, media: Media | None = None
) -> GenerationRequest:
    sampling = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k or None,
        stop_sequences=tuple(body.stop_sequences or ()),
    )
    conversation = conversation_from(body, verify, media)
    choice = _tool_choice(body.tool_choice, conversation.tools, _server_tools(body))
    budget = _thinking(body.thinking)[1]
    if budget is not None and budget >= body.max_tokens:
        raise InvalidRequestError("`max_tokens` must be greater than `thinking.budget_tokens`")
    output = (body.output_config or {}).get("format")
    if output is None:  # the structured-outputs beta's name for it
        output = (body.model_extra or {}).get("output_format")
    schema = None
    if output is not None:
        if not isinstance(output, dict) or output.get("type") != "json_schema" or not isinstance(output.get("schema"), dict):
            raise InvalidRequestError("output_config.format: expected {type: 'json_schema', schema: {...}}")
        schema = output["schema"]
    strict = tuple(t.name for t in body.tools or () if t.strict and t.input_schema is not None)
    return GenerationRequest(
        id=request_id, conversation=conversation, sampling=sampling, tool_choice=choice,
        thinking_budget=budget, output_schema=schema, strict_tools=strict,
    )
