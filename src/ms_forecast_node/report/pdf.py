"""Encapsulated PDF summary: the therapy comparison table and the key images.

Page 1 holds the disclaimer, the study and model identification and the ranked comparison
table; the following pages show each therapy's first key image, six to a page. The PDF is
drawn with matplotlib's ``PdfPages`` (no extra dependency) with a fixed creation date left out,
so the same forecast gives the same bytes. It is wrapped in an Encapsulated PDF Storage
instance written with pydicom: highdicom has no encapsulated-document class.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence

import highdicom as hd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from ms_forecast_node.report.inputs import Provenance, ReportInput, TherapyView
from ms_forecast_node.report.keyimages import BurnedInAnnotation, KeyImage
from ms_forecast_node.report.templates import OutputKind, Templates
from ms_forecast_node.report.uids import (
    contributing_equipment,
    copy_patient_and_study,
    object_identity,
    stamp_equipment,
)

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
DOCUMENT_MODALITY = "DOC"  # the Encapsulated Document Series' enumerated Modality
PDF_MIME_TYPE = "application/pdf"
_A4 = (8.27, 11.69)  # inches, portrait
_IMAGES_PER_PAGE = 6


def _footer(fig: Figure, templates: Templates, provenance: Provenance, page: int) -> None:
    fig.text(
        0.5,
        0.035,
        templates.outputs.disclaimer,
        ha="center",
        fontsize=9,
        color="#b00000",
        weight="bold",
    )
    fig.text(
        0.5,
        0.018,
        f"{provenance.describe()} — page {page}",
        ha="center",
        fontsize=6,
        color="#444444",
    )


def _table_rows(views: Sequence[TherapyView], templates: Templates) -> list[list[str]]:
    rows = []
    for rank, view in enumerate(views, start=1):
        f = view.forecast
        lo, hi = f.count_interval_90
        vlo, vhi = f.volume_interval_90
        rows.append(
            [
                str(rank),
                templates.therapy(view.key).label,
                f"{f.expected_count:.1f} ({lo:.1f}–{hi:.1f})",
                f"{100 * f.probability_of_activity:.0f}%",
                f"{f.volume_mm3_mean:.0f} ({vlo:.0f}–{vhi:.0f})",
                str(len(view.native.lesions)),
            ]
        )
    return rows


def _summary_page(
    report_input: ReportInput,
    views: Sequence[TherapyView],
    templates: Templates,
    provenance: Provenance,
) -> Figure:
    header = report_input.reference.headers[0]
    text = templates.outputs.report
    fig = Figure(figsize=_A4)
    fig.text(0.07, 0.95, text.title, fontsize=15, weight="bold")
    fig.text(0.07, 0.925, templates.outputs.disclaimer, fontsize=11, color="#b00000", weight="bold")
    study = [
        f"Patient: {header.get('PatientName', '')}   ID: {header.get('PatientID', '')}",
        f"Study date: {header.get('StudyDate', '')}   "
        f"Accession: {header.get('AccessionNumber', '')}",
        f"Reference series: {header.get('SeriesNumber', '')} {header.get('SeriesDescription', '')}",
        f"Forecast horizon: {report_input.result.horizon_weeks:g} weeks   "
        f"Model: {provenance.model_label}   Study version: {provenance.study_version}",
    ]
    for i, line in enumerate(study):
        fig.text(0.07, 0.89 - 0.02 * i, line, fontsize=9)
    fig.text(0.07, 0.79, text.method, fontsize=8, wrap=True, va="top")
    fig.text(0.07, 0.74, text.comparison_note, fontsize=9, style="italic")
    ax = fig.add_axes((0.07, 0.30, 0.86, 0.43))
    ax.axis("off")
    table = ax.table(
        cellText=_table_rows(views, templates),
        colLabels=[
            "Rank",
            "Therapy",
            "Expected NET2 (90% int.)",
            "P(activity)",
            "Volume mm³ (90% int.)",
            "Lesions in SEG",
        ],
        colWidths=[0.06, 0.35, 0.19, 0.11, 0.19, 0.10],
        loc="upper center",
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.scale(1.0, 1.5)
    for rank, view in enumerate(views, start=1):
        # The therapy's overlay colour, lightened so black text stays readable on it.
        r, g, b = (c / 255 + (1 - c / 255) * 0.7 for c in templates.colour(view.key).as_rgb())
        table[rank, 1].set_facecolor((r, g, b))
    _footer(fig, templates, provenance, 1)
    return fig


def _image_pages(
    images: Sequence[KeyImage], templates: Templates, provenance: Provenance
) -> list[Figure]:
    pages: list[Figure] = []
    for start in range(0, len(images), _IMAGES_PER_PAGE):
        fig = Figure(figsize=_A4)
        for i, image in enumerate(images[start : start + _IMAGES_PER_PAGE]):
            ax = fig.add_subplot(3, 2, i + 1)
            ax.imshow(image.rendered, interpolation="nearest")
            ax.set_title(templates.therapy(image.therapy).label, fontsize=9)
            ax.axis("off")
        _footer(fig, templates, provenance, len(pages) + 2)
        pages.append(fig)
    return pages


def render_pdf(
    report_input: ReportInput,
    views: Sequence[TherapyView],
    images: dict[str, list[KeyImage]],
    templates: Templates,
    provenance: Provenance,
) -> bytes:
    """The summary PDF; ``views`` ranked, ``images`` the key images per therapy."""
    buffer = io.BytesIO()
    firsts = [images[v.key][0] for v in views if images.get(v.key)]
    metadata = {
        "Title": templates.outputs.report.title,
        "Subject": templates.outputs.disclaimer,
        "Creator": provenance.software_versions[0],
        "CreationDate": None,  # keeps the bytes reproducible
    }
    with PdfPages(buffer, metadata=metadata) as pdf:
        for fig in [
            _summary_page(report_input, views, templates, provenance),
            *_image_pages(firsts, templates, provenance),
        ]:
            pdf.savefig(fig)
    return buffer.getvalue()


def build_pdf_dataset(
    pdf_bytes: bytes, report_input: ReportInput, templates: Templates, provenance: Provenance
) -> Dataset:
    """Encapsulated PDF Storage instance in the reference's study, in its own series."""
    reference = report_input.reference
    source = reference.headers[0]
    identity = object_identity(
        templates, str(source.StudyInstanceUID), report_input.study_version, OutputKind.PDF, None
    )
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = UID(identity.sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = identity.sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    copy_patient_and_study(source, ds)
    # Encapsulated Document Series
    ds.Modality = DOCUMENT_MODALITY
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = identity.series_number
    ds.SeriesDescription = identity.series_description
    # General Equipment + SC Equipment (the PDF is a synthetic document: conversion type SYN)
    stamp_equipment(ds, templates, provenance)
    ds.ConversionType = hd.sc.ConversionTypeValues.SYN.value
    # Encapsulated Document
    ds.InstanceNumber = identity.instance_number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = BurnedInAnnotation.YES.value  # page 1 names the patient
    ds.DocumentTitle = f"{templates.outputs.report.title} {templates.outputs.disclaimer_ascii}"[:64]
    code = templates.codes.concepts.summary_document
    concept = Dataset()
    concept.CodeValue = code.value
    concept.CodingSchemeDesignator = code.scheme
    concept.CodeMeaning = code.meaning
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    sources = []
    for header in reference.source_datasets():
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        sources.append(item)
    ds.SourceInstanceSequence = DicomSequence(sources)
    ds.MIMETypeOfEncapsulatedDocument = PDF_MIME_TYPE
    ds.EncapsulatedDocument = pdf_bytes
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    # SOP Common
    ds.ContributingEquipmentSequence = DicomSequence(
        [contributing_equipment(templates, provenance)]
    )
    schemes = []
    for scheme in templates.codes.used_schemes():
        schemes.append(scheme.item())
    ds.CodingSchemeIdentificationSequence = DicomSequence(schemes)
    return ds
