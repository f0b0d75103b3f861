"""Lesion shapes, their placement in MS topography, and rendering with partial volume.

A lesion is an irregular ovoid: an ellipsoid (semi-axes, rotation) whose radius is modulated
by a few random plane waves on the unit sphere. Rendering evaluates an approximate signed
distance in a bounding box around the lesion only, and turns it into a partial-volume fraction
``clip(0.5 - sdf / voxel, 0, 1)``; the binary lesion mask is ``fraction >= 0.5``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np

from ms_forecast_node.anatomy.locations import LocationClass
from ms_forecast_node.image.geometry import Grid

MIN_DIAMETER_MM = 3.0


class LesionAge(str, enum.Enum):
    YOUNG = "young"  # recent: bright on T2/FLAIR with oedema, barely T1-hypointense
    OLD = "old"  # chronic: some become T1 "black holes"


@dataclass(frozen=True)
class LesionShape:
    center: np.ndarray  # (3,) LPS mm in the patient's template-aligned space
    semi_axes: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3), columns = lesion axes in LPS
    wave_dirs: np.ndarray  # (K, 3) unit vectors
    wave_amps: np.ndarray  # (K,)
    wave_phases: np.ndarray  # (K,)

    @property
    def volume_mm3(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.semi_axes))

    def scaled(self, volume_factor: float) -> LesionShape:
        return replace(self, semi_axes=self.semi_axes * volume_factor ** (1.0 / 3.0))

    def support_radius_mm(self) -> float:
        return float(self.semi_axes.max() * (1.0 + np.abs(self.wave_amps).sum()) + 1.5)


@dataclass(frozen=True)
class Lesion:
    lesion_id: int
    shape: LesionShape
    age: LesionAge
    black_hole: bool
    intended_location: LocationClass
    # A future lesion whose site already shows a faint T2/FLAIR change at baseline (focal
    # "pre-lesional" NAWM abnormality, reported to precede new MS lesions by weeks to months).
    prodrome: bool = False


def random_shape(
    rng: np.random.Generator,
    center: np.ndarray,
    volume_mm3: float,
    long_axis: np.ndarray | None = None,
    elongation: float = 1.0,
) -> LesionShape:
    """An irregular ovoid of about ``volume_mm3``; ``long_axis`` orients its major axis."""
    volume_mm3 = max(volume_mm3, 4.0 / 3.0 * np.pi * (MIN_DIAMETER_MM / 2.0) ** 3)
    ratios = np.array([elongation, 1.0, 1.0]) * rng.uniform(0.8, 1.2, 3)
    radius = (volume_mm3 * 3.0 / (4.0 * np.pi) / np.prod(ratios)) ** (1.0 / 3.0)
    semi = np.maximum(ratios * radius, MIN_DIAMETER_MM / 2.0)
    if long_axis is None or not np.all(np.isfinite(long_axis)) or np.linalg.norm(long_axis) < 1e-6:
        q = rng.standard_normal((3, 3))
        rot, _ = np.linalg.qr(q)
    else:
        a = long_axis / np.linalg.norm(long_axis)
        helper = rng.standard_normal(3)
        b = helper - helper.dot(a) * a
        b /= np.linalg.norm(b)
        rot = np.stack([a, b, np.cross(a, b)], axis=1)
    k = 4
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return LesionShape(
        center=np.asarray(center, dtype=np.float64),
        semi_axes=semi,
        rotation=rot,
        wave_dirs=dirs * rng.uniform(1.5, 3.0, (k, 1)),
        wave_amps=rng.uniform(0.03, 0.09, k),
        wave_phases=rng.uniform(0, 2 * np.pi, k),
    )


def render(shape: LesionShape, grid: Grid) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Partial-volume fraction of ``shape`` in its bounding box on ``grid``.

    Returns the ``[k, j, i]`` slices of the box and the float32 fractions, or None when the
    lesion falls outside the grid.
    """
    r = shape.support_radius_mm()
    inv = np.linalg.inv(grid.affine)
    center_idx = inv[:3, :3] @ shape.center + inv[:3, 3]
    # Index-space half extent of a sphere of radius r (works for any orientation).
    half = np.abs(inv[:3, :3]) @ np.full(3, r)
    lo = np.maximum(np.floor(center_idx - half).astype(int), 0)
    size = np.asarray(grid.size_ijk)
    hi = np.minimum(np.ceil(center_idx + half).astype(int) + 1, size)
    if np.any(hi <= lo):
        return None
    ii = np.arange(lo[0], hi[0], dtype=np.float64)
    jj = np.arange(lo[1], hi[1], dtype=np.float64)
    kk = np.arange(lo[2], hi[2], dtype=np.float64)
    a = grid.affine
    # World offsets from the centre, built by broadcasting (k, j, i, 3).
    off = (
        kk[:, None, None, None] * a[:3, 2]
        + jj[None, :, None, None] * a[:3, 1]
        + ii[None, None, :, None] * a[:3, 0]
        + (a[:3, 3] - shape.center)
    )
    local = off @ shape.rotation  # coordinates along the lesion axes
    q = local / shape.semi_axes
    rho = np.linalg.norm(q, axis=-1)
    unit = q / np.maximum(rho, 1e-9)[..., None]
    surface = 1.0 + np.cos(unit @ shape.wave_dirs.T + shape.wave_phases) @ shape.wave_amps
    # Approximate signed distance in mm: radial excess scaled by the local radius.
    local_radius = np.linalg.norm(unit * shape.semi_axes, axis=-1)
    sdf = (rho - surface) * local_radius
    voxel = float(np.mean(grid.spacing))
    frac = np.clip(0.5 - sdf / voxel, 0.0, 1.0).astype(np.float32)
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return box, frac


def paint(
    lesions: list[Lesion], grid: Grid, shapes: dict[int, LesionShape] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume map (max over lesions) and label map (id where fraction >= 0.5).

    ``shapes`` overrides the shape of some lesions (enlarged or shrunk at a follow-up).
    """
    pv = np.zeros(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.int32)
    for lesion in lesions:
        shape = (shapes or {}).get(lesion.lesion_id, lesion.shape)
        out = render(shape, grid)
        if out is None:
            continue
        box, frac = out
        region = pv[box]
        lab = labels[box]
        inside = frac >= 0.5
        # Lesions are placed apart; where footprints touch after growth, the larger fraction
        # wins the label so that labels stay a partition.
        take = inside & (frac > region)
        lab[take] = lesion.lesion_id
        np.maximum(region, frac, out=region)
    return pv, labels
