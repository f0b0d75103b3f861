"""Model-grid inputs: what the forecaster consumes, built from the cohort layout (or, later, from
the imaging pipeline). No DICOM here.

A study becomes :class:`StudyTensors`: normalised FLAIR/T1/T2/PD, the current lesion mask and
the prior-visit channels on the model grid (the template grid cropped around the brain), plus
availability flags. Intensities are divided by the median inside the template brain mask, so the
scanner's arbitrary scale drops out (the same rule is applied at inference).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ms_forecast_node.anatomy.template import load_template_anatomy, template_grid
from ms_forecast_node.errors import CohortFormatError
from ms_forecast_node.forecast.config import (
    PRIOR_ACTIVITY_FLAG,
    PRIOR_CHANNELS,
    PRIOR_FLAG,
    PRIOR_FLAGS,
    SEQUENCES,
    ModelConfig,
)
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.cohort import CohortPatient, load_nifti, read_cohort
from ms_forecast_node.simulate.protocols import MRSequence

log = logging.getLogger(__name__)
CACHE_FORMAT = 3  # 2: prior-visit channels from prior/; 3: prior-activity flag


@functools.lru_cache(maxsize=4)
def model_grid(
    spacing_mm: float, crop_shape: tuple[int, int, int]
) -> tuple[Grid, tuple[slice, ...]]:
    """The crop of the template grid the model works on, centred on the template brain."""
    anatomy = load_template_anatomy(spacing_mm)
    full = anatomy.grid
    brain = (anatomy.gm + anatomy.wm + anatomy.csf) > 0.5
    idx = np.argwhere(brain)
    center = (idx.min(0) + idx.max(0)) / 2.0
    starts = [int(round(c - s / 2.0)) for c, s in zip(center, crop_shape, strict=True)]
    starts = [
        min(max(st, 0), n - s) for st, n, s in zip(starts, full.shape, crop_shape, strict=True)
    ]
    if any(st < 0 for st in starts):
        raise CohortFormatError(f"crop {crop_shape} larger than template grid {full.shape}")
    slices = tuple(slice(st, st + s) for st, s in zip(starts, crop_shape, strict=True))
    affine = full.affine.copy()
    affine[:3, 3] = full.index_to_world(np.array([[starts[2], starts[1], starts[0]]]))[0]
    return Grid(crop_shape, affine), slices


@functools.lru_cache(maxsize=4)
def brain_mask(spacing_mm: float, crop_shape: tuple[int, int, int]) -> np.ndarray:
    anatomy = load_template_anatomy(spacing_mm)
    _, slices = model_grid(spacing_mm, crop_shape)
    return np.asarray(((anatomy.gm + anatomy.wm + anatomy.csf) > 0.5)[slices])


@functools.lru_cache(maxsize=4)
def white_matter_prior(spacing_mm: float, crop_shape: tuple[int, int, int]) -> np.ndarray:
    anatomy = load_template_anatomy(spacing_mm)
    _, slices = model_grid(spacing_mm, crop_shape)
    return np.asarray(anatomy.wm[slices], dtype=np.float32)


def lesion_centres(mask: np.ndarray, cell: int = 4) -> np.ndarray:
    """The cells (``cell``³ voxels) holding the centroid of each 26-connected lesion of
    ``mask`` (D, H, W), as a bool map (D/cell, H/cell, W/cell): what centre models diffuse."""
    from scipy import ndimage

    shape = tuple(n // cell for n in mask.shape)
    centres = np.zeros(shape, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n:
        for centroid in ndimage.center_of_mass(mask, labels, range(1, n + 1)):
            index = tuple(
                min(int(round(c)) // cell, m - 1) for c, m in zip(centroid, shape, strict=True)
            )
            centres[index] = True
    return centres


def normalise(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    values = image[brain & (image > 0)]
    scale = float(np.median(values)) if values.size else 1.0
    return np.clip(image / max(scale, 1e-6), 0.0, 5.0).astype(np.float32)


@dataclass
class StudyTensors:
    """One study on the model grid: ``images`` (C, D, H, W) and ``flags`` (F,)."""

    images: np.ndarray
    flags: np.ndarray
    grid: Grid


def prepare_study(
    sequences: dict[str, np.ndarray | None],
    lesion_mask: np.ndarray,
    config: ModelConfig,
    prior_lesion_mask: np.ndarray | None = None,
    prior_flair: np.ndarray | None = None,
    prior_interval_weeks: float | None = None,
) -> StudyTensors:
    """Assemble model inputs from arrays already on the model grid."""
    grid, _ = model_grid(config.spacing_mm, config.crop_shape)
    brain = brain_mask(config.spacing_mm, config.crop_shape)
    channels: list[np.ndarray] = []
    flags: list[float] = []
    for name in SEQUENCES:
        arr = sequences.get(name)
        if arr is None:
            channels.append(np.zeros(grid.shape, np.float32))
            flags.append(0.0)
        else:
            channels.append(normalise(arr, brain))
            flags.append(1.0)
    channels.append((lesion_mask > 0).astype(np.float32))
    has_prior = prior_lesion_mask is not None
    if prior_lesion_mask is not None:
        channels.append(np.asarray(prior_lesion_mask > 0, dtype=np.float32))
    else:
        channels.append(np.zeros(grid.shape, np.float32))
    channels.append(
        normalise(prior_flair, brain)
        if prior_flair is not None
        else np.zeros(grid.shape, np.float32)
    )
    flags.append(1.0 if has_prior else 0.0)
    flags.append((prior_interval_weeks or 0.0) / 48.0)
    flags.append(
        prior_activity_feature(lesion_mask > 0, prior_lesion_mask > 0, prior_interval_weeks or 48.0)
        if prior_lesion_mask is not None
        else 0.0
    )
    assert len(channels) == config.n_image_channels and len(flags) == PRIOR_ACTIVITY_FLAG + 1
    return StudyTensors(np.stack(channels), np.asarray(flags, np.float32), grid)


def interval_lesion_count(current: np.ndarray, prior: np.ndarray) -> int:
    """New and enlarging lesions between two registered binary lesion masks: connected
    components of the current mask that have no voxel in the prior mask (new) or at least 1.5
    times their overlap with it (enlarging, the NET2 definition's 50 % growth)."""
    from scipy import ndimage

    labels, n = ndimage.label(current)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    overlap = np.bincount(labels[prior].ravel(), minlength=n + 1)[1:]
    return int(np.count_nonzero((overlap == 0) | (sizes >= 1.5 * overlap)))


def prior_activity_feature(current: np.ndarray, prior: np.ndarray, interval_weeks: float) -> float:
    """``log((n + 0.5) / (weeks / 48))``: the log of the interval's NET2 rate per 48 weeks
    (``n`` from :func:`interval_lesion_count`; 0.5 keeps quiet intervals finite)."""
    n = interval_lesion_count(current, prior)
    return float(np.log((n + 0.5) / (max(interval_weeks, 1.0) / 48.0)))


@dataclass
class Example:
    """A training/evaluation example from a cohort."""

    patient_id: str
    study: StudyTensors
    therapy: str
    horizon_weeks: float
    target: np.ndarray  # NET2 under the factual therapy, bool (D, H, W)
    sidecar: dict[str, Any]
    patient: CohortPatient


def _crop(array: np.ndarray, array_grid: Grid, config: ModelConfig) -> np.ndarray:
    full = template_grid(config.spacing_mm)
    if not array_grid.same_as(full, atol=1e-3):
        raise CohortFormatError(
            f"image grid {array_grid.shape} does not match the {config.spacing_mm} mm template grid"
        )
    _, slices = model_grid(config.spacing_mm, config.crop_shape)
    return np.ascontiguousarray(array[slices])


def _load_prior(
    patient: CohortPatient, config: ModelConfig
) -> tuple[np.ndarray, np.ndarray | None, float] | None:
    """The prior visit's lesion mask, FLAIR (when present) and its interval before baseline in
    weeks; None when the patient has no prior visit (``prior/lesions.nii.gz``)."""
    labels_path = patient.folder / "prior" / "lesions.nii.gz"
    if not labels_path.is_file():
        return None
    labels, grid = load_nifti(labels_path)
    flair_path = patient.image_path("prior", MRSequence.FLAIR)
    flair = None
    if flair_path.is_file():
        arr, flair_grid = load_nifti(flair_path)
        flair = _crop(arr.astype(np.float32), flair_grid, config)
    visits = patient.sidecar.get("visits", {})
    try:
        weeks = float(visits["baseline"]["week"]) - float(visits["prior"]["week"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CohortFormatError(
            f"patient {patient.patient_id}: prior visit without visits.prior.week in patient.json"
        ) from exc
    return _crop(labels, grid, config) > 0, flair, weeks


def load_example(patient: CohortPatient, config: ModelConfig, cache_dir: Path | None) -> Example:
    cache = None if cache_dir is None else cache_dir / f"{patient.patient_id}.npz"
    therapy = str(patient.sidecar["factual_therapy"])
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            study = StudyTensors(
                data["images"].astype(np.float32),
                data["flags"],
                model_grid(config.spacing_mm, config.crop_shape)[0],
            )
            target = data["target"].astype(bool)
    else:
        sequences: dict[str, np.ndarray | None] = {}
        for seq in MRSequence:
            path = patient.image_path("baseline", seq)
            if path.is_file():
                arr, grid = load_nifti(path)
                sequences[seq.value] = _crop(arr.astype(np.float32), grid, config)
            else:
                sequences[seq.value] = None
        if sequences.get("FLAIR") is None:
            raise CohortFormatError(f"patient {patient.patient_id}: baseline FLAIR missing")
        labels, grid = load_nifti(patient.folder / "baseline" / "lesions.nii.gz")
        net2, net2_grid = load_nifti(patient.net2_path(therapy))
        prior = _load_prior(patient, config)
        study = prepare_study(
            sequences,
            _crop(labels, grid, config) > 0,
            config,
            prior_lesion_mask=None if prior is None else prior[0],
            prior_flair=None if prior is None else prior[1],
            prior_interval_weeks=None if prior is None else prior[2],
        )
        target = _crop(net2, net2_grid, config) > 0
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # A private temporary name: several processes may fill one cache at once.
            tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, images=study.images.astype(np.float16), flags=study.flags, target=target)
            tmp.replace(cache)
    return Example(
        patient.patient_id,
        study,
        therapy,
        float(patient.sidecar["horizon_weeks"]),
        target,
        patient.sidecar,
        patient,
    )


def with_prior_visit(examples: Sequence[Example]) -> list[Example]:
    """The examples whose study comes with a prior visit (and so an interval count)."""
    return [
        e
        for e in examples
        if len(e.study.flags) > PRIOR_ACTIVITY_FLAG and e.study.flags[PRIOR_FLAG] > 0.5
    ]


def hide_prior(example: Example) -> Example:
    """The example as a first visit: prior-visit channels and flags zeroed (copies)."""
    images = example.study.images.copy()
    flags = example.study.flags.copy()
    images[PRIOR_CHANNELS] = 0.0
    flags[PRIOR_FLAGS] = 0.0
    return replace(example, study=StudyTensors(images, flags, example.study.grid))


def cache_folder(cohort: Path, config: ModelConfig) -> Path:
    """The model-grid cache of a cohort. It holds crops, so its key is the grid spacing *and*
    the crop shape."""
    crop = "x".join(str(n) for n in config.crop_shape)
    return cohort / f".model-cache-v{CACHE_FORMAT}-{config.spacing_mm:g}mm-{crop}"


def _fill_one(job: tuple[CohortPatient, ModelConfig, Path]) -> None:
    load_example(*job)


def fill_cache(cohort: Path, config: ModelConfig, workers: int) -> int:
    """Write the model-grid cache of every patient with ``workers`` processes (a training run
    then reads the cache instead of resampling the images); returns the number of patients."""
    from concurrent.futures import ProcessPoolExecutor

    _, patients = read_cohort(cohort)
    folder = cache_folder(cohort, config)
    jobs = [(p, config, folder) for p in patients]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(_fill_one, jobs, chunksize=4):
            pass
    return len(jobs)


def load_examples(
    cohort: Path, config: ModelConfig, cache: bool = True, limit: int | None = None
) -> list[Example]:
    from tqdm import tqdm

    header, patients = read_cohort(cohort)
    spacing = header["grid"]["spacing_mm"][0]
    if abs(spacing - config.spacing_mm) > 1e-6:
        raise CohortFormatError(
            f"cohort grid is {spacing} mm but the model works at {config.spacing_mm} mm"
        )
    cache_dir = cache_folder(cohort, config) if cache else None
    patients = patients[:limit] if limit else patients
    return [
        load_example(p, config, cache_dir)
        for p in tqdm(patients, desc="loading cohort", unit="patient", leave=False)
    ]
