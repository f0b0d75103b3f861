"""Fallbacks for viewers without SEG/SR (key images, PDF), output selection, file writing,
input checks, and dciodvfy on every object built for a simulated study."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from ms_forecast_node.errors import ConfigurationError, OutputError
from ms_forecast_node.report.build import OutputObject, build_outputs, file_name, write_outputs
from ms_forecast_node.report.inputs import Provenance, ReportInput, therapy_views
from ms_forecast_node.report.keyimages import (
    LEGEND_PX,
    choose_slices,
    display_window,
    key_images,
    patient_orientation,
)
from ms_forecast_node.report.pdf import ENCAPSULATED_PDF_STORAGE, render_pdf
from ms_forecast_node.report.templates import OutputKind, Templates

from .report_fixtures import (
    EMPTY_THERAPY,
    FLAIR_FOLDER,
    T2_FOLDER,
    cached_input,
    cached_outputs,
    cached_templates,
)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Case:
    name: str
    report_input: ReportInput
    objects: tuple[OutputObject, ...]

    def of(self, kind: OutputKind, therapy: str | None = None) -> list[Any]:
        return [o.dataset for o in self.objects if o.kind is kind and o.therapy == therapy]


@pytest.fixture(scope="module", params=["enhanced_flair", "classic_t2"])
def case(request: pytest.FixtureRequest, simulated_study: tuple[Path, dict[str, Any]]) -> Case:
    study, _ = simulated_study
    folder = study / (FLAIR_FOLDER if request.param == "enhanced_flair" else T2_FOLDER)
    return Case(request.param, cached_input(folder), cached_outputs(folder))


@pytest.fixture(scope="module")
def templates() -> Templates:
    return cached_templates()


def _slice_of(report_input: ReportInput, sc: Dataset) -> int:
    ref = sc.SourceImageSequence[0]
    reference = report_input.reference
    for k, s in enumerate(reference.slice_sources):
        header = reference.headers[s.instance]
        if header.SOPInstanceUID == ref.ReferencedSOPInstanceUID and s.frame == int(
            ref.get("ReferencedFrameNumber", 0)
        ):
            return k
    raise AssertionError("key image references no slice of the reference series")


def test_key_images_show_each_mask_on_its_busiest_slices(case: Case, templates: Templates) -> None:
    report_input = case.report_input
    spec = templates.outputs.key_images
    rows, cols = report_input.reference.grid.shape[1:]
    for therapy, native in report_input.native.items():
        images = case.of(OutputKind.KEY_IMAGES, therapy)
        assert 1 <= len(images) <= spec.per_therapy
        assert len({sc.SeriesInstanceUID for sc in images}) == 1
        counts = native.mask.sum(axis=(1, 2))
        slices = [_slice_of(report_input, sc) for sc in images]
        if native.mask.any():
            assert int(np.argmax(counts)) in slices
        else:
            assert slices == [report_input.reference.grid.shape[0] // 2]
        rgb = templates.colour(therapy).as_rgb()
        for sc, k in zip(images, slices, strict=True):
            assert sc.SOPClassUID == SECONDARY_CAPTURE
            assert sc.PhotometricInterpretation == "RGB"
            assert sc.Rows == rows * spec.zoom + LEGEND_PX
            pixels = sc.pixel_array.astype(int)
            image = pixels[: rows * spec.zoom, : cols * spec.zoom]
            coloured = (image.max(axis=2) - image.min(axis=2)) > 8
            zoomed = np.repeat(np.repeat(native.mask[k], spec.zoom, 0), spec.zoom, 1)
            assert np.array_equal(coloured, zoomed), (therapy, k)
            legend = pixels[rows * spec.zoom :]
            assert (legend == np.asarray(rgb)).all(axis=2).sum() >= 100  # the colour swatch
            assert (legend.min(axis=2) > 200).sum() > 500  # white legend text
            assert list(sc.PatientOrientation) == list(
                patient_orientation(report_input.reference.grid)
            )


def test_patient_orientation_letters(case: Case) -> None:
    expected = {"enhanced_flair": ("P", "F"), "classic_t2": ("L", "P")}
    assert patient_orientation(case.report_input.reference.grid) == expected[case.name]


def test_choose_slices_spreads_and_falls_back_to_the_middle() -> None:
    mask = np.zeros((20, 4, 4), dtype=bool)
    mask[5, :3, :3] = True  # 9 voxels
    mask[6, :2, :2] = True  # 4, too close to 5
    mask[12, :2, :3] = True  # 6
    assert choose_slices(mask, 3, 3) == [5, 12]
    assert choose_slices(mask, 1, 3) == [5]
    assert choose_slices(np.zeros((9, 2, 2), dtype=bool), 3, 2) == [4]


def test_pdf_is_a_valid_encapsulated_summary(case: Case, templates: Templates) -> None:
    (ds,) = case.of(OutputKind.PDF)
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(ds.EncapsulatedDocument)
    assert document.startswith(b"%PDF-") and document.rstrip(b"\0").endswith(b"%%EOF\n")
    assert ds.EncapsulatedDocumentLength == len(document)
    pages = document.count(b"/Type /Page") - document.count(b"/Type /Pages")
    n_images = len(case.report_input.native)
    assert pages == 1 + -(-n_images // 6)
    assert b"/Title (Forecast of new and enlarging T2 lesions" in document
    referenced = {item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in case.report_input.reference.headers}


def test_pdf_bytes_are_reproducible(case: Case, templates: Templates) -> None:
    report_input = case.report_input
    views = therapy_views(report_input)
    provenance = Provenance.of(report_input)
    window = display_window(report_input.reference.pixels, (1.0, 99.5))
    images = {v.key: key_images(report_input, v, templates, window) for v in views[:2]}
    first = render_pdf(report_input, views, images, templates, provenance)
    assert first == render_pdf(report_input, views, images, templates, provenance)


def test_requested_kinds_only(case: Case, templates: Templates) -> None:
    only_pdf = build_outputs(case.report_input, templates, ["pdf"])
    assert [o.kind for o in only_pdf] == [OutputKind.PDF]
    default = {o.kind for o in build_outputs(case.report_input, templates, ["comparison_sr"])}
    assert default == {OutputKind.COMPARISON_SR}
    with pytest.raises(ConfigurationError, match="movie"):
        build_outputs(case.report_input, templates, ["seg", "movie"])


def test_default_kinds_follow_the_template(case: Case, templates: Templates) -> None:
    slim = dataclasses.replace(
        templates,
        outputs=templates.outputs.model_copy(update={"produce": [OutputKind.COMPARISON_SR]}),
    )
    assert [o.kind for o in build_outputs(case.report_input, slim)] == [OutputKind.COMPARISON_SR]


def test_written_files_have_safe_unique_names(case: Case, tmp_path: Path) -> None:
    paths = write_outputs(case.objects, tmp_path / "out")
    assert len({p.name for p in paths}) == len(case.objects)
    for path, obj in zip(paths, case.objects, strict=True):
        assert path.parent == tmp_path / "out"
        assert path.suffix == ".dcm"
        assert (
            pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            == obj.dataset.SOPInstanceUID
        )
    odd = OutputObject(OutputKind.SR, "../we ird/therapy", case.objects[0].dataset)
    assert "/" not in file_name(odd) and " " not in file_name(odd)
    with pytest.raises(OutputError, match="both"):
        write_outputs([case.objects[0], case.objects[0]], tmp_path / "twice")


def test_inconsistent_input_is_refused(case: Case, templates: Templates) -> None:
    report_input = case.report_input
    native = dict(report_input.native)
    native.pop(EMPTY_THERAPY)
    with pytest.raises(OutputError, match="do not match"):
        build_outputs(dataclasses.replace(report_input, native=native), templates, ["pdf"])
    broken = dataclasses.replace(
        report_input.native["placebo"], mask=report_input.native["placebo"].mask[:-1]
    )
    native = {**report_input.native, "placebo": broken}
    with pytest.raises(OutputError, match="reference grid"):
        build_outputs(dataclasses.replace(report_input, native=native), templates, ["pdf"])


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_every_object_passes_dciodvfy(case: Case, tmp_path: Path) -> None:
    paths = write_outputs(case.objects, tmp_path)
    assert {o.kind for o in case.objects} == set(OutputKind)
    failures = {}
    for path in paths:
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        if errors:
            failures[path.name] = errors
    assert failures == {}
