import copy

import pytest

from localvl.conversation import Conversation, Image, Text, Thinking, Tool, ToolCall, ToolResult, Turn
from localvl.errors import InvalidRequestError
from localvl.media.images import load_image
from localvl.prompt.render import Renderer, template_messages, template_tools
from tests.helpers import image_bytes


def picture(size=(90, 60)) -> Image:
    return load_image(image_bytes("PNG", size=size), "image/png", "test")


def test_messages_keep_order_roles_and_tool_turns():
    conv = Conversation(
        [
            Turn("system", [Text("be brief")]),
            Turn("user", [Text("weather in Paris?")]),
            Turn("assistant", [Thinking("need a tool"), Text("Let me check."), ToolCall("toolu_1", "get_weather", {"city": "Paris"})]),
            Turn("user", [ToolResult("toolu_1", (Text("sunny"), picture())), Text("and tomorrow?")]),
            Turn("system", [Text("reminder")]),
        ],
        tools=[Tool("get_weather", "weather by city", {"type": "object"})],
    )
    messages = template_messages(conv)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user", "system"]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[2]["reasoning_content"] == "need a tool" and messages[2]["content"] == "Let me check."
    assert messages[3]["content"] == [{"type": "text", "text": "sunny"}, {"type": "image"}]
    assert messages[4]["content"] == "and tomorrow?"
    assert template_tools(conv)[0]["function"]["parameters"] == {"type": "object"}


def test_prefill_is_continued_not_closed(loaded_model):
    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    conv = Conversation([Turn("user", [Text("Pick A or B")]), Turn("assistant", [Text("The answer is (")])])
    assert renderer.prompt_text(conv).endswith("<|im_start|>assistant\nThe answer is (")


def test_prefill_with_trailing_whitespace_is_refused(loaded_model):
    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    conv = Conversation([Turn("user", [Text("hi")]), Turn("assistant", [Text("Sure, ")])])
    with pytest.raises(InvalidRequestError, match="trailing whitespace"):
        renderer.render(conv)


def test_a_template_that_rejects_the_conversation_gives_a_400(loaded_model):
    processor = copy.deepcopy(loaded_model("qwen2_5_vl").processor)
    processor.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="chat template rejected the conversation: Conversation roles"):
        Renderer(processor).render(Conversation([Turn("user", [Text("hi")])]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # a JSON tool call's arguments; Qwen3-VL's own template
def test_a_tool_call_nested_too_deeply_to_render_is_a_400(loaded_model, family):
    value: dict = {}
    for _ in range(2000):
        value = {"a": value}
    conversation = Conversation([
        Turn("user", [Text("hi")]),
        Turn("assistant", [ToolCall("c1", "f", value)]),
        Turn("user", [ToolResult("c1", (Text("r"),))]),
    ], tools=[Tool("f", None, {"type": "object"})])
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        Renderer(loaded_model(family).processor).render(conversation)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_an_image_counts_its_merged_patches_plus_two_markers(loaded_model, family):
    loaded = loaded_model(family)
    renderer = Renderer(loaded.processor)
    without = renderer.count(Conversation([Turn("user", [Text("look")])]))
    prompt = renderer.render(Conversation([Turn("user", [picture(), Text("look")])]))
    merged = int(prompt.image_grid_thw.prod()) // 4
    assert prompt.input_ids.numel() == without + merged + 2
    assert int((prompt.input_ids == loaded.model.config.image_token_id).sum()) == merged


def test_the_folders_template_is_used_not_ours(loaded_model):
    processor = copy.deepcopy(loaded_model("qwen2_vl").processor)
    processor.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    text = Renderer(processor).prompt_text(Conversation([Turn("user", [Text("hi")])]))
    assert text == "[user]hi"


def test_an_image_the_processor_refuses_is_a_400(loaded_model):
    from PIL import Image as PILImage

    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    # not through load_image, which widens such a sliver: Qwen's resize refuses ratios over 200:1
    sliver = Image(pixels=PILImage.new("RGB", (3000, 10)), media_type="image/png", sha256="sliver")
    with pytest.raises(InvalidRequestError, match="processor rejected an image"):
        renderer.render(Conversation([Turn("user", [sliver, Text("what is this?")])]))


@pytest.mark.parametrize("size", [(3000, 10), (10, 3000), (8000, 1), (199, 1)])
def test_an_elongated_image_is_widened_on_white_until_the_model_takes_it(loaded_model, size):
    # Anthropic's API takes images more elongated than Qwen's processors do (200:1)
    renderer = Renderer(loaded_model("qwen2_5_vl").processor)
    sliver = picture(size=size)
    width, height = sliver.size
    assert max(width, height) <= 199 * min(width, height) and max(width, height) == max(size)
    assert renderer.render(Conversation([Turn("user", [sliver, Text("what is this?")])])).image_grid_thw is not None


def test_an_image_sent_before_a_tool_result_stays_outside_the_tool_response(loaded_model):
    """The templates put a turn's tool results first; each image keeps the block it came in."""
    loaded = loaded_model("qwen2_5_vl")
    renderer = Renderer(loaded.processor)
    small, large = picture(size=(56, 56)), picture(size=(280, 280))
    conv = Conversation([
        Turn("user", [Text("take a photo")]),
        Turn("assistant", [ToolCall("toolu_1", "snap", {})]),
        Turn("user", [small, ToolResult("toolu_1", (large,)), Text("compare")]),
    ], tools=[Tool("snap", "take a photo", {"type": "object"})])
    prompt = renderer.render(conv)
    text = loaded.processor.tokenizer.decode(prompt.input_ids)
    pad = "<|image_pad|>"
    response = text[text.index("<tool_response>") : text.index("</tool_response>")]
    after = text[text.index("</tool_response>") :]
    grids = [int(g.prod()) // 4 for g in prompt.image_grid_thw]
    assert [response.count(pad), after.count(pad)] == grids  # the tool's image first, then the user's
    assert grids[0] > grids[1]
