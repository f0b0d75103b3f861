"""The treatment-conditioned NET2 forecaster: a study encoder and a small 3D denoising U-Net.

Design for speed: everything that depends only on the study (the MRI, the current lesion mask,
the prior visit) goes through :class:`StudyEncoder` **once**; its multi-scale features are
projected once to the denoiser's widths and then *added* (broadcast, no copy) at every level of
:class:`Denoiser` for every therapy, sample and diffusion step. The denoiser sees only the noisy
mask, and the condition vector (diffusion time, therapy, horizon, availability flags and, when
``global_summary`` is on, a pooled summary of the study) modulates every block by FiLM. Without
the summary the network is fully convolutional, so it can be trained on random crops of the grid
and applied to the whole grid unchanged.

Two things can be diffused (``ModelConfig.diffusion_target``): the NET2 voxel mask itself (0.1.x),
or the map of NET2 lesion *centres* on cells of 4×4×4 voxels (0.3.x). New MS lesions arise as a
spatial point process, so given the study the centres are close to independent from cell to
cell: that is exactly the case in which a few-step sampler of independent cells is faithful,
and every sampled centre is one lesion. :class:`LesionDecoder` then draws each sampled lesion's
voxels from a per-study appearance map (computed once by the encoder) and a learned kernel
around the centre: extent is decided deterministically, occurrence and place by diffusion.

MONAI's ``DiffusionModelUNet`` was considered: it takes conditioning images as extra input
channels, i.e. re-encodes the study at every step for every therapy and sample, which is what
this design avoids; the network is therefore written here with plain ``torch.nn`` blocks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.config import (
    INTERVAL_FLAG,
    PRIOR_ACTIVITY_FLAG,
    PRIOR_FLAG,
    ModelConfig,
)
from ms_forecast_node.forecast.diffusion import cosine_alphas_cumprod
from ms_forecast_node.forecast.site_head import SiteDetector

# Rates are per 48 weeks in the simulator and in the trials it follows.
REFERENCE_HORIZON_WEEKS = 48.0


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def log_rate_shift(sd: float, epsilon: ArrayT) -> ArrayT:
    """The rate-dispersion logit shift ``sd·ε − sd²/2`` of a sample with standard-normal ``ε``
    (numpy or torch): its ``− sd²/2`` keeps the expected count while cell probabilities are
    small (forecast/rate_dispersion.py)."""
    return sd * epsilon - 0.5 * sd * sd


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) float tensor."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class FiLMBlock(nn.Module):
    """conv-norm-FiLM-SiLU-conv-norm-SiLU with a residual connection."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm1 = _norm(c_out)
        self.film = nn.Linear(embed_dim, 2 * c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


def space_to_depth(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C·r³, D/r, H/r, W/r): every r³ block becomes channels."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // r, r, h // r, r, w // r, r)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * r**3, d // r, h // r, w // r)


def depth_to_space(x: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    b, c, d, h, w = x.shape
    c0 = c // r**3
    x = x.reshape(b, c0, r, r, r, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c0, d * r, h * r, w * r)


class PlainBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, padding=1, stride=stride),
            _norm(c_out),
            nn.SiLU(),
            nn.Conv3d(c_out, c_out, 3, padding=1),
            _norm(c_out),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class EncodedStudy:
    """Per-level features already projected to the denoiser widths, plus a global vector."""

    levels: list[torch.Tensor]  # (1 or B, C_l, ...) at 1/4 and 1/8 of the model grid
    flags: torch.Tensor  # (1 or B, n_flags)
    global_vector: torch.Tensor | None = None  # (1 or B, E) when the model has a summary
    # Centre models: per-voxel lesion-appearance logit (1 or B, 1, D, H, W) for the decoder.
    appearance: torch.Tensor | None = None
    # Models with a site head: the per-cell logit shift (1 or B, 1, d, h, w) it adds.
    site_shift: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> EncodedStudy:
        summary = None if self.global_vector is None else self.global_vector[index]
        look = None if self.appearance is None else self.appearance[index]
        sites = None if self.site_shift is None else self.site_shift[index]
        return EncodedStudy(
            [lv[index] for lv in self.levels], self.flags[index], summary, look, sites
        )


class StudyEncoder(nn.Module):
    """Images (B, C, D, H, W) at the model grid -> features at 1/4 and 1/8 resolution."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c0, c1, c2 = config.encoder_channels
        d1, d2 = config.denoiser_channels[1:]
        cin = config.n_image_channels * 8  # space-to-depth by 2 keeps every 2 mm voxel
        self.block0 = PlainBlock(cin, c0)  # 1/2
        self.block1 = PlainBlock(c0, c1, stride=2)  # 1/4
        self.block2 = PlainBlock(c1, c2, stride=2)  # 1/8
        self.proj = nn.ModuleList([nn.Conv3d(c1, d1, 1), nn.Conv3d(c2, d2, 1)])
        self.global_head = nn.Linear(c2, config.embed_dim) if config.global_summary else None
        self.appearance = AppearanceHead(config) if config.centres else None
        self.sites: SiteDetector | None = None
        if config.site_head:
            if not config.centres:
                raise ConfigurationError("the site head needs a lesion-centre model")
            self.sites = SiteDetector(config)

    def forward(self, images: torch.Tensor, flags: torch.Tensor) -> EncodedStudy:
        f0 = self.block0(space_to_depth(images, 2))
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        levels = [self.proj[0](f1), self.proj[1](f2)]
        summary = None if self.global_head is None else self.global_head(f2.mean(dim=(2, 3, 4)))
        look = None if self.appearance is None else self.appearance(images, f0, f1)
        site_shift = None
        if self.sites is not None and look is not None:
            # Full precision: the blob responses are small differences of smoothed images.
            with torch.autocast(images.device.type, enabled=False):
                site_shift, look_shift = self.sites.shifts(
                    images.float(), flags.float(), LesionDecoder.CELL
                )
            look = look + look_shift.to(look.dtype)
        return EncodedStudy(levels, flags, summary, look, site_shift)


class AppearanceHead(nn.Module):
    """Per-voxel logit of "part of a NET2 lesion if one arises nearby", at full resolution:
    the images themselves (one 3×3×3 convolution) plus the encoder's 1/2 and 1/4 features."""

    WIDTH = 8

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c0, c1, _ = config.encoder_channels
        w = self.WIDTH
        self.from_images = nn.Conv3d(config.n_image_channels, w, 3, padding=1)
        self.from_half = nn.Conv3d(c0, w, 1)
        self.from_quarter = nn.Conv3d(c1, w, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv3d(w, w, 3, padding=1), nn.SiLU())
        self.out = nn.Conv3d(w, 1, 1)

    def forward(self, images: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        size = images.shape[2:]
        h = self.from_images(images)
        h = h + F.interpolate(self.from_half(f0), size=size, mode="nearest")
        h = h + F.interpolate(self.from_quarter(f1), size=size, mode="nearest")
        return self.out(self.head(h))


class LesionDecoder(nn.Module):
    """Sampled lesion centres (cells of ``CELL``³ voxels) -> the NET2 voxel mask.

    ``logit = appearance + K ⋆ centres``: ``K`` is a learned kernel spreading each centre over
    its cell and half a cell around it (a transposed convolution), so a voxel's chance to belong
    to a lesion depends on where it sits relative to the centre and on what the images show
    there (an existing lesion that enlarges, a pre-lesional change). Only voxels within one cell
    of a sampled centre can be NET2, and every centre keeps at least its most likely voxel, so
    each sampled centre is drawn as a lesion.
    """

    CELL = 4

    def __init__(self) -> None:
        super().__init__()
        c = self.CELL
        self.kernel = nn.ConvTranspose3d(1, 1, 3 * c, stride=c, padding=c, bias=False)
        # Start from a bump around the centre cell (a lesion of a few voxels), not from noise.
        axis = torch.arange(3 * c, dtype=torch.float32) - (3 * c - 1) / 2.0
        d2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
        with torch.no_grad():
            self.kernel.weight.copy_((6.0 * torch.exp(-d2 / 8.0) - 3.0)[None, None])

    def support(self, centres: torch.Tensor) -> torch.Tensor:
        """Voxels within one cell of a centre (bool, full resolution)."""
        near = F.max_pool3d(centres, 3, stride=1, padding=1)
        return F.interpolate(near, scale_factor=self.CELL, mode="nearest") > 0

    def logits(self, centres: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        return appearance + self.kernel(centres)

    def masks(self, centres: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        """(B, 1, d, h, w) centres in {0, 1} -> (B, 1, D, H, W) bool NET2 masks."""
        logit = self.logits(centres, appearance).float()
        mask = (logit > 0) & self.support(centres)
        # The most likely voxel of every centre's cell, so no sampled lesion vanishes.
        blocks = space_to_depth(logit, self.CELL)
        best = F.one_hot(blocks.argmax(dim=1), blocks.shape[1]).permute(0, 4, 1, 2, 3)
        forced = depth_to_space(best.to(centres.dtype) * centres, self.CELL) > 0
        return mask | forced


class Denoiser(nn.Module):
    """Noisy mask -> clean-mask logits, working on 4×4×4 voxel blocks (space-to-depth)."""

    PATCH = 4

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _, d1, d2 = config.denoiser_channels
        e = config.embed_dim
        # A centre map already lives on the 1/4 grid: nothing to fold.
        self.fold = 1 if config.centres else self.PATCH
        r3 = self.fold**3
        self.n_therapies = len(config.therapies)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.horizon_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.therapy = nn.Embedding(self.n_therapies + 1, e)  # last index = null (guidance)
        self.flag_proj = nn.Linear(config.n_flags, e)
        self.global_proj = nn.Linear(e, e) if config.global_summary else None
        self.embed_dim = e
        self.stem = nn.Conv3d(r3, d1, 3, padding=1)
        self.down = FiLMBlock(d1, d1, e)
        self.mid_a = FiLMBlock(d1, d2, e)
        self.mid_b = FiLMBlock(d2, d2, e)
        self.up = FiLMBlock(d2 + d1, d1, e)
        self.out = nn.Conv3d(d1, r3, 1)
        # NET2 voxels are rare (~1e-4 of the brain): start from that base rate, not from 0.5.
        assert self.out.bias is not None
        nn.init.constant_(self.out.bias, -8.0)
        self.horizon_range = config.horizon_range_weeks
        self.alphas_cumprod = cosine_alphas_cumprod(config.timesteps).float()
        self.therapy_offset = nn.Embedding(self.n_therapies + 1, 1) if config.rate_offsets else None
        if self.therapy_offset is not None:
            nn.init.zeros_(self.therapy_offset.weight)
        # (a, b[, log c]) of the prior-activity head; zeros = no effect until fitted.
        size = 3 if config.prior_activity_pseudocount else 2
        self.prior_activity = (
            nn.Parameter(torch.zeros(size)) if config.prior_activity_head else None
        )
        # Log-rate sd of the samples (first visit, with a prior visit); zeros = none.
        self.rate_sd = nn.Parameter(torch.zeros(2)) if config.rate_dispersion else None
        self.n_flags = config.n_flags

    @property
    def null_therapy(self) -> int:
        return self.n_therapies

    def embedding(
        self,
        t: torch.Tensor,
        therapy: torch.Tensor,
        horizon_weeks: torch.Tensor,
        encoded: EncodedStudy,
    ) -> torch.Tensor:
        lo, hi = self.horizon_range
        h = (horizon_weeks.float() - lo) / (hi - lo) * 1000.0
        emb = self.time_mlp(sinusoidal(t, self.embed_dim))
        emb = emb + self.horizon_mlp(sinusoidal(h, self.embed_dim)) + self.therapy(therapy)
        emb = emb + self.flag_proj(encoded.flags[:, : self.flag_proj.in_features])
        if self.global_proj is not None and encoded.global_vector is not None:
            emb = emb + self.global_proj(encoded.global_vector)
        return F.silu(emb)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        therapy: torch.Tensor,
        horizon_weeks: torch.Tensor,
        encoded: EncodedStudy,
    ) -> torch.Tensor:
        """Logit of the clean NET2 mask given the noisy mask ``x_t`` (B, 1, D, H, W).

        ``encoded`` tensors have batch 1 (one study, broadcast over B) or batch B.
        """
        emb = self.embedding(t, therapy, horizon_weeks, encoded)
        e1, e2 = encoded.levels
        h1 = self.down(self.stem(space_to_depth(x_t, self.fold)) + e1, emb)
        m = self.mid_a(F.avg_pool3d(h1, 2, ceil_mode=True), emb) + e2
        m = self.mid_b(m, emb)
        up = F.interpolate(m, size=h1.shape[2:], mode="nearest")
        u = self.up(torch.cat([up, h1], 1), emb)
        logit = depth_to_space(self.out(u), self.fold) + self.evidence(x_t, t)
        if self.therapy_offset is not None:
            offset = self.therapy_offset(therapy)[:, 0] + torch.log(
                horizon_weeks.float().clamp_min(1.0) / REFERENCE_HORIZON_WEEKS
            )
            logit = logit + offset.view(-1, 1, 1, 1, 1).to(logit.dtype)
        if self.prior_activity is not None:
            logit = logit + self.prior_activity_shift(encoded.flags).view(-1, 1, 1, 1, 1).to(
                logit.dtype
            )
        if encoded.site_shift is not None:
            logit = logit + encoded.site_shift.to(logit.dtype)
        return logit

    def prior_activity_shift(self, flags: torch.Tensor) -> torch.Tensor:
        """(1 or B,) logit shift of the prior-activity head; 0 for studies without a prior
        visit (their availability flag is 0)."""
        if self.prior_activity is None or flags.shape[1] <= PRIOR_ACTIVITY_FLAG:
            return torch.zeros(flags.shape[0], device=flags.device)
        has_prior = flags[:, PRIOR_FLAG].float()
        feature = flags[:, PRIOR_ACTIVITY_FLAG].float()
        a, b = self.prior_activity[0], self.prior_activity[1]
        if len(self.prior_activity) == 3:
            # The feature is log((n + 0.5) / w48): n comes back exactly, then takes c instead.
            w48 = flags[:, INTERVAL_FLAG].float().clamp_min(1e-3)
            events = (feature.exp() * w48 - 0.5).clamp_min(0.0)
            feature = torch.log((events + self.prior_activity[2].exp()) / w48)
        return has_prior * (a + b * feature)

    def sample_rate_sd(self, flags: torch.Tensor) -> float:
        """The log-rate sd between samples of the study with ``flags`` (1, n_flags): the
        dispersion fitted for studies with a prior visit or for first visits; 0 without."""
        if self.rate_sd is None:
            return 0.0
        has_prior = flags.shape[1] > PRIOR_FLAG and bool(flags[0, PRIOR_FLAG] > 0.5)
        return float(self.rate_sd.detach()[1 if has_prior else 0].clamp_min(0.0))

    def evidence(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``x_t`` alone says about each voxel: for independent ±1 voxels the exact
        posterior logit is ``prior_logit + 2·sqrt(ᾱ_t)·x_t / (1 − ᾱ_t)``. Building this term
        in (as EDM's skip connection does for images) leaves the network the prior logit and
        the correlations between voxels to learn, and makes the sampler exact in the
        independent case. The deterministic baseline passes ``x_t = 0``: no evidence."""
        if self.alphas_cumprod.device != x_t.device:
            self.alphas_cumprod = self.alphas_cumprod.to(x_t.device)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return 2.0 * ab.sqrt() * x_t / (1.0 - ab).clamp_min(1e-6)


class NET2Forecaster(nn.Module):
    """Encoder + denoiser (+ lesion decoder for centre models); the deterministic baseline uses
    the same modules with x_t = 0."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = StudyEncoder(config)
        self.denoiser = Denoiser(config)
        self.decoder = LesionDecoder() if config.centres else None

    def without_heads(self) -> NET2Forecaster:
        """A copy whose post-hoc heads change nothing: the site head, the prior-activity head
        and the rate dispersion, all fitted after training on the first-step marginal. What
        remains is the trained diffusion network (with its anchored therapy effects): the
        object whose samplers can be compared with each other (benchmarks/)."""
        network = copy.deepcopy(self)
        network.encoder.sites = None
        with torch.no_grad():
            for head in (network.denoiser.prior_activity, network.denoiser.rate_sd):
                if head is not None:
                    head.zero_()
        return network


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
