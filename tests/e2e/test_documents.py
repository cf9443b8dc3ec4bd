"""PDF documents through both SDKs: pages in the prompt, counted, cached, and refused when broken."""

from __future__ import annotations

import base64
import anthropic
import openai
import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import pdf_bytes, static_server

PDF = pdf_bytes(["Invoice 4711: total 99 EUR, due 2026-12-01", "Line items: 3 widgets"])


def document(source: dict, **extra) -> list[dict]:
    return [{"role": "user", "content": [{"type": "document", "source": source, **extra},
                                         {"type": "text", "text": "What is the total?"}]}]


BASE64 = {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(PDF).decode()}


@pytest.fixture(scope="module")
def files():
    with static_server({"/invoice.pdf": (200, {"Content-Type": "application/pdf"}, PDF),
                        "/page": (200, {"Content-Type": "text/html"}, b"<html/>")}) as url:
        yield url


def test_a_pdf_is_pages_in_the_prompt_and_a_repeat_hits_the_caches(client):
    one_page = client.messages.count_tokens(model="tiny-vl", messages=document(
        {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf_bytes(["x"])).decode()})).input_tokens
    counted = client.messages.count_tokens(model="tiny-vl", messages=document(BASE64, title="Invoice")).input_tokens
    assert counted > 2 * (one_page - 30)  # two rendered pages, each an image's worth of tokens
    first = client.messages.create(model="tiny-vl", max_tokens=4, messages=document(BASE64, title="Invoice"))
    again = client.messages.create(model="tiny-vl", max_tokens=4, messages=document(BASE64, title="Invoice"))
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens + first.usage.cache_creation_input_tokens
    assert total == counted
    assert again.usage.cache_read_input_tokens >= counted - 16  # the same pages: read from the prefix cache


def test_a_pdf_by_url_equals_the_same_pdf_inline(client, files):
    by_url = client.messages.count_tokens(model="tiny-vl", messages=document({"type": "url", "url": files + "/invoice.pdf"}))
    inline = client.messages.count_tokens(model="tiny-vl", messages=document(BASE64))
    assert by_url.input_tokens == inline.input_tokens
    with pytest.raises(anthropic.BadRequestError, match="text/html"):
        client.messages.count_tokens(model="tiny-vl", messages=document({"type": "url", "url": files + "/page"}))


def test_a_corrupt_pdf_is_a_clear_400(client):
    broken = {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(b"%PDF-1.4 broken").decode()}
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.source: the PDF could not be read"):
        client.messages.create(model="tiny-vl", max_tokens=4, messages=document(broken))


def test_openai_file_parts_carry_pdfs(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    data = "data:application/pdf;base64," + base64.b64encode(PDF).decode()
    completion = oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": data, "filename": "invoice.pdf"}},
        {"type": "text", "text": "What is the total?"}]}])
    same_in_anthropic = anthropic.Anthropic(base_url=server.url, api_key=API_KEY).messages.count_tokens(
        model="tiny-vl", messages=document(BASE64, title="invoice.pdf")).input_tokens
    assert completion.usage.prompt_tokens == same_in_anthropic  # the same pages, text layer and question
    with pytest.raises(openai.BadRequestError, match="file_id"):
        oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-abc"}}]}])
