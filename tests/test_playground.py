"""The web playground in a real browser: Debian's Chromium driven by Playwright against a real server.

Playwright cannot download its own browser here, so the test uses /usr/bin/chromium; without it the test fails
(it does not skip), and `.ci/run` installs the package."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tessera.serve import ServeSettings
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
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("playground") / "ck")
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
