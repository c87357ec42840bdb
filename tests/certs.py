"""Throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and a client certificate.

Generated with the openssl command line, as an operator would, into a temp folder.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_tool


@dataclass(frozen=True)
class Certificates:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def _signed(folder: Path, name: str, subject: str, extensions: str, ca: Path, ca_key: Path) -> None:
    key, csr, cert, ext = (folder / f"{name}{s}" for s in (".key", ".csr", ".crt", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", subject)  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert))  # fmt: skip


def make_certificates(folder: Path) -> Certificates:
    """A CA and two leaf certificates it signed (server: SAN 127.0.0.1 and localhost)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", "2", "-subj", "/CN=dicom-node test CA")  # fmt: skip
    _signed(
        folder,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ca,
        ca_key,
    )
    _signed(folder, "client", "/CN=STORESCU", "extendedKeyUsage=clientAuth\n", ca, ca_key)
    return Certificates(
        ca=ca,
        ca_key=ca_key,
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
    )
