"""The front end: what it makes of a request before the engine thread sees it."""

import asyncio
import shutil

import pytest

from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.frontend import Frontend, ModelFacts
from localvl.engine.sampling import ResolvedSampling
from localvl.models.processor import load_processor

# Qwen3-VL-Thinking's generation prompt: <think> opened whatever the request asked (no enable_thinking)
ALWAYS_THINKS = "{%- if add_generation_prompt -%}\n{{- '<|im_start|>assistant\\n<think>\\n' -}}\n{%- endif -%}\n"


def frontend_of(folder) -> Frontend:
    return Frontend(load_processor(str(folder)), ModelFacts(0, 2, ResolvedSampling(), 4096))


def prepared(frontend: Frontend, thinking: bool | None):
    conversation = Conversation([Turn("user", [Text("hi")])], thinking=thinking)
    return asyncio.run(frontend.prepare(GenerationRequest("r", conversation, SamplingParams(max_tokens=8))))


@pytest.mark.parametrize("thinking", [None, False, True])
def test_a_template_that_always_opens_thinking_is_read_as_thinking_whatever_was_asked(model_dir, tmp_path, thinking):
    folder = tmp_path / "thinking-model"
    shutil.copytree(model_dir("qwen3_vl"), folder)
    template = (folder / "chat_template.jinja").read_text()
    start = template.index("{%- if add_generation_prompt -%}")
    (folder / "chat_template.jinja").write_text(template[:start] + ALWAYS_THINKS)
    admission = prepared(frontend_of(folder), thinking)
    # the model writes its thinking, then </think>: that is thinking, never the answer's text
    assert admission.parser is not None and admission.parser.in_thinking


def test_thinking_told_off_by_the_template_starts_in_the_answer(model_dir):
    frontend = frontend_of(model_dir("qwen3_vl"))
    assert prepared(frontend, False).parser is None  # the template closed an empty <think> block itself
    assert prepared(frontend, True).parser.in_thinking


def test_a_forced_call_not_asked_to_think_closes_an_always_opened_think_at_once(model_dir, tmp_path):
    from localvl.conversation import Tool, ToolChoice

    folder = tmp_path / "thinking-model"
    shutil.copytree(model_dir("qwen3_vl"), folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template[: template.index("{%- if add_generation_prompt -%}")] + ALWAYS_THINKS)
    frontend = frontend_of(folder)
    tool = Tool("get_weather", "w", {"type": "object", "properties": {"city": {"type": "string"}}})

    def grammar(thinking: bool | None) -> str:
        conversation = Conversation([Turn("user", [Text("hi")])], tools=[tool], thinking=thinking)
        request = GenerationRequest("r", conversation, SamplingParams(max_tokens=8), tool_choice=ToolChoice("any"))
        return asyncio.run(frontend.prepare(request)).grammar

    # Anthropic's API allows no thinking beside a forced call: only blank lines before </think>
    assert "THOUGHT: /\\n*/" in grammar(None) and "THOUGHT: /\\n*/" in grammar(False)
    assert "THOUGHT: /(.|\\n)*/" in grammar(True)  # OpenAI's reasoning_effort with tool_choice: required
