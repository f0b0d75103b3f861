"""Prior visit fetched from a PACS by C-FIND / C-MOVE when the node has none of the patient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ms_forecast_node.node import Node

from .node_helpers import Receiver, node_config, storescu, wait_for


class FakePACS:
    """A Query/Retrieve SCP holding the baseline study; moves it to the node on request."""

    def __init__(self, files: list[Path], node_port: int) -> None:
        self.files = files
        self.node_port = node_port
        self.moves = 0
        ae = AE(ae_title="PACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
        for uid in classes:
            ae.add_requested_context(uid)
        self.headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        first = self.headers[0]
        if str(query.get("PatientID", "")) in ("", str(first.PatientID)):
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.PatientID = first.PatientID
            answer.StudyInstanceUID = first.StudyInstanceUID
            answer.StudyDate = first.StudyDate
            answer.ModalitiesInStudy = "MR"
            yield 0xFF00, answer
        yield 0x0000, None

    def _move(self, event: evt.Event) -> Iterator[Any]:
        self.moves += 1
        yield "127.0.0.1", self.node_port
        yield len(self.files)
        for f in self.files:
            yield 0xFF00, pydicom.dcmread(f)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.slow
def test_prior_is_moved_from_the_pacs_and_used(
    tmp_path: Path, simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    root, manifest = simulated_study
    baseline = sorted(p for p in (root / "dicom" / "baseline").rglob("*") if p.is_file())
    followup = sorted(p for p in (root / "dicom" / "followup").rglob("*") if p.is_file())
    receiver = Receiver().start()
    # The node's port must be known to the fake PACS before it starts: start the node first
    # with the PACS's port patched in afterwards is not possible (frozen config), so start the
    # PACS with a placeholder and set the port once the node listens.
    pacs = FakePACS(baseline, node_port=0)
    config = node_config(
        tmp_path / "node",
        receiver.port,
        destinations={
            "results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": receiver.port},
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
        },
        prior_retrieval={"source": "pacs"},
    )
    node = Node(config)
    node.start()
    pacs.node_port = node.port
    try:
        assert storescu(node.port, followup).returncode == 0
        wait_for(
            lambda: any(j["state"] in ("done", "failed") for j in node.db.jobs()), 600, "the job"
        )
        jobs = node.db.jobs()
        assert len(jobs) == 1, "the retrieved prior must not become a job of its own"
        job = jobs[0]
        assert job["state"] == "done", dict(job)
        assert pacs.moves == 1
        summary = json.loads(job["summary"])
        baseline_uid = manifest["visits"][0]["study_instance_uid"]
        assert summary["prior"].startswith(f"prior study {baseline_uid}")
        assert summary["preprocessing"]["prior_study"] == baseline_uid
        node.assembler.tick(now=1e12)
        assert len(node.db.jobs()) == 1
    finally:
        node.stop()
        pacs.stop()
        receiver.stop()
