"""The neutral conversation: what every API dialect converts a request into.

Nothing here knows about HTTP or any vendor's field names. A dialect builds a ``Conversation``
plus ``SamplingParams`` from its request body; prompt rendering and the engine consume only these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True, eq=False)
class Image:
    """A decoded, validated image. ``sha256`` is of the encoded bytes: the key for caches."""

    pixels: PILImage
    media_type: str
    sha256: str
    nbytes: int = 0  # the encoded size the client sent
    page: bool = False  # a rendered page of a document, not an image the client sent
    sent_size: tuple[int, int] | None = None  # as the client sent it, before any margin (within_aspect)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.size


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    tool_call_id: str
    content: tuple[Union[Text, Image], ...]
    is_error: bool = False


@dataclass(frozen=True)
class Thinking:
    text: str
    signature: str | None = None


Part = Union[Text, Image, ToolCall, ToolResult, Thinking]
Role = Literal["system", "user", "assistant"]


@dataclass
class Turn:
    role: Role
    parts: list[Part]

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, Text))

    def images(self) -> list[Image]:
        """The turn's images in the order a prompt shows them: the chat templates put a turn's tool
        results before the rest of it (``prompt/render.py``), whatever order the parts came in."""
        results = [p for part in self.parts if isinstance(part, ToolResult) for p in part.content if isinstance(p, Image)]
        return results + [part for part in self.parts if isinstance(part, Image)]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    input_schema: dict[str, Any]
    # Left out of the prompt's tool list until a tool search finds it (Anthropic's
    # ``defer_loading``); still callable, and its definition reads where the search answered.
    deferred: bool = False


# What both APIs take as a tool's name (Anthropic's pattern; OpenAI's is the same to 64). A name
# outside it could not be written back in every model's call syntax (Qwen3.5's <function=NAME>).
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
TOOL_NAME_PATTERN = "^[a-zA-Z0-9_-]{1,128}$"


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides · any: it must call one of the tools · tool: it must call ``name`` ·
    none: it may not call tools. ``parallel``: more than one call per turn is allowed."""

    mode: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    parallel: bool = True


@dataclass
class Conversation:
    """Turns in order; a final assistant turn is a prefill that the answer continues.

    ``thinking``: ask a thinking template to think (True) or not (False); None leaves it to the
    template's default.
    """

    turns: list[Turn]
    tools: list[Tool] = field(default_factory=list)
    thinking: bool | None = None

    @property
    def prefill(self) -> Turn | None:
        return self.turns[-1] if self.turns and self.turns[-1].role == "assistant" else None

    def images(self) -> list[Image]:
        return [image for turn in self.turns for image in turn.images()]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``None`` means "the model folder's default, else the API's"."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None  # None: the model folder's generation config
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias


@dataclass
class GenerationRequest:
    id: str
    conversation: Conversation
    sampling: SamplingParams
    priority: int = 0  # lower runs first: interactive 0, background work (batches) higher
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    thinking_budget: int | None = None  # most tokens of thinking before the answer is forced to begin
    output_schema: dict[str, Any] | None = None  # the answer's text must be JSON valid against it
    strict_tools: tuple[str, ...] = ()  # tools whose calls must validate against their input schema
    # Another choice (OpenAI's n) of a client request whose first choice the queue limit already
    # admitted: the limit counts client requests, so a choice never turns away its siblings.
    queue_checked: bool = False
