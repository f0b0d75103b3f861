"""SR per therapy and the comparison SR: every number read back with highdicom, dcmqi's
tid1500reader accepts them; identity and provenance of every object; deterministic UIDs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

from ms_forecast_node import __version__
from ms_forecast_node.report.build import build_outputs
from ms_forecast_node.report.inputs import ReportInput
from ms_forecast_node.report.templates import OutputKind, Templates

from .report_fixtures import (
    EMPTY_THERAPY,
    FIXTURE_MODEL,
    T2_FOLDER,
    WrittenCase,
    cached_input,
    cached_outputs,
    cached_templates,
    make_report_input,
    written_case,
)

TID1500READER = Path(sys.executable).parent / "tid1500reader"
DISCLAIMER_ASCII = "RESEARCH FORECAST - NOT FOR DIAGNOSTIC USE"
REL = 1e-9


Case = WrittenCase


@pytest.fixture(scope="module", params=["enhanced_flair", "classic_t2"])
def case(
    request: pytest.FixtureRequest,
    simulated_study: tuple[Path, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Case:
    study, _ = simulated_study
    return written_case(study, request.param, tmp_path_factory.mktemp(f"sr_{request.param}"))


@pytest.fixture(scope="module")
def templates() -> Templates:
    return cached_templates()


def report_of(sr: Any) -> hd.sr.MeasurementReport:
    # highdicom types SR content as a generic ContentSequence; read back it is the template.
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def code_of(concept: Any) -> tuple[str, str]:
    return (str(concept.scheme_designator), str(concept.value))


def numbers(group: Any) -> dict[tuple[str, str | None], float]:
    """{(concept code value, derivation code value or None): value} of one group."""
    out = {}
    for m in group.get_measurements():
        key = (str(m.name.value), str(m.derivation.value) if m.derivation is not None else None)
        assert key not in out, f"duplicate measurement {key}"
        out[key] = float(m.value)
    return out


def therapy_code(group: Any, templates: Templates) -> str:
    therapy_concept = templates.codes.concepts.therapy.value
    values = [
        e.value for e in group.get_qualitative_evaluations() if e.name.value == therapy_concept
    ]
    assert len(values) == 1
    return str(values[0].value)


def texts(sr: Any) -> list[str]:
    return [
        str(item.TextValue)
        for container in sr.ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]


def expected_summary(
    report_input: ReportInput, therapy: str
) -> dict[tuple[str, str | None], float]:
    f = report_input.result.therapies[therapy]
    return {
        ("MSFN-C03", None): report_input.result.horizon_weeks,
        ("246206008", "373098007"): f.expected_count,
        ("246206008", "371888009"): f.count_interval_90[0],
        ("246206008", "371889001"): f.count_interval_90[1],
        ("MSFN-C02", None): f.probability_of_activity,
        ("118565006", "373098007"): f.volume_mm3_mean,
        ("118565006", "371888009"): f.volume_interval_90[0],
        ("118565006", "371889001"): f.volume_interval_90[1],
    }


def assert_summary_groups(
    groups: list[Any], report_input: ReportInput, therapy: str, templates: Templates, prefix: str
) -> None:
    main = [g for g in groups if g.tracking_identifier == prefix]
    assert len(main) == 1
    got = numbers(main[0])
    got.pop(("MSFN-C05", None), None)  # rank, checked by the comparison test
    assert got == pytest.approx(expected_summary(report_input, therapy), rel=REL)
    assert therapy_code(main[0], templates) == templates.therapy(therapy).code.value
    by_location = report_input.result.therapies[therapy].expected_counts_by_location()
    for location, count in by_location.items():
        site = templates.codes.location(location.value)
        matching = [
            g
            for g in groups
            if g.tracking_identifier == f"{prefix} {location.value}"
            and [code_of(s.value) for s in g.finding_sites] == [(site.scheme, site.value)]
        ]
        assert len(matching) == 1, location
        assert numbers(matching[0]) == pytest.approx({("246206008", "373098007"): count}, rel=REL)


def test_therapy_sr_gives_back_every_number(case: Case, templates: Templates) -> None:
    report_input = case.report_input
    reference = report_input.reference
    for therapy, native in report_input.native.items():
        sr = hd.sr.srread(case.path(OutputKind.SR, therapy))
        report = report_of(sr)
        groups = report.get_image_measurement_groups()
        assert_summary_groups(groups, report_input, therapy, templates, f"therapy {therapy}")
        seg = case.dataset(OutputKind.SEG, therapy)
        lesions = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
        assert set(lesions) == {f"lesion {lesion.label}" for lesion in native.lesions}
        for lesion in native.lesions:
            group = lesions[f"lesion {lesion.label}"]
            segment = group.referenced_segment
            assert segment is not None
            assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert segment.referenced_segment_numbers == [1]
            # Source frames referenced == frames the lesion has voxels on.
            ks = np.flatnonzero((native.labels == lesion.label).any(axis=(1, 2)))
            expected_sources = defaultdict(set)
            for k in ks:
                s = reference.slice_sources[int(k)]
                expected_sources[str(reference.headers[s.instance].SOPInstanceUID)].add(s.frame)
            got_sources = {
                str(img.referenced_sop_instance_uid): set(img.referenced_frame_numbers or [0])
                for img in segment.source_images_for_segmentation
            }
            assert got_sources == expected_sources
            site = templates.codes.location(lesion.location.value)
            assert [code_of(s.value) for s in group.finding_sites] == [(site.scheme, site.value)]
            x, y, z = lesion.centroid_lps_mm
            assert numbers(group) == pytest.approx(
                {
                    ("118565006", None): lesion.volume_mm3,
                    ("MSFN-C04", None): lesion.mean_probability,
                    ("MSFN-C06", None): x,
                    ("MSFN-C07", None): y,
                    ("MSFN-C08", None): z,
                },
                rel=REL,
            )
        lines = texts(sr)
        assert lines[0] == DISCLAIMER_ASCII
        assert any(FIXTURE_MODEL[2] in line and FIXTURE_MODEL[0] in line for line in lines)
        observer = report.get_observer_contexts()[0]
        assert observer.observer_identifying_attributes.name == FIXTURE_MODEL[0]


def test_empty_forecast_sr(case: Case, templates: Templates) -> None:
    sr = hd.sr.srread(case.path(OutputKind.SR, EMPTY_THERAPY))
    report = report_of(sr)
    assert report.get_volumetric_roi_measurement_groups() == []
    main = report.get_image_measurement_groups()[0]
    assert numbers(main)[("246206008", "373098007")] == 0.0
    assert templates.outputs.report.empty_forecast in texts(sr)


def test_comparison_sr_is_ranked_and_gives_back_every_number(
    case: Case, templates: Templates
) -> None:
    report_input = case.report_input
    sr = hd.sr.srread(case.path(OutputKind.COMPARISON_SR, None))
    groups = report_of(sr).get_image_measurement_groups()
    ranked = report_input.result.ranked()
    heads = [g for g in groups if str(g.tracking_identifier).count(" ") == 3]
    assert [g.tracking_identifier for g in heads] == [
        f"rank {i} therapy {f.therapy}" for i, f in enumerate(ranked, start=1)
    ]
    expected_counts = [f.expected_count for f in ranked]
    assert expected_counts == sorted(expected_counts)
    for rank, (head, forecast) in enumerate(zip(heads, ranked, strict=True), start=1):
        assert numbers(head)[("MSFN-C05", None)] == rank
        assert therapy_code(head, templates) == templates.therapy(forecast.therapy).code.value
        assert_summary_groups(
            groups,
            report_input,
            forecast.therapy,
            templates,
            f"rank {rank} therapy {forecast.therapy}",
        )
    lines = texts(sr)
    assert DISCLAIMER_ASCII in lines
    assert any(line.startswith("1. ") for line in lines)


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.skipif(not TID1500READER.exists(), reason="dcmqi (tid1500reader) not installed")
@pytest.mark.parametrize(
    ("kind", "therapy"),
    [(OutputKind.SR, "placebo"), (OutputKind.SR, EMPTY_THERAPY), (OutputKind.COMPARISON_SR, None)],
)
def test_dcmqi_tid1500reader_accepts_the_reports(
    case: Case, kind: OutputKind, therapy: str | None, tmp_path: Path
) -> None:
    out = tmp_path / "sr.json"
    result = subprocess.run(
        [
            str(TID1500READER),
            "--inputDICOM",
            str(case.path(kind, therapy)),
            "--outputMetadata",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    groups = data["Measurements"]
    n_therapies = len(case.report_input.native)
    if kind is OutputKind.COMPARISON_SR:
        assert len(groups) == n_therapies * 5
        return
    native = case.report_input.native[therapy]  # type: ignore[index]
    assert len(groups) == 5 + len(native.lesions)
    seg_uid = case.dataset(OutputKind.SEG, therapy).SOPInstanceUID
    lesion_groups = [g for g in groups if g["TrackingIdentifier"].startswith("lesion")]
    assert all(g["segmentationSOPInstanceUID"] == seg_uid for g in lesion_groups)
    values = {
        (i["quantity"]["CodeValue"], i.get("derivationModifier", {}).get("CodeValue")): float(
            i["value"]
        )
        for i in groups[0]["measurementItems"]
    }
    expected = expected_summary(case.report_input, therapy)  # type: ignore[arg-type]
    assert values == pytest.approx(expected, rel=1e-6)


def test_identity_and_provenance_in_every_object(case: Case, templates: Templates) -> None:
    source = case.report_input.reference.headers[0]
    series: dict[str, set[tuple[str, str | None]]] = defaultdict(set)
    sop_uids = set()
    for obj in case.objects:
        ds = obj.dataset
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyDate",
            "AccessionNumber",
        ):
            assert str(ds.get(keyword, "")) == str(source.get(keyword, "")), (obj.kind, keyword)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        series[ds.SeriesInstanceUID].add((obj.kind.value, obj.therapy))
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.SOPInstanceUID.startswith(templates.outputs.uid_root)
        assert ds.SeriesDescription.endswith(DISCLAIMER_ASCII)
        assert ds.Manufacturer == templates.outputs.equipment.manufacturer
        assert f"ms-forecast-node {__version__}" in ds.SoftwareVersions
        assert any(
            FIXTURE_MODEL[2] in e.get("ContributionDescription", "")
            for e in ds.ContributingEquipmentSequence
        )
    assert len(sop_uids) == len(case.objects)
    # One series per object kind and therapy (key images of a therapy share their series).
    assert all(len(members) == 1 for members in series.values())


def test_rebuilding_replaces_and_a_new_version_does_not(
    simulated_study: tuple[Path, dict[str, Any]], templates: Templates
) -> None:
    study, _ = simulated_study
    folder = study / T2_FOLDER
    kinds = [OutputKind.SEG, OutputKind.SR, OutputKind.COMPARISON_SR]
    cached = {
        (o.kind, o.therapy): (o.dataset.SeriesInstanceUID, o.dataset.SOPInstanceUID)
        for o in cached_outputs(folder)
        if o.kind in kinds
    }
    again = build_outputs(cached_input(folder), templates, kinds)
    assert {
        (o.kind, o.therapy): (o.dataset.SeriesInstanceUID, o.dataset.SOPInstanceUID) for o in again
    } == cached
    version_2 = make_report_input(cached_input(folder).reference, study_version=2)
    newer = build_outputs(version_2, templates, kinds)
    # A new study version supersedes the old objects in the PACS: same UIDs, new content.
    assert {
        (o.kind, o.therapy): (o.dataset.SeriesInstanceUID, o.dataset.SOPInstanceUID) for o in newer
    } == cached


def test_sr_without_seg_keeps_the_therapy_numbers(case: Case, templates: Templates) -> None:
    objects = build_outputs(case.report_input, templates, ["sr"])
    assert {o.kind for o in objects} == {OutputKind.SR}
    sr = next(o.dataset for o in objects if o.therapy == "placebo")
    report = report_of(hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True))
    assert report.get_volumetric_roi_measurement_groups() == []
    assert_summary_groups(
        report.get_image_measurement_groups(),
        case.report_input,
        "placebo",
        templates,
        "therapy placebo",
    )
