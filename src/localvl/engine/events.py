"""Neutral events an engine streams for one request; dialects turn them into their own shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

# eos: the model ended its turn · tool_use: it ended its turn having called tools · max_tokens:
# the request's limit · stop_sequence: a client stop string matched · context_window: the model's
# context filled up before either of those.
FinishReason = Literal["eos", "tool_use", "max_tokens", "stop_sequence", "context_window"]


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0  # of output_tokens, those spent thinking (OpenAI's completion_tokens_details)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""

    token: str  # the token decoded alone (a partial character shows as U+FFFD; ``bytes`` is exact)
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Only when the request asked for them: the tokens whose text this delta completes.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ThinkingDelta:
    """Reasoning the model wrote before its answer (inside ``<think>`` for Qwen models)."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call: emitted once its arguments are complete and parse, or once the token limit cut it off."""

    id: str
    name: str
    input: dict[str, Any]
    # Cut off by the token limit: the arguments' JSON as written so far, unclosed ("input": what parses)
    partial: str | None = None


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None


Event = Union[TextDelta, ThinkingDelta, ToolCallEvent, Finished]


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request cost, for metrics: times and counts, never content."""

    ttft_s: float | None  # submit to first generated token (None: no token was generated)
    duration_s: float  # submit to finish
    output_tokens: int
    input_tokens: int  # the whole prompt
    cache_read_tokens: int
    reason: str
