"""PDF background removal on simulated fields with known local and background parts.

Uses the RESHARP tests' phantom (0.75 x 0.75 x 2 mm voxels, Hz at 3 T, B0 along k) and an
oblique-B0 variant of it built here.
"""
import numpy as np
import pytest
from scipy import ndimage as ndi

from metaqsm_bids.qsm.background.pdf import SOURCE_SCALE_MM, pdf, polynomial_basis
from metaqsm_bids.qsm.core.dipole import dipole_kernel, forward_field_ppm
from metaqsm_bids.qsm.core.grid import PaddedBox
from metaqsm_bids.qsm.core.smv import erode_mask
from tests.test_inversion import unit
from tests.test_resharp import BRAIN_SEMI_AXES_MM, VOXEL_MM, demeaned, ellipsoid, phantom, relative_error  # noqa: F401

OBLIQUE_B0 = tuple(unit((0.3, -0.4, 0.87)))


def test_pdf_recovers_local_field_in_the_whole_mask(phantom):  # noqa: F811
    """No erosion: relative error 0.25 over the whole mask (tolerance 0.35; 0.28 after 30 iterations) and
    0.09 (0.15) in the mask eroded by 6 mm, where RESHARP reaches 0.17 (CG stops at its tolerance after
    59 iterations). Background energy left: 0.003 % (tolerance 1 %)."""
    mask, background_hz, local_hz = phantom
    result = pdf(background_hz + local_hz, mask, VOXEL_MM)
    np.testing.assert_array_equal(result.mask, mask)
    assert result.local_field.dtype == np.float32 and not result.local_field[~mask].any()
    assert relative_error(result.local_field, local_hz, mask) < 0.35
    assert relative_error(result.local_field, local_hz, erode_mask(mask, VOXEL_MM, 6.0)) < 0.15
    left = pdf(background_hz, mask, VOXEL_MM).local_field
    assert np.sum(demeaned(left, mask) ** 2) < 0.01 * np.sum(demeaned(background_hz, mask) ** 2)
    assert result.iterations < result.parameters["MaxIterations"] and result.relative_residual < 1e-3


def test_residual_and_error_fall_with_iterations(phantom):  # noqa: F811
    """CG's relative residual after 2, 8, 30 iterations: 0.13, 0.010, 0.0021; the local field's
    error 2.2, 0.50, 0.28. With tol 0.01 CG stops before the cap (9 iterations), below it."""
    mask, background_hz, local_hz = phantom
    residuals, errors = [], []
    for max_iter in (2, 8, 30):
        result = pdf(background_hz + local_hz, mask, VOXEL_MM, max_iter=max_iter, tol=1e-9)
        assert result.iterations == max_iter
        residuals.append(result.relative_residual)
        errors.append(relative_error(result.local_field, local_hz, mask))
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert all(b < a for a, b in zip(errors, errors[1:]))
    early = pdf(background_hz + local_hz, mask, VOXEL_MM, tol=0.01)
    assert early.iterations < 30 and early.relative_residual < 0.01


def test_source_preconditioner_gives_the_same_local_field_in_fewer_iterations(phantom):  # noqa: F811
    """The preconditioner (``source_scale_mm`` 5 mm, an option) against plain CG (the default), each to the
    tolerance: 45 against 59 iterations; the local fields differ by 0.065 of the local field's norm
    (tolerance 0.1; float32 CG stops both short of the exact least-squares solution, and from the same
    normal equations they stop at different points of it), and their errors against the truth are 0.249
    and 0.251 (tolerance: within 0.01)."""
    mask, background_hz, local_hz = phantom
    fast = pdf(background_hz + local_hz, mask, VOXEL_MM, source_scale_mm=SOURCE_SCALE_MM)
    plain = pdf(background_hz + local_hz, mask, VOXEL_MM)
    assert fast.parameters["SourceScaleMm"] == 5.0 and "SourceScaleMm" not in plain.parameters
    assert fast.iterations < 0.9 * plain.iterations
    assert relative_error(fast.local_field, plain.local_field, mask) < 0.1
    errors = [relative_error(r.local_field, local_hz, mask) for r in (fast, plain)]
    assert abs(errors[0] - errors[1]) < 0.01
    with pytest.raises(ValueError, match="source_scale_mm"):
        pdf(background_hz + local_hz, mask, VOXEL_MM, source_scale_mm=0.0)


def test_magnitude_weighting_ignores_corrupted_voxels(phantom):  # noqa: F811
    """A 5 mm blob of the field is off by 30 Hz (e.g. an unwrapping error) where the magnitude is 2 %
    of the rest. Away from it (3 voxels of margin), the error is 1.33 unweighted and 0.26 weighted,
    as without the corruption (0.26). Tolerances: weighted < 0.35, unweighted > 0.8."""
    mask, background_hz, local_hz = phantom
    blob = ellipsoid((5.0, 5.0, 5.0), (10.0, -12.0, 4.0)) & mask
    corrupted = background_hz + local_hz + np.where(blob, 30.0, 0.0)
    magnitude = np.where(blob, 0.02, 1.0) * mask
    away = mask & ~ndi.binary_dilation(blob, iterations=3)
    weighted = pdf(corrupted, mask, VOXEL_MM, magnitude=magnitude)
    assert weighted.parameters["Weighting"] == "magnitude"
    assert relative_error(weighted.local_field, local_hz, away) < 0.35
    assert relative_error(pdf(corrupted, mask, VOXEL_MM).local_field, local_hz, away) > 0.8


def test_oblique_b0_needs_the_right_direction():
    """Background of a skull-like shell and an air sinus, B0 oblique in voxel axes. PDF with the
    right B0 leaves 0.002 % of the background energy, with B0 along k 0.022 %, ten times more (tolerances
    0.005 %, > 0.01 %; after 30 iterations 0.008 % and 0.68 %: CG run to its tolerance fits some of the
    wrong kernel's misfit too)."""
    shape = (80, 96, 40)
    mask = ellipsoid(BRAIN_SEMI_AXES_MM - 6, shape=shape)
    shell = ellipsoid(BRAIN_SEMI_AXES_MM + 2, (0.0, 2.0, 3.0), shape) & ~ellipsoid(BRAIN_SEMI_AXES_MM - 2,
                                                                                    shape=shape)
    air = ellipsoid((7.0, 7.0, 7.0), (0.0, -30.0, -6.0), shape)
    chi = ndi.gaussian_filter(np.where(shell, -2.0, 0.0) + np.where(air, -9.4, 0.0), 0.75 / VOXEL_MM)
    chi[mask] = 0.0
    background = forward_field_ppm(chi, VOXEL_MM, OBLIQUE_B0)
    energy = np.sum(demeaned(background, mask) ** 2)
    right = pdf(background, mask, VOXEL_MM, OBLIQUE_B0).local_field
    wrong = pdf(background, mask, VOXEL_MM, (0.0, 0.0, 1.0)).local_field
    assert np.sum(demeaned(right, mask) ** 2) < 5e-5 * energy
    assert np.sum(demeaned(wrong, mask) ** 2) > 1e-4 * energy


def test_pdf_errors_are_actionable():
    mask = ellipsoid((10.0, 10.0, 10.0), shape=(32, 32, 16))
    field = np.zeros(mask.shape, np.float32)
    with pytest.raises(ValueError, match="empty"):
        pdf(field, np.zeros_like(mask), VOXEL_MM)
    with pytest.raises(ValueError, match="does not match"):
        pdf(field[:, :, :-1], mask, VOXEL_MM)
    with pytest.raises(ValueError, match="NaN"):
        pdf(np.where(mask, np.nan, 0.0), mask, VOXEL_MM)
    with pytest.raises(ValueError, match="magnitude shape"):
        pdf(field, mask, VOXEL_MM, magnitude=np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="b0_dir"):
        pdf(field, mask, VOXEL_MM, (0.0, 0.0, 0.0))


def test_pdf_removes_a_shim_fitted_in_voxel_indices(phantom):  # noqa: F811
    """A scanner-style second-order shim, ``2k^2 - i^2 - j^2`` in voxel indices, is not harmonic in mm at
    0.75 x 0.75 x 2 mm voxels, so outside dipoles cannot make it. With the polynomial in the model PDF
    removes it; without it (order 0) the local field keeps it. Measured: relative error 0.25 (order 2)
    against 1.38 (order 0)."""
    mask, background_hz, local_hz = phantom
    i, j, k = np.indices(mask.shape, dtype=float)
    i, j, k = i - i.mean(), j - j.mean(), k - k.mean()
    shim = 2 * k ** 2 - i ** 2 - j ** 2
    shim *= 3 * np.std(local_hz[mask]) / np.std(shim[mask])
    field = background_hz + local_hz + shim
    modelled = pdf(field, mask, VOXEL_MM)
    plain = pdf(field, mask, VOXEL_MM, polynomial_order=0)
    assert modelled.parameters["PolynomialOrder"] == 2
    assert relative_error(modelled.local_field, local_hz, mask) < 0.35
    assert relative_error(plain.local_field, local_hz, mask) > 2 * relative_error(modelled.local_field, local_hz, mask)
    with pytest.raises(ValueError, match="polynomial_order"):
        pdf(field, mask, VOXEL_MM, polynomial_order=3)


@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), OBLIQUE_B0])
def test_default_padding_gives_the_reference_local_field(phantom, b0):  # noqa: F811
    """The default padding (20 voxels of the finest axis, the same mm on the others: 8 slices of 2 mm here) against
    20 voxels on every axis (the MEDI toolbox's, the reference): the local fields differ by 0.030 (B0 along k) and
    0.051 (oblique) of the local field's norm (tolerance 0.08: CG stops both at its tolerance, at different points),
    their errors against the truth 0.250 / 0.251 and 0.256 / 0.258 (tolerance: no more than 0.005 worse)."""
    mask, background_hz, local_hz = phantom
    default = pdf(background_hz + local_hz, mask, VOXEL_MM, b0)
    reference = pdf(background_hz + local_hz, mask, VOXEL_MM, b0, pad_voxels=20)
    assert default.parameters["PadVoxels"] == [20, 20, 8] and reference.parameters["PadVoxels"] == [20, 20, 20]
    assert relative_error(default.local_field, reference.local_field, mask) < 0.08
    assert relative_error(default.local_field, local_hz, mask) < relative_error(reference.local_field, local_hz,
                                                                                mask) + 0.005


def _dense_convolution(kernel_half, shape):
    """The box's circular dipole convolution as a dense matrix (voxels in C order): D[i, j] = h(i - j), with h the
    kernel's point spread."""
    spread = np.fft.irfftn(kernel_half.astype(np.float64), s=shape, axes=(0, 1, 2))
    index = np.indices(shape).reshape(3, -1)
    offsets = (index[:, :, None] - index[:, None, :]) % np.array(shape)[:, None, None]
    return spread[offsets[0], offsets[1], offsets[2]]


@pytest.mark.parametrize("slab", [False, True])
def test_pdf_iterates_as_a_dense_float64_reference(slab):
    """PDF's CG (float32 products, the polynomial projected out with a float32 basis from its Gram matrix) against
    the same method written densely in float64 (the normal equations ``A^T W Q W A y = A^T W Q W f``, ``A = D M'`` in
    the mask, ``Q`` the projection off ``W P`` by least squares, then the polynomial's weighted fit) on a 10x10x6
    box, 10 CG iterations from 0 each: the local fields differ by 1e-5 of their norm, 6e-5 for a one-slice mask
    (``slab``, whose polynomial terms along the slice's normal are not spanned); tolerance 2e-4 (float32 rounding
    grows with the iterations of this ill-conditioned system: 2e-7 after one, 0.1 after 20)."""
    rng = np.random.default_rng(3)
    shape, voxel, b0, pad, iterations = (10, 10, 6), (1.0, 1.2, 2.0), OBLIQUE_B0, (2, 2, 2), 10
    g = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    mask = (g[0] / 3.2) ** 2 + (g[1] / 3.2) ** 2 + (g[2] / 1.8) ** 2 < 1
    if slab:
        mask[..., :3] = mask[..., 4:] = False
    field = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    result = pdf(field, mask, voxel, b0, magnitude=weight, pad_voxels=pad, tol=0.0, max_iter=iterations)
    assert result.iterations == iterations

    box = PaddedBox(mask, pad)
    inside = box.embed(mask, bool).ravel()
    a = _dense_convolution(dipole_kernel(box.shape, voxel, b0, half=True), box.shape)[np.ix_(inside, ~inside)]
    basis = polynomial_basis(np.argwhere(box.embed(mask, bool)) * voxel, 2)
    f = box.embed(field).ravel()[inside].astype(np.float64)
    w = box.embed(weight / weight[mask].mean()).ravel()[inside].astype(np.float64)

    def weigh(v):  # W Q W v
        v = w * v
        return w * (v - w[:, None] * basis @ np.linalg.lstsq(w[:, None] * basis, v, rcond=None)[0])

    y, residual = np.zeros(a.shape[1]), a.T @ weigh(f)
    direction, rr = residual.copy(), residual @ residual
    for _ in range(iterations):
        a_direction = a.T @ weigh(a @ direction)
        alpha = rr / (direction @ a_direction)
        y += alpha * direction
        residual -= alpha * a_direction
        direction = residual + (residual @ residual) / rr * direction
        rr = residual @ residual
    remainder = f - a @ y
    expected = remainder - basis @ np.linalg.lstsq(w[:, None] * basis, w * remainder, rcond=None)[0]
    got = box.embed(result.local_field).ravel()[inside]
    assert np.linalg.norm(got - expected) < 2e-4 * np.linalg.norm(expected)
