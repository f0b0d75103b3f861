"""Per-patient anatomy: a smooth nonlinear warp plus lesion-related ventricular enlargement.

The warp is a pull-back displacement ``u`` (mm) so that ``patient(x) = template(x + u(x))``;
it is sampled with ``torch.nn.functional.grid_sample`` (multi-threaded trilinear), which keeps
a 1 mm patient to about a second on two cores.

Atrophy enlarges the ventricles: near the ventricles the template is read from a point moved
towards them along the gradient of a smoothed ventricle map, by up to ``atrophy_mm``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ms_forecast_node.anatomy.template import (
    TemplateAnatomy,
    load_template_anatomy,
    template_grid,
)
from ms_forecast_node.image.geometry import Grid


@functools.lru_cache(maxsize=4)
def _ventricle_pull(spacing_mm: float) -> np.ndarray:
    """(3, k, j, i) unit-scaled field pointing into the ventricles (index units per mm)."""
    anatomy = load_template_anatomy(spacing_mm)
    sigma_vox = 5.0 / spacing_mm
    smooth = ndimage.gaussian_filter(anatomy.ventricles.astype(np.float32), sigma_vox)
    grads = np.stack(np.gradient(smooth), axis=0)  # d/dk, d/dj, d/di
    mag = np.linalg.norm(grads, axis=0)
    grads /= max(float(np.percentile(mag[mag > 0], 99.5)), 1e-9)
    return np.clip(grads, -1.0, 1.0).astype(np.float32)


WARPED_CHANNELS = (
    "gm",
    "wm",
    "csf",
    "infratentorial",
    "head",
    "skull",
    "dist_ventricles_mm",
    "dist_cortex_mm",
)


@functools.lru_cache(maxsize=4)
def _channel_stack(spacing_mm: float) -> tuple[tuple[str, ...], torch.Tensor]:
    """The template channels a patient warp moves, stacked once per process (1, C, k, j, i)."""
    channels = load_template_anatomy(spacing_mm).channels()
    stack = np.stack([channels[n] for n in WARPED_CHANNELS]).astype(np.float32)
    return WARPED_CHANNELS, torch.from_numpy(stack[None])


def draw_displacement_control(rng: np.random.Generator, amplitude_mm: float) -> np.ndarray:
    """(3, 9, 11, 9) control-point displacements in mm over the template head box (~24 mm)."""
    return (rng.standard_normal((3, 9, 11, 9)) * amplitude_mm).astype(np.float32)


def _normalized_positions(grid: Grid, reference: Grid) -> torch.Tensor:
    """(1, k, j, i, 3) positions of ``grid`` voxels in ``reference`` normalised to [-1, 1]."""
    nk, nj, ni = grid.shape
    to_ref = np.linalg.inv(reference.affine) @ grid.affine
    kk, jj, ii = torch.meshgrid(
        torch.arange(nk, dtype=torch.float32),
        torch.arange(nj, dtype=torch.float32),
        torch.arange(ni, dtype=torch.float32),
        indexing="ij",
    )
    m = torch.from_numpy(to_ref.astype(np.float32))
    rk, rj, ri = reference.shape
    coords = []
    for row, n in ((0, ri), (1, rj), (2, rk)):
        c = m[row, 0] * ii + m[row, 1] * jj + m[row, 2] * kk + m[row, 3]
        coords.append(c / max(n - 1, 1) * 2.0 - 1.0)
    return torch.stack(coords, dim=-1)[None]


def warp_anatomy(
    anatomy: TemplateAnatomy,
    control_mm: np.ndarray,
    atrophy_mm: float,
) -> dict[str, np.ndarray]:
    """Warp every anatomy channel with one patient-specific pull-back field.

    The control displacements live in millimetres over the 1 mm template box, so the same
    patient gets the same warp whatever grid spacing it is rendered at.
    """
    grid: Grid = anatomy.grid
    spacing = grid.spacing[0]
    reference = template_grid(1.0)
    positions = _normalized_positions(grid, reference)
    control = torch.from_numpy(control_mm)[None]  # 1,3,ck,cj,ci (mm along k, j, i of box)
    disp_mm = F.grid_sample(
        control, positions, mode="bilinear", padding_mode="border", align_corners=True
    )[0]
    disp = disp_mm / spacing + torch.from_numpy(_ventricle_pull(spacing)) * (atrophy_mm / spacing)
    names, stack = _channel_stack(spacing)
    nk, nj, ni = grid.shape
    base = torch.stack(
        torch.meshgrid(
            torch.arange(nk, dtype=torch.float32),
            torch.arange(nj, dtype=torch.float32),
            torch.arange(ni, dtype=torch.float32),
            indexing="ij",
        )
    )
    pos = base + disp  # where each patient voxel reads the template, (k, j, i) indices
    sizes = torch.tensor([nk - 1, nj - 1, ni - 1], dtype=torch.float32).view(3, 1, 1, 1)
    norm = pos / sizes * 2.0 - 1.0
    # grid_sample wants (x=i, y=j, z=k) in the last dimension.
    sample_grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None]
    out = F.grid_sample(
        stack, sample_grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    warped = out[0].numpy()
    return {name: np.ascontiguousarray(warped[n]) for n, name in enumerate(names)}
