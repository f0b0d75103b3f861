"""Identity and provenance of every output object: UIDs, series, equipment, source patient.

UIDs are hashes of (study instance UID, therapy, object kind, role, index) under the
template's UID root (``pydicom.uid.generate_uid`` with ``entropy_srcs``). Building the outputs
of a study twice gives the same UIDs, and a PACS that receives them again replaces the objects
instead of storing duplicates. The study version is deliberately *not* hashed: when a later
series makes a new study version, its results supersede the old ones under the same UIDs
(the version is written inside every object), so the radiologist never sees two competing SEGs
of one therapy. Orthanc needs ``OverwriteInstances: true`` for that (deploy/orthanc/).

Provenance goes into every object the same way (docs/outputs.md): Manufacturer and friends
from the template, Software Versions = (package version, model name + version), and one
Contributing Equipment item (purpose "Processing Equipment") whose Contribution Description
names the model, its version and its sha256.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ms_forecast_node.report.inputs import Provenance
from ms_forecast_node.report.templates import OutputKind, Templates

#: Patient and General Study attributes copied verbatim from the reference series.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


class UidRole(str, enum.Enum):
    SERIES = "series"
    INSTANCE = "instance"


def derive_uid(
    root: str,
    study_instance_uid: str,
    study_version: int,
    kind: OutputKind,
    therapy: str | None,
    role: UidRole,
    index: int = 0,
) -> str:
    """One UID, a pure function of its arguments; ``study_version`` is accepted for the
    record but not hashed (see the module docstring)."""
    del study_version
    sources = [
        study_instance_uid,
        therapy if therapy is not None else "-",
        kind.value,
        role.value,
        str(index),
    ]
    return str(generate_uid(prefix=root, entropy_srcs=sources))


@dataclass(frozen=True)
class ObjectIdentity:
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    instance_number: int


def object_identity(
    templates: Templates,
    study_instance_uid: str,
    study_version: int,
    kind: OutputKind,
    therapy: str | None,
    index: int = 0,
) -> ObjectIdentity:
    """Identity of instance ``index`` (0-based) of the series of (``kind``, ``therapy``)."""
    root = templates.outputs.uid_root
    return ObjectIdentity(
        series_instance_uid=derive_uid(
            root, study_instance_uid, study_version, kind, therapy, UidRole.SERIES
        ),
        sop_instance_uid=derive_uid(
            root, study_instance_uid, study_version, kind, therapy, UidRole.INSTANCE, index
        ),
        series_number=templates.series_number(kind, therapy),
        series_description=templates.series_description(kind, therapy),
        instance_number=index + 1,
    )


def device_uid(templates: Templates, provenance: Provenance) -> str:
    """A stable UID for the forecasting model as an SR device observer."""
    sources = ["device", provenance.model_name, provenance.model_version, provenance.model_sha256]
    return str(generate_uid(prefix=templates.outputs.uid_root, entropy_srcs=sources))


def tracking_uid(templates: Templates, sop_instance_uid: str, what: str) -> str:
    """A stable tracking UID for a segment or measurement group inside one object."""
    return str(
        generate_uid(prefix=templates.outputs.uid_root, entropy_srcs=[sop_instance_uid, what])
    )


def contributing_equipment(
    templates: Templates, provenance: Provenance
) -> hd.ContributingEquipment:
    """The forecasting software and model, as processing equipment (SOP Common module)."""
    equipment = templates.outputs.equipment
    return hd.ContributingEquipment(
        manufacturer=equipment.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=provenance.model_name[:64],
        software_versions=provenance.software_versions,
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name or None,
        institutional_department_name=equipment.institutional_department_name or None,
        contribution_description=provenance.describe()[:1024],
    )


def stamp_equipment(dataset: Dataset, templates: Templates, provenance: Provenance) -> None:
    """General Equipment attributes naming this software, set on a built object.

    Set after construction rather than through highdicom's ``software_versions`` argument:
    highdicom 0.28 assigns that argument as a tuple, which pydicom 3 refuses for a
    multi-valued LO with a warning (a list is accepted).
    """
    equipment = templates.outputs.equipment
    dataset.Manufacturer = equipment.manufacturer
    dataset.ManufacturerModelName = equipment.manufacturer_model_name
    dataset.DeviceSerialNumber = equipment.device_serial_number
    dataset.SoftwareVersions = provenance.software_versions
    if equipment.institution_name:
        dataset.InstitutionName = equipment.institution_name
    if equipment.institutional_department_name:
        dataset.InstitutionalDepartmentName = equipment.institutional_department_name


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study attributes present in ``source`` (type 2 ones kept empty)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in target:
            setattr(target, keyword, "")
    for keyword in (
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword not in target:
            setattr(target, keyword, "")
