"""The chat page at / in headless Chromium: type a message, watch the answer stream in, keep the history.

Needs Debian's chromium + chromium-driver and the selenium package; skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.serve.conftest import make_state, running_server

# Records every text the assistant's bubbles show, so the test sees the answer grow piece by piece.
OBSERVE = """
window.__seen = [];
new MutationObserver(() => {
  const b = document.querySelectorAll('.msg.assistant');
  if (b.length) window.__seen.push(b[b.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium); the web page test needs it")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_chat_page_streams_the_answer(loaded):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver()
    try:
        with running_server(make_state(loaded, n_slots=2)) as url:
            question = "Who made the light?"
            expected = httpx.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 12}).json()
            expected = expected["choices"][0]["message"]["content"]
            driver.get(url + "/?temperature=0&max_tokens=12")
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            driver.execute_script(OBSERVE)
            box, send = driver.find_element(By.ID, "input"), driver.find_element(By.ID, "send")
            box.send_keys(question)
            send.click()

            def replies(n):
                return lambda d: (len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")) == n
                                  and send.is_enabled())

            WebDriverWait(driver, 30).until(replies(1))
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("textContent") == expected
            seen = [t for t in driver.execute_script("return window.__seen") if t]
            assert seen[-1] == expected and all(expected.startswith(t) for t in seen)
            if len(expected.split()) > 2:
                assert len(set(seen)) >= 2, seen  # the text grew piece by piece, not all at once

            box.send_keys("And then?")  # a second turn keeps the first in the page and in the request
            send.click()
            WebDriverWait(driver, 30).until(replies(2))
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            assert [u.text for u in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == [question, "And then?"]
    finally:
        driver.quit()


def test_chat_page_trims_history_marks_cut_answers_and_takes_multiline_input(loaded):
    """Answers that fill the 64-token context: later turns still work (older turns left out, and the page says so)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver()
    try:
        with running_server(make_state(loaded, n_slots=2)) as url:
            driver.get(url + "/?temperature=0&max_tokens=200")
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            box, send = driver.find_element(By.ID, "input"), driver.find_element(By.ID, "send")
            turns = [("line one", "line two"), ("And then?",), ("Why?",)]
            for n, lines in enumerate(turns, 1):
                box.send_keys((Keys.SHIFT + Keys.ENTER + Keys.NULL).join(lines) + Keys.ENTER)  # Enter sends; Shift+Enter: a new line
                WebDriverWait(driver, 30).until(
                    lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")) == n and send.is_enabled())
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            users = [u.get_attribute("textContent") for u in driver.find_elements(By.CSS_SELECTOR, ".msg.user")]
            assert users == ["line one\nline two", "And then?", "Why?"]
            notes = " | ".join(n.text for n in driver.find_elements(By.CSS_SELECTOR, ".note"))
            assert "left out" in notes and "cut off" in notes, notes
    finally:
        driver.quit()
