"""Grammars for constrained decoding (llguidance's Lark dialect), built from a request.

What a request can constrain:

- a forced tool call (``tool_choice`` any or a named tool): the answer is one or more
  ``<tool_call>{"name": …, "arguments": …}</tool_call>`` blocks whose arguments are valid against the
  tool's ``input_schema``, and nothing else;
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
from dataclasses import dataclass
from typing import Any

from localvl.conversation import Tool, ToolChoice

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
    return _grammar_compiles("start: " + _json(schema))


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


def _thinking_prefix(tags: TagIds) -> str:
    if tags.think_close is None:
        raise ValueError("the model's vocabulary has no </think> token")
    return f'thought: THOUGHT <[{tags.think_close}]> /\\n*/\nTHOUGHT: /(.|\\n)*/\n'


def request_grammar(
    tools: list[Tool],
    choice: ToolChoice,
    strict: tuple[str, ...],
    schema: dict[str, Any] | None,
    tags: TagIds,
    in_thinking: bool,
) -> str | None:
    """The grammar of this request's answer, or None if nothing about it is constrained.

    A forced tool call admits only tool calls; a JSON schema admits the JSON answer (or, when
    tools may be called, tool calls instead); strict tools under ``auto`` admit free text and then
    tool calls valid against their schemas.
    """
    callable_tools = tools if choice.mode != "none" else []
    forced = choice.mode in ("any", "tool")
    strict_auto = choice.mode == "auto" and any(t.name in strict for t in callable_tools)
    if not (forced or schema is not None or strict_auto):
        return None
    lines: list[str] = []
    if callable_tools:
        if tags.tool_open is None or tags.tool_close is None:
            raise ValueError("the model's vocabulary has no <tool_call> tokens")
        offered = [t for t in callable_tools if choice.mode != "tool" or t.name == choice.name]
        # A forced call is the point of the request: its arguments are held to the schema too.
        defs: dict[str, Any] = {}
        schemas = [_call_schema(t, forced or t.name in strict, t.name in strict, defs) for t in offered]
        call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        if defs:
            call = {**call, "$defs": defs}
        lines.append(f'block: <[{tags.tool_open}]> "\\n" call "\\n" <[{tags.tool_close}]>')
        lines.append(f"call: {_json(call)}")
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
    return grammar + (_thinking_prefix(tags) if in_thinking else "")
