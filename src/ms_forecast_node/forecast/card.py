"""Write the shipped model's card and registry entry from its training run and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.checkpoint import load_model, read_metadata, sha256_of
from ms_forecast_node.forecast.evaluate import summary_table
from ms_forecast_node.forecast.registry import MODELS_DIR
from ms_forecast_node.simulate.therapies import load_therapies


def _draws_phrase(sampler: dict[str, Any]) -> str:
    draws = int(sampler.get("draws_per_pass", 1))
    return f" ({draws} drawn per network pass)" if draws > 1 else ""


def _prior_phrase(cohort_header: dict[str, Any]) -> str:
    """How the cohort's patients carry a prior visit (empty for single-visit cohorts)."""
    weeks = float(cohort_header.get("config", {}).get("prior_visit_weeks", 0.0) or 0.0)
    if not weeks:
        return ""
    return (
        f"; each with a prior visit {weeks:g} weeks before baseline whose interval was "
        "untreated (its new and enlarging lesions are the temporal context), so forecasts from "
        "a study whose prior interval was on treatment under-estimate activity"
    )


def _derived_rows(extra: dict[str, Any]) -> tuple[str, str, float | None, str]:
    """Training-data row, training row, the training cohort's horizon (when its header is at
    hand) and an extra card section, for weights made from a registered model by
    ``anchor-effects`` (no training run of their own)."""
    base = extra["derived_from"]
    base_extra = base.get("extra", {})
    cohort = base_extra.get("cohort")
    header_path = Path(cohort) / "cohort.json" if cohort else None
    horizon = None
    if header_path is not None and header_path.is_file():
        header = json.loads(header_path.read_text())
        data = (
            f"`{cohort}`: {header['n_patients']} simulated patients, seed {header['seed']}, "
            "factual therapy only (as in a trial), as for the base model"
            f"{_prior_phrase(header)}"
        )
        horizon = float(header["horizon_weeks"])
    else:
        data = f"as for the base model {base['version']} (see its card)"
    training = (
        f"the weights of {base['version']} (`{base['file']}`, sha256 `{base['sha256'][:16]}…`; "
        "its card describes the training run), unchanged except each therapy's rate offset, "
        f"anchored to the trials' rate ratios on {extra['n_studies']} studies of "
        f"`{extra['anchoring_cohort']}` (images only, no outcomes)"
    )
    lines = [
        "## Therapy effects anchored to the trials",
        "",
        "Each therapy's scalar rate offset was moved so that the model's mean expected NET2 "
        "count under it, over the anchoring studies, is the pivotal trial's rate ratio "
        "(1 − reduction, `therapies.yaml`) times its mean placebo forecast "
        f"({extra['placebo_expected_count']:.3f} lesions). The individual forecasts keep the "
        "network's spread between patients (risk-based treatment-effect heterogeneity: "
        "baseline risk from the model, relative effect from the trial). On simulated data the "
        "trials' numbers are also what the simulator was built from, so the average effects "
        "are partly anchored to the truth they are evaluated against.",
        "",
        "| therapy | trial rate ratio | model before | model after | offset shift |",
        "|---|---|---|---|---|",
    ]
    for code, ratio in extra["trial_rate_ratio"].items():
        lines.append(
            f"| {code} | {ratio:.3f} | {extra['rate_ratio_before'][code]:.3f} | "
            f"{extra['rate_ratio_after'][code]:.3f} | {extra['offset_shift'][code]:+.3f} |"
        )
    return data, training, horizon, "\n".join(lines) + "\n"


def _prior_head_section(extra: dict[str, Any]) -> str:
    """The card section of a model with a fitted prior-activity head (``fit-prior-head``)."""
    fit = extra["prior_head"]
    base = extra["prior_head_base"]
    return "\n".join(
        [
            "",
            "## Prior-activity head",
            "",
            f"On top of {base['version']} (`{base['file']}`, sha256 `{base['sha256'][:16]}…`): "
            "for a study with a prior visit, every lesion-centre logit is moved by "
            f"`{fit['intercept']:+.3f} {fit['slope']:+.3f}·log((n + "
            f"{fit.get('pseudocount', 0.5):.3g}) / (weeks / 48))`, where "
            "`n` counts the new and enlarging lesions between the prior and the current lesion "
            "mask. Fitted by maximum likelihood (Poisson, the network's forecast as offset) on "
            f"the factual NET2 counts of {fit['n_studies']} studies of "
            f"`{extra['prior_head_cohort']}` (log-likelihood {fit['log_likelihood_before']:.1f} "
            f"→ {fit['log_likelihood_after']:.1f}). Studies without a prior visit are forecast "
            "as by the base model. The simulated interval before baseline is untreated: when the "
            "patient was treated between the two studies, the head reads less activity than an "
            "untreated patient would show and the forecast under placebo is too low; when the "
            "interval is much shorter or longer than 48 weeks the count is noisier.",
            "",
        ]
    )


def _dispersion_section(extra: dict[str, Any]) -> str:
    """The card section of a model with fitted rate dispersion (``fit-prior-head
    --dispersion``)."""
    fit = extra["rate_dispersion"]
    return "\n".join(
        [
            "",
            "## Rate dispersion",
            "",
            "Each sample's lesion-centre logits are moved by its own `s·ε − s²/2`, ε ~ N(0, 1), "
            "the same ε under every therapy: the samples spread over the rates that patients "
            "who look alike have (part of MS activity shows on no image), so the share of "
            "samples with a lesion is an over-dispersed (Poisson–lognormal) probability of "
            "activity and the count interval is wide enough. "
            f"s = {fit['sd_first_visit']:.3f} for first visits and {fit['sd_prior_visit']:.3f} "
            "with a prior visit (whose interval count narrows it), fitted by maximum likelihood "
            f"on the factual NET2 counts of {fit['n_studies']} training studies (log-likelihood "
            f"{fit['log_likelihood_first_before']:.1f} → {fit['log_likelihood_first_after']:.1f} "
            f"and {fit['log_likelihood_prior_before']:.1f} → "
            f"{fit['log_likelihood_prior_after']:.1f}).",
            "",
        ]
    )


def _site_head_section(extra: dict[str, Any]) -> str:
    """The card section of a model with a fitted site head (``fit-site-head``)."""
    fit = extra["site_head"]
    base = extra["site_head_base"]
    return "\n".join(
        [
            "",
            "## Site head (pre-lesional change)",
            "",
            f"On top of {base['version']} (`{base['file']}`, sha256 `{base['sha256'][:16]}…`): a "
            "per-voxel detector of focal pre-lesional T2/FLAIR change (blob responses and tissue "
            "context of FLAIR, T1, T2 and PD; a small MLP) scores every brain voxel outside the "
            "current lesions, and each lesion-centre cell's logit is moved by "
            f"`{fit['alpha']:+.3f} + {fit['beta']:.3f}·σ((s − {fit['tau']:.2f}) / "
            f"{fit['width']:.2f})`, `s` the cell's best score; the decoder's appearance logit gets "
            f"`{fit['gamma']:.3f}·max(score, 0)`. "
            f"The detector was trained on the visible pre-lesional sites of "
            f"{fit['n_detector_studies']} simulated studies ({fit['n_detector_sites']} sites; "
            f"voxel AUC {fit['detector_voxel_auc_head_studies']:.3f} on {fit['n_head_studies']} "
            "other studies); the head's constants were fitted by maximum likelihood on the true "
            f"lesion-centre cells of those {fit['n_head_studies']} studies (the network's own "
            f"forecast as offset; log-likelihood {fit['cell_log_likelihood_before']:.1f} → "
            f"{fit['cell_log_likelihood_after']:.1f}). It acts only when FLAIR, T1, T2 and PD "
            "are all present; otherwise the study is forecast as by the base model. The "
            "detector learnt the simulator's pre-lesional change: whether real pre-lesional "
            "abnormalities look like it is untested.",
            "",
        ]
    )


def _run_rows(run_dir: Path, target: Path) -> tuple[str, str, float]:
    """Training-data row, training row and the cohort's horizon, from a training run."""
    run_cfg = json.loads((run_dir / "config.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    cohort_header = json.loads((Path(run_cfg["cohort"]) / "cohort.json").read_text())
    tr = run_cfg["train"]
    start = f", initialised from `{tr['init_from']}`" if tr.get("init_from") else ""
    # The shipped file may be an earlier checkpoint than the run's last (early stopping keeps
    # best.safetensors): say which step it is.
    saved_at = json.loads(read_metadata(target).get("extra") or "{}").get("step", state["step"])
    steps = (
        f"{state['step']} steps"
        if saved_at == state["step"]
        else f"weights of step {saved_at} of {state['step']} (lowest validation loss)"
    )
    data = (
        f"`{run_cfg['cohort']}`: {cohort_header['n_patients']} simulated patients, seed "
        f"{cohort_header['seed']}, factual therapy only (as in a trial)"
        f"{_prior_phrase(cohort_header)}"
    )
    training = (
        f"{steps}, batch {tr['batch_size']}, random crops {tr.get('train_crop') or 'none (whole grid)'}, "
        f"AdamW lr {tr['learning_rate']} (warm-up, cosine), NET2 voxel weight "
        f"{tr.get('positive_weight', 1.0):g} with calibrating logit offset, "
        f"{tr.get('high_noise_share', 0.0):.0%} of diffusion times from the noisiest 20 % of "
        f"steps, condition dropout {tr['condition_dropout']}, modality dropout "
        f"{tr['modality_dropout']}, prior-visit dropout {tr.get('prior_dropout', 0.0)}, "
        f"seed {tr['seed']}, on {run_cfg.get('device', 'cpu')}{start}"
    )
    return data, training, float(cohort_header["horizon_weeks"])


def ship_model(
    weights: Path, run_dir: Path | None, report_dir: Path, models_dir: Path = MODELS_DIR
) -> Path:
    """Copy ``weights`` into the package, write the card and make it the default model.

    ``run_dir`` is the training run behind the weights; weights derived from a registered
    model by ``anchor-effects`` have none (pass None) and their card refers to the base."""
    model = load_model(weights)
    cfg = model.config
    name = f"{cfg.name}-{cfg.version}"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{name}.safetensors"
    if not (target.exists() and target.samefile(weights)):
        shutil.copyfile(weights, target)
    digest = sha256_of(target)
    extra = json.loads(read_metadata(target).get("extra") or "{}")
    section = ""
    horizon = None
    if run_dir is not None:
        data_row, training_row, horizon = _run_rows(run_dir, target)
        if "derived_from" in extra:  # the run trained the base; say what was derived from it
            base = extra["derived_from"]
            _, derived, _, section = _derived_rows(extra)
            training_row = (
                f"{training_row} (the base weights {base['version']}); then "
                + derived.replace("its card describes the training run", "this run")
            )
    elif "derived_from" in extra:
        data_row, training_row, horizon, section = _derived_rows(extra)
    else:
        raise ConfigurationError(
            f"{weights} has no training run given and was not derived from a registered model"
        )
    if "prior_head" in extra:
        section += _prior_head_section(extra)
    if "rate_dispersion" in extra:
        section += _dispersion_section(extra)
    if "site_head" in extra:
        section += _site_head_section(extra)
    fitted_after = [
        name
        for key, name in (
            ("prior_head", "a prior-activity head"),
            ("rate_dispersion", "rate dispersion"),
            ("site_head", "a pre-lesional site head"),
        )
        if key in extra
    ]
    if fitted_after:
        listed = ", ".join(fitted_after[:-1]) + " and " if len(fitted_after) > 1 else ""
        training_row += (
            f"; then {listed}{fitted_after[-1]} fitted on the frozen network (sections below)"
        )
    prior_limitation = (
        "Every prior visit in training came with an untreated interval of one length "
        "(training data above); a treated, much shorter or much longer interval is outside "
        "what the model saw."
        if "prior visit" in data_row
        else "No prior visit in training; the temporal-context channels are untrained."
    )
    has_heads = any(k in extra for k in ("prior_head", "rate_dispersion", "site_head"))
    sampler_limitation = (
        "\n* The post-hoc heads were fitted on the network's first-step marginal: the numbers "
        "above hold for the sampler above. A many-step sampler adds their logit shift at "
        "every step and may draw another distribution (`benchmarks/sampler_steps.py`, with "
        "and without `--without-heads`); the node warns when a site sets another sampler."
        if has_heads
        else ""
    )
    prior_inputs = (
        "prior visit (lesion mask, FLAIR, interval; optional) as temporal context"
        + (
            ", and the new and enlarging lesions since it (prior-activity head)"
            if "prior_head" in extra
            else ""
        )
        if "prior visit" in data_row
        else "prior-visit channels exist but the training cohort had no prior visit"
    )
    report = json.loads((report_dir / "report.json").read_text())
    methods = report["methods"]
    rows = summary_table(methods)
    therapies = ", ".join(f"{t.code} ({t.efficacy_net2:.0%})" for t in load_therapies())
    sampler = report["sampler"]
    solver = {
        "dpmpp2m": "DPM-Solver++(2M)",
        "ddim": "DDIM",
        "ddpm": "ancestral DDPM",
        "ancestral": "ancestral (clean mask drawn from the network at every step)",
    }.get(sampler["method"], sampler["method"])
    if cfg.centres:
        method = (
            "treatment-conditioned diffusion (after Favero et al. 2025, arXiv 2508.07006) of the "
            "map of NET2 lesion centres on 4×4×4-voxel cells, decoded into the voxel mask by a "
            "deterministic lesion decoder; study encoder run once per study, FiLM-conditioned "
            f"denoiser predicting clean-map logits, cosine schedule with {cfg.timesteps} steps, "
            f"{solver} {sampler['steps']}-step sampling"
        )
    else:
        method = (
            "treatment-conditioned voxel-space diffusion (after Favero et al. 2025, arXiv "
            "2508.07006): study encoder run once per study, FiLM-conditioned denoiser on "
            "4×4×4-voxel blocks predicting clean-mask logits, cosine schedule with "
            f"{cfg.timesteps} steps, {solver} {sampler['steps']}-step sampling"
        )
    if cfg.rate_offsets:
        method += "; per-therapy rate offset and log-horizon offset on the output logit"
    trained_horizon = f", training cohort all at {horizon:g} weeks" if horizon is not None else ""
    ci = methods.get("diffusion", {}).get("ci95", {})
    intervals = ""
    if ci:
        named = {"activity_auc": "activity AUC", "activity_ece": "ECE", "count_mae": "count MAE"}
        parts = [
            f"{label} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]"
            for key, label in named.items()
            if key in ci
        ]
        intervals = (
            f"\n95 % bootstrap intervals over the {report['n_patients']} patients: "
            + ", ".join(parts)
            + ".\n"
        )
    card = f"""# Model card: {cfg.name} {cfg.version}

**RESEARCH FORECAST — NOT FOR DIAGNOSTIC USE.** This model was trained **only on simulated
data** (the project's MS cohort simulator). It has never seen a real patient and must not be
used for clinical decisions.

| | |
|---|---|
| file | `{target.name}` |
| sha256 | `{digest}` |
| task | forecast of the new and enlarging T2 (NET2) lesion mask at a future time point, per therapy |
| method | {method} |
| grid | ICBM152 2009c symmetric template, {cfg.spacing_mm:g} mm, crop {list(cfg.crop_shape)} (k, j, i) |
| inputs | FLAIR (required), T1, T2, PD (optional, with availability flags), current T2 lesion mask; {prior_inputs} |
| conditions | therapy (learned embedding + null token for guidance): {therapies}; horizon in weeks (trained range {cfg.horizon_range_weeks[0]:g}–{cfg.horizon_range_weeks[1]:g}{trained_horizon}) |
| training data | {data_row} |
| training | {training_row} |
| parameters | {sum(p.numel() for p in model.parameters()):,} |
| template licence | ICBM152 2009 licence stated as "unknown" by nilearn; atlases from Debian mricron-data carry their own (some non-commercial) terms |

## Held-out evaluation

`{report["cohort"]}` ({report["n_patients"]} simulated patients, a different seed); sampler
{report["sampler"]["method"]} {report["sampler"]["steps"]} steps × {report["sampler"]["samples"]}
samples{_draws_phrase(report["sampler"])}; production uses the same method, steps, samples,
threshold and minimum lesion size by default (`models.json`). The image ceiling knows perfectly
the activity the baseline images show and every visible pre-lesional site (its activity and count
forecasts do not use the sites, so a model that finds them can beat it there); the oracle also
knows each patient's hidden activity and therapy response.

{chr(10).join(rows)}
{intervals}
{section}
Full report: `ms-forecast-node evaluate` output (report.md / report.json / figures), reproduced by
the command in the project README.

## Limitations

* Simulated training data: the anatomy is one template warped per patient, lesion biology is a
  model, and the therapy effects are trial averages applied to a latent rate.
* One horizon (48 weeks) in training; other horizons are extrapolation.
* {prior_limitation}{sampler_limitation}
"""
    card_path = models_dir / f"{name}.md"
    card_path.write_text(card, encoding="utf-8")
    # Earlier models stay registered (not default) while their files ship: a site can go back,
    # and a model trained from another (train.init_from) stays reproducible.
    registry_path = models_dir / "models.json"
    earlier = []
    if registry_path.is_file():
        for entry in json.loads(registry_path.read_text(encoding="utf-8")).get("models", []):
            same = entry.get("name") == cfg.name and entry.get("version") == cfg.version
            if not same and (models_dir / str(entry.get("file"))).is_file():
                earlier.append({**entry, "default": False})
    registry = {
        "models": [
            *earlier,
            {
                "name": cfg.name,
                "version": cfg.version,
                "file": target.name,
                "sha256": digest,
                "card": card_path.name,
                "default": True,
                "trained_on": "simulated data only",
                # The settings the card's metrics hold for, samples included (the node uses
                # them unless a site sets its own).
                "sampler": {
                    k: report["sampler"][k]
                    for k in (
                        "method",
                        "steps",
                        "samples",
                        "draws_per_pass",
                        "threshold",
                        "min_lesion_voxels",
                        "guidance_scale",
                    )
                    if k in report["sampler"]
                },
            },
        ]
    }
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    return target
