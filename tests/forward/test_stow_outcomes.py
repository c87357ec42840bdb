"""What a DICOMweb destination does with each kind of STOW-RS answer, against a small
STOW-RS server in the test process (Orthanc cannot be made to answer 202, 409 or 415
on demand): one failed instance of a 202 is retried or dead-lettered alone, a refused
transfer syntax falls to the next, and a rotated bearer token is picked up."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, JPEG2000Lossless

from tests.conftest import StartNode
from tests.corpus import copies_with_new_uids, find, sop_instance_uid
from tests.forward_support import queue_cli
from tests.support import free_port, storescu, wait_until

pytestmark = pytest.mark.timeout(120)


class StowServer:
    """POST {root}/studies: stores nothing, records every part, answers as the test says."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, transfer syntax)
        self.stored: dict[str, str] = {}
        self.fail_once: dict[str, int] = {}  # SOP Instance UID -> Failure Reason, once
        self.fail_always: dict[str, int] = {}
        self.unsupported_media: set[str] = set()  # a part in one of these: 415
        self.refused_syntaxes: set[str] = set()  # per instance: Failure Reason 0xC122
        self.token: str | None = None  # bearer token required, if set
        self.script: list[int] = []  # statuses to answer first, one per request, body-less
        self.delay = 0.0  # seconds to wait before answering
        self.authorizations: list[str] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, answer = server.answer(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode() if answer else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)  # the client may have timed out and gone

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
        assert path == "/dicom-web/studies", path
        time.sleep(self.delay)
        with self.lock:
            self.authorizations.append(headers.get("Authorization", ""))
            if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
                return 401, {}
            parts = [_instance(part) for part in _parts(headers["Content-Type"], body)]
            self.received += parts
            if self.script:
                return self.script.pop(0), {}
            if any(syntax in self.unsupported_media for _, syntax in parts):
                return 415, {}
            stored, failed = [], []
            for uid, syntax in parts:
                reason = self._failure(uid, syntax)
                if reason is None:
                    self.stored[uid] = syntax
                    stored.append({"00081155": {"vr": "UI", "Value": [uid]}})
                else:
                    failed.append(
                        {
                            "00081155": {"vr": "UI", "Value": [uid]},
                            "00081197": {"vr": "US", "Value": [reason]},
                        }
                    )
        status = 200 if not failed else 202 if stored else 409
        return status, {
            "00081199": {"vr": "SQ", "Value": stored},
            "00081198": {"vr": "SQ", "Value": failed},
        }

    def _failure(self, uid: str, syntax: str) -> int | None:
        if syntax in self.refused_syntaxes:
            return 0xC122
        if uid in self.fail_always:
            return self.fail_always[uid]
        return self.fail_once.pop(uid, None)

    def times_received(self) -> Counter[str]:
        with self.lock:
            return Counter(uid for uid, _ in self.received)

    def syntaxes_of(self, uid: str) -> list[str]:
        with self.lock:
            return [syntax for got, syntax in self.received if got == uid]


def _parts(content_type: str, body: bytes) -> list[bytes]:
    message = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(message)
    assert parsed.get_param("type") == "application/dicom"
    return [part.get_payload(decode=True) for part in parsed.iter_parts()]


def _instance(part: bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(BytesIO(part))  # a whole Part 10 file, pixels and all
    ds.PixelData  # noqa: B018  (read to the end: a truncated part fails here)
    return str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)


@pytest.fixture
def stow() -> Iterator[StowServer]:
    server = StowServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def web_node(start_node: StartNode, stow: StowServer, **extra: object):  # type: ignore[no-untyped-def]
    target = {
        "name": "web",
        "protocol": "dicomweb",
        "url": stow.url,
        "batch_size": 10,
        "retry": {"initial_delay": 1, "max_delay": 3},
        **extra,
    }
    return start_node(lambda config: config.update(destination=[target]))


def forward_rows(config: Path) -> list[dict[str, object]]:
    status = queue_cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    return [r for r in json.loads(status.stdout) if r["kind"] == "forward" and r["state"] != "done"]


def test_202_with_one_failed_instance_retries_it_alone_and_dead_letters_another(
    start_node: StartNode, stow: StowServer, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 10)  # one study
    uids = [sop_instance_uid(p) for p in files]
    flaky, refused = uids[3], uids[6]
    stow.fail_once[flaky] = 0x0110  # processing failure: retried
    stow.fail_always[refused] = 0xA900  # data set does not match SOP class: permanent
    node = web_node(start_node, stow)
    assert storescu(node.port, files).returncode == 0

    def settled() -> bool:
        return [r["state"] for r in forward_rows(node.config_path)] == ["failed"]

    assert wait_until(settled, timeout=30), (forward_rows(node.config_path), node.log_tail(20))
    (dead,) = forward_rows(node.config_path)
    assert dead["count"] == 1 and "0xA900" in str(dead["last_error"]), dead
    assert "202 Accepted from " + stow.url + "/studies" in str(dead["last_error"])
    times = stow.times_received()
    assert times[flaky] == 2  # resent once, on its own
    assert times[refused] == 1  # a dead letter at once: not resent
    assert all(times[uid] == 1 for uid in uids if uid not in (flaky, refused)), times
    assert set(stow.stored) == set(uids) - {refused}
    assert f"dead letter: SOP Instance UID {refused} for 'web'" in node.log()
    assert node.stop() == 0


def test_a_refused_transfer_syntax_falls_to_the_next_and_is_remembered(
    start_node: StartNode, stow: StowServer, tmp_path: Path
) -> None:
    stow.unsupported_media = {str(HTJ2KLossless)}  # 415 for the whole request
    stow.refused_syntaxes = {str(JPEG2000Lossless)}  # 409, Failure Reason 0xC122
    files = copies_with_new_uids(find("MR_small.dcm"), tmp_path / "send", 6)
    first, later = files[:3], files[3:]
    wanted = ["HTJ2KLossless", "JPEG2000Lossless", "ExplicitVRLittleEndian"]
    node = web_node(start_node, stow, transfer_syntaxes=wanted)
    assert storescu(node.port, first).returncode == 0
    assert wait_until(lambda: len(stow.stored) == 3, timeout=30), node.log_tail(20)
    # Those of the first request saw all three; any that came after it, only the last.
    tried = [stow.syntaxes_of(sop_instance_uid(path)) for path in first]
    assert tried[0] == [HTJ2KLossless, JPEG2000Lossless, ExplicitVRLittleEndian], tried
    assert all(t in (tried[0], [ExplicitVRLittleEndian]) for t in tried), tried
    assert "415 Unsupported Media Type from" in node.log()
    assert "JPEG2000Lossless refused: 409 Conflict from" in node.log()

    # The refusals are remembered for MR Image Storage: later ones go straight to the third.
    assert storescu(node.port, later).returncode == 0
    assert wait_until(lambda: len(stow.stored) == 6, timeout=30), node.log_tail(20)
    for path in later:
        assert stow.syntaxes_of(sop_instance_uid(path)) == [ExplicitVRLittleEndian]
    assert not forward_rows(node.config_path)
    assert node.stop() == 0


def test_a_rotated_bearer_token_is_read_at_the_next_attempt(
    start_node: StartNode, stow: StowServer, tmp_path: Path
) -> None:
    token = tmp_path / "web.token"
    token.write_text("expired-token\n")
    token.chmod(0o600)
    stow.token = "fresh-token"
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 3)
    node = web_node(start_node, stow, auth={"bearer_token_file": str(token)})
    assert storescu(node.port, files).returncode == 0
    expected = f"401 Unauthorized from {stow.url}/studies: check the token in {token}"

    def held() -> bool:
        rows = forward_rows(node.config_path)
        return bool(rows) and all(expected in str(r["last_error"]) for r in rows)

    assert wait_until(held, timeout=20), forward_rows(node.config_path)
    assert "failed" not in {r["state"] for r in forward_rows(node.config_path)}  # held, not dead
    assert stow.authorizations[0] == "Bearer expired-token"

    token.write_text("fresh-token\n")  # rotated in place: no reload
    assert wait_until(lambda: len(stow.stored) == 3, timeout=20), node.log_tail(20)
    assert wait_until(lambda: not forward_rows(node.config_path), timeout=10)
    assert node.stop() == 0


def test_a_series_trigger_sends_the_stable_series_by_stow_rs_and_again_after_a_hold(
    start_node: StartNode, stow: StowServer, tmp_path: Path
) -> None:
    files = copies_with_new_uids(find("CT_small.dcm"), tmp_path / "send", 6)  # one series
    uids = {sop_instance_uid(p) for p in files}
    stow.script = [503, 503]  # the first two requests of the group: the server is down

    def edit(config: dict[str, object]) -> None:
        config["destination"] = [
            {
                "name": "web",
                "protocol": "dicomweb",
                "url": stow.url,
                "retry": {"initial_delay": 1, "max_delay": 2},
            }
        ]
        config["route"] = [{"destinations": ["web"], "trigger": "series", "stable_after": 1}]

    node = start_node(edit)
    assert storescu(node.port, files).returncode == 0

    def back_in_its_group() -> bool:  # waiting members of a dispatched group, not pending
        rows = forward_rows(node.config_path)
        return [r["state"] for r in rows] == ["waiting"] and "503 " in str(rows[0]["last_error"])

    assert wait_until(back_in_its_group, timeout=20, interval=0.05), forward_rows(node.config_path)
    assert wait_until(lambda: set(stow.stored) == uids, timeout=30), node.log_tail(20)
    assert wait_until(lambda: not forward_rows(node.config_path), timeout=10)
    assert "held for" in node.log() and "503 Service Unavailable from" in node.log()
    # The group went whole each time: two requests of 6 refused, then one of 6 stored.
    assert len(stow.received) == 18 and set(stow.times_received().values()) == {3}
    assert node.stop() == 0
