"""The status page's HTTP application (WSGI): which page or action each request gets.

Who may see and do what is node.web.auth's (the token, sessions, CSRF); the request,
response and security headers are node.web.wsgi's; the data is node.web.overview's and
the HTML node.web.pages'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

from node.web import overview, pages
from node.web.auth import Caller, Guard
from node.web.status import status_report
from node.web.view import NodeView
from node.web.wsgi import BadRequest, Request, Response

log = logging.getLogger("node.web")

OVERVIEW_DEAD_LETTERS = 10

API_INDEX = {
    "/api/status": "what `dicom-node status --json` prints",
    "/api/overview": "now, destinations, storage, recent associations, extra panels",
    "/api/traffic": "instances and bytes per minute over the last hour",
    "/api/dead-letters?destination=NAME&page=N&per_page=N": "dead letters, newest first",
    "POST /api/destinations/NAME/retry": "re-queue a destination's dead letters (token)",
    "POST /api/panels/PANEL/ROW": "a panel's action on one row, e.g. release a group (token)",
}


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
        self.guard = Guard(token_file)
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
        start_response(f"{response.status.value} {response.status.phrase}", response.wsgi_headers())
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else response.body]

    def respond(self, environ: Mapping[str, Any]) -> Response:
        try:
            return self.handle(Request.from_environ(environ))
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
        token = self.guard.token()
        if request.method == "POST" and request.path == "/login":
            return self.login(request, token)
        caller = self.guard.caller(request, token)
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

    def _unauthorized(self, request: Request) -> Response:
        headers = [("WWW-Authenticate", 'Bearer realm="dicom-node"')]
        if request.path.startswith("/api"):
            response = Response.json({"error": "token required"}, HTTPStatus.UNAUTHORIZED)
        else:
            page = pages.login_page("This node's status page needs its token.", time.time())
            response = Response.html(page, HTTPStatus.UNAUTHORIZED)
        response.headers += headers
        return response

    def _viewer(self, caller: Caller, token: str | None) -> pages.Viewer:
        return pages.Viewer(
            can_act=token is not None and caller.authenticated,
            csrf=self.guard.csrf_for(caller.session) if caller.session else "",
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
            self._viewer(caller, self.guard.token()),
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
        viewer = self._viewer(caller, self.guard.token())
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
        self.guard.check_browser_post(request, caller)
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
        cookie = self.guard.sign_in(request, token)
        if cookie is None:
            page = pages.login_page("Wrong token.", time.time())
            return Response.html(page, HTTPStatus.UNAUTHORIZED)
        return Response.redirect("/", ("Set-Cookie", cookie))

    def logout(self, request: Request, caller: Caller) -> Response:
        return Response.redirect("/", ("Set-Cookie", self.guard.sign_out(caller)))
