"""What a Qwen-VL model's output holds: text, thinking, and tool calls, split as it streams.

Qwen2/2.5/3-VL models answer tool calls as ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
(Hermes style, every such template that knows tools asks for it); Qwen3.5 writes XML inside the
same tags: ``<function=NAME>``, then ``<parameter=KEY>`` value ``</parameter>`` per argument, a
string as it is and any other value as JSON (read back by the tool's schema). Both reason inside
``<think>…</think>``;
both tags are ordinary added tokens, so they arrive as text. ``OutputParser`` is fed the generated
text piece by piece and returns what each piece completes. A tool call is returned whole, once its
closing tag arrives and its JSON parses; a closed call that does not parse (a model that opened a
tool call and wrote nonsense) is returned as the text it was, so nothing the model said is lost.
A call cut off by the token limit is returned as the incomplete call it is, as Anthropic's API
returns one (the stop reason, ``max_tokens``, says it is incomplete): its name, and as much of its
arguments as parses. A call left open when the model ended its turn, or cut off before its name
was whole, is dropped: an unfinished call must not run as if whole, and markup is never text.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
import sys
from dataclasses import dataclass
from typing import Any, Union

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ID_ALPHABET = string.ascii_letters + string.digits


def tool_call_id() -> str:
    """An id shaped like Anthropic's (``toolu_`` + 24 base62 characters)."""
    return "toolu_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class ThinkingPiece:
    text: str


@dataclass(frozen=True)
class ToolCallPiece:
    name: str
    input: dict[str, Any]
    # A call cut off by the token limit: its arguments' JSON as written so far (unclosed, maybe
    # empty). ``input`` holds what of it parses; OpenAI's API returns this text instead.
    partial: str | None = None


Piece = Union[TextPiece, ThinkingPiece, ToolCallPiece]


Schemas = dict[str, dict[str, Any]]  # each offered tool's input schema, by name

_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>")
_PARAMETER_OPEN = re.compile(r"<parameter=([^>\n]+)>")
_CLOSE, _LINE_CLOSE = "</parameter>", "\n</parameter>"


def _finite(text: str) -> float:
    """A JSON number beyond a float's range (``1e999``) as the largest float of its sign: JSON has
    no infinity, and the client must get JSON."""
    value = float(text)
    return value if math.isfinite(value) else math.copysign(sys.float_info.max, value)


def _constant(name: str) -> float | None:
    return None if name == "NaN" else math.copysign(sys.float_info.max, -1.0 if name.startswith("-") else 1.0)


def loads(text: str, paired: bool = True) -> Any:
    """``json.loads`` for what a model wrote: numbers past a float's range, and the non-JSON
    ``Infinity``/``NaN``, become finite numbers (or null), and (``paired``) a lone surrogate escape
    becomes U+FFFD, so what reaches the client is JSON that encodes as UTF-8."""
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_constant)
    except RecursionError:  # nested past the parser's depth: unparseable, as any malformed text
        raise ValueError("JSON nested too deeply") from None
    return _paired(value) if paired and _SURROGATE_ESCAPE.search(text) else value


# A surrogate written as an escape (a model that writes emoji as "\ud83d\ude00", cut off by the
# token limit between the two halves, leaves the first alone). json.loads joins whole pairs; a
# half left alone would make every response holding it fail to encode as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _paired(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings and keys replaced by U+FFFD (what a UTF-8
    decoder makes of a character that never completed)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_paired(item) for item in value]
    if isinstance(value, dict):
        return {_paired(key): _paired(item) for key, item in value.items()}
    return value


def pointed(root: Any, ref: str) -> Any:
    """What a local ``$ref`` ("#/$defs/a", JSON-pointer escapes and all) names in ``root``, or None."""
    target: Any = root
    for part in filter(None, ref[1:].split("/")):
        target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
    return target


def resolve_ref(schema: Any, root: Any) -> Any:
    """``schema`` with a local ``$ref`` ("#/$defs/..." pointing into ``root``, the tool's schema)
    followed, as pydantic writes enums and nested models; anything else as it is."""
    for _ in range(16):  # refs to refs, but never a loop
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target = pointed(root, ref)
        if not isinstance(target, dict):
            return schema
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a (sub)schema allows, as far as its ``type``/``anyOf``/``oneOf``/``enum`` say."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        for option in options if isinstance(options, list) else ():
            types |= _schema_types(option)
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if not types and isinstance(values, list):  # untyped: the types of the values it lists
        types = set().union(*map(_json_types, values))
    return types


def _json_types(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    names = {float: "number", str: "string", dict: "object", list: "array", type(None): "null"}
    return {names.get(type(value), "other")}


def _xml_value(raw: str, schema: Any) -> Any:
    """A parameter's text as the value its schema describes. A string stays as written (one
    newline each side is the format's, not the value's), as does a parameter the schema does not
    name; other types are read as JSON, and kept as the text where that does not give one."""
    text = raw[1:] if raw.startswith("\n") else raw
    text = text[:-1] if text.endswith("\n") else text
    types = _schema_types(schema)
    if schema is None or types == {"string"}:
        return text
    try:
        value = loads(text)
    except ValueError:
        return text
    if types and not (_json_types(value) & types):
        return text
    return value


def parse_xml_tool_call(body: str, schemas: Schemas | None = None, cut: bool = False) -> ToolCallPiece | None:
    """``<function=NAME>`` and its ``<parameter=KEY>`` values (Qwen3.5). ``cut``: the call was cut
    off: a parameter not closed yet is left out."""
    named = _FUNCTION.match(body)
    if named is None:
        return None
    name = named.group(1).strip()
    rest = body[named.end() :]
    if not cut and not rest.rstrip().endswith("</function>"):
        return None
    root = (schemas or {}).get(name) or {}
    properties = root.get("properties") or {}
    if not isinstance(properties, dict):
        properties = {}
    arguments: dict[str, Any] = {}
    at = 0
    while (opened := _PARAMETER_OPEN.search(rest, at)) is not None:
        start, key = opened.end(), opened.group(1)
        key = key if key in properties else key.strip()
        # A value ends at the first closing line ("\n</parameter>", as the format writes it) unless
        # another parameter opens first; then at a bare "</parameter>".
        end, close = rest.find(_LINE_CLOSE, start), _LINE_CLOSE
        following = rest.find("<parameter=", start)
        if end < 0 or 0 <= following < end:
            end, close = rest.find(_CLOSE, start), _CLOSE
        if end < 0:  # not closed: a call cut off inside this value
            break
        arguments[key] = _xml_value(rest[start:end], resolve_ref(properties.get(key), root))
        at = end + len(close)
    if not name:
        return None
    if not cut:
        return ToolCallPiece(name, arguments)
    # The XML form writes no JSON: the parameters closed so far, as JSON left open (unless the
    # whole call was written and only its closing tag cut off).
    written = json.dumps(arguments, ensure_ascii=False)
    return ToolCallPiece(name, arguments, written if rest.rstrip().endswith("</function>") else written[:-1])


def parse_tool_call(body: str, schemas: Schemas | None = None) -> ToolCallPiece | None:
    """``{"name": "...", "arguments": {...}}`` (arguments may also come as a JSON string), or
    Qwen3.5's ``<function=...>`` form."""
    if body.lstrip().startswith("<function="):
        return parse_xml_tool_call(body, schemas)
    try:
        value = loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCallPiece(value["name"], arguments)


_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)+)"')
_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _closed(prefix: str) -> str:
    """``prefix`` with its open string, arrays and objects closed."""
    closers: list[str] = []
    in_string = escaped = False
    for char in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and closers:
            closers.pop()
    return prefix + ('"' if in_string else "") + "".join(reversed(closers))


def parse_cut_tool_call(body: str, schemas: Schemas | None = None) -> ToolCallPiece | None:
    """A tool call cut off inside ``body``: its name if written whole, and the longest prefix of its
    arguments that parses once closed (trimmed back up to 64 characters; else no arguments); in
    the XML form, its closed parameters."""
    if body.lstrip().startswith("<function="):
        return parse_xml_tool_call(body, schemas, cut=True)
    named = _NAME.match(body)
    if named is None:
        return None
    name = loads(f'"{named.group(1)}"')
    partial = _written_arguments(body, named.end())
    try:
        value = closed_prefix(body, named.end())
    except ValueError:
        return ToolCallPiece(name, {}, partial)
    arguments = value.get("arguments", value.get("parameters", {})) if isinstance(value, dict) else {}
    return ToolCallPiece(name, arguments if isinstance(arguments, dict) else {}, partial)


# What may complete a value cut off at its end: a key's colon and value, a value after a colon or
# comma, the rest of a literal, a number's digit, an escape's letter or hex digits (open strings, arrays and
# objects are closed by ``_closed``).
_COMPLETIONS = ("", " null", '": null', ": null", ' "": null', "0", "00", "000", "0000", "n", "rue", "ue", "e", "alse", "lse", "se", "ull", "ll", "l")


def is_json_prefix(text: str) -> bool:
    """Whether ``text`` is the start of some JSON text (what a model cut off mid-value wrote)."""
    for completion in _COMPLETIONS:
        try:
            loads(_closed(text + completion))
            return True
        except ValueError:
            continue
    return False


def closed_prefix(text: str, floor: int = 0, paired: bool = True) -> Any:
    """The value of the longest prefix of cut-off JSON ``text`` that parses once its open string,
    arrays and objects are closed (trimmed back up to 64 characters, never before ``floor``);
    ``ValueError`` if none does. ``paired``: as ``loads``'s (a client's text keeps its lone
    surrogates, for its check to refuse them)."""
    for cut in range(len(text), max(floor, len(text) - 64) - 1, -1):
        try:
            return loads(_closed(text[:cut].rstrip().rstrip(",:")), paired)
        except ValueError:
            continue
    raise ValueError("no prefix parses")


def _written_arguments(body: str, after_name: int) -> str:
    """The text of a cut-off call's arguments as the model wrote it ("" before they began): the
    arguments a client sees streamed token by token, unclosed, as OpenAI's API returns them."""
    key = _ARGUMENTS.match(body, after_name)
    if key is None:
        return ""
    written = body[key.end() :]
    if written.startswith('"'):  # arguments written as a JSON string: the text it holds so far
        try:
            written = loads(_closed(written))
        except ValueError:  # cut inside an escape
            return ""
        if not isinstance(written, str):
            return ""
    try:  # arguments whole, the call cut after them: the arguments alone, without the call's "}"
        return written[: json.JSONDecoder().raw_decode(written)[1]]
    except (ValueError, RecursionError):
        return written


def _partial_tag_at(text: str, tags: tuple[str, ...]) -> int:
    """Where a suffix of ``text`` that could still grow into one of ``tags`` starts (len if none)."""
    for start in range(max(0, len(text) - max(len(t) for t in tags) + 1), len(text)):
        tail = text[start:]
        if any(tag.startswith(tail) for tag in tags):
            return start
    return len(text)


class OutputParser:
    """Incremental splitter of generated text into text, thinking and tool calls.

    ``tools``: parse tool calls (the request offered tools; ``schemas``: their input schemas).
    ``thinking``: the model may think (``in_thinking``: the prompt already opened ``<think>``, as
    thinking templates' generation prompts do, so the output starts inside it).
    """

    def __init__(self, *, tools: bool, thinking: bool, in_thinking: bool = False, schemas: Schemas | None = None) -> None:
        self.tools = tools
        self.schemas = schemas  # for XML calls' values: which are strings, which JSON
        self.thinking = thinking
        self._state = "think" if (thinking and in_thinking) else "text"
        self._buffer = ""  # text not yet returned: a possible partial tag, or a tool call's body
        self._held_space = ""  # whitespace after text, returned only if more text follows
        self._after_block = False  # strip the blank lines Qwen puts after a block
        self._answered = False  # thinking is over, or text or a tool call came first
        self._texted = False  # some answer text has been returned
        self.tool_calls = 0

    @property
    def in_thinking(self) -> bool:
        return self._state == "think"

    @property
    def in_tool_call(self) -> bool:
        return self._state == "tool"

    def _open_tags(self) -> tuple[str, ...]:
        tags: list[str] = []
        if self.tools:
            tags.append(TOOL_OPEN)
        if self.thinking and not self._answered:  # thinking comes first, once
            tags.append(THINK_OPEN)
        return tuple(tags)

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._buffer:
            if not self._step(pieces):
                break
        return pieces

    def finish(self, truncated: bool = False) -> list[Piece]:
        """The end of generation: whatever is still held back, as what it was. ``truncated``: the
        token limit ended it (so a tool call it cut off is returned, incomplete)."""
        pieces: list[Piece] = []
        buffer, self._buffer = self._buffer, ""
        if self._state == "think":
            if buffer:
                pieces.append(ThinkingPiece(buffer))
        elif self._state == "tool":  # ended inside a tool call
            call = parse_cut_tool_call(buffer, self.schemas) if truncated else None
            self._held_space = ""  # it came before a tool call, as whitespace before a whole one
            if call is not None:
                self.tool_calls += 1
                pieces.append(call)
        else:
            self._text(buffer, pieces)
        if self._held_space and self.tool_calls == 0 and self._texted:  # the answer ends as the model ended it
            pieces.append(TextPiece(self._held_space))
        self._held_space = ""
        self._state = "text"
        return pieces

    def _step(self, pieces: list[Piece]) -> bool:
        """Consume what the buffer allows; False when it must wait for more text."""
        buffer = self._buffer
        if self._state == "think":
            end = buffer.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_tag_at(buffer, (THINK_CLOSE,))
                if keep:
                    pieces.append(ThinkingPiece(buffer[:keep]))
                self._buffer = buffer[keep:]
                return False
            if end:
                pieces.append(ThinkingPiece(buffer[:end]))
            self._buffer = buffer[end + len(THINK_CLOSE) :]
            self._state, self._after_block, self._answered = "text", True, True
            return True
        if self._state == "tool":
            end = buffer.find(TOOL_CLOSE)
            if end < 0:
                return False
            body = buffer[:end]
            self._buffer = buffer[end + len(TOOL_CLOSE) :]
            self._state = "text"
            call = parse_tool_call(body, self.schemas)
            if call is None:
                self._text(TOOL_OPEN + body + TOOL_CLOSE, pieces)
            else:
                self._held_space = ""
                self.tool_calls += 1
                self._answered = True
                pieces.append(call)
                self._after_block = True
            return True
        tags = self._open_tags()
        found = [(buffer.find(tag), tag) for tag in tags]
        found = [(at, tag) for at, tag in found if at >= 0]
        if found:
            at, tag = min(found)
            self._text(buffer[:at], pieces)
            self._buffer = buffer[at + len(tag) :]
            if tag == TOOL_OPEN:
                self._state = "tool"
            else:
                self._state = "think"
            return True
        keep = _partial_tag_at(buffer, tags) if tags else len(buffer)
        self._text(buffer[:keep], pieces)
        self._buffer = buffer[keep:]
        return False

    def _text(self, text: str, pieces: list[Piece]) -> None:
        if not text:
            return
        if self._after_block:
            text = text.lstrip()
            if not text:
                return
            self._after_block = False
        stripped = text.rstrip()
        if stripped:
            self._answered = self._texted = True
            pieces.append(TextPiece(self._held_space + stripped))
            self._held_space = text[len(stripped) :]
        else:
            self._held_space += text
