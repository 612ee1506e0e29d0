"""LBV on a known answer: the field of a sphere of susceptibility inside a harmonic background."""
import numpy as np
import pytest

from metaqsm_bids.qsm.background.lbv import lbv
from metaqsm_bids.qsm.core.dipole import forward_field_ppm


@pytest.fixture(scope="module")
def sphere_in_background():
    n, voxel = 64, (1.0, 1.0, 1.5)
    g = np.meshgrid(*[(np.arange(n) - n / 2) * v for v in voxel], indexing="ij")
    mask = g[0] ** 2 + g[1] ** 2 + g[2] ** 2 < 28 ** 2
    chi = np.zeros((n, n, n), np.float32)
    chi[(g[0] - 5) ** 2 + g[1] ** 2 + (g[2] - 3) ** 2 < 6 ** 2] = 0.2
    local = forward_field_ppm(chi, voxel, (0, 0, 1.0))
    # harmonic: x^2 - y^2, z, xy (each has zero Laplacian), 10-50x the local field
    background = (0.01 * (g[0] ** 2 - g[1] ** 2) + 0.3 * g[2] + 0.002 * g[0] * g[1]).astype(np.float32)
    return mask, voxel, local, background


def _relative_error(estimate, truth, mask):
    e = estimate[mask] - estimate[mask].mean()
    t = truth[mask] - truth[mask].mean()
    return np.linalg.norm(e - t) / np.linalg.norm(t)


def test_lbv_removes_a_harmonic_background(sphere_in_background):
    mask, voxel, local, background = sphere_in_background
    result = lbv(local + background, mask, voxel)
    # measured 0.059: what is left is the local field's own harmonic part, set to 0 on the boundary
    assert _relative_error(result.local_field, local, result.mask) < 0.08
    assert result.relative_residual < 1e-4 and result.iterations < 50
    # only the boundary and one peeled layer go
    assert result.mask.sum() > 0.75 * mask.sum() and not (result.mask & ~mask).any()
    assert not result.local_field[~result.mask].any()


def test_lbv_of_a_harmonic_field_alone_is_zero(sphere_in_background):
    mask, voxel, _, background = sphere_in_background
    result = lbv(background, mask, voxel, peel=0)
    assert np.abs(result.local_field[result.mask]).max() < 1e-3 * np.abs(background[mask]).max()


def test_lbv_refuses_a_mask_without_interior():
    mask = np.zeros((8, 8, 8), bool)
    mask[3, 3, :] = True
    with pytest.raises(ValueError, match="interior"):
        lbv(np.zeros((8, 8, 8), np.float32), mask, (1, 1, 1))
