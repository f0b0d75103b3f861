"""MAGNIMS-style lesion location classes — the one definition the simulator and reports share.

Rules, applied in this order to each lesion (a connected set of voxels):

1. **infratentorial** — at least half of the lesion lies in the brainstem/cerebellum region;
2. **periventricular** — some lesion voxel lies within ``periventricular_mm`` (default 3 mm)
   of the lateral/third ventricles (MAGNIMS 2016: touching the ventricles);
3. **juxtacortical** — some lesion voxel lies within ``juxtacortical_mm`` (default 2 mm) of
   cortical grey matter (GM probability > 0.5), i.e. touching the cortex;
4. **deep white matter** — everything else.

Distances are measured in millimetres on distance maps that travel with the anatomy, so the
same function works on the template grid, a deformed patient and a back-projected forecast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ms_forecast_node.image.geometry import Grid


class LocationClass(str, enum.Enum):
    PERIVENTRICULAR = "periventricular"
    JUXTACORTICAL = "juxtacortical"
    INFRATENTORIAL = "infratentorial"
    DEEP_WHITE_MATTER = "deep_white_matter"


@dataclass(frozen=True)
class LocationMaps:
    """What the classifier needs, on the grid of the lesion labels."""

    grid: Grid
    dist_ventricles_mm: np.ndarray
    dist_cortex_mm: np.ndarray
    infratentorial: np.ndarray  # 0..1 membership
    periventricular_mm: float = 3.0
    juxtacortical_mm: float = 2.0


def classify_lesions(labels: np.ndarray, maps: LocationMaps) -> dict[int, LocationClass]:
    """Classify every positive label of ``labels`` (same grid as ``maps``)."""
    if labels.shape != maps.grid.shape:
        raise ValueError(f"label shape {labels.shape} != location grid {maps.grid.shape}")
    # Work on lesion voxels only: scipy's per-label reductions sort the whole volume otherwise.
    where = np.flatnonzero(labels)
    if where.size == 0:
        return {}
    lab = labels.ravel()[where]
    ids = np.unique(lab)
    infra_share = ndimage.mean(maps.infratentorial.ravel()[where], lab, index=ids)
    min_vent = ndimage.minimum(maps.dist_ventricles_mm.ravel()[where], lab, index=ids)
    min_cortex = ndimage.minimum(maps.dist_cortex_mm.ravel()[where], lab, index=ids)
    out: dict[int, LocationClass] = {}
    for lesion_id, infra, dv, dc in zip(ids, infra_share, min_vent, min_cortex, strict=True):
        if infra >= 0.5:
            cls = LocationClass.INFRATENTORIAL
        elif dv <= maps.periventricular_mm:
            cls = LocationClass.PERIVENTRICULAR
        elif dc <= maps.juxtacortical_mm:
            cls = LocationClass.JUXTACORTICAL
        else:
            cls = LocationClass.DEEP_WHITE_MATTER
        out[int(lesion_id)] = cls
    return out


def classify_mask(
    mask: np.ndarray, maps: LocationMaps
) -> tuple[np.ndarray, dict[int, LocationClass]]:
    """Label the connected components (26-connectivity) of a binary mask and classify them."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, classify_lesions(labels, maps)
