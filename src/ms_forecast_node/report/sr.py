"""Structured reports (TID 1500 Measurement Report, Comprehensive 3D SR) via highdicom.

Per therapy, one report with

* a therapy group (TID 1501): the therapy (coded), forecast horizon, expected number of NET2
  lesions (derivation Mean) and its 90 % interval (derivations 5th / 95th percentile),
  probability of activity, total forecast NET2 volume (mean and interval);
* one group per location class (group finding site) with its expected count;
* one group per forecast lesion (TID 1411 volumetric ROI) referencing segment 1 of the
  therapy's SEG and the source frames the lesion lies on: volume, the
  lesion's centre of mass (x, y, z in the reference's frame of reference, patient LPS mm),
  mean voxel probability and location class (finding site);

and one comparison report across all therapies, one group each, ranked from the fewest to the
most expected NET2 lesions (rank 1 first).

Counts and intervals are model-grid numbers from :class:`ForecastResult`; lesion groups
describe the components of the native-space mask the SEG carries. Report text (title, method,
disclaimer, provenance) goes into TID 1500's optional "Qualitative Evaluations" container as
TEXT items: highdicom 0.28's ``MeasurementReport`` does not build that row (TID 1500 row 12),
so it is appended to the root container after construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ms_forecast_node.report.inputs import Provenance, ReportInput, TherapyView
from ms_forecast_node.report.seg import FORECAST_SEGMENT_NUMBER
from ms_forecast_node.report.templates import OutputKind, Templates, ascii_text
from ms_forecast_node.report.uids import (
    contributing_equipment,
    device_uid,
    object_identity,
    stamp_equipment,
    tracking_uid,
)


def _measurement(
    templates: Templates,
    name: str,
    value: float,
    unit: str,
    derivation: str | None = None,
) -> hd.sr.Measurement:
    concepts, units = templates.codes.concepts, templates.codes.units
    return hd.sr.Measurement(
        name=getattr(concepts, name).concept(),
        value=float(value),
        unit=getattr(units, unit).concept(),
        derivation=getattr(concepts, derivation).concept() if derivation else None,
    )


def _algorithm(provenance: Provenance, report_input: ReportInput) -> hd.sr.AlgorithmIdentification:
    threshold = report_input.result.sampler.get("threshold", "unknown")
    return hd.sr.AlgorithmIdentification(
        name=provenance.model_name[:64],
        version=provenance.model_version[:64],
        parameters=[f"model_sha256={provenance.model_sha256}", f"threshold={threshold}"],
    )


def therapy_measurements(
    view: TherapyView, horizon_weeks: float, templates: Templates
) -> list[hd.sr.Measurement]:
    """The therapy-level numbers, in the order they appear in every report."""
    f = view.forecast
    count_lo, count_hi = f.count_interval_90
    vol_lo, vol_hi = f.volume_interval_90
    return [
        _measurement(templates, "forecast_horizon", horizon_weeks, "weeks"),
        _measurement(templates, "number_of_lesions", f.expected_count, "lesions", "mean"),
        _measurement(templates, "number_of_lesions", count_lo, "lesions", "percentile_5"),
        _measurement(templates, "number_of_lesions", count_hi, "lesions", "percentile_95"),
        _measurement(
            templates, "probability_of_activity", f.probability_of_activity, "probability"
        ),
        _measurement(templates, "volume", f.volume_mm3_mean, "cubic_millimetre", "mean"),
        _measurement(templates, "volume", vol_lo, "cubic_millimetre", "percentile_5"),
        _measurement(templates, "volume", vol_hi, "cubic_millimetre", "percentile_95"),
    ]


def _group(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    sop_instance_uid: str,
    identifier: str,
    measurements: list[hd.sr.Measurement],
    location: str | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concepts = templates.codes.concepts
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(templates, sop_instance_uid, identifier), identifier=identifier[:64]
        ),
        finding_type=concepts.forecast_net2_lesion.concept(),
        finding_category=concepts.segmented_property_category.concept(),
        algorithm_id=_algorithm(provenance, report_input),
        finding_sites=(
            [hd.sr.FindingSite(templates.codes.location(location).concept())] if location else None
        ),
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=concepts.therapy.concept(), value=templates.therapy(view.key).code.concept()
            )
        ],
    )


def _therapy_groups(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    sop_instance_uid: str,
    rank: int | None = None,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The therapy group, then one group per location class with its expected count.

    Per-location counts get their own groups with a group-level finding site because dcmqi's
    tid1500reader interprets Finding Site only at the group level; on a single measurement it
    would drop it and report several indistinguishable "Number of lesions" values.
    """
    measurements = therapy_measurements(view, report_input.result.horizon_weeks, templates)
    if rank is not None:
        measurements.insert(0, _measurement(templates, "rank", rank, "rank"))
    head = f"therapy {view.key}" if rank is None else f"rank {rank} therapy {view.key}"
    args = (report_input, view, templates, provenance, sop_instance_uid)
    groups = [_group(*args, head, measurements)]
    by_location = view.forecast.expected_counts_by_location()
    for location, count in sorted(by_location.items(), key=lambda x: x[0].value):
        count_item = _measurement(templates, "number_of_lesions", count, "lesions", "mean")
        groups.append(_group(*args, f"{head} {location.value}", [count_item], location.value))
    return groups


def _lesion_slices(view: TherapyView, label: int) -> np.ndarray:
    """Grid slice indices ``k`` the lesion ``label`` has voxels on."""
    return np.flatnonzero((view.native.labels == label).any(axis=(1, 2)))


def _source_images(
    report_input: ReportInput, ks: np.ndarray
) -> list[hd.sr.SourceImageForSegmentation]:
    reference = report_input.reference
    by_instance: dict[int, list[int]] = {}
    for k in ks:
        source = reference.slice_sources[int(k)]
        by_instance.setdefault(source.instance, []).append(source.frame)
    out = []
    for instance, frames in sorted(by_instance.items()):
        header = reference.headers[instance]
        numbered = sorted(f for f in frames if f > 0)
        out.append(
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=str(header.SOPClassUID),
                referenced_sop_instance_uid=str(header.SOPInstanceUID),
                referenced_frame_numbers=numbered or None,
            )
        )
    return out


def _lesion_groups(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    seg: Dataset,
    sop_instance_uid: str,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    concepts = templates.codes.concepts
    groups = []
    for lesion in sorted(view.native.lesions, key=lambda x: x.label):
        ks = _lesion_slices(view, lesion.label)
        identifier = f"lesion {lesion.label}"
        x, y, z = lesion.centroid_lps_mm
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(templates, sop_instance_uid, identifier), identifier=identifier
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=FORECAST_SEGMENT_NUMBER,
                    # No SEG frame numbers: DICOM forbids Referenced Frame Number next to
                    # Referenced Segment Number (dciodvfy reports it as an error).
                    source_images=_source_images(report_input, ks),
                ),
                finding_type=concepts.forecast_net2_lesion.concept(),
                finding_category=concepts.segmented_property_category.concept(),
                algorithm_id=_algorithm(provenance, report_input),
                finding_sites=[
                    hd.sr.FindingSite(templates.codes.location(lesion.location.value).concept())
                ],
                measurements=[
                    _measurement(templates, "volume", lesion.volume_mm3, "cubic_millimetre"),
                    _measurement(
                        templates, "mean_lesion_probability", lesion.mean_probability, "probability"
                    ),
                    _measurement(templates, "centroid_x", x, "millimetre"),
                    _measurement(templates, "centroid_y", y, "millimetre"),
                    _measurement(templates, "centroid_z", z, "millimetre"),
                ],
            )
        )
    return groups


def _observation_context(templates: Templates, provenance: Provenance) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(templates, provenance),
        name=provenance.model_name[:64],
        manufacturer_name=templates.outputs.equipment.manufacturer,
        model_name=provenance.model_label[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _text_container(templates: Templates, lines: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations" with one TEXT item per line (see module doc)."""
    concepts = templates.codes.concepts
    container = hd.sr.ContainerContentItem(
        name=concepts.qualitative_evaluations.concept(),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=concepts.comment.concept(),
                value=ascii_text(line),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in lines
            if line
        ]
    )
    return container


def report_lines(templates: Templates, provenance: Provenance, *extra: str) -> list[str]:
    text = templates.outputs.report
    return [templates.outputs.disclaimer, text.title, *extra, text.method, provenance.describe()]


def _document(
    report_input: ReportInput,
    templates: Templates,
    provenance: Provenance,
    kind: OutputKind,
    therapy: str | None,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
    lines: Sequence[str],
    evidence: Sequence[Dataset],
) -> hd.sr.Comprehensive3DSR:
    reference = report_input.reference
    identity = object_identity(
        templates,
        str(reference.headers[0].StudyInstanceUID),
        report_input.study_version,
        kind,
        therapy,
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(templates, provenance),
        procedure_reported=templates.codes.concepts.procedure_reported.concept(),
        imaging_measurements=list(groups),
    )
    report[0].ContentSequence.append(_text_container(templates, lines))
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=templates.outputs.equipment.manufacturer,
        is_complete=True,
        series_description=identity.series_description,
        content_qualification=hd.enum.ContentQualificationValues.RESEARCH,
        coding_schemes=[s.item() for s in templates.codes.used_schemes()],
        contributing_equipment=[contributing_equipment(templates, provenance)],
    )
    stamp_equipment(sr, templates, provenance)
    return sr


def build_therapy_sr(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    seg: Dataset | None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one therapy; lesion groups reference ``seg`` (when built)."""
    identity = object_identity(
        templates,
        str(report_input.reference.headers[0].StudyInstanceUID),
        report_input.study_version,
        OutputKind.SR,
        view.key,
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = list(_therapy_groups(report_input, view, templates, provenance, identity.sop_instance_uid))
    evidence: list[Dataset] = list(report_input.reference.source_datasets())
    # Lesion groups need a segment to point at; without a SEG (not requested) the therapy
    # group alone carries the numbers.
    if seg is not None:
        groups += _lesion_groups(
            report_input, view, templates, provenance, seg, identity.sop_instance_uid
        )
        evidence.append(seg)
    therapy = templates.therapy(view.key)
    extra = [f"Therapy: {therapy.label}"]
    if view.is_empty:
        extra.append(templates.outputs.report.empty_forecast)
    lines = report_lines(templates, provenance, *extra, summary_line(view, templates))
    return _document(
        report_input, templates, provenance, OutputKind.SR, view.key, groups, lines, evidence
    )


def summary_line(view: TherapyView, templates: Templates, rank: int | None = None) -> str:
    f = view.forecast
    lo, hi = f.count_interval_90
    head = f"{rank}. " if rank is not None else ""
    return (
        f"{head}{templates.therapy(view.key).label}: expected NET2 lesions {f.expected_count:.1f} "
        f"(90% interval {lo:.1f}-{hi:.1f}), probability of activity "
        f"{100 * f.probability_of_activity:.0f}%, forecast NET2 volume {f.volume_mm3_mean:.0f} mm3"
    )


def build_comparison_sr(
    report_input: ReportInput,
    views: Sequence[TherapyView],
    templates: Templates,
    provenance: Provenance,
) -> hd.sr.Comprehensive3DSR:
    """One report across therapies; ``views`` must be ranked (fewest expected lesions first)."""
    sop_uid = object_identity(
        templates,
        str(report_input.reference.headers[0].StudyInstanceUID),
        report_input.study_version,
        OutputKind.COMPARISON_SR,
        None,
    ).sop_instance_uid
    groups = [
        group
        for rank, view in enumerate(views, start=1)
        for group in _therapy_groups(report_input, view, templates, provenance, sop_uid, rank=rank)
    ]
    lines = report_lines(
        templates,
        provenance,
        templates.outputs.report.comparison_note,
        *(summary_line(view, templates, rank) for rank, view in enumerate(views, start=1)),
    )
    evidence = list(report_input.reference.source_datasets())
    return _document(
        report_input, templates, provenance, OutputKind.COMPARISON_SR, None, groups, lines, evidence
    )
