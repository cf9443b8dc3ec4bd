"""Images by URL through both SDKs: fetched from a local HTTP server the test starts."""

from __future__ import annotations

import base64
import anthropic
import openai
import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import image_bytes, static_server

PNG = image_bytes("PNG", size=(120, 80))


@pytest.fixture(scope="module")
def images():
    with static_server({
        "/invoice.png": (200, {"Content-Type": "image/png"}, PNG),
        "/to-private": (302, {"Location": "http://192.168.0.10/invoice.png"}, b""),
    }) as url:
        yield url


def ask(source: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "Total?"}]}]


def test_an_image_url_reads_as_the_same_image_inline(client, images, server):
    by_url = ask({"type": "url", "url": images + "/invoice.png?X-Amz-Signature=secret-in-the-query"})
    inline = ask({"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()})
    message = client.messages.create(model="tiny-vl", max_tokens=4, messages=by_url)
    used = message.usage
    counted = client.messages.count_tokens(model="tiny-vl", messages=inline).input_tokens
    assert used.input_tokens + used.cache_read_input_tokens + used.cache_creation_input_tokens == counted
    assert client.messages.count_tokens(model="tiny-vl", messages=by_url).input_tokens == counted
    assert "secret-in-the-query" not in server.log()  # URLs (and presigned ones' credentials) are client content


def test_a_redirect_to_a_private_address_is_refused(client, images):
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.source\.url: refused: .*192\.168\.0\.10, a private address"):
        client.messages.create(model="tiny-vl", max_tokens=4, messages=ask({"type": "url", "url": images + "/to-private"}))


def test_without_the_allowlist_a_loopback_url_is_refused(thinking_server, images):
    strict = anthropic.Anthropic(base_url=thinking_server.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="a loopback address"):
        strict.messages.create(model="tiny-vl", max_tokens=4, messages=ask({"type": "url", "url": images + "/invoice.png"}))


def test_openai_image_url_parts_are_fetched(server, images):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    parts = [{"type": "image_url", "image_url": {"url": images + "/invoice.png", "detail": "high"}},
             {"type": "text", "text": "Total?"}]
    inline = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
              {"type": "text", "text": "Total?"}]
    by_url = oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": parts}])
    same = oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": inline}])
    assert by_url.usage.prompt_tokens == same.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images + "/nothing.png"}}]}])
