"""Preprocessing a simulated study: registration accuracy, lesion masks, prior visit, QC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from ms_forecast_node.errors import RegistrationError
from ms_forecast_node.forecast.data import model_grid
from ms_forecast_node.image.lesion_mask import LesionMaskSource
from ms_forecast_node.image.preprocess import PreprocessedStudy, preprocess
from ms_forecast_node.image.registration import register_to_template
from ms_forecast_node.image.series import SeriesVolume
from ms_forecast_node.pipeline.visits import load_visits
from ms_forecast_node.simulate.cohort import load_nifti
from ms_forecast_node.simulate.protocols import MRSequence

CROP = (72, 88, 72)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def _truth(root: Path, manifest: dict[str, Any], visit: str, name: str) -> np.ndarray:
    array, _ = load_nifti(root / "truth" / "patients" / manifest["patient_id"] / visit / name)
    _, slices = model_grid(2.0, CROP)
    return np.asarray(array[slices])


def _pose(root: Path, manifest: dict[str, Any], visit: int) -> np.ndarray:
    patient = json.loads(
        (root / "truth" / "patients" / manifest["patient_id"] / "patient.json").read_text()
    )
    t = patient["transforms"]
    return np.asarray(t["visit_poses_lps"][visit]) @ np.asarray(t["head_affine_lps"])


@pytest.fixture(scope="module")
def preprocessed(simulated_study: tuple[Path, dict[str, Any]]) -> PreprocessedStudy:
    root, _ = simulated_study
    visits = load_visits(root / "dicom")
    grid, _ = model_grid(2.0, CROP)
    return preprocess(visits.current, grid, prior=visits.prior)


@pytest.mark.slow
def test_registration_matches_the_simulated_head_pose(
    preprocessed: PreprocessedStudy, simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    root, manifest = simulated_study
    pose = _pose(root, manifest, 1)
    points = np.array([[0.0, 0.0, 0.0], [50.0, -40.0, 30.0], [-50.0, 40.0, -30.0], [0, 60, -20]])
    transform = preprocessed.mapping.template_to_reference
    found = np.array([transform.TransformPoint(p.tolist()) for p in points])
    true = points @ pose[:3, :3].T + pose[:3, 3]
    assert np.linalg.norm(found - true, axis=1).max() < 1.5  # mm
    assert preprocessed.quality.head_dice > 0.85


@pytest.mark.slow
def test_model_grid_images_match_the_training_images(
    preprocessed: PreprocessedStudy, simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    root, manifest = simulated_study
    for sequence, name in (
        (MRSequence.FLAIR, "flair"),
        (MRSequence.T1, "t1"),
        (MRSequence.T2, "t2"),
    ):
        ours = preprocessed.sequences[sequence]
        assert ours is not None
        truth = _truth(root, manifest, "followup", f"{name}.nii.gz")
        assert np.corrcoef(ours.ravel(), truth.ravel())[0, 1] > 0.95, name
    assert preprocessed.sequences[MRSequence.PD] is not None  # PD chosen too, it is in the study


@pytest.mark.slow
def test_lesion_masks_of_both_visits(
    preprocessed: PreprocessedStudy, simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    root, manifest = simulated_study
    current = _truth(root, manifest, "followup", "lesions.nii.gz") > 0
    assert preprocessed.lesion_source is LesionMaskSource.BUILTIN_SEGMENTER
    assert _dice(preprocessed.lesion_mask, current) > 0.55
    prior = preprocessed.prior
    assert prior is not None
    assert prior.interval_weeks == pytest.approx(48.0)
    baseline = _truth(root, manifest, "baseline", "lesions.nii.gz") > 0
    assert _dice(prior.lesion_mask, baseline) > 0.55
    flair = _truth(root, manifest, "baseline", "flair.nii.gz")
    assert np.corrcoef(prior.flair.ravel(), flair.ravel())[0, 1] > 0.95


@pytest.mark.slow
def test_mapping_back_is_one_call(preprocessed: PreprocessedStudy) -> None:
    mapping = preprocessed.mapping
    native = mapping.mask_to_reference(preprocessed.lesion_mask)
    assert native.shape == mapping.reference.grid.shape
    # The model-grid mask and the native one describe the same lesions.
    again = mapping.to_model_grid(native.astype(np.float32)) >= 0.5
    assert _dice(again, preprocessed.lesion_mask) > 0.8


@pytest.mark.slow
def test_incoming_lesion_seg_is_used(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path, preprocessed: PreprocessedStudy
) -> None:
    root, _ = simulated_study
    study = tmp_path / "study"
    shutil.copytree(root / "dicom" / "followup", study)
    reference = preprocessed.mapping.reference
    # A radiologist's lesion SEG: here the built-in mask, stored as DICOM SEG on the FLAIR.
    mask = preprocessed.lesion_mask_native
    seg = hd.seg.Segmentation(
        source_images=reference.source_datasets(),
        pixel_array=reference.source_order(mask.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="T2 lesions",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(study / "lesions_seg.dcm")
    visits = load_visits(study)
    assert visits.current.lesion_seg is not None
    grid, _ = model_grid(2.0, CROP)
    result = preprocess(visits.current, grid)
    assert result.lesion_source is LesionMaskSource.INCOMING_SEG
    assert np.array_equal(result.lesion_mask_native, mask)


@pytest.mark.slow
def test_registration_quality_check_refuses_garbage(preprocessed: PreprocessedStudy) -> None:
    reference: SeriesVolume = preprocessed.mapping.reference
    rng = np.random.default_rng(0)
    # A volume with the right geometry but no head in it: smooth noise blobs.
    noise = sitk.SmoothingRecursiveGaussian(
        reference.grid.to_sitk(rng.random(reference.grid.shape, dtype=np.float32) * 1000), 8.0
    )
    with pytest.raises(RegistrationError) as info:
        register_to_template(noise, MRSequence.FLAIR)
    assert info.value.reason == "registration_quality_failed"
