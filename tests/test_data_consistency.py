"""The closed-form k-space data-consistency step: its limits, its normal equations, and a biased estimate fixed."""
import numpy as np
import pytest
import scipy.fft as sfft
from scipy import ndimage as ndi

from metaqsm_bids.qsm.core.dipole import dipole_kernel, forward_field_ppm
from metaqsm_bids.qsm.core.grid import PaddedBox
from metaqsm_bids.qsm.inversion.consistency import (DEFAULT_EDGE_MM, DEFAULT_LAMBDA, data_consistency,
                                                    edge_weighted_steps)
from metaqsm_bids.qsm.inversion.registry import INVERSIONS, invert
from metaqsm_bids.qsm.inversion.tv import DEFAULT_TV_REFINEMENT, tv_refine
from metaqsm_bids.qsm.network.deepqsm import fft_padding, load_model, predict_chi
from metaqsm_bids.qsm.network.models import METAQSM_MODEL
from tests.test_inversion import CASES, phantom, unit

#: A periodic full-FOV case (fast FFT lengths, no padding: the box is the volume): anisotropic voxels, oblique B0.
SHAPE, VOXEL, B0 = (24, 20, 16), (0.8, 1.1, 1.5), tuple(unit((0.2, -0.3, 0.9)))
FULL = np.ones(SHAPE, bool)


def nrmse(est, truth, mask):
    """Demeaned NRMSE in the mask (QSM is relative)."""
    e, t = est[mask] - est[mask].mean(), truth[mask] - truth[mask].mean()
    return np.linalg.norm(e - t) / np.linalg.norm(t)


def test_large_lambda_returns_the_network_estimate():
    chi, mask, _ = phantom(*CASES["anisotropic-oblique"][:2])
    shape, voxel, b0 = CASES["anisotropic-oblique"]
    field = forward_field_ppm(chi, voxel, b0) * mask
    chi_net = np.where(mask, np.random.default_rng(0).normal(0, 0.1, shape), 0).astype(np.float32)
    out = data_consistency(chi_net, field, mask, voxel, b0, 1e7)
    assert out.dtype == np.float32 and np.all(out[~mask] == 0)
    np.testing.assert_allclose(out, chi_net, atol=1e-6)


def test_small_lambda_recovers_the_susceptibility_where_the_kernel_is_not_small():
    """A smooth chi whose spectrum lies where |D| > 0.2, its exact periodic field: as lambda -> 0 the
    output's spectrum there is chi's, whatever chi_net is (relative error ~ lambda / 0.2^2 + float32)."""
    rng = np.random.default_rng(1)
    kernel = dipole_kernel(SHAPE, VOXEL, B0, half=True)
    half = kernel.shape
    freq = np.meshgrid(*[sfft.fftfreq(n) for n in SHAPE[:2]], sfft.rfftfreq(SHAPE[2]), indexing="ij")
    lowpass = np.exp(-sum(f ** 2 for f in freq) / (2 * 0.15 ** 2))
    keep = np.abs(kernel) > 0.2
    spectrum = (rng.standard_normal(half) + 1j * rng.standard_normal(half)) * lowpass * keep
    chi_true = sfft.irfftn(spectrum, s=SHAPE).astype(np.float32)
    field = sfft.irfftn(kernel * sfft.rfftn(chi_true), s=SHAPE).astype(np.float32)
    chi_net = rng.normal(0, chi_true.std(), SHAPE).astype(np.float32)

    out = data_consistency(chi_net, field, FULL, VOXEL, B0, 1e-7, pad_voxels=0)

    got, want = sfft.rfftn(out), sfft.rfftn(chi_true)
    assert np.linalg.norm(got[keep] - want[keep]) < 1e-4 * np.linalg.norm(want[keep])
    # where the field says nothing (D = 0: the mean) chi_net is kept
    assert out.mean() == pytest.approx(chi_net.mean(), abs=1e-6)


@pytest.mark.parametrize("lam", [0.01, 0.3, 3.0])
def test_output_solves_the_normal_equations(lam):
    """(D^2 + lambda) F chi = D F f + lambda F chi_net, mode by mode, for arbitrary (inconsistent) f and chi_net."""
    rng = np.random.default_rng(2)
    field, chi_net = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    kernel = dipole_kernel(SHAPE, VOXEL, B0, half=True).astype(np.float64)

    out = data_consistency(chi_net, field, FULL, VOXEL, B0, lam, pad_voxels=0)

    lhs = (kernel ** 2 + lam) * sfft.rfftn(out.astype(np.float64))
    rhs = kernel * sfft.rfftn(field.astype(np.float64)) + lam * sfft.rfftn(chi_net.astype(np.float64))
    assert np.abs(lhs - rhs).max() < 1e-5 * np.abs(rhs).max()


@pytest.mark.parametrize("case", list(CASES))
def test_fixes_a_scale_biased_estimate(case):
    """chi_net = 0.7 chi on the sphere phantoms (NRMSE 0.30): lambda = 0.01 brings it to 0.11-0.14 (measured)."""
    shape, voxel, b0 = CASES[case]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    biased = 0.7 * chi
    out = data_consistency(biased, field, mask, voxel, b0, 0.01)
    assert nrmse(biased, chi, mask) == pytest.approx(0.3, abs=1e-4)
    assert nrmse(out, chi, mask) < 0.16


@pytest.mark.parametrize("lam, chi_shape, message", [(0.0, SHAPE, "positive"), (np.inf, SHAPE, "positive"),
                                                     (0.1, (4, 4, 4), "shape")])
def test_rejects_bad_input(lam, chi_shape, message):
    with pytest.raises(ValueError, match=message):
        data_consistency(np.zeros(chi_shape), np.zeros(SHAPE), FULL, VOXEL, B0, lam)


def test_metaqsm_option_applies_the_step_to_the_network_map():
    """``data_consistency_lambda`` of the Meta-QSM inversion: on, the network's map (absolute, before the
    demeaning) goes through the step, with the default edge weighting on Meta-QSM's FFT box, then is demeaned; here it
    also helps (the TV refinement after it off)."""
    shape, voxel, b0 = CASES["isotropic"]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    magnitude = mask.astype(np.float32)  # uniform: the shipped model takes a magnitude
    common = {"device": "cpu", "orientations": "canonical", "magnitude": magnitude, "tv_refinement": None}
    plain = invert("metaqsm", field, mask, voxel, b0, data_consistency_lambda=None, **common)
    info = {}
    fitted = invert("metaqsm", field, mask, voxel, b0, data_consistency_lambda=0.01, info=info, **common)
    network = predict_chi(load_model(), field, mask, voxel, b0, magnitude=magnitude)  # one pass, as "canonical"
    expected = data_consistency(network, field, mask, voxel, b0, 0.01, pad_voxels=fft_padding(mask),
                                edge_mm=DEFAULT_EDGE_MM)
    expected[mask] -= expected[mask].mean()
    np.testing.assert_allclose(fitted, expected, atol=1e-5)
    assert abs(fitted[mask].mean()) < 1e-6 and info["Model"] == METAQSM_MODEL
    assert nrmse(fitted, chi, mask) < nrmse(plain, chi, mask)


def test_metaqsm_tv_refinement_refines_the_steps_map():
    """``tv_refinement``: the data-consistency step's map is refined by :func:`tv_refine` (on Meta-QSM's FFT box,
    with the magnitude), then demeaned; it needs the magnitude even for a model that does not take it."""
    shape, voxel, b0 = CASES["anisotropic-oblique"]
    chi, mask, _ = phantom(shape, voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    magnitude = np.where(mask, 1.0 + 0.1 * (chi > 0), 0).astype(np.float32)
    common = {"device": "cpu", "orientations": "canonical"}
    info = {}
    refined = invert("metaqsm", field, mask, voxel, b0, tv_refinement=2, magnitude=magnitude, info=info, **common)
    network = predict_chi(load_model(), field, mask, voxel, b0, magnitude=magnitude)
    stepped = data_consistency(network, field, mask, voxel, b0, DEFAULT_LAMBDA, pad_voxels=fft_padding(mask),
                               edge_mm=DEFAULT_EDGE_MM)
    expected = tv_refine(stepped, field, mask, voxel, b0, magnitude, 2, pad_voxels=fft_padding(mask))
    expected[mask] -= expected[mask].mean()
    np.testing.assert_allclose(refined, expected, atol=1e-5)
    assert info["Model"] == METAQSM_MODEL and INVERSIONS["metaqsm"].settings().tv_refinement == DEFAULT_TV_REFINEMENT
    with pytest.raises(ValueError, match="the TV refinement weighs the field by the magnitude image"):
        invert("mesaqsm", field, mask, voxel, b0, tv_refinement=2, **common)


def _dense_problem(edge_mm, seed=5):
    """A small box: the dense dipole matrix, W^2 (flattened), field and chi_net on it, for the weighted form."""
    shape, voxel, b0 = (10, 9, 8), (1.0, 1.2, 1.5), tuple(unit((0.1, 0.2, 0.95)))
    grid = np.indices(shape) - (np.array(shape) - 1)[:, None, None, None] / 2
    mask = (grid ** 2).sum(0) <= 3.2 ** 2
    rng = np.random.default_rng(seed)
    field, chi_net = (np.where(mask, rng.standard_normal(shape), 0).astype(np.float32) for _ in range(2))
    box = PaddedBox(mask, 2)
    n = int(np.prod(box.shape))
    kernel = dipole_kernel(box.shape, voxel, b0)
    dipole = np.real(np.fft.ifftn(kernel[..., None] * np.fft.fftn(np.eye(n).reshape(*box.shape, n), axes=(0, 1, 2)),
                                  axes=(0, 1, 2))).reshape(n, n)
    w2 = box.embed(np.minimum(1, ndi.distance_transform_edt(mask, sampling=voxel) / edge_mm) ** 2).ravel()
    return dict(shape=shape, voxel=voxel, b0=b0, mask=mask, field=field, chi_net=chi_net, box=box, dipole=dipole,
                w2=w2, f=box.embed(field).ravel().astype(float), x_net=box.embed(chi_net).ravel().astype(float))


def _objective(p, x, lam):
    return float(np.sum(p["w2"] * (p["dipole"] @ x - p["f"]) ** 2) + lam * np.sum((x - p["x_net"]) ** 2))


@pytest.mark.parametrize("edge_mm", [1.0, 3.0])
def test_edge_weighted_step_is_one_majorize_minimize_step(edge_mm):
    """With ``edge_mm`` the output is the closed form of the field ``W^2 f + (1 - W^2) D chi_net`` on the box,
    W = min(1, depth / edge_mm) in the mask and 0 outside (a dense solve on a small box), and it lowers the
    weighted objective ||W (D chi - f)||^2 + lambda ||chi - chi_net||^2."""
    p, lam = _dense_problem(edge_mm), 0.1
    out = data_consistency(p["chi_net"], p["field"], p["mask"], p["voxel"], p["b0"], lam, pad_voxels=2,
                           edge_mm=edge_mm)
    dipole, n = p["dipole"], p["dipole"].shape[0]
    target = p["w2"] * p["f"] + (1 - p["w2"]) * (dipole @ p["x_net"])
    step = np.linalg.solve(dipole.T @ dipole + lam * np.eye(n), dipole.T @ target + lam * p["x_net"])
    expected = p["box"].extract(step.reshape(p["box"].shape))
    expected[~p["mask"]] = 0
    assert np.linalg.norm(out - expected) < 1e-5 * np.linalg.norm(expected)
    assert _objective(p, step, lam) < _objective(p, p["x_net"], lam)


def test_edge_weighted_steps_have_the_weighted_minimiser_as_fixed_point():
    """The majorizer is right: a step from the minimiser of the weighted objective (a dense solve of
    (D' W^2 D + lambda) chi = D' W^2 f + lambda chi_net) returns it, and steps lower the objective monotonically."""
    p, lam = _dense_problem(3.0, seed=7), np.float32(0.1)
    dipole, n, box = p["dipole"], p["dipole"].shape[0], p["box"]
    minimiser = np.linalg.solve(dipole.T @ (p["w2"][:, None] * dipole) + lam * np.eye(n),
                                dipole.T @ (p["w2"] * p["f"]) + lam * p["x_net"])
    kernel = dipole_kernel(box.shape, p["voxel"], p["b0"], half=True)
    weight2 = p["w2"].reshape(box.shape).astype(np.float32)
    field = box.embed(p["field"])
    prior = sfft.rfftn(box.embed(p["chi_net"]))
    start = sfft.rfftn(minimiser.reshape(box.shape).astype(np.float32))
    again = sfft.irfftn(edge_weighted_steps(field, prior, weight2, kernel, lam, start, 1), s=box.shape).ravel()
    assert np.linalg.norm(again - minimiser) < 1e-4 * np.linalg.norm(minimiser)
    objectives = [_objective(p, sfft.irfftn(edge_weighted_steps(field, prior, weight2, kernel, lam, prior, k),
                                            s=box.shape).ravel(), lam) for k in range(4)]
    assert all(a > b for a, b in zip(objectives, objectives[1:])) and objectives[-1] > _objective(p, minimiser, lam)


def test_edge_weighted_step_trusts_the_field_less_at_the_edge():
    """A field error confined to the mask's outer 2 mm (what background removal leaves) moves the weighted step's
    map less than the closed form's; with the exact field either step improves the network's map."""
    shape, voxel, b0 = CASES["isotropic"]
    chi, mask, _ = phantom(shape, voxel)
    depth = ndi.distance_transform_edt(mask, sampling=voxel)
    field = forward_field_ppm(chi, voxel, b0) * mask
    error = np.where(mask & (depth <= 2.0), 0.05, 0).astype(np.float32)
    chi_net = (0.9 * chi).astype(np.float32)
    moved = {}
    for edge_mm in (None, 4.0):
        clean = data_consistency(chi_net, field, mask, voxel, b0, 0.1, edge_mm=edge_mm)
        moved[edge_mm] = np.linalg.norm((data_consistency(chi_net, field + error, mask, voxel, b0, 0.1,
                                                          edge_mm=edge_mm) - clean)[mask])
        assert nrmse(clean, chi, mask) < nrmse(chi_net, chi, mask)
    assert moved[4.0] < 0.5 * moved[None]


def test_edge_weighted_step_rejects_a_bad_distance():
    with pytest.raises(ValueError, match="edge distance"):
        data_consistency(np.zeros(SHAPE), np.zeros(SHAPE), FULL, VOXEL, B0, 0.1, edge_mm=0.0)


def test_edge_weighted_step_counts_the_field_of_view_edge_as_an_edge():
    """A mask cut by the field of view (a slab): its voxels on the array's faces are at the edge (``depth_mm``:
    1 voxel deep there, not the distance to the mask's other faces), so the weighted step trusts the field less
    there too: an error on the cut face moves the map less than the closed form's."""
    from metaqsm_bids.qsm.core.smv import depth_mm
    full = np.ones((5, 6, 7), bool)
    depth = depth_mm(full, (1.0, 2.0, 3.0))
    assert depth[0, 3, 3] == 1.0 and depth[2, 0, 3] == 2.0 and depth[2, 3, 0] == 3.0 and depth[2, 3, 3] == 3.0
    shape, voxel, b0 = CASES["isotropic"]
    chi, mask, _ = phantom(shape, voxel)
    slab = mask[..., shape[2] // 2:]  # cut through the middle: its lowest slice holds the widest cross-section
    field = forward_field_ppm(chi, voxel, b0)[..., shape[2] // 2:] * slab
    error = np.zeros_like(field)
    error[..., 0] = np.where(slab[..., 0], 0.05, 0)
    chi_net = (0.9 * chi[..., shape[2] // 2:]).astype(np.float32)
    moved = {}
    for edge_mm in (None, 4.0):
        clean = data_consistency(chi_net, field, slab, voxel, b0, 0.1, edge_mm=edge_mm)
        moved[edge_mm] = np.linalg.norm((data_consistency(chi_net, field + error, slab, voxel, b0, 0.1,
                                                          edge_mm=edge_mm) - clean)[slab])
    assert moved[4.0] < 0.5 * moved[None]
