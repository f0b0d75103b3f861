"""The site head: a learned reader of pre-lesional change tells the forecast *where*.

Many new MS lesions are announced at baseline by a faint focal T2/FLAIR change in normal-
appearing white matter. The simulator plants one at 60 % of future new-lesion sites
(docs/simulator.md). Trained on a few hundred patients' outcomes, the diffusion network spreads
its lesion-centre probability over periventricular white matter and never concentrates it on
these sites (docs/forecaster.md, "Can the forecaster find where new lesions will appear?"), so
its binary forecast mask stayed empty and lesion F1 was 0. A small per-voxel classifier of the
sites, trained on the simulator's lesion records, finds them on the same 2 mm grid
(``benchmarks/prelesional_detector.py``).

The head makes that reader part of the model, computed once per study by the encoder:

* **features**: for FLAIR, T1, T2 and PD, two difference-of-Gaussians blob responses (1–4 mm
  and 2–8 mm) and two smoothed intensities (1 mm and 8 mm: the tissue around), in millimetres;
* **detector**: a per-voxel MLP (1×1×1 convolutions) on the standardised features, at brain
  voxels outside the current lesions; its output ``v`` is a site log-odds score;
* **cells**: each centre cell's logit gets ``α + β·σ((s − τ) / width)``, ``s`` the best score
  in the cell, after the network's last layer (like the therapy offsets and the prior-activity
  head, so a therapy still scales a site's chance); ``α, β, τ, width`` are a logistic regression of
  the true lesion-centre cells stacked on the frozen network's own first-step cell logits as
  the offset (so the intercept keeps the expected count honest);
* **voxels**: the decoder's appearance logit gets ``γ·max(v, 0)``, so a centre drawn in a cell
  with a site is drawn *at* the site; ``γ`` minimises the decoder's loss near true centres.

The head acts only when all four sequences are present (the detector reads all four); otherwise
the study is forecast exactly as without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, optimize, special
from torch import nn
from tqdm import tqdm

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.config import LESION_CHANNEL, SEQUENCES, ModelConfig
from ms_forecast_node.forecast.data import Example, brain_mask, lesion_centres, model_grid

if TYPE_CHECKING:  # the model builds this module's detector; importing it here would cycle
    from ms_forecast_node.forecast.model import NET2Forecaster

BLOB_SCALES_MM = ((1.0, 4.0), (2.0, 8.0))
CONTEXT_SCALES_MM = (1.0, 8.0)
N_FEATURES = len(SEQUENCES) * (len(BLOB_SCALES_MM) + len(CONTEXT_SCALES_MM))
SCORE_CLIP = 40.0  # a numerical guard on detector scores (sites reach about 25)
OUTSIDE = -SCORE_CLIP  # score of voxels that cannot hold a new lesion
PRODROME_VOLUME_FACTOR = 0.8  # simulate/patient.py: the change is the future lesion × 0.8
LESION_MARGIN_MM = 2.0  # a new site is not inside (or touching) a current lesion
BATCH_ROWS = 32768  # detector training minibatch (voxels)


def _gaussian_1d(sigma_vox: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(4.0 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W) with replicated edges."""
    k = _gaussian_1d(sigma_vox).to(x.device, x.dtype)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        weight = k.view(shape).expand(c, 1, *shape[2:]).contiguous()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=c)
    return x


class SiteDetector(nn.Module):
    """Images -> per-voxel site score ``v`` and the head's cell / voxel shifts."""

    feature_mean: torch.Tensor
    feature_sd: torch.Tensor
    brain: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.spacing_mm = config.spacing_mm
        self.mlp = nn.Sequential(
            nn.Conv3d(N_FEATURES, 32, 1),
            nn.ReLU(),
            nn.Conv3d(32, 32, 1),
            nn.ReLU(),
            nn.Conv3d(32, 1, 1),
        )
        self.register_buffer("feature_mean", torch.zeros(N_FEATURES))
        self.register_buffer("feature_sd", torch.ones(N_FEATURES))
        # (α, β, τ, log width, γ); zeros = no effect until fitted.
        self.head = nn.Parameter(torch.zeros(5))
        brain = torch.from_numpy(brain_mask(config.spacing_mm, tuple(config.crop_shape)))
        self.register_buffer("brain", brain[None, None].float(), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N_FEATURES, D, H, W) blob responses and tissue context of the four sequences."""
        seq = images[:, : len(SEQUENCES)].float()
        scales = sorted({*CONTEXT_SCALES_MM, *(s for pair in BLOB_SCALES_MM for s in pair)})
        smooth = {s: gaussian_blur(seq, s / self.spacing_mm) for s in scales}
        per_sequence = []
        for i in range(len(SEQUENCES)):
            feats = [smooth[a][:, i] - smooth[b][:, i] for a, b in BLOB_SCALES_MM]
            feats += [smooth[s][:, i] for s in CONTEXT_SCALES_MM]
            per_sequence += feats
        return torch.stack(per_sequence, dim=1)

    def candidates(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) bool: brain voxels outside the current lesions (dilated)."""
        r = max(1, int(round(LESION_MARGIN_MM / self.spacing_mm)))
        lesions = images[:, LESION_CHANNEL : LESION_CHANNEL + 1].float() > 0.5
        near = F.max_pool3d(lesions.float(), 2 * r + 1, stride=1, padding=r) > 0
        return (self.brain.to(images.device) > 0.5) & ~near

    def standardised(self, features: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1, 1)
        return (features - self.feature_mean.view(view)) / self.feature_sd.view(view)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) site score, clipped; ``OUTSIDE`` off the candidates."""
        v = self.mlp(self.standardised(self.features(images))).clamp(-SCORE_CLIP, SCORE_CLIP)
        return torch.where(self.candidates(images), v, torch.full_like(v, OUTSIDE))

    @staticmethod
    def cell_scores(scores: torch.Tensor, cell: int) -> torch.Tensor:
        return F.max_pool3d(scores, cell, stride=cell)

    def shifts(
        self, images: torch.Tensor, flags: torch.Tensor, cell: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell-logit shift (B, 1, d, h, w), appearance shift (B, 1, D, H, W)); both zero for a
        study without all four sequences."""
        v = self.scores(images)
        gate = (flags[:, : len(SEQUENCES)] > 0.5).all(dim=1).float().view(-1, 1, 1, 1, 1)
        alpha, beta, tau, log_width, gamma = self.head.unbind()
        best = self.cell_scores(v, cell)
        cell_shift = gate * (alpha + beta * torch.sigmoid((best - tau) / log_width.exp()))
        # Only site-like voxels are raised: current lesions (which may enlarge) keep their look.
        return cell_shift, gate * gamma * v.clamp_min(0.0)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteHeadFit:
    """What the fit found, for the model's metadata and card."""

    n_detector_studies: int
    n_detector_sites: int
    n_head_studies: int
    n_head_centres: int
    detector_voxel_auc_head_studies: float  # site voxels vs other candidates, unseen studies
    alpha: float
    beta: float
    tau: float
    width: float
    gamma: float
    cell_log_likelihood_before: float  # Bernoulli, true centre cells, head off
    cell_log_likelihood_after: float
    mean_count_observed: float
    mean_count_before: float
    mean_count_after: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def site_labels(sidecar: dict[str, Any], config: ModelConfig) -> np.ndarray:
    """(D, H, W) bool: balls of the pre-lesional change's volume at every visible site of the
    simulator's lesion records (``patient.json``)."""
    grid, _ = model_grid(config.spacing_mm, tuple(config.crop_shape))
    shape = tuple(config.crop_shape)
    labels = np.zeros(shape, dtype=bool)
    kk, jj, ii = np.indices(shape, sparse=True)
    for lesion in sidecar.get("lesions", []):
        if lesion.get("kind") != "new" or not lesion.get("prodrome_visible"):
            continue
        ijk = grid.world_to_index(np.asarray(lesion["centroid_lps_mm"], float)[None])[0]
        volume = PRODROME_VOLUME_FACTOR * float(lesion["volume_mm3"])
        radius = max((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0), 1.0) / config.spacing_mm
        labels |= (kk - ijk[2]) ** 2 + (jj - ijk[1]) ** 2 + (ii - ijk[0]) ** 2 <= radius**2
    return labels


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _features_and_candidates(
    detector: SiteDetector, example: Example
) -> tuple[np.ndarray, np.ndarray]:
    images = torch.from_numpy(example.study.images[None]).to(_device(detector))
    feats = detector.features(images)[0].cpu().numpy()
    cand = detector.candidates(images)[0, 0].cpu().numpy()
    return feats, cand


def train_detector(
    detector: SiteDetector,
    examples: Sequence[Example],
    seed: int = 0,
    negatives_per_study: int = 4000,
    epochs: int = 40,
) -> int:
    """Fit the detector's MLP and feature standardisation on ``examples`` (their visible
    pre-lesional sites against random other candidates); returns the number of sites."""
    rng = np.random.default_rng(seed)
    rows, ys, n_sites = [], [], 0
    for e in tqdm(examples, desc="site head: detector features", unit="study"):
        feats, cand = _features_and_candidates(detector, e)
        labels = site_labels(e.sidecar, detector.config) & cand
        n_sites += int(ndimage.label(labels)[1])
        pos = np.flatnonzero(labels)
        neg = np.flatnonzero(cand & ~labels)
        neg = rng.choice(neg, size=min(negatives_per_study, neg.size), replace=False)
        flat = feats.reshape(N_FEATURES, -1)
        rows += [flat[:, pos].T, flat[:, neg].T]
        ys += [np.ones(pos.size), np.zeros(neg.size)]
    if n_sites == 0:
        raise ConfigurationError("no visible pre-lesional site in the detector's studies")
    x = np.concatenate(rows).astype(np.float32)
    y = np.concatenate(ys).astype(np.float32)
    mean, sd = x.mean(0), x.std(0) + 1e-6
    device = _device(detector)
    with torch.no_grad():
        detector.feature_mean.copy_(torch.from_numpy(mean))
        detector.feature_sd.copy_(torch.from_numpy(sd))
    xt = torch.from_numpy((x - mean) / sd).to(device)[:, :, None, None, None]
    yt = torch.from_numpy(y).to(device)
    torch.manual_seed(seed)
    for layer in detector.mlp:
        if isinstance(layer, nn.Conv3d):
            layer.reset_parameters()
    opt = torch.optim.Adam(detector.mlp.parameters(), lr=3e-3, weight_decay=1e-4)
    # Balanced classes: the scores' scale is set afterwards by the head's β, τ and γ.
    pos_weight = torch.tensor(float((y == 0).sum()) / max(float(y.sum()), 1.0), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="site head: detector", unit="epoch", leave=False):
            for rows_ in torch.randperm(len(yt), generator=order).split(BATCH_ROWS):
                opt.zero_grad()
                loss = loss_fn(detector.mlp(xt[rows_]).flatten(), yt[rows_])
                loss.backward()
                opt.step()
    return n_sites


def _bernoulli_log_likelihood(logits: np.ndarray, y: np.ndarray) -> float:
    # log σ(l) for y = 1, log(1 − σ(l)) for y = 0, stably
    return float(-np.sum(np.logaddexp(0.0, np.where(y, -logits, logits))))


def cell_shift(
    scores: np.ndarray, alpha: float, beta: float, tau: float, width: float
) -> np.ndarray:
    """The head's logit shift ``α + β·σ((s − τ) / width)`` of cells with best score ``s``."""
    return alpha + beta * special.expit((scores - tau) / width)


def fit_cell_head(
    logits: np.ndarray, scores: np.ndarray, centres: np.ndarray
) -> tuple[tuple[float, float, float, float], float, float]:
    """Maximum-likelihood ``(α, β, τ, width)`` of ``centre_c ~ Bernoulli(σ(logit_c + α +
    β·σ((s_c − τ) / width)))`` (β ≥ 0: a stronger sign never lowers the chance), and the
    log-likelihoods before (no head) and after.

    The shift saturates: above ``τ`` a cell's chance stops growing with the score, because even
    a certain site becomes a lesion only if the event survives the therapy (and a linear ramp
    in the score fits the training cells clearly worse: docs/forecaster.md, "0.7.0")."""
    y = centres.astype(bool)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        alpha, beta, tau, log_width = theta
        width = np.exp(log_width)
        u = (scores - tau) / width
        g = special.expit(u)
        z = logits + alpha + beta * g
        residual = special.expit(z) - y
        slope = beta * g * (1.0 - g)
        grad = np.array(
            [
                residual.sum(),
                (residual * g).sum(),
                -(residual * slope).sum() / width,
                -(residual * slope * u).sum(),
            ]
        )
        return -_bernoulli_log_likelihood(z, y), grad

    bounds = [(-10.0, 10.0), (0.0, 20.0), (-SCORE_CLIP, SCORE_CLIP), (np.log(0.1), np.log(10.0))]
    # Not convex in τ and the width: start from a few thresholds and widths, keep the best.
    starts = [
        np.array([0.0, 5.0, tau, np.log(w)]) for tau in (4.0, 8.0, 12.0, 16.0) for w in (1.0, 3.0)
    ]
    results = [
        optimize.minimize(loss, x0, jac=True, method="L-BFGS-B", bounds=bounds) for x0 in starts
    ]
    best = min(results, key=lambda r: float(r.fun))
    if not np.isfinite(best.fun):
        raise ConfigurationError(f"site head fit did not converge: {best.message}")
    alpha, beta, tau, log_width = (float(v) for v in best.x)
    before = _bernoulli_log_likelihood(logits, y)
    return (alpha, beta, tau, float(np.exp(log_width))), before, -float(best.fun)


def fit_site_head(
    model: NET2Forecaster,
    detector_examples: Sequence[Example],
    head_examples: Sequence[Example],
    version: str,
    samples: int = 2,
    seed: int = 0,
) -> tuple[NET2Forecaster, SiteHeadFit]:
    """A copy of ``model`` (named ``version``) with the site head: the detector trained on
    ``detector_examples``, ``α, β, γ`` fitted on ``head_examples`` (disjoint studies, so the
    head sees the detector's scores as they are on studies it never saw)."""
    from ms_forecast_node.forecast.anchoring import factual_cell_logits
    from ms_forecast_node.forecast.model import NET2Forecaster

    if model.decoder is None:
        raise ConfigurationError("the site head needs a lesion-centre model")
    if model.config.site_head:
        raise ConfigurationError("the model already has a site head")
    ids = {e.patient_id for e in detector_examples}
    if any(e.patient_id in ids for e in head_examples):
        raise ConfigurationError("the detector's and the head's studies must be disjoint")
    full = [e for e in head_examples if bool(np.all(e.study.flags[: len(SEQUENCES)] > 0.5))]
    if len(full) < 10:
        raise ConfigurationError("fitting the site head needs at least 10 complete studies")
    headed = NET2Forecaster(replace(model.config, version=version, site_head=True))
    missing, unexpected = headed.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if ".sites." not in k]:
        raise ConfigurationError(f"unexpected weights: {unexpected} / {missing}")
    headed.eval()
    headed.to(_device(model))
    detector = headed.encoder.sites
    assert detector is not None
    n_sites = train_detector(detector, detector_examples, seed)
    cell = model.decoder.CELL
    logits, scores, centres, voxel_scores, site_masks = [], [], [], [], []
    device = _device(model)
    with torch.no_grad():
        for e in tqdm(full, desc="site head: first-step forecasts", unit="study"):
            logits.append(factual_cell_logits(model, e, samples, seed))
            images = torch.from_numpy(e.study.images[None]).to(device)
            v = detector.scores(images)
            scores.append(SiteDetector.cell_scores(v, cell)[0, 0].flatten().cpu().numpy())
            centres.append(lesion_centres(e.target, cell).flatten())
            cand = detector.candidates(images)[0, 0].cpu().numpy()
            voxel_scores.append(v[0, 0].cpu().numpy()[cand])
            site_masks.append((site_labels(e.sidecar, model.config) & cand)[cand])
    cell_logits = np.concatenate(logits)
    cell_scores = np.concatenate(scores).astype(np.float64)
    y = np.concatenate(centres).astype(np.float64)
    (alpha, beta, tau, width), before, after = fit_cell_head(cell_logits, cell_scores, y)
    gamma = fit_appearance_weight(model, detector, full)
    with torch.no_grad():
        detector.head.copy_(torch.tensor([alpha, beta, tau, float(np.log(width)), gamma]))
    from ms_forecast_node.simulate.activity import rank_auc

    n_studies = len(full)
    fit = SiteHeadFit(
        n_detector_studies=len(detector_examples),
        n_detector_sites=n_sites,
        n_head_studies=n_studies,
        n_head_centres=int(y.sum()),
        detector_voxel_auc_head_studies=rank_auc(
            np.concatenate(voxel_scores).astype(np.float64),
            np.concatenate(site_masks).astype(np.float64),
        ),
        alpha=alpha,
        beta=beta,
        tau=tau,
        width=width,
        gamma=gamma,
        cell_log_likelihood_before=before,
        cell_log_likelihood_after=after,
        mean_count_observed=float(y.sum() / n_studies),
        mean_count_before=float(special.expit(cell_logits).sum() / n_studies),
        mean_count_after=float(
            special.expit(cell_logits + cell_shift(cell_scores, alpha, beta, tau, width)).sum()
            / n_studies
        ),
    )
    return headed, fit


@torch.no_grad()
def fit_appearance_weight(
    model: NET2Forecaster, detector: SiteDetector, examples: Sequence[Example]
) -> float:
    """``γ`` minimising the decoder's loss near the true lesion centres (teacher forcing, as
    in training) when ``γ·max(v, 0)`` is added to the appearance logit."""
    assert model.decoder is not None
    device = _device(model)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for e in examples:
        if not e.target.any():
            continue
        images = torch.from_numpy(e.study.images[None]).to(device)
        flags = torch.from_numpy(e.study.flags[None]).to(device)
        encoded = model.encoder(images, flags)
        assert encoded.appearance is not None
        centres = torch.from_numpy(lesion_centres(e.target, model.decoder.CELL))[None, None]
        centres = centres.float().to(device)
        near = model.decoder.support(centres)
        base = model.decoder.logits(centres, encoded.appearance).float()
        v = detector.scores(images).clamp_min(0.0)
        target = torch.from_numpy(e.target[None, None]).to(device).float()
        parts.append((base[near], v[near], target[near]))
    if not parts:
        return 0.0
    base = torch.cat([p[0] for p in parts])
    v = torch.cat([p[1] for p in parts])
    target = torch.cat([p[2] for p in parts])

    def loss(gamma: float) -> float:
        return float(F.binary_cross_entropy_with_logits(base + gamma * v, target))

    result = optimize.minimize_scalar(loss, bounds=(0.0, 2.0), method="bounded")
    return float(result.x)


__all__ = [
    "SiteDetector",
    "SiteHeadFit",
    "fit_appearance_weight",
    "fit_cell_head",
    "fit_site_head",
    "gaussian_blur",
    "site_labels",
    "train_detector",
]
