"""The web chat page in a real headless Chromium: type a message, see the streamed reply,
stop a long one."""

from __future__ import annotations

import shutil

import pytest
from server_fixtures import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def cap_reply_tokens(page, tokens: int = 200) -> None:
    """The page asks for no max_tokens, so a random demo reply may run to the context (minutes
    on a loaded 2-core machine): cap requests that don't set one."""
    page.evaluate(
        """n => { const f = window.fetch; window.fetch = (u, o) => {
            if (o && o.body) { const b = JSON.parse(o.body);
                               if (b.max_tokens === undefined) b.max_tokens = n;
                               o = { ...o, body: JSON.stringify(b) }; }
            return f(u, o); }; }""",
        tokens,
    )


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:  # the system's Chromium, else the one `playwright install chromium` fetched
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        except Exception as err:  # playwright raises its own Error for a missing browser
            pytest.fail(
                f"Chromium is needed for the web page test ({str(err).splitlines()[0]}): "
                "apt-get install chromium, or .venv/bin/python -m playwright install chromium"
            )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with running_server(cache, "--served-model-name", "webdemo") as url:
        page = browser.new_page()
        page.goto(url)
        cap_reply_tokens(page)
        yield page
        page.close()


def test_page_shows_the_model_and_streams_a_reply(page):
    page.wait_for_function(
        "document.getElementById('model').textContent.includes('webdemo')", timeout=60_000
    )
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user >> text=Hello there")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    reply = page.inner_text(".msg.assistant .content")
    assert reply.strip()
    assert "tok/s" in page.inner_text(".msg.assistant .stats")
    assert "tok/s" in page.inner_text("#speed")


def test_stop_button_ends_a_long_reply(page):
    page.click("#clear")
    page.evaluate(
        """() => { const f = window.fetch; window.fetch = (u, o) => {
            if (o && o.body) { const b = JSON.parse(o.body); b.max_tokens = 3000;
                               o = { ...o, body: JSON.stringify(b) }; }
            return f(u, o); }; }"""
    )
    page.fill("#input", "Write a lot")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg.assistant .content').textContent.length > 0",
        timeout=60_000,
    )
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
    assert page.inner_text(".msg.assistant .stats") == "stopped"
    assert page.is_enabled("#send")


def test_markdown_is_rendered_and_html_escaped(page):
    text = "# Title\n**bold** and `code`\n- a\n- b\n```py\nx = 1 < 2\n```\n<b>raw</b>"
    html = page.evaluate("text => renderMarkdown(text)", text)
    assert "<h3>Title</h3>" in html and "<strong>bold</strong>" in html
    assert "<code>code</code>" in html and "<li>a</li>" in html
    assert '<pre><code data-lang="py">x = 1 &lt; 2\n</code></pre>' in html
    assert "&lt;b&gt;raw&lt;/b&gt;" in html


def test_reasoning_is_shown_folded(browser, tmp_path_factory):
    template = tmp_path_factory.mktemp("t") / "think.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    args = ("--chat-template", str(template))
    with running_server(tmp_path_factory.mktemp("cache"), *args) as url:
        page = browser.new_page()
        page.goto(url)
        cap_reply_tokens(page)
        page.wait_for_function("document.getElementById('model').textContent.includes('demo')")
        page.fill("#input", "Think first")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        details = page.query_selector(".msg.assistant details.reasoning")
        assert details.is_visible()
        assert details.get_attribute("open") is None  # folded
        assert page.eval_on_selector(".msg.assistant .thought", "e => e.textContent.length") > 0
        page.close()
