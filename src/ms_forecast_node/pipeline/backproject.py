"""Model-grid forecasts → the reference series' voxels, with native lesions and locations.

Probabilities are resampled linearly onto the reference grid and thresholded there (the same
threshold the forecaster used), so the overlay follows the forecast's shape at the reader's
resolution instead of showing model-grid blocks. Lesion locations use the shared MAGNIMS-style
classifier with the template's distance maps carried into native space.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ms_forecast_node.anatomy.locations import LocationMaps, classify_lesions
from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.forecast.result import ForecastLesion, ForecastResult
from ms_forecast_node.image.preprocess import TemplateMapping
from ms_forecast_node.image.registration import resample
from ms_forecast_node.report.inputs import NativeTherapyForecast

STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def native_location_maps(mapping: TemplateMapping, spacing_mm: float = 2.0) -> LocationMaps:
    anatomy = load_template_anatomy(spacing_mm)
    to_template = mapping.template_to_reference.GetInverse()
    grid = mapping.reference.grid

    def carried(array: np.ndarray) -> np.ndarray:
        return resample(
            anatomy.grid.to_sitk(array.astype(np.float32)), grid, to_template, default=99.0
        )

    return LocationMaps(
        grid,
        carried(anatomy.dist_ventricles_mm),
        carried(anatomy.dist_cortex_mm),
        resample(anatomy.grid.to_sitk(anatomy.infratentorial), grid, to_template) >= 0.5,
    )


def native_forecasts(
    result: ForecastResult,
    mapping: TemplateMapping,
    threshold: float,
    min_volume_mm3: float,
) -> dict[str, NativeTherapyForecast]:
    """One :class:`NativeTherapyForecast` per therapy on ``mapping.reference.grid``."""
    grid = mapping.reference.grid
    voxel = grid.voxel_volume_mm3
    maps: LocationMaps | None = None
    out: dict[str, NativeTherapyForecast] = {}
    for key, forecast in result.therapies.items():
        probability = np.clip(mapping.to_reference(forecast.probability), 0.0, 1.0).astype(
            np.float32
        )
        labels, n = ndimage.label(probability >= threshold, structure=STRUCTURE)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel
            keep = np.flatnonzero(sizes >= min_volume_mm3)
            keep = keep[keep > 0]
            lut = np.zeros(n + 1, np.int32)
            lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
            labels, n = lut[labels], int(keep.size)
        labels = labels.astype(np.int32)
        lesions: list[ForecastLesion] = []
        if n:
            maps = maps or native_location_maps(mapping)
            classes = classify_lesions(labels, maps)
            ids = np.arange(1, n + 1)
            counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            inside = labels > 0
            lab = labels[inside]
            where = np.argwhere(inside)[:, ::-1].astype(np.float64)  # (i, j, k)
            mean_prob = ndimage.mean(probability[inside], lab, ids)
            for idx, label in enumerate(ids):
                centroid_ijk = where[lab == label].mean(axis=0)
                c = grid.index_to_world(centroid_ijk[None])[0]
                lesions.append(
                    ForecastLesion(
                        label=int(label),
                        volume_mm3=float(counts[idx]) * voxel,
                        centroid_lps_mm=(float(c[0]), float(c[1]), float(c[2])),
                        location=classes[int(label)],
                        mean_probability=float(mean_prob[idx]),
                    )
                )
        out[key] = NativeTherapyForecast(
            therapy=key,
            mask=labels > 0,
            probability=probability,
            lesions=tuple(lesions),
            labels=labels,
        )
    return out
