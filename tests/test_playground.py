"""The web playground in a real browser: Debian's Chromium driven by Playwright against a real server. Streams that
stall, break off or run long are answered by the test through Playwright's request routing.

Playwright cannot download its own browser here, so the test uses /usr/bin/chromium; without it the test fails
(it does not skip), and `.ci/run` installs the package."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest

from tessera.serve import ServeSettings
from tessera.serve.app import load_checkpoint
from tests.test_serve import API_KEY, data_url, image_part, make_checkpoint, png_bytes, running_server, text, user

CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium keeps dialling Google's hosts, which this network refuses
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: the playground test needs Debian's chromium package "
                    f"(apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("playground") / "ck")


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny", api_key=API_KEY)) as s:
        yield s


def expected_answer(server, png: bytes, question: str) -> str:
    """What the API answers for the request the page builds (image first, then the question; greedy, 64 tokens)."""
    messages = user(image_part(data_url(png)), text(question))
    result = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=64, temperature=0)
    return result.choices[0].message.content


def ask_and_wait(page, question: str) -> str:
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    return page.text_content("#answer")


def test_upload_or_drop_an_image_ask_and_watch_the_answer(browser, server, tmp_path):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    # the server wants a key: the page asks for it, then shows the loaded model
    page.wait_for_selector("#keyrow", state="visible")
    page.fill("#apikey", API_KEY)
    page.click("#savekey")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")

    first = png_bytes(11, size=(32, 32))
    (tmp_path / "shape.png").write_bytes(first)
    page.set_input_files("#file", str(tmp_path / "shape.png"))
    page.wait_for_selector("#preview", state="visible")
    answer = ask_and_wait(page, "What colour is the square?")
    assert answer.strip(), "the page showed no answer"
    assert answer == expected_answer(server, first, "What colour is the square?")
    assert "finish_reason" in page.text_content("#status") and page.text_content("#error") == ""

    # drag and drop another image onto the drop zone
    second = png_bytes(12, size=(20, 28))
    dropped = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return transfer;
        }""", base64.b64encode(second).decode())
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_function("document.getElementById('droptext').textContent === 'dropped.png'")
    answer = ask_and_wait(page, "Describe the image.")
    assert answer.strip() and answer == expected_answer(server, second, "Describe the image.")
    assert errors == []
    page.close()


# --- answers the test controls: streams that stall, break off or run long -------------------------------------------
def events(*chunks, done: bool = True) -> str:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return body + ("data: [DONE]\n\n" if done else "")


def chunk(content: str, finish_reason: str | None = None) -> dict:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}]}


def fulfil_stream(route, body: str) -> None:
    route.fulfill(status=200, content_type="text/event-stream", body=body)


def open_page(browser, server, model_id: str = "mock"):
    """The page from the real server, with /v1/models answered by the test (no key needed); chat requests are left
    for each test to route."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": [{"id": model_id}]}))
    page.goto(server.url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(model_id)}")
    return page, errors


def settled(page) -> str:
    page.wait_for_function("!document.getElementById('status').textContent.startsWith('generating')")
    return page.text_content("#status")


def test_long_unbroken_text_wraps_instead_of_widening_the_page(browser, server):
    page, errors = open_page(browser, server, model_id="runs/" + "x" * 300 + "/checkpoint")

    def answer(route):
        if json.loads(route.request.post_data)["messages"][0]["content"][0]["text"] == "error":
            route.fulfill(status=400, json={"error": {"message": "E" * 3000, "type": "invalid_request_error",
                                                      "param": None, "code": 400}})
        else:
            fulfil_stream(route, events(chunk("A" * 3000, "length")))

    page.route("**/v1/chat/completions", answer)
    fits = "(id) => document.getElementById(id).getBoundingClientRect().right <= window.innerWidth"
    assert page.evaluate(fits, "model")
    for question, element in ("error", "error"), ("long", "answer"):
        page.fill("#question", question)
        page.click("#ask")
        settled(page)
        assert len(page.text_content("#" + element)) == 3000
        assert page.evaluate(fits, element), f"#{element} is wider than the window"
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert errors == []
    page.close()


def test_a_stream_that_breaks_off_is_reported_not_called_done(browser, server):
    page, errors = open_page(browser, server)
    page.route("**/v1/chat/completions", lambda route: fulfil_stream(route, events(chunk("cut off"), done=False)))
    page.fill("#question", "hi")
    page.click("#ask")
    assert settled(page) == "failed"
    assert "ended unexpectedly" in page.text_content("#error") and page.text_content("#answer") == "cut off"
    # a finish_reason is a whole answer even if the connection then drops before [DONE]
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions",
               lambda route: fulfil_stream(route, events(chunk("whole"), chunk("", "stop"), done=False)))
    page.click("#ask")
    assert settled(page) == "done · finish_reason stop" and page.text_content("#error") == ""
    assert errors == []
    page.close()


def wait_for(page, condition, what: str, timeout: float = 10.0) -> None:
    """Lets Playwright deliver events (route handlers run only then) until condition() holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(20)


def test_one_request_at_a_time_and_stop_stops_the_current_one(browser, server):
    page, errors = open_page(browser, server)
    held = []  # chat requests, unanswered until the test answers them
    page.route("**/v1/chat/completions", lambda route: held.append(route))
    page.fill("#question", "first")
    page.click("#ask")
    wait_for(page, lambda: len(held) == 1, "the first request")
    page.fill("#question", "second")
    page.press("#question", "Control+Enter")  # while the first is still running
    page.wait_for_timeout(300)
    assert len(held) == 1, "Ctrl+Enter started a second request beside the running one"
    fulfil_stream(held[0], events(chunk("first answer"), chunk("", "stop")))
    assert settled(page).startswith("done") and page.text_content("#answer") == "first answer"

    # Stop and ask again in one go, before the stopped request has unwound: the new one must stay stoppable
    page.click("#ask")
    wait_for(page, lambda: len(held) == 2, "the second request")
    page.evaluate("() => { document.getElementById('stop').click(); document.getElementById('ask').click(); }")
    wait_for(page, lambda: len(held) == 3, "the third request")
    page.wait_for_timeout(200)  # the stopped request unwinds
    assert page.text_content("#status") == "generating…"
    assert page.is_enabled("#stop") and page.is_disabled("#ask")
    page.click("#stop")
    assert page.text_content("#status") == "stopped" and page.is_disabled("#stop") and page.is_enabled("#ask")
    assert errors == []
    page.close()


# --- a model that loads slowly or not at all -----------------------------------------------------------------------
# records the delays the page waits before polling again, and waits 10 ms instead, so backing off takes no real time
FAST_TIMERS = """
window.delays = [];
const realSetTimeout = window.setTimeout;
window.setTimeout = (f, delay, ...args) => { window.delays.push(delay); return realSetTimeout(f, 10, ...args); };
"""


def test_while_the_model_loads_the_page_shows_why_and_polls_less_and_less_often(browser, checkpoint):
    gate = threading.Event()

    def slow_loader():
        gate.wait(60)
        return load_checkpoint(checkpoint)

    settings = ServeSettings(checkpoint=str(checkpoint), served_model_name="tiny")
    with running_server(settings, slow_loader, wait=False) as s:
        page = browser.new_page()
        page.add_init_script(FAST_TIMERS)
        page.goto(s.url + "/")
        page.wait_for_function("window.delays.length >= 6", timeout=10_000)
        assert page.evaluate("window.delays.slice(0, 6)") == [1000, 2000, 4000, 5000, 5000, 5000]
        assert page.text_content("#model") == "loading…"
        assert "the model is still loading" in page.text_content("#status")
        gate.set()
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=30_000)
        assert page.text_content("#status") == "" and page.text_content("#error") == ""
        page.close()


def test_a_model_that_failed_to_load_is_shown_as_failed_with_the_reason_and_no_more_polling(browser, checkpoint):
    def broken_loader():
        raise OSError("disk on fire")

    with running_server(ServeSettings(checkpoint=str(checkpoint)), broken_loader, wait=False) as s:
        page = browser.new_page()
        page.add_init_script(FAST_TIMERS)
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'failed'", timeout=10_000)
        assert "loading the model failed: OSError: disk on fire" in page.text_content("#error")
        polls = page.evaluate("window.delays.length")
        page.wait_for_timeout(300)  # 30 polls' worth of the page's (shortened) timers
        assert page.evaluate("window.delays.length") == polls
        page.close()
