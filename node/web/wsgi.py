"""HTTP requests and responses as the status page's WSGI application sees them, and the
headers every answer carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

MAX_BODY = 8192  # bytes of a form; the page's forms are a few hidden fields

# No script at all, styles and images from the node only, never framed (clickjacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'none';"
    " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # same-origin, not no-referrer: with no-referrer a browser posts forms with "Origin: null".
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


class BadRequest(Exception):
    """An answer other than success, with the sentence the caller sees."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    form: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Request:
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = str(environ["CONTENT_TYPE"])
        query = {k: v[0] for k, v in parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        request = cls(
            str(environ.get("REQUEST_METHOD", "GET")),
            str(environ.get("PATH_INFO", "/")),
            query,
            headers,
        )
        if request.method == "POST":
            request.form = read_form(environ)
        return request


@dataclass
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def html(cls, text: str, status: HTTPStatus = HTTPStatus.OK) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
        return cls(status, json.dumps(data).encode(), "application/json")

    @classmethod
    def redirect(cls, location: str, *headers: tuple[str, str]) -> Response:
        return cls(HTTPStatus.SEE_OTHER, headers=[("Location", location), *headers])

    def wsgi_headers(self) -> list[tuple[str, str]]:
        return [
            ("Content-Type", self.content_type),
            *SECURITY_HEADERS,
            *self.headers,
            ("Content-Length", str(len(self.body))),
        ]


def read_form(environ: Mapping[str, Any]) -> dict[str, str]:
    """A urlencoded form body of at most MAX_BODY bytes."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
    if length > MAX_BODY:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    body = environ["wsgi.input"].read(length) if length else b""
    kind = str(environ.get("CONTENT_TYPE", "")).split(";")[0].strip()
    if body and kind != "application/x-www-form-urlencoded":
        raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "forms only (urlencoded)")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
