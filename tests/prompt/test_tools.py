"""Tools for templates that cannot render them (Hermes style), and the folder's own where it can."""

import json

import pytest

from localvl.conversation import Conversation, Text, Tool, ToolCall, ToolResult, Turn
from localvl.prompt.render import Renderer
from localvl.prompt.tools import tool_call_text
from tests.prompt.test_render import picture

WEATHER = Tool("get_weather", "weather by city", {"type": "object", "properties": {"city": {"type": "string"}}})


def conversation(tools=(WEATHER,)) -> Conversation:
    return Conversation(
        [
            Turn("user", [Text("weather in Paris?")]),
            Turn("assistant", [Text("Let me check."), ToolCall("toolu_1", "get_weather", {"city": "Paris"})]),
            Turn("user", [ToolResult("toolu_1", (Text("radar:"), picture())), Text("and tomorrow?")]),
        ],
        tools=list(tools),
    )


@pytest.mark.parametrize("family, own", [("qwen2_vl", False), ("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_tools_reach_the_prompt_whether_or_not_the_template_knows_them(loaded_model, family, own):
    renderer = Renderer(loaded_model(family).processor)
    assert renderer.renders_tools is own
    text = renderer.prompt_text(conversation())
    assert "# Tools" in text and '"name": "get_weather"' in text and "<tools>" in text
    assert tool_call_text("get_weather", {"city": "Paris"}) in text  # the earlier call, as the model writes one
    response = text[text.index("<tool_response>") : text.index("</tool_response>")]
    assert "radar:" in response and "<|vision_start|><|image_pad|><|vision_end|>" in response  # the image stays inside
    assert text.index("</tool_response>") < text.index("and tomorrow?")
    rendered = renderer.render(conversation())
    assert rendered.pixel_values is not None and rendered.image_grid_thw.shape[0] == 1


def test_no_tools_no_tools_section(loaded_model):
    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    plain = Conversation([Turn("user", [Text("hi")])])
    assert "# Tools" not in renderer.prompt_text(plain)
    assert renderer.prompt_text(plain) == Renderer(loaded_model("qwen2_5_vl").processor).prompt_text(plain)


def test_hermes_system_section_joins_the_clients_system_prompt(loaded_model):
    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    conv = Conversation([Turn("system", [Text("Be brief.")]), Turn("user", [Text("hi")])], tools=[WEATHER])
    text = renderer.prompt_text(conv)
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    listed = system[system.index("<tools>\n") + len("<tools>\n") : system.index("\n</tools>\n")]
    assert json.loads(listed)["function"]["name"] == "get_weather"


def test_a_failed_tool_call_reads_as_an_error(loaded_model):
    renderer = Renderer(loaded_model("qwen3_vl").processor)
    turns = conversation().turns[:2] + [Turn("user", [ToolResult("toolu_1", (Text("city not found"),), is_error=True)])]
    text = renderer.prompt_text(Conversation(turns, tools=[WEATHER]))
    assert "<tool_response>\nError: city not found\n</tool_response>" in text
