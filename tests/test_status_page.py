"""The status page, metrics, JSON logs and retention.

Fast tests run the server on a database seeded by hand; the slow ones run a real node on a
simulated study, read /metrics and load the result view in headless Chromium (driven over the
DevTools protocol on a pipe, so no extra Python package is needed), checking the screenshot's
pixels: the montage shows overlays and each therapy's key images show its own colour.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import math
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ms_forecast_node.anatomy.locations import LocationClass
from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.forecast.result import ForecastLesion, ForecastResult
from ms_forecast_node.image.preprocess import PreprocessedStudy
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.node import Node, pipeline_settings
from ms_forecast_node.pipeline.run import ForecastPipeline
from ms_forecast_node.status import StatusServer, queries, start_status_server
from ms_forecast_node.status.jsonlog import JsonFormatter, install_json_logging
from ms_forecast_node.status.retention import apply_retention, plan_retention
from ms_forecast_node.store.database import Database, InstanceRecord

from .node_helpers import Receiver, node_config, storescu, wait_for

TOKEN = "s3cret-t0ken"
DISCLAIMER = "RESEARCH FORECAST — NOT FOR DIAGNOSTIC USE"
REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0
THERAPIES = ("natalizumab", "fingolimod", "placebo")


# ----------------------------------------------------------------------------- helpers


def fetch(
    server: StatusServer,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw request: the path is sent exactly as given (no client-side normalisation)."""
    con = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        con.request(method, path, headers=headers or {})
        response = con.getresponse()
        body = response.read()
        received: dict[str, str] = {}
        for name, value in response.getheaders():  # repeated headers joined, as HTTP allows
            key = name.lower()
            received[key] = f"{received[key]}, {value}" if key in received else value
        return response.status, received, body
    finally:
        con.close()


def png_pixels(data: bytes) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    if image.dtype != np.uint8:
        image = np.round(image * 255).astype(np.uint8)
    return image[..., :3]


def write_png(path: Path, rgb: np.ndarray) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, rgb, format="png")


def fake_summary(uid: str) -> dict[str, Any]:
    ranked = [
        {
            "rank": i + 1,
            "therapy": code,
            "expected_net2_count": 0.5 * (i + 1),
            "count_median": i,
            "count_interval_90": [0, i + 2],
            "probability_of_activity": 0.2 * (i + 1),
            "volume_mm3_mean": 10.0 * (i + 1),
            "forecast_mask_lesions_native": i,
            "forecast_mask_voxels_native": 10 * i,
        }
        for i, code in enumerate(THERAPIES)
    ]
    return {
        "study_instance_uid": uid,
        "model": {"name": "msfn-net2-diffusion", "version": "0.1.0"},
        "horizon_weeks": 48.0,
        "sampler": {"steps": 2, "samples": 2},
        "therapies_ranked": ranked,
    }


def seed_study(
    config: NodeConfig,
    db: Database,
    uid: str,
    *,
    at: float,
    job_state: str = "done",
    outbox: tuple[str, ...] = ("sent", "sent"),
    reason: str | None = None,
    message: str | None = None,
    n_instances: int = 3,
) -> None:
    """A study as the node leaves it: instance files and rows, a version, a job with its
    summary and stage timings, outbox rows and the derived folder."""
    root = config.storage.root
    for i in range(n_instances):
        sop = f"{uid}.{i + 1}"
        path = root / "instances" / uid / f"{uid}.0" / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * (100 + i))
        db.add_instance(
            InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.4", uid, f"{uid}.0", "P1", "MR",
                           str(path), 100 + i, "STORESCU", "127.0.0.1"),
            now=at,
        )  # fmt: skip
    out = queries.output_dir(config, uid, 1)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (out / "dicom" / f"seg_x_{i:03d}.dcm").write_bytes(b"\1" * 50)
    (out / "summary.json").write_text(json.dumps(fake_summary(uid)))
    image = np.full((60, 90, 3), 90, np.uint8)
    image[20:30, 20:30] = (213, 94, 0)  # an "overlay" in placebo's colour
    write_png(out / "summary.png", image)
    with db.transaction() as con:
        con.execute("UPDATE studies SET dirty = 0, latest_version = 1 WHERE study_uid = ?", (uid,))
        con.execute("INSERT INTO study_versions VALUES (?, 1, 'h', ?, ?)", (uid, n_instances, at))
        cur = con.execute(
            "INSERT INTO jobs (study_uid, version, state, reason, message, calling_ae, "
            "destination, runs, created_at, updated_at, stages, summary) "
            "VALUES (?, 1, ?, ?, ?, 'STORESCU', 'results', 1, ?, ?, ?, ?)",
            (
                uid,
                job_state,
                reason,
                message,
                at,
                at,
                json.dumps({"load_s": 1.5, "forecast_s": 42.0, "total_s": 61.0}),
                json.dumps(fake_summary(uid)),
            ),
        )
        job_id = cur.lastrowid
        for i, state in enumerate(outbox):
            con.execute(
                "INSERT INTO outbox (job_id, sop_instance_uid, sop_class_uid, path, destination, "
                "state, attempts, next_attempt_at, last_error, sent_at) "
                "VALUES (?, ?, '1.2.840.10008.5.1.4.1.1.66.4', ?, 'results', ?, 1, ?, ?, ?)",
                (
                    job_id,
                    f"{uid}.9{i}",
                    str(out / "dicom" / f"seg_x_{i:03d}.dcm"),
                    state,
                    at,
                    "<b>association refused</b>" if state == "dead" else None,
                    at if state == "sent" else None,
                ),
            )


def echo_ok(config: NodeConfig, destination: Any) -> tuple[bool, str]:
    return True, f"C-ECHO success ({destination.ae_title})"


@pytest.fixture()
def seeded(tmp_path: Path) -> Iterator[tuple[NodeConfig, Database]]:
    config = node_config(tmp_path / "node", 11112, status_page={"port": 0, "token": None})
    db = Database(config.storage.database_path)
    now = time.time()
    seed_study(config, db, "1.2.3.1", at=now)
    seed_study(
        config,
        db,
        "1.2.3.2",
        at=now,
        job_state="failed",
        outbox=("dead",),
        reason="registration_quality_failed",
        message="<script>alert('x')</script> mutual information too low",
    )
    yield config, db
    db.close()


@pytest.fixture()
def server(seeded: tuple[NodeConfig, Database]) -> Iterator[StatusServer]:
    config, db = seeded
    s = start_status_server(config, db, NodeMetrics(), echo_ok)
    yield s
    s.stop()


def _with_token(config: NodeConfig) -> NodeConfig:
    return config.model_copy(update={"status_page": config.status_page.model_copy(
        update={"token": TOKEN})})  # fmt: skip


# ----------------------------------------------------------------------------- pages


def test_overview_config_and_result_pages_show_the_state_escaped(server: StatusServer) -> None:
    status, headers, body = fetch(server, "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src" not in headers["content-security-policy"]  # no script allowed at all
    assert page.count(DISCLAIMER) >= 2  # banner and footer
    assert "registration_quality_failed" in page and "done" in page
    assert "&lt;script&gt;" in page and "<script>" not in page  # failure message escaped
    assert "&lt;b&gt;association refused&lt;/b&gt;" in page  # the dead letter, escaped
    assert "forecast 42.0 s" in page and "total 1 min 01 s" in page  # stage timings
    assert 'action="/echo/results"' in page

    status, _, body = fetch(server, "/config")
    assert status == 200 and DISCLAIMER in body.decode() and "min_free_bytes" in body.decode()

    status, _, body = fetch(server, "/study/1.2.3.1")
    page = body.decode()
    assert status == 200 and DISCLAIMER in page
    # Ranked order, labels from the output templates, P(activity) as a percentage.
    positions = [page.index(label) for label in ("Natalizumab", "Fingolimod", "Placebo")]
    assert positions == sorted(positions)
    assert "60%" in page and 'src="/study/1.2.3.1/montage.png?version=1"' in page
    status, headers, body = fetch(server, "/study/1.2.3.1/montage.png?version=1")
    assert status == 200 and headers["content-type"] == "image/png"
    assert body.startswith(b"\x89PNG")
    status, _, body = fetch(server, "/healthz")
    assert (status, body) == (200, b"ok\n")


def test_config_page_redacts_the_token(seeded: tuple[NodeConfig, Database]) -> None:
    config, db = seeded
    s = start_status_server(_with_token(config), db, NodeMetrics(), echo_ok)
    try:
        status, _, body = fetch(s, "/config", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        s.stop()
    assert status == 200
    assert TOKEN not in body.decode() and "token: &#x27;***&#x27;" in body.decode()


def test_token_auth(seeded: tuple[NodeConfig, Database]) -> None:
    config, db = seeded
    s = start_status_server(_with_token(config), db, NodeMetrics(), echo_ok)
    basic = base64.b64encode(f"it:{TOKEN}".encode()).decode()
    try:
        for path in ("/", "/metrics", "/config", "/study/1.2.3.1", "/study/1.2.3.1/montage.png"):
            status, headers, body = fetch(s, path)
            assert status == 401, path
            assert "Basic" in headers["www-authenticate"]
            assert b"1.2.3.1" not in body
        for bad in (
            "Bearer wrong",
            f"Bearer {TOKEN}x",
            "Basic " + base64.b64encode(b"x:y").decode(),
        ):
            assert fetch(s, "/", headers={"Authorization": bad})[0] == 401
        assert fetch(s, "/?token=wrong")[0] == 401
        assert fetch(s, "/", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert fetch(s, "/metrics", headers={"Authorization": f"Basic {basic}"})[0] == 200
        status, headers, _ = fetch(s, f"/study/1.2.3.1?token={TOKEN}")
        assert status == 200
        cookie = headers["set-cookie"].split(";")[0]
        assert TOKEN not in cookie and "HttpOnly" in headers["set-cookie"]
        # The page's images load with the cookie the ?token= visit set.
        assert fetch(s, "/study/1.2.3.1/montage.png", headers={"Cookie": cookie})[0] == 200
        assert fetch(s, "/", headers={"Cookie": "msfn_status=forged"})[0] == 401
        assert fetch(s, "/healthz")[0] == 200  # probes carry no credentials
    finally:
        s.stop()


HOSTILE_PATHS = (
    "/study/..%2F..%2F..%2Fetc%2Fpasswd",
    "/study/../../etc/passwd",
    "/study/1.2.3.1%2F..%2F..%2Fnode.sqlite",
    "/study/1.2.3.1%00/montage.png",
    "/study/%2Fetc%2Fpasswd/montage.png",
    "/study/1.2.03/montage.png",  # leading zero: not a UID
    "/study/" + "1." * 40 + "1",  # longer than 64 characters
    "/study/1.2.3.1/key/..%2F..%2Fsummary/1.png",
    "/study/1.2.3.1/key/placebo/0.png",
    "/study/1.2.3.1/montage.png?version=..%2F1",
)


def test_hostile_study_paths_are_refused_without_touching_the_filesystem(
    server: StatusServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[str] = []
    lookups: list[str] = []
    real_lookup = queries.study_result

    def spy_lookup(db: Database, uid: str, version: int | None = None) -> Any:
        lookups.append(uid)
        return real_lookup(db, uid, version)

    def spy(name: str) -> Any:
        original = getattr(Path, name)

        def wrapper(self: Path, *args: Any, **kwargs: Any) -> Any:
            touched.append(f"{name} {self}")
            return original(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(queries, "study_result", spy_lookup)
    for name in ("read_bytes", "stat", "glob", "open", "exists", "is_file"):
        monkeypatch.setattr(Path, name, spy(name))
    for path in HOSTILE_PATHS:
        status, _, body = fetch(server, path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"SQLite" not in body
    assert touched == []
    # Only syntactically valid UIDs reached the database; none named a folder.
    assert set(lookups) <= {"1.2.3.1"}
    assert fetch(server, "/study/1.2.3.999")[0] == 404  # valid but unknown
    assert touched == []
    assert fetch(server, "/study/1.2.3.1/montage.png")[0] == 200
    assert touched, "the spies must see a legitimate file read"


def test_echo_button_records_the_result(
    seeded: tuple[NodeConfig, Database],
) -> None:
    config, db = seeded
    calls: list[str] = []

    def flaky(cfg: NodeConfig, destination: Any) -> tuple[bool, str]:
        calls.append(destination.ae_title)
        if len(calls) > 1:
            raise ConnectionRefusedError("connection refused")
        return True, "C-ECHO success"

    s = start_status_server(config, db, NodeMetrics(), flaky)
    try:
        assert "not tested since start" in fetch(s, "/")[2].decode()
        status, headers, _ = fetch(s, "/echo/results", method="POST")
        assert status == 303 and headers["location"] == "/#destinations"
        assert '<span class="ok">OK</span> C-ECHO success' in fetch(s, "/")[2].decode()
        fetch(s, "/echo/results", method="POST")
        assert "FAILED</span> ConnectionRefusedError" in fetch(s, "/")[2].decode()
        assert fetch(s, "/echo/nowhere", method="POST")[0] == 404
        for origin in ("http://evil.example", "null"):
            cross = {"Origin": origin, "Host": f"127.0.0.1:{s.port}"}
            assert fetch(s, "/echo/results", method="POST", headers=cross)[0] == 403
        assert calls == ["RESULTS", "RESULTS"]
    finally:
        s.stop()


def test_loopback_page_without_token_refuses_foreign_host_names(server: StatusServer) -> None:
    assert fetch(server, "/", headers={"Host": "attacker.example"})[0] == 403
    assert fetch(server, "/", headers={"Host": f"localhost:{server.port}"})[0] == 200
    assert fetch(server, "/", headers={"Host": f"[::1]:{server.port}"})[0] == 200


def test_overview_lists_refusals_and_failures_since_start(
    seeded: tuple[NodeConfig, Database],
) -> None:
    config, db = seeded
    metrics = NodeMetrics()
    metrics.instances_refused.labels("invalid_uid").inc(3)
    metrics.failures.labels("delivery_dead_letter").inc()
    s = start_status_server(config, db, metrics, echo_ok)
    try:
        page = fetch(s, "/")[2].decode()
    finally:
        s.stop()
    assert "refused C-STORE requests by reason: invalid_uid 3" in page
    assert "failures by reason: delivery_dead_letter 1" in page


def test_metrics_endpoint_sets_gauges_from_the_database(server: StatusServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = fetch(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("msfn_jobs", (("state", "done"),))] == 1
    assert samples[("msfn_jobs", (("state", "failed"),))] == 1
    assert samples[("msfn_outbox_depth", (("state", "sent"),))] == 2
    assert samples[("msfn_outbox_depth", (("state", "dead"),))] == 1


# ----------------------------------------------------------------------------- JSON logs


def test_json_log_lines_carry_study_and_job() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    handler = install_json_logging("INFO", stream)
    try:
        install_json_logging("INFO", stream)  # idempotent: still one line per record
        log = logging.getLogger("ms_forecast_node.test")
        log.info("job %d: done", 7, extra={"job_id": 7, "study_uid": "1.2.3"})
        try:
            raise ValueError('bad "thing"\nsecond line')
        except ValueError:
            log.exception("failed", extra={"study_uid": "1.2.3"})
        log.warning("plain")
    finally:
        for h in list(root.handlers):
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "job 7: done" and first["job_id"] == 7
    assert first["study_uid"] == "1.2.3" and first["level"] == "INFO"
    assert first["logger"] == "ms_forecast_node.test" and first["time"].endswith("+00:00")
    assert "ValueError" in second["exception"] and "job_id" not in second
    assert set(third) == {"time", "level", "logger", "message"}
    assert isinstance(handler.formatter, JsonFormatter)


# ----------------------------------------------------------------------------- retention


def _files(root: Path) -> dict[Path, int]:
    """Data files under the storage root (the database's own files change on every write)."""
    return {
        p: p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("node.sqlite")
    }


def test_retention_dry_run_lists_and_apply_deletes_exactly_that(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", 11112)
    db = Database(config.storage.database_path)
    now = time.time()
    seed_study(config, db, "1.2.5.1", at=now - 40 * DAY)  # old, done: goes
    seed_study(config, db, "1.2.5.2", at=now - 40 * DAY, outbox=("sent", "pending"))  # sending
    seed_study(config, db, "1.2.5.3", at=now - 5 * DAY)  # recent
    seed_study(config, db, "1.2.5.4", at=now - 40 * DAY, job_state="failed", outbox=("dead",))
    # A prior fetched by C-MOVE: never assembled (still "dirty"), no job of its own.
    prior = config.storage.root / "instances" / "1.2.5.5" / "1.2.5.5.0" / "1.2.5.5.1.dcm"
    prior.parent.mkdir(parents=True)
    prior.write_bytes(b"\0" * 64)
    db.add_instance(
        InstanceRecord("1.2.5.5.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.5.5", "1.2.5.5.0", "P1",
                       "MR", str(prior), 64, "PACS", "127.0.0.1"),
        now=now - 40 * DAY,
    )  # fmt: skip
    with db.transaction() as con:
        con.execute("INSERT INTO retrieved_studies VALUES ('1.2.5.5', ?)", (now - 40 * DAY,))
    root = config.storage.root
    before = _files(root)

    plan = plan_retention(config, db, days=30, now=now)
    assert [i.study_uid for i in plan] == ["1.2.5.1", "1.2.5.4", "1.2.5.5"]
    assert _files(root) == before  # the dry run touched nothing
    listed = {f.path: f.bytes for item in plan for f in item.files}
    kinds = {f.kind for item in plan for f in item.files}
    assert kinds == {"instance", "derived"}
    assert all(before[p] == size for p, size in listed.items())  # sizes are right
    assert plan[0].rows == {"instances": 3, "study_versions": 1, "jobs": 1, "outbox": 2,
                            "retrieved_studies": 0, "studies": 1}  # fmt: skip
    assert plan[2].rows["retrieved_studies"] == 1
    assert plan[0].bytes == sum(f.bytes for f in plan[0].files) > 0

    # Something lands in a listed study's folder after the plan: it was not listed, so it stays.
    late = root / "derived" / "1.2.5.1" / "v1" / "operator-notes.txt"
    late.write_text("keep me")
    outcome = apply_retention(config, db, plan)
    after = _files(root)
    assert set(before) - set(after) == set(listed)  # deleted exactly what was listed
    assert late in after
    assert outcome.files_deleted == len(listed) and outcome.bytes_freed == sum(listed.values())
    assert [i.study_uid for i in outcome.deleted] == ["1.2.5.1", "1.2.5.4", "1.2.5.5"]
    remaining = {r[0] for r in db.query("SELECT study_uid FROM studies")}
    assert remaining == {"1.2.5.2", "1.2.5.3"}
    assert not db.query("SELECT 1 FROM jobs WHERE study_uid IN ('1.2.5.1', '1.2.5.4')")
    assert not db.query("SELECT 1 FROM retrieved_studies")
    assert db.outbox_counts() == {"sent": 2 + 1, "pending": 1}  # only the kept studies' rows
    assert not (root / "instances" / "1.2.5.1").exists()  # emptied folders removed
    assert plan_retention(config, db, days=30, now=now) == []


def test_retention_skips_a_study_that_became_active_after_the_plan(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", 11112)
    db = Database(config.storage.database_path)
    now = time.time()
    seed_study(config, db, "1.2.6.1", at=now - 40 * DAY)
    plan = plan_retention(config, db, days=30, now=now)
    assert len(plan) == 1
    before = _files(config.storage.root)
    # A job for a new version started in the meantime (e.g. `reprocess`).
    with db.transaction() as con:
        con.execute("UPDATE jobs SET updated_at = ? WHERE study_uid = '1.2.6.1'", (now,))
    outcome = apply_retention(config, db, plan)
    assert outcome.deleted == [] and outcome.skipped[0][0] == "1.2.6.1"
    assert _files(config.storage.root) == before
    with pytest.raises(ValueError):
        plan_retention(config, db, days=-1, now=now)


# ----------------------------------------------------------------------------- a real node


class PlantedLesionPipeline(ForecastPipeline):
    """The node's real pipeline and model, plus one known lesion in every therapy's forecast.

    The simulated patient has no new lesions in truth and the model at 2 samples forecasts
    none, so the result view would show no overlay at all; the test needs one overlay per
    therapy. After the real sampling each therapy gets a ball of forecast voxels (probability
    1 in every draw) at the median of the patient's lesion voxels, smaller under stronger
    therapies; back-projection, SEG, key images, montage, summary and sending stay real.
    """

    def forecast(self, study: PreprocessedStudy) -> ForecastResult:
        result = super().forecast(study)
        shape = result.grid.shape
        voxels = np.argwhere(study.lesion_mask)
        centre = np.median(voxels, axis=0) if len(voxels) else np.asarray(shape) / 2.0
        grid_axes = np.indices(shape)
        distance = np.sqrt(sum((grid_axes[a] - centre[a]) ** 2 for a in range(3)))
        x, y, z = (float(v) for v in result.grid.index_to_world(centre[::-1][None, :])[0])
        therapies = {}
        for i, (code, f) in enumerate(result.therapies.items()):
            ball = distance <= 2.0 + 0.5 * (len(result.therapies) - i)
            volume = float(ball.sum()) * result.grid.voxel_volume_mm3
            where = LocationClass.PERIVENTRICULAR
            by_location = dict(f.sample_counts_by_location)
            by_location[where] = tuple(
                c + 1 for c in by_location.get(where, (0,) * len(f.sample_counts))
            )
            planted = ForecastLesion(len(f.lesions) + 1, volume, (x, y, z), where, 1.0)
            therapies[code] = replace(
                f,
                probability=np.maximum(f.probability, ball).astype(f.probability.dtype),
                mask=f.mask | ball,
                uncertainty=np.where(ball, 0.0, f.uncertainty).astype(f.uncertainty.dtype),
                sample_counts=tuple(c + 1 for c in f.sample_counts),
                sample_volumes_mm3=tuple(v + volume for v in f.sample_volumes_mm3),
                sample_counts_by_location=by_location,
                lesions=(*f.lesions, planted),
            )
        return replace(result, therapies=therapies)


@pytest.fixture(scope="module")
def processed(
    tmp_path_factory: pytest.TempPathFactory, simulated_study: tuple[Path, dict[str, Any]]
) -> Iterator[tuple[Node, Receiver, dict[str, Any]]]:
    """A node that received the simulated study and processed both visits (samples 2, steps
    2, a planted lesion per therapy); its own status page is off, the tests start theirs on
    the same config."""
    root, manifest = simulated_study
    receiver = Receiver().start()
    config = node_config(
        tmp_path_factory.mktemp("status-node"),
        receiver.port,
        status_page={"enabled": False, "port": 0, "token": TOKEN},
    )
    node = Node(config, lambda: PlantedLesionPipeline(pipeline_settings(config)))
    node.start()
    try:
        files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file())
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr[-2000:]
        wait_for(
            lambda: sum(1 for j in node.db.jobs() if j["state"] in ("done", "failed")) >= 2,
            900,
            "both jobs to finish",
        )
        assert {j["state"] for j in node.db.jobs()} == {"done"}, [dict(j) for j in node.db.jobs()]
        yield node, receiver, manifest
    finally:
        node.stop()
        receiver.stop()


@pytest.fixture()
def node_server(processed: tuple[Node, Receiver, dict[str, Any]]) -> Iterator[StatusServer]:
    node = processed[0]
    s = start_status_server(node.config, node.db, node.metrics)  # real C-ECHO to the receiver
    yield s
    s.stop()


@pytest.mark.slow
def test_metrics_after_a_processed_study(
    processed: tuple[Node, Receiver, dict[str, Any]], node_server: StatusServer
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, receiver, _ = processed
    assert fetch(node_server, "/metrics")[0] == 401
    status, _, body = fetch(node_server, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(name: str, **labels: str) -> float:
        total = 0.0
        found = False
        for family in families.values():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    found = True
        assert found, f"{name} {labels} missing"
        return total

    sent = len(receiver.received)
    assert value("msfn_instances_received_total") > 0
    assert value("msfn_bytes_received_total") > value("msfn_instances_received_total") * 1000
    assert value("msfn_associations_total", outcome="released") >= 1
    assert value("msfn_jobs", state="done") >= 2 and value("msfn_jobs", state="failed") == 0
    for stage in ("load", "preprocess", "forecast", "outputs"):
        assert value("msfn_stage_seconds_count", stage=stage) >= 2, stage
        assert value("msfn_stage_seconds_sum", stage=stage) > 0, stage
    assert value("msfn_forecast_seconds_count") >= 2
    assert value("msfn_outbox_depth", state="sent") == sent > 0
    assert value("msfn_outbox_depth", state="pending") == 0
    assert value("msfn_objects_sent_total") == sent
    assert "msfn_failures" in families and "msfn_instances_refused" in families


@pytest.mark.slow
def test_node_pages_show_the_processed_studies(
    processed: tuple[Node, Receiver, dict[str, Any]], node_server: StatusServer
) -> None:
    node, _, manifest = processed
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page = fetch(node_server, "/", headers=auth)[2].decode()
    for visit in manifest["visits"]:
        assert visit["study_instance_uid"] in page
    assert "forecast" in page and "done" in page
    uid = manifest["visits"][-1]["study_instance_uid"]
    status, _, body = fetch(node_server, f"/study/{uid}", headers=auth)
    assert status == 200
    assert body.decode().count('class="key"') >= 7  # key images of every therapy
    status, _, body = fetch(node_server, f"/study/{uid}/key/placebo/1.png", headers=auth)
    assert status == 200 and png_pixels(body).shape[2] == 3


# ----------------------------------------------------------------------------- Chromium


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-separated JSON on fds 3 and 4), so the test needs no websocket client."""

    def __init__(self, binary: str, width: int, height: int) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:
            # In the child, before exec: copy both ends out of the way first (either may
            # already sit on 3 or 4), then onto the fds Chromium expects.
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", "--hide-scrollbars", f"--window-size={width},{height}",
             "--no-first-run", "--no-default-browser-check", "about:blank"],
            pass_fds=(3, 4),  # kept open across exec; wire_fds put the pipe ends there
            preexec_fn=wire_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def _read(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        result: dict[str, Any] = json.loads(message)
        return result

    def call(self, method: str, session: str | None = None, timeout_s: float = 60, **params: Any
             ) -> dict[str, Any]:  # fmt: skip
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout_s)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def wait_event(self, method: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(max(deadline - time.monotonic(), 0.01)))

    def load(self, url: str) -> None:
        self.events.clear()
        self.page("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        reply = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, EOFError, RuntimeError, OSError):
            self.call("Browser.close", timeout_s=10)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


def chroma_angle(pixels: np.ndarray, rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(chroma length, angle in degrees to ``rgb``'s chroma) per pixel. Alpha-blending a colour
    onto grey (and resampling it against grey neighbours) scales the pixel's chroma — its RGB
    minus its own mean — but keeps the colour's chroma direction, whatever the grey level."""
    p = pixels.reshape(-1, 3).astype(np.float64)
    chroma = p - p.mean(axis=1, keepdims=True)
    c = np.asarray(rgb, np.float64) - np.mean(rgb)
    length = np.linalg.norm(chroma, axis=1)
    cos = (chroma @ c) / np.maximum(length * np.linalg.norm(c), 1e-9)
    return length, np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def crop(image: np.ndarray, rect: dict[str, float], bottom_cut: float = 0.0) -> np.ndarray:
    x0, y0 = math.ceil(rect["x"]) + 1, math.ceil(rect["y"]) + 1  # inside the border
    x1 = math.floor(rect["x"] + rect["width"]) - 1
    y1 = math.floor(rect["y"] + rect["height"] * (1.0 - bottom_cut)) - 1
    return image[y0:y1, x0:x1]


LAYOUT_JS = """(() => {
  const box = el => { const r = el.getBoundingClientRect();
    return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; };
  const img = el => ({rect: box(el), complete: el.complete, naturalWidth: el.naturalWidth,
    naturalHeight: el.naturalHeight, therapy: el.dataset.therapy || null});
  return {
    text: document.body.innerText,
    width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
    montage: img(document.getElementById('montage')),
    keys: Array.from(document.querySelectorAll('img.key')).map(img),
    rows: Array.from(document.querySelectorAll('table tr')).length,
  };
})()"""


@pytest.mark.slow
def test_result_view_in_headless_chromium(
    processed: tuple[Node, Receiver, dict[str, Any]], node_server: StatusServer, tmp_path: Path
) -> None:
    from ms_forecast_node.report.keyimages import LEGEND_PX
    from ms_forecast_node.report.templates import load_templates

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    node, _, manifest = processed
    uid = manifest["visits"][-1]["study_instance_uid"]
    summary = queries.study_result(node.db, uid)
    assert summary is not None and summary.summary is not None
    ranked = summary.summary["therapies_ranked"]
    templates = load_templates()

    browser = Chromium(binary, 1280, 1600)
    try:
        browser.page("Page.enable")
        browser.load(f"{node_server.url}study/{uid}?token={TOKEN}")
        layout = browser.evaluate(LAYOUT_JS)
        shot = browser.page(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": layout["width"], "height": layout["height"],
                  "scale": 1},
        )  # fmt: skip
        # The ?token= visit left a cookie: the overview opens without a token, and its
        # C-ECHO button (a same-origin form POST) echoes the receiver for real.
        browser.load(node_server.url)
        before = browser.evaluate("document.body.innerText")
        browser.events.clear()
        browser.evaluate("document.querySelector('form[action=\"/echo/results\"] button').click()")
        browser.wait_event("Page.loadEventFired")
        after = browser.evaluate("document.body.innerText")
    finally:
        browser.close()
    assert "not tested since start" in before
    assert "OK C-ECHO success" in after, after[:2000]
    png = base64.b64decode(shot["data"])
    (tmp_path / "status-page.png").write_bytes(png)
    if os.environ.get("MSFN_UPDATE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "images" / "status-page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)

    # The page: the disclaimer, the comparison table with every therapy, every image loaded.
    assert DISCLAIMER in layout["text"]
    assert "Comparison of therapies" in layout["text"]
    for row in ranked:
        assert templates.therapy(row["therapy"]).label in layout["text"]
    assert layout["montage"]["complete"] and layout["montage"]["naturalWidth"] > 400
    assert {k["therapy"] for k in layout["keys"]} == {r["therapy"] for r in ranked}
    assert all(k["complete"] and k["naturalWidth"] > 0 for k in layout["keys"])

    # The screenshot: a real rendering of the full page, not blank.
    assert png.startswith(b"\x89PNG") and len(png) > 100_000
    image = png_pixels(png)
    assert image.shape[0] >= layout["height"] - 1 and image.shape[1] >= 1200
    assert image.std() > 30  # text, tables and brain images, not a flat page

    # The montage region holds overlay pixels in therapy colours.
    montage = crop(image, layout["montage"]["rect"])
    assert montage.std() > 20
    for row in ranked:
        length, angle = chroma_angle(montage, templates.colour(row["therapy"]).as_rgb())
        assert ((length > 25) & (angle < 15)).sum() >= 20, f"{row['therapy']}: not in montage"

    # Each therapy's key images show overlay pixels in that therapy's own colour, in the image
    # part (the legend band below it carries a colour swatch, which must not count).
    for row in ranked:
        code = row["therapy"]
        assert row["forecast_mask_voxels_native"] > 0, code  # the planted lesion at least
        rgb = templates.colour(code).as_rgb()
        hits = 0
        for key in (k for k in layout["keys"] if k["therapy"] == code):
            cut = LEGEND_PX / key["naturalHeight"]
            length, angle = chroma_angle(crop(image, key["rect"], bottom_cut=cut), rgb)
            hits += int(((length > 25) & (angle < 15)).sum())
        assert hits >= 10, f"{code}: no overlay in its colour in its key images"
