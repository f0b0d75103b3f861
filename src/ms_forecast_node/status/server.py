"""The status web server: stdlib ``ThreadingHTTPServer`` in a daemon thread.

No web framework on purpose: the node's attack surface and dependency list stay small, and
the page is read-only apart from the C-ECHO button. Requests are served one thread each; every
thread opens its own SQLite connection (the database's rule) and closes it when done.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.receive.ingest import valid_uid
from ms_forecast_node.status import images, pages, queries
from ms_forecast_node.status.auth import (
    COOKIE_NAME,
    authorized,
    cookie_value,
    host_allowed,
    is_loopback,
)
from ms_forecast_node.status.echoes import EchoBook, EchoFunction
from ms_forecast_node.store.database import Database

log = logging.getLogger(__name__)

#: Security headers on every response: no scripts, no framing, no caching of patient-related
#: pages, and no referrer to other sites (the URL may carry ``?token=``). "same-origin" rather
#: than "no-referrer": under the latter browsers send ``Origin: null`` on our own form POSTs,
#: which the cross-origin check must refuse.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_INDEX = re.compile(r"^[1-9][0-9]{0,2}\.png$")
_VERSION = re.compile(r"^[1-9][0-9]{0,5}$")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _html(status: int, text: str) -> Response:
    return Response(status, text.encode("utf-8"))


def _error(status: HTTPStatus, message: str) -> Response:
    return _html(status.value, pages.error_page(status.value, message))


class StatusApp:
    """Routing and page assembly, independent of the socket plumbing (tests call it too)."""

    def __init__(
        self, config: NodeConfig, db: Database, metrics: NodeMetrics, echoes: EchoBook
    ) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics
        self.echoes = echoes
        self.looks = _therapy_looks(config)

    def get(self, path: list[str], query: dict[str, list[str]]) -> Response:
        if path == []:
            return self._overview()
        if path == ["config"]:
            return _html(200, pages.config_page(self.config.redacted()))
        if path == ["metrics"]:
            queries.refresh_gauges(self.db, self.metrics)
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path[0] == "study" and len(path) >= 2:
            return self._study(path[1], path[2:], query)
        return _error(HTTPStatus.NOT_FOUND, "no such page")

    def post(self, path: list[str]) -> Response:
        if len(path) == 2 and path[0] == "echo":
            if path[1] not in self.config.destinations:
                return _error(HTTPStatus.NOT_FOUND, "no such destination")
            result = self.echoes.run(path[1])
            log.info("C-ECHO %s from the status page: %s", path[1], result.message)
            return Response(303, b"", headers=(("Location", "/#destinations"),))
        return _error(HTTPStatus.NOT_FOUND, "no such action")

    def _overview(self) -> Response:
        rows = [
            pages.DestinationRow(
                name, d.ae_title, d.host, d.port, d.tls.enabled, self.echoes.last(name)
            )
            for name, d in self.config.destinations.items()
        ]
        page = pages.overview_page(
            queries.overview(self.db),
            rows,
            queries.counts_by_label(self.metrics.instances_refused),
            queries.counts_by_label(self.metrics.failures),
        )
        return _html(200, page)

    def _study(self, uid: str, rest: list[str], query: dict[str, list[str]]) -> Response:
        # The UID is checked before any lookup: it later names a folder under storage.root.
        if not valid_uid(uid):
            return _error(HTTPStatus.BAD_REQUEST, "not a DICOM UID")
        version: int | None = None
        if "version" in query:
            text = query["version"][-1]
            if not _VERSION.match(text):
                return _error(HTTPStatus.BAD_REQUEST, "version must be a positive integer")
            version = int(text)
        result = queries.study_result(self.db, uid, version)
        if result is None:
            return _error(HTTPStatus.NOT_FOUND, "no such study")
        folder = (
            queries.output_dir(self.config, uid, int(result.job["version"]))
            if result.job is not None
            else None
        )
        if rest == []:
            counts: dict[str, int] = {}
            if folder is not None and result.summary is not None:
                for t in result.summary.get("therapies_ranked") or []:
                    code = str(t.get("therapy", ""))
                    counts[code] = len(images.key_image_files(folder, code))
            return _html(200, pages.study_page(result, self.looks, counts))
        if folder is None:
            return _error(HTTPStatus.NOT_FOUND, "no result for this study")
        if rest == ["montage.png"]:
            return self._file(images.montage_path(folder))
        if len(rest) == 3 and rest[0] == "key" and _INDEX.match(rest[2]):
            files = images.key_image_files(folder, rest[1])
            index = int(rest[2].removesuffix(".png"))
            if index > len(files):
                return _error(HTTPStatus.NOT_FOUND, "no such key image")
            try:
                return Response(200, images.png_bytes(files[index - 1]), "image/png")
            except Exception as exc:  # a damaged file is a 500 page, not a dead thread
                log.warning("key image %s unreadable: %s", files[index - 1], exc)
                return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "key image unreadable")
        return _error(HTTPStatus.NOT_FOUND, "no such page")

    def _file(self, path: Path) -> Response:
        try:
            return Response(200, path.read_bytes(), "image/png")
        except OSError:
            return _error(HTTPStatus.NOT_FOUND, "image not available")


def _therapy_looks(config: NodeConfig) -> dict[str, pages.TherapyLook]:
    """Labels and colours from the output templates; the page still works (codes, no
    swatches) when the templates cannot be read."""
    from ms_forecast_node.report.templates import load_templates

    try:
        templates = load_templates(config.processing.templates_dir)
    except Exception as exc:
        log.warning("status page: output templates unreadable (%s); therapy codes shown", exc)
        return {}
    looks = {}
    for code, spec in templates.codes.therapies.items():
        try:
            rgb: tuple[int, int, int] | None = templates.colour(code).as_rgb()
        except Exception:
            rgb = None
        looks[code] = pages.TherapyLook(spec.label, rgb)
    return looks


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: StatusApp
    token: str | None
    bind_address: str


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "ms-forecast-node-status"
    sys_version = ""
    timeout = 30  # a stalled client must not hold a thread forever

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def log_message(self, format: str, *args: Any) -> None:
        # Through logging instead of stderr, and never with the query string (it can hold the
        # token): the request line is rebuilt without it.
        log.debug(
            "status page %s %s from %s", self.command, self._path_only(), self.address_string()
        )

    def _path_only(self) -> str:
        return urlsplit(self.path).path

    def _send(self, response: Response, head_only: bool = False) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(response.body)

    def _gate(self, query: dict[str, list[str]]) -> Response | None:
        """The answer when the request may not proceed; ``None`` when it may."""
        server = self._server
        if not host_allowed(self.headers.get("Host"), server.bind_address, server.token):
            return _error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        given = query.get("token", [None])[-1]
        ok = authorized(
            server.token, self.headers.get("Authorization"), self.headers.get("Cookie"), given
        )
        if not ok:
            return Response(
                401,
                pages.error_page(401, "authentication required").encode("utf-8"),
                headers=(
                    ("WWW-Authenticate", 'Basic realm="ms-forecast-node", charset="UTF-8"'),
                    ("WWW-Authenticate", 'Bearer realm="ms-forecast-node"'),
                ),
            )
        return None

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        # Decoded per segment, so an encoded "/" stays inside its segment (and then fails the
        # UID check) instead of changing the route.
        path = [unquote(segment) for segment in parts.path.split("/") if segment]
        try:
            if method in ("GET", "HEAD") and path == ["healthz"]:
                # Unauthenticated on purpose: probes (systemd, Docker, load balancers) carry
                # no credentials, and the answer reveals nothing but "up".
                self._send(self._health(), head_only=method == "HEAD")
                return
            refusal = self._gate(query)
            if refusal is not None:
                self._send(refusal)
                return
            if method == "POST" and not self._same_origin():
                self._send(_error(HTTPStatus.FORBIDDEN, "cross-origin request refused"))
                return
            app = self._server.app
            response = app.get(path, query) if method in ("GET", "HEAD") else app.post(path)
            token = self._server.token
            if token is not None and "token" in query:
                # Remember a ?token= login so the page's images and forms need no token in
                # their URLs (which would spread it into the HTML).
                response = Response(
                    response.status,
                    response.body,
                    response.content_type,
                    (
                        *response.headers,
                        (
                            "Set-Cookie",
                            f"{COOKIE_NAME}={cookie_value(token)}; Path=/; HttpOnly; "
                            "SameSite=Strict",
                        ),
                    ),
                )
            self._send(response, head_only=method == "HEAD")
        except Exception:
            log.exception("status page error on %s %s", method, self._path_only())
            self._send(_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the log)"))
        finally:
            self._server.app.db.close()  # this thread's connection; the thread ends now

    def _same_origin(self) -> bool:
        """Browsers send Origin on POST, so a form on another site cannot trigger echoes
        (``Origin: null`` is refused too). Clients without Origin are not browsers, so not
        the cross-site threat; they still passed the token check."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        return urlsplit(origin).netloc == (self.headers.get("Host") or "")

    def _health(self) -> Response:
        try:
            self._server.app.db.query("SELECT 1")
        except Exception as exc:
            return Response(503, f"database unavailable: {exc}\n".encode(), "text/plain")
        return Response(200, b"ok\n", "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")


class StatusServer:
    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.bind_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout_s: float = 5.0) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout_s)


def start_status_server(
    config: NodeConfig,
    db: Database,
    metrics: NodeMetrics,
    destinations_echo: EchoFunction | None = None,
) -> StatusServer:
    """Serve the status page on ``status_page.bind_address:port`` (port 0: a free one).

    ``destinations_echo`` replaces :func:`ms_forecast_node.send.outbox.echo` (tests).
    """
    if destinations_echo is None:
        from ms_forecast_node.send.outbox import echo

        destinations_echo = echo
    settings = config.status_page
    if settings.token is None and not is_loopback(settings.bind_address):
        log.warning(
            "status page on %s without a token: anyone who can reach the port can read it",
            settings.bind_address,
        )
    server_class = _Server6 if ":" in settings.bind_address else _Server
    httpd = server_class((settings.bind_address, settings.port), _Handler)
    httpd.app = StatusApp(config, db, metrics, EchoBook(config, destinations_echo))
    httpd.token = settings.token
    httpd.bind_address = settings.bind_address
    thread = threading.Thread(
        # A short poll so stop() (which waits for the loop to notice) returns promptly.
        target=lambda: httpd.serve_forever(poll_interval=0.1),
        name="msfn-status",
        daemon=True,
    )
    thread.start()
    server = StatusServer(httpd, thread)
    log.info("status page on %s", server.url)
    return server
