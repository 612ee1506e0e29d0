"""TV-ADMM inversion: its gradient's adjoint, its first iteration (the closed-form L2), a piecewise-constant phantom
(where total variation is the right prior), the data term weighted by the magnitude (the same minimiser where the
weights are 1, scale-free in the magnitude, better where the magnitude marks the unreliable field), and actionable
errors."""
import numpy as np
import pytest

from metaqsm_bids.qsm.core.dipole import forward_field_ppm
from metaqsm_bids.qsm.inversion.l2 import l2
from metaqsm_bids.qsm.inversion.registry import INVERSIONS, invert
from metaqsm_bids.qsm.inversion.tkd import tkd
from metaqsm_bids.qsm.core.smv import erode_mask, smv_kernel
from metaqsm_bids.qsm.core.solvers import gradient, gradient_adjoint
from metaqsm_bids.qsm.inversion.tv import REFINE_MIN_RADIUS_VOXELS, RHO_PER_ALPHA, tv_admm, tv_refine
from tests.test_inversion import CASES, SPHERES, phantom


def test_circular_gradient_adjoint():
    """<G x, g> = <x, G^T g> to float64 rounding, anisotropic voxels; the wrap-around differences are there."""
    rng = np.random.default_rng(3)
    voxel = (0.7, 1.1, 2.0)
    x, g = rng.standard_normal((9, 8, 7)), rng.standard_normal((3, 9, 8, 7))
    grad = gradient(x, voxel, circular=True)
    assert np.vdot(grad, g) == pytest.approx(np.vdot(x, gradient_adjoint(g, voxel, circular=True)), rel=1e-12)
    np.testing.assert_allclose(grad[2][..., -1], (x[..., 0] - x[..., -1]) / voxel[2])


def test_first_iteration_is_the_closed_form_l2():
    """From z = u = 0 ADMM's first step is the closed-form L2 inversion with lambda = rho (to float32 rounding)."""
    shape, voxel, b0 = CASES["anisotropic-oblique"]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    alpha = 3e-4
    np.testing.assert_allclose(tv_admm(field, mask, voxel, b0, alpha=alpha, iterations=1),
                               l2(field, mask, voxel, b0, lambda_=RHO_PER_ALPHA * alpha), atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_tv_recovers_piecewise_constant_spheres_better_than_tkd_and_l2(case):
    """Noise-free field of the sphere phantom (piecewise constant: TV's prior). With the defaults (rho = 50 alpha),
    NRMSE against the truth (demeaned in the mask) measured 9-13 % (10-14 % with rho = 100 alpha) against TKD's 31-33 %
    and L2's 29-33 %; tolerance: below 0.6x the better of the two. Each sphere's mean within 0.015 ppm of its truth
    (measured at most 0.009)."""
    shape, voxel, b0 = CASES[case]
    chi, mask, labels = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    truth = chi - chi[mask].mean()
    info = {}
    est = invert("tv", field, mask, voxel, b0, info=info)
    assert est.dtype == np.float32 and not est[~mask].any() and abs(est[mask].mean()) < 1e-6
    assert info == {"Rho": pytest.approx(0.01)}

    def nrmse(x):
        return np.linalg.norm(x[mask] - truth[mask]) / np.linalg.norm(truth[mask])
    others = min(nrmse(tkd(field, mask, voxel, b0)), nrmse(l2(field, mask, voxel, b0)))
    assert nrmse(est) < 0.6 * others
    means = [est[labels == n].mean() - truth[labels == n].mean() for n in range(1, len(SPHERES) + 1)]
    assert np.abs(means).max() < 0.015


def test_weighted_tv_with_unit_weights_is_tv_admm():
    """On a box that is the whole mask (no padding) with a constant magnitude, the weights are 1 everywhere and the
    edge mask marks nothing: with mu = 1 the split's ``y - s`` stays the field, so each iterate is TV-ADMM's
    (y_k+1 - s_k+1 = (f + D chi + s_k) / 2 - (s_k + D chi - f) / 2 = f). Measured 2e-7 of the norm after 5 and 40
    iterations; bound 1e-5."""
    shape, voxel, b0 = (16, 16, 12), (0.9, 1.0, 1.6), (0.2, -0.1, 0.97)
    chi = np.zeros(shape, np.float32)
    chi[4:9, 5:11, 3:7], chi[10:14, 2:6, 6:10] = 0.1, -0.05
    mask = np.ones(shape, bool)
    field = forward_field_ppm(chi, voxel, np.asarray(b0) / np.linalg.norm(b0)).astype(np.float32)
    magnitude = np.full(shape, 3.0, np.float32)
    for iterations in (5, 40):
        plain = tv_admm(field, mask, voxel, b0, iterations=iterations, pad_voxels=0)
        weighted = tv_admm(field, mask, voxel, b0, iterations=iterations, pad_voxels=0, weighting="magnitude",
                           magnitude=magnitude)
        assert np.linalg.norm(weighted - plain) < 1e-5 * np.linalg.norm(plain)


def test_weighted_tv_is_free_of_the_magnitudes_scale_and_trusts_it():
    """The weights are the magnitude over its mean in the mask and the edge mask a quantile of its gradient: the
    magnitude x 7 gives the same map. Where the magnitude is low (a strong source whose signal decays, as a vein's
    or a bleed's) its field weighs less: with the field there corrupted, the weighted map is closer to the truth than
    TV-ADMM's (sphere phantom, noise of s.d. 0.05 ppm on the sphere of 0.2 ppm whose magnitude is 0.05: NRMSE measured
    0.27 against 0.67; bound 0.7x)."""
    shape, voxel, b0 = CASES["anisotropic-oblique"]
    chi, mask, labels = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    magnitude = np.where(labels == 3, 0.05, 1.0).astype(np.float32)  # the strongest sphere (0.2 ppm) is dark
    rng = np.random.default_rng(1)
    corrupted = np.where(labels == 3, field + rng.normal(0, 0.05, shape), field).astype(np.float32)
    weighted = tv_admm(corrupted, mask, voxel, b0, weighting="magnitude", magnitude=magnitude)
    assert np.array_equal(weighted, tv_admm(corrupted, mask, voxel, b0, weighting="magnitude", magnitude=7 * magnitude))
    truth = chi - chi[mask].mean()

    def nrmse(x):
        return np.linalg.norm(x[mask] - truth[mask]) / np.linalg.norm(truth[mask])
    assert nrmse(weighted) < 0.7 * nrmse(tv_admm(corrupted, mask, voxel, b0))


def _harmonic(shape, voxel, mask):
    """A field harmonic everywhere (ppm): a constant, linear terms and, with equal in-plane voxels, x^2 - y^2 (mm),
    whose spherical means on the voxel grid equal it exactly; 0 outside ``mask``, as background removal leaves it."""
    x, y, z = (((np.arange(n) - n // 2) * d).reshape([-1 if a == ax else 1 for a in range(3)])
               for ax, (n, d) in enumerate(zip(shape, voxel)))
    quadratic = 4e-5 * (x ** 2 - y ** 2) if voxel[0] == voxel[1] else 0.0
    return ((0.03 + 2e-3 * x - 3e-3 * z + quadratic) * mask).astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_tv_refinement_does_not_see_a_harmonic_field_and_improves_its_start(case):
    """The refinement fits the field's high-pass ``f - S_r f`` where the sphere lies in the mask: a harmonic field
    added (as a background residual) changes its map by float rounding only (measured 9e-8 ppm at most; bound 1e-6),
    where it moves the weighted TV-ADMM map by 0.36-0.43 ppm (bound: > 0.1). From TKD's map of the sphere phantom,
    three iterations with the defaults bring NRMSE from 0.31-0.33 to 0.17-0.20 (bound: 0.8x)."""
    shape, voxel, b0 = CASES[case]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    background = _harmonic(shape, voxel, mask)
    magnitude = mask.astype(np.float32)
    start = tkd(field, mask, voxel, b0)
    refined = tv_refine(start, field, mask, voxel, b0, magnitude, 3)
    assert refined.dtype == np.float32 and not refined[~mask].any()
    assert np.abs(tv_refine(start, field + background, mask, voxel, b0, magnitude, 3) - refined).max() < 1e-6
    weighted = tv_admm(field, mask, voxel, b0, weighting="magnitude", magnitude=magnitude)
    moved = tv_admm(field + background, mask, voxel, b0, weighting="magnitude", magnitude=magnitude)
    assert np.abs(moved - weighted).max() > 0.1
    truth = chi - chi[mask].mean()

    def nrmse(x):
        return np.linalg.norm(x[mask] - x[mask].mean() - truth[mask]) / np.linalg.norm(truth[mask])
    assert nrmse(refined) < 0.8 * nrmse(start)


@pytest.mark.parametrize("case", list(CASES))
def test_tv_refinement_fits_the_shell_within_the_larger_sphere_with_the_smaller(case):
    """With radii (8, 4) mm the voxels 4-8 mm from the mask's edge, where no 8 mm sphere fits, are fitted on the
    4 mm high-pass: there ``H_4 (D chi - f)`` measured 0.10-0.11 of ``H_4 f`` against 0.23-0.25 with 8 mm alone
    (TKD's start: 0.10-0.12; bound 0.6x), and the map's NRMSE 0.171-0.204 against 0.180-0.213 (bound: lower)."""
    shape, voxel, b0 = CASES[case]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    start = tkd(field, mask, voxel, b0)
    shell = erode_mask(mask, voxel, 4.0) & ~erode_mask(mask, voxel, 8.0)
    high_pass = 1 - smv_kernel(shape, voxel, 4.0)

    def shell_residual(x):
        residual = np.real(np.fft.ifftn(high_pass * np.fft.fftn(forward_field_ppm(x, voxel, b0) - field)))
        return np.linalg.norm(residual[shell])

    truth = chi - chi[mask].mean()

    def nrmse(x):
        return np.linalg.norm(x[mask] - x[mask].mean() - truth[mask]) / np.linalg.norm(truth[mask])
    one, two = (tv_refine(start, field, mask, voxel, b0, mask.astype(np.float32), 3, smv_radii_mm=radii)
                for radii in [(8.0,), (8.0, 4.0)])
    assert shell.any() and shell_residual(two) < 0.6 * shell_residual(one)
    assert nrmse(two) < nrmse(one)


def test_tv_refinement_skips_a_sphere_smaller_than_two_slices():
    """A 4 mm sphere on 3 mm slices spans three of them (measured worse on the heads at 0.76x0.76x3): below
    ``REFINE_MIN_RADIUS_VOXELS`` voxel edges a radius is not used, so (8, 4) mm gives (8,)'s map exactly there."""
    shape, voxel, b0 = (64, 64, 20), (0.9, 0.9, 3.0), (0.0, 0.0, 1.0)
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    start, magnitude = tkd(field, mask, voxel, b0), mask.astype(np.float32)
    assert 4.0 < REFINE_MIN_RADIUS_VOXELS * 3.0 <= 8.0
    np.testing.assert_array_equal(tv_refine(start, field, mask, voxel, b0, magnitude, 2, smv_radii_mm=(8.0, 4.0)),
                                  tv_refine(start, field, mask, voxel, b0, magnitude, 2, smv_radii_mm=(8.0,)))


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"iterations": 1.5}, "iterations must be a positive integer"),
    ({"smv_radii_mm": 0.0}, "positive decreasing smv_radii_mm"),
    ({"smv_radii_mm": ()}, "positive decreasing smv_radii_mm"),
    ({"smv_radii_mm": (2.0, 3.0)}, "positive decreasing smv_radii_mm"),
    ({"smv_radii_mm": (2.0, 2.0)}, "positive decreasing smv_radii_mm"),
    ({"prior_weight": 0.0}, "positive prior_weight"),
    ({"magnitude": None}, "TV refinement needs the magnitude image"),
    ({"chi_ppm": np.zeros((8, 8, 7), np.float32)}, "the map to refine must be finite in the mask and of the field's"),
    ({"chi_ppm": np.full((8, 8, 8), np.nan, np.float32)}, "the map to refine must be finite")])
def test_tv_refinement_rejects_bad_settings(kwargs, message):
    mask = np.ones((8, 8, 8), bool)
    arguments = {"chi_ppm": np.zeros((8, 8, 8), np.float32), "local_field_ppm": np.zeros((8, 8, 8), np.float32),
                 "mask": mask, "voxel_size_mm": (1, 1, 1), "b0_dir": (0, 0, 1), "magnitude": np.ones((8, 8, 8)),
                 "iterations": 3, "smv_radii_mm": (2.0, 1.0)}
    with pytest.raises(ValueError, match=message):
        tv_refine(**{**arguments, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"weighting": "magnitude"}, "weighted TV-ADMM needs the magnitude image"),
    ({"weighting": "snr"}, "weighting must be one of"),
    ({"alpha": 0.0}, "alpha must be positive"),
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"iterations": 2.5}, "iterations must be a positive integer")])
def test_tv_rejects_bad_settings(kwargs, message):
    mask = np.ones((8, 8, 8), bool)
    with pytest.raises(ValueError, match=message):
        tv_admm(np.zeros((8, 8, 8), np.float32), mask, (1, 1, 1), **kwargs)


def test_tv_is_registered_with_its_parameters():
    spec = INVERSIONS["tv"]
    assert spec.display_name == "TV-ADMM" and "bilgic2014" in spec.citations
    assert spec.option(spec.parameters.__dataclass_fields__["iterations"]) == "--tv-iterations"
    assert spec.option(spec.parameters.__dataclass_fields__["weighting"]) == "--tv-weighting"
    assert spec.inputs == ("magnitude",) and spec.settings().weighting == "none"
