"""Real-browser helpers for the web app's tests: Debian's chromium driven by Playwright's Python API.

No browser is downloaded: Playwright launches the system chromium by its path. Tests skip (with the
reason) only when chromium or Playwright is absent; CI installs both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from urllib.parse import urlparse

import pytest

#: Software WebGL: the test machines have no GPU, and viser's client needs WebGL 2.
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"]


def chromium_path() -> str:
    """The system chromium, or skip the test saying what is missing."""
    for candidate in (os.environ.get("EX4D_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("chromium is not installed (apt-get install chromium); the browser tests need it")


@contextlib.contextmanager
def browser_page(viewport=(1280, 900)):
    """Yield ``(page, requests)``: a fresh headless page and the list of every URL it requested."""
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.on("websocket", lambda socket: requests.append(socket.url))
            yield page, requests
        finally:
            browser.close()


def off_host(urls, host: str = "127.0.0.1") -> list[str]:
    """The URLs that would leave ``host`` (data: and blob: URLs never reach the network)."""
    return [u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != host]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate()`` until it is truthy and return its value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
