"""The ICBM152 2009 symmetric template with derived CSF, ventricles and infratentorial region.

Sources (all read by path, nothing downloaded):

* nilearn's wheel ships the ICBM152 2009c symmetric T1 (brain-extracted), GM and WM
  probability maps at 1 mm (uint8, probability × 255). Their licence is given as "unknown" by
  nilearn; see docs/simulator.md.
* Debian's ``mricron-data`` ships Colin27 with skull (``ch2.nii.gz``) and its brain extraction
  (``ch2bet.nii.gz``), the AAL atlas (labels 91–116: cerebellum and vermis) and the JHU white
  matter labels (1 middle cerebellar peduncle, 2 pontine crossing tract, 7–16 brainstem
  tracts). They add a scalp/skull shell and the infratentorial region; without them the
  simulator falls back to a geometric approximation and says so in the log.

Everything is resampled onto one grid (the ICBM grid cropped to the head, at the requested
isotropic spacing) and kept in LPS like every other grid of this package.
"""

from __future__ import annotations

import functools
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from ms_forecast_node.errors import AnatomyDataError
from ms_forecast_node.image.geometry import Grid

log = logging.getLogger(__name__)

ICBM_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MRICRON_DIR = Path("/usr/share/mricron/templates")
AAL_CEREBELLUM_LABELS = range(91, 117)
JHU_INFRATENTORIAL_LABELS = (1, 2, *range(7, 17))

# Crop of the ICBM grid (MNI RAS mm) that holds the head with a margin, so that simulated
# volumes carry no more background than a scanner's field of view would.
HEAD_BOX_RAS = ((-92.0, 92.0), (-128.0, 96.0), (-72.0, 110.0))


def find_icbm_directory() -> Path:
    """Locate nilearn's packaged data folder without importing nilearn (slow, noisy)."""
    candidates = [Path(sysconfig.get_paths()["purelib"]) / "nilearn" / "datasets" / "data"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("nilearn")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(Path(loc) / "datasets" / "data")
    except (ImportError, ValueError):
        pass
    for folder in candidates:
        if all((folder / name).is_file() for name in ICBM_FILES.values()):
            return folder
    raise AnatomyDataError(
        "ICBM152 2009 template files not found; install nilearn (its wheel ships them). "
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


@dataclass(frozen=True)
class TemplateAnatomy:
    """Tissue maps on one grid. Probabilities in [0, 1], arrays indexed [k, j, i]."""

    grid: Grid
    t1: np.ndarray  # ICBM T1 intensity, 0..1 (brain only)
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray  # lateral + third ventricle, probability
    infratentorial: np.ndarray  # 0/1 region (brainstem, cerebellum), float32
    head: np.ndarray  # non-brain head tissue (scalp, skull, fat) intensity 0..1
    skull: np.ndarray  # 0..1 cortical bone likelihood (dark on every sequence)
    dist_ventricles_mm: np.ndarray  # distance to the ventricle surface, 0 inside
    dist_cortex_mm: np.ndarray  # distance to cortical grey matter (GM > 0.5), 0 inside
    uses_atlases: bool

    @property
    def brain(self) -> np.ndarray:
        return np.clip(self.gm + self.wm + self.csf, 0.0, 1.0)

    def channels(self) -> dict[str, np.ndarray]:
        """The maps that move with a patient's deformation (distance maps included)."""
        return {
            "gm": self.gm,
            "wm": self.wm,
            "csf": self.csf,
            "ventricles": self.ventricles,
            "infratentorial": self.infratentorial,
            "head": self.head,
            "skull": self.skull,
            "dist_ventricles_mm": self.dist_ventricles_mm,
            "dist_cortex_mm": self.dist_cortex_mm,
        }


def _load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img: Any = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _resample_to(
    data_ijk: np.ndarray, affine_ras: np.ndarray, target: Grid, order: int
) -> np.ndarray:
    """Resample a NIfTI-ordered array onto ``target`` (returns [k, j, i])."""
    nk, nj, ni = target.shape
    kk, jj, ii = np.meshgrid(
        np.arange(nk, dtype=np.float64),
        np.arange(nj, dtype=np.float64),
        np.arange(ni, dtype=np.float64),
        indexing="ij",
    )
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    world_ras = target.index_to_world(ijk) * np.array([-1.0, -1.0, 1.0])
    src = np.linalg.inv(affine_ras)
    vox = world_ras @ src[:3, :3].T + src[:3, 3]
    out = ndimage.map_coordinates(
        data_ijk, vox.T, order=order, mode="constant", cval=0.0, prefilter=False
    )
    return out.reshape(target.shape).astype(np.float32)


def _block_mean(data_kji: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``³ blocks: the partial-volume downsampling of a 1 mm map."""
    if factor == 1:
        return data_kji
    k, j, i = (s // factor * factor for s in data_kji.shape)
    d = data_kji[:k, :j, :i]
    d = d.reshape(k // factor, factor, j // factor, factor, i // factor, factor)
    return d.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def template_grid(spacing_mm: float) -> Grid:
    """The cropped ICBM head grid at ``spacing_mm`` (a whole multiple of 1 mm)."""
    factor = int(round(spacing_mm))
    if factor < 1 or abs(factor - spacing_mm) > 1e-6:
        raise AnatomyDataError(f"template spacing must be a whole number of mm, got {spacing_mm}")
    (x0, x1), (y0, y1), (z0, z1) = HEAD_BOX_RAS
    n = [int((hi - lo) // factor) for lo, hi in HEAD_BOX_RAS]
    # RAS corner (x0, y0, z0) is LPS (-x0, -y0, z0); axes i,j,k run along +R,+A,+S in RAS,
    # i.e. -L, -P, +S in LPS. Voxel centres of the 1 mm blocks' means sit half a block in.
    half = (factor - 1) / 2.0
    origin_lps = (-(x0 + half), -(y0 + half), z0 + half)
    direction = np.diag([-1.0, -1.0, 1.0])
    return Grid.from_geometry((n[2], n[1], n[0]), (float(factor),) * 3, origin_lps, direction)


def _ventricles_from_csf(csf: np.ndarray, grid: Grid) -> np.ndarray:
    """Ventricles = the large CSF components in the central box of MNI space."""
    nk, nj, ni = grid.shape
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    world = grid.index_to_world(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    x_ras, y_ras, z_ras = -world[:, 0], -world[:, 1], world[:, 2]
    central = (np.abs(x_ras) < 35) & (y_ras > -48) & (y_ras < 38) & (z_ras > -12) & (z_ras < 40)
    central = central.reshape(grid.shape)
    core = (csf > 0.55) & central
    labels, n = ndimage.label(core)
    if n == 0:
        raise AnatomyDataError("no ventricles found in the template CSF map")
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1)) * grid.voxel_volume_mm3
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= 300.0))
    # Soft edge: CSF probability inside one voxel of the kept components.
    near = ndimage.binary_dilation(keep, iterations=1)
    return np.where(near, csf, 0.0).astype(np.float32)


def _atlas_infratentorial(grid: Grid) -> np.ndarray | None:
    aal = MRICRON_DIR / "aal.nii.gz"
    jhu = MRICRON_DIR / "JHU-WhiteMatter-labels-1mm.nii.gz"
    if not (aal.is_file() and jhu.is_file()):
        return None
    aal_data, aal_aff = _load_ras(aal)
    jhu_data, jhu_aff = _load_ras(jhu)
    cereb = np.isin(_resample_to(aal_data, aal_aff, grid, 0), list(AAL_CEREBELLUM_LABELS))
    stem = np.isin(_resample_to(jhu_data, jhu_aff, grid, 0), list(JHU_INFRATENTORIAL_LABELS))
    return ndimage.binary_closing(cereb | stem, iterations=2)


def _geometric_infratentorial(grid: Grid) -> np.ndarray:
    """Fallback: below an oblique plane approximating the tentorium, plus the brainstem."""
    nk, nj, ni = grid.shape
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    world = grid.index_to_world(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    x, y, z = -world[:, 0], -world[:, 1], world[:, 2]
    cerebellum = (y < -40) & (z < -12 - 0.25 * (y + 40))
    brainstem = (np.abs(x) < 16) & (y > -45) & (y < -10) & (z < -8)
    return (cerebellum | brainstem).reshape(grid.shape)


def _colin_head(grid: Grid) -> tuple[np.ndarray, np.ndarray] | None:
    ch2 = MRICRON_DIR / "ch2.nii.gz"
    bet = MRICRON_DIR / "ch2bet.nii.gz"
    if not (ch2.is_file() and bet.is_file()):
        return None
    head_data, head_aff = _load_ras(ch2)
    bet_data, bet_aff = _load_ras(bet)
    head = _resample_to(head_data, head_aff, grid, 1) / 255.0
    brain = _resample_to((bet_data > 0).astype(np.float32), bet_aff, grid, 1)
    head_mask = ndimage.binary_fill_holes(head > 0.08)
    brain_dil = ndimage.binary_dilation(brain > 0.5, iterations=2)
    non_brain = np.where(head_mask & ~brain_dil, head, 0.0)
    # Bone is the dark band between scalp and brain inside the head outline.
    skull = (head_mask & ~brain_dil & (head < 0.25)).astype(np.float32)
    return non_brain.astype(np.float32), ndimage.gaussian_filter(skull, 0.7)


CACHE_VERSION = 1


def cache_directory() -> Path:
    """Where derived anatomy is cached (``MSFN_CACHE_DIR``, else XDG cache)."""
    env = os.environ.get("MSFN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ms-forecast-node"


@functools.lru_cache(maxsize=4)
def load_template_anatomy(spacing_mm: float = 2.0) -> TemplateAnatomy:
    """The template on the cropped ICBM grid at ``spacing_mm``, from cache when possible.

    Deriving the maps takes about 10 s (resampling atlases, distance transforms); the result is
    cached as an uncompressed ``.npz`` keyed by spacing and whether atlases were available.
    """
    factor = int(round(spacing_mm))
    uses_atlases = (MRICRON_DIR / "aal.nii.gz").is_file() and (MRICRON_DIR / "ch2.nii.gz").is_file()
    cache = cache_directory() / f"anatomy-v{CACHE_VERSION}-{factor}mm-atlas{int(uses_atlases)}.npz"
    grid = template_grid(float(factor))
    if cache.is_file():
        try:
            with np.load(cache) as data:
                arrays = {name: data[name].astype(np.float32) for name in data.files}
            return TemplateAnatomy(grid=grid, uses_atlases=uses_atlases, **arrays)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable anatomy cache %s: %s", cache, exc)
    anatomy = _derive_anatomy(factor)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        fields = {
            k: v.astype(np.float16) for k, v in {**anatomy.channels(), "t1": anatomy.t1}.items()
        }
        np.savez(tmp, **fields)  # type: ignore[arg-type]
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("could not cache anatomy at %s: %s", cache, exc)
    return anatomy


def _derive_anatomy(factor: int) -> TemplateAnatomy:
    """Load the template at 1 mm, derive the extra maps and bring them to ``factor`` mm."""
    folder = find_icbm_directory()
    grid1 = template_grid(1.0)
    maps: dict[str, np.ndarray] = {}
    for key, name in ICBM_FILES.items():
        data, aff = _load_ras(folder / name)
        maps[key] = np.clip(_resample_to(data, aff, grid1, 1) / 255.0, 0.0, 1.0)
    brain_mask = maps["t1"] > 0.0
    gm, wm = maps["gm"], maps["wm"]
    csf = np.where(brain_mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    ventricles = _ventricles_from_csf(csf, grid1)
    infra = _atlas_infratentorial(grid1)
    colin = _colin_head(grid1)
    uses_atlases = infra is not None and colin is not None
    if infra is None:
        log.warning("mricron-data atlases not found: using a geometric infratentorial region")
        infra = _geometric_infratentorial(grid1)
    infra = infra & (gm + wm > 0.2)
    if colin is None:
        log.warning("Colin27 (mricron-data) not found: simulated heads will have no scalp/skull")
        head, skull = np.zeros_like(gm), np.zeros_like(gm)
    else:
        head, skull = colin
        head = np.where(brain_mask, 0.0, head).astype(np.float32)
    dist_v = ndimage.distance_transform_edt(ventricles < 0.5).astype(np.float32)
    cortex = (gm > 0.5) & ~infra
    dist_c = ndimage.distance_transform_edt(~cortex).astype(np.float32)

    grid = template_grid(float(factor))
    shrink = functools.partial(_block_mean, factor=factor)
    anatomy = TemplateAnatomy(
        grid=grid,
        t1=shrink(maps["t1"]),
        gm=shrink(gm),
        wm=shrink(wm),
        csf=shrink(csf),
        ventricles=shrink(ventricles),
        infratentorial=shrink(infra.astype(np.float32)),
        head=shrink(head),
        skull=shrink(skull),
        dist_ventricles_mm=shrink(dist_v),
        dist_cortex_mm=shrink(dist_c),
        uses_atlases=uses_atlases,
    )
    for name, arr in anatomy.channels().items():
        if arr.shape != grid.shape:
            raise AnatomyDataError(f"internal: map {name} has shape {arr.shape} != {grid.shape}")
    return anatomy
