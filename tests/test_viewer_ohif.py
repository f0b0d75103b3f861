"""Our DICOM SEG overlays display right in OHIF Viewer 3.13 (issue 7, item 6).

A simulated study is forecast offline (one SEG per therapy), and a fixture SEG with planted
spheres is built on the same follow-up FLAIR, because the shipped model's forecasts may be
empty and an empty overlay proves nothing about placement. Orthanc (DICOMweb plugin) stores the
follow-up series and the SEGs; OHIF's prebuilt dist is served on one origin with a proxy to
Orthanc; headless Chromium opens ``/viewer?StudyInstanceUIDs=..&initialSeriesInstanceUID=<SEG>``
for every SEG. The check then holds the viewer to the SEG *file*: the segment labels and
colour, the source series under the overlay, and — from screenshots with the segmentation shown
and hidden — overlay pixels that fall on the SEG's foreground on the displayed slice, cover it,
and carry the segment's hue. An empty forecast must show no overlay at all.

``MSFN_UPDATE_SCREENSHOTS=1`` also writes the fixture's screenshot to
``docs/images/ohif-seg-overlay.png``. How it works and what it needs: tests/viewer/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ms_forecast_node.report.build import build_outputs, write_outputs
from ms_forecast_node.report.templates import OutputKind, Templates, load_templates
from tests.report_fixtures import FLAIR_FOLDER, make_report_input, read_reference
from tests.viewer import analysis, stack

REPO = Path(__file__).resolve().parents[1]
DOC_SCREENSHOT = REPO / "docs" / "images" / "ohif-seg-overlay.png"
UPDATE_ENV = "MSFN_UPDATE_SCREENSHOTS"
#: The fixture SEG must not replace the forecast's SEG of the same therapy in Orthanc: our UIDs
#: are a function of (study, therapy, kind) under the template's root (report/uids.py).
FIXTURE_UID_ROOT = "1.2.826.0.1.3680043.8.498.99."
FIXTURE_THERAPY = "placebo"
#: An overlay pixel is "on the mask" within this distance (mm) of a foreground pixel centre:
#: half the in-plane voxel diagonal (0.71 mm at 1 mm) plus OHIF's outline of about 2 screen
#: pixels (0.3 mm each at this zoom).
PLACEMENT_TOLERANCE_MM = 1.5
#: Per-channel tolerance between OHIF's segment colour and the file's (CIELab -> sRGB rounding).
COLOUR_TOLERANCE = 4
#: OHIF-internal noise, not about our objects: while it swaps the SEG viewport for the source
#: series with the segmentation, a frame request of the replaced viewport completes into a
#: viewport whose renderer is already gone (cornerstone StackViewport, "getViewUp" of null).
BENIGN_IMAGE_ERRORS = (re.compile(r"reading 'getViewUp'"),)
#: The same swap, other side: cornerstone's StackViewport.scroll debounces setImageIdIndex by
#: 40 ms, and when OHIF destroys that viewport in between, the timer throws uncaught. Matched
#: by message *and* call site, so any other "destroyed" error still fails the check.
BENIGN_PAGE_ERRORS = (
    re.compile(
        r"stack viewport has been destroyed and is no longer usable.*"
        r"at _throwIfDestroyed .*\n\s*at setImageIdIndex .*\n\s*at <anonymous>",
        re.DOTALL,
    ),
)


@dataclasses.dataclass(frozen=True)
class Tools:
    chromium: str
    puppeteer_dir: Path


@pytest.fixture(scope="module")
def viewer_tools() -> Tools:
    """Everything outside Python the check needs, or a skip that names what is missing."""
    try:
        # Cheap look-ups first, so a machine without the tools skips without downloading.
        chromium = stack.find_chromium()
        stack.find_orthanc()
        stack.find_node()
        stack.ensure_ohif_dist()
        puppeteer_dir = stack.ensure_puppeteer()
    except stack.ToolUnavailableError as exc:
        pytest.skip(f"OHIF viewer check: {exc}")
    return Tools(chromium=chromium, puppeteer_dir=puppeteer_dir)


def fixture_templates(templates: Templates) -> Templates:
    """The shipped templates with the fixture's own UID root and a series that says so."""
    outputs = templates.outputs
    seg_series = outputs.series.seg.model_copy(
        update={"number": 9900, "description": "FIXTURE SEG {therapy}"}
    )
    series = outputs.series.model_copy(update={"seg": seg_series})
    return dataclasses.replace(
        templates,
        outputs=outputs.model_copy(update={"uid_root": FIXTURE_UID_ROOT, "series": series}),
    )


@pytest.fixture(scope="module")
def forecast_segs(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """The offline chain's SEGs, one per therapy (few samples and steps: placement, not
    forecast quality, is under test here)."""
    study_dir, _ = simulated_study
    out = tmp_path_factory.mktemp("viewer-forecast")
    cmd = [sys.executable, "-m", "ms_forecast_node", "forecast", str(study_dir / "dicom")]
    cmd += ["--out", str(out), "--samples", "2", "--steps", "2", "--outputs", "seg"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    segs = sorted((out / "dicom").glob("seg_*.dcm"))
    assert segs, f"the forecast wrote no SEG: {sorted((out / 'dicom').iterdir())}"
    return segs


@pytest.fixture(scope="module")
def fixture_seg(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A SEG with planted spheres (tests/report_fixtures.py) on the follow-up FLAIR."""
    study_dir, _ = simulated_study
    reference = read_reference(study_dir / FLAIR_FOLDER)
    report_input = make_report_input(reference, [FIXTURE_THERAPY])
    objects = build_outputs(report_input, fixture_templates(load_templates()), [OutputKind.SEG])
    (path,) = write_outputs(objects, tmp_path_factory.mktemp("viewer-fixture"))
    return path


def placement_ok(placement: analysis.PlacementCheck) -> bool:
    """Nearly every overlay pixel on the SEG's foreground and in its hue, and nearly all of
    the foreground on the displayed slice covered (a few pixels of slack for anti-aliasing)."""
    return min(placement.on_mask, placement.covered, placement.hue_ok) >= 0.95


def _problems(
    result: dict[str, Any], seg: analysis.SegFile, shots: Path
) -> tuple[list[str], analysis.PlacementCheck | None]:
    """Every way in which what the viewer showed differs from what the SEG file says."""
    name = result["name"]
    source_series = seg.source_series_instance_uid
    if not result.get("ok"):
        return [f"{name}: the viewer did not show the SEG: {result.get('error')}"], None
    problems: list[str] = []
    state = result["state"]
    shown_series = {d["seriesInstanceUID"] for d in state["displaySets"]}
    if not {source_series, seg.series_instance_uid} <= shown_series:
        problems.append(f"{name}: study not loaded (display sets {sorted(shown_series)})")
    on_viewport = state["viewportSeries"].get(result["viewportId"], [])
    if source_series not in on_viewport:
        problems.append(f"{name}: SEG drawn on {on_viewport}, not its source {source_series}")
    segments = [s for segmentation in state["segmentations"] for s in segmentation["segments"]]
    labels = tuple(s["label"] for s in segments)
    if labels != seg.labels or sorted(state["labelsInPage"]) != sorted(seg.labels):
        problems.append(
            f"{name}: segment labels {labels} (in the page: {state['labelsInPage']}), "
            f"the file says {seg.labels}"
        )
    for segment in segments:
        colour = [int(c) for c in (segment.get("color") or [])[:3]]
        if len(colour) < 3 or np.abs(np.subtract(colour, seg.rgb)).max() > COLOUR_TOLERANCE:
            problems.append(f"{name}: OHIF draws colour {colour}, the file says {seg.rgb}")
    overlays = result["overlays"]
    if overlays["tourShown"] or overlays["investigationalBanner"] or overlays["modalOpen"]:
        problems.append(f"{name}: something covers the viewer: {overlays}")
    problems += [
        f"{name}: uncaught page error: {e[:500]}"
        for e in result["pageErrors"]
        if not any(p.search(e) for p in BENIGN_PAGE_ERRORS)
    ]
    problems += [
        f"{name}: console error: {c['text'][:300]} ({c['source']})"
        for c in result["console"]
        if c["type"] == "error"
    ]
    problems += [
        f"{name}: image load failed: {e}"
        for e in overlays["imageLoadErrors"]
        if not any(p.search(e["message"]) for p in BENIGN_IMAGE_ERRORS)
    ]
    problems += [
        f"{name}: HTTP {r['status']} for {r['url']}"
        for r in result["failedRequests"]
        if r.get("status")  # net::ERR_ABORTED (page closed, prefetch cancelled) has none
    ]
    for which, shot in (result.get("settled") or {}).items():
        if not shot["settled"]:
            # The diff of two moving pictures is not an overlay; say so rather than guess.
            problems.append(f"{name}: the {which} screenshot never settled ({shot['shots']} shots)")
    before, after = result["geometry"], result["geometryAfter"]
    for key in ("canvasToWorld", "focalPoint", "canvasRect"):
        if before[key] != after[key]:
            problems.append(f"{name}: the view moved between the two screenshots ({key})")
    # The slice as acquired: screen right along the rows, screen down along the columns (for
    # the sagittal FLAIR: anterior left, head up), as any viewer shows an unrotated image.
    across, down = analysis.screen_directions(before)
    if across @ seg.row_direction < 0.99 or down @ seg.column_direction < 0.99:
        problems.append(
            f"{name}: image shown turned or flipped: screen x -> {across.round(3)}, "
            f"y -> {down.round(3)}; rows {seg.row_direction}, columns {seg.column_direction}"
        )

    overlay = analysis.overlay_pixels(
        Path(result["screenshots"]["shown"]), Path(result["screenshots"]["hidden"]), before
    )
    placement = analysis.check_placement(seg, overlay, before, tolerance_mm=PLACEMENT_TOLERANCE_MM)
    if seg.focus_frame() not in placement.frames:
        problems.append(
            f"{name}: viewer shows SEG frames {placement.frames}, asked for frame "
            f"{seg.focus_frame()}"
        )
    if seg.empty:
        # An empty forecast must look empty: no pixel may change with its visibility.
        if overlay.count > 10:
            problems.append(f"{name}: empty SEG, yet {overlay.count} overlay pixels")
        return problems, placement
    if not placement_ok(placement):
        problems.append(
            f"{name}: overlay does not match the SEG on the displayed slice: {placement} "
            f"(segment colour {seg.rgb}; screenshots in {shots})"
        )
    return problems, placement


@pytest.mark.slow
@pytest.mark.external
def test_ohif_shows_seg_overlays_on_their_source_series(
    viewer_tools: Tools,
    simulated_study: tuple[Path, dict[str, Any]],
    forecast_segs: list[Path],
    fixture_seg: Path,
    tmp_path: Path,
) -> None:
    study_dir, _ = simulated_study
    followup = sorted(p for p in (study_dir / "dicom" / "followup").rglob("*") if p.is_file())
    segs = {"fixture_" + FIXTURE_THERAPY: analysis.read_seg(fixture_seg)}
    segs.update({p.stem: analysis.read_seg(p) for p in forecast_segs})
    assert not segs["fixture_" + FIXTURE_THERAPY].empty
    targets = [
        stack.ViewerTarget(
            name=name,
            study_instance_uid=seg.study_instance_uid,
            seg_series_instance_uid=seg.series_instance_uid,
            expected_labels=seg.labels,
            # Page to the frame with the most foreground (its centroid lies on that frame's
            # plane), or for an empty SEG to the middle of the head.
            world_point=(
                seg.frame_centre(seg.focus_frame())
                if seg.empty
                else seg.frame_centroid(seg.focus_frame())
            ),
        )
        for name, seg in segs.items()
    ]
    shots = tmp_path / "screenshots"
    with stack.viewer_stack(tmp_path) as (orthanc, proxy):
        orthanc.upload([*followup, fixture_seg, *forecast_segs])
        report = stack.run_driver(
            proxy.url,
            targets,
            shots,
            puppeteer_dir=viewer_tools.puppeteer_dir,
            chromium=viewer_tools.chromium,
            timeout_s=1200,
        )
        proxy_errors = [e for e in proxy.log.errors() if e[2] != 499]
        dicomweb_requests = proxy.log.count("/dicom-web/")

    assert dicomweb_requests > 0, "the viewer never asked Orthanc for anything"
    assert not proxy_errors, f"failed requests through the proxy: {proxy_errors[:20]}"
    results = {r["name"]: r for r in report["results"]}
    assert sorted(results) == sorted(segs)
    problems: list[str] = []
    placements = {}
    for name, seg in segs.items():
        found, placements[name] = _problems(results[name], seg, shots)
        problems += found
    for name, result in results.items():
        view = result.get("initialView") or {}
        if view.get("reset"):
            # Not about our objects, and not every run: see tests/viewer/README.md.
            warnings.warn(
                f"{name}: OHIF first showed the source series rotated by "
                f"{view.get('rotation')} degrees (flips {view.get('flipHorizontal')}, "
                f"{view.get('flipVertical')}); the check reset the view before its screenshots",
                stacklevel=1,
            )
    fixture = results["fixture_" + FIXTURE_THERAPY]
    if os.environ.get(UPDATE_ENV) == "1" and fixture.get("ok"):
        DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixture["screenshots"]["shown"], DOC_SCREENSHOT)
    timings = {n: (r.get("loadMs"), r.get("totalMs")) for n, r in results.items()}
    summary = {n: dataclasses.asdict(p) for n, p in placements.items() if p is not None}
    assert not problems, "\n".join(
        [*problems, f"timings (load, total ms): {timings}", f"placement: {summary}"]
    )
    # The fixture's overlay has a plausible size: its area on screen equals the SEG's
    # foreground area on the slice (within the outline and rounding).
    fixture_seg_file = segs["fixture_" + FIXTURE_THERAPY]
    check = placements["fixture_" + FIXTURE_THERAPY]
    assert check is not None
    samples = fixture["geometry"]["canvasToWorld"]
    mm_per_px = float(np.linalg.norm(np.subtract(samples["x100"], samples["origin"])) / 100.0)
    dr, dc = fixture_seg_file.pixel_spacing
    area_seen = check.overlay_pixels * mm_per_px**2
    area_file = check.expected_pixels * dr * dc
    assert 0.8 * area_file <= area_seen <= 1.3 * area_file, (area_seen, area_file)


# --------------------------------------------------------------------------------------------
# The comparison itself, on synthetic screenshots: it must fail when the overlay is missing,
# misplaced or in another colour (no browser needed, so it runs in every test session).
# --------------------------------------------------------------------------------------------
_GEOMETRY: dict[str, Any] = {
    "canvasRect": {"left": 100.0, "top": 50.0, "width": 400.0, "height": 300.0},
    # 4 screen pixels per mm; canvas x runs along +y (LPS), canvas y along -z.
    "canvasToWorld": {
        "origin": [0.0, 0.0, 0.0],
        "x100": [0.0, 25.0, 0.0],
        "y100": [0.0, 0.0, -25.0],
    },
    "focalPoint": [0.0, 40.0, -30.0],
    "viewPlaneNormal": [1.0, 0.0, 0.0],
}


def _synthetic_seg() -> analysis.SegFile:
    rows, cols = np.mgrid[0:60, 0:80]
    disc = (rows - 30) ** 2 + (cols - 40) ** 2 <= 8**2
    return analysis.SegFile(
        path=Path("synthetic.dcm"),
        series_instance_uid="1.2.3.1",
        study_instance_uid="1.2.3",
        source_series_instance_uid="1.2.3.2",
        labels=("forecast NET2 lesions",),
        rgb=(213, 94, 0),
        frame_positions=np.zeros((1, 3)),
        row_direction=np.array([0.0, 1.0, 0.0]),
        column_direction=np.array([0.0, 0.0, -1.0]),
        pixel_spacing=(1.0, 1.0),
        normal=np.array([-1.0, 0.0, 0.0]),
        slice_spacing=1.0,
        frames=disc[None],
    )


def _screenshots(
    tmp_path: Path, seg: analysis.SegFile, rgb: tuple[int, int, int], shift_px: int = 0
) -> tuple[Path, Path]:
    """Grey anatomy, and the same with the SEG's foreground blended in at alpha 0.5."""
    from PIL import Image

    grey = np.full((400, 600, 3), 120, dtype=np.uint8)
    ys, xs = np.mgrid[0:400, 0:600]
    world = analysis.page_to_world(np.stack([xs.ravel(), ys.ravel()], axis=1), _GEOMETRY)
    col = np.round(world[:, 1]).astype(int).reshape(ys.shape)  # mm along +y = column index
    row = np.round(-world[:, 2]).astype(int).reshape(ys.shape)
    valid = (row >= 0) & (row < 60) & (col >= 0) & (col < 80)
    inside = np.zeros(ys.shape, dtype=bool)
    inside[valid] = seg.frames[0][row[valid], col[valid]]
    inside &= (xs >= 100) & (xs < 500) & (ys >= 50) & (ys < 350)
    inside = np.roll(inside, shift_px, axis=1)
    shown = grey.copy()
    shown[inside] = (0.5 * np.asarray(rgb) + 0.5 * 120).astype(np.uint8)
    Image.fromarray(shown).save(tmp_path / "shown.png")
    Image.fromarray(grey).save(tmp_path / "hidden.png")
    return tmp_path / "shown.png", tmp_path / "hidden.png"


@pytest.mark.parametrize(
    ("case", "rgb", "shift_px", "expected"),
    [
        ("right", (213, 94, 0), 0, True),
        ("missing", None, 0, False),
        ("misplaced by 3 mm", (213, 94, 0), 12, False),
        ("another colour", (0, 114, 178), 0, False),
    ],
)
def test_placement_check_fails_on_a_wrong_overlay(
    tmp_path: Path, case: str, rgb: tuple[int, int, int] | None, shift_px: int, expected: bool
) -> None:
    seg = _synthetic_seg()
    shown, hidden = _screenshots(tmp_path, seg, rgb or (120, 120, 120), shift_px)
    overlay = analysis.overlay_pixels(shown, hidden, _GEOMETRY)
    placement = analysis.check_placement(
        seg, overlay, _GEOMETRY, tolerance_mm=PLACEMENT_TOLERANCE_MM
    )
    assert placement.frames == [0]
    assert placement_ok(placement) is expected, (case, placement)
