"""The status page in a real browser (Debian's chromium, headless, JavaScript off), against
a node receiving 200 CT instances from DCMTK storescu and forwarding them to a storescp
that is stopped halfway and started again."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.corpus import copies_with_new_uids, find
from tests.forward_support import StoreSCP, destination
from tests.support import configured_node, dicom_node, free_port, storescu, wait_until
from tests.web.browser import (
    artifacts_dir,
    chromium,
    network_events,
    read_page,
    requests_made,
    response_statuses,
    screenshot,
)

REFRESH = 5  # node.web.pages.REFRESH_SECONDS, the page's meta refresh
TOKEN = "s3cret-token-for-the-status-page"


def api(base: str, path: str, token: str = TOKEN) -> Any:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def pacs_row(base: str) -> dict[str, Any]:
    rows = api(base, "/api/overview")["destinations"]
    return next(row for row in rows if row["name"] == "pacs")


def page_row(driver: Any) -> tuple[str, str, str]:
    """The destination row as the page shows it: state, queue depth, dead letters."""
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.ID, "destination-pacs")
    cells = row.find_elements(By.TAG_NAME, "td")
    return row.get_attribute("data-state"), cells[3].text, cells[5].text.split(" ")[0]


def chart_total(driver: Any, flow: str, unit: str = "instances") -> float:
    from selenium.webdriver.common.by import By

    svg = driver.find_element(By.CSS_SELECTOR, f'svg[data-flow="{flow}"][data-unit="{unit}"]')
    return float(svg.get_attribute("data-total"))


def bars(driver: Any, flow: str) -> int:
    from selenium.webdriver.common.by import By

    selector = f'svg[data-flow="{flow}"][data-unit="instances"] rect.bar'
    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def test_status_page_follows_an_outage_of_a_destination(tmp_path: Path) -> None:
    shots = artifacts_dir(tmp_path)
    token_file = tmp_path / "web.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    storescp = StoreSCP(tmp_path / "pacs").start()
    web_port = free_port()

    def edit(config: dict[str, object]) -> None:
        # One try per job: during the outage, each backoff round makes one dead letter.
        config["destination"] = [
            destination(
                "pacs",
                "STORESCP",
                storescp.port,
                retry={"initial_delay": 1, "max_delay": 2, "max_attempts": 1},
            )
        ]
        config["web"] = {"address": f"127.0.0.1:{web_port}", "token_file": str(token_file)}

    node = configured_node(tmp_path / "node", edit).start()
    base = f"http://127.0.0.1:{web_port}"
    first, second = (
        copies_with_new_uids(find("CT_small.dcm"), tmp_path / name, 100) for name in ("a", "b")
    )
    try:
        with chromium(tmp_path / "profile") as driver:
            from selenium.webdriver.common.by import By

            # JavaScript is off in this browser: the page must do without it.
            driver.get("data:text/html,<title>off</title><script>document.title='on'</script>")
            assert driver.title == "off"
            # Without the token: 401 and the sign-in form.
            driver.get(base + "/")
            events = network_events(driver)
            assert response_statuses(events)[base + "/"] == [401]
            requests = requests_made(events)
            driver.find_element(By.NAME, "token").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#login button").click()
            assert wait_until(lambda: driver.find_elements(By.ID, "destination-pacs"), 10)
            assert read_page(driver, page_row) == ("idle", "0", "0")
            screenshot(driver, shots, "status-idle.png")

            # The first 100 instances stream in and are forwarded while the page is open.
            assert storescu(node.port, first).returncode == 0
            assert wait_until(lambda: pacs_row(base)["state"] == "idle", 60)

            # storescp stops halfway: the next 100 are received, the destination is held.
            storescp.stop()
            assert storescu(node.port, second).returncode == 0
            assert wait_until(lambda: read_page(driver, page_row)[0] == "held", 30)
            assert wait_until(lambda: int(read_page(driver, page_row)[2]) >= 2, 30)
            held_state, depth, dead = read_page(driver, page_row)
            assert held_state == "held" and int(depth) > 0
            row_text = read_page(driver, lambda d: d.find_element(By.ID, "destination-pacs").text)
            assert "next try in" in row_text
            assert wait_until(
                lambda: read_page(driver, lambda d: chart_total(d, "received")) == 200,
                2 * REFRESH + 5,
            )
            assert read_page(driver, lambda d: bars(d, "received")) >= 1
            screenshot(driver, shots, "status-held-dead-letters.png")

            # storescp is back: the row goes held -> idle, on the page within one refresh.
            storescp.start()
            node_idle = page_idle = None
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and page_idle is None:
                if node_idle is None and pacs_row(base)["state"] == "idle":
                    node_idle = time.monotonic()
                if read_page(driver, page_row)[0] == "idle":
                    page_idle = time.monotonic()
                time.sleep(0.2)
            assert node_idle is not None and page_idle is not None, "never idle again"
            assert page_idle - node_idle <= REFRESH + 3, (node_idle, page_idle)
            state, depth, dead = read_page(driver, page_row)
            assert (state, depth) == ("idle", "0") and int(dead) >= 2
            dead_letters = int(dead)

            # From here the page is read without its refresh, so nothing swaps it mid-read.
            driver.get(base + "/?refresh=0")

            # What the page keeps in memory: both associations, and every delivery's delay.
            rows = driver.find_elements(By.CSS_SELECTOR, "#associations tbody tr.outcome-released")
            assert len(rows) == 2 and all("STORESCU" in row.text for row in rows)
            assert sorted(row.find_elements(By.TAG_NAME, "td")[5].text for row in rows) == [
                "100",
                "100",
            ]
            delay = pacs_row(base)["delivery_delay"]
            assert (
                delay["deliveries"] == 200 - dead_letters
                and delay["maximum"] >= delay["median"] > 0
            )

            # /api/status is `dicom-node status --json`, field for field, on a quiet node.
            cli = dicom_node("status", "--json", "-c", str(node.config_path), timeout=60)
            assert cli.returncode == 0, cli.stderr
            assert api(base, "/api/status") == json.loads(cli.stdout)

            # The traffic chart shows the 200 received and what was forwarded.
            driver.get(base + "/?refresh=0")
            assert chart_total(driver, "received") == 200
            assert chart_total(driver, "forwarded") == 200 - dead_letters
            assert chart_total(driver, "stored") == 200
            assert chart_total(driver, "refused") == 0

            # The retry button (a POST with the session's CSRF token) sends them again.
            driver.find_element(By.CSS_SELECTOR, "#destination-pacs button").click()
            assert wait_until(lambda: pacs_row(base)["dead_letters"] == 0, 30)
            assert wait_until(
                lambda: api(base, "/api/traffic")["totals"]["instances"]["forwarded"] == 200, 60
            )

            # Every request our pages made went to the node itself, and nothing in the
            # whole log (the browser's start page included) went out over the network.
            requests += requests_made(network_events(driver))
            ours = [url for document, url in requests if document.startswith(base + "/")]
            assert len(ours) > 10, "the performance log recorded too little"
            assert [url for url in ours if not url.startswith(base + "/")] == []
            network = [u for _, u in requests if u.split(":")[0] in ("http", "https", "ws", "wss")]
            assert [url for url in network if not url.startswith(base + "/")] == []
        print(f"screenshots in {shots}")
    finally:
        node.stop()
        storescp.kill()
