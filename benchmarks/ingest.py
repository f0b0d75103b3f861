"""Ingest speed: the same instances sent by dcmtk's ``storescu`` to the node and to references.

Issue 6 ("Benchmark"): at least 500 instances, sent in one run to

* ``node``            - ``ms-forecast-node serve`` (a subprocess, durable: fsync before success),
* ``orthanc``         - Orthanc from Debian's package (``SyncStorageArea`` on, its default),
* ``storescp``        - dcmtk's ``storescp`` writing to a folder (``--fork``: one process per
                        association, so five associations run in parallel as for the others),
* ``pynetdicom-raw``  - a minimal pynetdicom SCP that only writes the received bytes (the
                        issue's reference), and ``pynetdicom-raw-fsync``, the same plus an
                        fsync per file (what durability alone costs a Python SCP),

over one association and over five parallel associations (five ``storescu`` processes, each
sending a fifth). Every server starts fresh (empty storage) for each measurement, so nothing
is a duplicate; the count each server stored is checked. The node gets a one-hour quiet period
so that no study assembly or job competes with ingest during the measurement.

Instances: copies of the simulated follow-up 3D T1 series (176 single-frame MR objects of
256 x 240, about 125 KB each) with new Study/Series/SOP Instance UIDs, kept in a temporary
folder and read once before the first measurement so that every target sees a warm cache.

The issue's targets: node >= 3x Orthanc over one association and >= 2x over five.

Note on the references: Debian's dcmtk (3.6.7) leaves Nagle's algorithm on unless the
environment says ``TCP_NODELAY=1``; ``storescp`` (and Orthanc, which uses dcmtk's network
layer) writes each C-STORE response as two small writes, so each response waits for the
requestor's delayed ACK (about 40 ms on Linux). ``--tcp-nodelay`` sets ``TCP_NODELAY=1`` for
every dcmtk process (storescu, storescp, Orthanc) to measure them without that stall.

    .venv/bin/python benchmarks/ingest.py [--instances 500] [--out FILE.json] [--study DIR]
        [--tcp-nodelay] [--targets node,orthanc,...] [--profile]

``--profile`` also runs the node's C-STORE handler path (``Ingest.store``) in-process on the
same instances and prints where its time goes (header parse, fsyncs, SQLite, ...).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pydicom
import yaml
from pydicom.uid import generate_uid

if TYPE_CHECKING:
    from _typeshed import HasFileno

ALL_TARGETS = ("node", "orthanc", "storescp", "pynetdicom-raw", "pynetdicom-raw-fsync")
ASSOCIATIONS = (1, 5)
TARGET_ONE = 3.0  # node / Orthanc over one association (issue 6)
TARGET_FIVE = 2.0  # node / Orthanc over five associations
CALLING_AE = "STORESCU"

# Every process this benchmark starts; killed on exit, whatever happens.
_PROCESSES: list[subprocess.Popen[bytes]] = []


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the process group ``proc`` leads (``storescp --fork`` children included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _kill_all() -> None:
    for proc in _PROCESSES:
        _signal_group(proc, signal.SIGKILL)  # its children may outlive a finished leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        # Own session: one killpg reaches the process and anything it forks.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _PROCESSES.append(proc)
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )


def dcmtk_env(tcp_nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"  # read by dcmtk's DUL layer (storescu, storescp, Orthanc)
    return env


# --- instances --------------------------------------------------------------------------------
def simulate(out: Path) -> Path:
    command = [sys.executable, "-m", "ms_forecast_node", "simulate", "study", "--seed", "1"]
    subprocess.run(
        [*command, "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def make_instances(study: Path, n: int, out: Path) -> list[Path]:
    """``n`` copies of the follow-up T1 slices under new UIDs: one new study, one new series
    per pass over the 176 slices (a scanner-like layout; every SOP Instance UID is unique)."""
    sources = sorted((study / "dicom" / "followup").glob("*t1*/*.dcm"))
    if not sources:
        raise SystemExit(f"no follow-up T1 series under {study / 'dicom'}")
    datasets = [pydicom.dcmread(p) for p in sources]
    out.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    files: list[Path] = []
    for copy_index in range(math.ceil(n / len(sources))):
        series_uid = generate_uid()
        for ds in datasets:
            if len(files) == n:
                break
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1000 + copy_index
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out / f"{len(files):05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def warm(files: list[Path]) -> int:
    """Read every file once (page cache); returns the total size in bytes."""
    return sum(len(p.read_bytes()) for p in files)


# --- servers ----------------------------------------------------------------------------------
@dataclass
class Server:
    """A running target: where to send, how to count what it stored, how to stop it."""

    name: str
    port: int
    called_ae: str
    proc: subprocess.Popen[bytes]
    log: Path
    count: Callable[[], int]
    cleanup: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the leader only: let it shut down cleanly
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _signal_group(self.proc, signal.SIGKILL)  # leftovers, e.g. storescp --fork children
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _echo(port: int, called_ae: str) -> bool:
    echoscu = tool("echoscu")
    assert echoscu is not None
    result = subprocess.run(
        [echoscu, "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return result.returncode == 0


def _wait_ready(server: Server, timeout_s: float = 180.0) -> Server:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{tail}")
        if _echo(server.port, server.called_ae):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer C-ECHO within {timeout_s:.0f} s")


def _count_files(folder: Path, pattern: str = "*") -> Callable[[], int]:
    return lambda: sum(1 for p in folder.rglob(pattern) if p.is_file())


def start_node(work: Path, env: dict[str, str]) -> Server:
    root = work / "node"
    port = free_port()
    config = {
        "listen": {"ae_title": "MSFORECAST", "bind_address": "127.0.0.1", "port": port},
        # One hour of quiet: no study version or job is made while we measure ingest.
        "peers": [{"ae_title": CALLING_AE, "quiet_period_s": 3600}],
        "storage": {"root": str(root)},
        "status_page": {"enabled": False},
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = work / "node.log"
    proc = _spawn([sys.executable, "-m", "ms_forecast_node", "serve", "--config", str(path)], log)

    def count() -> int:
        con = sqlite3.connect(f"file:{root / 'node.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            con.close()

    return _wait_ready(Server("node", port, "MSFORECAST", proc, log, count, [root]))


def start_orthanc(work: Path, env: dict[str, str]) -> Server | None:
    binary = tool("Orthanc")
    if binary is None:
        print("orthanc: not installed (apt-get install orthanc) - skipped")
        return None
    storage = work / "orthanc"
    storage.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = {
        "Name": "ingest-benchmark",
        "StorageDirectory": str(storage / "storage"),
        "IndexDirectory": str(storage / "index"),
        "StorageCompression": False,
        "SyncStorageArea": True,  # Debian's default: durable, as the node
        "Plugins": [],  # no DICOMweb plugin: plain C-STORE ingest
        "HttpServerEnabled": True,  # only to count instances after a run
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomThreadsCount": 4,  # Debian's default
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = work / "orthanc.log"
    proc = _spawn([binary, str(path)], log, env=env)

    def count() -> int:
        url = f"http://127.0.0.1:{http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:  # loopback only
            return int(json.load(response)["CountInstances"])

    return _wait_ready(Server("orthanc", port, "ORTHANC", proc, log, count, [storage]))


def start_storescp(work: Path, env: dict[str, str]) -> Server | None:
    binary = tool("storescp")
    if binary is None:
        print("storescp: dcmtk not installed - skipped")
        return None
    folder = work / "storescp"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = work / "storescp.log"
    proc = _spawn([binary, "--fork", "-aet", "STORESCP", "-od", str(folder), str(port)], log, env)
    return _wait_ready(
        Server("storescp", port, "STORESCP", proc, log, _count_files(folder), [folder])
    )


RAW_SCP = """
import os, sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (EnhancedMRImageStorage, MRImageStorage, SegmentationStorage,
                                  Verification)
port, folder, fsync = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"

def on_store(event):
    raw = event.encoded_dataset(include_meta=True)
    path = os.path.join(folder, str(event.request.AffectedSOPInstanceUID) + ".dcm")
    with open(path, "wb") as fh:
        fh.write(raw)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return 0x0000

ae = AE(ae_title="RAWSCP")
ae.add_supported_context(Verification)
for sop in (MRImageStorage, EnhancedMRImageStorage, SegmentationStorage):
    ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
ae.maximum_associations = 10  # as the node's default limits
ae.maximum_pdu_size = 1048576
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def start_raw(work: Path, env: dict[str, str], *, fsync: bool) -> Server:
    name = "pynetdicom-raw-fsync" if fsync else "pynetdicom-raw"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = work / f"{name}.log"
    args = [sys.executable, "-c", RAW_SCP, str(port), str(folder), "1" if fsync else "0"]
    proc = _spawn(args, log)
    return _wait_ready(Server(name, port, "RAWSCP", proc, log, _count_files(folder), [folder]))


def start(name: str, work: Path, env: dict[str, str]) -> Server | None:
    work.mkdir(parents=True, exist_ok=True)
    if name == "node":
        return start_node(work, env)
    if name == "orthanc":
        return start_orthanc(work, env)
    if name == "storescp":
        return start_storescp(work, env)
    return start_raw(work, env, fsync=name.endswith("fsync"))


# --- measurement ------------------------------------------------------------------------------
def send(server: Server, files: list[Path], associations: int, env: dict[str, str]) -> float:
    """Wall seconds for ``associations`` storescu processes to send ``files`` between them."""
    storescu = tool("storescu")
    assert storescu is not None
    size = math.ceil(len(files) / associations)
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    logs = [
        server.log.with_name(f"storescu-{server.name}-{associations}-{i}.log")
        for i in range(len(chunks))
    ]
    began = time.perf_counter()
    procs = [
        _spawn(
            [storescu, "-aet", CALLING_AE, "-aec", server.called_ae, "127.0.0.1", str(server.port)]
            + [str(p) for p in chunk],
            log,
            env,
        )
        for chunk, log in zip(chunks, logs, strict=True)
    ]
    codes = [p.wait(timeout=3600) for p in procs]
    elapsed = time.perf_counter() - began
    if any(codes):
        tails = "\n".join(log.read_text(errors="replace")[-1500:] for log in logs)
        raise RuntimeError(f"storescu to {server.name} failed ({codes}):\n{tails}")
    return elapsed


@dataclass
class Result:
    target: str
    associations: int
    seconds: float
    instances: int  # all stored: measure_once checks the server's count

    @property
    def images_per_s(self) -> float:
        return self.instances / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "associations": self.associations,
            "seconds": round(self.seconds, 3),
            "instances": self.instances,
            "images_per_s": round(self.images_per_s, 1),
            "ms_per_image": round(1000 * self.seconds / self.instances, 2),
        }


def measure_once(
    name: str, files: list[Path], associations: int, work: Path, env: dict[str, str]
) -> float | None:
    """Seconds for one fresh ``name`` server to receive ``files``; ``None`` when unavailable."""
    server = start(name, work, env)
    if server is None:
        return None
    try:
        seconds = send(server, files, associations, env)
        stored = server.count()
    finally:
        server.stop()
    if stored != len(files):
        raise RuntimeError(f"{name} stored {stored} of {len(files)} instances")
    return seconds


# --- profile of the node's C-STORE path -------------------------------------------------------
@contextlib.contextmanager
def _timed(table: dict[str, list[float]], module: Any, attr: str, label: str) -> Iterator[None]:
    """Wrap ``module.attr`` so that each call's wall time is added to ``table[label]``."""
    original = getattr(module, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            table.setdefault(label, []).append(time.perf_counter() - t0)

    setattr(module, attr, wrapper)
    try:
        yield
    finally:
        setattr(module, attr, original)


@contextlib.contextmanager
def _timed_fsync(table: dict[str, list[float]]) -> Iterator[None]:
    """``os.fsync`` timed apart for files and directories (the rename's directory entry)."""
    original = os.fsync

    def wrapper(fd: int | HasFileno) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        label = "fsync directory" if stat.S_ISDIR(os.fstat(number).st_mode) else "fsync file"
        t0 = time.perf_counter()
        try:
            original(fd)
        finally:
            table.setdefault(label, []).append(time.perf_counter() - t0)

    os.fsync = wrapper
    try:
        yield
    finally:
        os.fsync = original


def profile_ingest(files: list[Path], work: Path) -> dict[str, Any]:
    """``Ingest.store`` on every instance in-process (no network): time per step.

    The raw bytes are the files' bytes, i.e. what ``event.encoded_dataset(include_meta=True)``
    hands the handler for these instances."""
    from ms_forecast_node.config.settings import NodeConfig
    from ms_forecast_node.receive import ingest as ingest_module
    from ms_forecast_node.store.database import Database

    root = work / "profile-node"
    shutil.rmtree(root, ignore_errors=True)
    config = NodeConfig.model_validate({"storage": {"root": str(root)}})
    db = Database(config.storage.database_path)
    ingest = ingest_module.Ingest(config, db)
    raws = [p.read_bytes() for p in files]
    requests = []
    for raw, path in zip(raws, files, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        requests.append((raw, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    table: dict[str, list[float]] = {}
    # Steps in the order Ingest.store runs them; fsync of the file and of its directory apart.
    with contextlib.ExitStack() as stack:
        stack.enter_context(_timed(table, ingest_module.shutil, "disk_usage", "disk_usage"))
        stack.enter_context(_timed(table, ingest_module.pydicom, "dcmread", "header parse"))
        stack.enter_context(_timed(table, db, "has_instance", "sqlite has_instance"))
        stack.enter_context(_timed(table, db, "study_instance_count", "sqlite study count"))
        stack.enter_context(_timed(table, ingest_module, "_make_dirs", "make_dirs"))
        stack.enter_context(_timed_fsync(table))
        stack.enter_context(_timed(table, ingest_module.os, "replace", "rename"))
        stack.enter_context(_timed(table, db, "add_instance", "sqlite add_instance (commit)"))
        began = time.perf_counter()
        for raw, sop_class, sop in requests:
            outcome = ingest.store(
                raw,
                request_sop_class=sop_class,
                request_sop_instance=sop,
                calling_ae=CALLING_AE,
                peer_host="127.0.0.1",
            )
            assert outcome.reason == "stored", outcome
        total = time.perf_counter() - began
    db.close()
    shutil.rmtree(root, ignore_errors=True)
    n = len(requests)
    steps = {k: round(1000 * sum(v) / n, 3) for k, v in table.items()}
    steps["other (checks, open + write, dir open/close)"] = round(
        1000 * total / n - sum(steps.values()), 3
    )
    return {"instances": n, "ms_per_instance": round(1000 * total / n, 3), "steps_ms": steps}


# --- report -----------------------------------------------------------------------------------
def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    by = {(r.target, r.associations): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for n in ASSOCIATIONS:
        node = by.get(("node", n))
        if node is None:
            continue
        out[f"{n}_association{'s' if n > 1 else ''}"] = {
            f"node/{r.target}": round(node.images_per_s / r.images_per_s, 2)
            for r in results
            if r.associations == n and r.target != "node"
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500, help="instances per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--study", type=Path, default=None, help="a simulated study to copy")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="median of this many runs")
    parser.add_argument(
        "--tcp-nodelay", action="store_true", help="TCP_NODELAY=1 for dcmtk (see the docstring)"
    )
    parser.add_argument("--profile", action="store_true", help="profile Ingest.store in-process")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    if tool("storescu") is None or tool("echoscu") is None:
        print("dcmtk (storescu, echoscu) is not installed: apt-get install dcmtk")
        return 2
    atexit.register(_kill_all)
    signal.signal(signal.SIGTERM, _on_signal)
    env = dcmtk_env(args.tcp_nodelay)
    load_at_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="msfn-ingest-") as tmp:
        work = Path(tmp)
        try:
            study = args.study or simulate(work / "study")
            files = make_instances(study, args.instances, work / "instances")
            total_bytes = warm(files)
            print(
                f"{len(files)} instances, {total_bytes / 1e6:.1f} MB "
                f"({total_bytes / len(files) / 1e3:.0f} KB each); "
                f"TCP_NODELAY for dcmtk: {'1' if args.tcp_nodelay else 'unset (Debian default)'}"
            )
            # Repeats outermost: the machine is shared, so its load drifts; interleaving the
            # targets spreads that drift over all of them instead of one.
            times: dict[tuple[str, int], list[float]] = {}
            skipped: set[str] = set()
            for rep in range(args.repeat):
                for n in ASSOCIATIONS:
                    for name in targets:
                        if name in skipped:
                            continue
                        run_dir = work / "runs" / f"{name}-{n}-{rep}"
                        seconds = measure_once(name, files, n, run_dir, env)
                        if seconds is None:
                            skipped.add(name)
                            continue
                        times.setdefault((name, n), []).append(seconds)
                        print(
                            f"  {name:<22} {n} assoc: {seconds:7.2f} s  "
                            f"{len(files) / seconds:7.1f} images/s  "
                            f"{1000 * seconds / len(files):6.1f} ms/image",
                            flush=True,
                        )
            results = [
                Result(name, n, statistics.median(values), len(files))
                for (name, n), values in times.items()
            ]
            profile = profile_ingest(files, work) if args.profile else None
        finally:
            _kill_all()

    if args.repeat > 1:
        print(f"\nmedians of {args.repeat} runs:")
        for r in results:
            print(f"  {r.target:<22} {r.associations} assoc: {r.images_per_s:7.1f} images/s")
    table = ratios(results)
    print("\nratios (images/s of the node over the other):")
    for mode, values in table.items():
        print(f"  {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    targets_met: dict[str, Any] = {}
    for n, goal in ((1, TARGET_ONE), (5, TARGET_FIVE)):
        key = f"{n}_association{'s' if n > 1 else ''}"
        ratio = table.get(key, {}).get("node/orthanc")
        if ratio is not None:
            targets_met[f"node/orthanc {key} >= {goal:g}"] = {"ratio": ratio, "met": ratio >= goal}
            print(
                f"  target node/orthanc {key} >= {goal:g}: {ratio:.2f} "
                f"{'met' if ratio >= goal else 'NOT met'}"
            )
    if profile is not None:
        print(f"\nIngest.store in-process: {profile['ms_per_instance']:.2f} ms per instance")
        for step, ms in sorted(profile["steps_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {step:<52} {ms:7.3f} ms")
    report = {
        "benchmark": "ingest",
        "instances": len(files),
        "bytes": total_bytes,
        "tcp_nodelay_for_dcmtk": args.tcp_nodelay,
        "repeat": args.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": [r.as_json() for r in results],
        "skipped": sorted(skipped),
        "runs_seconds": {f"{name}/{n}": values for (name, n), values in times.items()},
        "ratios": table,
        "targets": targets_met,
        "profile": profile,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the finally blocks have cleaned up
        print(f"interrupted ({exc or 'Ctrl-C'})", file=sys.stderr)
        sys.exit(130)
