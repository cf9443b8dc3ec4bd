"""What happens to a request before the engine thread sees it: render, check, resolve, plan.

Needs the model's processor and a few facts from its config, never its weights, so it can run in
the HTTP server's process while the engine runs in another (``process.py``). The ``Admission`` it
makes is plain data (tensors, ids, strings): it crosses a process boundary as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import anyio

from localvl.conversation import Conversation, GenerationRequest, SamplingParams
from localvl.engine.blocks import ImageSpan
from localvl.engine.runner import PromptState, prepare_prompt
from localvl.engine.sampling import ResolvedSampling
from localvl.engine.stops import check_stops
from localvl.errors import ContextLengthError, InvalidRequestError
from localvl.prompt.grammar import TagIds, request_grammar
from localvl.prompt.outputs import THINK_OPEN, OutputParser
from localvl.prompt.render import Renderer


@dataclass(frozen=True)
class ModelFacts:
    """What the front end must know of the model besides its processor (plain data)."""

    image_token_id: int
    spatial_merge_size: int
    sampling_defaults: ResolvedSampling
    context_length: int  # the model's, capped by what the KV cache can hold


@dataclass
class Admission:
    """A rendered, checked request, ready to become a sequence on the engine thread."""

    id: str
    ids: list[int]
    images: tuple[ImageSpan, ...]
    prompt: PromptState
    sampling: ResolvedSampling
    stop_sequences: tuple[str, ...]
    seed: int | None
    logprobs: int | None
    max_new_tokens: int
    context_limited: bool  # max_new_tokens was cut to what the context has left
    priority: int
    parser: OutputParser | None
    thinking_budget: int | None
    one_tool_call: bool  # parallel tool calls were not allowed: the turn ends after the first
    grammar: str | None = None  # llguidance grammar the output must follow
    banned: tuple[int, ...] = field(default=())  # tokens never sampled
    bias: tuple[tuple[int, float], ...] = field(default=())  # (token id, added to its logit)
    queue_checked: bool = False  # GenerationRequest.queue_checked: the queue limit is not applied again


class Frontend:
    def __init__(self, processor: Any, facts: ModelFacts) -> None:
        self.facts = facts
        # Renders run in worker threads: a few in parallel keep a burst of image requests from
        # queueing behind one processor.
        self.renderer = Renderer(processor, workers=min(4, os.cpu_count() or 1))
        self.tags = TagIds.of(self.renderer.tokenizer)
        # prepare() decodes on the event loop's thread: a copy of its own, as a Rust tokenizer
        # must not serve two threads (the renderer's serve its worker threads).
        self._tokenizer = copy.deepcopy(self.renderer.tokenizer)

    async def count_tokens(self, conversation: Conversation) -> int:
        return await anyio.to_thread.run_sync(self.renderer.count, conversation)

    async def prepare(self, request: GenerationRequest, compact: bool = False) -> Admission:
        """``compact``: images as ``Patches`` (bytes), for an engine in another process to make pixels of."""
        check_stops(request.sampling.stop_sequences)
        if request.tool_choice.mode in ("any", "tool") and request.conversation.thinking is None:
            # A forced call is the whole answer (Anthropic's API refuses thinking beside one): a
            # template that thinks unless told not to (Qwen3.5) is told not to.
            request = dataclasses.replace(request, conversation=dataclasses.replace(request.conversation, thinking=False))
        rendered = await anyio.to_thread.run_sync(self.renderer.render, request.conversation, compact)
        facts = self.facts
        length = int(rendered.input_ids.numel())
        limit = facts.context_length
        if length > limit:
            raise ContextLengthError(f"prompt is too long: {length} tokens > {limit} maximum", tokens=length, limit=limit)
        ids, images, state = prepare_prompt(rendered, facts.image_token_id, facts.spatial_merge_size)
        room = limit - length
        sampling = request.sampling
        parser = self._parser(request, ids)
        conversation, choice = request.conversation, request.tool_choice
        in_thinking = parser is not None and parser.in_thinking
        try:
            grammar = request_grammar(
                conversation.tools, choice, request.strict_tools, request.output_schema, self.tags, in_thinking,
                xml=self.renderer.xml_tool_calls,
                # A forced call not asked to think after (Anthropic's API allows no thinking beside
                # one) comes at once, even where the template opened <think> regardless.
                thought=not (choice.mode in ("any", "tool") and conversation.thinking is False),
            )
        except ValueError as error:
            raise InvalidRequestError(f"this model cannot constrain its output that way: {error}") from None
        except RecursionError:
            raise InvalidRequestError("this model cannot constrain its output that way: a schema nested too deeply") from None
        vocabulary = len(self._tokenizer)
        if any(token >= vocabulary for token, _ in sampling.logit_bias):
            raise InvalidRequestError(f"logit_bias: token ids must be below {vocabulary}, the model's vocabulary")
        banned = ()
        if conversation.tools and choice.mode == "none" and self.tags.tool_open is not None:
            banned = (self.tags.tool_open,)
        return Admission(
            id=request.id,
            ids=ids,
            images=images,
            prompt=state,
            sampling=self._resolve(sampling),
            stop_sequences=tuple(sampling.stop_sequences),
            seed=sampling.seed,
            logprobs=sampling.logprobs,
            max_new_tokens=min(sampling.max_tokens, room),
            context_limited=sampling.max_tokens > room,
            priority=request.priority,
            parser=parser,
            thinking_budget=request.thinking_budget,
            one_tool_call=not choice.parallel,
            grammar=grammar,
            banned=banned,
            bias=sampling.logit_bias,
            queue_checked=request.queue_checked,
        )

    def _parser(self, request: GenerationRequest, ids: list[int]) -> OutputParser | None:
        tools = bool(request.conversation.tools) and request.tool_choice.mode != "none"
        # Thinking templates open <think> in the generation prompt: the output starts inside it.
        # Some open it whatever they are told (Qwen3-VL-Thinking has no enable_thinking): the
        # model thinks unasked, and its thinking must still come back as thinking, not as text
        # ending in the </think> markup.
        opened = self.renderer.thinks and self._tokenizer.decode(ids[-3:]).rstrip().endswith(THINK_OPEN)
        thinking = opened or (self.renderer.thinks and request.conversation.thinking is not False)
        if not (tools or thinking):
            return None
        schemas = {tool.name: tool.input_schema for tool in request.conversation.tools} if tools else None
        return OutputParser(tools=tools, thinking=thinking, in_thinking=opened, schemas=schemas)

    def _top_k(self, top_k: int) -> int:
        """A top_k that keeps every token the model can write is no cut: 0, as the sampler then
        draws it (and no value a client sends, 2**63 say, overflows the batch's int64 tensor)."""
        return 0 if top_k >= len(self._tokenizer) else top_k

    def _resolve(self, sampling: SamplingParams) -> ResolvedSampling:
        defaults = self.facts.sampling_defaults
        return ResolvedSampling(
            temperature=defaults.temperature if sampling.temperature is None else sampling.temperature,
            top_p=defaults.top_p if sampling.top_p is None else sampling.top_p,
            top_k=self._top_k(defaults.top_k if sampling.top_k is None else sampling.top_k),
            repetition_penalty=(
                defaults.repetition_penalty if sampling.repetition_penalty is None else sampling.repetition_penalty
            ),
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
