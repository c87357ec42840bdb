"""The node as a systemd daemon: sd_notify, watchdog, SIGHUP reload and graceful SIGTERM.

systemd's side is played by the test: it binds the NOTIFY_SOCKET datagram socket
and reads what the node sends. The peers are real pynetdicom associations.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from node.daemon.notify import Notifier, watchdog_interval
from tests.conftest import StartNode
from tests.corpus import CT_SMALL
from tests.forward_support import StoreSCP
from tests.foundation_helpers import associate as pynetdicom_association
from tests.support import NodeProcess, base_config, wait_until, write_config
from tests.test_daemon_status import status

CT_AND_ECHO = [(CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian])]


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET: collects (monotonic time, fields) per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [
                (at, fields)
                for at, fields in self.messages
                if key in fields and (value is None or fields[key] == value)
            ]

    def count(self, key: str, value: str | None = None) -> int:
        return len(self.with_key(key, value))

    def wait_for(self, key: str, value: str | None = None, *, count: int = 1) -> bool:
        return wait_until(lambda: self.count(key, value) >= count, timeout=30)

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def ct_dataset() -> Dataset:
    """CT_small with a fresh SOP Instance UID, so every send is a new instance."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def associate(port: int, calling: str) -> Association:
    """CT Image Storage and Verification, Explicit VR Little Endian, 20 s timeouts."""
    return pynetdicom_association(port, CT_AND_ECHO, calling=calling, timeout=20)


def echo_ok(port: int, calling: str = "ECHOSCU") -> bool:
    assoc = associate(port, calling)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


StartDaemon = Callable[..., NodeProcess]


@pytest.fixture
def start_daemon(start_node: StartNode, notify: NotifyListener) -> StartDaemon:
    """start_node as systemd starts the service: NOTIFY_SOCKET, a 1 s watchdog, terminal-style
    log lines, and no waiting for the port (the test waits for READY=1); `sections` replace
    whole config sections."""

    def start(**sections: object) -> NodeProcess:
        systemd = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        return start_node(lambda config: config.update(sections), env=systemd, wait=False)

    return start


def accepts(port: int, calling: str) -> bool:
    """Whether an association from `calling` is accepted (it is released at once)."""
    assoc = associate(port, calling)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def rewrite_config(
    node: NodeProcess, tmp_path: Path, allowed: list[str], **node_keys: object
) -> None:
    config = base_config(tmp_path, node.port, **node_keys)
    config["security"] = {"allowed_calling_aets": allowed}
    write_config(node.config_path, config)


def test_watchdog_interval_is_half_and_only_for_our_pid() -> None:
    ours = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(ours) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"@dicom-node-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name[1:].encode())
        sock.settimeout(5)
        notifier = Notifier(name)
        assert notifier.reloading()
        fields = sock.recv(4096).decode().splitlines()
        notifier.close()
    assert fields[0] == "RELOADING=1"
    assert fields[1].startswith("MONOTONIC_USEC=") and int(fields[1].split("=")[1]) > 0


def test_ready_only_when_serving_then_watchdog_status_and_stopping(
    start_daemon: StartDaemon, tmp_path: Path, notify: NotifyListener
) -> None:
    node = start_daemon()
    try:
        assert notify.wait_for("READY", "1"), node.log()
        # The instant READY=1 arrives, an association must already succeed: no retry here.
        assert echo_ok(node.port)
        ready_at = notify.with_key("READY", "1")[0][0]
        first_status = notify.with_key("READY", "1")[0][1].get("STATUS", "")
        assert "0 instances received" in first_status
        assert all(at >= ready_at for at, _ in notify.with_key("WATCHDOG")), "pinged before READY"
        # WATCHDOG_USEC=1 s: a ping every 0.5 s, so at least 4 in 3 s.
        start = notify.count("WATCHDOG", "1")
        time.sleep(3.0)
        assert notify.count("WATCHDOG", "1") - start >= 4
        assoc = associate(node.port, "SENDER")
        assert assoc.is_established
        assert assoc.send_c_store(ct_dataset()).Status == 0x0000
        assoc.release()
        assert wait_until(
            lambda: any(
                "1 instances received" in f.get("STATUS", "") for _, f in notify.with_key("STATUS")
            ),
            timeout=10,
        ), notify.messages
        assert node.stop() == 0, node.log()
        assert notify.count("STOPPING", "1") == 1
    finally:
        node.kill()
    log = node.log()
    assert "association released: 127.0.0.1:" in log
    assert "'SENDER' -> 'DICOMNODE', 2/2 contexts accepted (ExplicitVRLittleEndian)" in log
    assert "1 instances received" in log


def test_sighup_reloads_allowlist_without_dropping_an_open_association(
    start_daemon: StartDaemon, tmp_path: Path, notify: NotifyListener
) -> None:
    node = start_daemon(security={"allowed_calling_aets": ["SENDER", "OTHER"]})
    try:
        assert notify.wait_for("READY", "1"), node.log()
        in_progress = associate(node.port, "SENDER")
        assert in_progress.is_established
        assert in_progress.send_c_store(ct_dataset()).Status == 0x0000

        # SENDER is no longer allowed: new associations from it are refused from now on...
        assert "association from" not in node.log()  # a DEBUG line: INFO until the reload
        rewrite_config(node, tmp_path, ["OTHER"], log_level="DEBUG")
        node.signal(signal.SIGHUP)
        assert notify.wait_for("READY", "1", count=2), node.log()
        reloading = notify.with_key("RELOADING", "1")
        assert len(reloading) == 1 and int(reloading[0][1]["MONOTONIC_USEC"]) > 0
        assert not accepts(node.port, "SENDER")
        assert echo_ok(node.port, "OTHER")
        assert wait_until(lambda: "'OTHER' -> 'DICOMNODE', 2/2 contexts" in node.log(), timeout=5)
        # ...but the association that was open before the reload carries on.
        for _ in range(3):
            time.sleep(0.3)
            assert in_progress.send_c_store(ct_dataset()).Status == 0x0000
        in_progress.release()
        assert not in_progress.is_aborted

        # A broken config is refused with its file and key; the node keeps the previous one.
        rewrite_config(node, tmp_path, ["SENDER", "OTHER"], max_associations="many")
        node.signal(signal.SIGHUP)
        assert notify.wait_for("READY", "1", count=3), node.log()
        assert wait_until(lambda: "reload refused" in node.log(), timeout=10)
        assert echo_ok(node.port, "OTHER")
        assert not accepts(node.port, "SENDER")
        assert node.alive()
        assert node.stop() == 0, node.log()
    finally:
        node.kill()
    log = node.log()
    refusal = next(line for line in log.splitlines() if "reload refused" in line)
    assert f"{node.config_path}: node.max_associations: must be a whole number" in refusal
    assert "calling AE 'SENDER' is not in security.allowed_calling_aets" in log
    assert "4 instances received" in log  # the association kept across the reload


def _stored_and_queued(tmp_path: Path) -> int:
    stored = len(list((tmp_path / "archive").rglob("*.dcm")))
    with sqlite3.connect(tmp_path / "data" / "queue.sqlite3") as db:
        (queued,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
    return stored + queued


def test_sigterm_lets_the_transfer_finish_and_exits_zero(
    start_daemon: StartDaemon, tmp_path: Path, notify: NotifyListener
) -> None:
    node = start_daemon()
    statuses: list[int] = []
    try:
        assert notify.wait_for("READY", "1"), node.log()
        assoc = associate(node.port, "SENDER")
        assert assoc.is_established
        statuses.append(assoc.send_c_store(ct_dataset()).Status)

        def send_rest() -> None:
            for _ in range(5):
                time.sleep(0.4)
                statuses.append(assoc.send_c_store(ct_dataset()).Status)
            assoc.release()

        sender = threading.Thread(target=send_rest)
        sender.start()
        node.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", "1"), node.log()
        # No new associations once stopping, while the open one is still sending.
        assert wait_until(lambda: not accepts(node.port, "LATE"), timeout=5)
        assert sender.is_alive(), "the transfer should still be running"
        sender.join(30)
        assert node.process is not None
        stopped_at = time.monotonic()
        assert node.process.wait(30) == 0, node.log()
        assert time.monotonic() - stopped_at < 30
    finally:
        node.kill()
    assert statuses == [0x0000] * 6
    assert not assoc.is_aborted
    # Every acknowledged instance is either in the archive or still queued for the next start.
    assert _stored_and_queued(tmp_path) == 6
    assert "association released" in node.log()


def test_second_node_on_the_same_data_dir_refuses_to_start(
    start_daemon: StartDaemon, start_node: StartNode, tmp_path: Path, notify: NotifyListener
) -> None:
    first = start_daemon()
    try:
        assert notify.wait_for("READY", "1"), first.log()
        second = start_node(wait=False)  # the same tmp_path, so the same data_dir
        assert second.process is not None
        assert second.process.wait(30) == 1
        assert f"{tmp_path / 'data'} is in use by another dicom-node (pid {first.pid})" in (
            second.log()
        )
        assert echo_ok(first.port)
        summary = status(first.config_path).stdout
        assert f": running (pid {first.pid})" in summary.splitlines()[0]
        assert first.stop() == 0, first.log()
    finally:
        first.kill()


def test_sighup_adds_a_destination_and_forwards_to_it(
    start_daemon: StartDaemon, tmp_path: Path, notify: NotifyListener
) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    node = start_daemon()
    try:
        assert notify.wait_for("READY", "1"), node.log()
        config = base_config(tmp_path, node.port)
        config["destination"] = [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port}
        ]
        write_config(node.config_path, config)
        node.signal(signal.SIGHUP)
        assert notify.wait_for("READY", "1", count=2), node.log()
        assoc = associate(node.port, "SENDER")
        dataset = ct_dataset()
        assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
        assert wait_until(lambda: pacs.count() == 1, timeout=60), node.log()
        assert pydicom.dcmread(pacs.files()[0]).SOPInstanceUID == dataset.SOPInstanceUID
        assert node.stop() == 0, node.log()
    finally:
        node.kill()
        pacs.stop()
