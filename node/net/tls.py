"""DICOM TLS (PS3.15 B.1): SSL contexts for the listener and for destinations.

Both sides refuse anything older than TLS 1.2. The listener presents its
certificate and, with require_client_cert, refuses a peer without one signed
by the CA bundle. A destination's server certificate is always verified
against its CA bundle (or the system store) and must match the host name or
IP address the destination is configured with.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config.model import TLSConfig

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSSetupError(OSError):
    """A certificate, key or CA bundle that cannot be loaded (an OSError, like a missing file)."""


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do the TLS handshake on first use, not in accept().

    For the pynetdicom acceptor (node.acceptor = "pynetdicom"), which wraps each
    accepted socket in its single accept thread: with the default (handshake on
    connect) one client that connects and stays silent would block every other
    TLS connection. The handshake then runs in the connection's own thread,
    under the ACSE timeout, as our own acceptor (node.net.association) does.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):  # type: ignore[no-untyped-def, override]
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False, **kwargs
        )


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The listener's context: our certificate, and client checks per require_client_cert."""
    if tls.certificate is None or tls.private_key is None:
        raise TLSSetupError("TLS needs both a certificate and a private_key")
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(context, tls.certificate, tls.private_key)
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_bundle is not None:
        # A client certificate is checked if offered, but not demanded.
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: TLSConfig) -> ssl.SSLContext:
    """A destination's context: verify the server (CA bundle, host name); send our cert if set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key)
    elif tls.certificate is not None or tls.private_key is not None:
        raise TLSSetupError("a client certificate needs both certificate and private_key")
    return context


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"cannot load certificate {certificate} with private key {private_key}: {exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_bundle: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load CA bundle {ca_bundle}: {exc}") from None
