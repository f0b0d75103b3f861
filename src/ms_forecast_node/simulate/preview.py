"""PNG montages of a simulated patient: baseline FLAIR with lesion outlines, T1/T2/PD,
follow-up FLAIR, and the NET2 mask under every therapy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

from ms_forecast_node.simulate.images import synthesize_visit
from ms_forecast_node.simulate.patient import RenderedPatient
from ms_forecast_node.simulate.protocols import MRSequence
from ms_forecast_node.simulate.therapies import load_therapies


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    # Grid axes are LPS-flipped (i: R->L? no: -L), show radiological convention: patient's
    # left on the image right, anterior at the top.
    return volume[k][::-1, ::-1]


def _window(img: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    vals = img[mask] if mask.any() else img
    return float(np.percentile(vals, 1)), float(np.percentile(vals, 99.5))


def write_preview(rendered: RenderedPatient, out: Path, slice_index: int | None = None) -> Path:
    """Write a montage PNG and return its path."""
    baseline = synthesize_visit(rendered, 0)
    followup = synthesize_visit(rendered, 1, (MRSequence.FLAIR,))
    therapies = load_therapies()
    placebo_net2 = rendered.net2["placebo"]
    if slice_index is None:
        per_slice = placebo_net2.sum(axis=(1, 2)) * 10 + (rendered.baseline_labels > 0).sum(
            axis=(1, 2)
        )
        slice_index = int(np.argmax(per_slice))
    k = slice_index
    brain = rendered.anatomy["gm"] + rendered.anatomy["wm"] > 0.5
    bl_outline = ndimage.binary_dilation(rendered.baseline_labels[k] > 0) & ~(
        rendered.baseline_labels[k] > 0
    )
    n_cols = max(4, len(therapies))
    fig, axes = plt.subplots(3, n_cols, figsize=(2.6 * n_cols, 8.4), facecolor="black")
    for ax in axes.ravel():
        ax.set_axis_off()
    for col, seq in enumerate(MRSequence):
        img = baseline[seq]
        lo, hi = _window(img, brain)
        axes[0, col].imshow(_axial(img, k), cmap="gray", vmin=lo, vmax=hi)
        axes[0, col].set_title(f"baseline {seq.value}", color="white", fontsize=9)
    outline = np.ma.masked_where(~bl_outline, bl_outline)
    axes[0, 0].imshow(outline[::-1, ::-1], cmap="autumn", alpha=0.9, interpolation="nearest")
    fl = followup[MRSequence.FLAIR]
    lo, hi = _window(fl, brain)
    axes[1, 0].imshow(_axial(fl, k), cmap="gray", vmin=lo, vmax=hi)
    axes[1, 0].set_title(
        f"follow-up FLAIR\n(factual: {rendered.design.factual_therapy})", color="white", fontsize=9
    )
    axes[1, 1].imshow(_axial(rendered.baseline_labels > 0, k), cmap="gray")
    axes[1, 1].set_title("baseline lesion mask", color="white", fontsize=9)
    axes[1, 2].imshow(_axial(rendered.followup_labels > 0, k), cmap="gray")
    axes[1, 2].set_title("follow-up lesion mask", color="white", fontsize=9)
    truth_lines = [
        f"{t.code}: {len(rendered.net2_lesion_ids[t.code])} NET2 "
        f"(E={rendered.design.activity.expected_count(t.code, rendered.design.horizon_weeks):.1f})"
        for t in therapies
    ]
    axes[1, 3].text(
        0.0, 0.5, "\n".join(truth_lines), color="white", fontsize=8, va="center", family="monospace"
    )
    for col, therapy in enumerate(therapies):
        mask = rendered.net2[therapy.code]
        axes[2, col].imshow(_axial(fl, k), cmap="gray", vmin=lo, vmax=hi)
        overlay = np.ma.masked_where(~mask[k], mask[k])
        axes[2, col].imshow(overlay[::-1, ::-1], cmap="spring", alpha=0.8, interpolation="nearest")
        axes[2, col].set_title(
            f"NET2 {therapy.code}\n(all slices: {int(mask.sum())} vox)", color="white", fontsize=8
        )
    fig.suptitle(
        f"SIMULATED patient {rendered.design.patient_id} — axial slice {k}, "
        f"horizon {rendered.design.horizon_weeks:g} weeks (research use only)",
        color="white",
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return out
