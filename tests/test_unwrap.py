"""Laplacian unwrapping and snapping to the measured wraps."""
import numpy as np
import pytest

from metaqsm_bids.qsm.field.unwrap import laplacian_unwrap, snap_to_wraps, wrap_phase

SHAPE = (64, 64, 32)
VOXEL = (1.0, 1.2, 2.0)


def _smooth_phase(peak_to_peak, offset=0.0):
    """Non-periodic quadratic phase (rad) with a linear term and cross terms, in mm."""
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2 + 0.3) * d for n, d in zip(SHAPE, VOXEL)],
                          indexing="ij", sparse=True)
    phase = 0.6 * x ** 2 + 0.3 * x * y + y ** 2 + 0.8 * z ** 2 - 0.5 * x * z + 3 * x
    phase = (phase - phase.min()) / np.ptp(phase) * peak_to_peak
    return (phase - phase.mean() + offset).astype(np.float32)


def _divergence(fluxes):
    """Divergence of per-axis fluxes between neighbours (1/mm^2), with no flux across the array faces."""
    out = 0.0
    for axis, flux in enumerate(fluxes):
        low, high = [(0, 0)] * 3, [(0, 0)] * 3
        low[axis], high[axis] = (1, 0), (0, 1)
        out = out + np.pad(flux, high) - np.pad(flux, low)
    return out


def _neumann_laplacian(values, voxel):
    """7-point Laplacian (1/mm^2) with reflecting faces, by explicit differences."""
    return _divergence([np.diff(values.astype(np.float64), axis=a) / d ** 2 for a, d in enumerate(voxel)])


# 30 rad peak-to-peak has gradients up to 1 rad/voxel, 80 rad up to 2.8 rad/voxel (both < pi)
@pytest.mark.parametrize("peak_to_peak", [30.0, 80.0])
def test_smooth_phase_is_recovered_exactly_up_to_2pi_n(peak_to_peak):
    truth = _smooth_phase(peak_to_peak)
    steepest = max(np.abs(np.diff(truth, axis=a)).max() for a in range(3))
    assert 0.9 < steepest < np.pi
    wrapped = wrap_phase(truth)
    assert np.ptp(truth) > 4 * np.pi * 2  # several wraps

    estimate = laplacian_unwrap(wrapped, VOXEL)
    assert estimate.dtype == np.float32 and estimate.shape == SHAPE
    # consistent wrapped gradients: the least-squares solution is the truth up to a constant
    shift = estimate - truth
    assert np.ptp(shift) < 2e-3
    unwrapped = snap_to_wraps(estimate, wrapped)
    turns = (unwrapped - truth) / (2 * np.pi)
    n = np.round(turns.mean())
    np.testing.assert_allclose(turns, n, atol=1e-5)  # everywhere, not only inside


def test_phase_without_wraps_is_returned_unchanged():
    truth = _smooth_phase(2.5, offset=0.7)  # within (-pi, pi): no wrap, no free 2*pi
    np.testing.assert_allclose(laplacian_unwrap(truth, VOXEL), truth, atol=1e-4)


def test_inconsistent_phase_gives_the_weighted_least_squares_solution():
    """Pure noise has residues everywhere; the result must still solve the normal equations.

    The least-squares phase u minimises sum over axes of sum (diff(u) - wrap(diff(phi)))^2 / d^2,
    so lap(u) = div(wrapped differences / d^2) with no flux across the faces. Swapping the
    voxel sizes changes the solution, so this also checks the anisotropic spacing.
    """
    rng = np.random.default_rng(3)
    shape = (24, 20, 16)
    voxel = (1.0, 1.5, 3.0)
    phase = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    estimate = laplacian_unwrap(phase, voxel)

    divergence = _divergence([wrap_phase(np.diff(phase, axis=a)).astype(np.float64) / d ** 2
                              for a, d in enumerate(voxel)])
    scale = np.abs(divergence).max()
    np.testing.assert_allclose(_neumann_laplacian(estimate, voxel), divergence, atol=1e-4 * scale)
    swapped = laplacian_unwrap(phase, voxel[::-1])
    assert np.abs(_neumann_laplacian(swapped, voxel) - divergence).max() > 0.1 * scale
    # the free constant makes the result agree with the input modulo 2*pi on average
    assert abs(np.angle(np.exp(1j * (phase - estimate.astype(np.float64))).sum())) < 1e-4


def test_weights_stop_a_noise_background_from_pulling_the_edge():
    """Smooth phase in a ball, pure noise outside: the noise's random differences across the edge
    pull the unweighted solution off by up to ~7 rad; weighting by the magnitude keeps it close."""
    rng = np.random.default_rng(0)
    truth = _smooth_phase(40.0)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / n for n in SHAPE], indexing="ij", sparse=True)
    ball = x ** 2 + y ** 2 + z ** 2 <= 0.4 ** 2
    wrapped = np.where(ball, wrap_phase(truth), rng.uniform(-np.pi, np.pi, SHAPE)).astype(np.float32)
    magnitude = np.where(ball, 1.0, 0.05 * rng.rayleigh(size=SHAPE)).astype(np.float32)

    unweighted = laplacian_unwrap(wrapped, VOXEL)
    assert np.ptp((unweighted - truth)[ball]) > 5.0
    weighted = laplacian_unwrap(wrapped, VOXEL, weight=magnitude)
    assert np.ptp((weighted - truth)[ball]) < 2.0
    turns = (snap_to_wraps(weighted, wrapped) - truth)[ball] / (2 * np.pi)
    np.testing.assert_allclose(turns, np.round(turns.mean()), atol=1e-5)


def test_snap_to_wraps_adds_the_nearest_multiple_of_2pi():
    wrapped = np.array([0.5, -3.0, 3.1, 0.0], dtype=np.float32)
    turns = np.array([0, 2, -3, 7])
    estimate = wrapped + 2 * np.pi * turns + np.array([3.0, -3.0, 0.2, -0.1])  # within pi of the answer
    snapped = snap_to_wraps(estimate, wrapped)
    assert snapped.dtype == np.float32
    np.testing.assert_allclose(snapped, wrapped + 2 * np.pi * turns, atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: laplacian_unwrap(np.zeros((8, 8)), VOXEL), "3D"),
        (lambda: laplacian_unwrap(np.full((8, 8, 8), np.nan), VOXEL), "NaN"),
        (lambda: laplacian_unwrap(np.zeros((8, 8, 8)), (1.0, 0.0, 1.0)), "voxel_size_mm"),
        (lambda: laplacian_unwrap(np.zeros((8, 8, 1)), VOXEL), "at least 2"),
        (lambda: laplacian_unwrap(np.zeros((8, 8, 8)), VOXEL, weight=np.ones((8, 8, 7))), "weight shape"),
        (lambda: laplacian_unwrap(np.zeros((8, 8, 8)), VOXEL, weight=-np.ones((8, 8, 8))), "non-negative"),
        (lambda: laplacian_unwrap(np.zeros((8, 8, 8)), VOXEL, weight=np.zeros((8, 8, 8))), "zero everywhere"),
        (lambda: snap_to_wraps(np.zeros((4, 4, 4)), np.zeros((4, 4, 5))), "shape"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
