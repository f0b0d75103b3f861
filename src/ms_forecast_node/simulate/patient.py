"""One simulated patient: design (anatomy, lesions, activity, counterfactual events) and rendering.

The *design* is drawn once per seed on a fixed 2 mm placement grid and holds only geometry in
millimetres and random numbers, so the same patient renders identically at 1 mm (DICOM
studies) and at the model grid (cohorts).

NET2 definition (also in docs/simulator.md): under therapy *k*, the NET2 mask is the set of
follow-up lesion voxels that are not lesion at baseline and belong either to a **new** lesion
(an event of kind "new" occurring under *k*) or to an **enlarging** lesion (an existing lesion
hit by an "enlarge" event under *k*; its volume grows by a factor drawn from
``enlarge_volume_factor``, always at least 1 + ``enlarging_threshold`` = 1.5). Shrinking and
stable lesions contribute nothing. The NET2 count is the number of such lesions with at least
one NET2 voxel on the grid.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

import numpy as np

from ms_forecast_node.anatomy.locations import LocationClass, LocationMaps, classify_lesions
from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.errors import SimulationError
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.activity import PatientActivity, draw_activity
from ms_forecast_node.simulate.config import SimulationConfig
from ms_forecast_node.simulate.deform import draw_displacement_control, warp_anatomy
from ms_forecast_node.simulate.lesions import (
    Lesion,
    LesionAge,
    LesionShape,
    paint,
    random_shape,
    render,
)
from ms_forecast_node.simulate.mri import ScannerProfile, draw_scanner, with_new_session
from ms_forecast_node.simulate.therapies import Therapy, load_therapies

log = logging.getLogger(__name__)

PLACEMENT_SPACING_MM = 2.0
BRAIN_CENTER_LPS = np.array([0.0, 18.0, 12.0])  # near the middle of the brain in MNI (LPS)


class EventKind(str, enum.Enum):
    NEW = "new"
    ENLARGE = "enlarge"


@dataclass(frozen=True)
class NET2Event:
    """One placebo-world NET2 event; it occurs under therapy k iff threshold < 1 - reduction_k."""

    kind: EventKind
    threshold: float
    lesion_id: int  # the new lesion, or the existing lesion that enlarges
    volume_factor: float = 1.0  # for enlargements


@dataclass(frozen=True)
class IntervalEvent:
    """A change between the prior visit and baseline: a baseline lesion that was absent at the
    prior visit (``new``) or ``volume_factor`` times smaller there (``enlarge``)."""

    kind: EventKind
    lesion_id: int
    volume_factor: float = 1.0


@dataclass(frozen=True)
class PatientDesign:
    patient_id: str
    seed: int
    config: SimulationConfig
    activity: PatientActivity
    factual_therapy: str
    displacement_control_mm: np.ndarray
    atrophy_mm: float
    lesion_load_target_ml: float
    head_affine: np.ndarray  # 4x4: patient template-aligned LPS -> scanner LPS (baseline)
    visit_poses: tuple[np.ndarray, np.ndarray]  # 4x4 rigid per visit, applied after head_affine
    scanners: tuple[ScannerProfile, ScannerProfile]
    baseline_lesions: tuple[Lesion, ...]
    new_lesions: tuple[Lesion, ...]
    events: tuple[NET2Event, ...]
    shrink_factors: dict[int, float] = field(default_factory=dict)
    sex: str = "F"
    age_years: int = 35
    prior_weeks: float = 0.0  # the prior visit's distance before baseline (0: no prior visit)
    prior_events: tuple[IntervalEvent, ...] = ()
    prior_scanner: ScannerProfile | None = None

    def prior_lesions(self) -> tuple[list[Lesion], dict[int, LesionShape]]:
        """Lesions present at the prior visit (all old by then) and the shapes that differ."""
        absent = {e.lesion_id for e in self.prior_events if e.kind is EventKind.NEW}
        shapes = {
            e.lesion_id: self.baseline_lesions[e.lesion_id - 1].shape.scaled(1.0 / e.volume_factor)
            for e in self.prior_events
            if e.kind is EventKind.ENLARGE
        }
        lesions = [
            Lesion(les.lesion_id, les.shape, LesionAge.OLD, les.black_hole, les.intended_location)
            for les in self.baseline_lesions
            if les.lesion_id not in absent
        ]
        return lesions, shapes

    @property
    def horizon_weeks(self) -> float:
        return self.config.horizon_weeks

    def occurring_events(self, therapy: str) -> list[NET2Event]:
        return [e for e in self.events if self.activity.occurs_under(e.threshold, therapy)]

    def followup_lesions(self, therapy: str) -> tuple[list[Lesion], dict[int, LesionShape]]:
        """Lesions present at follow-up under ``therapy`` and the shapes that changed."""
        happening = self.occurring_events(therapy)
        enlarge = {e.lesion_id: e.volume_factor for e in happening if e.kind is EventKind.ENLARGE}
        new_ids = {e.lesion_id for e in happening if e.kind is EventKind.NEW}
        shapes: dict[int, LesionShape] = {}
        for lesion in self.baseline_lesions:
            if lesion.lesion_id in enlarge:
                shapes[lesion.lesion_id] = lesion.shape.scaled(enlarge[lesion.lesion_id])
            elif lesion.lesion_id in self.shrink_factors:
                shapes[lesion.lesion_id] = lesion.shape.scaled(
                    self.shrink_factors[lesion.lesion_id]
                )
        lesions = list(self.baseline_lesions) + [
            les for les in self.new_lesions if les.lesion_id in new_ids
        ]
        return lesions, shapes


# ---------------------------------------------------------------------------------------------
# Design
# ---------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _about_center(linear: np.ndarray, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = BRAIN_CENTER_LPS - linear @ BRAIN_CENTER_LPS + translation
    return m


class _Placer:
    """Draws lesion centres by location class on the warped placement-grid anatomy."""

    def __init__(self, anatomy: dict[str, np.ndarray], grid: Grid, rng: np.random.Generator):
        self.grid = grid
        self.rng = rng
        self.anatomy = anatomy
        wm, dv, dc = anatomy["wm"], anatomy["dist_ventricles_mm"], anatomy["dist_cortex_mm"]
        infra = anatomy["infratentorial"] > 0.5
        zones = {
            LocationClass.PERIVENTRICULAR: (wm > 0.5) & (dv >= 1.0) & (dv <= 3.0) & ~infra,
            LocationClass.JUXTACORTICAL: (wm > 0.4) & (dc >= 1.0) & (dc <= 2.5) & (dv > 8) & ~infra,
            LocationClass.INFRATENTORIAL: infra & (wm > 0.6),
            LocationClass.DEEP_WHITE_MATTER: (wm > 0.8) & (dv > 7) & (dc > 5) & ~infra,
        }
        self.zones = {k: np.flatnonzero(v) for k, v in zones.items()}
        for k, v in self.zones.items():
            if v.size == 0:
                raise SimulationError(f"no candidate voxels for {k.value} lesions")
        self.occupied = np.zeros(grid.shape, dtype=bool)
        self.grad_dv = np.stack(np.gradient(dv), axis=0)  # along k, j, i

    def center_in(self, zone: LocationClass) -> np.ndarray:
        flat = self.rng.choice(self.zones[zone])
        kji = np.array(np.unravel_index(flat, self.grid.shape), dtype=np.float64)
        kji += self.rng.uniform(-0.5, 0.5, 3)
        return self.grid.index_to_world(kji[::-1][None])[0]

    def ventricle_normal(self, center: np.ndarray) -> np.ndarray:
        ijk = np.round(self.grid.world_to_index(center[None])[0]).astype(int)
        ijk = np.clip(ijk, 0, np.asarray(self.grid.size_ijk) - 1)
        g_kji = self.grad_dv[:, ijk[2], ijk[1], ijk[0]]
        return self.grid.affine[:3, :3] @ g_kji[::-1]  # index gradient -> world direction

    def in_white_matter(self, center: np.ndarray) -> bool:
        ijk = np.round(self.grid.world_to_index(center[None])[0]).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= np.asarray(self.grid.size_ijk)):
            return False
        return bool(self.anatomy["wm"][ijk[2], ijk[1], ijk[0]] > 0.5)

    def try_claim(self, shape: LesionShape) -> bool:
        out = render(shape, self.grid)
        if out is None:
            return False
        box, frac = out
        footprint = frac > 0.05
        if not footprint.any() or np.any(self.occupied[box] & footprint):
            return False
        self.occupied[box] |= footprint
        return True

    def claim_existing(self, shape: LesionShape) -> None:
        out = render(shape, self.grid)
        if out is not None:
            box, frac = out
            self.occupied[box] |= frac > 0.05


def _lesion_volume(rng: np.random.Generator, median_mm3: float, log_sd: float) -> float:
    return float(np.clip(rng.lognormal(np.log(median_mm3), log_sd), 14.0, 15000.0))


def _shape_for(
    placer: _Placer, zone: LocationClass, center: np.ndarray, volume: float
) -> LesionShape:
    rng = placer.rng
    if zone is LocationClass.PERIVENTRICULAR:
        # Ovoid lesions perpendicular to the ventricles (Dawson's fingers).
        return random_shape(rng, center, volume, placer.ventricle_normal(center), elongation=1.9)
    if zone is LocationClass.JUXTACORTICAL:
        return random_shape(rng, center, min(volume, 400.0), elongation=1.3)
    if zone is LocationClass.INFRATENTORIAL:
        return random_shape(rng, center, min(volume, 600.0), elongation=1.3)
    return random_shape(rng, center, volume, elongation=1.4)


def design_patient(
    seed: int,
    index: int = 0,
    config: SimulationConfig | None = None,
    factual_therapy: str | None = None,
    patient_id: str | None = None,
) -> PatientDesign:
    """Draw a patient. ``(seed, index)`` fully determine it (independent random substreams)."""
    config = config or SimulationConfig()
    therapies: tuple[Therapy, ...] = load_therapies()
    codes = [t.code for t in therapies]
    # A seventh stream for the prior visit: the first six (and so every patient drawn before
    # prior visits existed) are unchanged, because SeedSequence children depend on their index.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(7)]
    rng_act, rng_anat, rng_les, rng_evt, rng_scan, rng_misc, rng_prior = streams

    activity = draw_activity(rng_act, config.activity, therapies)
    if factual_therapy is None:
        factual_therapy = codes[int(rng_act.integers(0, len(codes)))]
    elif factual_therapy not in codes:
        raise SimulationError(f"unknown therapy {factual_therapy!r}; known: {codes}")

    # Lesion load is partly driven by the visible activity component.
    eps = float(rng_les.standard_normal())
    log_load = np.log(config.lesion_load_median_ml) + config.lesion_load_log_sd * (
        0.5 * activity.z_visible + np.sqrt(0.75) * eps
    )
    load_ml = float(np.clip(np.exp(log_load), *config.lesion_load_range_ml))
    atrophy = float(np.clip(0.4 + 1.2 * np.log1p(load_ml / 5.0) + rng_anat.normal(0, 0.3), 0, 4))
    control = draw_displacement_control(rng_anat, config.nonlinear_mm)

    anatomy = load_template_anatomy(PLACEMENT_SPACING_MM)
    warped = warp_anatomy(anatomy, control, atrophy)
    placer = _Placer(warped, anatomy.grid, rng_les)

    # Baseline: young (recent, small) lesions reveal activity; old ones make up the load.
    n_young = int(min(rng_les.poisson(np.exp(0.2 + 0.8 * activity.z_visible)), 15))
    zone_names = [LocationClass(name) for name, _ in config.topography]
    zone_p = np.array([w for _, w in config.topography])
    zone_p = zone_p / zone_p.sum()
    lesions: list[Lesion] = []
    total = 0.0
    median_old = 40.0 + 12.0 * load_ml
    attempts = 0
    while (total < load_ml * 1000.0 or len(lesions) < n_young + 1) and attempts < 3000:
        attempts += 1
        young = len(lesions) < n_young
        zone = zone_names[int(rng_les.choice(len(zone_names), p=zone_p))]
        volume = _lesion_volume(rng_les, 30.0 if young else median_old, 0.6 if young else 0.9)
        center = placer.center_in(zone)
        shape = _shape_for(placer, zone, center, volume)
        if not placer.try_claim(shape):
            continue
        old = not young
        lesions.append(
            Lesion(
                lesion_id=len(lesions) + 1,
                shape=shape,
                age=LesionAge.YOUNG if young else LesionAge.OLD,
                black_hole=bool(old and shape.volume_mm3 > 100 and rng_les.random() < 0.3),
                intended_location=zone,
            )
        )
        total += shape.volume_mm3
    if not lesions:
        raise SimulationError("could not place any baseline lesion")

    # Counterfactual events over the horizon (placebo world; thinned per therapy).
    scale = config.horizon_weeks / 48.0
    n_events = int(rng_evt.poisson(activity.placebo_rate_48w * scale))
    events: list[NET2Event] = []
    new_lesions: list[Lesion] = []
    enlarged: set[int] = set()
    next_id = len(lesions) + 1
    for _ in range(n_events):
        threshold = float(rng_evt.random())
        candidates = [les.lesion_id for les in lesions if les.lesion_id not in enlarged]
        if candidates and rng_evt.random() < config.activity.enlarging_share:
            target = int(rng_evt.choice(candidates))
            factor = float(rng_evt.uniform(*config.enlarge_volume_factor))
            enlarged.add(target)
            events.append(NET2Event(EventKind.ENLARGE, threshold, target, factor))
            continue
        for _attempt in range(50):
            mode = rng_evt.random()
            if mode < 0.3:  # near an existing lesion
                anchor = lesions[int(rng_evt.integers(0, len(lesions)))].shape.center
                offset = rng_evt.standard_normal(3)
                offset *= rng_evt.uniform(5.0, 14.0) / np.linalg.norm(offset)
                center = anchor + offset
                if not placer.in_white_matter(center):
                    continue
                zone = LocationClass.DEEP_WHITE_MATTER
            elif mode < 0.75:
                zone = LocationClass.PERIVENTRICULAR
                center = placer.center_in(zone)
            else:
                zone = zone_names[int(rng_evt.choice(len(zone_names), p=zone_p))]
                center = placer.center_in(zone)
            volume = _lesion_volume(rng_evt, config.new_lesion_volume_median_mm3, 0.7)
            shape = _shape_for(placer, zone, center, volume)
            if placer.try_claim(shape):
                prodrome = bool(rng_evt.random() < config.prodrome_probability)
                new_lesions.append(
                    Lesion(next_id, shape, LesionAge.YOUNG, False, zone, prodrome=prodrome)
                )
                events.append(NET2Event(EventKind.NEW, threshold, next_id))
                next_id += 1
                break
        else:
            log.debug("patient %s: no room for a new lesion after 50 tries", patient_id)

    shrink: dict[int, float] = {}
    for les in lesions:
        if les.lesion_id in enlarged:
            continue
        p = 0.4 if les.age is LesionAge.YOUNG else config.shrink_probability
        if rng_evt.random() < p:
            shrink[les.lesion_id] = float(rng_evt.uniform(0.5, 0.85))

    # Head position in the scanner and re-positioning between visits.
    scale_iso = rng_misc.uniform(1 - config.head_scale_max, 1 + config.head_scale_max, 3)
    linear = _rotation(rng_misc, config.head_rotation_max_deg) @ np.diag(scale_iso)
    head = _about_center(linear, rng_misc.normal(0, config.head_translation_sd_mm, 3))
    poses = tuple(
        _about_center(
            _rotation(rng_misc, config.visit_rotation_max_deg),
            rng_misc.normal(0, config.visit_translation_sd_mm, 3),
        )
        for _ in range(2)
    )
    scanner0 = draw_scanner(rng_scan, "SIM-SCANNER-A")
    if rng_scan.random() < config.same_scanner_probability:
        scanner1 = with_new_session(scanner0, rng_scan)
    else:
        scanner1 = draw_scanner(rng_scan, "SIM-SCANNER-B")

    prior_events: tuple[IntervalEvent, ...] = ()
    prior_scanner = None
    if config.prior_visit_weeks:
        prior_events = _interval_events(lesions, activity, config, rng_prior)
        prior_scanner = with_new_session(scanner0, rng_prior)

    return PatientDesign(
        patient_id=patient_id or f"SIM{seed:04d}{index:05d}",
        seed=seed,
        config=config,
        activity=activity,
        factual_therapy=factual_therapy,
        displacement_control_mm=control,
        atrophy_mm=atrophy,
        lesion_load_target_ml=load_ml,
        head_affine=head,
        visit_poses=(poses[0], poses[1]),
        scanners=(scanner0, scanner1),
        baseline_lesions=tuple(lesions),
        new_lesions=tuple(new_lesions),
        events=tuple(events),
        shrink_factors=shrink,
        sex="F" if rng_misc.random() < 0.7 else "M",  # RRMS is about 2-3x more common in women
        age_years=int(np.clip(rng_misc.normal(36, 9), 18, 60)),
        prior_weeks=float(config.prior_visit_weeks),
        prior_events=prior_events,
        prior_scanner=prior_scanner,
    )


def _interval_events(
    lesions: list[Lesion],
    activity: PatientActivity,
    config: SimulationConfig,
    rng: np.random.Generator,
) -> tuple[IntervalEvent, ...]:
    """What changed between the prior visit and baseline.

    The interval is untreated, so its events are ``Poisson(mu0 · weeks / 48)`` with the same
    placebo rate (visible *and* hidden activity) as the forecast horizon: past activity is the
    best-known predictor of future activity in MS. An event enlarges a baseline lesion with the
    simulator's enlarging share; otherwise it is a baseline lesion that did not exist at the
    prior visit, taken among the young lesions first (they are the recent ones), then among the
    old ones. Black holes are chronic and never new in the interval.
    """
    n_events = int(rng.poisson(activity.placebo_rate_48w * config.prior_visit_weeks / 48.0))
    young = [les.lesion_id for les in lesions if les.age is LesionAge.YOUNG]
    old = [les.lesion_id for les in lesions if les.age is LesionAge.OLD and not les.black_hole]
    old = [old[i] for i in rng.permutation(len(old))]
    available = young + old
    used: set[int] = set()
    events: list[IntervalEvent] = []
    for _ in range(n_events):
        if rng.random() < config.activity.enlarging_share:
            candidates = [les.lesion_id for les in lesions if les.lesion_id not in used]
            if not candidates:
                break
            target = int(rng.choice(candidates))
            factor = float(rng.uniform(*config.enlarge_volume_factor))
            events.append(IntervalEvent(EventKind.ENLARGE, target, factor))
        else:
            fresh = [i for i in available if i not in used]
            if not fresh:
                break
            target = fresh[0]
            events.append(IntervalEvent(EventKind.NEW, target))
        used.add(target)
    return tuple(events)


# ---------------------------------------------------------------------------------------------
# Rendering on a grid
# ---------------------------------------------------------------------------------------------


@dataclass
class LesionRecord:
    lesion_id: int
    kind: str  # "baseline" or "new"
    age: str
    black_hole: bool
    intended_location: str
    location: str | None  # classifier's class on the rendered grid (None if not visible)
    volume_mm3: float  # rendered (binary) volume at baseline (new lesions: at follow-up)
    analytic_volume_mm3: float
    centroid_lps_mm: list[float]
    fate: str  # stable / shrinking / enlarging (factual) / new
    prodrome_visible: bool  # new lesions: a faint change at the site was visible at baseline
    occurs_under: list[str]  # therapies under which this lesion is new or enlarging


@dataclass
class RenderedPatient:
    """Everything a cohort or a study needs, on one grid."""

    design: PatientDesign
    grid: Grid
    anatomy: dict[str, np.ndarray]
    baseline_labels: np.ndarray
    baseline_pv: dict[str, np.ndarray]  # young / old / black_hole partial volumes
    followup_labels: np.ndarray  # factual therapy
    followup_pv: dict[str, np.ndarray]
    net2: dict[str, np.ndarray]  # therapy -> bool mask
    net2_lesion_ids: dict[str, list[int]]
    lesions: list[LesionRecord]
    prior_labels: np.ndarray | None = None  # the prior visit (None: no prior visit)
    prior_pv: dict[str, np.ndarray] | None = None

    def location_maps(self) -> LocationMaps:
        return LocationMaps(
            grid=self.grid,
            dist_ventricles_mm=self.anatomy["dist_ventricles_mm"],
            dist_cortex_mm=self.anatomy["dist_cortex_mm"],
            infratentorial=self.anatomy["infratentorial"],
        )


def _pv_by_type(
    lesions: list[Lesion], grid: Grid, shapes: dict[int, LesionShape]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    labels = np.zeros(grid.shape, dtype=np.int32)
    pv: dict[str, np.ndarray] = {}
    groups = {
        "young": [les for les in lesions if les.age is LesionAge.YOUNG],
        "old": [les for les in lesions if les.age is LesionAge.OLD and not les.black_hole],
        "black_hole": [les for les in lesions if les.black_hole],
    }
    for name, group in groups.items():
        part_pv, part_labels = paint(group, grid, shapes)
        pv[name] = part_pv
        take = part_labels > 0
        labels[take] = part_labels[take]
    return pv, labels


def render_patient(design: PatientDesign, spacing_mm: float | None = None) -> RenderedPatient:
    """Render a design on the template-aligned grid at ``spacing_mm`` (default: config grid)."""
    spacing = float(spacing_mm or design.config.grid_spacing_mm)
    anatomy = load_template_anatomy(spacing)
    grid = anatomy.grid
    warped = warp_anatomy(anatomy, design.displacement_control_mm, design.atrophy_mm)
    codes = [t.code for t in load_therapies()]

    bl_pv, bl_labels = _pv_by_type(list(design.baseline_lesions), grid, {})
    prodromes = [les for les in design.new_lesions if les.prodrome]
    prodrome_shapes = {les.lesion_id: les.shape.scaled(0.8) for les in prodromes}
    prodrome_pv, _ = paint(prodromes, grid, prodrome_shapes)
    bl_pv["prodrome"] = prodrome_pv * np.float32(design.config.prodrome_strength)
    bl_mask = bl_labels > 0
    prior_pv: dict[str, np.ndarray] | None = None
    prior_labels: np.ndarray | None = None
    if design.prior_weeks:
        prior_lesions, prior_shapes = design.prior_lesions()
        prior_pv, prior_labels = _pv_by_type(prior_lesions, grid, prior_shapes)
    net2: dict[str, np.ndarray] = {}
    net2_ids: dict[str, list[int]] = {}
    fu_pv: dict[str, np.ndarray] = {}
    fu_labels = bl_labels
    for code in codes:
        lesions, shapes = design.followup_lesions(code)
        # Lesions that have changed age at follow-up: baseline young lesions become old.
        aged = [
            Lesion(les.lesion_id, les.shape, LesionAge.OLD, les.black_hole, les.intended_location)
            if les.lesion_id <= len(design.baseline_lesions) and les.age is LesionAge.YOUNG
            else les
            for les in lesions
        ]
        pv, labels = _pv_by_type(aged, grid, shapes)
        active_ids = {e.lesion_id for e in design.occurring_events(code)}
        candidate = (labels > 0) & ~bl_mask & np.isin(labels, list(active_ids))
        net2[code] = candidate
        net2_ids[code] = sorted(int(v) for v in np.unique(labels[candidate]) if v > 0)
        if code == design.factual_therapy:
            fu_pv, fu_labels = pv, labels

    maps = LocationMaps(
        grid=grid,
        dist_ventricles_mm=warped["dist_ventricles_mm"],
        dist_cortex_mm=warped["dist_cortex_mm"],
        infratentorial=warped["infratentorial"],
    )
    # New lesions of counterfactual worlds are classified on a label map of their own.
    cf_labels = np.zeros(grid.shape, dtype=np.int32)
    for les in design.new_lesions:
        out = render(les.shape, grid)
        if out is not None:
            box, frac = out
            cf_labels[box][frac >= 0.5] = les.lesion_id
    classes = classify_lesions(bl_labels, maps)
    classes.update(classify_lesions(cf_labels, maps))
    voxel_mm3 = grid.voxel_volume_mm3
    enlarge_events = {e.lesion_id: e for e in design.events if e.kind is EventKind.ENLARGE}
    records: list[LesionRecord] = []
    for les in (*design.baseline_lesions, *design.new_lesions):
        is_new = les.lesion_id > len(design.baseline_lesions)
        source = cf_labels if is_new else bl_labels
        n_vox = int(np.count_nonzero(source == les.lesion_id))
        if les.lesion_id in enlarge_events or is_new:
            threshold = next(e.threshold for e in design.events if e.lesion_id == les.lesion_id)
            occurs = [c for c in codes if design.activity.occurs_under(threshold, c)]
        else:
            occurs = []
        if is_new:
            fate = "new"
        elif les.lesion_id in enlarge_events:
            fate = "enlarging" if design.factual_therapy in occurs else "stable"
        elif les.lesion_id in design.shrink_factors:
            fate = "shrinking"
        else:
            fate = "stable"
        cls = classes.get(les.lesion_id)
        records.append(
            LesionRecord(
                lesion_id=les.lesion_id,
                kind="new" if is_new else "baseline",
                age=les.age.value,
                black_hole=les.black_hole,
                intended_location=les.intended_location.value,
                location=None if cls is None else cls.value,
                volume_mm3=round(n_vox * voxel_mm3, 3),
                analytic_volume_mm3=round(les.shape.volume_mm3, 3),
                centroid_lps_mm=[round(float(v), 3) for v in les.shape.center],
                fate=fate,
                prodrome_visible=les.prodrome,
                occurs_under=occurs,
            )
        )
    return RenderedPatient(
        design=design,
        grid=grid,
        anatomy=warped,
        baseline_labels=bl_labels,
        baseline_pv=bl_pv,
        followup_labels=fu_labels,
        followup_pv=fu_pv,
        net2=net2,
        net2_lesion_ids=net2_ids,
        lesions=records,
        prior_labels=prior_labels,
        prior_pv=prior_pv,
    )
