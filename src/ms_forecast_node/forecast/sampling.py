"""Forecast a study under every therapy: encode once, sample all therapies × samples batched.

* The study is encoded **once**; the denoiser reuses the projected features for every therapy,
  sample and step.
* Sample *s* starts from the same initial noise under every therapy (common random numbers),
  so differences between therapies come from the condition, not from the draw.
* Aggregation per therapy: voxel probability (share of samples), binary mask (threshold),
  per-voxel uncertainty, lesion-count distribution from per-sample connected components,
  probability of activity, volumes and counts per location class.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ms_forecast_node.anatomy.locations import LocationClass, LocationMaps, classify_lesions
from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import StudyTensors, model_grid
from ms_forecast_node.forecast.device import autocast
from ms_forecast_node.forecast.diffusion import (
    LogitFn,
    Schedule,
    ancestral_sample,
    ddim_sample,
    ddpm_sample,
    dpmpp2m_sample,
    guided,
    per_row,
)
from ms_forecast_node.forecast.model import (
    EncodedStudy,
    LesionDecoder,
    NET2Forecaster,
    log_rate_shift,
)
from ms_forecast_node.forecast.result import ForecastLesion, ForecastResult, TherapyForecast

STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def template_location_maps(spacing_mm: float, crop_shape: tuple[int, int, int]) -> LocationMaps:
    anatomy = load_template_anatomy(spacing_mm)
    grid, slices = model_grid(spacing_mm, crop_shape)
    return LocationMaps(
        grid,
        anatomy.dist_ventricles_mm[slices],
        anatomy.dist_cortex_mm[slices],
        anatomy.infratentorial[slices],
    )


def sample_masks(
    model: NET2Forecaster,
    study: StudyTensors,
    therapies: Sequence[str],
    horizon_weeks: float,
    config: SamplerConfig,
    device: torch.device | None = None,
    marginal_out: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Binary sample masks, shape (n_therapies, n_samples, D, H, W), and stage timings.

    ``marginal_out`` (n_therapies, D, H, W), when given, receives the network's own voxel
    probabilities at the first, pure-noise step (averaged over the samples): an x0-predicting
    network outputs ``E[mask | study, therapy]`` there, i.e. a smooth marginal that needs no
    sampling. It ranks therapies where every sample of a quiet patient is empty. For centre
    models it is the density of lesion centres (it sums to the expected lesion count).

    Centre models (``model.decoder``) diffuse the lesion-centre map on the cell grid and
    decode every sampled map into voxels; the returned masks are voxel masks either way.

    With ``config.draws_per_pass`` = k (ancestral sampler) each network trajectory yields k
    of the samples, drawn from its last step: ``ceil(samples / k)`` passes per therapy, and
    ``chunk_size`` counts passes per network call.
    """
    device = device or next(model.parameters()).device
    index = {c: i for i, c in enumerate(model.config.therapies)}
    unknown = [t for t in therapies if t not in index]
    if unknown:
        raise ValueError(f"therapies {unknown} unknown to model {model.config.name}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    images = torch.from_numpy(study.images[None]).float().to(device)
    flags = torch.from_numpy(study.flags[None]).float().to(device)
    with torch.no_grad(), autocast(device):
        encoded: EncodedStudy = model.encoder(images, flags)
    timings["encode_s"] = time.perf_counter() - start
    shape = study.images.shape[1:]
    decoder = model.decoder
    # Centre models diffuse the map of lesion centres, on cells of CELL³ voxels.
    cell = decoder.CELL if decoder is not None else 1
    diffused_shape = tuple(n // cell for n in shape)
    n_t, n_s = len(therapies), config.samples
    # Each network pass (one trajectory) yields ``k`` masks drawn from its last step.
    k = config.draws_per_pass if config.method == "ancestral" else 1
    n_pass = -(-n_s // k)
    generator = torch.Generator().manual_seed(config.seed)
    # Common random numbers: pass s starts from the same noise under every therapy.
    noise = torch.randn((n_pass, 1, *diffused_shape), generator=generator)
    # Rate dispersion: sample d of pass s gets the log-rate shift s·ε − s²/2 with its own ε,
    # the same under every therapy (common random numbers, from a stream of its own so the
    # noise and the draws are those of a model without dispersion).
    rate_sd = model.denoiser.sample_rate_sd(flags)
    shifts: torch.Tensor | None = None
    if rate_sd > 0.0 and not model.config.deterministic:
        epsilon = torch.randn(
            (n_pass, k), generator=torch.Generator().manual_seed(config.seed + 7919)
        )
        shifts = log_rate_shift(rate_sd, epsilon)
    pairs = [(t, s) for t in range(n_t) for s in range(n_pass)]
    out = np.zeros((n_t, n_s, *shape), dtype=bool)
    schedule = Schedule(model.config.timesteps)
    start = time.perf_counter()
    for first in range(0, len(pairs), max(1, config.chunk_size)):
        chunk = pairs[first : first + config.chunk_size]
        th = torch.tensor([index[therapies[t]] for t, _ in chunk], device=device)
        null = torch.full_like(th, model.denoiser.null_therapy)
        hz = torch.full((len(chunk),), float(horizon_weeks), device=device)
        x_init = torch.cat([noise[s : s + 1] for _, s in chunk]).to(device)

        def cond(
            x: torch.Tensor, t: torch.Tensor, th: torch.Tensor = th, hz: torch.Tensor = hz
        ) -> torch.Tensor:
            with autocast(device):
                return model.denoiser(x, t, th, hz, encoded).float()

        def uncond(
            x: torch.Tensor, t: torch.Tensor, null: torch.Tensor = null, hz: torch.Tensor = hz
        ) -> torch.Tensor:
            with autocast(device):
                return model.denoiser(x, t, null, hz, encoded).float()

        guided_fn = guided(cond, uncond, config.guidance_scale)
        first_step: list[torch.Tensor] = []

        def fn(
            x: torch.Tensor,
            t: torch.Tensor,
            inner: LogitFn = guided_fn,
            first_step: list[torch.Tensor] = first_step,
        ) -> torch.Tensor:
            logit = inner(x, t)
            if not first_step:
                first_step.append(torch.sigmoid(logit.float()))
            return logit

        chunk_shifts = None if shifts is None else shifts[[s for _, s in chunk]]
        trajectory_fn: LogitFn = fn
        if chunk_shifts is not None and config.method != "ancestral":
            # One shift per trajectory for the solvers (they end on one mask per pass); outside
            # ``fn``, so the recorded first-step marginal stays the unshifted mean.
            trajectory_fn = _shifted(fn, chunk_shifts[:, 0])

        with torch.no_grad():
            if model.config.deterministic:
                t_last = torch.full((len(chunk),), model.config.timesteps - 1, device=device)
                logit = fn(torch.zeros_like(x_init), t_last)
                masks = (torch.sigmoid(logit) >= config.threshold).repeat_interleave(k, dim=0)
            elif config.method == "ddpm":
                gen = torch.Generator(device=device).manual_seed(config.seed + first)
                masks = ddpm_sample(trajectory_fn, schedule, x_init, generator=gen) > 0
            elif config.method == "ancestral":
                # Per-pass random streams, the same under every therapy (common random
                # numbers): a therapy that lowers every cell's probability keeps a subset of
                # the lesions drawn under a weaker one, sample by sample.
                streams = [
                    torch.Generator().manual_seed(config.seed * 1_000_003 + s) for _, s in chunk
                ]
                masks = (
                    ancestral_sample(
                        fn, schedule, x_init, config.steps, streams, k, shifts=chunk_shifts
                    )
                    > 0
                )
            elif config.method == "dpmpp2m":
                masks = dpmpp2m_sample(trajectory_fn, schedule, x_init, config.steps) > 0
            else:
                masks = ddim_sample(trajectory_fn, schedule, x_init, config.steps) > 0
            marginal = first_step[0]
            if decoder is not None:
                assert encoded.appearance is not None
                masks = _decode(decoder, masks, encoded.appearance.float(), config.chunk_size)
                # A centre's probability spread over its cell: the map then sums to the
                # expected number of lesions (a density of lesion centres per voxel).
                marginal = F.interpolate(marginal, scale_factor=cell, mode="nearest") / cell**3
        drawn = masks[:, 0].cpu().numpy()
        for row, (t, s) in enumerate(chunk):
            for d in range(k):
                if s * k + d < n_s:
                    out[t, s * k + d] = drawn[row * k + d]
        if marginal_out is not None:
            for (t, _), prob in zip(chunk, marginal[:, 0].cpu().numpy(), strict=True):
                marginal_out[t] += prob / n_pass
    timings["sample_s"] = time.perf_counter() - start
    return out, timings


def _shifted(fn: LogitFn, shift: torch.Tensor) -> LogitFn:
    """``fn`` with a per-row logit shift (rows: trajectories)."""

    def shifted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logit = fn(x, t)
        return logit + per_row(shift, logit)

    return shifted


def _decode(
    decoder: LesionDecoder, centres: torch.Tensor, appearance: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Voxel masks of sampled centre maps, in chunks; a map without centres decodes to an
    empty mask, so the decoder runs only on the others (most draws of a quiet patient)."""
    masks = torch.zeros(
        (centres.shape[0], 1, *appearance.shape[2:]), dtype=torch.bool, device=centres.device
    )
    busy = torch.nonzero(centres.flatten(1).any(dim=1)).flatten()
    for first in range(0, len(busy), max(1, chunk_size)):
        rows = busy[first : first + chunk_size]
        masks[rows] = decoder.masks(centres[rows].float(), appearance)
    return masks


def _components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=STRUCTURE)
    if n and min_voxels > 1:
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        if small.size:
            labels[np.isin(labels, small)] = 0
            labels, n = ndimage.label(labels > 0, structure=STRUCTURE)
    return labels, int(n)


def aggregate(
    therapy: str,
    samples: np.ndarray,
    maps: LocationMaps,
    config: SamplerConfig,
    marginal: np.ndarray | None = None,
) -> TherapyForecast:
    """Summaries over the samples (S, D, H, W) of one therapy (``marginal``: the network's
    first-step voxel probabilities, see :func:`sample_masks`)."""
    voxel = maps.grid.voxel_volume_mm3
    probability = samples.mean(axis=0, dtype=np.float32)
    counts: list[int] = []
    volumes: list[float] = []
    by_location: dict[LocationClass, list[int]] = {c: [] for c in LocationClass}
    for sample in samples:
        if not sample.any():  # most draws of a quiet patient: nothing to label
            labels, n = sample, 0
        else:
            labels, n = _components(sample, config.min_lesion_voxels)
        counts.append(n)
        volumes.append(float(np.count_nonzero(labels)) * voxel)
        classes = classify_lesions(labels, maps) if n else {}
        for c in LocationClass:
            by_location[c].append(sum(1 for v in classes.values() if v is c))
    # The forecast mask holds only what is counted: components below the minimum lesion size
    # are dropped, so the SEG overlay and the SR's lesion list agree.
    labels, n = _components(probability >= config.threshold, config.min_lesion_voxels)
    mask = labels > 0
    classes = classify_lesions(labels, maps) if n else {}
    lesions = []
    for lab in range(1, n + 1):
        idx = np.argwhere(labels == lab)
        centroid = maps.grid.index_to_world(idx[:, ::-1].mean(axis=0)[None])[0]
        lesions.append(
            ForecastLesion(
                label=lab,
                volume_mm3=float(len(idx)) * voxel,
                centroid_lps_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                location=classes[lab],
                mean_probability=float(probability[labels == lab].mean()),
            )
        )
    return TherapyForecast(
        therapy=therapy,
        probability=probability,
        mask=mask,
        uncertainty=np.sqrt(probability * (1.0 - probability)).astype(np.float32),
        sample_counts=tuple(counts),
        sample_volumes_mm3=tuple(volumes),
        sample_counts_by_location={k: tuple(v) for k, v in by_location.items()},
        lesions=tuple(lesions),
        marginal_probability=marginal,
    )


def forecast_study(
    model: NET2Forecaster,
    study: StudyTensors,
    therapies: Sequence[str],
    horizon_weeks: float,
    config: SamplerConfig,
    model_sha256: str | None = None,
) -> ForecastResult:
    """The spine's forecasting step: one study in, one typed result out."""
    start = time.perf_counter()
    marginal = np.zeros((len(therapies), *study.images.shape[1:]), dtype=np.float32)
    samples, timings = sample_masks(
        model, study, therapies, horizon_weeks, config, marginal_out=marginal
    )
    maps = template_location_maps(model.config.spacing_mm, model.config.crop_shape)
    agg_start = time.perf_counter()
    forecasts = {
        t: aggregate(t, samples[i], maps, config, marginal[i]) for i, t in enumerate(therapies)
    }
    timings["aggregate_s"] = time.perf_counter() - agg_start
    timings["total_s"] = time.perf_counter() - start
    return ForecastResult(
        model_name=model.config.name,
        model_version=model.config.version,
        model_sha256=model_sha256,
        grid=study.grid,
        horizon_weeks=float(horizon_weeks),
        sampler=asdict(config),
        therapies=forecasts,
        timings_s=timings,
    )
