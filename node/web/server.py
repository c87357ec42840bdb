"""The status page's HTTP server: the standard library's WSGI server, one thread per
request, in a daemon thread of the node. A page is a few database reads; nothing
here can hold up receiving or forwarding (the reports run on the reader connection).
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from node.config.addresses import parse_web_address
from node.config.model import WebConfig
from node.web.app import WebApp
from node.web.view import NodeView

log = logging.getLogger("node.web")

REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Requests logged at DEBUG through the node's logging, not printed on stderr."""

    server_version = "dicom-node"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: %s %s", self.address_string(), format % args)


class WebServer:
    def __init__(self, config: WebConfig, view: NodeView) -> None:
        self.config = config
        self.app = WebApp(view, config.token_file)
        host, port = parse_web_address(config.address)
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            self.server = make_server(
                host, port, self.app, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve the status page on {config.address}: {exc.strerror}"
                " (change or empty [web] address)",
            ) from exc
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="web", kwargs={"poll_interval": 0.5}, daemon=True
        )

    @property
    def url(self) -> str:
        address, port = self.server.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()
        token = "with its token" if self.config.token_file else "read-only, no token"
        log.info("status page on %s (%s)", self.url, token)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_web(config: WebConfig, view: NodeView) -> WebServer | None:
    """Serve the status page if [web] address is set."""
    if not config.address:
        return None
    server = WebServer(config, view)
    server.start()
    return server
