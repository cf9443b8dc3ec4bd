"""Tools for templates that cannot render them, the way Qwen models were taught (Hermes style).

The published Qwen2-VL and Qwen2.5-VL templates have no tools section, yet the models answer
Hermes-style tool prompts as Qwen2.5's text models do. When a folder's template ignores ``tools``,
the renderer rewrites the conversation's messages into that form first: the tool list as a
``# Tools`` section of the system message, past calls as ``<tool_call>`` JSON in the assistant's
text, and tool results as ``<tool_response>`` blocks in a user turn (images stay inside them).
A template that renders tools itself is always used as it is.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant."
PROBE_TOOL = "localvl_probe_tool"


def tools_section(tools: list[dict[str, Any]]) -> str:
    listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + listed
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call>'
    )


def tool_call_text(name: str, arguments: Any) -> str:
    return '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + json.dumps(
        arguments, ensure_ascii=False
    ) + "}\n</tool_call>"


def _as_parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _simplify(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Adjacent text parts joined; a plain string when there is no image."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        elif part["type"] != "text" or part["text"]:
            merged.append(part)
    if all(p["type"] == "text" for p in merged):
        return "".join(p["text"] for p in merged)
    return merged


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Template messages with tools, tool calls and tool results written out as text."""
    out: list[dict[str, Any]] = []
    if tools:
        section = tools_section(tools)
        if messages and messages[0]["role"] == "system":
            system = _as_parts(messages[0]["content"]) + [{"type": "text", "text": "\n\n" + section}]
            out.append({"role": "system", "content": _simplify(system)})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": DEFAULT_SYSTEM + "\n\n" + section})
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            parts = _as_parts(message.get("content") or "")
            for call in message["tool_calls"]:
                function = call.get("function", call)
                lead = "\n" if any(p["type"] == "text" and p["text"] for p in parts) else ""
                parts.append({"type": "text", "text": lead + tool_call_text(function["name"], function["arguments"])})
            out.append({"role": "assistant", "content": _simplify(parts)})
        elif role == "tool":
            wrapped = [{"type": "text", "text": "<tool_response>\n"}, *_as_parts(message["content"]),
                       {"type": "text", "text": "\n</tool_response>"}]
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                joined = _as_parts(out[-1]["content"]) + [{"type": "text", "text": "\n"}] + wrapped
                out[-1] = {"role": "user", "content": _simplify(joined), "_tool_results": True}
            else:
                out.append({"role": "user", "content": _simplify(wrapped), "_tool_results": True})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]
