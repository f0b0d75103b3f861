"""Voxel grids with their world geometry (LPS, the DICOM and ITK patient frame).

Arrays are indexed ``[k, j, i]`` (slice, row, column), the order of
``SimpleITK.GetArrayFromImage``. A :class:`Grid` maps a voxel index ``(i, j, k)`` to LPS
millimetres with a 4×4 affine, so every image can be mapped to any other grid exactly; NIfTI
files store RAS affines and are converted at the file boundary only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    # Imported where used: the forecaster and the simulator use grids without ITK.
    import SimpleITK as sitk

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Convert a RAS voxel-to-world affine (NIfTI) to LPS (DICOM/ITK)."""
    return _LPS_RAS @ np.asarray(affine_ras, dtype=np.float64)


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert an LPS voxel-to-world affine (DICOM/ITK) to RAS (NIfTI)."""
    return _LPS_RAS @ np.asarray(affine_lps, dtype=np.float64)


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid: array shape ``(nk, nj, ni)`` and an index→LPS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4, (i, j, k, 1) -> LPS mm

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"grid affine must be 4x4, got {aff.shape}")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_geometry(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float],
        direction: np.ndarray | None = None,
    ) -> Grid:
        """Build from ITK-style spacing (i, j, k), origin (LPS) and direction (columns = axes)."""
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        aff = np.eye(4)
        aff[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
        aff[:3, 3] = origin
        return cls(shape, aff)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Grid:
        size = image.GetSize()  # (i, j, k)
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return cls.from_geometry(
            (size[2], size[1], size[0]), image.GetSpacing(), image.GetOrigin(), direction
        )

    @classmethod
    def from_nifti_affine(cls, shape_ijk: tuple[int, int, int], affine_ras: np.ndarray) -> Grid:
        """NIfTI arrays are indexed [i, j, k]; the grid keeps numpy order [k, j, i]."""
        return cls((shape_ijk[2], shape_ijk[1], shape_ijk[0]), ras_to_lps(affine_ras))

    # --- properties ---------------------------------------------------------------------
    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> tuple[float, float, float]:
        o = self.affine[:3, 3]
        return (float(o[0]), float(o[1]), float(o[2]))

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def nifti_affine(self) -> np.ndarray:
        return lps_to_ras(self.affine)

    # --- mapping ------------------------------------------------------------------------
    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (i, j, k) -> (N, 3) LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous voxel indices (i, j, k)."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap a ``[k, j, i]`` array into a SimpleITK image with this grid's geometry."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape}")
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    def resampled(self, spacing: float) -> Grid:
        """Same field of view and orientation with an isotropic ``spacing`` (mm)."""
        old = np.asarray(self.spacing)
        extent = old * (np.asarray(self.size_ijk) - 1)
        size = np.floor(extent / spacing + 1e-6).astype(int) + 1
        return Grid.from_geometry(
            (int(size[2]), int(size[1]), int(size[0])), (spacing,) * 3, self.origin, self.direction
        )

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))
