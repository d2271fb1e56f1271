"""The chat page at / in headless Chromium: type a message, watch the answer stream in, keep the history.

Needs Debian's chromium + chromium-driver and the selenium package; skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import shutil

import pytest

from tests.serve.conftest import make_state, running_server


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
    seen_partial = []
    try:
        with running_server(make_state(loaded, n_slots=2)) as url:
            driver.get(url + "/")
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            box = driver.find_element(By.ID, "input")
            box.send_keys("Who made the light?")
            driver.find_element(By.ID, "send").click()

            def answered(d):
                bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")
                if bubbles and bubbles[-1].text:
                    seen_partial.append(bubbles[-1].text)
                return bubbles and d.find_element(By.ID, "send").is_enabled()

            WebDriverWait(driver, 30, poll_frequency=0.01).until(answered)
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            user = driver.find_elements(By.CSS_SELECTOR, ".msg.user")
            assert [u.text for u in user] == ["Who made the light?"]
            first_answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
            assert first_answer and all(first_answer.startswith(p) for p in seen_partial)
            assert len(set(seen_partial)) >= 2, seen_partial  # the text grew piece by piece, not all at once

            box.send_keys("And then?")  # a second turn keeps the first in the page
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                                            and d.find_element(By.ID, "send").is_enabled())
            assert [u.text for u in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["Who made the light?", "And then?"]
    finally:
        driver.quit()
