"""The short summary of a processed study: JSON for scripts, a PNG montage for people."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ms_forecast_node.report.inputs import ReportInput, therapy_views
from ms_forecast_node.report.keyimages import display_window
from ms_forecast_node.report.templates import Templates

if TYPE_CHECKING:
    from ms_forecast_node.image.preprocess import PreprocessedStudy
    from ms_forecast_node.pipeline.visits import LoadedVisits
    from ms_forecast_node.report.build import OutputObject


def summary_json(
    visits: LoadedVisits,
    study: PreprocessedStudy,
    report_input: ReportInput,
    objects: list[OutputObject],
    timings: dict[str, float],
) -> dict[str, Any]:
    result = report_input.result
    ranked = []
    for rank, forecast in enumerate(result.ranked(), start=1):
        native = report_input.native[forecast.therapy]
        lo, hi = forecast.count_interval_90
        ranked.append(
            {
                "rank": rank,
                "therapy": forecast.therapy,
                "expected_net2_count": round(forecast.expected_count, 3),
                "count_median": forecast.count_median,
                "count_interval_90": [lo, hi],
                "probability_of_activity": round(forecast.probability_of_activity, 3),
                "volume_mm3_mean": round(forecast.volume_mm3_mean, 1),
                "expected_counts_by_location": {
                    k.value: round(v, 3) for k, v in forecast.expected_counts_by_location().items()
                },
                "forecast_mask_lesions_native": len(native.lesions),
                "forecast_mask_voxels_native": int(native.mask.sum()),
            }
        )
    return {
        "study_instance_uid": visits.selection.study_instance_uid,
        "study_version": report_input.study_version,
        "model": {
            "name": result.model_name,
            "version": result.model_version,
            "sha256": result.model_sha256,
        },
        "horizon_weeks": result.horizon_weeks,
        "sampler": result.sampler,
        "selection": visits.selection.to_json() | {"inventory": None},
        "prior": visits.prior_note,
        "preprocessing": study.summary(),
        "therapies_ranked": ranked,
        "outputs": [
            {
                "kind": o.kind.value,
                "therapy": o.therapy,
                "sop_class_uid": str(o.dataset.SOPClassUID),
                "sop_instance_uid": str(o.dataset.SOPInstanceUID),
                "series_instance_uid": str(o.dataset.SeriesInstanceUID),
                "series_description": str(o.dataset.get("SeriesDescription", "")),
            }
            for o in objects
        ],
        "timings_s": {k: round(v, 3) for k, v in (timings | result.timings_s).items()},
    }


def write_montage(report_input: ReportInput, templates: Templates, path: Path) -> Path:
    """One panel per therapy (ranked) on the same reference slice, so the panels compare like
    with like: the therapy colour at the voxel probability (faint where few draws agree) and a
    white outline around the binary forecast mask. The slice is the one with the most forecast
    voxels over all therapies, else the most probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = report_input.reference
    views = therapy_views(report_input)
    union = np.zeros(reference.grid.shape, bool)
    mass = np.zeros(reference.grid.shape[0], np.float64)
    for view in views:
        union |= view.native.mask
        mass += view.native.probability.reshape(mass.size, -1).sum(axis=1)
    per_slice = union.reshape(union.shape[0], -1).sum(axis=1)
    if per_slice.any():
        k = int(np.argmax(per_slice))
    elif mass.any():
        k = int(np.argmax(mass))
    else:
        k = reference.grid.shape[0] // 2
    lo, hi = display_window(reference.pixels, (1.0, 99.5))
    grey = np.clip((reference.pixels[k] - lo) / (hi - lo), 0.0, 1.0)
    cols = min(4, len(views))
    rows = int(np.ceil(len(views) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, view in zip(axes.ravel(), views, strict=False):
        rgb = np.asarray(templates.colour(view.key).as_rgb(), np.float64) / 255.0
        # One draw in eight already shows clearly (alpha 0.5): rare draws are what the reader
        # needs to see when no voxel reaches the mask threshold.
        alpha = np.clip(view.native.probability[k].astype(np.float64) * 4.0, 0.0, 0.9)[..., None]
        image = (1.0 - alpha) * grey[..., None] + alpha * rgb[None, None, :]
        ax.imshow(image, interpolation="nearest")
        if view.native.mask[k].any():
            ax.contour(view.native.mask[k], levels=[0.5], colors="white", linewidths=0.6)
        f = view.forecast
        lo_c, hi_c = f.count_interval_90
        ax.set_title(
            f"{templates.therapy(view.key).short_label}\n"
            f"E[NET2] {f.expected_count:.1f} [{lo_c:.0f}-{hi_c:.0f}], "
            f"P(act) {f.probability_of_activity:.2f}",
            fontsize=8,
        )
    fig.suptitle(
        f"{report_input.result.disclaimer} - {report_input.result.model_name} "
        f"{report_input.result.model_version} - slice {k + 1}/{reference.grid.shape[0]} - "
        "colour: share of draws, outline: forecast mask",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96), h_pad=3.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
