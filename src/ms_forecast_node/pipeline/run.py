"""The spine: a folder of DICOM files in, every output object out. No network.

The offline ``forecast`` command and the node's workers both call :meth:`ForecastPipeline.run`
(stage by stage where the node persists job state between stages).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ms_forecast_node import RESEARCH_DISCLAIMER, __version__
from ms_forecast_node.assemble.rules import SeriesRules, load_series_rules
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import model_grid, prepare_study
from ms_forecast_node.forecast.device import pick_device
from ms_forecast_node.forecast.model import NET2Forecaster
from ms_forecast_node.forecast.registry import ModelEntry, load_default_model, model_sampler
from ms_forecast_node.forecast.result import ForecastResult
from ms_forecast_node.forecast.sampling import forecast_study
from ms_forecast_node.image.preprocess import PreprocessedStudy, preprocess
from ms_forecast_node.pipeline.backproject import native_forecasts
from ms_forecast_node.pipeline.summary import summary_json, write_montage
from ms_forecast_node.pipeline.visits import LoadedVisits, load_visits
from ms_forecast_node.report.build import OutputObject, build_outputs, write_outputs
from ms_forecast_node.report.inputs import ReportInput
from ms_forecast_node.report.templates import Templates, load_templates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    therapies: tuple[str, ...] | None = None  # None: every therapy the model knows
    horizon_weeks: float = 48.0
    # None: the model's evaluated sampler (models.json) with ``samples`` and ``seed``.
    sampler: SamplerConfig | None = None
    samples: int | None = None  # None: the model's evaluated number of samples
    seed: int = 0
    steps: int | None = None  # overrides the evaluated number of steps when set
    outputs: tuple[str, ...] | None = None  # None: the templates' `produce` list
    templates_dir: Path | None = None
    series_rules: Path | None = None
    device: str = "auto"


@dataclass(frozen=True)
class PipelineOutcome:
    study_instance_uid: str
    result: ForecastResult
    objects: list[OutputObject]
    files: list[Path]
    summary: dict[str, Any]
    timings_s: dict[str, float]


class ForecastPipeline:
    """Holds what is costly to load once (model, templates, rules) and runs studies."""

    def __init__(
        self,
        settings: PipelineSettings | None = None,
        *,
        model: NET2Forecaster | None = None,
        model_entry: ModelEntry | None = None,
    ) -> None:
        self.settings = settings or PipelineSettings()
        self.device: torch.device = pick_device(self.settings.device)
        if model is None:
            model, model_entry = load_default_model(device=self.device)
        self.model = model
        self.model_entry = model_entry
        self.sampler: SamplerConfig = self.settings.sampler or model_sampler(
            model_entry, self.settings.samples, self.settings.seed, self.settings.steps
        )
        self.templates: Templates = load_templates(self.settings.templates_dir)
        self.rules: SeriesRules = load_series_rules(self.settings.series_rules)
        therapies = self.settings.therapies or tuple(model.config.therapies)
        unknown = [t for t in therapies if t not in model.config.therapies]
        if unknown:
            from ms_forecast_node.errors import ConfigurationError

            raise ConfigurationError(
                f"therapies {unknown} unknown to model {model.config.name} "
                f"(known: {list(model.config.therapies)})",
                reason="therapy_unknown",
            )
        self.therapies: tuple[str, ...] = tuple(therapies)

    # --- stages ----------------------------------------------------------------------------
    def load(
        self, source: Path | Sequence[Path], study_instance_uid: str | None = None
    ) -> LoadedVisits:
        return load_visits(source, self.rules, study_instance_uid)

    def preprocess(self, visits: LoadedVisits) -> PreprocessedStudy:
        cfg = self.model.config
        grid, _ = model_grid(cfg.spacing_mm, cfg.crop_shape)
        return preprocess(visits.current, grid, prior=visits.prior)

    def forecast(self, study: PreprocessedStudy) -> ForecastResult:
        prior = study.prior
        tensors = prepare_study(
            {s.value: v for s, v in study.sequences.items()},
            study.lesion_mask,
            self.model.config,
            prior_lesion_mask=prior.lesion_mask if prior else None,
            prior_flair=prior.flair if prior else None,
            prior_interval_weeks=prior.interval_weeks if prior else None,
        )
        sha = self.model_entry.sha256 if self.model_entry else None
        return forecast_study(
            self.model,
            tensors,
            self.therapies,
            self.settings.horizon_weeks,
            self.sampler,
            sha,
        )

    def report(
        self, study: PreprocessedStudy, result: ForecastResult, study_version: int = 1
    ) -> tuple[ReportInput, list[OutputObject]]:
        sampler = self.sampler
        voxel = result.grid.voxel_volume_mm3
        native = native_forecasts(
            result, study.mapping, sampler.threshold, sampler.min_lesion_voxels * voxel
        )
        report_input = ReportInput(
            result=result,
            reference=study.mapping.reference,
            native=native,
            study_version=study_version,
            lesion_mask_source=study.lesion_source.value,
            prior_study_instance_uid=study.prior.study_instance_uid if study.prior else None,
        )
        return report_input, build_outputs(report_input, self.templates, self.settings.outputs)

    # --- the whole chain -------------------------------------------------------------------
    def run(
        self,
        study_dir: Path | Sequence[Path],
        out_dir: Path,
        *,
        study_instance_uid: str | None = None,
        study_version: int = 1,
        on_stage: Callable[[str, dict[str, float]], None] | None = None,
    ) -> PipelineOutcome:
        """Run every stage; ``on_stage(name, timings_so_far)`` is called as each stage starts
        (the node persists job state with it)."""

        def stage(name: str) -> None:
            if on_stage is not None:
                on_stage(name, dict(timings))

        timings: dict[str, float] = {}
        stage("preprocessing")
        t0 = time.perf_counter()
        visits = self.load(study_dir, study_instance_uid)
        timings["load_s"] = time.perf_counter() - t0
        log.info("%s", visits.selection.summary())
        t0 = time.perf_counter()
        study = self.preprocess(visits)
        timings["preprocess_s"] = time.perf_counter() - t0
        stage("forecasting")
        t0 = time.perf_counter()
        result = self.forecast(study)
        timings["forecast_s"] = time.perf_counter() - t0
        stage("reporting")
        t0 = time.perf_counter()
        report_input, objects = self.report(study, result, study_version)
        timings["outputs_s"] = time.perf_counter() - t0
        out = Path(out_dir)
        files = write_outputs(objects, out / "dicom")
        summary = summary_json(visits, study, report_input, objects, timings)
        summary["software"] = {"name": "ms-forecast-node", "version": __version__}
        summary["disclaimer"] = RESEARCH_DISCLAIMER
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        write_montage(report_input, self.templates, out / "summary.png")
        return PipelineOutcome(
            visits.selection.study_instance_uid, result, objects, files, summary, timings
        )


__all__: Sequence[str] = ["ForecastPipeline", "PipelineOutcome", "PipelineSettings"]
