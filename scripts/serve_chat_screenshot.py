"""Screenshot of serve's chat page holding a three-message conversation (docs/serve-chat.png).

Starts `gigafactory serve` on a checkpoint, drives the page at / in headless Chromium through Selenium (as
tests/serve/test_web_page.py does): types each message, presses Enter, waits for the streamed answer; then saves the
page as a palette PNG (small enough for the docs).

    .venv/bin/python scripts/serve_chat_screenshot.py --checkpoint /tmp/demo/pre --out docs/serve-chat.png

Needs Debian's chromium and chromium-driver and `pip install selenium`.
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

MESSAGES = ("In the beginning God created", "And the earth was without form", "And God said, Let there be light")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"gigafactory serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"gigafactory serve was not ready after {timeout_s:g} s")


def browser(size: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size}", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def converse(driver, url: str, messages, answer_timeout_s: float) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/?temperature=0.8&top_p=0.95&max_tokens=40")
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    box, send = driver.find_element(By.ID, "input"), driver.find_element(By.ID, "send")
    for n, text in enumerate(messages, 1):
        box.send_keys(text, Keys.ENTER)
        WebDriverWait(driver, answer_timeout_s).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")) == n and send.is_enabled())
    errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    if errors:
        sys.exit(f"the page showed an error: {errors[0].text}")


def save_small_png(png: bytes, out: str, colors: int = 64) -> int:
    """The screenshot quantized to a palette: text and flat colours survive, the file shrinks ~4x."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors)
    image.save(out, optimize=True)
    with open(out, "rb") as f:
        return len(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint to serve")
    parser.add_argument("--out", default="docs/serve-chat.png")
    parser.add_argument("--size", default="900,760", help="browser window WIDTH,HEIGHT in pixels")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the server to start, and per answer")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gigafactory", "serve", "--checkpoint", f"grok-tiny={args.checkpoint}",
                               "--port", str(port), "--slots", "2", "--log-level", "warning"])
    try:
        wait_ready(url, server, args.timeout)
        driver = browser(args.size)
        try:
            converse(driver, url, MESSAGES, args.timeout)
            size = save_small_png(driver.get_screenshot_as_png(), args.out)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.out}: {size / 1024:.0f} KB, {len(MESSAGES)} messages")


if __name__ == "__main__":
    main()
