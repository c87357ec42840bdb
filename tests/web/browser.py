"""Debian's chromium, headless, driven by selenium through Debian's chromedriver.

Selenium Manager never runs: the driver's path is given (so it has nothing to look up
or download), and the browser is /usr/bin/chromium. JavaScript is off, as some sites
run their browsers: the status page must work without it. The performance log records
every request the page makes, so a test can assert that none leaves the node.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.tools import missing_tool, require_tool

# Where the screenshots go: DICOM_NODE_ARTIFACTS if set (the closing note's copies),
# else a folder of the test's tmp dir (printed by the test).
ARTIFACTS_ENV = "DICOM_NODE_ARTIFACTS"


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def chromium(profile: Path, width: int = 1400, height: int = 1700) -> Iterator[Any]:
    """A headless chromium session (selenium WebDriver), quit at the end."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_tool("selenium is not installed (pip install -e '.[test]')")
    browser = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI has no user namespace sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(
        executable_path=driver_path, log_output=str(profile.parent / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def network_events(driver: Any) -> list[dict[str, Any]]:
    """The DevTools Network events logged since the last call."""
    events = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            events.append(message)
    return events


def requests_made(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(document URL, requested URL) of every request; the browser's own pages (its new
    tab page at start) are chrome:// documents loading chrome:// resources."""
    return [
        (e["params"].get("documentURL", ""), e["params"]["request"]["url"])
        for e in events
        if e["method"] == "Network.requestWillBeSent"
    ]


def response_statuses(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    statuses: dict[str, list[int]] = {}
    for event in events:
        if event["method"] == "Network.responseReceived":
            response = event["params"]["response"]
            statuses.setdefault(response["url"], []).append(int(response["status"]))
    return statuses


def read_page(driver: Any, read: Callable[[Any], Any], timeout: float = 10.0) -> Any:
    """read(driver) on the page as it is, retried while a refresh swaps the document."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return read(driver)
        except (NoSuchElementException, StaleElementReferenceException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    path = folder / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    return path
