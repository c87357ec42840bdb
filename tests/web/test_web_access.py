"""Who may read and act on the status page: the token, sessions, CSRF, origins, security
headers, loopback by default, and the config errors that keep it off the network."""

from __future__ import annotations

import http.client
import json
import re
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config.model import parse_config
from node.config.schema import ConfigError
from tests.corpus import copies_with_new_uids, find
from tests.forward_support import StoreSCP, destination
from tests.support import NodeProcess, configured_node, dicom_node, free_port, storescu, wait_until

TOKEN = "first-token-0123456789"


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read().decode()

    def json(self) -> object:
        return json.loads(self.body)


def call(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = dict(headers or {})
    if form is not None:
        body = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        connection.request(method, path, body=body, headers=headers)
        return Answer(connection.getresponse())
    finally:
        connection.close()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, int, Path]]:
    """A node with a token file, forwarding to a port nobody listens on: its instances
    become dead letters at the first try."""
    folder = tmp_path_factory.mktemp("guarded")
    token_file = folder / "web.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    web_port = free_port()

    def edit(config: dict[str, object]) -> None:
        config["destination"] = [
            destination(
                "pacs",
                "NOBODY",
                free_port(),
                retry={"initial_delay": 0.2, "max_delay": 0.5, "max_attempts": 1},
            )
        ]
        config["web"] = {"address": f"127.0.0.1:{web_port}", "token_file": str(token_file)}
        config["security"] = {"allowed_calling_aets": ["STORESCU"]}

    node = configured_node(folder, edit).start()
    files = copies_with_new_uids(find("CT_small.dcm"), folder / "in", 3)
    assert storescu(node.port, files).returncode == 0
    assert wait_until(lambda: dead_letters(web_port) == 3, 60)
    try:
        yield node, web_port, token_file
    finally:
        node.stop()


def dead_letters(port: int, token: str = TOKEN) -> int:
    answer = call(port, "/api/dead-letters?destination=pacs", headers=bearer(token))
    assert answer.status == 200, answer.body
    total = answer.json()["total"]  # type: ignore[index]
    assert isinstance(total, int)
    return total


def sign_in(port: int) -> tuple[str, str]:
    """A session cookie and the CSRF token of its page."""
    answer = call(port, "/login", "POST", form={"token": TOKEN}, headers=same_origin(port))
    assert answer.status == 303, answer.body
    cookie = answer.headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in answer.headers["set-cookie"]
    assert "SameSite=Strict" in answer.headers["set-cookie"]
    page = call(port, "/", headers={"Cookie": cookie})
    assert page.status == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.body)
    assert found, "no CSRF token in the signed-in page"
    return cookie, found.group(1)


def same_origin(port: int) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{port}", "Host": f"127.0.0.1:{port}"}


@pytest.mark.parametrize("path", ["/", "/api/status", "/api/overview", "/dead-letters", "/api/"])
def test_without_the_token_every_page_is_401(
    guarded: tuple[NodeProcess, int, Path], path: str
) -> None:
    _, port, _ = guarded
    for headers in ({}, bearer("wrong-token"), {"Cookie": "dicom_node_session=forged"}):
        answer = call(port, path, headers=headers)
        assert answer.status == 401, (path, headers)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in answer.body
    assert call(port, path, headers=bearer()).status == 200
    # The stylesheet carries no data and is served to the sign-in page.
    assert call(port, "/static/style.css").status == 200


def test_every_answer_has_the_security_headers_and_no_script(
    guarded: tuple[NodeProcess, int, Path],
) -> None:
    _, port, _ = guarded
    for path, headers in (
        ("/", bearer()),
        ("/", {}),
        ("/api/status", bearer()),
        ("/nowhere", bearer()),
    ):
        answer = call(port, path, headers=headers)
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'none'" in csp
        assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = call(port, "/", headers=bearer()).body
    assert "<script" not in page.lower()
    assert not re.search(r"\sstyle=|\son[a-z]+=", page), "inline style or event handler"
    assert not re.search(r'(src|href)="(https?:)?//', page), "a reference outside the node"
    assert call(port, "/nowhere", headers=bearer()).status == 404


def test_the_overview_shows_dead_letters_by_uid_never_by_patient(
    guarded: tuple[NodeProcess, int, Path],
) -> None:
    _, port, _ = guarded
    page = call(port, "/dead-letters?destination=pacs", headers=bearer()).body
    listed = call(port, "/api/dead-letters?destination=pacs&per_page=2", headers=bearer()).json()
    assert listed["total"] == 3 and listed["pages"] == 2 and len(listed["items"]) == 2  # type: ignore[index]
    for item in listed["items"]:  # type: ignore[index]
        assert item["sop_instance_uid"] in page and item["attempts"] == 1
        assert "gave up after 1 attempts" in item["error"]
    # CT_small's Patient's Name and ID are on no page.
    for path in ("/", "/dead-letters", "/api/overview", "/api/dead-letters"):
        body = call(port, path, headers=bearer()).body
        assert "CompressedSamples" not in body and "1CT1" not in body, path


def test_a_browser_post_needs_its_session_csrf_token_and_our_origin(
    guarded: tuple[NodeProcess, int, Path],
) -> None:
    _, port, _ = guarded
    cookie, csrf = sign_in(port)
    retry = {"destination": "pacs", "csrf": csrf}
    refused = [
        ({"Cookie": cookie, **same_origin(port)}, {"destination": "pacs"}),  # no CSRF token
        ({"Cookie": cookie, **same_origin(port)}, {**retry, "csrf": "0" * 64}),  # a wrong one
        ({"Cookie": cookie, "Origin": "http://evil.example", "Host": f"127.0.0.1:{port}"}, retry),
        ({"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}, retry),
        ({}, retry),  # no session at all
    ]
    for headers, form in refused:
        answer = call(port, "/actions/retry", "POST", headers=headers, form=form)
        assert answer.status in (401, 403), (headers, form, answer.status)
    assert dead_letters(port) == 3, "a refused POST changed the queue"
    before = dead_letter_times(port)
    answer = call(
        port, "/actions/retry", "POST", headers={"Cookie": cookie, **same_origin(port)}, form=retry
    )
    assert answer.status == 303 and answer.headers["location"] == "/"
    # Queued again, tried once more against the closed port, dead again.
    assert wait_until(lambda: retried_since(port, before), 30)


def dead_letter_times(port: int) -> list[float]:
    items = call(port, "/api/dead-letters", headers=bearer()).json()["items"]  # type: ignore[index]
    return [item["at"] for item in items]


def retried_since(port: int, before: list[float]) -> bool:
    """All three are dead letters again, each made after the newest one before."""
    times = dead_letter_times(port)
    return len(times) == 3 and min(times) > max(before)


def test_scripts_act_with_the_bearer_token(guarded: tuple[NodeProcess, int, Path]) -> None:
    _, port, _ = guarded
    assert wait_until(lambda: dead_letters(port) == 3, 30)
    before = dead_letter_times(port)
    answer = call(port, "/api/destinations/pacs/retry", "POST", headers=bearer())
    assert answer.status == 200, answer.body
    assert answer.json() == {"destination": "pacs", "retried": 3}
    assert call(port, "/api/destinations/nowhere/retry", "POST", headers=bearer()).status == 404
    assert call(port, "/api/destinations/pacs/retry", "POST").status == 401
    assert call(port, "/", "PUT", headers=bearer()).status == 405
    big = call(port, "/actions/retry", "POST", headers=bearer(), body=b"x" * 9000)
    assert big.status == 413
    assert wait_until(lambda: retried_since(port, before), 30)


def test_a_new_token_in_the_file_signs_everyone_out(guarded: tuple[NodeProcess, int, Path]) -> None:
    _, port, token_file = guarded
    cookie, _ = sign_in(port)
    assert call(port, "/", headers={"Cookie": cookie}).status == 200
    token_file.write_text("second-token-9876543210\n")
    try:
        assert call(port, "/api/status", headers=bearer()).status == 401
        assert call(port, "/", headers={"Cookie": cookie}).status == 401
        assert call(port, "/api/status", headers=bearer("second-token-9876543210")).status == 200
    finally:
        token_file.write_text(TOKEN + "\n")


def test_without_a_token_file_the_page_is_read_only_on_loopback(tmp_path: Path) -> None:
    web_port = free_port()

    def edit(config: dict[str, object]) -> None:
        config["web"] = {"address": f":{web_port}"}  # no host: loopback, not every interface

    node = configured_node(tmp_path, edit).start()
    try:
        assert node.logged(f"status page on http://127.0.0.1:{web_port}/ (read-only, no token)")
        page = call(web_port, "/")
        assert page.status == 200 and "Read-only" in page.body and "<button" not in page.body
        answer = call(web_port, "/api/destinations/pacs/retry", "POST")
        assert answer.status == 403 and "token_file" in answer.body
        cli = dicom_node("status", "--json", "-c", str(node.config_path))
        assert call(web_port, "/api/status").json() == json.loads(cli.stdout)
        # A reload keeps the page where it is; a new address waits for a restart.
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace(f":{web_port}", f":{free_port()}"))
        node.signal(signal.SIGHUP)
        assert node.logged("web.address changed; it takes effect at the next restart")
        assert node.logged("reloaded")
        assert call(web_port, "/api/overview").json()["now"]["phase"] == "ready"  # type: ignore[index]
    finally:
        node.stop()


@pytest.mark.parametrize("address", ["0.0.0.0:8080", "pacs-host:8080"])
def test_off_loopback_without_a_token_file_the_node_does_not_start(
    tmp_path: Path, address: str
) -> None:
    node = configured_node(tmp_path, lambda c: c.update(web={"address": address}))
    result = dicom_node("run", "-c", str(node.config_path), timeout=60)
    assert result.returncode != 0
    assert "web.token_file: is required when address" in result.stdout + result.stderr
    assert not (tmp_path / "data").exists() or not (tmp_path / "data" / "queue.sqlite3").exists()


def test_a_token_file_readable_by_everyone_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "web.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    node = configured_node(
        tmp_path,
        lambda c: c.update(web={"address": "127.0.0.1:8080", "token_file": str(token_file)}),
    )
    result = dicom_node("check-config", "-c", str(node.config_path))
    assert result.returncode != 0
    assert "web.token_file" in result.stdout + result.stderr
    assert "readable by every user" in result.stdout + result.stderr


def test_recent_associations_show_refusals_with_their_reason(
    guarded: tuple[NodeProcess, int, Path],
) -> None:
    node, port, _ = guarded
    files = copies_with_new_uids(find("CT_small.dcm"), node.config_path.parent / "intruder", 1)
    assert storescu(node.port, files, aet="INTRUDER").returncode != 0
    associations = call(port, "/api/overview", headers=bearer()).json()["associations"]  # type: ignore[index]
    newest = associations[0]
    assert newest["outcome"] == "rejected" and newest["calling_ae_title"] == "INTRUDER"
    assert "allowed_calling_aets" in newest["reason"] and newest["instances"] == 0
    sent = [a for a in associations if a["calling_ae_title"] == "STORESCU"]
    assert sent and sent[-1]["outcome"] == "released" and sent[-1]["instances"] == 3
    assert "contexts accepted" in sent[-1]["contexts"]
    page = call(port, "/", headers=bearer()).body
    assert "INTRUDER" in page and "rejected: calling AE" in page


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("[::]:8080", True),
        ("192.0.2.7:8080", True),
        ("127.0.0.1:8080", False),
        ("[::1]:8080", False),
        ("localhost:8080", False),
        (":8080", False),
        ("8080", False),
    ],
)
def test_which_addresses_need_a_token_file(address: str, refused: bool) -> None:
    data = {"web": {"address": address}}
    if refused:
        with pytest.raises(ConfigError, match=r"web\.token_file: is required when address"):
            parse_config(data, Path("/etc/dicom-node/config.toml"))
    else:
        assert parse_config(data, Path("/etc/dicom-node/config.toml")).web.address == address


def test_waiting_groups_are_shown_and_released_from_the_page(tmp_path: Path) -> None:
    storescp = StoreSCP(tmp_path / "pacs").start()
    token_file = tmp_path / "web.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    web_port = free_port()

    def edit(config: dict[str, object]) -> None:
        config["destination"] = [destination("pacs", "STORESCP", storescp.port)]
        config["route"] = [
            {"name": "ct", "destinations": ["pacs"], "trigger": "series", "stable_after": 600}
        ]
        config["web"] = {"address": f"127.0.0.1:{web_port}", "token_file": str(token_file)}

    node = configured_node(tmp_path / "node", edit).start()
    try:
        files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "in", 3)  # one series
        assert storescu(node.port, files).returncode == 0
        overview = call(web_port, "/api/overview", headers=bearer()).json()
        panel = overview["panels"]["groups"]  # type: ignore[index]
        assert len(panel["rows"]) == 1
        row, key = panel["rows"][0], panel["row_keys"][0]
        assert row[:3] == ["ct", "forward pacs", "series"] and row[6:8] == ["waiting", "3"]
        pacs = overview["destinations"][0]  # type: ignore[index]
        assert (pacs["state"], pacs["depth"], pacs["in_groups"]) == ("waiting", 3, 3)
        page = call(web_port, "/", headers=bearer()).body
        assert 'id="panel-groups"' in page and page.count(">Release</button>") == 1

        answer = call(web_port, f"/api/panels/groups/{key}", "POST", headers=bearer())
        assert answer.status == 200, answer.body
        assert "1 series groups" in answer.json()["result"]  # type: ignore[index]

        def delivered() -> bool:
            rows = call(web_port, "/api/overview", headers=bearer()).json()["destinations"]  # type: ignore[index]
            return rows[0]["state"] == "idle" and rows[0]["depth"] == 0

        assert wait_until(delivered, 60)
        assert storescp.count() == 3
        again = call(web_port, f"/api/panels/groups/{key}", "POST", headers=bearer())
        assert again.status == 404, "a dispatched group cannot be released twice"
    finally:
        node.stop()
        storescp.kill()


def test_open_storage_commitments_are_shown(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    from tests.commitment.peers import Modality, references

    def edit(config: dict[str, object]) -> None:
        # Committed once delivered, to a destination that is down: the request stays open.
        config["commitment"] = {"enabled": True, "when": "delivered"}
        config["destination"] = [destination("pacs", "NOBODY", free_port())]
        config["web"] = {"address": f"127.0.0.1:{web_port}"}

    web_port = free_port()
    node = configured_node(tmp_path, edit).start()
    try:
        files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "in", 2)
        status = Modality(node.port).send_and_request(files, generate_uid(), references(files))
        assert status == 0x0000
        panel = call(web_port, "/api/overview").json()["panels"]["commitments"]  # type: ignore[index]
        assert [row[:4] for row in panel["rows"]] == [["requested", "MODALITY", "1", "2"]]
        page = call(web_port, "/").body
        assert 'id="panel-commitments"' in page and "Storage commitments" in page
    finally:
        node.stop()
