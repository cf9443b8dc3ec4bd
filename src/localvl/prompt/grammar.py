"""Grammars for constrained decoding (llguidance's Lark dialect), built from a request.

What a request can constrain:

- a forced tool call (``tool_choice`` any or a named tool): the answer is one or more
  ``<tool_call>{"name": …, "arguments": …}</tool_call>`` blocks whose arguments are valid against the
  tool's ``input_schema``, and nothing else (for Qwen3.5, ``<tool_call><function=…>`` blocks whose
  ``<parameter=…>`` values are, in the schema's order: a string as written, other values as JSON);
- strict tools under ``auto``: free text, then any tool calls, each valid against its schema;
- a JSON-schema answer (``output_config.format``): the text is a JSON value valid against it.

If the prompt left the model inside ``<think>``, the grammar first lets it finish its thinking.
The tags are single tokens in every Qwen vocabulary, referenced by id, so text that merely spells
them out never counts as one. JSON is written compactly-spaced as Qwen writes it
(``{"a": 1, "b": 2}``), so a constrained answer reads like an unconstrained one.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from localvl.conversation import Tool, ToolChoice
from localvl.prompt.outputs import pointed, resolve_ref

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class TagIds:
    """Token ids of the tags a grammar refers to."""

    tool_open: int | None
    tool_close: int | None
    think_close: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> TagIds:
        vocab = tokenizer.get_vocab()
        return cls(vocab.get("<tool_call>"), vocab.get("</tool_call>"), vocab.get("</think>"))


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def _compiles(schema: dict[str, Any]) -> bool:
    return not _alias_loop(schema) and _grammar_compiles("start: " + _json(schema))


# Keywords that constrain nothing: a schema of these and a ``$ref`` is only another name for its target.
_ANNOTATIONS = {"$ref", "title", "description", "$comment", "default", "examples", "$defs", "definitions", "$schema", "$id"}


def _alias_loop(schema: Any) -> bool:
    """Whether a local ``$ref`` leads, through schemas that are only refs, back to itself (``{"$ref":
    "#"}`` at the root, a ``$defs`` entry naming itself): no JSON value matches such a schema, and
    llguidance compiles it to a grammar that admits nothing, so the output would be empty."""
    nodes, seen = [schema], 0
    while nodes and seen < 100_000:
        node = nodes.pop()
        seen += 1
        if isinstance(node, list):
            nodes.extend(node)
        elif isinstance(node, dict):
            nodes.extend(node.values())
            visited: set[str] = set()
            while isinstance(node, dict) and isinstance(node.get("$ref"), str) and set(node) <= _ANNOTATIONS:
                ref = node["$ref"]
                if not ref.startswith("#"):
                    break
                if ref in visited:
                    return True
                visited.add(ref)
                node = pointed(schema, ref)
    return False


@functools.lru_cache(maxsize=512)
def _grammar_compiles(grammar: str) -> bool:
    # Clients send the same tools with every request (Claude Code its whole set): one check each.
    import llguidance

    return not llguidance.LLMatcher.validate_grammar(grammar)


def _rebased(value: Any, root: str) -> Any:
    """``value`` with every local ``$ref`` ("#...") pointing under ``root`` (a JSON pointer) instead."""
    if isinstance(value, dict):
        return {k: (f"#{root}{v[1:]}" if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, root))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(item, root) for item in value]
    return value


def _call_schema(tool: Tool, held: bool, strict: bool, defs: dict[str, Any]) -> dict[str, Any]:
    """A call's schema; ``held``: its arguments are held to the tool's schema. A tool's local
    ``$ref``s (pydantic's ``$defs``, a recursive ``#``) point into its own schema, which therefore
    moves into the grammar's ``$defs`` (``defs``), its refs rebased there. A forced call to a
    non-strict tool whose schema llguidance cannot compile (``uniqueItems``, ``not``, ...) is held
    to a JSON object only, as Anthropic's API holds non-strict schemas to nothing."""
    arguments: dict[str, Any] = tool.input_schema if held else {"type": "object"}
    if held and '"$ref"' in json.dumps(arguments):
        key = f"localvl_tool_{len(defs)}"
        defs[key] = _rebased(arguments, f"/$defs/{key}")
        arguments = {"$ref": f"#/$defs/{key}"}
    if held and not strict and not _compiles({**arguments, "$defs": defs} if defs else arguments):
        arguments = {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# A string parameter's value and the line that closes it, matched lazily: up to the first such line.
XML_CLOSE = "\\n<\\/parameter>"
XML_TEXT = f"xml_text[lazy]: /(.|\\n)*{XML_CLOSE}/"
XML_ANY_PARAMETER = 'xml_any: "<parameter=" /[^>\\n]+/ ">\\n" xml_text "\\n"'
# What a string's schema may say that its XML value can be held to (the rest only describes it).
_STRING_KEYS = {"type", "description", "title", "default", "examples", "minLength", "maxLength", "pattern",
                "nullable", "$comment", "deprecated", "readOnly", "writeOnly"}


def _length(value: Any) -> bool:
    """Whether a ``minLength``/``maxLength`` is one: a non-negative integer (5.0 is one, as JSON
    Schema counts it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and float(value).is_integer()


def _string_regex(schema: dict[str, Any]) -> str | None:
    """A lazy regex for a string value held to its schema, closing line included; None where the
    schema says more than this can hold (a ``format``, a pattern and a length together)."""
    if set(schema) - _STRING_KEYS:
        return None
    low, high = schema.get("minLength"), schema.get("maxLength")
    if not all(bound is None or _length(bound) for bound in (low, high)):
        return None
    pattern = schema.get("pattern")
    if pattern is not None and (low is not None or high is not None or not isinstance(pattern, str)):
        return None
    if isinstance(pattern, str):
        # JSON Schema's patterns search; the value must match whole: unanchored ends take any text.
        body = re.sub(r"(?<!\\)/", r"\\/", pattern)
        start = body.startswith("^")
        end = body.endswith("$") and not body.endswith("\\$")
        if (start or end) and _alternates(body):
            return None  # "^a$|^b$": anchors inside; llguidance takes none
        body = body[1 if start else 0 : len(body) - 1 if end else len(body)]
        anything = "(.|\\n)*"
        return ("" if start else anything) + f"({body})" + ("" if end else anything) + XML_CLOSE
    if low is None and high is None:
        return f"(.|\\n)*{XML_CLOSE}"
    return f"(.|\\n){{{int(low or 0)},{'' if high is None else int(high)}}}{XML_CLOSE}"


def _alternates(pattern: str) -> bool:
    """Whether a regex has a ``|`` outside every group and character class."""
    depth, escaped, in_class = 0, False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
    return False


def _string_option(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The string a schema allows, as a schema of its own: itself (``"string"``, or among its
    types), or its ``anyOf``/``oneOf`` string option; None if it allows no string."""
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return schema
    options = schema.get("anyOf") or schema.get("oneOf")
    if not isinstance(options, list):  # (a client's schema may hold anything there)
        return None
    return next((o for o in options if isinstance(o, dict) and o.get("type") == "string"), None)


def _writable(text: str) -> bool:
    """Whether a value can be written in the XML form and read back as itself."""
    return "</parameter>" not in text


def _lazy_rule(rule: str, regex: str) -> str | None:
    """A lazy terminal for ``regex``, or None where llguidance cannot take it (lookarounds, anchors
    inside a pattern, a minLength above the maxLength)."""
    line = f"{rule}[lazy]: /{regex}/"
    return line if _grammar_compiles(f"start: {rule}\n{line}\n") else None


def _xml_parameter(rule: str, key: str, schema: Any, root: dict[str, Any], strict: bool, lines: list[str]) -> None:
    """``rule``: one ``<parameter=key>`` whose value its schema holds: a string as written (an enum
    of strings as one of them), anything else as JSON. Refs resolve against the tool's schema
    (``root``). Where that cannot hold the value, a strict tool is refused and another's value is
    any text."""
    head = _lark_string(f"<parameter={key}>\n")
    loose = f'{rule}: {head} xml_text "\\n"'
    schema = resolve_ref(schema, root)  # pydantic's enums and models are refs to $defs

    def unheld(reason: str) -> None:
        if strict:
            raise ValueError(f"parameter {key!r}: {reason}")
        lines.append(loose)

    if not isinstance(schema, dict) or not schema:
        lines.append(loose)
        return
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        if not all(_writable(v) for v in enum):
            return unheld("an enum value holds '</parameter>', which this model's tool-call form cannot write")
        choices = " | ".join(_lark_string(v) for v in enum)
        lines.append(f'{rule}: {head} ({choices}) "\\n</parameter>\\n"')
        return
    if isinstance(schema.get("const"), str):
        if not _writable(schema["const"]):
            return unheld("its const holds '</parameter>', which this model's tool-call form cannot write")
        lines.append(f'{rule}: {head} {_lark_string(schema["const"])} "\\n</parameter>\\n"')
        return
    string = _string_option(schema)
    if string is not None:
        # Any text is a valid value where the string is unconstrained, whatever else is allowed
        # beside it (Optional[str]: null; the reader takes "null" as null when it is).
        regex = _string_regex(string)
        text = _lazy_rule(f"{rule}_text", regex) if regex is not None else None
        if text is None:
            return unheld("its string schema cannot be held in this model's tool-call form")
        lines += [text, f'{rule}: {head} {rule}_text "\\n"']
        return
    value = {**_rebased(schema, "/$defs/tool"), "$defs": {"tool": _rebased(root, "/$defs/tool")}} if '"$ref"' in json.dumps(schema) else schema
    if not _compiles(value):
        return unheld("llguidance cannot compile its schema")
    lines.append(f'{rule}: {head} {_json(value)} "\\n</parameter>\\n"')


def _xml_call(index: int, tool: Tool, held: bool, strict: bool, lines: list[str]) -> str:
    """Rules for one tool's XML call (Qwen3.5's form); returns the call's rule name. Held, its
    parameters follow its schema's properties in their order, the required ones present; else
    any parameters with any values. A parameter name this form cannot write (a ``>`` or a line
    break in it) leaves a strict tool refused and another unheld."""
    schema = tool.input_schema
    properties = schema.get("properties") if held else None
    rule = f"xml_call_{index}"
    head = _lark_string(f"<function={tool.name}>\n")
    if isinstance(properties, dict) and any(">" in key or "\n" in key for key in properties):
        if strict:
            raise ValueError(f"tool {tool.name!r}: a parameter name with '>' or a line break cannot be written in this model's tool-call form")
        properties = None
    if isinstance(properties, dict) and not properties and schema.get("additionalProperties") is False:
        lines.append(f'{rule}: {head} "</function>"')  # no parameters at all
        return rule
    if not isinstance(properties, dict) or not properties:
        lines.append(f'{rule}: {head} xml_any* "</function>"')
        return rule
    required = schema.get("required") or []
    if not isinstance(required, list):  # no names at all: a strict tool is refused; another's are all optional
        if strict:
            raise ValueError(f"tool {tool.name!r}: its schema's required is not a list of names")
        required = []
    required = [k for k in required if isinstance(k, str)]
    # A required name the properties leave out takes any value after them.
    properties = {**properties, **{k: {} for k in required if k not in properties}}
    parts: list[str] = []
    for number, (key, sub) in enumerate(properties.items()):
        name = f"{rule}_{number}"
        _xml_parameter(name, key, sub, schema, strict, lines)
        parts.append(name if key in required else f"{name}?")
    lines.append(f'{rule}: {head} {" ".join(parts)} "</function>"')
    return rule


def _thinking_prefix(tags: TagIds, free: bool) -> str:
    if tags.think_close is None:
        raise ValueError("the model's vocabulary has no </think> token")
    thought = "(.|\\n)*" if free else "\\n*"  # not free: the thinking is closed at once, empty
    return f'thought: THOUGHT <[{tags.think_close}]> /\\n*/\nTHOUGHT: /{thought}/\n'


def request_grammar(
    tools: list[Tool],
    choice: ToolChoice,
    strict: tuple[str, ...],
    schema: dict[str, Any] | None,
    tags: TagIds,
    in_thinking: bool,
    xml: bool = False,
    thought: bool = True,
) -> str | None:
    """The grammar of this request's answer, or None if nothing about it is constrained.

    A forced tool call admits only tool calls; a JSON schema admits the JSON answer (or, when
    tools may be called, tool calls instead); strict tools under ``auto`` admit free text and then
    tool calls valid against their schemas. ``xml``: the model writes tool calls in Qwen3.5's XML
    form (``<function=…>`` with ``<parameter=…>`` values) rather than as JSON. ``in_thinking``:
    the prompt left the model inside ``<think>``; ``thought``: it may think there, else it must
    close the thinking at once.
    """
    callable_tools = tools if choice.mode != "none" else []
    forced = choice.mode in ("any", "tool")
    if schema is not None and _alias_loop(schema):
        raise ValueError("the schema's $ref refers only to itself: no JSON value matches it")
    for tool in callable_tools:
        if tool.name in strict and _alias_loop(tool.input_schema):
            raise ValueError(f"tool {tool.name!r}: a $ref in its input_schema refers only to itself: no JSON value matches it")
    strict_auto = choice.mode == "auto" and any(t.name in strict for t in callable_tools)
    if not (forced or schema is not None or strict_auto):
        return None
    lines: list[str] = []
    if callable_tools:
        if tags.tool_open is None or tags.tool_close is None:
            raise ValueError("the model's vocabulary has no <tool_call> tokens")
        offered = [t for t in callable_tools if choice.mode != "tool" or t.name == choice.name]
        # A forced call is the point of the request: its arguments are held to the schema too.
        if xml:
            rules = [_xml_call(i, t, forced or t.name in strict, t.name in strict, lines) for i, t in enumerate(offered)]
            lines += [f"call: {' | '.join(rules)}", XML_ANY_PARAMETER, XML_TEXT]
        else:
            defs: dict[str, Any] = {}
            schemas = [_call_schema(t, forced or t.name in strict, t.name in strict, defs) for t in offered]
            call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
            if defs:
                call = {**call, "$defs": defs}
            lines.append(f"call: {_json(call)}")
        lines.append(f'block: <[{tags.tool_open}]> "\\n" call "\\n" <[{tags.tool_close}]>')
        calls = 'block ("\\n" block)*' if choice.parallel else "block"
    head = "thought " if in_thinking else ""
    if forced:
        start = f"start: {head}{calls}"
    elif schema is not None:
        lines.append(f"answer: {_json(schema)}")
        start = f"start: {head}(answer | {calls})" if callable_tools else f"start: {head}answer"
    else:
        lines.append("TEXT: /(.|\\n)+/")
        start = f"start: {head}TEXT? ({calls})?"
    grammar = "\n".join([start, *lines]) + "\n"
    return grammar + (_thinking_prefix(tags, thought) if in_thinking else "")
