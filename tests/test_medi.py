"""MEDI: finite differences, conjugate gradient, the edge mask, sphere phantoms, precision, input checks."""
import numpy as np
import pytest

from metaqsm_bids.qsm.core.dipole import forward_field_ppm
from metaqsm_bids.qsm.inversion.registry import INVERSIONS, invert
from metaqsm_bids.qsm.inversion.tkd import tkd
from metaqsm_bids.qsm.core.solvers import conjugate_gradient, gradient, gradient_adjoint
from metaqsm_bids.qsm.inversion.medi import edge_mask, medi
from tests.test_inversion import CASES, SPHERES, phantom

#: Echo spacing (s) and field (T) that set MEDI's lambda scale in these tests.
DELTA_TE, B0_TESLA = 0.005, 3.0


def _setup(case, field_noise=0.002, magnitude_noise=0.02):
    """Sphere phantom with a noisy field (ppm) and a magnitude darker in the spheres (1 - 2|chi|), noisy too."""
    shape, voxel, b0 = CASES[case]
    chi, mask, labels = phantom(shape, voxel)
    rng = np.random.default_rng(0)
    magnitude = ((1.0 - 2.0 * np.abs(chi)) + magnitude_noise * rng.standard_normal(shape)) * mask
    field = (forward_field_ppm(chi, voxel, b0) + field_noise * rng.standard_normal(shape)) * mask
    truth = chi - chi[mask].mean()

    def nrmse(x):
        return np.linalg.norm(x[mask] - truth[mask]) / np.linalg.norm(truth[mask])

    return field, mask, labels, truth, magnitude.astype(np.float32), voxel, b0, nrmse


def test_gradient_is_forward_difference_in_mm_and_adjoint_is_exact():
    """A ramp of slope s per voxel has gradient s / d (mm) except on the last plane; <G x, g> = <x, G^T g>."""
    voxel = (0.7, 1.1, 2.0)
    ramp = np.arange(10, dtype=np.float64).reshape(-1, 1, 1) * np.ones((10, 6, 5))
    grad = gradient(ramp, voxel)
    np.testing.assert_allclose(grad[0][:-1], 1 / 0.7)
    assert not grad[0][-1].any() and not grad[1].any() and not grad[2].any()
    rng = np.random.default_rng(2)
    x, g = rng.standard_normal((9, 7, 6)), rng.standard_normal((3, 9, 7, 6))
    assert np.vdot(gradient(x, voxel), g) == pytest.approx(np.vdot(x, gradient_adjoint(g, voxel)), rel=1e-12)


def test_conjugate_gradient_solves_spd_system():
    """30 x 30 SPD system: CG matches numpy's solve (relative 1e-8) and reports its residual."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 30))
    a = a @ a.T + 30 * np.eye(30)
    b = rng.standard_normal(30)
    x, iterations, residual = conjugate_gradient(lambda v: a @ v, b, 1e-12, 100)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8)
    assert 0 < iterations <= 30 and residual <= 1e-12
    _, capped, capped_residual = conjugate_gradient(lambda v: a @ v, b, 1e-12, 3)
    assert capped == 3 and capped_residual > residual


def test_edge_mask_marks_the_strongest_gradients():
    """With a noisy magnitude, edges (False) number edge_percentage x the mask voxels (0.9 -> 30 % of the
    components) and include the components across a sphere's surface, where the magnitude jumps by
    0.08-0.4: measured 99.0 % of them (noise of 2 % can hide the smallest jumps), 27 % of all in the mask."""
    field, mask, labels, _, magnitude, voxel, _, _ = _setup("isotropic")
    smooth = edge_mask(magnitude, mask, voxel)
    assert smooth.shape == (3, *mask.shape)
    assert np.count_nonzero(~smooth) == pytest.approx(0.9 * mask.sum(), abs=2)
    across = gradient((labels > 0).astype(np.float32), (1.0, 1.0, 1.0)) != 0
    assert np.mean(~smooth[across]) > 0.97
    assert np.mean(~smooth[:, mask]) < 0.35
    assert np.count_nonzero(~edge_mask(magnitude, mask, voxel, 0.3)) == pytest.approx(0.3 * mask.sum(), abs=2)
    assert edge_mask(magnitude, mask, voxel, 0.0).all()  # no edges: plain total variation


def test_medi_without_edges_blurs_what_the_edges_keep():
    """Without its edge mask (plain TV, ``edge_percentage=0``) MEDI still inverts the sphere phantom, less well:
    the edges are the magnitude's prior knowledge, an oracle here (the spheres' edges are the magnitude's).
    Measured NRMSE 0.077 with edges, 0.097 without."""
    field, mask, _, _, magnitude, voxel, b0, nrmse = _setup("isotropic")
    errors = [nrmse(medi(field, mask, voxel, b0, magnitude=magnitude, delta_te_s=DELTA_TE,
                         b0_tesla=B0_TESLA, edge_percentage=p)) for p in (0.9, 0.0)]
    assert errors[0] < errors[1] < 0.15


@pytest.mark.parametrize("case", list(CASES))
def test_medi_recovers_sphere_phantom(case):
    """Field noise 0.002 ppm, magnitude noise 2 %. Each sphere mean within 0.01 ppm of the truth
    (measured max 0.0014-0.0021), scale 0.97-1.02 (0.990-0.997), NRMSE < 0.15 (0.077-0.084; TKD
    0.43-0.45), in 2 Gauss-Newton steps. The data residual falls at each step. Oblique: B0 along k
    instead gives NRMSE 1.04."""
    field, mask, labels, truth, magnitude, voxel, b0, nrmse = _setup(case)
    info = {}
    est = invert("medi", field, mask, voxel, b0, magnitude=magnitude, delta_te_s=DELTA_TE, b0_tesla=B0_TESLA,
                 info=info)
    assert est.dtype == np.float32 and not est[~mask].any() and abs(est[mask].mean()) < 1e-6
    true_means = np.array([truth[labels == n].mean() for n in range(1, len(SPHERES) + 1)])
    est_means = np.array([est[labels == n].mean() for n in range(1, len(SPHERES) + 1)])
    np.testing.assert_allclose(est_means, true_means, atol=0.01)
    assert 0.97 <= np.dot(est_means, true_means) / np.dot(true_means, true_means) <= 1.02
    assert nrmse(est) < 0.15 and nrmse(est) < 0.3 * nrmse(tkd(field, mask, voxel, b0))
    residuals = info["DataResidual"]
    assert len(residuals) == info["Iterations"] + 1 == len(info["CGIterations"]) + 1
    assert all(later < earlier for earlier, later in zip(residuals, residuals[1:]))
    assert info["UpdateRatio"][-1] < 0.1 and info["Lambda"] == 1000.0
    if case == "anisotropic-oblique":
        wrong = medi(field, mask, voxel, (0.0, 0.0, 1.0), magnitude=magnitude, delta_te_s=DELTA_TE,
                     b0_tesla=B0_TESLA)
        assert nrmse(wrong) > 5 * nrmse(est)


def test_float32_agrees_with_float64():
    """Working precision: float32 and float64 maps differ by 2e-7 relative (tolerance 1e-4)."""
    field, mask, _, _, magnitude, voxel, b0, _ = _setup("anisotropic")
    kwargs = dict(magnitude=magnitude, delta_te_s=DELTA_TE, b0_tesla=B0_TESLA)
    single = medi(field, mask, voxel, b0, **kwargs)
    double = medi(field, mask, voxel, b0, dtype=np.float64, **kwargs)
    assert np.linalg.norm(single - double) < 1e-4 * np.linalg.norm(double)


def test_registered_and_rejects_bad_input():
    assert INVERSIONS["medi"].function is medi
    field, mask = np.zeros((8, 8, 8)), np.ones((8, 8, 8), bool)
    magnitude = np.ones((8, 8, 8))
    voxel = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="needs the magnitude"):
        medi(field, mask, voxel, delta_te_s=DELTA_TE, b0_tesla=B0_TESLA)
    with pytest.raises(ValueError, match="does not match"):
        medi(field, mask, voxel, magnitude=magnitude[:-1], delta_te_s=DELTA_TE, b0_tesla=B0_TESLA)
    with pytest.raises(ValueError, match="delta_te_s"):
        medi(field, mask, voxel, magnitude=magnitude, b0_tesla=B0_TESLA)
    with pytest.raises(ValueError, match="positive"):
        medi(field, mask, voxel, magnitude=magnitude, delta_te_s=DELTA_TE, b0_tesla=B0_TESLA, lambda_=0)
    with pytest.raises(ValueError, match="NaN"):
        medi(field, mask, voxel, magnitude=np.full((8, 8, 8), np.nan), delta_te_s=DELTA_TE, b0_tesla=B0_TESLA)
    with pytest.raises(ValueError, match="mask is empty"):
        medi(field, np.zeros_like(mask), voxel, magnitude=magnitude, delta_te_s=DELTA_TE, b0_tesla=B0_TESLA)
