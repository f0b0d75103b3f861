"""Native → model grid → native: planted lesions come back on the same voxels, left stays left.

Every acquisition geometry goes through real DICOM files (the simulator's writer) and the
node's series reader, so the test covers the reader's geometry as well as the transforms.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ms_forecast_node.anatomy.template import template_grid
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.image.preprocess import TemplateMapping
from ms_forecast_node.image.series import read_series
from ms_forecast_node.simulate.dicom_export import StudyIdentity, write_mr_series
from ms_forecast_node.simulate.protocols import load_protocols

# A head pose: template (patient-aligned) point -> scanner point; 8° and 12° rotations.
POSE = sitk.Euler3DTransform(
    (0.0, 0.0, 0.0), np.deg2rad(8.0), np.deg2rad(-5.0), np.deg2rad(12.0), (4.0, 15.0, -6.0)
)

# Lesion centres in template LPS mm: positive x is the patient's LEFT.
LEFT = (28.0, -10.0, 20.0)
RIGHT = (-30.0, 5.0, 10.0)
POSTERIOR = (12.0, 40.0, 5.0)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    m = np.eye(3)
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


# Columns: directions of i (along a row), j (down a column), k (slice) in LPS.
DIRECTIONS = {
    "axial": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float).T,
    "sagittal": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float).T,
    "coronal": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T,
    "oblique": _rotation(0, 20.0) @ _rotation(2, -15.0),
    # RAS-ordered storage: rows run right→left... flipped i and j, as a RAS-minded writer does.
    "axial_ras_flip": np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], float).T,
    "sagittal_left_handed": np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float).T,
}


def _native_grid(direction: np.ndarray, spacing: float = 1.0, n: int = 150) -> Grid:
    center = np.asarray(POSE.TransformPoint((0.0, 0.0, 10.0)))
    origin = center - direction @ (np.full(3, (n - 1) / 2.0) * spacing)
    return Grid.from_geometry((n, n, n), (spacing,) * 3, tuple(origin), direction)


def _spheres(
    grid: Grid, centres_template: list[tuple[float, float, float]], radius: float
) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij")
    world = grid.index_to_world(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    mask = np.zeros(world.shape[0], bool)
    for c in centres_template:
        centre = np.asarray(POSE.TransformPoint(c))
        mask |= np.linalg.norm(world - centre, axis=1) <= radius
    return mask.reshape(grid.shape)


def _write_and_read(volume: np.ndarray, grid: Grid, out: Path) -> object:
    protocol = next(p for p in load_protocols() if p.sequence.value == "T2")
    protocol = replace(protocol, multiframe=False)
    identity = StudyIdentity(
        patient_name="ROUND^TRIP",
        patient_id="RT1",
        patient_birth_date="19800101",
        patient_sex="F",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        study_date="20240101",
        study_time="120000",
    )
    paths = write_mr_series(
        volume,
        grid,
        protocol,
        identity,
        series_number=1,
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        uid_prefix_seed="roundtrip",
        out_dir=out,
        acquisition_datetime=datetime.datetime(2024, 1, 1, 12),
    )
    return read_series(paths)


def _model_grid(spacing: float) -> Grid:
    full = template_grid(spacing)
    return full


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


@pytest.mark.slow
@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_planted_lesions_come_back_on_the_same_voxels(orientation: str, tmp_path: Path) -> None:
    grid = _native_grid(DIRECTIONS[orientation])
    planted = _spheres(grid, [LEFT, RIGHT, POSTERIOR], radius=3.0)
    # Image intensities carry the mask, so the written and read-back series can be compared.
    series = _write_and_read((planted * 1000 + 100).astype(np.int16), grid, tmp_path)
    assert series.grid.same_as(grid) or np.allclose(
        series.grid.index_to_world(np.array([[0, 0, 0]])),
        grid.index_to_world(np.array([[0, 0, grid.shape[0] - 1]])),
    ), "reader geometry differs from the written grid"
    native = series.pixels > 500
    assert int(native.sum()) == int(planted.sum())

    mapping = TemplateMapping(
        series,
        _model_grid(1.0),
        sitk.AffineTransform(POSE.GetMatrix(), POSE.GetTranslation(), POSE.GetCenter()),
    )
    on_model = mapping.to_model_grid(native.astype(np.float32)) >= 0.5
    back = mapping.mask_to_reference(on_model)
    assert _dice(back, native) >= 0.9

    # Left stays left: in the model grid the lesion planted in the left hemisphere lies at
    # positive LPS x, exactly where it was planted in template coordinates.
    labels = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(on_model.astype(np.uint8)))
    )
    centroids = []
    for lab in range(1, labels.max() + 1):
        k, j, i = np.nonzero(labels == lab)
        centroids.append(
            mapping.model_grid.index_to_world(np.array([[i.mean(), j.mean(), k.mean()]]))[0]
        )
    expected = np.array([LEFT, RIGHT, POSTERIOR])
    for c in expected:
        nearest = min(centroids, key=lambda x: float(np.linalg.norm(x - c)))
        assert np.linalg.norm(nearest - c) < 1.0
    left = min(centroids, key=lambda x: float(np.linalg.norm(x - np.asarray(LEFT))))
    assert left[0] > 0, "the left-hemisphere lesion ended up on the right"


@pytest.mark.slow
def test_default_two_mm_model_grid_keeps_larger_lesions(tmp_path: Path) -> None:
    """On the 2 mm CPU grid the round trip blurs small lesions; 5 mm lesions stay above 0.85."""
    grid = _native_grid(DIRECTIONS["oblique"])
    planted = _spheres(grid, [LEFT, RIGHT], radius=5.0)
    series = _write_and_read((planted * 1000 + 100).astype(np.int16), grid, tmp_path)
    mapping = TemplateMapping(
        series,
        _model_grid(2.0),
        sitk.AffineTransform(POSE.GetMatrix(), POSE.GetTranslation(), POSE.GetCenter()),
    )
    native = series.pixels > 500
    back = mapping.mask_to_reference(mapping.to_model_grid(native.astype(np.float32)) >= 0.5)
    assert _dice(back, native) >= 0.85
