"""Installed wheels carry copies of the institution-editable templates; they must not drift."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "src" / "ms_forecast_node" / "data" / "dicom_templates"


@pytest.mark.parametrize("path", sorted(PACKAGED.glob("*")), ids=lambda p: p.name)
def test_packaged_template_equals_the_editable_one(path: Path) -> None:
    editable = REPO / "dicom_templates" / path.name
    assert editable.is_file(), f"{path.name} has no editable original in dicom_templates/"
    assert path.read_bytes() == editable.read_bytes(), (
        f"{path} differs from dicom_templates/{path.name}: copy the edited file over"
    )


def test_every_editable_template_is_packaged() -> None:
    names = {p.name for p in (REPO / "dicom_templates").glob("*.yaml")}
    assert names <= {p.name for p in PACKAGED.glob("*")}
