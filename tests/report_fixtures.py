"""Synthetic report inputs for the report tests and benchmark.

TEST FIXTURE DATA, NOT A FORECAST: spheres planted in the reference series' native grid stand
in for each therapy's back-projected forecast mask, and the model-grid numbers (sample counts,
volumes) are fabricated to be plausible. Nothing here comes from the forecaster.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ms_forecast_node.anatomy.locations import LocationClass
from ms_forecast_node.forecast.result import ForecastLesion, ForecastResult, TherapyForecast
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.image.series import SeriesVolume, read_series
from ms_forecast_node.report.build import OutputObject, build_outputs, write_outputs
from ms_forecast_node.report.inputs import NativeTherapyForecast, ReportInput
from ms_forecast_node.report.templates import OutputKind, Templates, load_templates

#: Therapy keys of the shipped model (src/ms_forecast_node/data/therapies.yaml).
THERAPIES = (
    "placebo",
    "glatiramer_acetate",
    "interferon_beta_1a_sc",
    "fingolimod",
    "dimethyl_fumarate",
    "natalizumab",
    "ocrelizumab",
)
#: Planted spheres per therapy (fewer under more effective therapy; ocrelizumab is empty).
SPHERES = {
    "placebo": 5,
    "glatiramer_acetate": 4,
    "interferon_beta_1a_sc": 3,
    "fingolimod": 2,
    "dimethyl_fumarate": 2,
    "natalizumab": 1,
    "ocrelizumab": 0,
}
EMPTY_THERAPY = "ocrelizumab"
FIXTURE_MODEL = ("test-fixture-model", "0.0-fixture", "f" * 64)
_LOCATIONS = tuple(LocationClass)
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


#: Reference series of the simulated study: one Enhanced MR file, and 50 classic MR files.
FLAIR_FOLDER = "dicom/followup/01_flair_3d_sag"
T2_FOLDER = "dicom/followup/03_t2_ax_tse"


def read_reference(folder: Path) -> SeriesVolume:
    return read_series(sorted(p for p in folder.iterdir() if p.is_file()))


# Test modules import the helpers below, and pytest registers an imported fixture once per
# module; caching here keeps one reference, one input and one output set per session.
@functools.cache
def cached_templates() -> Templates:
    return load_templates()


@functools.cache
def cached_input(folder: Path) -> ReportInput:
    return make_report_input(read_reference(folder))


@functools.cache
def cached_outputs(folder: Path) -> tuple[OutputObject, ...]:
    """Every kind of object, the probability SEG included, for the fixture input."""
    return tuple(build_outputs(cached_input(folder), cached_templates(), list(OutputKind)))


def _sphere_mask(grid: Grid, centre_ijk: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels of ``grid`` within ``radius_mm`` (world distance) of a voxel-index centre."""
    spacing = np.asarray(grid.spacing)  # (i, j, k)
    half = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(np.round(centre_ijk).astype(int) - half, 0)
    hi = np.minimum(np.round(centre_ijk).astype(int) + half + 1, np.asarray(grid.size_ijk))
    kk, jj, ii = np.meshgrid(
        np.arange(lo[2], hi[2]), np.arange(lo[1], hi[1]), np.arange(lo[0], hi[0]), indexing="ij"
    )
    d2 = (
        ((ii - centre_ijk[0]) * spacing[0]) ** 2
        + ((jj - centre_ijk[1]) * spacing[1]) ** 2
        + ((kk - centre_ijk[2]) * spacing[2]) ** 2
    )
    mask = np.zeros(grid.shape, dtype=bool)
    mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = d2 <= radius_mm**2
    return mask


def native_forecast(
    grid: Grid, therapy: str, n_spheres: int, rng: np.random.Generator
) -> NativeTherapyForecast:
    mask = np.zeros(grid.shape, dtype=bool)
    size = np.asarray(grid.size_ijk, dtype=float)
    for _ in range(n_spheres):
        # Central 50 % of the field of view: where the simulated brain is.
        centre = size * rng.uniform(0.25, 0.75, size=3)
        mask |= _sphere_mask(grid, centre, float(rng.uniform(3.0, 6.0)))
    labels, n = ndimage.label(mask, structure=_STRUCTURE)
    labels = labels.astype(np.int32)
    # Each lesion gets its own constant voxel probability above the 0.5 threshold.
    probability = np.zeros(grid.shape, dtype=np.float32)
    objects = ndimage.find_objects(labels)
    lesions = []
    for label in range(1, n + 1):
        box = objects[label - 1]
        inside = labels[box] == label
        probability[box][inside] = float(rng.uniform(0.55, 0.95))
        where = np.argwhere(inside) + np.asarray([s.start for s in box])  # (k, j, i)
        centre_ijk = where[:, ::-1].mean(axis=0)
        centroid = grid.index_to_world(centre_ijk[None, :])[0]
        lesions.append(
            ForecastLesion(
                label=label,
                volume_mm3=float(len(where) * grid.voxel_volume_mm3),
                centroid_lps_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                location=_LOCATIONS[(label - 1) % len(_LOCATIONS)],
                mean_probability=float(probability[box][inside].mean()),
            )
        )
    return NativeTherapyForecast(
        therapy=therapy,
        mask=mask,
        probability=probability.astype(np.float32),
        lesions=tuple(lesions),
        labels=labels,
    )


def model_forecast(therapy: str, n_spheres: int, rng: np.random.Generator) -> TherapyForecast:
    """Fabricated model-grid numbers on a small 8 mm grid (16 samples)."""
    shape = (8, 8, 8)
    probability = np.zeros(shape, dtype=np.float32)
    if n_spheres:
        probability[3:5, 3:5, 3:5] = 0.6
    counts = tuple(int(c) for c in rng.poisson(n_spheres, size=16)) if n_spheres else (0,) * 16
    volumes = tuple(float(c * rng.uniform(40.0, 120.0)) for c in counts)
    by_location = {loc: tuple(int(c > i) for c in counts) for i, loc in enumerate(_LOCATIONS)}
    return TherapyForecast(
        therapy=therapy,
        probability=probability,
        mask=probability >= 0.5,
        uncertainty=np.sqrt(probability * (1 - probability)),
        sample_counts=counts,
        sample_volumes_mm3=volumes,
        sample_counts_by_location=by_location,
        lesions=(),
    )


def make_report_input(
    reference: SeriesVolume,
    therapies: Sequence[str] = THERAPIES,
    *,
    seed: int = 0,
    study_version: int = 1,
) -> ReportInput:
    rng = np.random.default_rng(seed)
    forecasts = {t: model_forecast(t, SPHERES.get(t, 2), rng) for t in therapies}
    native = {t: native_forecast(reference.grid, t, SPHERES.get(t, 2), rng) for t in therapies}
    result = ForecastResult(
        model_name=FIXTURE_MODEL[0],
        model_version=FIXTURE_MODEL[1],
        model_sha256=FIXTURE_MODEL[2],
        grid=Grid.from_geometry((8, 8, 8), (8.0, 8.0, 8.0), (-32.0, -32.0, -32.0)),
        horizon_weeks=48.0,
        sampler={"method": "ddim", "steps": 10, "samples": 16, "threshold": 0.5},
        therapies=forecasts,
    )
    return ReportInput(
        result=result,
        reference=reference,
        native=native,
        study_version=study_version,
        lesion_mask_source="builtin_segmenter",
    )


@dataclass(frozen=True)
class WrittenCase:
    """The cached outputs of one reference series, written to files (one test module's case)."""

    name: str
    report_input: ReportInput
    objects: tuple[OutputObject, ...]
    files: dict[tuple[str, str | None, int], Path]

    def path(self, kind: OutputKind, therapy: str | None, instance: int = 1) -> Path:
        return self.files[(kind.value, therapy, instance)]

    def dataset(self, kind: OutputKind, therapy: str | None) -> Any:
        return next(o.dataset for o in self.objects if o.kind is kind and o.therapy == therapy)


def written_case(study: Path, name: str, out: Path) -> WrittenCase:
    """``name``: ``enhanced_flair`` (multi-frame reference) or ``classic_t2`` (single-frame)."""
    folder = study / (FLAIR_FOLDER if name == "enhanced_flair" else T2_FOLDER)
    objects = cached_outputs(folder)
    paths = write_outputs(objects, out)
    files = {
        (o.kind.value, o.therapy, int(o.dataset.InstanceNumber)): p
        for o, p in zip(objects, paths, strict=True)
    }
    return WrittenCase(name, cached_input(folder), objects, files)
