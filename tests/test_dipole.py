"""The dipole kernel and forward model against analytic fields and qsm-forward.

All fields are in ppm of B0 for a susceptibility in ppm, Lorentz-sphere corrected
(a uniform sphere sees no field of its own). Sources are drawn in mm, with
sub-voxel partial volume, so voxel size and B0 orientation enter only through
the kernel.
"""
import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from metaqsm_bids.qsm.core.dipole import dipole_kernel, forward_field_ppm, padded_shape

CHI_PPM = 1.0


def axis_coords_mm(n, d, center_index, period=None):
    """Coordinates (mm) of voxel centres along one axis relative to ``center_index``.

    With ``period`` (the FFT length) they are minimum-image coordinates on the
    periodic FFT cell, i.e. the cell centred on the source.
    """
    index = np.arange(n if period is None else period) - center_index
    if period is not None:
        index = (index + period // 2) % period - period // 2
    return index * float(d)


def mesh(shape, voxel_size_mm, center_index):
    """Broadcastable mm coordinates of the grid relative to ``center_index``."""
    return [
        axis_coords_mm(n, d, c).reshape([-1 if a == ax else 1 for a in range(len(shape))])
        for ax, (n, d, c) in enumerate(zip(shape, voxel_size_mm, center_index))
    ]


def partial_volume(inside, shape, voxel_size_mm, center_index, supersample=4):
    """Fraction of each voxel where ``inside(*coords_mm)`` holds, on a supersampled grid."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    fraction = np.zeros(shape, np.float32)
    for shift in np.stack(np.meshgrid(*[offsets] * len(shape), indexing="ij"), -1).reshape(-1, len(shape)):
        fraction += inside(*mesh(shape, voxel_size_mm, np.asarray(center_index) - shift))
    return fraction / supersample ** len(shape)


def unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------- (a) uniform sphere

@pytest.mark.parametrize(
    "shape, voxel_size_mm",
    [((64, 64, 64), (1.0, 1.0, 1.0)), ((80, 64, 40), (0.8, 1.0, 1.6))],
    ids=["isotropic", "anisotropic"],
)
def test_uniform_sphere_matches_analytic_field(shape, voxel_size_mm):
    """Outside: chi/3 R^3 (3cos^2 theta - 1)/r^3; inside: 0.

    Compared away from the partial-volume surface (r <= 0.6 R, r >= 1.5 R). The
    grid's mean field is ~0 (D(0) = 0) as is the analytic one over the FOV, up to
    1e-5 here, so no offset is removed. Measured max error 0.0011 chi isotropic,
    0.0031 chi with 0.8 x 1.0 x 1.6 mm voxels; tolerance 0.01 chi (the field
    just outside is 2/3 chi, and ignoring the voxel size errs by > 0.08 chi).
    """
    radius_mm = 8.0
    center = [n // 2 for n in shape]
    chi = CHI_PPM * partial_volume(lambda x, y, z: x * x + y * y + z * z <= radius_mm ** 2, shape, voxel_size_mm, center)
    field = forward_field_ppm(chi, voxel_size_mm, (0.0, 0.0, 1.0))

    x, y, z = mesh(shape, voxel_size_mm, center)
    r = np.sqrt(x * x + y * y + z * z)
    with np.errstate(divide="ignore", invalid="ignore"):
        outside = CHI_PPM / 3 * radius_mm ** 3 * (3 * (z / r) ** 2 - 1) / r ** 3
    far = r >= 1.5 * radius_mm
    near_centre = r <= 0.6 * radius_mm
    assert field.dtype == np.float32
    np.testing.assert_allclose(field[far], outside[far], atol=0.01 * CHI_PPM)
    np.testing.assert_allclose(field[near_centre], 0.0, atol=0.01 * CHI_PPM)


# ---------------------------------------------------------------- (b) infinite cylinder

def cylinder_field_ppm(x, y, radius_mm, theta):
    """Analytic field of an infinite cylinder along k at angle ``theta`` to B0 (B0 in the i-k plane).

    Inside chi/6 (3cos^2 theta - 1); outside chi/2 sin^2 theta (a/r)^2 cos 2phi,
    phi measured from the projection of B0 (axis i).
    """
    r2 = x * x + y * y
    with np.errstate(divide="ignore", invalid="ignore"):
        outside = CHI_PPM / 2 * np.sin(theta) ** 2 * radius_mm ** 2 * (x * x - y * y) / r2 ** 2
    return np.where(r2 <= radius_mm ** 2, CHI_PPM / 6 * (3 * np.cos(theta) ** 2 - 1), outside)


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 54.7356, 70.0, 90.0])
@pytest.mark.parametrize(
    "voxel_size_mm", [(1.0, 1.0, 1.0), (0.8, 1.2, 2.0)], ids=["isotropic", "anisotropic"]
)
def test_infinite_cylinder_matches_analytic_field(theta_deg, voxel_size_mm):
    """The cylinder spans axis k, which is not padded, so the periodic FFT makes it infinite.

    D(0) = 0 sets the mean over the periodic FFT cell to 0, whereas the analytic
    field has mean ~(pi a^2 / cell area) x the inside value there (up to 0.004 chi
    here), so the reference is the analytic field minus its mean over that cell
    (minimum-image coordinates). Measured max error after that: 0.0020 chi
    isotropic, 0.0027 chi anisotropic; tolerance 0.005 chi (inside values are up
    to chi/3).
    """
    theta = np.deg2rad(theta_deg)
    radius_mm = 8.0
    shape = (int(64 / voxel_size_mm[0]), int(64 / voxel_size_mm[1]), 8)
    center = [n // 2 for n in shape[:2]]
    disc = partial_volume(lambda x, y: x * x + y * y <= radius_mm ** 2, shape[:2], voxel_size_mm[:2], center)
    chi = np.repeat(CHI_PPM * disc[:, :, None], shape[2], axis=2)
    pad = (shape[0] // 2, shape[1] // 2, 0)
    cell = padded_shape(shape, pad)
    assert cell[2] == shape[2], "axis k must not be padded for the cylinder to be infinite"

    field = forward_field_ppm(chi, voxel_size_mm, (np.sin(theta), 0.0, np.cos(theta)), pad_voxels=pad)

    assert np.ptp(field, axis=2).max() < 1e-6  # invariant along the cylinder
    x, y = mesh(shape[:2], voxel_size_mm[:2], center)
    expected = cylinder_field_ppm(x, y, radius_mm, theta)
    cx, cy = (
        axis_coords_mm(n, d, c, period=p).reshape([-1 if a == ax else 1 for a in range(2)])
        for ax, (n, d, c, p) in enumerate(zip(shape[:2], voxel_size_mm[:2], center, cell[:2]))
    )
    expected -= cylinder_field_ppm(cx, cy, radius_mm, theta).mean()
    r = np.sqrt(x * x + y * y)
    compared = (r <= 0.6 * radius_mm) | (r >= 1.5 * radius_mm)
    np.testing.assert_allclose(field[:, :, 0][compared], expected[compared], atol=0.005 * CHI_PPM)


# ---------------------------------------------------------------- (c) oblique B0

def gaussian_blobs(shape, voxel_size_mm, rotation):
    """A smooth asymmetric source: three anisotropic Gaussians, all rotated by ``rotation`` about the FOV centre."""
    blobs = [  # (centre mm, sigmas mm, amplitude ppm)
        ((6.0, -4.0, 3.0), (2.5, 4.0, 3.0), 1.0),
        ((-7.0, 2.0, -2.0), (3.5, 2.5, 2.5), -0.6),
        ((0.0, 7.0, -6.0), (2.5, 2.5, 4.5), 0.8),
    ]
    x, y, z = mesh(shape, voxel_size_mm, [n // 2 for n in shape])
    chi = np.zeros(shape, np.float32)
    for centre, sigmas, amplitude in blobs:
        # precision matrix of the rotated Gaussian: R diag(1/s^2) R^T
        precision = rotation @ np.diag(1.0 / np.square(sigmas)) @ rotation.T
        c = rotation @ np.asarray(centre)
        d = (x - c[0], y - c[1], z - c[2])
        quad = sum(precision[a, b] * d[a] * d[b] for a in range(3) for b in range(3))
        chi += amplitude * np.exp(-0.5 * quad)
    return chi


def test_oblique_b0_field_is_the_rotated_field():
    """Rotating sources and B0 together rotates the field: f_rot(x) = f(R^T x).

    The reference f is computed with B0 along k and resampled (cubic spline) at
    R^T x inside a 14 mm ball, where R^T x stays well inside the FOV. Measured
    max error 9e-4 of the field's peak; tolerance 1% of the peak (swapping two B0
    components, flipping one, or reversing the voxel sizes errs by > 24%).
    """
    voxel_size_mm = (0.9, 1.0, 1.2)
    shape = (64, 56, 48)
    rotation = Rotation.from_euler("zyx", [35.0, -25.0, 40.0], degrees=True).as_matrix()
    b0_rotated = rotation @ np.array([0.0, 0.0, 1.0])

    field = forward_field_ppm(gaussian_blobs(shape, voxel_size_mm, np.eye(3)), voxel_size_mm, (0.0, 0.0, 1.0))
    field_rotated = forward_field_ppm(gaussian_blobs(shape, voxel_size_mm, rotation), voxel_size_mm, b0_rotated)

    x, y, z = np.broadcast_arrays(*mesh(shape, voxel_size_mm, [n // 2 for n in shape]))
    compared = x ** 2 + y ** 2 + z ** 2 <= 14.0 ** 2
    points_mm = np.stack([x[compared], y[compared], z[compared]])
    source_index = (rotation.T @ points_mm) / np.asarray(voxel_size_mm)[:, None] + np.array([n // 2 for n in shape])[:, None]
    expected = map_coordinates(field.astype(np.float64), source_index, order=3)
    peak = np.abs(field).max()
    np.testing.assert_allclose(field_rotated[compared], expected, atol=0.01 * peak)


def test_axis_permutation_permutes_field_exactly():
    """Permuting the voxel axes, voxel sizes and B0 components permutes the field (float32 round-off).

    White noise on even, unpadded axes fills the Nyquist bins, so this also checks
    that the kernel is symmetric there (before that fix: 30% of the peak).
    """
    rng = np.random.default_rng(1)
    chi = rng.standard_normal((24, 20, 16)).astype(np.float32)
    voxel_size_mm = (0.7, 1.1, 1.9)
    b0 = unit((0.3, -0.5, 0.8))
    field = forward_field_ppm(chi, voxel_size_mm, b0, pad_voxels=(0, 0, 0))
    order = (2, 0, 1)
    permuted = forward_field_ppm(
        chi.transpose(order), [voxel_size_mm[a] for a in order], b0[list(order)], pad_voxels=(0, 0, 0)
    )
    np.testing.assert_allclose(permuted, field.transpose(order), atol=1e-5 * np.abs(field).max())


def test_kernel_values():
    """D(0) = 0; D = 1/3 for k perpendicular to B0 and -2/3 along it; range [-2/3, 1/3];
    D(k) = D(-k) on the FFT grid (even and odd lengths, oblique B0), so fields are real."""
    shape = (16, 12, 9)
    kernel = dipole_kernel(shape, (1.0, 1.5, 2.0), (0.0, 0.0, 1.0))
    assert kernel.shape == shape and kernel.dtype == np.float32
    assert kernel[0, 0, 0] == 0.0
    np.testing.assert_allclose(kernel[3, 2, 0], 1.0 / 3.0, atol=1e-6)
    np.testing.assert_allclose(kernel[0, 0, 4], -2.0 / 3.0, atol=1e-6)
    oblique = dipole_kernel(shape, (1.0, 1.5, 2.0), unit((0.4, -0.5, 0.77)))
    for k in (kernel, oblique):
        assert k.min() >= -2.0 / 3.0 - 1e-6 and k.max() <= 1.0 / 3.0 + 1e-6
    negated = np.ix_(*[(-np.arange(n)) % n for n in shape])
    np.testing.assert_allclose(oblique[negated], oblique, atol=1e-6)


# ---------------------------------------------------------------- (d) qsm-forward

def test_matches_qsm_forward_generate_field():
    """Cross-check with ``qsm_forward.generate_field`` for a random smooth chi and an oblique B0.

    qsm-forward's kernel scales axis 0 by voxel_size[1] and axis 1 by
    voxel_size[0], so the in-plane voxel sizes are equal (0.9 mm) and the third
    distinct (1.7 mm). It pads to twice the shape with the corner value c, keeps
    D(0) = 1/3 and subtracts nothing without a mask, so with z = chi - c
    zero-padded to that cell:
        theirs = ours(chi - c, same cell) + c/3 + mean(z)/3.
    Our cell equals theirs because 2 x (32, 32, 24) are fast FFT lengths.
    The padded z jumps at the box faces, so the Nyquist bins matter: where two
    axes are at Nyquist qsm-forward keeps the (k.b0)^2 cross term of one alias
    (real part of a complex FFT) and we average all aliases. Measured max
    difference 8e-5 of the field's range; tolerance 5e-4 (our kernel before the
    Nyquist fix: 2.4e-3; any wrong axis scaling or B0 component: > 1e-2).
    """
    qsm_forward = pytest.importorskip("qsm_forward")
    from scipy.ndimage import gaussian_filter

    shape = (32, 32, 24)
    voxel_size_mm = (0.9, 0.9, 1.7)
    b0 = unit((0.2, -0.3, 0.93))
    chi = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 2.0) + 0.05
    pad = [n // 2 for n in shape]
    assert padded_shape(shape, pad) == tuple(2 * n for n in shape)

    theirs = qsm_forward.generate_field(chi, voxel_size=list(voxel_size_mm), B0_dir=list(b0))

    corner = chi[-1, -1, -1]
    ours = forward_field_ppm(chi - corner, voxel_size_mm, b0, pad_voxels=pad)
    ours = ours + corner / 3 + (chi - corner).sum() / (8 * chi.size) / 3
    np.testing.assert_allclose(ours, theirs, atol=5e-4 * np.ptp(theirs))
