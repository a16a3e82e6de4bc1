"""The web chat page at /, driven in headless Chromium (Playwright's Python package, the system's
Chromium; never `playwright install`).

The page talks to a real server on the tiny SFT run with an API key. At temperature 0 each answer
the page streams must equal the API's answer to the same conversation. MINIMIND_SCREENSHOT=1
saves the screenshot to docs/web-chat.png (the README's picture), otherwise to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import openai
import pytest

from minimind.serve import add_arguments, background, build

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
KEY = "sk-web-test"

# Records every text node appended to an answer: the pieces the page rendered, in order.
OBSERVE = """() => {
  window.__pieces = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target.classList || !r.target.classList.contains("content")) continue;
      for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.__pieces.push(n.data);
    }
  }).observe(document.getElementById("messages"), { childList: true, subtree: true });
}"""


@pytest.fixture(scope="module")
def sync_playwright():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    return sync_playwright


@pytest.fixture(scope="module")
def server(pipeline):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with background(build(p.parse_args([str(pipeline["sft"]), "--api-key", KEY]))) as url:
        yield url


def test_chat_page(server, sync_playwright, tmp_path):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

    def api(messages: list[dict], **extra) -> tuple[str, str]:
        """(content, reasoning) for what the page sends: temperature 0, top_p 0.85, max_tokens 512."""
        m = (
            client.chat.completions.create(
                model="sft", messages=messages, temperature=0, top_p=0.85, max_tokens=512, extra_body=extra
            )
            .choices[0]
            .message
        )
        return m.content or "", m.reasoning_content or ""

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), args=ARGS
        )
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        assert page.text_content("#model") == "sft"
        assert page.is_visible("#api-key")  # the server wants a key: the field shows
        page.evaluate("() => { const t = document.getElementById('temperature'); t.value = '0'; }")
        page.dispatch_event("#temperature", "input")
        assert page.text_content("#temperature-value") == "0"

        def ask(text: str) -> None:
            """Send a message and wait until its answer is complete."""
            done = page.locator(".msg.assistant.done").count()
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant.done').length > {done}")
            assert page.is_enabled("#send") and page.is_disabled("#stop")

        def last(selector: str) -> str:
            return page.locator(f".msg.assistant >> nth=-1 >> {selector}").text_content()

        # Without the key: a readable error, and the question is not kept in the history.
        ask("Where does Max live?")
        assert "API key" in last(".content")
        page.click("#reset")
        assert page.locator(".msg").count() == 0

        page.fill("#api-key", KEY)
        page.evaluate(OBSERVE)
        q1 = "Where does Max live?"
        ask(q1)
        a1, _ = api([{"role": "user", "content": q1}])
        assert last(".content") == a1 and a1
        pieces = page.evaluate("window.__pieces")
        assert len(pieces) >= 3 and "".join(pieces) == a1  # it grew piece by piece as the stream came in
        assert "tokens/s" in last(".meta") and last(".meta").startswith("stop")
        assert page.evaluate("localStorage.getItem('minimind.apiKey')") == KEY

        # A second turn carries the history.
        q2 = "What pet does Sam have?"
        ask(q2)
        history = [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": q2},
        ]
        a2, _ = api(history)
        assert last(".content") == a2 and a2

        # Thinking on: the reasoning goes to the collapsible panel.
        page.select_option("#thinking", "on")
        q3 = "What colour does Max like?"
        ask(q3)
        history += [{"role": "assistant", "content": a2}, {"role": "user", "content": q3}]
        a3, r3 = api(history, enable_thinking=True)
        assert r3 and last(".reasoning") == r3 and last(".content") == a3
        think = page.locator(".msg.assistant >> nth=-1 >> details.think")
        assert think.is_visible() and page.locator(".msg.assistant >> nth=-1 >> summary").text_content().startswith(
            "Thought"
        )
        summary = page.locator(".msg.assistant >> nth=-1 >> summary")
        if not think.evaluate("d => d.open"):
            summary.click()
        assert think.evaluate("d => d.open") and page.is_visible(".msg.assistant >> nth=-1 >> .reasoning")

        shot = Path("docs/web-chat.png") if os.environ.get("MINIMIND_SCREENSHOT") == "1" else tmp_path / "web-chat.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        summary.click()
        assert not think.evaluate("d => d.open") and not page.is_visible(".msg.assistant >> nth=-1 >> .reasoning")

        # Reset: an empty conversation, so the first question is answered as if new.
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        page.select_option("#thinking", "auto")
        ask(q1)
        assert last(".content") == a1 and page.locator(".msg").count() == 2

        # The key survives a reload; nothing was fetched from anywhere but this server.
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        assert page.input_value("#api-key") == KEY
        browser.close()
    assert errors == []
    assert requests and all(u.startswith(server) or u.startswith("data:") for u in requests), requests
