"""Steps of a GPU session that the node's CLI would otherwise run (it needs the DICOM stack,
which a bare GPU machine does not have): simulate a cohort, fill the model-grid cache with
many processes, train from a config, and make a model at another grid from trained weights.

    python benchmarks/gpu/tasks.py simulate --out DIR --n 500 --seed 1000 [--grid-mm 2]
    python benchmarks/gpu/tasks.py cache --cohort DIR --config configs/X.yaml [--workers 16]
    python benchmarks/gpu/tasks.py train --cohort DIR --out RUN --config X.yaml [--deterministic]
    python benchmarks/gpu/tasks.py regrid --weights W --config configs/Y.yaml --out W2
    python benchmarks/gpu/tasks.py evaluate --cohort DIR --model W --out DIR --samples 32 [...]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("gpu-tasks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="task", required=True)
    sim = sub.add_parser("simulate")
    sim.add_argument("--out", type=Path, required=True)
    sim.add_argument("--n", type=int, required=True)
    sim.add_argument("--seed", type=int, required=True)
    sim.add_argument("--grid-mm", type=float, default=2.0)
    sim.add_argument("--workers", type=int, default=16)
    cache = sub.add_parser("cache")
    cache.add_argument("--cohort", type=Path, required=True)
    cache.add_argument("--config", type=Path, required=True)
    cache.add_argument("--workers", type=int, default=16)
    tr = sub.add_parser("train")
    tr.add_argument("--cohort", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--config", type=Path, required=True)
    tr.add_argument("--deterministic", action="store_true")
    tr.add_argument("--time-budget-s", type=float, default=None, help="overrides the config's")
    rg = sub.add_parser("regrid")
    rg.add_argument("--weights", type=Path, required=True)
    rg.add_argument("--config", type=Path, required=True)
    rg.add_argument("--out", type=Path, required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--cohort", type=Path, required=True)
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--config", type=Path, default=None, help="sampler section (default: 0.3.0's)")
    ev.add_argument("--samples", type=int, default=None)
    ev.add_argument("--baseline", type=Path, default=None)
    ev.add_argument("--train-cohort", type=Path, default=None)
    ev.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    if args.task == "simulate":
        from ms_forecast_node.simulate.cohort import simulate_cohort
        from ms_forecast_node.simulate.config import SimulationConfig

        config = SimulationConfig(grid_spacing_mm=args.grid_mm)
        header = simulate_cohort(args.out, args.n, args.seed, config, workers=args.workers)
        log.info("%d patients in %.0f s", len(header["patients"]), time.perf_counter() - start)
    elif args.task == "cache":
        from ms_forecast_node.forecast.config import load_configs
        from ms_forecast_node.forecast.data import fill_cache

        model_cfg, _, _ = load_configs(args.config)
        done = fill_cache(args.cohort, model_cfg, args.workers)
        log.info("cached %d patients in %.0f s", done, time.perf_counter() - start)
    elif args.task == "train":
        from ms_forecast_node.forecast.config import load_configs
        from ms_forecast_node.forecast.train import train

        model_cfg, train_cfg, _ = load_configs(args.config)
        if args.time_budget_s is not None:
            train_cfg = replace(train_cfg, time_budget_s=args.time_budget_s)
        if args.deterministic:
            model_cfg = replace(
                model_cfg, deterministic=True, name=model_cfg.name + "-unet-baseline"
            )
        train(args.cohort, args.out, model_cfg, train_cfg)
        log.info("trained in %.0f s", time.perf_counter() - start)
    elif args.task == "evaluate":
        from ms_forecast_node.forecast.config import load_configs
        from ms_forecast_node.forecast.evaluate import evaluate

        config_path = args.config or Path("configs/cpu-2mm-centres-v0.3.yaml")
        _, _, sampler = load_configs(config_path)
        if args.samples is not None:
            sampler = replace(sampler, samples=args.samples)
        evaluate(
            args.cohort, args.model, args.out, sampler, args.baseline, args.train_cohort, args.limit
        )
        log.info("evaluated in %.0f s", time.perf_counter() - start)
    else:
        from ms_forecast_node.forecast.checkpoint import save_model
        from ms_forecast_node.forecast.config import load_configs
        from ms_forecast_node.forecast.model import NET2Forecaster
        from ms_forecast_node.forecast.train import initialise_from

        model_cfg, _, _ = load_configs(args.config)
        model = NET2Forecaster(model_cfg)
        copied = initialise_from(model, args.weights)
        save_model(model, args.out, {"regridded_from": str(args.weights)})
        log.info("%d tensors copied from %s", copied, args.weights)


if __name__ == "__main__":
    main()
