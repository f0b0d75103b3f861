"""One entry point for all output objects of a forecast, and writing them as DICOM files."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from ms_forecast_node.errors import ConfigurationError, OutputError
from ms_forecast_node.report.inputs import Provenance, ReportInput, check_input, therapy_views
from ms_forecast_node.report.keyimages import (
    KeyImage,
    build_key_image_datasets,
    display_window,
    key_images,
)
from ms_forecast_node.report.pdf import build_pdf_dataset, render_pdf
from ms_forecast_node.report.seg import SegmentRole, build_seg
from ms_forecast_node.report.sr import build_comparison_sr, build_therapy_sr
from ms_forecast_node.report.templates import OutputKind, Templates

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class OutputObject:
    kind: OutputKind
    therapy: str | None  # None for the comparison SR and the PDF
    dataset: Dataset


def _kinds(kinds: Iterable[OutputKind | str] | None, templates: Templates) -> set[OutputKind]:
    if kinds is None:
        return set(templates.outputs.produce)
    out = set()
    for kind in kinds:
        try:
            out.add(OutputKind(kind))
        except ValueError:
            raise ConfigurationError(
                f"unknown output kind {kind!r} (known: {[k.value for k in OutputKind]})"
            ) from None
    return out


def build_outputs(
    report_input: ReportInput,
    templates: Templates,
    kinds: Iterable[OutputKind | str] | None = None,
) -> list[OutputObject]:
    """Every requested output object (``kinds`` default: the template's ``produce`` list).

    Order: per therapy (ranked, fewest expected lesions first) SEG, probability SEG, SR, key
    images; then the comparison SR and the PDF. SRs reference the therapy's SEG when SEGs are
    produced; otherwise they hold the therapy-level numbers without lesion groups.
    """
    wanted = _kinds(kinds, templates)
    check_input(report_input)
    for key in report_input.native:
        templates.therapy(key)
        templates.colour(key)
    provenance = Provenance.of(report_input)
    views = therapy_views(report_input)
    objects: list[OutputObject] = []
    images: dict[str, list[KeyImage]] = {}
    window = None
    if wanted & {OutputKind.KEY_IMAGES, OutputKind.PDF}:
        spec = templates.outputs.key_images
        window = display_window(report_input.reference.pixels, spec.window_percentiles)
    try:
        for view in views:
            seg = None
            if OutputKind.SEG in wanted:
                seg = build_seg(report_input, view, templates, provenance)
                objects.append(OutputObject(OutputKind.SEG, view.key, seg))
            if OutputKind.PROBABILITY_SEG in wanted:
                prob = build_seg(report_input, view, templates, provenance, SegmentRole.PROBABILITY)
                objects.append(OutputObject(OutputKind.PROBABILITY_SEG, view.key, prob))
            if OutputKind.SR in wanted:
                sr = build_therapy_sr(report_input, view, templates, provenance, seg)
                objects.append(OutputObject(OutputKind.SR, view.key, sr))
            if window is not None:
                images[view.key] = key_images(report_input, view, templates, window)
            if OutputKind.KEY_IMAGES in wanted:
                for sc in build_key_image_datasets(
                    report_input, view, images[view.key], templates, provenance
                ):
                    objects.append(OutputObject(OutputKind.KEY_IMAGES, view.key, sc))
        if OutputKind.COMPARISON_SR in wanted:
            comparison = build_comparison_sr(report_input, views, templates, provenance)
            objects.append(OutputObject(OutputKind.COMPARISON_SR, None, comparison))
        if OutputKind.PDF in wanted:
            pdf = render_pdf(report_input, views, images, templates, provenance)
            dataset = build_pdf_dataset(pdf, report_input, templates, provenance)
            objects.append(OutputObject(OutputKind.PDF, None, dataset))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom and pydicom report invalid content with these; the node needs the typed
        # reason, the traceback stays attached for the log.
        raise OutputError(f"building output objects failed: {exc}") from exc
    return objects


def file_name(obj: OutputObject) -> str:
    """``<kind>_<therapy or all>_<instance>.dcm``, restricted to safe characters."""
    therapy = obj.therapy if obj.therapy is not None else "all"
    instance = int(obj.dataset.get("InstanceNumber", 1) or 1)
    stem = _UNSAFE.sub("_", f"{obj.kind.value}_{therapy}_{instance:03d}").strip("._") or "object"
    return f"{stem}.dcm"


def write_outputs(objects: Iterable[OutputObject], out_dir: Path) -> list[Path]:
    """Write every object as a DICOM Part 10 file into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    for obj in objects:
        name = file_name(obj)
        if name in seen:
            raise OutputError(f"two output objects would both be written as {name}")
        seen.add(name)
        path = out / name
        obj.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
