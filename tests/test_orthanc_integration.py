"""The node against a real PACS: Orthanc (Debian's package) auto-routes a study to the node with
``deploy/orthanc/autoroute.lua`` and receives SEG and SR of every therapy back, once each.

Flow: dcmtk ``storescu`` → Orthanc → (Lua, on stable study) → node → results → Orthanc.
Orthanc runs as a child process with its own configuration, storage and ports; no system
service is touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.node import Node
from ms_forecast_node.report.templates import OutputKind, load_templates
from ms_forecast_node.report.uids import object_identity
from ms_forecast_node.store.database import JobState

from .node_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.external]

REPO = Path(__file__).resolve().parents[1]
LUA_SCRIPT = REPO / "deploy" / "orthanc" / "autoroute.lua"
ORTHANC_EXAMPLE = REPO / "deploy" / "orthanc" / "orthanc.json"
ORTHANC_AET = "ORTHANC"
NODE_AET = "MSFORECAST"  # the Lua script's NODE_AET
NODE_MODALITY = "msforecast"  # the Lua script's FORECAST_MODALITY
SCANNER_AET = "STORESCU"
# Orthanc's quiet time before OnStableStudy (a hospital uses ~60 s), and the node's quiet period
# for Orthanc. Both leave room for a stall of the loaded test machine mid-transfer, which would
# otherwise split a study in two versions.
STABLE_AGE_S = 4
NODE_QUIET_PERIOD_S = 5.0
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
# A test-only second Lua script: one log line per instance Orthanc stores, duplicates included
# (with OverwriteInstances a second copy replaces the first, so counting instances would not
# show it). autoroute.lua does not define OnStoredInstance, so the two scripts coexist.
ARRIVALS_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  print('msfn-test-stored ' .. tostring(metadata['RemoteAET']) .. ' ' .. tags['SOPInstanceUID'])
end
"""
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


# Orthanc's JSON allows // and /* */ comments: drop them outside strings.
_JSON_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)


def load_orthanc_json(path: Path) -> dict[str, Any]:
    """An Orthanc configuration file (JSON with comments) as a dict."""
    text = path.read_text(encoding="utf-8")
    kept = _JSON_TOKENS.sub(lambda m: m[0] if m[0].startswith('"') else "", text)
    data = json.loads(kept)
    assert isinstance(data, dict)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM Orthanc if pytest dies without its
    teardown (killed by a CI timeout), so no Orthanc outlives the test run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the fixture's teardown still stops it


def orthanc_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("Orthanc")
    if found is None and os.access("/usr/sbin/Orthanc", os.X_OK):
        found = "/usr/sbin/Orthanc"
    return found


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {package})")
    return path


def free_port() -> int:
    # Orthanc cannot listen on port 0, so a free port is picked here; the tiny window before
    # Orthanc binds it is harmless on a test machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """An Orthanc child process and a minimal client for its REST API."""

    binary: str
    workdir: Path
    http_port: int
    dicom_port: int
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into config()
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self, node_port: int) -> dict[str, Any]:
        """deploy/orthanc/orthanc.json with what must differ in a test: temporary storage, own
        ports, loopback addresses, no HTTP credentials, a short StableAge."""
        config = load_orthanc_json(ORTHANC_EXAMPLE)
        storage = self.workdir / "storage"
        modalities = config["DicomModalities"]
        assert modalities[NODE_MODALITY]["AET"] == NODE_AET  # as autoroute.lua expects
        modalities[NODE_MODALITY].update(Host="127.0.0.1", Port=node_port)
        # One scanner, dcmtk's storescu on this machine (DicomAlwaysAllowStore is false, so
        # only declared modalities may store).
        scanner = next(m for name, m in modalities.items() if name != NODE_MODALITY)
        scanner.update(AET=SCANNER_AET, Host="127.0.0.1")
        config.update(
            {
                "Name": "msfn-test-pacs",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "DicomPort": self.dicom_port,
                "HttpPort": self.http_port,
                # Loopback only, so the REST API needs no credentials.
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "RegisteredUsers": {},
                "Plugins": [],  # Debian's plugins are not needed and slow the start down
                "StableAge": STABLE_AGE_S,
                "LuaScripts": [str(LUA_SCRIPT), str(self.workdir / "arrivals.lua")],
                "SaveJobs": False,
                "SyncStorageArea": False,  # temporary storage: durability is the node's test
            }
        )
        return _merge(config, self.overrides)

    def start(self, node_port: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "orthanc.json"
        (self.workdir / "arrivals.lua").write_text(ARRIVALS_LUA, encoding="utf-8")
        path.write_text(json.dumps(self.config(node_port), indent=2), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, str(path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited at start:\n{self.log_tail()}")
            try:
                if self.get("/system")["DicomAet"] == ORTHANC_AET:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"Orthanc did not start within 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self._request("POST", "/tools/shutdown", b"")
            self.process.wait(timeout=20)
        except (urllib.error.URLError, ConnectionError, subprocess.TimeoutExpired):
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")

    def _request(self, method: str, uri: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{uri}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def get(self, uri: str) -> Any:
        return json.loads(self._request("GET", uri))

    def post(self, uri: str, body: bytes) -> Any:
        """POST and parse the answer; an HTTP error status raises urllib.error.HTTPError."""
        return json.loads(self._request("POST", uri, body))

    def file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file")

    def lua_lines(self, marker: str) -> list[str]:
        """What the Lua scripts printed (``marker`` and what follows it)."""
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        return [line[line.index(marker) :] for line in text.splitlines() if marker in line]

    def arrivals(self) -> list[tuple[str, str]]:
        """(calling AE, SOP Instance UID) of every instance stored, in order."""
        return [
            (parts[1], parts[2])
            for parts in (line.split() for line in self.lua_lines("msfn-test-stored"))
        ]


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    pacs = Orthanc(binary, tmp_path / "orthanc", free_port(), free_port())
    yield pacs
    pacs.stop()


def _node_config(root: Path, orthanc_dicom_port: int) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "listen": {"ae_title": NODE_AET, "bind_address": "127.0.0.1", "port": 0},
            # Orthanc calls in from loopback and sends each stable study in one go.
            "peers": [
                {
                    "ae_title": ORTHANC_AET,
                    "host": "127.0.0.1",
                    "quiet_period_s": NODE_QUIET_PERIOD_S,
                }
            ],
            # No explicit peer destination: results go back to the destination whose AE title
            # is the caller's (NodeConfig.destination_for), i.e. Orthanc.
            "destinations": {
                "pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc_dicom_port}
            },
            "storage": {"root": str(root), "min_free_bytes": 0},
            "processing": {"samples": 2, "steps": 2},  # the chain is the same, only quicker
            "sending": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_attempts": 4},
            "status_page": {"enabled": False},
        }
    )


@pytest.fixture()
def nodes() -> Iterator[list[Node]]:
    """Nodes the test started, stopped at teardown (the test starts the node itself because its
    configuration needs Orthanc's port and Orthanc's needs the node's)."""
    started: list[Node] = []
    yield started
    for n in started:
        n.stop()


def _series_by(orthanc: Orthanc, study_id: str, manufacturer: str) -> list[dict[str, Any]]:
    return [
        s
        for s in orthanc.get(f"/studies/{study_id}/series")
        if s["MainDicomTags"].get("Manufacturer") == manufacturer
    ]


def test_orthanc_routes_a_study_and_gets_seg_and_sr_of_every_therapy_once(
    orthanc: Orthanc,
    nodes: list[Node],
    tmp_path: Path,
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    storescu = _require("storescu", "dcmtk")
    dciodvfy = _require("dciodvfy", "dicom3tools")
    started = time.monotonic()
    root, manifest = simulated_study
    files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file())

    node = Node(_node_config(tmp_path / "node", orthanc.dicom_port))
    node.start()
    nodes.append(node)
    orthanc.start(node.port)

    # The scanner stores the two-visit study into the PACS, which routes it on its own.
    sent = subprocess.run(
        [storescu, "-aet", SCANNER_AET, "-aec", ORTHANC_AET, "127.0.0.1", str(orthanc.dicom_port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr[-2000:]
    studies = {str(v["study_instance_uid"]) for v in manifest["visits"]}
    assert len(orthanc.get("/instances")) == len(files)
    phases = {"stored in Orthanc": time.monotonic() - started}

    # Both visits are studies of their own: each is routed, forecast and answered.
    def finished() -> bool:
        jobs = node.db.jobs()
        return len(jobs) >= len(studies) and all(
            j["state"] in (JobState.DONE.value, JobState.FAILED.value) for j in jobs
        )

    try:
        wait_for(finished, 420, "the node's jobs to finish")
    except AssertionError as exc:
        rows = [dict(j) for j in node.db.jobs()]
        raise AssertionError(f"{exc}\njobs: {rows}\nOrthanc:\n{orthanc.log_tail()}") from None
    phases["routed, forecast, sent back"] = time.monotonic() - started
    jobs = node.db.jobs()
    assert {j["state"] for j in jobs} == {JobState.DONE.value}, [dict(j) for j in jobs]
    assert {str(j["study_uid"]) for j in jobs} == studies

    # The results make each study unstable, then stable again: the Lua script runs again and
    # must route nothing (no loop, nothing sent twice).
    def settled() -> bool:
        return all(orthanc.get(f"/studies/{s}")["IsStable"] for s in orthanc.get("/studies"))

    wait_for(settled, 60, "Orthanc's studies to become stable again")
    time.sleep(2)  # the Lua event queue runs right after the stable event
    assert len(node.db.jobs()) == len(studies)
    received = node.db.query("SELECT calling_ae, COUNT(*) AS n FROM instances GROUP BY calling_ae")
    assert [(r["calling_ae"], r["n"]) for r in received] == [(ORTHANC_AET, len(files))]
    routed = [line for line in orthanc.lua_lines("msfn-autoroute") if "sending" in line]
    assert len(routed) == len(studies), routed

    # Every therapy's SEG and SR arrived in the study it belongs to, under the UIDs the node
    # derives for them, one series each.
    therapies = node.worker.pipeline.therapies
    assert len(therapies) == 7  # placebo and the six treatments
    templates = load_templates(node.config.processing.templates_dir)
    manufacturer = templates.outputs.equipment.manufacturer
    orthanc_studies = {
        orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]: s
        for s in orthanc.get("/studies")
    }
    assert set(orthanc_studies) == studies
    checked: list[str] = []
    for study_uid, study_id in orthanc_studies.items():
        series = _series_by(orthanc, study_id, manufacturer)
        by_uid = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in series}
        seg_series = [s for s in series if s["MainDicomTags"]["Modality"] == "SEG"]
        sr_series = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
        assert len(seg_series) == len(therapies)  # exactly one SEG series per therapy
        assert len(sr_series) == len(therapies) + 1  # one SR per therapy and the comparison
        expected: list[tuple[OutputKind, str | None]] = [(OutputKind.SEG, t) for t in therapies]
        expected += [(OutputKind.SR, t) for t in therapies] + [(OutputKind.COMPARISON_SR, None)]
        for kind, therapy in expected:
            identity = object_identity(templates, study_uid, 1, kind, therapy)
            found = by_uid.get(identity.series_instance_uid)
            assert found is not None, f"{study_uid}: no {kind.value} series for {therapy}"
            assert found["MainDicomTags"]["SeriesDescription"] == identity.series_description
            assert len(found["Instances"]) == 1
            tags = orthanc.get(f"/instances/{found['Instances'][0]}/simplified-tags")
            assert tags["SOPInstanceUID"] == identity.sop_instance_uid
            assert tags["SOPClassUID"] == (SEG if kind is OutputKind.SEG else COMPREHENSIVE_3D_SR)
            checked.append(found["Instances"][0])

    # Once each: Orthanc stored every result instance exactly once (no duplicate SOP Instance
    # UID arrived), and the node's outbox holds each once, sent on the first attempt.
    from_node = [uid for aet, uid in orthanc.arrivals() if aet == NODE_AET]
    ours = {
        str(orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"])
        for s in orthanc_studies.values()
        for r in _series_by(orthanc, s, manufacturer)
        for i in r["Instances"]
    }
    assert sorted(from_node) == sorted(ours)  # nothing else, nothing twice
    outbox = node.db.query("SELECT sop_instance_uid, state, attempts FROM outbox")
    assert sorted(str(r["sop_instance_uid"]) for r in outbox) == sorted(ours)
    assert all(r["state"] == "sent" and r["attempts"] == 1 for r in outbox)

    # What the PACS holds is valid DICOM (downloaded back from Orthanc, not the node's copy).
    out = tmp_path / "from_orthanc"
    out.mkdir()
    for instance_id in checked:
        path = out / f"{instance_id}.dcm"
        path.write_bytes(orthanc.file(instance_id))
        run = subprocess.run(
            [dciodvfy, str(path)], capture_output=True, text=True, check=False, timeout=120
        )
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert not errors, f"{instance_id}: {errors[:5]}"
    phases["checked"] = time.monotonic() - started
    print("Orthanc round trip:", {k: round(v, 1) for k, v in phases.items()})
    stages = {int(j["id"]): json.loads(j["stages"]).get("total_s") for j in jobs}
    print("job seconds:", stages)
