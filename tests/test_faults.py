"""Faults (issue 6, acceptance "Faults"): the node as a real process, killed with SIGKILL
during a transfer and during forecasting, and a destination that is down across a restart.

The node runs as ``python -m ms_forecast_node serve --config FILE`` so that ``kill -9`` is a
real crash: no ``finally``, no atexit, a WAL file and maybe a ``.partial`` left behind. The
test process reads the node's SQLite file read-only and never repairs it, so the restarted
node sees exactly what the crash left.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ms_forecast_node.assemble.rules import default_rules_path
from ms_forecast_node.config.settings import NodeConfig

from .node_helpers import Receiver, dcmtk, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.external]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (TID 1500)
TERMINAL = ("done", "failed", "superseded")


# --- the node as a process --------------------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on right now (bound and released; the window is tiny)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """``ms-forecast-node serve`` in a subprocess, restartable on the same config and storage."""

    config_path: Path
    config: NodeConfig
    registry: list[subprocess.Popen[bytes]]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def port(self) -> int:
        return self.config.listen.port

    @property
    def instances_dir(self) -> Path:
        return self.config.storage.root / "instances"

    def start(self, timeout_s: float = 180.0) -> NodeProcess:
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts + 1} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ms_forecast_node",
                    "serve",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # rich wraps log lines at 80 columns when not on a terminal; wide lines keep
                # the log tail in a failure message readable.
                env={**os.environ, "COLUMNS": "200"},
            )
        self.registry.append(self.proc)
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"node exited with {self.proc.returncode} while starting\n{self.log_tail()}"
                )
            if self._echo():
                return self
            time.sleep(0.5)
        raise AssertionError(
            f"node not answering C-ECHO after {timeout_s:.0f} s\n{self.log_tail()}"
        )

    def _echo(self) -> bool:
        # echoscu, not a bare TCP connect: a connect-and-close would be audited as an aborted
        # association and tells nothing about whether the AE is really serving.
        result = subprocess.run(
            [
                dcmtk("echoscu"),
                "-aet",
                "STORESCU",
                "-aec",
                "MSFORECAST",
                "127.0.0.1",
                str(self.port),
            ],
            capture_output=True,
            check=False,
            timeout=30,
        )
        return result.returncode == 0

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "node is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 120.0) -> int:
        assert self.proc is not None and self.proc.poll() is None, "node is not running"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        # Read-only on purpose: a read-write connection closed last would checkpoint and delete
        # the WAL, repairing the crash state before the restarted node could see it.
        uri = f"file:{self.config.storage.database_path}?mode=ro"
        con = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            con.row_factory = sqlite3.Row
            return list(con.execute(sql, params).fetchall())
        finally:
            con.close()

    def instance_count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM instances")[0][0])

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return f"--- node log (tail) ---\n{text[-chars:]}"

    def diagnostics(self) -> str:
        try:
            jobs = [
                dict(r)
                for r in self.query(
                    "SELECT id, study_uid, version, state, reason, message, runs FROM jobs"
                )
            ]
            outbox = [
                dict(r)
                for r in self.query(
                    "SELECT state, attempts, last_error, COUNT(*) n "
                    "FROM outbox GROUP BY state, attempts, last_error"
                )
            ]
        except sqlite3.Error as exc:
            jobs, outbox = [], [{"error": str(exc)}]
        return f"jobs: {jobs}\noutbox: {outbox}\n{self.log_tail()}"

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            wait_for(condition, timeout_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


@pytest.fixture()
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every subprocess a test starts (node runs, storescu); whatever still runs is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def make_node(
    tmp_path: Path,
    registry: list[subprocess.Popen[bytes]],
    *,
    destination_port: int,
    series_rules: Path | None = None,
    max_attempts: int = 8,
) -> NodeProcess:
    raw: dict[str, Any] = {
        "listen": {"ae_title": "MSFORECAST", "bind_address": "127.0.0.1", "port": free_port()},
        "peers": [{"ae_title": "STORESCU", "quiet_period_s": 2.0, "destination": "results"}],
        "destinations": {
            "results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": destination_port}
        },
        "storage": {"root": str(tmp_path / "node"), "min_free_bytes": 0},
        "processing": {"samples": 2, "steps": 2},
        "sending": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_attempts": max_attempts},
        # Not wired into the node yet; off so that a later wiring cannot collide on port 8080.
        "status_page": {"enabled": False},
    }
    if series_rules is not None:
        raw["processing"]["series_rules"] = str(series_rules)
    config = NodeConfig.model_validate(raw)  # fail here, not in the subprocess's log
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return NodeProcess(path, config, registry, tmp_path / "node.log")


def flair_only_rules(tmp_path: Path) -> Path:
    """The shipped series rules with no wanted classes: jobs register only the FLAIRs.

    The transfer fault needs hundreds of instances, but not the T1/T2/PD registrations
    (about a minute per study on two shared cores); imaging is tested elsewhere."""
    raw = yaml.safe_load(default_rules_path().read_text(encoding="utf-8"))
    raw["selection"]["wanted"] = []
    path = tmp_path / "series_rules_flair_only.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# --- peers ------------------------------------------------------------------------------------
def storescu_args(port: int, files: list[Path]) -> list[str]:
    return [
        dcmtk("storescu"),
        "-v",  # one "Sending file" / "Received Store Response" pair per instance
        "-aet",
        "STORESCU",
        "-aec",
        "MSFORECAST",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]


def start_storescu(
    port: int, files: list[Path], log_path: Path, registry: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(storescu_args(port, files), stdout=log, stderr=subprocess.STDOUT)
    registry.append(proc)
    return proc


def send_all(port: int, files: list[Path], registry: list[subprocess.Popen[bytes]]) -> None:
    proc = subprocess.Popen(
        storescu_args(port, files), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    registry.append(proc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def acknowledged(storescu_output: str) -> list[Path]:
    """Files for which storescu received a success C-STORE response before the crash."""
    acked: list[Path] = []
    current: Path | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            acked.append(current)
            current = None
    return acked


@dataclass
class ReceiverOnPort(Receiver):
    """``node_helpers.Receiver`` on a fixed port: the destination that "comes back" must come
    back where the node's configuration points (``Receiver`` always binds port 0)."""

    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ReceiverOnPort:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.received.append(ds)
                uid = str(ds.SOPInstanceUID)
                self.counts[uid] = self.counts.get(uid, 0) + 1
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


# --- study files ------------------------------------------------------------------------------
def series_files(folders: list[Path]) -> list[Path]:
    """The folders' files series by series, the FLAIR last: a study cut anywhere before its
    end lacks the FLAIR, so a partial study version can only fail, never produce results."""
    ordered = sorted(folders, key=lambda p: ("flair" in p.name.lower(), p.name))
    return [f for folder in ordered for f in sorted(folder.glob("*.dcm"))]


def repeated_series(folder: Path, out: Path) -> Path:
    """A re-UIDed copy of a series in the same study, as a scanner's repeat after motion."""
    out.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(ds.SeriesNumber) + 1
        ds.SeriesDescription = f"{ds.SeriesDescription} REPEAT"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / path.name, enforce_file_format=True)
    return out


def headers(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """SOP Instance UID → (source file, Study Instance UID)."""
    out = {}
    for path in files:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"]
        )
        out[str(ds.SOPInstanceUID)] = (path, str(ds.StudyInstanceUID))
    return out


def disk_files(node: NodeProcess) -> set[str]:
    return {str(p) for p in node.instances_dir.rglob("*.dcm")}


def partial_files(node: NodeProcess) -> list[Path]:
    return list(node.config.storage.root.rglob("*.partial"))


def assert_results_exactly_once(node: NodeProcess, receiver: Receiver) -> None:
    """What the receiver got == what the outbox of the done jobs sent, each exactly once."""
    rows = node.query(
        "SELECT o.sop_instance_uid, o.sop_class_uid, o.state, j.state AS job_state "
        "FROM outbox o JOIN jobs j ON j.id = o.job_id"
    )
    assert rows, "no results were queued"
    assert {r["job_state"] for r in rows} == {"done"}, "a job that is not done queued results"
    assert {r["state"] for r in rows} == {"sent"}, [dict(r) for r in rows]
    queued = [str(r["sop_instance_uid"]) for r in rows]
    assert len(queued) == len(set(queued)), "the same object was queued twice"
    duplicates = {uid: n for uid, n in receiver.counts.items() if n != 1}
    assert not duplicates, f"received more than once: {duplicates}"
    assert set(receiver.counts) == set(queued)
    classes = {str(r["sop_class_uid"]) for r in rows}
    assert {SEG, SR} <= classes, classes


# --- the tests --------------------------------------------------------------------------------
def test_kill9_during_a_transfer_loses_nothing_acknowledged_and_the_resend_completes_once(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    receiver: Receiver,
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, _ = simulated_study
    # One study of more than 300 instances: the follow-up visit (T1 176, T2 50, PD 50, FLAIR 1)
    # plus a repeat of its T1 series; one study keeps it to one forecast job.
    followup = sorted(p for p in (root / "dicom" / "followup").iterdir() if p.is_dir())
    t1 = next(p for p in followup if "t1" in p.name.lower())
    files = series_files([*followup, repeated_series(t1, tmp_path / "t1_repeat")])
    assert len(files) >= 300
    source = headers(files)
    studies = {study for _, study in source.values()}
    assert len(studies) == 1
    study_uid = studies.pop()
    node = make_node(
        tmp_path, processes, destination_port=receiver.port, series_rules=flair_only_rules(tmp_path)
    ).start()

    # --- crash: SIGKILL once about 100 instances are indexed, storescu still sending.
    scu_log = tmp_path / "storescu-1.log"
    scu = start_storescu(node.port, files, scu_log, processes)
    node.wait(lambda: node.instance_count() >= 100 or scu.poll() is not None, 300, "100 instances")
    node.kill9()
    scu.wait(timeout=120)
    indexed_at_kill = {
        str(r[0]): str(r[1]) for r in node.query("SELECT sop_instance_uid, path FROM instances")
    }
    assert 100 <= len(indexed_at_kill) < len(files), "the kill did not land mid-transfer"
    assert scu.returncode != 0, "storescu finished although the node was killed"
    acked = acknowledged(scu_log.read_text(encoding="utf-8", errors="replace"))
    assert 50 <= len(acked) < len(files), f"{len(acked)} acknowledged: storescu -v output changed?"

    # Every instance acknowledged before the kill is indexed and on disk, byte-complete.
    by_file = {path: uid for uid, (path, _) in source.items()}
    missing = [str(f) for f in acked if by_file[f] not in indexed_at_kill]
    assert not missing, f"acknowledged but not in the index: {missing[:5]}"
    on_disk = disk_files(node)
    assert set(indexed_at_kill.values()) <= on_disk, "indexed instances missing on disk"
    # At most the one instance between rename and index commit can be on disk unindexed.
    assert len(on_disk - set(indexed_at_kill.values())) <= 1
    for path in sorted(on_disk):
        stored = pydicom.dcmread(path)  # complete: the whole data set parses, pixels included
        original = pydicom.dcmread(source[str(stored.SOPInstanceUID)][0])
        assert stored.PixelData == original.PixelData, path
    leftover = partial_files(node)  # allowed here (the instance in flight); gone after restart

    # --- restart: orphans re-indexed, stale .partial removed, disk == index.
    node.start()
    assert not partial_files(node), f"{leftover} -> {partial_files(node)} survived the restart"
    assert disk_files(node) == {str(r[0]) for r in node.query("SELECT path FROM instances")}

    # --- the sender resends everything; the study completes exactly once.
    send_all(node.port, files, processes)

    def settled() -> bool:
        study = node.query(
            "SELECT dirty, latest_version FROM studies WHERE study_uid = ?", (study_uid,)
        )
        if not study or study[0]["dirty"]:
            return False  # a version is still to be assembled
        job = node.query(
            "SELECT state FROM jobs WHERE study_uid = ? AND version = ?",
            (study_uid, study[0]["latest_version"]),
        )
        return bool(job) and job[0]["state"] in TERMINAL

    node.wait(settled, 480, "the study's latest version to finish")
    jobs = node.query("SELECT * FROM jobs ORDER BY id")
    latest = max(int(j["version"]) for j in jobs)
    done = [int(j["version"]) for j in jobs if j["state"] == "done"]
    assert done == [latest], node.diagnostics()
    # A version assembled from what the crash left (at restart the quiet period is long over)
    # lacks the FLAIR, sent last: it fails or is superseded, and sends nothing.
    for j in jobs:
        if j["state"] != "done":
            assert j["state"] == "superseded" or j["reason"] == "required_series_missing", dict(j)
    assert all(int(j["runs"]) == 1 for j in jobs), "no job was in flight at the kill"
    assert node.instance_count() == len(source)  # every instance indexed once
    assert disk_files(node) == {str(r[0]) for r in node.query("SELECT path FROM instances")}
    assert not partial_files(node)
    assert_results_exactly_once(node, receiver)
    assert {str(ds.StudyInstanceUID) for ds in receiver.received} == {study_uid}


def test_kill9_during_forecasting_resumes_the_job_and_delivers_once(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    receiver: Receiver,
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, _ = simulated_study
    # The follow-up FLAIR alone (one Enhanced MR file, 176 frames) is a complete study.
    flair = sorted((root / "dicom" / "followup").glob("*flair*/*.dcm"))
    assert len(flair) == 1
    node = make_node(tmp_path, processes, destination_port=receiver.port).start()
    send_all(node.port, flair, processes)

    def state() -> str:
        rows = node.query("SELECT state FROM jobs")
        return str(rows[0]["state"]) if rows else ""

    # The forecasting stage lasts seconds; wait_for polls every 0.25 s.
    node.wait(lambda: state() not in ("", "assembled", "preprocessing"), 300, "forecasting")
    assert state() == "forecasting", f"missed the forecasting stage\n{node.diagnostics()}"
    node.kill9()
    job = node.query("SELECT * FROM jobs")
    assert len(job) == 1 and job[0]["state"] == "forecasting" and job[0]["runs"] == 1
    assert not node.query("SELECT * FROM outbox")

    node.start()
    node.wait(lambda: state() in TERMINAL, 480, "the resumed job to finish")
    job = node.query("SELECT * FROM jobs")
    assert len(job) == 1, "the restart made a new study version"
    assert job[0]["state"] == "done", node.diagnostics()
    assert job[0]["runs"] == 2, "the job did not resume (runs counts starts)"
    assert_results_exactly_once(node, receiver)


def test_destination_down_across_a_restart_then_back_delivers_once(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, _ = simulated_study
    flair = sorted((root / "dicom" / "followup").glob("*flair*/*.dcm"))
    destination_port = free_port()  # nothing listens there until the receiver starts
    # Enough attempts that backoff (0.5-2 s) cannot dead-letter during the outage.
    node = make_node(tmp_path, processes, destination_port=destination_port, max_attempts=200)
    node.start()
    send_all(node.port, flair, processes)

    def outbox() -> list[sqlite3.Row]:
        return node.query("SELECT * FROM outbox")

    def failing() -> bool:
        # The worker commits the outbox rows and then the job state: wait for both.
        rows = outbox()
        jobs = node.query("SELECT state FROM jobs")
        sending = bool(jobs) and jobs[0]["state"] == "sending"
        return sending and bool(rows) and all(r["attempts"] >= 1 and r["last_error"] for r in rows)

    node.wait(failing, 480, "the job to reach sending and the outbox to fail")
    assert node.query("SELECT state FROM jobs")[0]["state"] == "sending"
    assert {r["state"] for r in outbox()} == {"pending"}
    print("last_error while down:", outbox()[0]["last_error"])

    # Graceful restart while the destination is still down: the outbox survives.
    assert node.terminate() == 0, node.log_tail()
    attempts_before = max(int(r["attempts"]) for r in outbox())
    node.start()
    node.wait(
        lambda: min(int(r["attempts"]) for r in outbox()) > attempts_before,
        60,
        "the restarted node to retry the outbox",
    )
    assert {r["state"] for r in outbox()} == {"pending"}
    assert node.query("SELECT state FROM jobs")[0]["state"] == "sending"

    # The destination comes back on the configured port.
    receiver = ReceiverOnPort(port=destination_port).start()
    try:
        node.wait(
            lambda: node.query("SELECT state FROM jobs")[0]["state"] in TERMINAL,
            120,
            "delivery after the destination came back",
        )
        assert node.query("SELECT state FROM jobs")[0]["state"] == "done", node.diagnostics()
        assert node.terminate() == 0  # nothing in flight when the receiver is read
        assert_results_exactly_once(node, receiver)
    finally:
        receiver.stop()
