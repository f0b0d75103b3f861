from __future__ import annotations

import numpy as np
import pytest

from ms_forecast_node.image.geometry import Grid, lps_to_ras, ras_to_lps


def test_ras_lps_round_trip() -> None:
    aff = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
    lps = ras_to_lps(aff)
    assert lps[0, 0] == -1 and lps[1, 1] == -1 and lps[0, 3] == 98
    np.testing.assert_allclose(lps_to_ras(lps), aff)


def test_grid_sitk_round_trip_keeps_geometry() -> None:
    rot = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
    grid = Grid.from_geometry((4, 5, 6), (0.5, 1.0, 3.0), (10.0, -20.0, 30.0), rot)
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(grid.shape)
    image = grid.to_sitk(data)
    back = Grid.from_sitk(image)
    assert back.same_as(grid)
    # Voxel (i=2, j=3, k=1) lands where SimpleITK puts it.
    expected = image.TransformIndexToPhysicalPoint((2, 3, 1))
    np.testing.assert_allclose(grid.index_to_world(np.array([[2, 3, 1]]))[0], expected)
    np.testing.assert_allclose(grid.world_to_index(np.array([expected]))[0], [2, 3, 1])


def test_grid_rejects_mismatched_array() -> None:
    grid = Grid.from_geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        grid.to_sitk(np.zeros((4, 3, 2), dtype=np.float32))
