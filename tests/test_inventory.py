"""Series inventory and selection (issue 4, item 1) and the DICOM test-case builders."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from ms_forecast_node.assemble import rules as rules_module
from ms_forecast_node.assemble.inventory import (
    SeriesInfo,
    StudyInventory,
    inventory,
    select_series,
)
from ms_forecast_node.assemble.rules import (
    ENV_RULES_PATH,
    REPO_RULES_PATH,
    SeriesAttributes,
    SeriesClass,
    SeriesRules,
    SkipCategory,
    classify,
    default_rules_path,
    load_series_rules,
    skip_reason,
)
from ms_forecast_node.errors import SeriesRulesError, SeriesSelectionError

from .dicom_cases import (
    LOSSLESS_TRANSFER_SYNTAXES,
    derived_copy,
    dicom_files,
    encode_series,
    localizer_only_study,
    mr700_path,
    philips_mprage_source,
    philips_mprage_with_pixels,
    series_with_missing_slice,
    study_without_flair,
)

HAS_DCIODVFY = shutil.which("dciodvfy") is not None


@pytest.fixture(scope="module")
def rules() -> SeriesRules:
    return load_series_rules(REPO_RULES_PATH)


def _visit_dir(study: tuple[Path, dict[str, Any]], visit: str = "baseline") -> Path:
    return study[0] / "dicom" / visit


def _series_dir(study: tuple[Path, dict[str, Any]], sequence: str, visit: str = "baseline") -> Path:
    out, manifest = study
    for v in manifest["visits"]:
        if v["visit"] == visit:
            for s in v["series"]:
                if s["sequence"] == sequence:
                    return out / s["folder"]
    raise KeyError(sequence)


def _dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return {ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("Error")}


# --------------------------------------------------------------------------------------------
# Rules file: loading, validation, location
# --------------------------------------------------------------------------------------------
def _write_rules(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    raw = yaml.safe_load(REPO_RULES_PATH.read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / "site_rules.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _rule(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in raw["rules"] if r["name"] == name)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def test_default_rules_file_is_valid(rules: SeriesRules) -> None:
    assert rules.source == str(REPO_RULES_PATH)
    assert rules.selection.required == (SeriesClass.FLAIR,)
    assert rules.selection.reference is SeriesClass.FLAIR
    assert set(rules.selection.wanted) == {
        SeriesClass.T1,
        SeriesClass.T1C,
        SeriesClass.T2,
        SeriesClass.PD,
    }
    assert not rules.skip.localizer.keep and not rules.skip.derived.keep
    # "NO" must stay a string (unquoted YAML reads it as false).
    assert "NO" in rules.post_contrast.agent_none_values


@pytest.mark.parametrize(
    ("edit", "field", "text"),
    [
        (_set("rules.3.description", "(unclosed"), "rules[3].description", "invalid regular"),
        (_set("rules.0.class", "T3"), "rules[0].class", "'FLAIR'"),
        (_set("skip.min_slices", "eight"), "skip.min_slices", "valid integer"),
        (_set("skip.localizer.keep", [1]), "skip.localizer.keep", "valid boolean"),
        (_set("selection.required", "FLAIR"), "selection.required", "a list"),
        (_set("selection.reference", "T2"), "selection", "reference T2 must be one of"),
        (_set("selection.preference", ["bigger_first"]), "selection.preference[0]", "prefer_3d"),
        (_set("rules.0.descripton", "x"), "rules[0].descripton", "Extra inputs"),
        (_set("rules.5.echo_time_ms", {"min": 90, "max": 10}), "rules[5].echo_time_ms", "min 90"),
        (_set("rules.1", {"name": "empty", "class": "T1"}), "rules[1]", "no condition"),
        (_set("rules.1.name", "other_by_description"), "(top level)", "repeated"),
        (_set("version", 2), "version", "1"),
        (_set("rules", []), "rules", "List should have at least 1"),
    ],
)
def test_invalid_rules_name_the_file_and_field(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str, text: str
) -> None:
    path = _write_rules(tmp_path, edit)
    with pytest.raises(SeriesRulesError) as info:
        load_series_rules(path)
    message = str(info.value)
    assert info.value.reason == "series_rules_invalid"
    assert str(path) in message
    assert f"{field}:" in message
    assert text in message


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n  - name: x\n", encoding="utf-8")
    with pytest.raises(SeriesRulesError, match="not valid YAML"):
        load_series_rules(bad)
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    with pytest.raises(SeriesRulesError, match="mapping at the top level"):
        load_series_rules(tmp_path / "list.yaml")
    with pytest.raises(SeriesRulesError) as info:
        load_series_rules(tmp_path / "absent.yaml")
    assert info.value.reason == "series_rules_missing"


def test_env_variable_overrides_the_rules_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_RULES_PATH, raising=False)
    assert default_rules_path() == REPO_RULES_PATH
    site = _write_rules(tmp_path, _set("selection.required", ["FLAIR", "T1C"]))
    monkeypatch.setenv(ENV_RULES_PATH, str(site))
    assert default_rules_path() == site
    loaded = load_series_rules()
    assert loaded.source == str(site)
    assert loaded.selection.required == (SeriesClass.FLAIR, SeriesClass.T1C)
    monkeypatch.setenv(ENV_RULES_PATH, str(tmp_path / "nowhere.yaml"))
    with pytest.raises(SeriesRulesError, match=ENV_RULES_PATH):
        default_rules_path()


def test_packaged_copy_is_the_last_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_RULES_PATH, raising=False)
    packaged = tmp_path / "packaged.yaml"
    shutil.copy(REPO_RULES_PATH, packaged)
    monkeypatch.setattr(rules_module, "REPO_RULES_PATH", tmp_path / "no_repo.yaml")
    monkeypatch.setattr(rules_module, "PACKAGED_RULES_PATH", packaged)
    assert default_rules_path() == packaged
    monkeypatch.setattr(rules_module, "PACKAGED_RULES_PATH", tmp_path / "no_package.yaml")
    with pytest.raises(SeriesRulesError, match="no series rules file found"):
        default_rules_path()


# --------------------------------------------------------------------------------------------
# Classification from attributes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("description", "te", "expected"),
    [
        ("3D SAG FLAIR 1mm", 387.0, SeriesClass.FLAIR),
        ("t2_space_dark-fluid_sag", 390.0, SeriesClass.FLAIR),
        ("AX T2 FLAIR", 120.0, SeriesClass.FLAIR),
        ("t1_flair_ax", 12.0, SeriesClass.T1),
        ("3D_T1_MPRAGE", 3.0, SeriesClass.T1),
        ("sag T1W 3D TFE", 3.5, SeriesClass.T1),
        ("AX T1 SE +C", 12.0, SeriesClass.T1C),
        ("ax_t1_mprage_post", 3.0, SeriesClass.T1C),
        ("T1 pre contrast", 12.0, SeriesClass.T1),
        ("AX T2 TSE", 90.0, SeriesClass.T2),
        ("AX PD/T2 TSE", 12.0, SeriesClass.PD),
        ("AX PD/T2 TSE", 90.0, SeriesClass.T2),
        ("AX PD TSE 3mm", 12.0, SeriesClass.PD),
        ("AX T2* GRE", 20.0, SeriesClass.OTHER),
        ("SWI_Images", 20.0, SeriesClass.OTHER),
        ("ep2d_diff_3scan_trace", 90.0, SeriesClass.OTHER),
        ("3D DIR SPACE", 300.0, SeriesClass.OTHER),
        ("ST10 calibration", None, SeriesClass.OTHER),
    ],
)
def test_classification_by_description(
    rules: SeriesRules, description: str, te: float | None, expected: SeriesClass
) -> None:
    series_class, reason = classify(
        SeriesAttributes(description=description, echo_time_ms=te), rules
    )
    assert series_class is expected, reason
    if expected is not SeriesClass.OTHER:
        assert "rule " in reason and "SeriesDescription" in reason


@pytest.mark.parametrize(
    ("attrs", "expected", "rule"),
    [
        (
            dict(
                scanning_sequence=("SE", "IR"),
                inversion_recovery=True,
                inversion_time_ms=2500.0,
                echo_time_ms=120.0,
                repetition_time_ms=9000.0,
            ),
            SeriesClass.FLAIR,
            "flair_by_timing",
        ),
        (
            dict(
                scanning_sequence=("GR", "IR"),
                inversion_recovery=True,
                inversion_time_ms=900.0,
                echo_time_ms=3.0,
                repetition_time_ms=2300.0,
            ),
            SeriesClass.T1,
            "t1_inversion_prepared",
        ),
        (
            dict(scanning_sequence=("SE",), echo_time_ms=12.0, repetition_time_ms=500.0),
            SeriesClass.T1,
            "t1_by_timing",
        ),
        (
            dict(scanning_sequence=("SE",), echo_time_ms=100.0, repetition_time_ms=4000.0),
            SeriesClass.T2,
            "t2_by_timing",
        ),
        (
            dict(scanning_sequence=("SE",), echo_time_ms=15.0, repetition_time_ms=3000.0),
            SeriesClass.PD,
            "pd_by_timing",
        ),
        (
            dict(scanning_sequence=("EP",), echo_time_ms=90.0, repetition_time_ms=6000.0),
            SeriesClass.OTHER,
            "other_echo_planar",
        ),
        (dict(acquisition_contrast="DIFFUSION"), SeriesClass.OTHER, "other_by_acquisition"),
        (dict(acquisition_contrast="PROTON_DENSITY"), SeriesClass.PD, "pd_by_acquisition"),
        (
            dict(
                echo_time_ms=12.0,
                repetition_time_ms=500.0,
                contrast_agent="GADOVIST",
            ),
            SeriesClass.T1C,
            "t1_by_timing",
        ),
        (
            dict(echo_time_ms=12.0, repetition_time_ms=500.0, contrast_agent="none"),
            SeriesClass.T1,
            "t1_by_timing",
        ),
        (
            dict(echo_time_ms=3.0, repetition_time_ms=8.0, contrast_administered=True),
            SeriesClass.T1C,
            "t1_by_timing",
        ),
        (dict(echo_time_ms=12.0), SeriesClass.OTHER, "no classification rule"),
    ],
)
def test_classification_by_physics_when_names_say_nothing(
    rules: SeriesRules, attrs: dict[str, Any], expected: SeriesClass, rule: str
) -> None:
    series_class, reason = classify(SeriesAttributes(**attrs), rules)
    assert series_class is expected, reason
    assert rule in reason


def test_post_contrast_by_agent_can_be_switched_off(tmp_path: Path) -> None:
    site = load_series_rules(
        _write_rules(tmp_path, _set("post_contrast.use_contrast_agent_attribute", False))
    )
    attrs = SeriesAttributes(description="T1 SE AX", contrast_agent="DOTAREM")
    assert classify(attrs, site)[0] is SeriesClass.T1
    assert classify(dataclasses.replace(attrs, description="T1 SE AX GD"), site)[0] is (
        SeriesClass.T1C
    )


@pytest.mark.parametrize(
    ("attrs", "modality", "n_slices", "category"),
    [
        (dict(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "MR", 3, SkipCategory.LOCALIZER),
        (dict(description="Survey_SHC"), "MR", 30, SkipCategory.LOCALIZER),
        (dict(description="AAHead_Scout_32ch"), "MR", 128, SkipCategory.LOCALIZER),
        (dict(image_type=("DERIVED", "PRIMARY", "ADC")), "MR", 30, SkipCategory.DERIVED),
        (dict(image_type=("ORIGINAL", "SECONDARY")), "MR", 30, SkipCategory.DERIVED),
        (dict(image_type=("ORIGINAL", "PRIMARY", "MPR")), "MR", 30, SkipCategory.DERIVED),
        (dict(description="FLAIR_MPR_COR"), "MR", 30, SkipCategory.DERIVED),
        (dict(description="FLAIR 3D reformatted"), "MR", 30, SkipCategory.DERIVED),
        (dict(description="AX T2"), "MR", 5, SkipCategory.TOO_FEW_SLICES),
        (dict(description="lesions"), "SEG", 40, SkipCategory.MODALITY),
        (dict(description="3D T1 MPRAGE SAG"), "MR", 176, None),
    ],
)
def test_skip_reasons(
    rules: SeriesRules,
    attrs: dict[str, Any],
    modality: str,
    n_slices: int,
    category: SkipCategory | None,
) -> None:
    found = skip_reason(SeriesAttributes(**attrs), modality, n_slices, rules)
    assert (found[0] if found else None) is category


def test_keep_flags_stop_skipping(rules: SeriesRules) -> None:
    keep = rules.model_copy(
        update={
            "skip": rules.skip.model_copy(
                update={
                    "localizer": rules.skip.localizer.model_copy(update={"keep": True}),
                    "derived": rules.skip.derived.model_copy(update={"keep": True}),
                }
            )
        }
    )
    localizer = SeriesAttributes(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    derived = SeriesAttributes(image_type=("DERIVED", "SECONDARY", "MPR"), description="FL MPR")
    assert skip_reason(localizer, "MR", 30, keep) is None
    assert skip_reason(derived, "MR", 30, keep) is None


# --------------------------------------------------------------------------------------------
# Selection (synthetic inventories)
# --------------------------------------------------------------------------------------------
def _info(
    series_class: SeriesClass,
    number: int,
    *,
    acq: str = "3D",
    thickness: float = 1.0,
    frames: int = 176,
    derived: bool = False,
    skipped: str | None = None,
    study: str = "1.2.3",
) -> SeriesInfo:
    image_type = ("DERIVED", "SECONDARY", "MPR") if derived else ("ORIGINAL", "PRIMARY")
    return SeriesInfo(
        series_instance_uid=f"{study}.{number}",
        study_instance_uid=study,
        series_number=number,
        description=f"{series_class.value} {number}",
        modality="MR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        files=(Path(f"/data/{number}/IM0001.dcm"),),
        n_instances=frames,
        n_frames=frames,
        attributes=SeriesAttributes(
            description=f"{series_class.value} {number}",
            image_type=image_type,
            mr_acquisition_type=acq,
            slice_thickness_mm=thickness,
        ),
        series_class=series_class,
        reason="rule 'test'",
        skipped_reason=skipped,
        skip_category=SkipCategory.DERIVED if skipped else None,
    )


def test_selection_prefers_3d_then_thinner_then_more_slices_then_later(
    rules: SeriesRules,
) -> None:
    flair_2d = _info(SeriesClass.FLAIR, 900, acq="2D", thickness=5.0, frames=24)
    flair_3d = _info(SeriesClass.FLAIR, 200)
    t2_thick = _info(SeriesClass.T2, 400, acq="2D", thickness=5.0, frames=24)
    t2_thin = _info(SeriesClass.T2, 300, acq="2D", thickness=3.0, frames=50)
    t1_a = _info(SeriesClass.T1, 500)
    t1_b = _info(SeriesClass.T1, 501)
    pd_more = _info(SeriesClass.PD, 600, acq="2D", thickness=3.0, frames=50)
    pd_fewer = _info(SeriesClass.PD, 601, acq="2D", thickness=3.0, frames=40)
    inv = StudyInventory((flair_2d, flair_3d, t2_thick, t2_thin, t1_a, t1_b, pd_more, pd_fewer))
    sel = select_series(inv, rules)
    assert sel.reference is flair_3d
    assert "3D rather than 2D" in sel.choices[SeriesClass.FLAIR].why
    assert "#900" in sel.choices[SeriesClass.FLAIR].why
    assert sel.choices[SeriesClass.FLAIR].alternatives == (flair_2d,)
    assert sel.series(SeriesClass.T2) is t2_thin
    assert "thinner slices" in sel.choices[SeriesClass.T2].why
    assert sel.series(SeriesClass.T1) is t1_b
    assert "later series" in sel.choices[SeriesClass.T1].why
    assert sel.series(SeriesClass.PD) is pd_more
    assert "more slices" in sel.choices[SeriesClass.PD].why
    assert sel.missing == (SeriesClass.T1C,)
    assert sel.series(SeriesClass.T1C) is None
    json.dumps(sel.to_json())


def test_preference_by_class_and_kept_derived(rules: SeriesRules) -> None:
    selection = rules.selection.model_copy(
        update={"preference_by_class": {SeriesClass.T1: ("earlier_series",)}}
    )
    site = rules.model_copy(update={"selection": selection})
    flair = _info(SeriesClass.FLAIR, 200)
    flair_mpr = _info(SeriesClass.FLAIR, 1200, derived=True, frames=300)
    t1_a, t1_b = _info(SeriesClass.T1, 500), _info(SeriesClass.T1, 501)
    sel = select_series(StudyInventory((flair, flair_mpr, t1_a, t1_b)), site)
    assert sel.reference is flair
    assert "original rather than derived" in sel.choices[SeriesClass.FLAIR].why
    assert sel.series(SeriesClass.T1) is t1_a


def test_selection_errors_have_their_reasons(rules: SeriesRules) -> None:
    t1 = _info(SeriesClass.T1, 300)
    skipped_flair = _info(SeriesClass.FLAIR, 1200, skipped="derived or secondary image")
    with pytest.raises(SeriesSelectionError) as info:
        select_series(StudyInventory((t1, skipped_flair)), rules)
    assert info.value.reason == "required_series_missing"
    assert "no FLAIR series" in str(info.value)
    assert "#1200" in str(info.value)  # the skipped FLAIR is named, with why
    with pytest.raises(SeriesSelectionError) as info:
        select_series(StudyInventory((skipped_flair,)), rules)
    assert info.value.reason == "no_usable_series"
    with pytest.raises(SeriesSelectionError) as info:
        select_series(StudyInventory(()), rules)
    assert info.value.reason == "no_usable_series"
    two = StudyInventory((_info(SeriesClass.FLAIR, 1, study="1.1"), _info(SeriesClass.FLAIR, 1)))
    with pytest.raises(SeriesSelectionError) as info:
        select_series(two, rules)
    assert info.value.reason == "multiple_studies"
    assert select_series(two, rules, "1.1").study_instance_uid == "1.1"
    with pytest.raises(SeriesSelectionError) as info:
        select_series(two, rules, "9.9")
    assert info.value.reason == "study_not_found"


def test_site_requirement_from_env_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _write_rules(tmp_path, _set("selection.required", ["FLAIR", "T1C"]))
    monkeypatch.setenv(ENV_RULES_PATH, str(site))
    inv = StudyInventory((_info(SeriesClass.FLAIR, 200), _info(SeriesClass.T1, 300)))
    with pytest.raises(SeriesSelectionError, match="no T1C series"):
        select_series(inv)


# --------------------------------------------------------------------------------------------
# Real headers: Philips Enhanced MR, pydicom's MR700, built cases
# --------------------------------------------------------------------------------------------
def test_philips_enhanced_header_is_t1_from_functional_groups(
    tmp_path: Path, rules: SeriesRules
) -> None:
    path = tmp_path / "philips.dcm"
    with gzip.open(philips_mprage_source()) as fh:
        path.write_bytes(fh.read())
    inv = inventory([tmp_path], rules)
    (series,) = inv.series
    assert series.series_class is SeriesClass.T1 and series.usable
    assert (series.n_instances, series.n_frames) == (1, 176)
    a = series.attributes
    assert a.echo_time_ms == pytest.approx(3.513)  # per-frame MREchoSequence
    assert a.repetition_time_ms == pytest.approx(7.5693, abs=1e-3)  # shared MR timing
    assert a.acquisition_contrast == "T1" and a.sequence_name == "T1TFE"
    assert a.scanning_sequence == ("GR",)  # rebuilt from EchoPulseSequence
    assert a.mr_acquisition_type == "3D" and not a.inversion_recovery
    with pytest.raises(SeriesSelectionError, match="no FLAIR series") as info:
        select_series(inv, rules)
    assert info.value.reason == "required_series_missing"


def test_mr700_is_one_series_of_non_parallel_projections(rules: SeriesRules) -> None:
    files = dicom_files(mr700_path())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert len(files) == 7
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, 8))
    normals = [
        np.cross(*np.asarray(h.ImageOrientationPatient, dtype=float).reshape(2, 3)) for h in headers
    ]
    angles = [np.degrees(np.arccos(np.clip(abs(n @ normals[0]), 0, 1))) for n in normals]
    assert max(angles) > 80.0  # a fan of planes, not a stack
    inv = inventory([mr700_path()], rules)
    (series,) = inv.series
    assert series.skip_category is SkipCategory.DERIVED
    assert "PROJECTION IMAGE" in (series.skipped_reason or "") or "DERIVED" in (
        series.skipped_reason or ""
    )
    with pytest.raises(SeriesSelectionError) as info:
        select_series(inv, rules)
    assert info.value.reason == "no_usable_series"


def test_localizer_only_study(tmp_path: Path, rules: SeriesRules) -> None:
    folder = localizer_only_study(tmp_path / "study")
    files = dicom_files(folder)
    assert len(files) == 9
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert {tuple(h.ImageType) for h in headers} == {("ORIGINAL", "PRIMARY", "LOCALIZER")}
    assert {h.SeriesDescription for h in headers} == {"3-plane localizer"}
    normals = {
        tuple(np.round(np.abs(np.cross(*np.asarray(h.ImageOrientationPatient).reshape(2, 3)))))
        for h in headers
    }
    assert normals == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
    inv = inventory([tmp_path / "study"], rules)
    (series,) = inv.series
    assert series.skip_category is SkipCategory.LOCALIZER
    with pytest.raises(SeriesSelectionError) as info:
        select_series(inv, rules)
    assert info.value.reason == "no_usable_series"
    assert "localizer" in str(info.value)
    if HAS_DCIODVFY:
        assert not _dciodvfy_errors(files[0])


def test_non_dicom_files_are_ignored_with_a_warning(
    tmp_path: Path, rules: SeriesRules, caplog: pytest.LogCaptureFixture
) -> None:
    localizer_only_study(tmp_path)
    (tmp_path / "README.txt").write_text("not DICOM\n", encoding="utf-8")
    dicomdir = mr700_path().parents[1] / "DICOMDIR"
    shutil.copy(dicomdir, tmp_path / "DICOMDIR")
    with caplog.at_level(logging.WARNING, logger="ms_forecast_node.assemble.inventory"):
        inv = inventory([tmp_path], rules)
    assert len(inv.series) == 1
    reasons = {f.path.name: f.reason for f in inv.ignored}
    assert reasons["README.txt"] == "not a DICOM file"
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert sum("README.txt" in r.getMessage() for r in caplog.records) == 1
    json.dumps(inv.to_json())


@pytest.mark.slow
def test_philips_mprage_with_template_pixels(tmp_path: Path, rules: SeriesRules) -> None:
    path = philips_mprage_with_pixels(tmp_path)
    with gzip.open(philips_mprage_source()) as fh:
        original = pydicom.dcmread(io.BytesIO(fh.read()))
    filled = pydicom.dcmread(path)
    assert filled.SOPInstanceUID != original.SOPInstanceUID
    assert filled.SeriesInstanceUID == original.SeriesInstanceUID
    for a, b in zip(
        original.PerFrameFunctionalGroupsSequence,
        filled.PerFrameFunctionalGroupsSequence,
        strict=True,
    ):
        for macro, keyword in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ):
            assert a[macro][0][keyword].value == b[macro][0][keyword].value
    pixels = filled.pixel_array
    assert pixels.shape == (176, 256, 256)
    assert 0.05 < float((pixels > 0).mean()) < 0.5  # a brain in a head-sized field of view
    assert 2000 < int(pixels.max()) <= 4095  # fits Bits Stored 12
    (series,) = inventory([tmp_path], rules).series
    assert series.series_class is SeriesClass.T1 and series.usable
    if HAS_DCIODVFY:
        # No error beyond those the vendor header already has.
        source = tmp_path / "original.dcm"
        original.save_as(source)
        assert _dciodvfy_errors(path) <= _dciodvfy_errors(source)


# --------------------------------------------------------------------------------------------
# The simulated study
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_series_of_the_simulated_study_is_classified(
    simulated_study: tuple[Path, dict[str, Any]], rules: SeriesRules
) -> None:
    out, manifest = simulated_study
    inv = inventory([out / "dicom"], rules)
    assert not inv.ignored
    expected = {
        s["series_instance_uid"]: (s["sequence"], s["n_files"], s["multiframe"])
        for v in manifest["visits"]
        for s in v["series"]
    }
    assert {s.series_instance_uid for s in inv.series} == set(expected)
    for s in inv.series:
        sequence, n_files, multiframe = expected[s.series_instance_uid]
        assert s.series_class.value == sequence, s.reason
        assert s.usable and s.skipped_reason is None
        assert s.n_instances == n_files and s.is_multiframe == multiframe
        assert "SeriesDescription" in s.reason
    assert len(inv.study_instance_uids) == 2
    for visit in manifest["visits"]:
        sel = select_series(inv, rules, visit["study_instance_uid"])
        assert sel.reference.is_multiframe
        assert sel.reference.series_class is SeriesClass.FLAIR
        assert set(sel.choices) == {
            SeriesClass.FLAIR,
            SeriesClass.T1,
            SeriesClass.T2,
            SeriesClass.PD,
        }
        assert sel.missing == (SeriesClass.T1C,)
        state = json.loads(json.dumps(sel.to_json()))
        assert state["chosen"]["FLAIR"]["series_instance_uid"] == sel.reference.series_instance_uid
        assert "only FLAIR candidate" in state["chosen"]["FLAIR"]["why"]
    with pytest.raises(SeriesSelectionError) as info:
        select_series(inv, rules)
    assert info.value.reason == "multiple_studies"


@pytest.mark.slow
def test_simulated_series_classify_by_physics_alone(
    simulated_study: tuple[Path, dict[str, Any]], rules: SeriesRules
) -> None:
    inv = inventory([_visit_dir(simulated_study)], rules)
    flair = inv.by_class(SeriesClass.FLAIR)[0].attributes
    # Enhanced MR values come from the functional groups.
    assert (flair.echo_time_ms, flair.repetition_time_ms, flair.inversion_time_ms) == (
        387.0,
        5000.0,
        1800.0,
    )
    assert flair.inversion_recovery and flair.mr_acquisition_type == "3D"
    assert flair.acquisition_contrast == "FLUID_ATTENUATED"
    for s in inv.series:
        anonymous = dataclasses.replace(
            s.attributes, description="", protocol_name="", acquisition_contrast=None
        )
        series_class, reason = classify(anonymous, rules)
        assert series_class is s.series_class, reason
        assert "_by_timing" in reason or "inversion_prepared" in reason


@pytest.mark.slow
def test_study_without_flair(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path, rules: SeriesRules
) -> None:
    src = _visit_dir(simulated_study)
    dst = study_without_flair(src, tmp_path / "no_flair")
    assert sorted(p.name for p in dst.iterdir()) == [
        "02_t1_3d_mprage",
        "03_t2_ax_tse",
        "04_pd_ax_tse",
    ]
    t2 = "03_t2_ax_tse"
    for a, b in zip(dicom_files(src / t2), dicom_files(dst / t2), strict=True):
        assert a.read_bytes() == b.read_bytes()
    inv = inventory([dst], rules)
    assert {s.series_class for s in inv.series} == {SeriesClass.T1, SeriesClass.T2, SeriesClass.PD}
    with pytest.raises(SeriesSelectionError) as info:
        select_series(inv, rules)
    assert info.value.reason == "required_series_missing"
    assert "no FLAIR series" in str(info.value)


@pytest.mark.slow
def test_derived_reformat_is_skipped_unless_kept(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path, rules: SeriesRules
) -> None:
    visit = _visit_dir(simulated_study)
    flair_dir = _series_dir(simulated_study, "FLAIR")
    written = derived_copy(flair_dir, tmp_path / "flair_mpr")
    # An ORIGINAL-typed reformat is still recognised by its name.
    derived_copy(
        _series_dir(simulated_study, "T2"),
        tmp_path / "t2_reformat",
        image_type=("ORIGINAL", "PRIMARY", "OTHER"),
        description_suffix=" COR MPR",
    )
    inv = inventory([visit, tmp_path], rules)
    mpr = next(s for s in inv.series if s.files == tuple(written))
    assert mpr.series_class is SeriesClass.FLAIR  # still classified, for the record
    assert mpr.skip_category is SkipCategory.DERIVED
    assert "DERIVED" in (mpr.skipped_reason or "")
    t2_mpr = next(s for s in inv.series if s.description.endswith("COR MPR"))
    assert t2_mpr.skip_category is SkipCategory.DERIVED
    assert "MPR" in (t2_mpr.skipped_reason or "")
    sel = select_series(inv, rules)
    assert sel.reference.series_instance_uid != mpr.series_instance_uid
    keep = rules.model_copy(
        update={
            "skip": rules.skip.model_copy(
                update={"derived": rules.skip.derived.model_copy(update={"keep": True})}
            )
        }
    )
    inv_keep = inventory([visit, tmp_path], keep)
    sel_keep = select_series(inv_keep, keep)
    assert len(inv_keep.by_class(SeriesClass.FLAIR)) == 2
    assert not sel_keep.reference.derived
    assert "original rather than derived" in sel_keep.choices[SeriesClass.FLAIR].why
    # A reformat recognised by its name only ranks after the original too.
    assert not sel_keep.choices[SeriesClass.T2].series.derived
    assert sel_keep.choices[SeriesClass.T2].alternatives[0].description.endswith("COR MPR")


# --------------------------------------------------------------------------------------------
# Case builders do what they claim
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_series_with_missing_slice(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    src = _series_dir(simulated_study, "PD")
    case = series_with_missing_slice(src, tmp_path / "pd")
    n_src = len(dicom_files(src))
    assert len(case.files) == n_src - 1 == len(dicom_files(case.folder))
    assert case.dropped_instance_number == n_src // 2 + 1
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in case.files]
    positions = np.array([np.asarray(h.ImagePositionPatient, dtype=float) for h in headers])
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    spacing = float(np.median(steps))
    assert np.sum(steps > 1.5 * spacing) == 1
    assert steps.max() == pytest.approx(2 * spacing, rel=1e-3)
    assert all(
        tuple(np.asarray(h.ImagePositionPatient, dtype=float)) != case.dropped_position
        for h in headers
    )


@pytest.mark.slow
@pytest.mark.parametrize("sequence", ["PD", "FLAIR"])  # classic and Enhanced MR multi-frame
@pytest.mark.parametrize(
    "transfer_syntax", LOSSLESS_TRANSFER_SYNTAXES, ids=lambda ts: ts.keyword or str(ts)
)
def test_encoded_series_are_compressed_and_lossless(
    simulated_study: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    rules: SeriesRules,
    sequence: str,
    transfer_syntax: str,
) -> None:
    src = _series_dir(simulated_study, sequence)
    written = encode_series(src, tmp_path / "encoded", transfer_syntax)
    sources = dicom_files(src)
    assert [p.name for p in written] == [p.name for p in sources]
    for a, b in zip(sources, written, strict=True):
        original, encoded = pydicom.dcmread(a), pydicom.dcmread(b)
        assert encoded.file_meta.TransferSyntaxUID == transfer_syntax
        assert encoded.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(encoded.pixel_array, original.pixel_array)
    (series,) = inventory([tmp_path / "encoded"], rules).series
    assert series.series_class.value == sequence and series.usable
