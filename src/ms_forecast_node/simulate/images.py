"""Synthesis of a visit's MR images on the grid a patient was rendered on."""

from __future__ import annotations

import numpy as np

from ms_forecast_node.simulate.mri import lesion_fractions, synthesize
from ms_forecast_node.simulate.patient import RenderedPatient
from ms_forecast_node.simulate.protocols import MRSequence

VISITS = ("baseline", "followup")
PRIOR_VISIT = 2  # the visit index of the prior visit (weeks before baseline)


def visit_rng(rendered: RenderedPatient, visit: int, purpose: int = 0) -> np.random.Generator:
    d = rendered.design
    index = int(d.patient_id[-5:]) if d.patient_id[-5:].isdigit() else 0
    return np.random.default_rng(np.random.SeedSequence([d.seed, index, 1000 + visit, purpose]))


def visit_fractions(rendered: RenderedPatient, visit: int) -> dict[str, np.ndarray]:
    if visit == PRIOR_VISIT:
        if rendered.prior_pv is None:
            raise ValueError(f"patient {rendered.design.patient_id} has no prior visit")
        pv = rendered.prior_pv
    else:
        pv = rendered.baseline_pv if visit == 0 else rendered.followup_pv
    return lesion_fractions(
        rendered.anatomy, pv["young"], pv["old"], pv["black_hole"], pv.get("prodrome")
    )


def synthesize_visit(
    rendered: RenderedPatient,
    visit: int,
    sequences: tuple[MRSequence, ...] = tuple(MRSequence),
) -> dict[MRSequence, np.ndarray]:
    """Images of one visit as if perfectly registered to the template (preprocessed data)."""
    fractions = visit_fractions(rendered, visit)
    rng = visit_rng(rendered, visit)
    d = rendered.design
    scanner = d.prior_scanner if visit == PRIOR_VISIT else d.scanners[visit]
    if scanner is None:
        raise ValueError(f"patient {d.patient_id} has no prior visit")
    return {seq: synthesize(seq, fractions, rendered.grid, scanner, rng) for seq in sequences}
