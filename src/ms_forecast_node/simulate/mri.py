"""MR synthesis: FLAIR, T1, T2 and PD from tissue fractions.

Each voxel's signal is the fraction-weighted sum of per-tissue signals from textbook relaxation
times at 3 T and simple signal equations (spin echo, inversion recovery, MPRAGE-like), so
partial volume behaves as on a scanner. A scanner profile adds what differs between sites and
visits: global scale, relaxation-time jitter (contrast variation), a smooth multiplicative bias
field and Rician noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.protocols import MRSequence

# (T1 ms, T2 ms, proton density) — approximate 3 T values (e.g. Wansapura 1999, Stanisz 2005).
TISSUES: dict[str, tuple[float, float, float]] = {
    "wm": (830.0, 80.0, 0.69),
    "gm": (1330.0, 110.0, 0.80),
    "csf": (4000.0, 2000.0, 1.00),
    "lesion_old": (1150.0, 150.0, 0.82),
    "lesion_young": (1250.0, 210.0, 0.88),  # oedema: longer T2, brighter on FLAIR/T2
    "black_hole": (2000.0, 180.0, 0.90),  # chronic lesion with axonal loss: dark on T1
    "prodrome": (1000.0, 120.0, 0.74),  # pre-lesional NAWM change: faintly T2-hyperintense
}

# Effective timing used for contrast (the DICOM headers carry the nominal protocol values;
# long echo-train 3D sequences have a much shorter effective T2 weighting than their TE).
CONTRAST_TIMING: dict[MRSequence, dict[str, float]] = {
    MRSequence.FLAIR: {"tr": 9000.0, "te": 110.0, "ti": 2500.0},
    MRSequence.T1: {"tr": 2300.0, "te": 3.0, "ti": 900.0},
    MRSequence.T2: {"tr": 4500.0, "te": 90.0},
    MRSequence.PD: {"tr": 3000.0, "te": 12.0},
}

# Relative brightness of non-brain head tissue (scalp fat, muscle) per contrast.
HEAD_GAIN = {MRSequence.FLAIR: 0.8, MRSequence.T1: 1.1, MRSequence.T2: 0.9, MRSequence.PD: 1.0}


def tissue_signal(sequence: MRSequence, t1: float, t2: float, pd: float) -> float:
    tm = CONTRAST_TIMING[sequence]
    if sequence is MRSequence.FLAIR:
        s = (
            pd
            * abs(1 - 2 * np.exp(-tm["ti"] / t1) + np.exp(-tm["tr"] / t1))
            * np.exp(-tm["te"] / t2)
        )
    elif sequence is MRSequence.T1:
        # MPRAGE-like magnitude with CSF, near the null, clipped to zero.
        s = pd * max(1 - 2 * np.exp(-tm["ti"] / t1) + np.exp(-tm["tr"] / t1), 0.0)
    else:
        s = pd * (1 - np.exp(-tm["tr"] / t1)) * np.exp(-tm["te"] / t2)
    return float(s)


@dataclass(frozen=True)
class ScannerProfile:
    """What one scanner (and one session on it) does to the images."""

    name: str
    scale: float  # arbitrary units of the scanner's pixel values
    relaxation_jitter: dict[str, tuple[float, float]]  # tissue -> (T1 factor, T2 factor)
    noise_sd: float  # relative to white-matter signal
    bias_coefficients: np.ndarray  # (10,) quadratic polynomial in world coords (per 100 mm)
    bias_strength: float


def draw_scanner(rng: np.random.Generator, name: str) -> ScannerProfile:
    jitter = {t: (float(rng.normal(1.0, 0.05)), float(rng.normal(1.0, 0.05))) for t in TISSUES}
    return ScannerProfile(
        name=name,
        scale=float(np.exp(rng.normal(np.log(1500.0), 0.3))),
        relaxation_jitter=jitter,
        noise_sd=float(rng.uniform(0.02, 0.05)),
        bias_coefficients=rng.standard_normal(10),
        bias_strength=float(rng.uniform(0.05, 0.18)),
    )


def with_new_session(profile: ScannerProfile, rng: np.random.Generator) -> ScannerProfile:
    """Same scanner, another day: new bias field (coil placement) and slight gain change."""
    return ScannerProfile(
        name=profile.name,
        scale=profile.scale * float(np.exp(rng.normal(0.0, 0.05))),
        relaxation_jitter=profile.relaxation_jitter,
        noise_sd=profile.noise_sd,
        bias_coefficients=rng.standard_normal(10),
        bias_strength=profile.bias_strength,
    )


def bias_field(grid: Grid, profile: ScannerProfile) -> np.ndarray:
    """exp(quadratic polynomial of world position), normalised to mean 1 at the isocentre."""
    nk, nj, ni = grid.shape
    a = grid.affine
    k = np.arange(nk, dtype=np.float32)[:, None, None]
    j = np.arange(nj, dtype=np.float32)[None, :, None]
    i = np.arange(ni, dtype=np.float32)[None, None, :]
    xyz = [(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3]) / 100.0 for r in range(3)]
    x, y, z = xyz
    c = profile.bias_coefficients.astype(np.float32)
    poly = (
        c[0] * x
        + c[1] * y
        + c[2] * z
        + c[3] * x * x
        + c[4] * y * y
        + c[5] * z * z
        + c[6] * x * y
        + c[7] * x * z
        + c[8] * y * z
    )
    return np.exp(profile.bias_strength * poly).astype(np.float32)


def clean_signal(
    sequence: MRSequence, fractions: dict[str, np.ndarray], profile: ScannerProfile
) -> np.ndarray:
    """Noise- and bias-free signal (white matter = 1) from tissue ``fractions``.

    ``fractions`` holds arrays for keys of :data:`TISSUES` and optionally ``head`` (non-brain
    intensity 0..1) and ``skull`` (bone, 0..1).
    """
    shape = next(iter(fractions.values())).shape
    signal = np.zeros(shape, dtype=np.float32)
    wm_t1, wm_t2, wm_pd = TISSUES["wm"]
    ref = tissue_signal(sequence, wm_t1, wm_t2, wm_pd)
    for tissue, (t1, t2, pd) in TISSUES.items():
        frac = fractions.get(tissue)
        if frac is None:
            continue
        f1, f2 = profile.relaxation_jitter.get(tissue, (1.0, 1.0))
        s = tissue_signal(sequence, t1 * f1, t2 * f2, pd) / max(ref, 1e-6)
        signal += np.float32(s) * frac
    head = fractions.get("head")
    if head is not None:
        signal += np.float32(HEAD_GAIN[sequence]) * head
    skull = fractions.get("skull")
    if skull is not None:
        signal *= 1.0 - 0.9 * np.clip(skull, 0.0, 1.0)
    return signal


def acquire(
    signal: np.ndarray, grid: Grid, profile: ScannerProfile, rng: np.random.Generator
) -> np.ndarray:
    """What the scanner records on ``grid``: bias field, Rician noise, scanner units."""
    biased = signal * bias_field(grid, profile)
    sd = np.float32(profile.noise_sd)
    n1 = rng.standard_normal(grid.shape, dtype=np.float32)
    n2 = rng.standard_normal(grid.shape, dtype=np.float32)
    # Rician magnitude noise: |S + n1 + i n2|.
    noisy = np.sqrt((biased + sd * n1) ** 2 + (sd * n2) ** 2)
    return noisy * np.float32(profile.scale * 0.4)


def synthesize(
    sequence: MRSequence,
    fractions: dict[str, np.ndarray],
    grid: Grid,
    profile: ScannerProfile,
    rng: np.random.Generator,
) -> np.ndarray:
    """Scanner-unit image of ``sequence`` from tissue ``fractions`` on ``grid``."""
    return acquire(clean_signal(sequence, fractions, profile), grid, profile, rng)


def lesion_fractions(
    anatomy: dict[str, np.ndarray],
    young: np.ndarray,
    old: np.ndarray,
    black_hole: np.ndarray,
    prodrome: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Tissue fractions with lesions replacing parenchyma (never CSF or scalp)."""
    parenchyma = np.clip(anatomy["gm"] + anatomy["wm"], 0.0, 1.0)
    if prodrome is None:
        prodrome = np.zeros_like(young)
    lesion = np.clip(young + old + black_hole + prodrome, 0.0, 1.0)
    keep = 1.0 - lesion
    return {
        "prodrome": prodrome * parenchyma,
        "gm": anatomy["gm"] * keep,
        "wm": anatomy["wm"] * keep,
        "csf": anatomy["csf"],
        "lesion_young": young * parenchyma,
        "lesion_old": old * parenchyma,
        "black_hole": black_hole * parenchyma,
        "head": anatomy["head"],
        "skull": anatomy["skull"],
    }
