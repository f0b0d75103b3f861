"""benchmarks/activity_calibration.py: calibration in the large, against hand-computed values."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from .benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("activity_calibration")


def test_forecasts_low_on_average_show_as_negative_differences(bench: ModuleType) -> None:
    activity = np.array([0.2, 0.2, 0.6, 0.6])
    count = np.array([0.5, 0.5, 1.0, 2.0])
    true_count = np.array([0.0, 1.0, 3.0, 2.0])  # 3 of 4 active, mean 1.5
    out = bench.calibration_in_the_large(activity, count, true_count)
    assert out["patients"] == 4
    assert out["mean_probability_of_activity"] == pytest.approx(0.4)
    assert out["observed_share_active"] == pytest.approx(0.75)
    assert out["activity_minus_observed_mean_ci95"][0] == pytest.approx(-0.35)
    assert out["mean_expected_count"] == pytest.approx(1.0)
    assert out["count_minus_observed_mean_ci95"][0] == pytest.approx(-0.5)
    # ECE over 10 equal-width bins: bin 0.2 holds (0.2, 0.2) vs labels (0, 1): |0.2 - 0.5|;
    # bin 0.6 holds (0.6, 0.6) vs (1, 1): |0.6 - 1|; each half the patients.
    assert out["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.4)
