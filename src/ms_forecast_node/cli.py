"""The ``ms-forecast-node`` command line (typer). Logging is configured here, once."""

from __future__ import annotations

import enum
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ms_forecast_node import RESEARCH_DISCLAIMER, __version__
from ms_forecast_node.errors import MSForecastError
from ms_forecast_node.logging_setup import configure_logging

if TYPE_CHECKING:
    from ms_forecast_node.config.settings import NodeConfig
    from ms_forecast_node.forecast.config import SamplerConfig
    from ms_forecast_node.forecast.data import Example
    from ms_forecast_node.forecast.model import NET2Forecaster
    from ms_forecast_node.store.database import Database

log = logging.getLogger("ms_forecast_node")

app = typer.Typer(
    help=f"ms-forecast-node: MS lesion forecasting DICOM node. {RESEARCH_DISCLAIMER}.",
    no_args_is_help=True,
    add_completion=False,
)
simulate_app = typer.Typer(
    help="Simulate MS patients on real template anatomy, with counterfactual ground truth.",
    no_args_is_help=True,
)
app.add_typer(simulate_app, name="simulate")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ms-forecast-node {__version__}")
        raise typer.Exit()


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


@app.callback()
def main_callback(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
    log_format: Annotated[
        LogFormat,
        typer.Option(help="text, or json: one JSON object per line with study and job ids."),
    ] = LogFormat.text,
    version: Annotated[
        Optional[bool],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    configure_logging(log_level.upper(), log_format.value)


def _config(grid_mm: float, horizon: float) -> object:
    from ms_forecast_node.simulate.config import SimulationConfig

    return SimulationConfig(grid_spacing_mm=grid_mm, horizon_weeks=horizon)


@simulate_app.command("study")
def simulate_study(
    out: Annotated[Path, typer.Option(help="Output folder (DICOM tree, truth, study.json).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same study.")] = 1,
    index: Annotated[int, typer.Option(help="Patient index within the seed.")] = 0,
    therapy: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Factual therapy code (default: randomised)."),
    ] = None,
    horizon: Annotated[float, typer.Option(help="Weeks between visits (24–96).")] = 48.0,
    grid_mm: Annotated[float, typer.Option(help="Model grid for the truth (mm).")] = 2.0,
    protocols: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Protocol YAML (default: dicom_templates/simulator_protocols.yaml)."),
    ] = None,
) -> None:
    """Write a two-visit DICOM study of one simulated patient, plus its ground truth."""
    from ms_forecast_node.simulate.config import SimulationConfig
    from ms_forecast_node.simulate.patient import design_patient
    from ms_forecast_node.simulate.protocols import load_protocols
    from ms_forecast_node.simulate.study import write_study

    start = time.perf_counter()
    config = SimulationConfig(grid_spacing_mm=grid_mm, horizon_weeks=horizon)
    design = design_patient(seed, index, config, factual_therapy=therapy)
    manifest = write_study(design, out, load_protocols(protocols) if protocols else None)
    n_files = sum(s["n_files"] for v in manifest["visits"] for s in v["series"])
    log.info(
        "wrote %d DICOM files for patient %s (%s, %d NET2 lesions under the factual therapy) "
        "to %s in %.1f s",
        n_files,
        design.patient_id,
        design.factual_therapy,
        manifest["truth"]["summary"]["net2_count"][design.factual_therapy],
        out,
        time.perf_counter() - start,
    )


@simulate_app.command("cohort")
def simulate_cohort_cmd(
    out: Annotated[Path, typer.Option(help="Cohort folder (resumed if it exists).")],
    n: Annotated[int, typer.Option(help="Number of patients.")] = 4,
    seed: Annotated[int, typer.Option(help="Cohort seed.")] = 1,
    grid_mm: Annotated[float, typer.Option(help="Model grid spacing in mm.")] = 2.0,
    horizon: Annotated[float, typer.Option(help="Weeks between visits (24–96).")] = 48.0,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    prior_weeks: Annotated[
        float,
        typer.Option(help="Prior visit this many weeks before baseline (12–96; 0: none)."),
    ] = 48.0,
) -> None:
    """Write a cohort in the documented layout (docs/cohort-format.md)."""
    from ms_forecast_node.simulate.cohort import simulate_cohort
    from ms_forecast_node.simulate.config import SimulationConfig

    start = time.perf_counter()
    config = SimulationConfig(
        grid_spacing_mm=grid_mm, horizon_weeks=horizon, prior_visit_weeks=prior_weeks
    )
    header = simulate_cohort(out, n, seed, config, workers=workers)
    active = sum(1 for p in header["patients"] if p["net2_count_factual"] > 0)
    log.info(
        "cohort of %d patients (%d active under their factual therapy) in %s, %.1f s",
        n,
        active,
        out,
        time.perf_counter() - start,
    )


@simulate_app.command("preview")
def simulate_preview(
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the patient to draw.")] = 1,
    index: Annotated[int, typer.Option(help="Patient index within the seed.")] = 0,
    grid_mm: Annotated[float, typer.Option(help="Render spacing in mm.")] = 1.0,
    horizon: Annotated[float, typer.Option(help="Weeks between visits (24–96).")] = 48.0,
) -> None:
    """Montage: baseline sequences with lesion outlines, follow-up, NET2 per therapy."""
    from ms_forecast_node.simulate.config import SimulationConfig
    from ms_forecast_node.simulate.patient import design_patient, render_patient
    from ms_forecast_node.simulate.preview import write_preview

    config = SimulationConfig(grid_spacing_mm=grid_mm, horizon_weeks=horizon)
    rendered = render_patient(design_patient(seed, index, config), grid_mm)
    log.info("preview written to %s", write_preview(rendered, out))


@simulate_app.command("calibration")
def simulate_calibration(
    n: Annotated[int, typer.Option(help="Latent patients to draw.")] = 20000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    horizon: Annotated[float, typer.Option(help="Weeks.")] = 48.0,
) -> None:
    """Oracle and image-visible AUC of 'any NET2 lesion' for the activity model (JSON)."""
    from ms_forecast_node.simulate.activity import oracle_activity_auc

    typer.echo(json.dumps(oracle_activity_auc(n, seed, horizon), indent=2))


@simulate_app.command("stats")
def simulate_stats(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder.")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Also write the statistics to this JSON file."),
    ] = None,
) -> None:
    """Cohort statistics: NET2 per therapy, calibration AUCs, lesion load, locations."""
    from ms_forecast_node.simulate.statistics import cohort_statistics

    stats = cohort_statistics(cohort)
    text = json.dumps(stats, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


@app.command("train")
def train_cmd(
    cohort: Annotated[Path, typer.Option(help="Cohort folder (docs/cohort-format.md).")],
    out: Annotated[Path, typer.Option(help="Run folder (resumed if it holds a checkpoint).")],
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="YAML with model/train/sampler sections (configs/*.yaml)."),
    ] = None,
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Override the number of training steps."),
    ] = None,
    deterministic: Annotated[
        bool, typer.Option(help="Train the non-generative U-Net baseline instead.")
    ] = False,
    limit: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Use only the first N patients (smoke tests)."),
    ] = None,
    time_budget: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Wall-clock budget in seconds: the step count is fitted to it."),
    ] = None,
) -> None:
    """Train the treatment-conditioned forecaster (seeded, resumable, safetensors)."""
    from dataclasses import replace

    from ms_forecast_node.forecast.config import load_configs
    from ms_forecast_node.forecast.train import train

    model_cfg, train_cfg, _ = load_configs(config)
    if steps is not None:
        train_cfg = replace(train_cfg, steps=steps)
    if time_budget is not None:
        train_cfg = replace(train_cfg, time_budget_s=time_budget)
    if deterministic:
        model_cfg = replace(model_cfg, deterministic=True, name=model_cfg.name + "-unet-baseline")
    weights = train(cohort, out, model_cfg, train_cfg, limit=limit)
    typer.echo(f"weights: {weights}")


@app.command("average-checkpoints")
def average_checkpoints_cmd(
    out: Annotated[Path, typer.Option(help="Averaged weights to write (.safetensors).")],
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints of one run, e.g. RUN/snapshots/*.")
    ],
) -> None:
    """Average the weights of the last checkpoints of a run (stochastic weight averaging)."""
    from ms_forecast_node.forecast.checkpoint import average_checkpoints

    digest = average_checkpoints(sorted(checkpoints), out)
    typer.echo(f"averaged {len(checkpoints)} checkpoints into {out} (sha256 {digest})")


def _load_base_and_cohort(
    model: Path, cohort: Path, limit: int
) -> tuple[NET2Forecaster, list[Example], dict[str, Any], str]:
    """What the model-deriving commands start from: the model (on the best device), the first
    ``limit`` examples of the cohort, the base weights' metadata record and their sha256."""
    from ms_forecast_node.forecast.checkpoint import load_model, read_metadata, sha256_of
    from ms_forecast_node.forecast.data import load_examples
    from ms_forecast_node.forecast.device import pick_device

    base = load_model(model, device=pick_device())
    examples = load_examples(cohort, base.config, limit=limit)
    base_extra: dict[str, Any] = json.loads(read_metadata(model).get("extra") or "{}")
    return base, examples, base_extra, sha256_of(model)


@app.command("anchor-effects")
def anchor_effects_cmd(
    model: Annotated[Path, typer.Option(help="Lesion-centre model weights (.safetensors).")],
    cohort: Annotated[Path, typer.Option(help="Cohort whose studies (images only) are used.")],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors and anchoring.json.")],
    version: Annotated[str, typer.Option(help="Version of the anchored model.")],
    limit: Annotated[int, typer.Option(help="First N studies of the cohort.")] = 200,
    samples: Annotated[int, typer.Option(help="Starting-noise draws per study.")] = 2,
) -> None:
    """Move each therapy's rate offset so the model's average effect against placebo equals its
    pivotal trial's rate ratio (therapies.yaml); the individual forecasts keep their spread."""
    from ms_forecast_node.forecast.anchoring import anchor_to_trials
    from ms_forecast_node.forecast.checkpoint import save_model
    from ms_forecast_node.simulate.therapies import load_therapies

    base, examples, base_extra, base_sha256 = _load_base_and_cohort(model, cohort, limit)
    anchored, result = anchor_to_trials(base, examples, load_therapies(), version, samples)
    out.mkdir(parents=True, exist_ok=True)
    derived = {
        "file": model.name,
        "version": base.config.version,
        "sha256": base_sha256,
        "extra": base_extra,
    }
    record = {"derived_from": derived, "anchoring_cohort": str(cohort), **result.as_dict()}
    digest = save_model(anchored, out / "model.safetensors", record)
    (out / "anchoring.json").write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(f"{'therapy':<24} {'trial':>7} {'before':>7} {'after':>7} {'shift':>7}")
    for code, ratio in result.trial_rate_ratio.items():
        typer.echo(
            f"{code:<24} {ratio:7.3f} {result.rate_ratio_before[code]:7.3f} "
            f"{result.rate_ratio_after[code]:7.3f} {result.offset_shift[code]:+7.3f}"
        )
    typer.echo(f"wrote {out / 'model.safetensors'} (sha256 {digest})")


@app.command("fit-prior-head")
def fit_prior_head_cmd(
    model: Annotated[Path, typer.Option(help="Lesion-centre model weights (.safetensors).")],
    cohort: Annotated[
        Path, typer.Option(help="Training cohort with prior visits (images and outcomes).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors and prior_head.json.")],
    version: Annotated[str, typer.Option(help="Version of the model with the head.")],
    limit: Annotated[int, typer.Option(help="First N studies of the cohort.")] = 300,
    samples: Annotated[int, typer.Option(help="Starting-noise draws per study.")] = 2,
    pseudocount: Annotated[
        bool,
        typer.Option(
            "--pseudocount",
            help="Fit the head's pseudo-count c of log((n + c) / weeks) too (default: 0.5).",
        ),
    ] = False,
    dispersion: Annotated[
        bool,
        typer.Option(
            "--dispersion",
            help="Then fit the log-rate sd between samples (first visits and studies with a "
            "prior visit) on the same studies.",
        ),
    ] = False,
) -> None:
    """Fit the prior-activity head (past NET2 rate from the prior visit -> log-rate shift) by
    maximum likelihood on the factual outcomes of a training cohort."""
    from ms_forecast_node.forecast.checkpoint import save_model
    from ms_forecast_node.forecast.prior_head import fit_prior_head
    from ms_forecast_node.forecast.rate_dispersion import fit_dispersion

    base, examples, base_extra, base_sha256 = _load_base_and_cohort(model, cohort, limit)
    fitted, fit = fit_prior_head(base, examples, version, samples, pseudocount=pseudocount)
    spread = None
    if dispersion:
        fitted, spread = fit_dispersion(fitted, examples, version, samples)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **base_extra,  # an anchored base keeps its derivation (card: base weights, shifts)
        "prior_head_base": {
            "file": model.name,
            "version": base.config.version,
            "sha256": base_sha256,
        },
        "prior_head_cohort": str(cohort),
        "prior_head": fit.as_dict(),
    }
    if spread is not None:
        record["rate_dispersion"] = spread.as_dict()
    digest = save_model(fitted, out / "model.safetensors", record)
    (out / "prior_head.json").write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(
        f"head on {fit.n_studies} studies: a = {fit.intercept:+.3f}, b = {fit.slope:+.3f} per "
        f"log(interval rate), pseudo-count c = {fit.pseudocount:.3f}; "
        f"log-likelihood {fit.log_likelihood_before:.1f} -> "
        f"{fit.log_likelihood_after:.1f}; mean count observed {fit.mean_count_observed:.3f}, "
        f"forecast {fit.mean_count_before:.3f} -> {fit.mean_count_after:.3f}"
    )
    if spread is not None:
        typer.echo(
            f"log-rate sd between samples: first visits {spread.sd_first_visit:.3f} "
            f"(log-likelihood {spread.log_likelihood_first_before:.1f} -> "
            f"{spread.log_likelihood_first_after:.1f}), with a prior visit "
            f"{spread.sd_prior_visit:.3f} ({spread.log_likelihood_prior_before:.1f} -> "
            f"{spread.log_likelihood_prior_after:.1f})"
        )
    typer.echo(f"wrote {out / 'model.safetensors'} (sha256 {digest})")


@app.command("fit-site-head")
def fit_site_head_cmd(
    model: Annotated[Path, typer.Option(help="Lesion-centre model weights (.safetensors).")],
    cohort: Annotated[
        Path, typer.Option(help="Simulated training cohort (images, lesion records, outcomes).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors and site_head.json.")],
    version: Annotated[str, typer.Option(help="Version of the model with the head.")],
    detector_studies: Annotated[
        int, typer.Option(help="First N studies: train the pre-lesional site detector.")
    ] = 250,
    head_studies: Annotated[
        int, typer.Option(help="The next N studies: fit the head's α, β, γ.")
    ] = 250,
    samples: Annotated[int, typer.Option(help="Starting-noise draws per study.")] = 2,
) -> None:
    """Add the site head: a per-voxel detector of pre-lesional change (trained on the
    simulator's lesion records) that moves the forecast's lesion centres to where the images
    announce them (forecast/site_head.py)."""
    from ms_forecast_node.forecast.checkpoint import save_model
    from ms_forecast_node.forecast.site_head import fit_site_head

    base, examples, base_extra, base_sha256 = _load_base_and_cohort(
        model, cohort, detector_studies + head_studies
    )
    if len(examples) < detector_studies + 10:
        raise typer.BadParameter(f"{cohort} has {len(examples)} studies: too few")
    fitted, fit = fit_site_head(
        base, examples[:detector_studies], examples[detector_studies:], version, samples
    )
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **base_extra,
        "site_head_base": {
            "file": model.name,
            "version": base.config.version,
            "sha256": base_sha256,
        },
        "site_head_cohort": str(cohort),
        "site_head": fit.as_dict(),
    }
    digest = save_model(fitted, out / "model.safetensors", record)
    (out / "site_head.json").write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(
        f"detector on {fit.n_detector_studies} studies ({fit.n_detector_sites} sites), voxel AUC "
        f"{fit.detector_voxel_auc_head_studies:.3f} on {fit.n_head_studies} other studies; "
        f"α = {fit.alpha:+.3f}, β = {fit.beta:.3f}, τ = {fit.tau:+.2f}, width = {fit.width:.2f}, "
        f"γ = {fit.gamma:.3f}; "
        f"cell log-likelihood "
        f"{fit.cell_log_likelihood_before:.1f} -> {fit.cell_log_likelihood_after:.1f}; mean "
        f"count observed {fit.mean_count_observed:.3f}, forecast {fit.mean_count_before:.3f} -> "
        f"{fit.mean_count_after:.3f}"
    )
    typer.echo(f"wrote {out / 'model.safetensors'} (sha256 {digest})")


@app.command("ship-model")
def ship_model_cmd(
    weights: Annotated[Path, typer.Option(help="Weights to ship (.safetensors).")],
    report: Annotated[Path, typer.Option(help="`evaluate` output folder for the card.")],
    run: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Training run folder (config.json, state.json); not for derived weights "
            "(anchor-effects), whose card refers to the model they came from."
        ),
    ] = None,
) -> None:
    """Make ``weights`` the packaged default model, with its card and registry entry."""
    from ms_forecast_node.forecast.card import ship_model

    target = ship_model(weights, run, report)
    typer.echo(f"shipped {target}")


@app.command("compare-reports")
def compare_reports_cmd(
    first: Annotated[Path, typer.Argument(help="`evaluate` output folder (or report.json).")],
    second: Annotated[Path, typer.Argument(help="Another, on the same cohort.")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the comparison here as JSON as well."),
    ] = None,
) -> None:
    """First model minus second on the same held-out patients, with paired bootstrap
    intervals (needs reports that hold per-patient records)."""
    import json

    from ms_forecast_node.forecast.compare import compare_reports, render_comparison

    try:
        result = compare_reports(first, second)
    except MSForecastError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(render_comparison(result))


def evaluation_sampler(
    model: Path,
    config: Path | None,
    samples: int | None = None,
    steps: int | None = None,
    method: str | None = None,
    draws_per_pass: int | None = None,
) -> SamplerConfig:
    """The sampler ``evaluate`` scores ``model`` with: without a config file a registered model
    is scored as the node runs it (its models.json sampler); other weights get the config's
    (or the library's default) sampler. Options given on the command line override either."""
    from dataclasses import replace

    from ms_forecast_node.forecast.config import load_configs
    from ms_forecast_node.forecast.registry import entry_for_weights, model_sampler

    entry = entry_for_weights(model)
    if config is None and entry is not None:
        sampler = model_sampler(entry, samples, seed=0, steps=steps, method=method)
    else:
        _, _, sampler = load_configs(config)
        if samples is not None:
            sampler = replace(sampler, samples=samples)
        if steps is not None:
            sampler = replace(sampler, steps=steps)
        if method is not None:
            # Several draws per pass are an ancestral-sampler device (as in model_sampler).
            draws = sampler.draws_per_pass if method == "ancestral" else 1
            sampler = replace(sampler, method=method, draws_per_pass=draws)
    if draws_per_pass is not None:
        sampler = replace(sampler, draws_per_pass=draws_per_pass)
    return sampler


@app.command("evaluate")
def evaluate_cmd(
    cohort: Annotated[Path, typer.Option(help="Held-out cohort folder.")],
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.json, figures/).")],
    model: Annotated[Path, typer.Option(help="Diffusion model weights (.safetensors).")],
    baseline: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Deterministic U-Net baseline weights."),
    ] = None,
    train_cohort: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Training cohort (for the population base-rate baseline)."),
    ] = None,
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="YAML whose sampler section sets steps/samples/guidance (default: a "
            "registered model's own sampler, from models.json)."
        ),
    ] = None,
    samples: Annotated[Optional[int], typer.Option(help="Samples per therapy.")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps.")] = None,  # noqa: UP045
    method: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Sampler: dpmpp2m, ddim, ancestral or ddpm (default: the config's)."),
    ] = None,
    draws_per_pass: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Masks drawn from each ancestral trajectory (default: the config's or the "
            "registered model's); lets unregistered weights be scored as a shipped model runs."
        ),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N patients only.")] = None,  # noqa: UP045
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, else CPU), cpu or cuda.")
    ] = "auto",
    without_prior: Annotated[
        bool,
        typer.Option(
            "--without-prior",
            help="Hide every patient's prior visit (score first-visit forecasts).",
        ),
    ] = False,
) -> None:
    """Evaluate on a held-out cohort against base-rate, U-Net, image-ceiling and oracle
    references."""
    from ms_forecast_node.forecast.evaluate import evaluate

    sampler = evaluation_sampler(model, config, samples, steps, method, draws_per_pass)
    evaluate(cohort, model, out, sampler, baseline, train_cohort, limit, device, without_prior)
    typer.echo((out / "report.md").read_text())


@app.command("forecast")
def forecast_cmd(
    study_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files: one or two visits.")],
    out: Annotated[Path, typer.Option(help="Output folder (dicom/, summary.json, summary.png).")],
    therapies: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option(help="Comma-separated therapy codes (default: every therapy of the model)."),
    ] = None,
    horizon_weeks: Annotated[float, typer.Option(help="Forecast horizon in weeks.")] = 48.0,
    samples: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Diffusion samples per therapy (default: the model's evaluated number)."),
    ] = None,
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Sampler steps (default: those the model was evaluated with)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    outputs: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma-separated output kinds (default: the templates' list)."),
    ] = None,
    templates: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder with outputs.yaml and codes.yaml (default: dicom_templates/)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Forecast a study offline: inventory → registration → forecast → SEG/SR/fallbacks."""
    from ms_forecast_node.pipeline.run import ForecastPipeline, PipelineSettings

    def split(text: str | None) -> tuple[str, ...] | None:
        return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None

    settings = PipelineSettings(
        therapies=split(therapies),
        horizon_weeks=horizon_weeks,
        samples=samples,
        seed=seed,
        steps=steps,
        outputs=split(outputs),
        templates_dir=templates,
        device=device,
    )
    try:
        outcome = ForecastPipeline(settings).run(study_dir, out)
    except MSForecastError as exc:
        # Batch users read the reason from the folder as well as from the exit status.
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.json").write_text(
            json.dumps({"reason": exc.reason, "message": str(exc)}, indent=2) + "\n",
            encoding="utf-8",
        )
        raise
    typer.echo(
        f"study {outcome.study_instance_uid}: {len(outcome.files)} objects in {out / 'dicom'}"
    )
    for row in outcome.summary["therapies_ranked"]:
        lo, hi = row["count_interval_90"]
        typer.echo(
            f"  {row['rank']}. {row['therapy']:<24} expected NET2 {row['expected_net2_count']:.2f} "
            f"[{lo:.0f}-{hi:.0f}]  P(activity) {row['probability_of_activity']:.2f}"
        )
    typer.echo(f"summary: {out / 'summary.json'}  montage: {out / 'summary.png'}")
    typer.echo(RESEARCH_DISCLAIMER)


config_app = typer.Typer(help="Check the node's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option("--config", "-c", help="Node configuration YAML (default: embedded defaults)."),
]


def _node_state(config: Path | None) -> tuple[NodeConfig, Database]:
    """The configuration and the node's database, for the operator commands."""
    from ms_forecast_node.config.settings import load_config
    from ms_forecast_node.store.database import Database

    cfg = load_config(config)
    return cfg, Database(cfg.storage.database_path)


@app.command("serve")
def serve_cmd(config: ConfigOption = None) -> None:
    """Run the DICOM node until stopped (SIGTERM / Ctrl-C)."""
    from ms_forecast_node.config.settings import load_config
    from ms_forecast_node.node import Node

    cfg = load_config(config)
    node = Node(cfg)
    listen = cfg.listen
    typer.echo(
        f"ms-forecast-node {__version__}: AE {listen.ae_title} on "
        f"{listen.bind_address}:{listen.port}{' (TLS)' if listen.tls.enabled else ''}; "
        f"data in {cfg.storage.root}. {RESEARCH_DISCLAIMER}."
    )
    node.serve_forever()


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file and print the effective configuration (secrets masked)."""
    import yaml

    from ms_forecast_node.config.settings import load_config

    cfg = load_config(config)
    typer.echo(f"{config or 'embedded defaults'}: valid")
    for peer in cfg.peers:
        dest = cfg.destination_for(peer.ae_title)
        typer.echo(
            f"  peer {peer.ae_title}{' from ' + peer.host if peer.host else ''}: quiet period "
            f"{peer.quiet_period_s:g} s, results to {dest or 'NOWHERE (no destination)'}"
        )
    if cfg.accept_unknown_peers:
        typer.echo("  WARNING: accept_unknown_peers is on - any calling AE may send studies")
    typer.echo(yaml.safe_dump(cfg.redacted(), sort_keys=False))


@app.command("echo")
def echo_cmd(
    destination: Annotated[str, typer.Argument(help="Name of a configured destination.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured destination."""
    from ms_forecast_node.config.settings import load_config
    from ms_forecast_node.errors import ConfigurationError
    from ms_forecast_node.send.outbox import echo

    cfg = load_config(config)
    dest = cfg.destinations.get(destination)
    if dest is None:
        raise ConfigurationError(
            f"no destination {destination!r} (configured: {sorted(cfg.destinations)})",
            reason="destination_unknown",
        )
    ok, message = echo(cfg, dest)
    typer.echo(f"{destination} ({dest.ae_title}@{dest.host}:{dest.port}): {message}")
    if not ok:
        raise typer.Exit(1)


@app.command("status")
def status_cmd(config: ConfigOption = None, limit: int = 20) -> None:
    """Studies, jobs and the outbox, from the node's database."""

    cfg, db = _node_state(config)
    studies = db.query("SELECT * FROM studies ORDER BY last_received_at DESC LIMIT ?", (limit,))
    typer.echo(f"studies ({len(studies)} shown):")
    for s in studies:
        typer.echo(
            f"  {s['study_uid']}  from {s['calling_ae']}  {s['n_instances']} instances  "
            f"version {s['latest_version']}{'  (receiving)' if s['dirty'] else ''}"
        )
    typer.echo("jobs:")
    for j in db.jobs(limit=limit):
        reason = f"  [{j['reason']}] {j['message'] or ''}" if j["reason"] else ""
        typer.echo(f"  #{j['id']} {j['study_uid']} v{j['version']}: {j['state']}{reason}")
    typer.echo(f"outbox: {db.outbox_counts() or 'empty'}")


@app.command("retention")
def retention_cmd(
    days: Annotated[
        int, typer.Option(min=1, help="Delete studies with no activity for more than N days.")
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run/--apply", help="List what would go (default), or delete it."),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Delete received instances and derived outputs of studies idle for more than N days."""
    from ms_forecast_node.status.retention import apply_retention, plan_retention

    cfg, db = _node_state(config)
    plan = plan_retention(cfg, db, days)
    for item in plan:
        idle = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(item.last_activity))
        rows = ", ".join(f"{k} {v}" for k, v in item.rows.items() if v)
        typer.echo(
            f"study {item.study_uid}: last activity {idle}; {len(item.files)} files, "
            f"{item.bytes} bytes; database rows: {rows}"
        )
        for entry in item.files:
            typer.echo(f"  {entry.bytes:>12}  {entry.kind:<8}  {entry.path}")
    n_files = sum(len(item.files) for item in plan)
    total = sum(item.bytes for item in plan)
    if dry_run:
        typer.echo(
            f"dry run: {len(plan)} studies, {n_files} files, {total} bytes would be deleted "
            "(--apply deletes exactly these)"
        )
        return
    outcome = apply_retention(cfg, db, plan)
    for uid, why in outcome.skipped:
        typer.echo(f"kept {uid}: {why}")
    typer.echo(
        f"deleted {len(outcome.deleted)} studies, {outcome.files_deleted} files, "
        f"{outcome.bytes_freed} bytes"
    )


@app.command("reprocess")
def reprocess_cmd(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID to process again.")],
    config: ConfigOption = None,
) -> None:
    """Queue a new version of a received study (e.g. after a model upgrade)."""
    from ms_forecast_node.assemble.studies import StudyAssembler
    from ms_forecast_node.errors import StudyInputError

    cfg, db = _node_state(config)
    try:
        job_id = StudyAssembler(cfg, db).new_version(study_uid, force=True)
    except KeyError:
        raise StudyInputError(
            f"study {study_uid} was never received", reason="study_not_found"
        ) from None
    typer.echo(f"study {study_uid}: job {job_id} queued")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo.")] = Path("var/demo"),
    node_port: Annotated[int, typer.Option(help="Port of the running node.")] = 11112,
    receiver_port: Annotated[int, typer.Option(help="Port of the local results receiver.")] = 11113,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for results.")] = 1800.0,
) -> None:
    """Send a simulated two-visit study to a running node (`make run`) and show the results
    arriving at a local receiver (the PACS stand-in of deploy/demo.yaml)."""
    from ms_forecast_node.demo import DemoReceiver, send_study, wait_for_results

    study = out / "study"
    if not (study / "study.json").is_file():
        simulate_study(out=study, seed=1)
    receiver = DemoReceiver(out / "received", receiver_port)
    try:
        files = sorted(p for p in (study / "dicom").rglob("*") if p.is_file())
        typer.echo(f"sending {len(files)} instances (2 visits) to 127.0.0.1:{node_port} ...")
        sent = send_study(files, node_port)
        typer.echo(
            f"{sent} instances acknowledged; waiting for the forecasts (quiet period, "
            "registration, 7 therapies x 64 samples per visit) ..."
        )
        # Per study: SEG, SR and a key image per therapy, one comparison SR and one PDF.
        wait_for_results(receiver, expected_min=2 * (3 * 7 + 2), timeout_s=timeout_s)
    finally:
        receiver.stop()
    typer.echo(
        f"results stored in {out / 'received'}; node state: ms-forecast-node status "
        "--config deploy/demo.yaml"
    )


def main() -> None:
    """Console entry point: typed errors become a one-line message and exit status 2."""
    try:
        app()
    except MSForecastError as exc:
        logging.getLogger("ms_forecast_node").error("%s", exc)
        raise SystemExit(2) from exc
