"""The chat page of `qora serve` (GET /) in a real headless browser: Debian's chromium and chromedriver
driven by selenium. Skipped where they are not installed (CI installs them: .ci/run)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from _helpers_server import running_server

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed")


@pytest.fixture(scope="module")
def page_server(demo_model):
    with running_server(demo_model, "--threads", "2", "--model-name", "demo") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def _ask(browser, text: str):
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _max_tokens(browser, n: int):
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # open the settings
    box = browser.find_element(By.ID, "max")
    box.clear()
    box.send_keys(str(n))


def _answers(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_the_page_is_served_with_its_files_and_policy(page_server):
    r = httpx.get(page_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        f = httpx.get(f"{page_server.url}/static/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind)
    assert httpx.get(page_server.url + "/static/..%2fapp.py").status_code == 404
    assert httpx.get(page_server.url + "/static/app.py").status_code == 404


def test_chat_streams_an_answer_shows_the_model_and_speed(page_server, browser):
    browser.get(page_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "model").text == "demo")
    _max_tokens(browser, 24)
    _ask(browser, "What is the capital of France?")
    wait.until(lambda b: _answers(b) and _answers(b)[-1].get_attribute("data-done") == "1")
    answer = _answers(browser)[-1].text
    assert answer.strip() and "error" not in _answers(browser)[-1].get_attribute("innerHTML")
    assert browser.find_element(By.ID, "speed").text.endswith("tok/s")
    # a second turn carries the first: the conversation goes on
    _ask(browser, "And of Italy?")
    wait.until(lambda b: len(_answers(b)) == 2 and _answers(b)[-1].get_attribute("data-done") == "1")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2


def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_stop_button_ends_the_answer(page_server, browser):
    browser.get(page_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "model").text == "demo")
    _max_tokens(browser, 2000)
    _ask(browser, "Write a very long story about a dragon.")
    wait.until(lambda b: len(_answers(b)[-1].text) > 20)  # streaming has begun
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_enabled()
    stop.click()
    wait.until(lambda b: _answers(b)[-1].get_attribute("data-done") == "1")
    stopped = _answers(browser)[-1].text
    assert 20 < len(stopped) < 6000 and browser.find_element(By.ID, "send").is_enabled()
    # the server stopped generating too: it notices the closed stream at its next step
    _wait_for(lambda: httpx.get(page_server.url + "/health").json()["requests"]["cancelled"] >= 1, 20)


def test_think_toggle_is_sent(page_server, browser):
    browser.get(page_server.url + "/")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "model").text == "demo")
    assert not browser.find_element(By.ID, "think").is_selected()
    browser.find_element(By.ID, "think").click()
    body = browser.execute_script(
        "const f = window.fetch; let sent = null;"
        "window.fetch = (u, o) => { if (o && o.body) sent = o.body; return f(u, o); };"
        "document.getElementById('max').value = '2';"
        "document.getElementById('input').value = 'hi';"
        "document.getElementById('form').requestSubmit();"
        "return new Promise(r => setTimeout(() => r(sent), 500));"
    )
    assert '"enable_thinking":true' in body
