"""RESHARP background removal on simulated fields with known local and background parts.

Voxels are anisotropic (0.75 x 0.75 x 2 mm) and the SMV radius is in mm. Fields
are computed with the package's dipole forward model and converted to Hz at 3 T,
so the tests also check that units pass through unchanged.
"""
import numpy as np
import pytest
from scipy import ndimage as ndi

from metaqsm_bids.qsm.core.dipole import forward_field_ppm
from metaqsm_bids.qsm.core.physics import field_ppm_to_hz
from metaqsm_bids.qsm.background.common import BackgroundRemoval
from metaqsm_bids.qsm.background.resharp import resharp
from metaqsm_bids.qsm.core.smv import depth_mm, distance_mm, erode_mask, smv_kernel

VOXEL_MM = np.array([0.75, 0.75, 2.0])
SHAPE = (96, 128, 44)
BRAIN_SEMI_AXES_MM = np.array([24.0, 27.0, 26.0])
B0_TESLA = 3.0


def ellipsoid(semi_axes_mm, offset_mm=(0.0, 0.0, 0.0), shape=SHAPE, voxel_mm=VOXEL_MM):
    """Voxels whose centres lie in an ellipsoid given in mm around the array centre."""
    centre = (np.array(shape) - 1) / 2 * np.asarray(voxel_mm)
    coords = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(shape, voxel_mm, centre)], indexing="ij")
    return sum(((x - o) / a) ** 2 for x, o, a in zip(coords, offset_mm, semi_axes_mm)) <= 1


@pytest.fixture(scope="module")
def phantom():
    """Brain mask, background field and local field (Hz at 3 T).

    Background: a bone-like shell (-2 ppm, 4 mm from the brain, uneven thickness so
    that its field inside is not uniform), an air-filled sinus (sphere of 8 mm,
    -9.4 ppm) and an ear-canal-like air cylinder, all outside the mask. The
    background susceptibility is blurred by 0.75 mm (partial volume): the FFT field
    of a binary object rings (the spectral Laplacian of a step is not local), which
    breaks harmonicity near the source; real tissue boundaries are smooth at that
    scale. Local: five spheres of +-0.1 ppm inside the mask.
    """
    mask = ellipsoid(BRAIN_SEMI_AXES_MM)
    bone = ellipsoid(BRAIN_SEMI_AXES_MM + 8, (0.0, 2.0, 3.0)) & ~ellipsoid(BRAIN_SEMI_AXES_MM + 4)
    air = ellipsoid((8.0, 8.0, 8.0), (0.0, -38.0, -8.0)) | ellipsoid((4.0, 4.0, 12.0), (-30.0, 0.0, -14.0))
    chi_background = ndi.gaussian_filter(np.where(bone, -2.0, 0.0) + np.where(air, -9.4, 0.0), 0.75 / VOXEL_MM)
    assert np.abs(chi_background[mask]).max() < 1e-5  # blur does not reach into the brain
    chi_background[mask] = 0.0
    chi_local = np.zeros(SHAPE)
    spheres = [((-8, -8, -6), 4, 0.1), ((8, 7, 6), 4, -0.1), ((0, 10, -10), 3, 0.1), ((-7, 9, 9), 3, -0.1),
               ((4, -10, 2), 4, 0.1)]
    for offset_mm, radius_mm, chi_ppm in spheres:
        chi_local[ellipsoid((radius_mm,) * 3, offset_mm)] = chi_ppm
    assert not chi_local[~mask].any()
    background_hz = field_ppm_to_hz(forward_field_ppm(chi_background, VOXEL_MM), B0_TESLA)
    local_hz = field_ppm_to_hz(forward_field_ppm(chi_local, VOXEL_MM), B0_TESLA)
    return mask, background_hz, local_hz


def demeaned(field, mask):
    values = field[mask].astype(float)
    return values - values.mean()


def relative_error(estimate, truth, mask):
    return np.linalg.norm(demeaned(estimate, mask) - demeaned(truth, mask)) / np.linalg.norm(demeaned(truth, mask))


# ---------------------------------------------------------------- SMV kernel and erosion

def test_smv_kernel_is_a_normalised_sphere_in_mm():
    """Radius 6 mm on 0.75 x 0.75 x 2 mm voxels: an ellipsoid reaching 8, 8 and 3 voxels."""
    shape = (40, 40, 16)
    kernel = smv_kernel(shape, VOXEL_MM, 6.0)
    assert kernel.dtype == np.float32 and kernel.shape == shape
    assert kernel[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    image = np.fft.ifftn(kernel).real
    inside = image > 0.5 * image.max()
    weight = image[0, 0, 0]
    np.testing.assert_allclose(image[inside], weight, rtol=1e-4)
    np.testing.assert_allclose(image[~inside], 0.0, atol=1e-4 * weight)
    assert inside.sum() * weight == pytest.approx(1.0, rel=1e-4)
    # on the sphere (8 x 0.75 = 3 x 2 = 6 mm) is in, one voxel further is out
    for in_voxel, out_voxel in [((8, 0, 0), (9, 0, 0)), ((0, -8, 0), (0, -9, 0)), ((0, 0, 3), (0, 0, 4)),
                                ((5, 5, 0), (6, 6, 0))]:  # 5.3 mm in, 6.4 mm out
        assert inside[in_voxel] and not inside[out_voxel]
    np.testing.assert_allclose(smv_kernel(shape, VOXEL_MM, 6.0, rfft=True), kernel[:, :, : shape[2] // 2 + 1])


def test_erosion_depth_is_the_radius_in_mm_along_each_axis():
    """A box mask shrinks by 6 mm on each side: 8 voxels along i and j, 3 along k."""
    mask = np.zeros((40, 44, 20), bool)
    mask[5:35, 6:40, 4:18] = True
    eroded = erode_mask(mask, VOXEL_MM, 6.0)
    expected = np.zeros_like(mask)
    expected[13:27, 14:32, 7:15] = True
    np.testing.assert_array_equal(eroded, expected)


def test_erosion_matches_binary_erosion_and_treats_the_array_edge_as_outside():
    """Same voxels as scipy's binary_erosion with the ellipsoidal ball, for a mask cut by the array edge."""
    shape = (48, 48, 20)
    mask = ellipsoid((20.0, 16.0, 30.0), (6.0, 0.0, 0.0), shape)  # cut by the i and k edges
    ball = ellipsoid((6.0, 6.0, 6.0), shape=(17, 17, 7))
    expected = ndi.binary_erosion(mask, ball, border_value=0)
    assert expected.any()
    np.testing.assert_array_equal(erode_mask(mask, VOXEL_MM, 6.0), expected)


@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (0.75, 0.75, 3.0), (0.5, 0.6, 2.0), (1.2, 1.2, 2.4)])
@pytest.mark.parametrize("cap_mm", [2.0, 3.0, 4.0, 8.0])
def test_capped_distance_is_scipys_up_to_the_cap(voxel, cap_mm):
    """``distance_mm`` with a cap: scipy's Euclidean distance (to the last bit or one ulp) wherever that is at most
    the cap, above the cap elsewhere, so every threshold at or below the cap selects the same voxels (3 mm = 4 x
    0.75 mm lies exactly on the cap)."""
    mask = ndi.gaussian_filter(np.random.default_rng(3).normal(size=(64, 64, 32)), 4) > -0.01
    exact = ndi.distance_transform_edt(mask, sampling=voxel)
    capped = distance_mm(mask, voxel, cap_mm)
    near = exact <= cap_mm
    assert near.sum() > 1000 and (~near).sum() > 100
    np.testing.assert_allclose(capped[near], exact[near], rtol=1e-15, atol=0)
    assert np.all(capped[~near] > cap_mm)
    for threshold in (0.5 * cap_mm, cap_mm):
        np.testing.assert_array_equal(capped <= threshold, exact <= threshold)
    np.testing.assert_array_equal(distance_mm(mask, voxel), exact)
    # depth_mm: the same on the mask's bounding box, the array's edge counting as outside
    edged = ndi.distance_transform_edt(np.pad(mask, 1), sampling=voxel)[1:-1, 1:-1, 1:-1]
    assert np.any(edged < exact)  # the mask reaches the array's edge
    within = edged <= cap_mm
    np.testing.assert_allclose(depth_mm(mask, voxel, cap_mm)[within], edged[within], rtol=1e-15, atol=0)
    np.testing.assert_array_equal(depth_mm(mask, voxel), edged)


# ---------------------------------------------------------------- RESHARP

def test_resharp_recovers_local_field_and_removes_background(phantom):
    """Inside the eroded mask, demeaned, in Hz.

    The background carries 50x the local field's energy there (the total field's
    relative error is 7). Measured: local field relative error 0.17, of which 0.14
    with no background at all (the part of the local field that SMV filtering
    cannot tell from a harmonic one) and the rest from the 0.03 % of background
    energy left. Tolerances: error < 0.25, energy left < 1 % (brief: > 95 % removed).
    """
    mask, background_hz, local_hz = phantom
    result = resharp(background_hz + local_hz, mask, VOXEL_MM, radius_mm=6.0)
    assert isinstance(result, BackgroundRemoval)
    eroded = result.mask
    np.testing.assert_array_equal(eroded, erode_mask(mask, VOXEL_MM, 6.0))
    assert result.local_field.dtype == np.float32
    assert not result.local_field[~eroded].any()
    background_energy = np.sum(demeaned(background_hz, eroded) ** 2)
    assert background_energy > 20 * np.sum(demeaned(local_hz, eroded) ** 2)

    assert relative_error(result.local_field, local_hz, eroded) < 0.25

    left = resharp(background_hz, mask, VOXEL_MM, radius_mm=6.0).local_field
    assert np.sum(demeaned(left, eroded) ** 2) < 0.01 * background_energy


def test_resharp_is_linear_in_the_field_unit(phantom):
    """ppm in gives ppm out: the same map as Hz in, scaled (measured 2e-6 relative, tolerance 1e-4)."""
    mask, background_hz, local_hz = phantom
    total_hz = background_hz + local_hz
    hz_per_ppm = field_ppm_to_hz(1.0, B0_TESLA)
    in_hz = resharp(total_hz, mask, VOXEL_MM).local_field
    in_ppm = resharp(total_hz / hz_per_ppm, mask, VOXEL_MM).local_field
    assert np.linalg.norm(in_ppm * hz_per_ppm - in_hz) < 1e-4 * np.linalg.norm(in_hz)


def test_residual_decreases_until_tolerance(phantom):
    """CG's relative residual falls with the iteration cap, and the default run stops below tol.

    Measured 0.086, 0.0094, 0.00068 after 2, 8, 20 iterations; 9.4e-5 after 28.
    """
    mask, background_hz, local_hz = phantom
    total_hz = background_hz + local_hz
    residuals = []
    for max_iter in (2, 8, 20):
        result = resharp(total_hz, mask, VOXEL_MM, tol=1e-12, max_iter=max_iter)
        assert result.iterations == max_iter
        residuals.append(result.relative_residual)
    converged = resharp(total_hz, mask, VOXEL_MM, tol=1e-4)
    residuals.append(converged.relative_residual)
    assert converged.iterations < 200
    assert converged.relative_residual < 1e-4
    assert all(later < earlier for earlier, later in zip(residuals, residuals[1:]))


# ---------------------------------------------------------------- errors

def test_errors_are_actionable():
    mask = ellipsoid((10.0, 10.0, 10.0), shape=(32, 32, 16))
    field = np.zeros(mask.shape, np.float32)
    with pytest.raises(ValueError, match="empty"):
        resharp(field, np.zeros_like(mask), VOXEL_MM)
    with pytest.raises(ValueError, match=r"after erosion by the 12.0 mm.*0.75, 0.75, 2.0"):
        resharp(field, mask, VOXEL_MM, radius_mm=12.0)
    with pytest.raises(ValueError, match="does not match"):
        resharp(field[:, :, :-1], mask, VOXEL_MM)
    nan_field = field.copy()
    nan_field[16, 16, 8] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        resharp(nan_field, mask, VOXEL_MM)
    # NaN outside the mask is ignored
    nan_field[16, 16, 8] = 0.0
    nan_field[0, 0, 0] = np.nan
    assert np.isfinite(resharp(nan_field, mask, VOXEL_MM, radius_mm=4.0).local_field).all()
