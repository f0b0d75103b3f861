"""Output templates (dicom_templates/outputs.yaml, codes.yaml): loading, validation, UIDs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import UID

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.report.templates import (
    CODES_FILE,
    DEFAULT_TEMPLATES_DIR,
    LO_MAX,
    OUTPUTS_FILE,
    OutputKind,
    Templates,
    ascii_text,
    load_templates,
)
from ms_forecast_node.report.uids import UidRole, derive_uid, object_identity

from .report_fixtures import THERAPIES

DISCLAIMER_ASCII = "RESEARCH FORECAST - NOT FOR DIAGNOSTIC USE"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890"


@pytest.fixture(scope="module")
def templates() -> Templates:
    return load_templates()


def edited_copy(tmp_path: Path, file: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the shipped templates with ``edit`` applied to one file's YAML."""
    folder = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, folder)
    data = yaml.safe_load((folder / file).read_text(encoding="utf-8"))
    edit(data)
    (folder / file).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return folder


def test_shipped_templates_cover_every_therapy_of_the_model(templates: Templates) -> None:
    therapies_yaml = (
        Path(__file__).resolve().parents[1] / "src/ms_forecast_node/data/therapies.yaml"
    )
    codes = [t["code"] for t in yaml.safe_load(therapies_yaml.read_text())["therapies"]]
    assert set(codes) == set(THERAPIES) == set(templates.codes.therapies)
    assert set(templates.outputs.colours) >= set(codes)
    assert OutputKind.PROBABILITY_SEG not in templates.outputs.produce  # off by default
    assert "—" in templates.outputs.disclaimer
    assert templates.outputs.disclaimer_ascii == DISCLAIMER_ASCII


def test_local_scheme_is_declared_and_standard_codes_are_standard(templates: Templates) -> None:
    declared = {s.designator for s in templates.codes.coding_schemes}
    assert "99MSFN" in declared
    assert all(t.code.scheme == "99MSFN" for t in templates.codes.therapies.values())
    concepts = templates.codes.concepts
    assert (
        concepts.segmented_property_category.scheme,
        concepts.segmented_property_category.value,
    ) == ("SCT", "49755003")
    assert (concepts.segmented_property_type.scheme, concepts.segmented_property_type.value) == (
        "SCT",
        "52988006",
    )
    assert (concepts.volume.scheme, concepts.volume.value) == ("SCT", "118565006")


def test_every_series_description_fits_and_carries_the_disclaimer(templates: Templates) -> None:
    for kind in OutputKind:
        for therapy in THERAPIES if kind.per_therapy else (None,):
            text = templates.series_description(kind, therapy)
            assert len(text) <= LO_MAX
            assert text.endswith(DISCLAIMER_ASCII)
            assert text.isascii()


def test_series_numbers_are_distinct_per_object_series(templates: Templates) -> None:
    numbers = [
        templates.series_number(kind, therapy)
        for kind in OutputKind
        for therapy in (THERAPIES if kind.per_therapy else (None,))
    ]
    assert len(numbers) == len(set(numbers))


def test_uids_are_deterministic_valid_and_distinct(templates: Templates) -> None:
    root = templates.outputs.uid_root
    first = derive_uid(root, STUDY_UID, 1, OutputKind.SEG, "placebo", UidRole.INSTANCE)
    assert first == derive_uid(root, STUDY_UID, 1, OutputKind.SEG, "placebo", UidRole.INSTANCE)
    # A new study version supersedes the old results under the same UIDs.
    assert first == derive_uid(root, STUDY_UID, 2, OutputKind.SEG, "placebo", UidRole.INSTANCE)
    assert first.startswith(root) and len(first) <= 64 and UID(first).is_valid
    others = {
        derive_uid(root, STUDY_UID, 1, OutputKind.SR, "placebo", UidRole.INSTANCE),
        derive_uid(root, STUDY_UID, 1, OutputKind.SEG, "fingolimod", UidRole.INSTANCE),
        derive_uid(root, STUDY_UID, 1, OutputKind.SEG, "placebo", UidRole.SERIES),
        derive_uid(root, STUDY_UID + "1", 1, OutputKind.SEG, "placebo", UidRole.INSTANCE),
        derive_uid(root, STUDY_UID, 1, OutputKind.SEG, "placebo", UidRole.INSTANCE, 1),
    }
    assert first not in others and len(others) == 5


def test_key_image_instances_share_their_series(templates: Templates) -> None:
    a = object_identity(templates, STUDY_UID, 1, OutputKind.KEY_IMAGES, "placebo", 0)
    b = object_identity(templates, STUDY_UID, 1, OutputKind.KEY_IMAGES, "placebo", 1)
    assert a.series_instance_uid == b.series_instance_uid
    assert a.sop_instance_uid != b.sop_instance_uid
    assert (a.instance_number, b.instance_number) == (1, 2)


def test_custom_uid_root_and_cielab_colour(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["uid_root"] = "1.2.3.4."
        data["colours"]["placebo"] = {"cielab": [60.0, 40.0, 30.0]}

    templates = load_templates(edited_copy(tmp_path, OUTPUTS_FILE, edit))
    identity = object_identity(templates, STUDY_UID, 1, OutputKind.SR, "placebo")
    assert identity.sop_instance_uid.startswith("1.2.3.4.")
    lab = templates.colour("placebo").as_cielab()
    assert lab.lab == pytest.approx((60.0, 40.0, 30.0), abs=0.01)
    r, g, b = templates.colour("placebo").as_rgb()
    assert r > g > 0 and r > b


def _drop_colour(data: dict[str, Any]) -> None:
    del data["colours"]["natalizumab"]


def _unknown_key(data: dict[str, Any]) -> None:
    data["seg"]["segmnet_label"] = "typo"


def _bad_uid_root(data: dict[str, Any]) -> None:
    data["uid_root"] = "1.2.03.4"


def _long_description(data: dict[str, Any]) -> None:
    data["series"]["seg"]["description"] = "A VERY LONG SERIES DESCRIPTION {therapy}"


def _bad_placeholder(data: dict[str, Any]) -> None:
    data["series"]["sr"]["description"] = "SR {patient}"


def _grey_colour(data: dict[str, Any]) -> None:
    data["colours"]["placebo"] = {"rgb": [128, 128, 128]}


def _two_colours(data: dict[str, Any]) -> None:
    data["colours"]["placebo"] = {"rgb": [255, 0, 0], "cielab": [50, 10, 10]}


def _unknown_kind(data: dict[str, Any]) -> None:
    data["produce"] = ["seg", "movie"]


def _bad_window(data: dict[str, Any]) -> None:
    data["key_images"]["window_percentiles"] = [99, 1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_colour, "natalizumab"),
        (_unknown_key, "segmnet_label"),
        (_bad_uid_root, "uid_root"),
        (_long_description, "longer than 64"),
        (_bad_placeholder, "placeholder"),
        (_grey_colour, "grey"),
        (_two_colours, "exactly one"),
        (_unknown_kind, "produce"),
        (_bad_window, "window_percentiles"),
    ],
)
def test_bad_outputs_template_is_refused_with_a_clear_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    folder = edited_copy(tmp_path, OUTPUTS_FILE, edit)
    with pytest.raises(ConfigurationError, match=message) as info:
        load_templates(folder)
    assert info.value.reason == "configuration_invalid"


def _undeclared_scheme(data: dict[str, Any]) -> None:
    data["therapies"]["fingolimod"]["code"]["scheme"] = "99OTHER"


def _missing_concept(data: dict[str, Any]) -> None:
    del data["concepts"]["volume"]


def _non_ascii_short_label(data: dict[str, Any]) -> None:
    data["therapies"]["placebo"]["short_label"] = "PLACÉBO"


def _new_therapy_without_colour(data: dict[str, Any]) -> None:
    data["therapies"]["cladribine"] = {
        "label": "Cladribine",
        "short_label": "CLADRIBINE",
        "code": {"value": "MSFN-T07", "scheme": "99MSFN", "meaning": "Cladribine"},
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_undeclared_scheme, "99OTHER"),
        (_missing_concept, "concepts.volume"),
        (_non_ascii_short_label, "ASCII"),
        (_new_therapy_without_colour, "cladribine"),
    ],
)
def test_bad_codes_template_is_refused_with_a_clear_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_templates(edited_copy(tmp_path, CODES_FILE, edit))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_templates(tmp_path)
    folder = edited_copy(tmp_path, OUTPUTS_FILE, lambda data: None)
    (folder / OUTPUTS_FILE).write_text("uid_root: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_templates(folder)
    (folder / OUTPUTS_FILE).write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="mapping"):
        load_templates(folder)


def test_unknown_therapy_lookup_names_the_file(templates: Templates) -> None:
    with pytest.raises(ConfigurationError, match=r"codes\.yaml.*teriflunomide"):
        templates.therapy("teriflunomide")


def test_ascii_text_folds_dashes() -> None:
    assert ascii_text("A — B – C “q”") == 'A - B - C "q"'
