"""The status page's HTTP application (WSGI): routes, the token, CSRF and the security headers.

Reading is open on loopback when no [web] token_file is set; with one, every request
but the stylesheet needs the token, as `Authorization: Bearer TOKEN` (scripts) or as
a session cookie got by posting the token to /login (browsers). Actions are POSTs,
only for a token holder; a browser's POST also carries a CSRF token tied to its
session (HMAC of the session id with a per-process secret) and must come from the
node's own origin. Sessions live in memory: a restart, or a new token in the file,
signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from node.web import overview, pages
from node.web.status import status_report
from node.web.view import NodeView

log = logging.getLogger("node.web")

COOKIE = "dicom_node_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
MAX_BODY = 8192
OVERVIEW_DEAD_LETTERS = 10

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
API_INDEX = {
    "/api/status": "what `dicom-node status --json` prints",
    "/api/overview": "now, destinations, storage, recent associations, extra panels",
    "/api/traffic": "instances and bytes per minute over the last hour",
    "/api/dead-letters?destination=NAME&page=N&per_page=N": "dead letters, newest first",
    "POST /api/destinations/NAME/retry": "re-queue a destination's dead letters (token)",
    "POST /api/panels/PANEL/ROW": "a panel's action on one row, e.g. release a group (token)",
}


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
        return cls(
            str(environ.get("REQUEST_METHOD", "GET")),
            str(environ.get("PATH_INFO", "/")),
            query,
            headers,
        )


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
    def redirect(cls, location: str) -> Response:
        return cls(HTTPStatus.SEE_OTHER, headers=[("Location", location)])


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    """Who sent a request: with the token (as a header or a session) or without."""

    authenticated: bool
    session: str | None = None  # the session id, when it came with the cookie


class Sessions:
    """Browser sessions: random ids, each tied to the token it was opened with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, str]] = {}

    def open(self, token_digest: str) -> str:
        session = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
            if len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=lambda k: self._sessions[k][0])]
            self._sessions[session] = (now + SESSION_SECONDS, token_digest)
        return session

    def valid(self, session: str, token_digest: str) -> bool:
        with self._lock:
            entry = self._sessions.get(session)
        return (
            entry is not None
            and entry[0] > time.time()
            and hmac.compare_digest(entry[1], token_digest)
        )

    def close(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _stylesheet() -> bytes:
    return resources.files("node.web").joinpath("static/style.css").read_bytes()


def _int(query: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(query.get(key, default))
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{key} must be a whole number") from None


Route = Callable[[Request, Caller], Response]


class WebApp:
    """The WSGI application: one per running node."""

    def __init__(self, view: NodeView, token_file: Path | None) -> None:
        self.view = view
        self.token_file = token_file
        self.sessions = Sessions()
        self._secret = secrets.token_bytes(32)
        self._style = _stylesheet()
        self.get_routes: dict[str, Route] = {
            "/": self.front_page,
            "/dead-letters": self.dead_letters_page,
            "/api": self.api_index,
            "/api/": self.api_index,
            "/api/status": lambda r, c: Response.json(
                status_report(self.view.config(), self.view.queue())
            ),
            "/api/overview": lambda r, c: Response.json(overview.overview(self.view)),
            "/api/traffic": lambda r, c: Response.json(overview.traffic(self.view)),
            "/api/dead-letters": self.api_dead_letters,
        }
        self.post_routes: dict[str, Route] = {
            "/logout": self.logout,
            "/actions/retry": self.retry_action,
            "/actions/panel": self.panel_action,
        }

    # WSGI

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        response = self.respond(environ)
        headers = [("Content-Type", response.content_type), *SECURITY_HEADERS, *response.headers]
        headers.append(("Content-Length", str(len(response.body))))
        start_response(f"{response.status.value} {response.status.phrase}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else response.body]

    def respond(self, environ: Mapping[str, Any]) -> Response:
        try:
            request = Request.from_environ(environ)
            if request.method == "POST":
                request.form = _read_form(environ)
            return self.handle(request)
        except BadRequest as exc:
            return self._error(exc.status, str(exc), environ)
        except Exception:
            log.exception(
                "status page: %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            return self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the node's log)", environ
            )

    def _error(self, status: HTTPStatus, message: str, environ: Mapping[str, Any]) -> Response:
        if str(environ.get("PATH_INFO", "")).startswith("/api"):
            return Response.json({"error": message}, status)
        return Response.html(pages.message_page(status.phrase, message, time.time()), status)

    def handle(self, request: Request) -> Response:
        if request.path == "/static/style.css":
            return Response(HTTPStatus.OK, self._style, "text/css; charset=utf-8")
        if request.path == "/favicon.ico":
            return Response(HTTPStatus.NO_CONTENT, content_type="image/x-icon")
        token = self._token()
        if request.method == "POST" and request.path == "/login":
            return self.login(request, token)
        caller = self._caller(request, token)
        if token is not None and not caller.authenticated:
            return self._unauthorized(request)
        if request.method in ("GET", "HEAD"):
            route = self.get_routes.get(request.path)
            if route is None:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no page {request.path}")
            return route(request, caller)
        if request.method == "POST":
            return self._post(request, caller, token)
        return Response(
            HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain", [("Allow", "GET, HEAD, POST")]
        )

    # Who is asking

    def _token(self) -> str | None:
        """The token, read from its file on each request (so that it can be rotated)."""
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            log.error(
                "status page: cannot read [web] token_file %s: %s", self.token_file, exc.strerror
            )
            raise BadRequest(
                HTTPStatus.SERVICE_UNAVAILABLE, "the token file cannot be read"
            ) from None
        if not token:
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the token file is empty")
        return token

    def _caller(self, request: Request, token: str | None) -> Caller:
        if token is None:
            return Caller(authenticated=False)
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            return Caller(authenticated=True)
        session = _cookie(request)
        if session and self.sessions.valid(session, _digest(token)):
            return Caller(authenticated=True, session=session)
        return Caller(authenticated=False)

    def _unauthorized(self, request: Request) -> Response:
        headers = [("WWW-Authenticate", 'Bearer realm="dicom-node"')]
        if request.path.startswith("/api"):
            response = Response.json({"error": "token required"}, HTTPStatus.UNAUTHORIZED)
        else:
            page = pages.login_page("This node's status page needs its token.", time.time())
            response = Response.html(page, HTTPStatus.UNAUTHORIZED)
        response.headers += headers
        return response

    def csrf_for(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def _viewer(self, caller: Caller, token: str | None) -> pages.Viewer:
        return pages.Viewer(
            can_act=token is not None and caller.authenticated,
            csrf=self.csrf_for(caller.session) if caller.session else "",
            signed_in=caller.session is not None,
            token_required=token is not None,
        )

    # Pages

    def front_page(self, request: Request, caller: Caller) -> Response:
        refresh = _int(request.query, "refresh", pages.REFRESH_SECONDS)
        data = overview.overview(self.view)
        page = pages.overview_page(
            data,
            overview.traffic(self.view, data["generated_at"]),
            overview.dead_letter_page(self.view, None, 1, OVERVIEW_DEAD_LETTERS),
            self._viewer(caller, self._token()),
            refresh if refresh > 0 else None,
        )
        return Response.html(page)

    def dead_letters_page(self, request: Request, caller: Caller) -> Response:
        page = overview.dead_letter_page(
            self.view,
            self._destination(request.query.get("destination") or None),
            _int(request.query, "page", 1),
            _int(request.query, "per_page", overview.DEAD_LETTERS_PER_PAGE),
        )
        viewer = self._viewer(caller, self._token())
        return Response.html(pages.dead_letters_page(page, viewer, time.time()))

    def api_index(self, request: Request, caller: Caller) -> Response:
        return Response.json(API_INDEX)

    def api_dead_letters(self, request: Request, caller: Caller) -> Response:
        return Response.json(
            overview.dead_letter_page(
                self.view,
                self._destination(request.query.get("destination") or None),
                _int(request.query, "page", 1),
                _int(request.query, "per_page", overview.DEAD_LETTERS_PER_PAGE),
            )
        )

    def _destination(self, name: str | None) -> str | None:
        if name is not None and name not in {d.name for d in self.view.config().destinations}:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no [[destination]] named {name!r}")
        return name

    # Actions

    def _post(self, request: Request, caller: Caller, token: str | None) -> Response:
        if token is None:
            raise BadRequest(
                HTTPStatus.FORBIDDEN,
                "actions need a token: set [web] token_file (or use `dicom-node queue`)",
            )
        if caller.session is not None:
            self._check_browser_post(request, caller.session)
        prefix, suffix = "/api/destinations/", "/retry"
        if request.path.startswith(prefix) and request.path.endswith(suffix):
            name = self._destination(request.path[len(prefix) : -len(suffix)])
            assert name is not None
            return Response.json({"destination": name, "retried": self._retry(name)})
        if request.path.startswith("/api/panels/"):
            panel, _, row = request.path[len("/api/panels/") :].partition("/")
            return Response.json({"panel": panel, "row": row, "result": self._act(panel, row)})
        route = self.post_routes.get(request.path)
        if route is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no action {request.path}")
        return route(request, caller)

    def _check_browser_post(self, request: Request, session: str) -> None:
        """A cookie-authenticated POST must come from our own page: same origin, and the
        CSRF token of its session in the form (or the X-CSRF-Token header)."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise BadRequest(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise BadRequest(HTTPStatus.FORBIDDEN, "cross-site request refused")
        presented = request.form.get("csrf") or request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(presented.encode(), self.csrf_for(session).encode()):
            raise BadRequest(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token: reload the page")

    def _retry(self, destination: str) -> int:
        count = self.view.retry_dead_letters(destination)
        log.info("status page: %d dead letters for %r queued again", count, destination)
        return count

    def retry_action(self, request: Request, caller: Caller) -> Response:
        name = self._destination(request.form.get("destination") or None)
        if name is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "which destination?")
        self._retry(name)
        return Response.redirect("/")

    def _act(self, panel: str, row: str) -> str:
        try:
            result = self.view.panel_action(panel, row)
        except KeyError:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no row {row!r} in {panel!r}") from None
        log.info("status page: %s %r: %s", panel, row, result)
        return result

    def panel_action(self, request: Request, caller: Caller) -> Response:
        self._act(request.form.get("panel", ""), request.form.get("row", ""))
        return Response.redirect("/")

    def login(self, request: Request, token: str | None) -> Response:
        if token is None:
            return Response.redirect("/")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"http://{request.headers.get('host', '')}":
            raise BadRequest(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        presented = request.form.get("token", "").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            log.warning("status page: wrong token from a sign-in")
            page = pages.login_page("Wrong token.", time.time())
            return Response.html(page, HTTPStatus.UNAUTHORIZED)
        session = self.sessions.open(_digest(token))
        cookie = f"{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}"
        return Response(HTTPStatus.SEE_OTHER, headers=[("Location", "/"), ("Set-Cookie", cookie)])

    def logout(self, request: Request, caller: Caller) -> Response:
        if caller.session is not None:
            self.sessions.close(caller.session)
        expired = f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        return Response(HTTPStatus.SEE_OTHER, headers=[("Location", "/"), ("Set-Cookie", expired)])


def _cookie(request: Request) -> str | None:
    try:
        morsel = SimpleCookie(request.headers.get("cookie", "")).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None and morsel.value else None


def _read_form(environ: Mapping[str, Any]) -> dict[str, str]:
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
