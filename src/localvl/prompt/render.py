"""From a neutral conversation to model inputs, through the model folder's own template and processor.

There is exactly one path from conversation to token ids; generation, ``usage.input_tokens`` and
``count_tokens`` all take it, so the three always agree. The prompt format is never written here:
it is whatever the folder's chat template says.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import queue
from typing import Any

import jinja2
import torch

from localvl.conversation import Conversation, Image, Text, Thinking, Tool, ToolCall, ToolResult, Turn
from localvl.engine.qwen_vl import PromptInputs
from localvl.errors import InvalidRequestError
from localvl.models import patches
from localvl.prompt.literal import LiteralText
from localvl.prompt.tools import PROBE_TOOL, hermes_messages


def _content(parts: list[Any]) -> str | list[dict[str, Any]]:
    """Template content for text and images: a plain string when there are no images."""
    items: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, Text):
            items.append({"type": "text", "text": part.text})
        elif isinstance(part, Image):
            items.append({"type": "image"})
    if all(item["type"] == "text" for item in items):
        return "".join(item["text"] for item in items)
    return items


def template_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The conversation as the list of messages HF chat templates take (OpenAI-like dicts)."""
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        if turn.role == "assistant":
            messages.append(_assistant_message(turn))
            continue
        rest: list[Any] = []
        for part in turn.parts:
            if isinstance(part, ToolResult):
                content = list(part.content)
                if part.is_error:  # the templates have no notion of a failed call: the model reads it
                    content.insert(0, Text("Error: "))
                messages.append({"role": "tool", "tool_call_id": part.tool_call_id, "content": _content(content)})
            else:
                rest.append(part)
        if rest or not any(isinstance(p, ToolResult) for p in turn.parts):
            messages.append({"role": turn.role, "content": _content(rest)})
    return messages


def _assistant_message(turn: Turn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": _content([p for p in turn.parts if isinstance(p, Text)])}
    calls = [p for p in turn.parts if isinstance(p, ToolCall)]
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.input}} for c in calls
        ]
    thinking = "".join(p.text for p in turn.parts if isinstance(p, Thinking))
    if thinking:
        message["reasoning_content"] = thinking
    return message


def tool_definition(tool: Tool) -> dict[str, Any]:
    """A tool as the chat templates (and the Hermes tool list) take it."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description or "", "parameters": tool.input_schema}}


def template_tools(conversation: Conversation) -> list[dict[str, Any]] | None:
    """The prompt's tool list: every tool but deferred ones (their definitions come with the tool
    search results that name them), so the list, and the prefix cache, stay the same all along."""
    listed = [tool_definition(t) for t in conversation.tools if not t.deferred]
    return listed or None


class Renderer:
    """Renders conversations with the folder's processor. Safe to call from any thread.

    Rust tokenizers raise "Already borrowed" when one instance is used from two threads, so each
    render takes a processor of its own from a small pool of copies: ``workers`` requests are
    processed in parallel (image preprocessing is most of a render).
    """

    def __init__(self, processor: Any, template_kwargs: dict[str, Any] | None = None, workers: int = 1) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template_kwargs = dict(template_kwargs or {})
        self._processors: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._processors.put(processor)
        for _ in range(max(1, workers) - 1):
            self._processors.put(copy.deepcopy(processor))

    @property
    def _template_owner(self) -> Any:
        return self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer

    @functools.cached_property
    def chat_template(self) -> str:
        template = getattr(self._template_owner, "chat_template", None) or ""
        return template if isinstance(template, str) else json.dumps(template)

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the folder's template writes a ``tools`` list into the prompt itself."""
        probe = [{"type": "function", "function": {"name": PROBE_TOOL, "description": "", "parameters": {"type": "object"}}}]
        try:
            text = self._template_owner.apply_chat_template(
                [{"role": "user", "content": "hi"}], tools=probe, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template that chokes on tools cannot render them
            return False
        return PROBE_TOOL in text

    @functools.cached_property
    def xml_tool_calls(self) -> bool:
        """Whether the model writes tool calls in Qwen3.5's XML form (``<function=…>``), as its
        template teaches, rather than as JSON."""
        return "<function=" in self.chat_template

    @functools.cached_property
    def thinks(self) -> bool:
        """Whether the model writes ``<think>`` reasoning: its template knows the tag."""
        return "<think>" in self.chat_template

    @functools.cached_property
    def literal(self) -> LiteralText:
        pads = tuple(getattr(self.processor, name, None) or "" for name in ("image_token", "video_token"))
        return LiteralText(self.tokenizer, self.chat_template, tuple(p for p in pads if p))

    def prompt_text(self, conversation: Conversation, literals: list[str] | None = None) -> str:
        """The rendered prompt. With ``literals``, client text that spells an added token holds a
        placeholder instead (``literal.py``), its literal appended to the list."""
        try:
            return self._prompt_text(conversation, literals)
        except RecursionError:  # a tool call's input nested thousands deep: the walks over it recurse
            raise InvalidRequestError("the conversation holds a value nested too deeply to render") from None

    def _prompt_text(self, conversation: Conversation, literals: list[str] | None) -> str:
        prefill = conversation.prefill
        if prefill is not None and prefill.text != prefill.text.rstrip():
            raise InvalidRequestError("final assistant content cannot end with trailing whitespace")
        kwargs: dict[str, Any] = dict(self.template_kwargs)
        messages = template_messages(conversation)
        tools = template_tools(conversation)
        if literals is not None:  # before any text of this module's own (hermes_messages) joins
            messages = self.literal.escape(messages, literals)
            tools = self.literal.escape(tools, literals)
        if self.renders_tools:
            if tools:
                kwargs["tools"] = tools
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = hermes_messages(messages, tools)
        if conversation.thinking is not None and "enable_thinking" in self.chat_template:
            # (only where the template reads it: transformers warns, on every request, of a
            # variable the template leaves unread)
            kwargs["enable_thinking"] = conversation.thinking
        if prefill is not None:
            kwargs.update(add_generation_prompt=False, continue_final_message=True)
        else:
            kwargs.update(add_generation_prompt=True)
        try:
            return self._template_owner.apply_chat_template(messages, tokenize=False, **kwargs)
        except jinja2.TemplateError as error:
            raise InvalidRequestError(f"the model's chat template rejected the conversation: {error}") from None
        except ValueError as error:  # e.g. continue_final_message on content the template rewrote
            raise InvalidRequestError(f"the model's chat template rejected the conversation: {error}") from None

    def render(self, conversation: Conversation, compact: bool = False) -> PromptInputs:
        """The prompt's token ids and its images' pixels; with ``compact``, the images' ``Patches``
        instead where the processor can make them (``models/patches.py``)."""
        literals: list[str] = []
        text = self.prompt_text(conversation, literals)
        found = conversation.images()
        images = [image.pixels for image in found]
        processor = self._processors.get()
        try:
            with patches.compact() if compact else contextlib.nullcontext():
                out = processor(text=[text], images=images or None, return_tensors="pt")
        except ValueError as error:  # e.g. Qwen's resize refuses aspect ratios over 200:1
            raise InvalidRequestError(f"the model's processor rejected an image: {error}") from None
        finally:
            self._processors.put(processor)
        input_ids = out["input_ids"][0].to(torch.long)
        if literals:
            input_ids = torch.tensor(self.literal.restore(input_ids.tolist(), literals), dtype=torch.long)
        if images:
            keys = tuple(image.sha256 for image in found)
            return PromptInputs(input_ids, out.get("pixel_values"), out["image_grid_thw"], keys, out.get("patches"))
        return PromptInputs(input_ids)

    def count(self, conversation: Conversation) -> int:
        # Compact: the count needs the image tokens, not the images' float pixels.
        return int(self.render(conversation, compact=True).input_ids.numel())
