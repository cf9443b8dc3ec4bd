"""Request bodies of Anthropic's Messages API, as pydantic models.

Unknown fields are kept, never rejected (clients send fields newer than this server). Content
blocks are a tagged union on ``type``: blocks localvl renders are modelled; blocks Anthropic
defines that have no meaning for a local model are accepted and dropped (docs/COMPATIBILITY.md);
an unknown ``type`` is a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError



class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextBlockParam(_Open):
    type: Literal["text"]
    text: str
    cache_control: Any = None
    citations: Any = None


class Base64ImageSource(_Open):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLImageSource(_Open):
    type: Literal["url"]
    url: str


class FileImageSource(_Open):
    type: Literal["file"]
    file_id: str


def _type_of(value: Any) -> str | None:
    """A block's ``type`` when it is a string (a client may send anything there: a dict is no tag)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


def _image_source_tag(value: Any) -> str | None:
    kind = _type_of(value)
    return kind if kind in ("base64", "url", "file") else None


ImageSource = Annotated[
    Union[
        Annotated[Base64ImageSource, Tag("base64")],
        Annotated[URLImageSource, Tag("url")],
        Annotated[FileImageSource, Tag("file")],
    ],
    Discriminator(
        _image_source_tag,
        custom_error_type="invalid_source_type",
        custom_error_message="image source type must be one of: base64, url, file",
    ),
]


class ImageBlockParam(_Open):
    type: Literal["image"]
    source: ImageSource
    cache_control: Any = None


class DocumentBlockParam(_Open):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None
    citations: Any = None
    cache_control: Any = None


class SearchResultBlockParam(_Open):
    type: Literal["search_result"]
    source: str
    title: str
    content: list[TextBlockParam]
    citations: Any = None
    cache_control: Any = None


class ToolReferenceBlockParam(_Open):
    """A tool a client-side tool search found (Claude Code's ToolSearch answers with these)."""

    type: Literal["tool_reference"]
    tool_name: str
    cache_control: Any = None


TOOL_RESULT_BLOCK_TYPES = ("text", "image", "document", "search_result", "tool_reference")


def _tool_result_tag(value: Any) -> str | None:
    kind = _type_of(value)
    return kind if kind in TOOL_RESULT_BLOCK_TYPES else None


ToolResultContentBlock = Annotated[
    Union[
        Annotated[TextBlockParam, Tag("text")],
        Annotated[ImageBlockParam, Tag("image")],
        Annotated[DocumentBlockParam, Tag("document")],
        Annotated[SearchResultBlockParam, Tag("search_result")],
        Annotated[ToolReferenceBlockParam, Tag("tool_reference")],
    ],
    Discriminator(
        _tool_result_tag,
        custom_error_type="invalid_block_type",
        custom_error_message="tool_result content blocks must be one of: " + ", ".join(TOOL_RESULT_BLOCK_TYPES),
    ),
]


class ToolUseBlockParam(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Any = None


class ToolResultBlockParam(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultContentBlock] | None = None
    is_error: bool | None = None
    cache_control: Any = None


class ThinkingBlockParam(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlockParam(_Open):
    type: Literal["redacted_thinking"]
    data: str


class IgnoredBlockParam(_Open):
    """A block Anthropic defines for its own server-side tools; a local model has no use for it."""

    type: str


# Block types of Anthropic's API that belong to its hosted tools and containers.
IGNORED_BLOCK_TYPES = frozenset(
    {
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)
MODELLED_BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
)


def _block_tag(value: Any) -> str | None:
    kind = _type_of(value)
    if kind in MODELLED_BLOCK_TYPES:
        return kind
    if kind in IGNORED_BLOCK_TYPES:
        return "ignored"
    return None


ContentBlockParam = Annotated[
    Union[
        Annotated[TextBlockParam, Tag("text")],
        Annotated[ImageBlockParam, Tag("image")],
        Annotated[DocumentBlockParam, Tag("document")],
        Annotated[SearchResultBlockParam, Tag("search_result")],
        Annotated[ToolUseBlockParam, Tag("tool_use")],
        Annotated[ToolResultBlockParam, Tag("tool_result")],
        Annotated[ThinkingBlockParam, Tag("thinking")],
        Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking")],
        Annotated[IgnoredBlockParam, Tag("ignored")],
    ],
    Discriminator(
        _block_tag,
        custom_error_type="invalid_block_type",
        custom_error_message="content block type must be one of: " + ", ".join(MODELLED_BLOCK_TYPES),
    ),
]


class MessageParam(_Open):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockParam]


class ToolParam(_Open):
    """A client tool (``input_schema``) or one of Anthropic's server tools (a ``type``, no schema;
    toolsets such as ``mcp_toolset`` or ``computer_toolset_…`` have no ``name`` either)."""

    type: str | None = None  # (before name: name's check reads it)
    name: str | None = Field(None, validate_default=True)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    strict: bool | None = None
    cache_control: Any = None

    @field_validator("name")
    @classmethod
    def _named_unless_a_toolset(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is None and info.data.get("type") in (None, "custom"):
            raise PydanticCustomError("missing", "Field required")
        return name


class _ConversationFields(_Open):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(_ConversationFields):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(_ConversationFields):
    pass
