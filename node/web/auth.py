"""Who may read and act on the status page: the token, browser sessions and CSRF.

With no [web] token_file, nobody is authenticated and nobody may act (reading is
open: the address is on loopback). With one, a request carries the token as
`Authorization: Bearer TOKEN` (scripts) or comes with a session cookie, got by posting
the token to /login (browsers). The file is read at each request, so a new token
takes effect at once and signs every session out (a session remembers the digest of
the token it was opened with). A browser's POST must also carry its session's CSRF
token (HMAC of the session id with a per-process secret) and come from the node's own
origin; a bearer request needs neither, since a browser never sends that header itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

from node.web.wsgi import BadRequest, Request

log = logging.getLogger("node.web")

COOKIE = "dicom_node_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class Caller:
    """Who sent a request: with the token (as a header or a session) or without."""

    authenticated: bool
    session: str | None = None  # the session id, when it came with the cookie


class Sessions:
    """Browser sessions in memory: random ids, each tied to the token it was opened with."""

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


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def _session_cookie(request: Request) -> str | None:
    try:
        morsel = SimpleCookie(request.headers.get("cookie", "")).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None and morsel.value else None


class Guard:
    """The token file, the sessions and the CSRF secret of one running status page."""

    def __init__(self, token_file: Path | None) -> None:
        self.token_file = token_file
        self.sessions = Sessions()
        self._secret = secrets.token_bytes(32)

    def token(self) -> str | None:
        """The token, read from its file now; None when no token_file is configured."""
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

    def caller(self, request: Request, token: str | None) -> Caller:
        if token is None:
            return Caller(authenticated=False)
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(presented.strip(), token):
            return Caller(authenticated=True)
        session = _session_cookie(request)
        if session and self.sessions.valid(session, _digest(token)):
            return Caller(authenticated=True, session=session)
        return Caller(authenticated=False)

    def csrf_for(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def check_same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise BadRequest(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise BadRequest(HTTPStatus.FORBIDDEN, "cross-site request refused")

    def check_browser_post(self, request: Request, caller: Caller) -> None:
        """A cookie-authenticated POST must come from our own page: same origin, and the
        CSRF token of its session in the form (or the X-CSRF-Token header)."""
        if caller.session is None:
            return  # the bearer token: not something a browser sends on its own
        self.check_same_origin(request)
        presented = request.form.get("csrf") or request.headers.get("x-csrf-token", "")
        if not _same(presented, self.csrf_for(caller.session)):
            raise BadRequest(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token: reload the page")

    def sign_in(self, request: Request, token: str) -> str | None:
        """The Set-Cookie value of a new session, or None for a wrong token."""
        self.check_same_origin(request)
        if not _same(request.form.get("token", "").strip(), token):
            log.warning("status page: wrong token from a sign-in")
            return None
        session = self.sessions.open(_digest(token))
        return f"{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}"

    def sign_out(self, caller: Caller) -> str:
        """The Set-Cookie value that removes the session cookie."""
        if caller.session is not None:
            self.sessions.close(caller.session)
        return f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
