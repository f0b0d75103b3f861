"""DICOM Segmentation (highdicom) of one therapy's forecast on the reference series.

The segmentation frames are the reference series' frames, one for one, in source order
(:meth:`SeriesVolume.source_order`): for an Enhanced MR source that is its frame order, for a
classic series one frame per source instance. highdicom then writes the per-frame Derivation
Image / Source Image references and the plane positions from the source headers, so the SEG
shares the source's Frame of Reference and lies on exactly its voxels.

Empty forecasts: every SEG keeps *all* frames (``omit_empty_frames=False``), empty or not. An
empty forecast therefore yields a valid SEG with its one segment and as many (all-zero) frames
as the reference, and so does every other forecast: viewers open each SEG on the same slices,
and readers that rebuild the volume from the frames (dcmqi) get the reference geometry rather
than a slab that changes with the lesions. The cost is about 1.4 MB per 176-frame BINARY SEG.
"""

from __future__ import annotations

import enum

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from ms_forecast_node.report.inputs import Provenance, ReportInput, TherapyView
from ms_forecast_node.report.templates import OutputKind, Templates
from ms_forecast_node.report.uids import (
    contributing_equipment,
    object_identity,
    stamp_equipment,
    tracking_uid,
)

#: Segment Number of the forecast segment in every SEG this module writes.
FORECAST_SEGMENT_NUMBER = 1
#: Content Label (CS, at most 16 upper-case characters).
CONTENT_LABEL = "NET2_FORECAST"
#: Content Creator's Name (PN): the software, not a person.
CONTENT_CREATOR = "MS-FORECAST-NODE^FORECASTER"


class SegmentRole(str, enum.Enum):
    """What a SEG object of ours holds (one SEG instance cannot mix BINARY and FRACTIONAL)."""

    MASK = "mask"
    PROBABILITY = "probability"


def _algorithm(
    report_input: ReportInput, provenance: Provenance, therapy: str
) -> hd.AlgorithmIdentificationSequence:
    sampler = report_input.result.sampler
    parameters = {
        "therapy": therapy,
        "horizon_weeks": f"{report_input.result.horizon_weeks:g}",
        "threshold": str(sampler.get("threshold", "unknown")),
        "model_sha256": provenance.model_sha256,
        "study_version": str(provenance.study_version),
    }
    for key in ("method", "steps", "samples"):
        if key in sampler:
            parameters[f"sampler_{key}"] = str(sampler[key])
    return hd.AlgorithmIdentificationSequence(
        name=provenance.model_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=provenance.model_version[:64],
        source="ms-forecast-node",
        parameters=parameters,
    )


def _segment(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    role: SegmentRole,
    sop_instance_uid: str,
) -> hd.seg.SegmentDescription:
    concepts = templates.codes.concepts
    label = (
        templates.outputs.seg.segment_label
        if role is SegmentRole.MASK
        else templates.outputs.seg.probability_segment_label
    )
    return hd.seg.SegmentDescription(
        segment_number=FORECAST_SEGMENT_NUMBER,
        segment_label=label,
        segmented_property_category=concepts.segmented_property_category.concept(),
        segmented_property_type=concepts.segmented_property_type.concept(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(report_input, provenance, view.key),
        tracking_uid=tracking_uid(templates, sop_instance_uid, f"segment {role.value}"),
        tracking_id=f"{view.key} forecast NET2 {role.value}"[:64],
        display_color=templates.colour(view.key).as_cielab(),
    )


def build_seg(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    provenance: Provenance,
    role: SegmentRole = SegmentRole.MASK,
) -> hd.seg.Segmentation:
    """The BINARY forecast SEG (``MASK``) or the FRACTIONAL probability SEG of one therapy."""
    reference = report_input.reference
    kind = OutputKind.SEG if role is SegmentRole.MASK else OutputKind.PROBABILITY_SEG
    identity = object_identity(
        templates,
        str(reference.headers[0].StudyInstanceUID),
        report_input.study_version,
        kind,
        view.key,
    )
    if role is SegmentRole.MASK:
        pixels = reference.source_order(view.native.mask).astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    else:
        probability = np.clip(view.native.probability.astype(np.float32), 0.0, 1.0)
        pixels = reference.source_order(probability)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    therapy = templates.therapy(view.key)
    seg = hd.seg.Segmentation(
        source_images=reference.source_datasets(),
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=[
            _segment(report_input, view, templates, provenance, role, identity.sop_instance_uid)
        ],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=templates.outputs.equipment.manufacturer,
        manufacturer_model_name=templates.outputs.equipment.manufacturer_model_name,
        software_versions=provenance.software_versions[0],  # all of them: stamp_equipment
        device_serial_number=templates.outputs.equipment.device_serial_number,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=templates.outputs.seg.max_fractional_value,
        content_description=f"{therapy.label} {templates.outputs.disclaimer_ascii}"[:64],
        content_label=CONTENT_LABEL,
        # Type 2 in the Content Identification macro; dcmqi warns when it is missing.
        content_creator_name=CONTENT_CREATOR,
        omit_empty_frames=False,  # see the module docstring: empty forecasts stay openable
        contributing_equipment=[contributing_equipment(templates, provenance)],
        series_description=identity.series_description,
        content_qualification=hd.enum.ContentQualificationValues.RESEARCH,
        coding_schemes=[s.item() for s in templates.codes.used_schemes()],
    )
    stamp_equipment(seg, templates, provenance)
    return seg
