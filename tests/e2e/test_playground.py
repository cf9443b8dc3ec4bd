"""The playground in a real browser: Debian's headless Chromium driven by Playwright, against a real
``localvl serve``. Skipped (with the reason) where there is no Chromium or no Playwright; CI has
both (``.ci/chromium`` installs the browser and exports its path as LOCALVL_TEST_CHROMIUM)."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import image_bytes, pdf_bytes

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
ANSWER_TIMEOUT_MS = 120_000


def chromium_executable() -> str | None:
    """LOCALVL_TEST_CHROMIUM first (CI sets it), then ``chromium`` on PATH."""
    configured = os.environ.get("LOCALVL_TEST_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download is needed)")
    executable = chromium_executable()
    if executable is None:
        configured = os.environ.get("LOCALVL_TEST_CHROMIUM")
        where = f"LOCALVL_TEST_CHROMIUM={configured} is not a file" if configured else "no chromium on PATH"
        pytest.skip(f"no Chromium executable ({where}): apt-get install chromium, or bash .ci/chromium")
    with sync_playwright() as playwright:
        # The system browser: Playwright's own download is never needed, so this works offline.
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


class Page:
    """One tab on the playground, with the console errors it logged and the requests it sent."""

    def __init__(self, browser, server, **context_options) -> None:
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", self._record)
        self.page.goto(server.url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def _record(self, request) -> None:
        if request.url.endswith("/v1/messages") and request.method == "POST":
            self.requests.append({"headers": request.headers, "body": json.loads(request.post_data)})

    def enter_key(self, key: str = API_KEY) -> None:
        self.page.fill("#api-key", key)
        self.page.dispatch_event("#api-key", "change")
        self.page.wait_for_function("() => document.querySelector('#model').value === 'tiny-vl'")

    def set_options(self, max_tokens: int, temperature: float | None = None) -> None:
        self.page.click(".options summary")
        self.page.fill("#max-tokens", str(max_tokens))
        if temperature is not None:
            self.page.fill("#temperature", str(temperature))

    def ask(self, question: str) -> dict:
        """Send and wait for the answer; its text, stats and the states its element went through."""
        answers = self.page.locator(".msg.assistant")
        before = answers.count()
        self.page.fill("#prompt", question)
        # Record, at every change from the click on, the new answer's state (streaming → done) and
        # its text's length: installed before sending, so no early change is missed.
        self.page.evaluate("""(before) => {
            const log = document.querySelector('#log');
            window.seen = [];
            window.watcher?.disconnect();
            window.watcher = new MutationObserver(() => {
                const answer = log.querySelectorAll('.msg.assistant')[before];
                if (answer) window.seen.push([answer.dataset.state, answer.querySelector('.markdown').textContent.length]);
            });
            window.watcher.observe(log, {attributes: true, childList: true, subtree: true, characterData: true});
        }""", before)
        self.page.click("#send")
        answer = answers.nth(before)
        self.page.wait_for_function("(node) => node.dataset.state !== 'streaming'", arg=answer.element_handle(),
                                    timeout=ANSWER_TIMEOUT_MS)
        return {
            "state": answer.get_attribute("data-state"),
            "text": answer.locator(".markdown").inner_text(),
            "stats": answer.locator(".stats").inner_text(),
            "error": answer.locator(".error").inner_text(),
            "seen": self.page.evaluate("() => window.seen"),
        }

    def no_horizontal_overflow(self) -> bool:
        return self.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server):
    opened: list[Page] = []

    def open_tab(**context_options) -> Page:
        opened.append(Page(browser, server, **context_options))
        return opened[-1]

    yield open_tab
    for page in opened:
        page.close()


def unexpected(errors: list[str]) -> list[str]:
    # A 401 is logged by the browser itself when the page asks for models before a key is entered.
    return [error for error in errors if "401" not in error]


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Into the test's tmp dir; also into tests/artifacts when git ignores that folder (CI picks
    it up there), never into a tracked folder."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(ARTIFACTS / name)], cwd=ROOT,
                             capture_output=True).returncode == 0
    if ignored:
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / name)
    return shot


def test_ask_about_an_image_over_two_turns(tab, server, tmp_path):
    page = tab(viewport={"width": 1280, "height": 900}, locale="en-US")
    p = page.page
    # No key yet: the server says 401 and the page says what to do.
    p.wait_for_selector("#notice:not([hidden])")
    assert "enter it in the API key field" in p.inner_text("#notice")
    page.enter_key()
    assert p.is_hidden("#notice")
    assert p.eval_on_selector_all("#model option", "(options) => options.map((o) => o.value)")[0] == "tiny-vl"

    # Enough tokens to span several frames (the text shows up piece by piece); greedy, so the random
    # model gives the same answer every run.
    page.set_options(64, temperature=0)
    picture = image_bytes()
    p.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": picture}])
    p.wait_for_selector("#attachments li img")
    first = page.ask("What colour is this picture?")
    assert first["state"] == "done", first
    final = len(p.locator(".msg.assistant .markdown").first.text_content())
    assert final > 0 and any(state == "streaming" and 0 < length < final for state, length in first["seen"]), first
    assert re.search(r"TTFT \d+ ms", first["stats"]) and re.search(r"\d+ output tokens", first["stats"])
    assert re.search(r"[\d.]+ tok/s", first["stats"]), first["stats"]
    assert p.locator(".msg.user .files img").count() == 1 and p.is_hidden("#attachments li")

    second = page.ask("And the second turn?")
    assert second["state"] == "done" and second["text"].strip() and "TTFT" in second["stats"]

    # What went over the wire: the API's own headers and body, with the history and the image.
    sent = page.requests
    assert len(sent) == 2
    assert sent[0]["headers"]["x-api-key"] == API_KEY and sent[0]["headers"]["anthropic-version"] == "2023-06-01"
    assert sent[0]["body"]["stream"] is True and sent[0]["body"]["max_tokens"] == 64
    assert sent[0]["body"]["temperature"] == 0
    messages = sent[1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    image = messages[0]["content"][0]
    assert image["type"] == "image" and image["source"]["media_type"] == "image/png"
    assert base64.b64decode(image["source"]["data"]) == picture
    assert messages[0]["content"][1] == {"type": "text", "text": "What colour is this picture?"}
    assert messages[2]["content"] == "And the second turn?"

    # The code panel: runnable Python for this request, the image read from its file.
    python = p.inner_text("#snippet")
    ast.parse(python)
    assert f'base_url="{server.url}"' in python and 'model="tiny-vl"' in python and 'b64("red.png")' in python
    assert image["source"]["data"][:40] not in python and len(python) < 4000
    p.click("#tab-curl")
    curl = p.inner_text("#snippet")
    assert f"curl -N {server.url}/v1/messages" in curl and "anthropic-version: 2023-06-01" in curl
    assert "<base64 of red.png>" in curl and image["source"]["data"][:40] not in curl
    assert '"stream": true' in curl

    # Typing the next question updates the snippet to the request it would send.
    p.fill("#prompt", "A third question")
    assert "A third question" in p.inner_text("#snippet")

    save_screenshot(p, tmp_path, "playground.png")

    p.click("#new-chat")
    assert p.locator(".msg").count() == 0
    assert unexpected(page.errors) == []


def test_a_phone_screen_has_no_horizontal_scroll(tab, tmp_path):
    page = tab(viewport={"width": 375, "height": 740}, locale="en-US", is_mobile=True, has_touch=True)
    p = page.page
    page.enter_key()
    assert page.no_horizontal_overflow()
    page.set_options(8, temperature=0)
    # A PDF dropped on the page, as a browser's drag and drop delivers it.
    p.evaluate("""(bytes) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "report-with-a-rather-long-file-name.pdf",
                                    {type: "application/pdf"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", list(pdf_bytes(["Invoice 42"])))
    p.wait_for_selector("#attachments .badge")
    answer = page.ask("Summarise this document " + "w" * 200)
    assert answer["state"] == "done", answer
    assert page.requests[0]["body"]["messages"][0]["content"][0]["type"] == "document"
    assert page.no_horizontal_overflow()
    p.click("#tab-curl")
    assert page.no_horizontal_overflow()
    save_screenshot(p, tmp_path, "playground-phone.png")
    assert unexpected(page.errors) == []


def test_chinese_follows_the_browser_and_the_toggle_switches(tab):
    page = tab(locale="zh-CN", viewport={"width": 375, "height": 740})
    p = page.page
    assert p.inner_text("#send") == "发送" and p.inner_text("#new-chat") == "新对话"
    assert page.no_horizontal_overflow()
    assert p.get_attribute("html", "lang") == "zh-CN"
    p.wait_for_selector("#notice:not([hidden])")  # once /v1/models answered 401
    assert "API 密钥" in p.inner_text("#notice")  # the missing-key message, in Chinese
    assert "提问" in p.get_attribute("#prompt", "placeholder")
    p.click("#language")
    assert p.inner_text("#send") == "Send" and p.get_attribute("html", "lang") == "en"
    assert "API key" in p.inner_text("#notice")
    p.reload()
    p.wait_for_selector("body[data-ready=true]")
    assert p.inner_text("#send") == "Send"  # the manual choice is remembered

    english = tab(locale="en-US")
    assert english.page.inner_text("#send") == "Send"
    # One dictionary, both languages complete, and every string the markup names is in it.
    en, zh, used = english.page.evaluate("""async () => {
        const { STRINGS } = await import("/playground/i18n.js");
        const used = [...document.querySelectorAll("*")].flatMap((node) => Object.entries(node.dataset)
            .filter(([name]) => name.startsWith("i18n")).map(([, key]) => key));
        return [Object.keys(STRINGS.en).sort(), Object.keys(STRINGS.zh).sort(), used];
    }""")
    assert en == zh and set(used) <= set(en)


HOSTILE = """# Title <script>window.pwned = 1</script>
<img src=x onerror="window.pwned = 1"> **bold** and `code <b>`
[safe](https://example.com/a?b=1&c=2) [bad](javascript:window.pwned=1) [data](data:text/html,x)
[quote](https://x.test/" onclick="window.pwned=1)

```html
<iframe src="javascript:window.pwned=1"></iframe>
```

- item *one*
- item two

| a | b |
|---|---|
| <svg onload=window.pwned=1> | 2 |
"""


def test_model_markdown_is_escaped_before_it_is_rendered(tab):
    page = tab(locale="en-US")
    p = page.page
    summary = p.evaluate("""async (source) => {
        const { renderMarkdown } = await import("/playground/markdown.js");
        const box = document.createElement("div");
        box.innerHTML = renderMarkdown(source);
        document.body.append(box);
        const tags = new Set([...box.querySelectorAll("*")].map((node) => node.tagName.toLowerCase()));
        const handlers = [...box.querySelectorAll("*")].flatMap((node) =>
            [...node.attributes].map((a) => a.name).filter((name) => name.startsWith("on")));
        const links = [...box.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.rel, a.textContent]);
        box.remove();
        return {tags: [...tags].sort(), handlers, links, text: box.textContent, pwned: window.pwned ?? null};
    }""", HOSTILE)
    assert set(summary["tags"]) <= {"h1", "p", "strong", "em", "code", "pre", "a", "ul", "li", "br", "div", "table",
                                    "thead", "tbody", "tr", "th", "td"}
    assert {"h1", "strong", "em", "pre", "ul", "table", "a"} <= set(summary["tags"])
    assert summary["handlers"] == [] and summary["pwned"] is None
    assert all(href.startswith("https://") and "noopener" in rel for href, rel, _ in summary["links"])
    assert ["https://example.com/a?b=1&c=2", "noopener noreferrer", "safe"] in summary["links"]
    assert "<script>" in summary["text"] and "<img src=x" in summary["text"]  # shown as text
    assert "javascript:" in summary["text"]  # an unsafe link stays visible text, never an href


def test_stop_ends_an_answer_and_keeps_what_came(tab):
    page = tab(locale="en-US")
    p = page.page
    page.enter_key()
    page.set_options(4000)
    # A random model may end early on its own; a few tries make sure one answer is really stopped.
    for _ in range(5):
        p.click("#new-chat")
        p.fill("#prompt", "Write a long story")
        p.click("#send")
        p.wait_for_function("""() => {
            const answer = document.querySelector('.msg.assistant');
            return answer.querySelector('.markdown').textContent.length > 0 || answer.dataset.state !== 'streaming';
        }""")
        p.evaluate("() => document.querySelector('#stop').click()")  # hidden (a no-op) once the answer is done
        p.wait_for_selector(".msg.assistant:not([data-state=streaming])")
        if p.get_attribute(".msg.assistant", "data-state") == "stopped":
            break
    else:
        pytest.fail("every answer ended before it could be stopped")
    assert p.inner_text(".msg.assistant .stats").startswith("stopped") and p.is_visible("#send")
    assert p.inner_text(".msg.assistant .markdown").strip()
    page.requests.clear()
    p.fill("#prompt", "Go on")
    p.click("#send")
    p.wait_for_selector(".msg.assistant >> nth=1")
    assert [m["role"] for m in page.requests[0]["body"]["messages"]] == ["user", "assistant", "user"]
    p.click("#new-chat")  # stops the second answer too, if it still runs
    assert p.locator(".msg").count() == 0 and p.is_visible("#send")


def test_sse_frames_split_anywhere_are_parsed(tab):
    """Chunks end wherever the network cuts them: inside a frame, a line, a \\r\\n or a character."""
    page = tab(locale="en-US")
    events = page.page.evaluate("""async () => {
        const { sseEvents } = await import("/playground/api.js");
        const text = 'event: message_start\\r\\ndata: {"type":"message_start"}\\r\\n\\r\\n'
            + ': a comment\\n\\nevent: content_block_delta\\ndata: {"delta":{"type":"thinking_delta","thinking":"因为"}}\\n\\n'
            + 'event: content_block_delta\\ndata: {"delta":{"type":"text_delta","text":"好 é"}}\\n\\n'
            + 'event: message_stop\\ndata: {"type":"message_stop"}';
        const bytes = new TextEncoder().encode(text);
        const results = [];
        for (const size of [1, 2, 3, 7, bytes.length]) {
            const stream = new ReadableStream({ start(controller) {
                for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
                controller.close();
            }});
            const seen = [];
            for await (const frame of sseEvents(stream)) seen.push([frame.event, frame.data]);
            results.push(JSON.stringify(seen));
        }
        return results;
    }""")
    assert len(set(events)) == 1
    assert json.loads(events[0]) == [
        ["message_start", {"type": "message_start"}],
        ["content_block_delta", {"delta": {"type": "thinking_delta", "thinking": "因为"}}],
        ["content_block_delta", {"delta": {"type": "text_delta", "text": "好 é"}}],
        ["message_stop", {"type": "message_stop"}],
    ]


def test_paste_attaches_an_image_and_other_files_are_refused(tab):
    page = tab(locale="en-US")
    p = page.page
    paste = """([bytes, name, type]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, {type}));
        document.querySelector("#prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true}));
    }"""
    p.evaluate(paste, [list(image_bytes("JPEG")), "image.jpg", "image/jpeg"])
    p.wait_for_selector("#attachments li img")
    assert 'b64("image.jpg")' in p.inner_text("#snippet")
    p.evaluate(paste, [list(b"just text"), "notes.txt", "text/plain"])
    p.wait_for_selector("#notice:has-text('Only images')")
    assert p.locator("#attachments li").count() == 1
    p.click("#attachments .remove")
    assert p.locator("#attachments li").count() == 0 and "b64(" not in p.inner_text("#snippet")
