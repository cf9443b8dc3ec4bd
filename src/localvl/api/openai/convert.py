"""OpenAI Chat Completions requests → the neutral conversation and sampling parameters.

What this dialect cannot honour is refused with a 400 that says so, rather than silently answered
wrong: legacy ``function`` messages, content parts other than text, images and PDF files.
"""

from __future__ import annotations

import json
from typing import Any

from localvl.api.openai.schemas import ChatCompletionRequest, Message
from localvl.api.validation import load_json
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
from localvl.media.context import MEDIA, Media, converting
from localvl.media.documents import pdf_parts
from localvl.media.images import check_images
from localvl.media.images import decode_base64, load_image
from localvl.prompt.outputs import closed_prefix, is_json_prefix

UNLIMITED = 1 << 30  # no max_tokens: the engine stops at the end of the context ("length")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _image(url: str, where: str) -> Image:
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequestError(f"{where}: only base64 data URLs are supported (data:image/png;base64,...)")
        # The bytes say what the image is, as OpenAI's API and vLLM read them: clients' code labels
        # every image "data:image/jpeg" (OpenAI's own examples do), PNG screenshots included.
        return load_image(decode_base64(data, where), None, where)
    if url.startswith(("http://", "https://")):
        data = MEDIA.get().fetched.get(url)
        if data is None:
            raise InvalidRequestError(f"{where}: the image was not fetched")
        return load_image(data, None, where)
    raise InvalidRequestError(f"{where}: expected a data: URL or an http(s) URL")


def _file(file: Any, where: str) -> list[Part]:
    """A ``file`` part: a PDF as a base64 data URL in ``file_data``."""
    if not isinstance(file, dict):
        raise InvalidRequestError(f"{where}: a file part needs file.file_data")
    if file.get("file_id"):
        raise InvalidRequestError(f"{where}.file_id: uploaded files are not supported yet; send file_data")
    data = file.get("file_data")
    if not isinstance(data, str):
        raise InvalidRequestError(f"{where}.file_data: expected a data: URL of a PDF")
    header, comma, payload = data.partition(",")
    if not comma or header != "data:application/pdf;base64":
        raise InvalidRequestError(f"{where}.file_data: expected data:application/pdf;base64,...")
    pages: list[Part] = []
    if isinstance(file.get("filename"), str) and file["filename"]:
        pages.append(Text(file["filename"] + "\n"))
    pages.extend(pdf_parts(decode_base64(payload, f"{where}.file_data"), f"{where}.file_data"))
    return pages


def image_urls(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    """``(url, where)`` of every image given by http(s) URL."""
    found = []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                url = part.image_url.url if part.type == "image_url" and part.image_url is not None else ""
                if url.startswith(("http://", "https://")):
                    found.append((url, f"messages.{i}.content.{j}.image_url.url"))
    return found


def _parts(message: Message, where: str) -> list[Part]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)] if content else []
    parts: list[Part] = []
    for j, part in enumerate(content):
        at = f"{where}.content.{j}"
        if part.type == "text":
            if part.text is None:
                raise InvalidRequestError(f"{at}.text: a text part needs text")
            parts.append(Text(part.text))
        elif part.type == "image_url":
            if message.role != "user":
                raise InvalidRequestError(f"{at}: images are accepted in user messages only")
            if part.image_url is None:
                raise InvalidRequestError(f"{at}.image_url: an image_url part needs image_url.url")
            parts.append(_image(part.image_url.url, f"{at}.image_url.url"))
        elif part.type == "file":
            if message.role not in ("user", "tool"):
                raise InvalidRequestError(f"{at}: files are accepted in user messages only")
            parts.extend(_file((part.model_extra or {}).get("file"), f"{at}.file"))
        elif part.type == "refusal":
            continue  # an earlier refusal of the assistant: nothing to render
        else:
            raise InvalidRequestError(f"{at}.type: content parts of type {part.type!r} are not supported yet")
    return parts


def _tool_calls(message: Message, where: str) -> list[Part]:
    calls: list[Part] = []
    for k, call in enumerate(message.tool_calls or []):
        at = f"{where}.tool_calls.{k}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"{at}.function: a tool call needs function.name and function.arguments")
        arguments = function.get("arguments") or "{}"
        try:
            value = load_json(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            value = _cut_off(arguments)
            if value is None:
                raise InvalidRequestError(f"{at}.function.arguments: not valid JSON (or nested too deeply)") from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{at}.function.arguments: must be a JSON object")
        calls.append(ToolCall(str(call.get("id") or f"call_{k}"), function["name"], value))
    return calls


def _cut_off(arguments: str) -> dict[str, Any] | None:
    """The arguments of a call that ``max_tokens`` cut off, as this API returns them (unclosed
    JSON), sent back in a later request: what they hold so far, closed, as the model wrote them."""
    if not arguments.lstrip().startswith("{") or not is_json_prefix(arguments):
        return None
    try:
        value = closed_prefix(arguments, paired=False)
        load_json(json.dumps(value))  # held to what a whole body may hold: no lone surrogates, no deep nesting
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _refuse_what_cannot_be_honoured(body: ChatCompletionRequest) -> None:
    """Fields the schema leaves open whose silent neglect would mislead: a caller relying on them
    would get plain text and never learn why."""
    extra = body.model_extra or {}
    for name in ("functions", "function_call"):
        if extra.get(name) is not None:
            raise InvalidRequestError(f"{name}: legacy functions are not supported; use tools and tool_choice")
    modalities = extra.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or any(m != "text" for m in modalities)):
        raise InvalidRequestError('modalities: only ["text"] output is supported')
    if extra.get("audio") is not None:
        raise InvalidRequestError("audio: audio output is not supported")
    if body.top_logprobs and not body.logprobs:  # as OpenAI's API (and vLLM) refuse it: no log-probabilities would come
        raise InvalidRequestError("top_logprobs: logprobs must be set to true when top_logprobs is used")


def _call_ids(message: Message) -> list[str]:
    return [str(call.get("id")) for call in message.tool_calls or [] if isinstance(call, dict) and call.get("id")]


def _check_tool_pairs(messages: list[Message]) -> None:
    """OpenAI's rules, with its messages: an assistant message's tool calls are answered by the
    tool messages right after it, one for each call, and a tool message answers a call of the
    assistant message before it. (A last assistant message, a prefill, may end in calls not yet
    answered.)"""
    pending: list[str] = []  # calls of the last assistant message not yet answered
    answerable: set[str] | None = None  # the calls a tool message may answer here; None: no call before
    for i, message in enumerate(messages):
        if message.role == "tool":
            if not message.tool_call_id:
                continue  # refused below, for the missing id
            if answerable is None:
                raise InvalidRequestError(
                    f"messages.{i}.role: messages with role 'tool' must be a response to a preceding message with 'tool_calls'"
                )
            if message.tool_call_id not in answerable:
                raise InvalidRequestError(
                    f"messages.{i}.tool_call_id: '{message.tool_call_id}' not found in 'tool_calls' of previous message"
                )
            pending = [call for call in pending if call != message.tool_call_id]
            continue
        if pending:
            raise InvalidRequestError(
                f"messages.{i}.role: an assistant message with 'tool_calls' must be followed by tool messages "
                f"responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                f"{', '.join(pending)}"
            )
        calls = _call_ids(message) if message.role == "assistant" else []
        pending, answerable = calls, (set(calls) if calls else None)


def _refused(message: Message) -> bool:
    """An assistant message that is an earlier refusal only: skipped, as its refusal parts are."""
    parts = message.content if isinstance(message.content, list) else []
    return bool((message.model_extra or {}).get("refusal")) or (bool(parts) and all(p.type == "refusal" for p in parts))


def _reasoning(message: Message, where: str) -> list[Part]:
    """The ``reasoning_content`` an earlier answer came with (this API's, vLLM's and DeepSeek's
    field), sent back: a thinking template re-renders it inside a tool loop, as the model wrote it."""
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise InvalidRequestError(f"{where}.reasoning_content: Input should be a valid string")
    return [Thinking(reasoning)] if reasoning else []


def conversation_from(body: ChatCompletionRequest) -> Conversation:
    _refuse_what_cannot_be_honoured(body)
    _check_tool_pairs(body.messages)
    turns: list[Turn] = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if message.role == "function":
            raise InvalidRequestError(f"{where}.role: legacy function messages are not supported; use tools")
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError(f"{where}.tool_call_id: a tool message needs the id of the call it answers")
            content = tuple(p for p in _parts(message, where) if isinstance(p, (Text, Image)))
            parts: list[Part] = [ToolResult(message.tool_call_id, content)]
            role = "user"
        else:
            parts = _parts(message, where)
            if message.tool_calls:
                if message.role != "assistant":
                    raise InvalidRequestError(f"{where}.tool_calls: only assistant messages carry tool calls")
                parts += _tool_calls(message, where)
            if message.role == "assistant" and parts:
                parts[:0] = _reasoning(message, where)
            role = ROLES[message.role]
        if not parts:
            # An empty final assistant message: nothing to continue; a refusal; an answer that said
            # nothing ("": this API's own answer when a turn wrote no text, which OpenAI's API
            # takes back; only null without tool calls it refuses).
            if message.role == "assistant" and (i == len(body.messages) - 1 or _refused(message) or message.content is not None):
                continue
            raise InvalidRequestError(f"{where}.content: {message.role} messages must have non-empty content")
        if turns and turns[-1].role == role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(role, parts))  # type: ignore[arg-type]
    if not any(turn.role == "user" for turn in turns):
        raise InvalidRequestError("messages: at least one user message is required")
    # reasoning_effort switches a thinking template's thinking on or off; the effort itself is not graded
    thinking = None if body.reasoning_effort is None else body.reasoning_effort not in ("none", "minimal")
    return Conversation(turns=turns, tools=_tools(body.tools), thinking=thinking)


def _tools(tools: list[Any] | None) -> list[Tool]:
    out: list[Tool] = []
    for k, tool in enumerate(tools or []):
        at = f"tools.{k}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequestError(f"{at}.type: only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"{at}.function.name: a function tool needs a name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequestError(f'{at}.function.parameters: must be a JSON schema of type "object"')
        if not TOOL_NAME.fullmatch(function["name"]):
            raise InvalidRequestError(f"{at}.function.name: string does not match pattern '{TOOL_NAME_PATTERN}'")
        if any(function["name"] == seen.name for seen in out):
            raise InvalidRequestError(f"{at}.function.name: function names must be unique ({function['name']!r} appears twice)")
        out.append(Tool(function["name"], function.get("description"), parameters))
    return out


def _tool_choice(choice: Any, tools: list[Tool], parallel: bool | None) -> ToolChoice:
    allow_parallel = parallel is not False
    if choice is None:
        return ToolChoice("auto" if tools else "none", parallel=allow_parallel)
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice: 'required' needs at least one tool in tools")
        return ToolChoice("any" if choice == "required" else choice, parallel=allow_parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise InvalidRequestError(f"tool_choice.function.name: tool {name!r} is not in tools")
        return ToolChoice("tool", name, allow_parallel)
    raise InvalidRequestError("tool_choice: expected 'none', 'auto', 'required' or {type: 'function', function: {name}}")


def _output_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequestError("response_format.json_schema: expected {name, schema, strict}")
        return spec.get("schema") or {"type": "object"}
    raise InvalidRequestError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` as OpenAI takes it: ids as strings, biases in [-100, 100]."""
    out: list[tuple[int, float]] = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12):  # ("²".isdigit(); int() of 4,300 digits raises)
            raise InvalidRequestError(f"logit_bias: {key[:20]!r} is not a token id")
        if not -100 <= value <= 100:
            raise InvalidRequestError(f"logit_bias.{key}: {value} is not between -100 and 100")
        out.append((int(key), float(value)))
    if len(out) > 1024:
        raise InvalidRequestError(f"logit_bias: {len(out)} tokens; at most 1024")
    return tuple(out)


def generation_requests(
    completion_id: str, body: ChatCompletionRequest, media: Media | None = None
) -> list[GenerationRequest]:
    """One request per choice (``n``); seeded choices get seeds ``seed, seed + 1, ...``.

    ``media``: the bytes of the request's image URLs (``image_urls``), fetched beforehand, and the limits.
    """
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    with converting(media) as context:
        conversation = conversation_from(body)
        check_images(conversation.images(), context.images)
    choice = _tool_choice(body.tool_choice, conversation.tools, body.parallel_tool_calls)
    schema = _output_schema(body.response_format)
    strict = tuple(
        t["function"]["name"] for t in body.tools or () if isinstance(t, dict) and (t.get("function") or {}).get("strict")
    )
    bias = _logit_bias(body.logit_bias)
    requests = []
    for index in range(body.n or 1):
        sampling = SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens or UNLIMITED,
            temperature=body.temperature,
            top_p=body.top_p,
            stop_sequences=tuple(s for s in stop if s),
            seed=None if body.seed is None else body.seed + index,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            logit_bias=bias,
        )
        requests.append(GenerationRequest(
            f"{completion_id}-{index}", conversation, sampling, tool_choice=choice, output_schema=schema, strict_tools=strict
        ))
    return requests
