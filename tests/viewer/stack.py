"""The pieces of the OHIF viewer check, each usable on its own.

* :func:`ensure_ohif_dist` — OHIF Viewer's prebuilt ``dist`` from the npm package ``@ohif/app``
  (``npm pack``, no build), cached under ``~/.cache/ms-forecast-node/ohif-<version>/``.
* :func:`ensure_puppeteer` — ``puppeteer-core`` installed with npm into the same cache, never
  into the repository.
* :class:`Orthanc` — Debian's Orthanc with the DICOMweb plugin as a subprocess of the test, on
  its own ports and storage in a temporary directory (the system service is never touched).
* :class:`ViewerProxy` — one origin that serves OHIF's files and forwards ``/dicom-web/`` to
  Orthanc, so the browser needs no CORS and OHIF runs exactly as deployed behind nginx.
* :func:`run_driver` — runs ``ohif_check.mjs`` (puppeteer-core + Debian chromium).

Anything missing raises :class:`ToolUnavailableError` with the reason; the test skips on it.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

OHIF_VERSION = "3.13.2"
#: puppeteer-core 24 still supports Node 18 (Debian bookworm's nodejs); 25 needs Node 22.
PUPPETEER_VERSION = "24.43.1"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "ohif_check.mjs"
APP_CONFIG = HERE / "app-config.js"
#: Where Debian's orthanc-dicomweb puts the plugin (the first is a symlink to the second).
DICOMWEB_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
)


class ToolUnavailableError(RuntimeError):
    """A tool or download the check needs is missing; the message is the skip reason."""


def cache_root() -> Path:
    """``$MSFN_CACHE_DIR`` or ``~/.cache/ms-forecast-node`` (downloads survive test runs)."""
    env = os.environ.get("MSFN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ms-forecast-node"


def free_port() -> int:
    """A port free right now on localhost (Orthanc needs a number in its configuration)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def which(name: str, *extra_dirs: str) -> str | None:
    """``shutil.which`` that also looks in ``extra_dirs`` (``/usr/sbin`` is not on every PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise ToolUnavailableError("npm is not installed (Debian: apt-get install nodejs npm)")
    return npm


def _run(cmd: Sequence[str], cwd: Path, what: str, timeout: float = 600) -> None:
    try:
        result = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        # npm retries an unreachable registry for minutes before it gives up.
        raise ToolUnavailableError(f"{what} took longer than {timeout} s") from None
    if result.returncode != 0:
        # Offline machines fail here: a skip with npm's reason, not an error in the test.
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise ToolUnavailableError(f"{what} failed ({' '.join(cmd)}): {tail}")


def ensure_ohif_dist(version: str = OHIF_VERSION) -> Path:
    """``package/dist`` of ``@ohif/app@version``: downloaded once with ``npm pack``."""
    target = cache_root() / f"ohif-{version}"
    dist = target / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = _npm()
    target.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and rename: a concurrent or interrupted run never sees a
    # half-extracted dist.
    with tempfile.TemporaryDirectory(dir=target, prefix="unpack-") as tmp_name:
        tmp = Path(tmp_name)
        _run([npm, "pack", f"@ohif/app@{version}", "--silent"], tmp, "npm pack")
        tarballs = list(tmp.glob("ohif-app-*.tgz"))
        if len(tarballs) != 1:
            raise ToolUnavailableError(f"npm pack @ohif/app@{version} left {tarballs} in {tmp}")
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            if hasattr(tarfile, "data_filter"):
                # The "data" filter refuses links and paths outside the destination.
                tar.extractall(tmp, members=members, filter="data")
            else:
                # Python before 3.11.4 (Debian 12's 3.11.2) has no extraction filters: accept
                # only plain files and folders inside package/dist.
                unsafe = [
                    m.name
                    for m in members
                    if not (m.isfile() or m.isdir()) or ".." in Path(m.name).parts
                ]
                if unsafe:
                    raise ToolUnavailableError(f"unsafe members in the OHIF package: {unsafe}")
                tar.extractall(tmp, members=members)
        if not (tmp / "package" / "dist" / "index.html").is_file():
            raise ToolUnavailableError(f"@ohif/app@{version} has no package/dist/index.html")
        with contextlib.suppress(OSError):  # another run finished first: keep its copy
            (tmp / "package" / "dist").rename(dist)
    return dist


def ensure_puppeteer(version: str = PUPPETEER_VERSION) -> Path:
    """The cache folder whose ``node_modules`` holds ``puppeteer-core@version``."""
    folder = cache_root() / "puppeteer"
    installed = folder / "node_modules" / "puppeteer-core" / "package.json"
    if installed.is_file() and json.loads(installed.read_text()).get("version") == version:
        return folder
    npm = _npm()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "package.json"
    if not manifest.is_file():
        manifest.write_text('{"name": "msfn-viewer-check", "private": true}\n')
    _run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", f"puppeteer-core@{version}"],
        folder,
        "npm install puppeteer-core",
    )
    return folder


def find_chromium() -> str:
    path = os.environ.get("MSFN_CHROMIUM") or which("chromium") or which("chromium-browser")
    if path is None:
        raise ToolUnavailableError("chromium is not installed (Debian: apt-get install chromium)")
    return path


def find_node() -> str:
    path = which("node") or which("nodejs")
    if path is None:
        raise ToolUnavailableError("node is not installed (Debian: apt-get install nodejs npm)")
    return path


# --------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------
def find_orthanc() -> tuple[str, str]:
    """(Orthanc executable, DICOMweb plugin)."""
    binary = which("Orthanc", "/usr/sbin", "/usr/bin")
    if binary is None:
        raise ToolUnavailableError("Orthanc is not installed (Debian: apt-get install orthanc)")
    for pattern in DICOMWEB_PLUGIN_GLOBS:
        plugins = sorted(glob.glob(pattern))
        if plugins:
            return binary, plugins[0]
    raise ToolUnavailableError(
        "Orthanc's DICOMweb plugin is missing (apt-get install orthanc-dicomweb)"
    )


class Orthanc:
    """Orthanc + DICOMweb as a child process with its own configuration, ports and storage."""

    def __init__(self, workdir: Path) -> None:
        self.binary, self.plugin = find_orthanc()
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    def configuration(self) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        return {
            "Name": "msfn-viewer-check",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.port,
            # Uploads go through REST; without the DICOM listener no second port can clash.
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # Our outputs keep their UIDs across study versions (report/uids.py).
            "OverwriteInstances": True,
            "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get_json("/system")
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no Orthanc log)"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def upload(self, files: Sequence[Path]) -> list[dict[str, Any]]:
        """``POST /instances`` of each DICOM file; Orthanc's answers."""
        answers = []
        for path in files:
            request = urllib.request.Request(
                self.url + "/instances",
                data=Path(path).read_bytes(),
                headers={"Content-Type": "application/dicom"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc refused {path}: {answer}")
            answers.append(answer)
        return answers

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Same-origin proxy
# --------------------------------------------------------------------------------------------
#: Headers that belong to one connection and must not be forwarded (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        # Orthanc compresses when asked; on localhost that only costs CPU on both sides.
        "accept-encoding",
    }
)
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
}


@dataclass
class ProxyLog:
    """What the browser asked for: (method, path, status), kept for failure messages."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.entries.append((method, path, status))

    def errors(self) -> list[tuple[str, str, int]]:
        with self.lock:
            return [e for e in self.entries if e[2] >= 400]

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for e in self.entries if e[1].startswith(prefix))


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: OHIF issues hundreds of small requests; every answer below carries
    # an exact Content-Length so connections can be reused.
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the ProxyLog keeps what matters; stderr noise would drown pytest's output

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_POST(self) -> None:
        self._dispatch(send_body=True)

    def _dispatch(self, send_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path.startswith("/dicom-web/") or path == "/dicom-web":
                status = self._forward(send_body)
            else:
                status = self._static(path, send_body)
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the browser gave up (navigation, cancelled prefetch)
        self.server.log.add(self.command, self.path, status)

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> int:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        # Cross-origin isolation lets cornerstone use SharedArrayBuffer, as OHIF's deployment
        # docs recommend; everything is same-origin, so nothing is blocked by it.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        return status

    def _static(self, path: str, send_body: bool) -> int:
        server = self.server
        if path == "/app-config.js":
            headers = {"Content-Type": "text/javascript", "Cache-Control": "no-store"}
            return self._send(200, server.app_config, headers, send_body)
        relative = urllib.parse.unquote(path).lstrip("/")
        candidate = (server.dist / relative).resolve()
        if not candidate.is_relative_to(server.dist) or not candidate.is_file():
            # SPA routes (/viewer, /segmentation, ...) have no file: OHIF's router handles them
            # in index.html (dist/_redirects says the same for Netlify). Missing assets 404.
            if "." in Path(relative).name:
                return self._send(404, b"not found", {"Content-Type": "text/plain"}, send_body)
            candidate = server.dist / "index.html"
        content_type = _TYPES.get(candidate.suffix) or (
            mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        )
        headers = {"Content-Type": content_type}
        if candidate.name != "index.html":
            # The bundles are immutable within one OHIF version: cached (and their compiled
            # code with them), every page after the first starts seconds sooner. DICOMweb
            # answers are never cached here, so each page really loads the study.
            headers["Cache-Control"] = "public, max-age=3600"
        body = candidate.read_bytes()
        return self._send(200, body, headers, send_body)

    def _forward(self, send_body: bool) -> int:
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else None
        # The Host header is kept: Orthanc builds BulkDataURIs from it, which then point back
        # at this proxy (same origin) rather than at Orthanc's own port.
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        connection = http.client.HTTPConnection("127.0.0.1", server.orthanc_port, timeout=120)
        try:
            connection.request(self.command, self.path, body=payload, headers=headers)
            response = connection.getresponse()
            body = response.read()  # also de-chunks; instances here are at most ~25 MB
            out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
        except OSError as exc:
            message = f"Orthanc unreachable: {exc}".encode()
            return self._send(502, message, {"Content-Type": "text/plain"}, send_body)
        finally:
            connection.close()
        return self._send(response.status, body, out, send_body)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck browser connection must not block shutdown

    def __init__(self, dist: Path, app_config: bytes, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.app_config = app_config
        self.orthanc_port = orthanc_port
        self.log = ProxyLog()


class ViewerProxy:
    """OHIF's files and Orthanc's DICOMweb on one origin, served from a background thread."""

    def __init__(self, dist: Path, orthanc_port: int, app_config: Path = APP_CONFIG) -> None:
        self._server = _ProxyServer(dist, app_config.read_bytes(), orthanc_port)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ohif-proxy", daemon=True
        )

    @property
    def log(self) -> ProxyLog:
        return self._server.log

    def __enter__(self) -> ViewerProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# Browser driver
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewerTarget:
    """One SEG to open: the page opens its study with the SEG series as initial series.

    ``world_point`` (LPS mm, optional) is where the driver pages the viewport to before its
    screenshots, e.g. a forecast lesion's centroid; without it the viewer's own slice stays.
    """

    name: str
    study_instance_uid: str
    seg_series_instance_uid: str
    expected_labels: tuple[str, ...]
    world_point: tuple[float, float, float] | None = None


def run_driver(
    base_url: str,
    targets: Sequence[ViewerTarget],
    out_dir: Path,
    *,
    puppeteer_dir: Path,
    chromium: str,
    timeout_s: float = 480.0,
) -> dict[str, Any]:
    """Run ``ohif_check.mjs`` once for all targets; its JSON report.

    One browser visits every target in turn (a fresh page each), which saves the browser
    start per SEG; screenshots land in ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "baseUrl": base_url,
        "outDir": str(out_dir),
        "puppeteerDir": str(puppeteer_dir),
        "chromium": chromium,
        "targets": [
            {
                "name": t.name,
                "studyInstanceUID": t.study_instance_uid,
                "segSeriesInstanceUID": t.seg_series_instance_uid,
                "expectedLabels": list(t.expected_labels),
                "worldPoint": list(t.world_point) if t.world_point is not None else None,
            }
            for t in targets
        ],
    }
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    # Own process group: on a timeout the whole group goes, chromium included (puppeteer's
    # browser is node's child and would otherwise outlive a killed node).
    process = subprocess.Popen(
        [find_node(), str(DRIVER), str(job_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise RuntimeError(
            f"ohif_check.mjs ran longer than {timeout_s} s:\n{stderr[-3000:]}"
        ) from None
    (out_dir / "driver.stderr.txt").write_text(stderr)
    report_path = out_dir / "report.json"
    if process.returncode != 0 or not report_path.is_file():
        raise RuntimeError(
            f"ohif_check.mjs failed (exit {process.returncode}):\n"
            f"{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


@contextlib.contextmanager
def viewer_stack(workdir: Path) -> Iterator[tuple[Orthanc, ViewerProxy]]:
    """Orthanc and the proxy in front of it, both stopped on exit."""
    dist = ensure_ohif_dist()
    with Orthanc(workdir / "orthanc") as orthanc, ViewerProxy(dist, orthanc.port) as proxy:
        yield orthanc, proxy


def http_get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """Status and body of a GET (errors included), for the test's own probes."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
