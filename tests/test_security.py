"""Security: DICOM TLS against DCMTK, association admission and limits, silent and hostile sockets.

Every test runs the node as a subprocess on free loopback ports and talks to it
with DCMTK, pynetdicom or raw sockets, as a peer on the network would.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import PropertyMock, patch

import pydicom
import pytest
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from tests.certs import Certificates, make_certificates
from tests.conftest import StartNode
from tests.corpus import CT_SMALL, MR_SMALL
from tests.foundation_helpers import associate as pynetdicom_association
from tests.support import (
    NodeProcess,
    base_config,
    free_port,
    require_tool,
    storescu,
    wait_for_port,
    wait_until,
    write_config,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "archive").rglob("*.dcm"))


def tls_section(certs: Certificates, port: int, require_client_cert: bool) -> dict[str, object]:
    return {
        "tls": {
            "enabled": True,
            "certificate": str(certs.server_cert),
            "private_key": str(certs.server_key),
            "ca_bundle": str(certs.ca),
            "require_client_cert": require_client_cert,
            "port": port,
        }
    }


def client_tls_args(certs: Certificates) -> tuple[str, ...]:
    """storescu options for TLS with the client certificate, trusting the test CA."""
    return ("+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca))


# --- TLS ---------------------------------------------------------------------------------------


def start_tls_node(
    start_node: StartNode, tmp_path: Path, certs: Certificates
) -> tuple[NodeProcess, int, int]:
    """A node with a plain and a TLS listener that requires client certificates."""
    port, tls_port = free_port(), free_port()
    sections = base_config(tmp_path, port)
    sections["security"] = tls_section(certs, tls_port, require_client_cert=True)
    node = start_node(config=sections)
    wait_for_port(tls_port)
    return node, port, tls_port


def test_tls_store_with_client_certificate_and_plain_tcp_refused(
    start_node: StartNode, tmp_path: Path, certs: Certificates
) -> None:
    node, port, tls_port = start_tls_node(start_node, tmp_path, certs)
    silent = [socket.create_connection(("127.0.0.1", tls_port)) for _ in range(20)]
    try:
        # Silent sockets on the TLS port do not hold up the handshake of a real client.
        secure = storescu(tls_port, [CT_SMALL], *client_tls_args(certs))
        assert secure.returncode == 0, secure.stderr + node.log()
        assert wait_until(lambda: len(stored_files(tmp_path)) == 1, timeout=15)

        plain_on_tls_port = storescu(tls_port, [MR_SMALL], timeout=60)
        assert plain_on_tls_port.returncode != 0
        # The plain listener still serves beside the TLS one.
        plain = storescu(port, [MR_SMALL])
        assert plain.returncode == 0, plain.stderr
        assert wait_until(lambda: len(stored_files(tmp_path)) == 2, timeout=15)
        assert "TLS handshake with 127.0.0.1" in node.log()
    finally:
        for sock in silent:
            sock.close()
        assert node.stop() == 0, node.log()


def test_tls_client_without_certificate_is_refused(
    start_node: StartNode, tmp_path: Path, certs: Certificates
) -> None:
    node, _, tls_port = start_tls_node(start_node, tmp_path, certs)
    try:
        anonymous = storescu(tls_port, [CT_SMALL], "+tla", "+cf", str(certs.ca), timeout=60)
        assert anonymous.returncode != 0
        time.sleep(1.0)
        assert stored_files(tmp_path) == []
        assert "TLS handshake with 127.0.0.1" in node.log()
        # The same client with its certificate gets in: the refusal was about the certificate.
        with_cert = storescu(tls_port, [CT_SMALL], *client_tls_args(certs))
        assert with_cert.returncode == 0, with_cert.stderr + node.log()
    finally:
        assert node.stop() == 0, node.log()


def test_tls_only_node_leaves_the_plain_port_closed(tmp_path: Path, certs: Certificates) -> None:
    plain_port, tls_port = free_port(), free_port()
    sections = base_config(tmp_path, plain_port)
    sections["security"] = tls_section(certs, tls_port, require_client_cert=False)
    sections["security"]["tls"]["plain_listener"] = False  # type: ignore[index]
    config = write_config(tmp_path / "config.toml", sections)
    with NodeProcess(config, tls_port) as node:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=5)
        # No client certificate needed here; the server is still verified against the CA.
        sent = storescu(tls_port, [CT_SMALL], "+tla", "+cf", str(certs.ca))
        assert sent.returncode == 0, sent.stderr + node.log()
        assert wait_until(lambda: len(stored_files(tmp_path)) == 1, timeout=15)
        assert "without TLS" not in node.log()


def test_forward_over_tls_to_storescp(
    start_node: StartNode, tmp_path: Path, certs: Certificates
) -> None:
    storescp = require_tool("storescp")
    port, remote_port = free_port(), free_port()
    received = tmp_path / "remote"
    received.mkdir()
    remote = subprocess.Popen(
        [
            storescp,
            "--aetitle",
            "REMOTE",
            "-od",
            str(received),
            "+tls",
            str(certs.server_key),
            str(certs.server_cert),
            "+cf",
            str(certs.ca),
            str(remote_port),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sections = base_config(tmp_path, port)
    sections["destination"] = [
        {
            "name": "remote",
            "ae_title": "REMOTE",
            "host": "127.0.0.1",
            "port": remote_port,
            "tls": {
                "enabled": True,
                "certificate": str(certs.client_cert),
                "private_key": str(certs.client_key),
                "ca_bundle": str(certs.ca),
            },
        }
    ]
    sections["route"] = [{"match": {"Modality": "*"}, "destinations": ["remote"]}]
    try:
        wait_for_port(remote_port)
        node = start_node(config=sections)
        try:
            sent = storescu(port, [CT_SMALL])
            assert sent.returncode == 0, sent.stderr
            assert wait_until(lambda: list(received.iterdir()), timeout=30), node.log()
            copy = pydicom.dcmread(next(received.iterdir()))
            assert copy.SOPInstanceUID == pydicom.dcmread(CT_SMALL).SOPInstanceUID
        finally:
            assert node.stop() == 0, node.log()
    finally:
        remote.kill()
        remote.wait(10)


# --- admission ---------------------------------------------------------------------------------


def associate(port: int, calling: str) -> Association:
    """Verification only; a rejection is known within 10 s, an idle one lives 60 s."""
    echo = [(Verification, DEFAULT_TRANSFER_SYNTAXES)]
    return pynetdicom_association(port, echo, calling=calling, acse_timeout=10, timeout=60)


def rejection(assoc: object) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive  # type: ignore[attr-defined]
    return (primitive.result, primitive.result_source, primitive.diagnostic)


def test_unknown_calling_ae_is_refused_logged_and_counted(
    start_node: StartNode, tmp_path: Path
) -> None:
    metrics_port = free_port()
    sections = {
        "security": {"allowed_calling_aets": ["GOODSCU"]},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
    }
    node = start_node(lambda config: config.update(sections))
    port = node.port
    try:
        refused = storescu(port, [CT_SMALL], aet="EVILSCU")
        assert refused.returncode != 0
        assoc = associate(port, "EVILSCU")
        assert assoc.is_rejected  # type: ignore[attr-defined]
        assert rejection(assoc) == (0x01, 0x01, 0x03)
        allowed = storescu(port, [CT_SMALL], aet="GOODSCU")
        assert allowed.returncode == 0, allowed.stderr
        assert wait_until(lambda: len(stored_files(tmp_path)) == 1, timeout=15)
        log = node.log()
        assert log.count("refused association from 127.0.0.1 calling AE 'EVILSCU'") == 2, log
        assert "not in security.allowed_calling_aets" in log
        assert rejected_count(metrics_port, "calling_ae_not_allowed") == 2.0
    finally:
        assert node.stop() == 0, node.log()


def rejected_count(metrics_port: int, reason: str) -> float:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = f'dicom_node_associations_rejected_total{{reason="{reason}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


def test_association_limits_total_and_per_calling_ae(start_node: StartNode, tmp_path: Path) -> None:
    port = free_port()
    sections = base_config(tmp_path, port, max_associations=2)
    sections["security"] = {"max_associations_per_calling_aet": 1}
    node = start_node(config=sections)
    held: list[object] = []
    try:
        held.append(associate(port, "FIRST"))
        assert held[0].is_established  # type: ignore[attr-defined]
        second_from_first = associate(port, "FIRST")
        assert second_from_first.is_rejected  # type: ignore[attr-defined]
        assert rejection(second_from_first) == (0x02, 0x03, 0x02)

        held.append(associate(port, "SECOND"))
        assert held[1].is_established  # type: ignore[attr-defined]
        third = associate(port, "THIRD")
        assert third.is_rejected  # type: ignore[attr-defined]
        assert rejection(third) == (0x02, 0x03, 0x02)

        held.pop(0).release()  # type: ignore[attr-defined]
        assert wait_until(lambda: _established(associate(port, "THIRD")), timeout=10)
        log = node.log()
        assert "security.max_associations_per_calling_aet=1" in log
        assert "node.max_associations=2" in log
    finally:
        for assoc in held:
            assoc.release()  # type: ignore[attr-defined]
        assert node.stop() == 0, node.log()


def _established(assoc: object) -> bool:
    ok = bool(assoc.is_established)  # type: ignore[attr-defined]
    if ok:
        assoc.release()  # type: ignore[attr-defined]
    return ok


# --- silent, slow and hostile sockets ----------------------------------------------------------


def closed_after(sock: socket.socket, start: float, limit: float = 15.0) -> float:
    """Seconds from `start` until the server closes `sock` (EOF or reset); inf after `limit`."""
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - start


def associate_rq_header(length: int) -> bytes:
    return struct.pack(">BBL", 0x01, 0x00, length)


def test_silent_and_partial_pdu_sockets_are_dropped_after_the_timeout(
    start_node: StartNode, tmp_path: Path
) -> None:
    port = free_port()
    sections = base_config(tmp_path, port, acse_timeout=2.0, network_timeout=3.0)
    node = start_node(config=sections)
    try:
        start = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(associate_rq_header(500) + b"\x00\x01" + b"\x00" * 20)
        silent_for = closed_after(silent, start)
        partial_for = closed_after(partial, start)
        # Silent: dropped by the lobby at acse_timeout. Partial PDU: by the network timeout.
        assert 1.5 <= silent_for <= 2.0 + 3.0, silent_for
        assert 2.0 <= partial_for <= 3.0 + 3.0, partial_for
        assert node.alive()
        assert storescu(port, [CT_SMALL]).returncode == 0
    finally:
        assert node.stop() == 0, node.log()


def garbage_bursts(port: int, count: int, seed: int = 6) -> None:
    rng = random.Random(seed)
    for index in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if index % 3 == 0:  # a PDU header that claims 4 GB, then a trickle
                payload = associate_rq_header(0xFFFFFFF0) + rng.randbytes(100)
            elif index % 3 == 1:  # an unknown PDU type
                payload = bytes([rng.randrange(8, 256)]) + rng.randbytes(rng.randrange(1, 2000))
            else:  # a P-DATA-TF before any association
                payload = struct.pack(">BBL", 0x04, 0, 50) + rng.randbytes(50)
            with contextlib.suppress(OSError):
                sock.sendall(payload)


def rss_kib(pid: int) -> int:
    """VmRSS of a process and its children (codec workers), in KiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@pytest.fixture
def flood_sockets() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def test_flood_of_silent_sockets_and_garbage_leaves_the_node_serving(
    start_node: StartNode, tmp_path: Path, flood_sockets: list[socket.socket]
) -> None:
    port = free_port()
    # A long ACSE timeout: the legitimate peer must get in while the flood is still open.
    sections = base_config(tmp_path, port, max_associations=8, acse_timeout=60.0)
    node = start_node(config=sections)
    try:
        time.sleep(0.5)
        rss_before = rss_kib(node.pid)
        for _ in range(200):
            flood_sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        garbage_bursts(port, 30)
        time.sleep(1.0)
        rss_flood = rss_kib(node.pid)

        started = time.monotonic()
        sent = storescu(port, [CT_SMALL], timeout=30)
        served_in = time.monotonic() - started
        assert sent.returncode == 0, sent.stderr + node.log()[-3000:]
        assert served_in < 10.0, served_in
        assert wait_until(lambda: len(stored_files(tmp_path)) == 1, timeout=15)
        rss_after = rss_kib(node.pid)
        print(
            f"\nRSS KiB before flood {rss_before}, during 200 silent sockets + 30 garbage"
            f" bursts {rss_flood}, after a store during the flood {rss_after};"
            f" store served in {served_in:.2f} s"
        )
        assert rss_flood - rss_before < 64 * 1024, (rss_before, rss_flood)
        # Every silent socket is still open: the peer was served during the flood, not after.
        assert all(sock.fileno() >= 0 for sock in flood_sockets)
        flood_sockets[0].settimeout(0.1)
        with pytest.raises(TimeoutError):
            flood_sockets[0].recv(1)
        assert node.alive()
    finally:
        assert node.stop() == 0, node.log()


# --- receive limits ----------------------------------------------------------------------------


def padded_ct(size: int) -> pydicom.Dataset:
    """CT_small with a private element that makes its dataset about `size` bytes larger."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.add_new(0x00091010, "OB", b"\0" * size)
    return ds


def storage_association(port: int) -> Association:
    ct = [(pydicom.dcmread(CT_SMALL).SOPClassUID, ["1.2.840.10008.1.2.1"])]
    return pynetdicom_association(port, ct, calling="BIGSCU", acse_timeout=30, timeout=60)


def test_oversized_pdus_and_messages_are_cut_off_while_receiving(
    start_node: StartNode, tmp_path: Path
) -> None:
    port = free_port()
    sections = base_config(tmp_path, port, max_pdu=16384, network_timeout=60.0)
    sections["limits"] = {"min_free_space": 0, "max_instance_size": 100_000}
    node = start_node(config=sections)
    try:
        # A header claiming a 2 MB A-ASSOCIATE-RQ: dropped at once, not after the network timeout.
        start = time.monotonic()
        claim = socket.create_connection(("127.0.0.1", port))
        claim.sendall(associate_rq_header(2 * 1024 * 1024) + b"\0" * 100)
        assert closed_after(claim, start) < 5.0

        # One P-DATA PDU far over the advertised 16 KiB: the association is dropped.
        assoc = storage_association(port)
        acceptor = type(assoc.acceptor)  # type: ignore[attr-defined]
        # Ignore the maximum the node advertised: send the dataset in one PDU.
        with patch.object(acceptor, "maximum_length", new_callable=PropertyMock, return_value=0):
            status = assoc.send_c_store(padded_ct(60_000))  # type: ignore[attr-defined]
        assert "Status" not in status
        assert wait_until(lambda: assoc.is_aborted, timeout=10)  # type: ignore[attr-defined]

        # Well-fragmented, but a dataset past twice max_instance_size: cut off mid-transfer.
        assoc = storage_association(port)
        status = assoc.send_c_store(padded_ct(300_000))  # type: ignore[attr-defined]
        assert "Status" not in status
        assert wait_until(lambda: assoc.is_aborted, timeout=10)  # type: ignore[attr-defined]

        # Over the limit but under twice it: received and refused with a status that says why.
        assoc = storage_association(port)
        status = assoc.send_c_store(padded_ct(120_000))  # type: ignore[attr-defined]
        assert status.Status == 0xA700
        # Within the limits: stored.
        assert assoc.send_c_store(padded_ct(10_000)).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        log = node.log()
        assert "claims 2097152 bytes (limit 1048576)" in log
        assert "(limit 17408)" in log
        assert "(twice limits.max_instance_size: 200000)" in log
        assert wait_until(lambda: len(stored_files(tmp_path)) == 1, timeout=15)
    finally:
        assert node.stop() == 0, node.log()


def test_tls_settings_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    from node.config.model import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"security\.tls\.plain_listener: false needs enabled"):
        parse_config({"security": {"tls": {"plain_listener": False}}}, tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"security\.tls\.certificate: TLS is enabled"):
        parse_config({"security": {"tls": {"enabled": True}}}, tmp_path / "c.toml")
