"""The node over real loopback associations: dcmtk clients in, results out to a receiver."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.dataset
import pydicom.uid
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from ms_forecast_node.node import Node
from ms_forecast_node.store.database import JobState

from .node_helpers import Receiver, dcmtk, node_config, storescu, wait_for

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture()
def node(tmp_path: Path, receiver: Receiver) -> Iterator[Node]:
    n = Node(node_config(tmp_path / "node", receiver.port))
    n.start()
    yield n
    n.stop()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_echoscu_works_and_unknown_calling_ae_is_rejected(node: Node) -> None:
    ok = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "MSFORECAST", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "MSFORECAST", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr or "Rejected" in bad.stderr
    wrong_called = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "SOMEONE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong_called.returncode != 0
    # The node writes an association's audit record when the association ends on its side,
    # which may come after the peer's tool has exited.
    wait_for(
        lambda: any(
            r["outcome"] == "rejected" and r["calling_ae"] == "INTRUDER"
            for r in node.audit.records()
        ),
        30,
        "the rejected association's audit record",
    )


@pytest.mark.slow
def test_study_in_results_out_exactly_once(
    node: Node, receiver: Receiver, simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    root, _ = simulated_study
    files = _files(root / "dicom")
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr[-2000:]
    stored = {p for p in (node.config.storage.root / "instances").rglob("*.dcm")}
    assert len(stored) == len(files)  # every acknowledged instance is on disk
    # Two studies (baseline, follow-up) arrive; both are forecast, the follow-up with its prior.
    wait_for(
        lambda: sum(1 for j in node.db.jobs() if j["state"] in ("done", "failed")) >= 2,
        600,
        "both jobs to finish",
    )
    jobs = node.db.jobs()
    assert {j["state"] for j in jobs} == {JobState.DONE.value}, [dict(j) for j in jobs]
    assert all(count == 1 for count in receiver.counts.values())  # once each
    therapies = 7
    per_study: dict[str, dict[str, int]] = {}
    for ds in receiver.received:
        kinds = per_study.setdefault(str(ds.StudyInstanceUID), {})
        kinds[str(ds.SOPClassUID)] = kinds.get(str(ds.SOPClassUID), 0) + 1
    assert len(per_study) == 2
    for kinds in per_study.values():
        assert kinds[SEG] == therapies
        assert kinds[SR] == therapies + 1  # one per therapy and the comparison
    # Sending the same study again changes nothing: idempotent ingest, no new version.
    again = storescu(node.port, files[:20])
    assert again.returncode == 0
    node.assembler.tick(now=1e12)
    assert len(node.db.jobs()) == 2


def _mr_dataset(sop_uid: str, study_uid: str | None = None) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HOSTILE"
    ds.PatientName = "Müller^Zoë"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Modality = "MR"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 32
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def _send(port: int, ds: pydicom.Dataset, calling: str = "STORESCU") -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSFORECAST")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_hostile_instances_are_refused_with_a_reason_and_the_node_keeps_serving(
    node: Node, tmp_path: Path
) -> None:
    # A UID with path characters never becomes a path.
    bad_uid = _mr_dataset("1.2.3")
    bad_uid.StudyInstanceUID = "../../etc"
    assert _send(node.port, bad_uid) == 0xC000
    # Absurd dimensions.
    huge = _mr_dataset(generate_uid())
    huge.Rows, huge.Columns, huge.NumberOfFrames = 65535, 65535, 1000
    assert _send(node.port, huge) == 0xC000
    # Unicode patient names are stored fine.
    unicode = _mr_dataset(generate_uid())
    assert _send(node.port, unicode) == 0x0000
    stored = next((node.config.storage.root / "instances").rglob("*.dcm"))
    assert str(pydicom.dcmread(stored).PatientName) == "Müller^Zoë"
    # The same instance twice: success, stored once.
    assert _send(node.port, unicode) == 0x0000
    assert len(list((node.config.storage.root / "instances").rglob("*.dcm"))) == 1
    assert not list((node.config.storage.root).rglob("etc"))
    # A truncated file, sent byte for byte as it is on disk.
    whole = tmp_path / "whole.dcm"
    complete = _mr_dataset(generate_uid())
    complete.save_as(whole, enforce_file_format=True)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole.read_bytes()[:-10])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MSFORECAST")
    assert int(assoc.send_c_store(truncated).Status) == 0xC000
    assoc.release()
    # A non-MR object (CT): its presentation context is refused, storescu says so.
    ct = _mr_dataset(generate_uid())
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.file_meta.MediaStorageSOPClassUID = ct.SOPClassUID
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.Modality = "CT"
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    refused = storescu(node.port, [tmp_path / "ct.dcm"])
    assert refused.returncode != 0 or "No presentation context" in refused.stderr
    assert len(list((node.config.storage.root / "instances").rglob("*.dcm"))) == 1

    def refusals() -> dict[str, int]:
        found: dict[str, int] = {}
        for r in node.audit.records():
            for reason, n in r["refusals"].items():
                found[reason] = found.get(reason, 0) + n
        return found

    # Audit records are written as each association ends on the node's side.
    wait_for(
        lambda: {"invalid_uid", "absurd_dimensions", "truncated_dataset"} <= set(refusals()),
        30,
        "audit records of the three refusals",
    )
    # Still serving.
    ok = subprocess.run(
        [dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "MSFORECAST", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0


def test_a_job_waits_while_another_study_of_the_patient_is_arriving(tmp_path: Path) -> None:
    from ms_forecast_node.assemble.studies import StudyAssembler
    from ms_forecast_node.store.database import Database, InstanceRecord

    config = node_config(tmp_path / "node", 1)
    db = Database(tmp_path / "state.sqlite")

    def add(study: str, sop: str, now: float) -> None:
        db.add_instance(
            InstanceRecord(
                sop,
                MRImageStorage,
                study,
                study + ".1",
                "P1",
                "MR",
                f"/x/{sop}",
                1,
                "STORESCU",
                "127.0.0.1",
            ),
            now=now,
        )

    add("1.2.3", "1.2.3.1.1", now=100.0)  # follow-up, complete
    add("1.2.4", "1.2.4.1.1", now=130.0)  # baseline of the same patient, still arriving
    assembler = StudyAssembler(config, db)
    assert assembler.tick(now=102.0)  # the follow-up's quiet period (1 s) has passed
    assert db.next_runnable_job() is None  # ... but its prior is still arriving
    assembler.tick(now=140.0)
    job = db.next_runnable_job()
    assert job is not None and job["study_uid"] == "1.2.3"
