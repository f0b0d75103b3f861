"""Therapies and their trial-reported efficacy on NET2 lesions (``data/therapies.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ms_forecast_node.errors import ConfigurationError

THERAPIES_FILE = Path(__file__).resolve().parents[1] / "data" / "therapies.yaml"


@dataclass(frozen=True)
class Therapy:
    code: str
    name: str
    efficacy_net2: float  # fractional reduction of the NET2 rate vs placebo
    trial: str
    reference: str
    verified: bool
    derivation: str | None = None


@lru_cache(maxsize=4)
def load_therapies(path: Path = THERAPIES_FILE) -> tuple[Therapy, ...]:
    """Placebo first, then the therapies in file order; validated."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        entries = raw["therapies"]
        therapies = tuple(
            Therapy(
                code=str(e["code"]),
                name=str(e["name"]),
                efficacy_net2=float(e["efficacy_net2"]),
                trial=str(e["trial"]),
                reference=str(e["reference"]),
                verified=bool(e["verified"]),
                derivation=e.get("derivation"),
            )
            for e in entries
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read therapy table {path}: {exc}") from exc
    codes = [t.code for t in therapies]
    if len(set(codes)) != len(codes):
        raise ConfigurationError(f"{path}: duplicate therapy codes in {codes}")
    if not therapies or therapies[0].code != "placebo" or therapies[0].efficacy_net2 != 0.0:
        raise ConfigurationError(f"{path}: the first therapy must be placebo with efficacy 0")
    for t in therapies:
        if not 0.0 <= t.efficacy_net2 < 1.0:
            raise ConfigurationError(f"{path}: efficacy of {t.code} must be in [0, 1)")
    return therapies


def therapy_codes() -> tuple[str, ...]:
    return tuple(t.code for t in load_therapies())
