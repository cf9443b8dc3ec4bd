"""OpenAI Chat Completions requests → the neutral conversation and sampling parameters.

What this dialect cannot honour yet is refused with a 400 that says so, rather than silently
answered wrong: tools, tool results and structured output (issue #4), image URLs to fetch
(issue #6).
"""

from __future__ import annotations

from localvl.api.openai.schemas import ChatCompletionRequest, Message
from localvl.conversation import Conversation, GenerationRequest, Image, Part, SamplingParams, Text, Turn
from localvl.errors import InvalidRequestError
from localvl.media.images import decode_base64, load_image

UNLIMITED = 1 << 30  # no max_tokens: the engine stops at the end of the context ("length")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _image(url: str, where: str) -> Image:
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequestError(f"{where}: only base64 data URLs are supported (data:image/png;base64,...)")
        media_type = header[len("data:") : -len(";base64")] or None
        return load_image(decode_base64(data, where), media_type, where)
    if url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"{where}: image URLs are not fetched yet; send the image inline as a data: URL")
    raise InvalidRequestError(f"{where}: expected a data: URL")


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
        elif part.type == "refusal":
            continue  # an earlier refusal of the assistant: nothing to render
        else:
            raise InvalidRequestError(f"{at}.type: content parts of type {part.type!r} are not supported yet")
    return parts


def conversation_from(body: ChatCompletionRequest) -> Conversation:
    turns: list[Turn] = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        if message.role in ("tool", "function") or message.tool_calls:
            raise InvalidRequestError(f"{where}: tool calls and tool results are not supported yet")
        parts = _parts(message, where)
        if not parts:
            if message.role == "assistant" and i == len(body.messages) - 1:
                continue  # an empty final assistant message: nothing to continue
            raise InvalidRequestError(f"{where}.content: {message.role} messages must have non-empty content")
        role = ROLES[message.role]
        if turns and turns[-1].role == role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(role, parts))  # type: ignore[arg-type]
    if not any(turn.role == "user" for turn in turns):
        raise InvalidRequestError("messages: at least one user message is required")
    return Conversation(turns=turns)


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise InvalidRequestError("tools: tool use is not supported yet")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError("response_format: structured output is not supported yet")


def generation_requests(completion_id: str, body: ChatCompletionRequest) -> list[GenerationRequest]:
    """One request per choice (``n``); seeded choices get seeds ``seed, seed + 1, ...``."""
    _refuse_unsupported(body)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    requests = []
    for index in range(body.n):
        sampling = SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens or UNLIMITED,
            temperature=body.temperature,
            top_p=body.top_p,
            stop_sequences=tuple(s for s in stop if s),
            seed=None if body.seed is None else body.seed + index,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        requests.append(GenerationRequest(f"{completion_id}-{index}", conversation_from(body), sampling))
    return requests
