"""Debian's headless chromium driven by selenium, for the tests of `peftlab serve`'s page."""

from __future__ import annotations

import contextlib
import shutil

import pytest


def chromium() -> tuple[str, str] | None:
    """Debian's chromium binary and its chromedriver, or None."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


needs_chromium = pytest.mark.skipif(chromium() is None,
                                    reason="no chromium + chromedriver (apt-get install chromium chromium-driver)")


@contextlib.contextmanager
def headless_browser():
    """A headless chromium under selenium (skips the test without selenium), quit on exit."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would try to download one, which fails offline.
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield browser
    finally:
        browser.quit()
