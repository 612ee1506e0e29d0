"""Multi-echo total field fit on simulated data with a known field and phase offset."""
import numpy as np
import pytest

from metaqsm_bids.qsm.core.dipole import forward_field_hz
from metaqsm_bids.qsm.field.echofit import fit_total_field

SHAPE = (64, 64, 32)
VOXEL = (1.0, 1.0, 2.0)
T2STAR_S = 0.015  # short enough that the |S|^2 weights matter
UNIFORM_TES = [0.004, 0.009, 0.014, 0.019, 0.024]
NONUNIFORM_TES = [0.004, 0.008, 0.012, 0.020, 0.028]


def _coordinates():
    """Coordinates in [-0.5, 0.5) along each axis, broadcastable."""
    return np.meshgrid(*[(np.arange(n) - n / 2) / n for n in SHAPE], indexing="ij", sparse=True)


def _phantom():
    """True field (Hz), phase offset at TE=0 (rad), head mask and the central region where errors are scored."""
    x, y, z = _coordinates()
    # smooth background: +-150 Hz over the head, zero mean
    background = 150 * (2.2 * x ** 2 - 1.6 * y ** 2 + 1.5 * x * z + 0.9 * y) / 0.55
    chi = np.zeros(SHAPE, np.float32)
    for (ci, cj, ck), radius, value in [((20, 30, 16), 3, 0.8), ((40, 24, 12), 4, -0.5), ((34, 42, 20), 2.5, 1.2)]:
        i, j, k = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
        chi[((i - ci) ** 2 + (j - cj) ** 2 + ((k - ck) * 2) ** 2) <= radius ** 2] = value
    local = forward_field_hz(chi, VOXEL, b0_tesla=3.0)  # a few local dipoles, tens of Hz
    field = (background - background.mean() + local).astype(np.float32)
    offset = (6.0 * x ** 2 - 4.0 * y * z + 3.0 * z + 1.0).astype(np.float32)  # several rad
    head = (x / 0.45) ** 2 + (y / 0.45) ** 2 + (z / 0.45) ** 2 <= 1
    centre = (x / 0.35) ** 2 + (y / 0.35) ** 2 + (z / 0.35) ** 2 <= 1
    return field, offset, head, centre


def _signals(field, offset, head, tes, noise_sd, seed=0):
    """4D magnitude and wrapped phase: mono-exponential decay in the head, complex Gaussian noise everywhere."""
    rng = np.random.default_rng(seed)
    echoes = []
    for te in tes:
        signal = head * np.exp(-te / T2STAR_S) * np.exp(1j * (2 * np.pi * field * te + offset))
        signal = signal + noise_sd * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)) / np.sqrt(2)
        echoes.append(signal)
    echoes = np.stack(echoes, axis=-1)
    return np.abs(echoes).astype(np.float32), np.angle(echoes).astype(np.float32)


def _field_sd_bound_hz(tes, noise_sd):
    """Cramer-Rao bound on the field (Hz) for a line fit with phase noise sd noise_sd / (sqrt(2) |S|)."""
    tes = np.asarray(tes)
    weight = np.exp(-2 * tes / T2STAR_S) / (noise_sd ** 2 / 2)
    mean_te = (weight * tes).sum() / weight.sum()
    return 1 / np.sqrt((weight * (tes - mean_te) ** 2).sum()) / (2 * np.pi)


def _circular_error(a, b):
    return np.angle(np.exp(1j * (a - b)))


@pytest.mark.parametrize("tes", [UNIFORM_TES, NONUNIFORM_TES, UNIFORM_TES[:2]], ids=["uniform", "nonuniform", "two"])
def test_noise_free_field_and_offset_are_exact(tes):
    field, offset, _, _ = _phantom()
    magnitude, phase = _signals(field, offset, np.ones(SHAPE, bool), tes, noise_sd=0.0)
    # echo phases wrap many times; the echo spacing phase wraps too
    assert np.ptp(2 * np.pi * field * tes[-1]) > 6 * np.pi and np.abs(field).max() * 2 * np.pi * 0.005 > np.pi
    fit = fit_total_field(magnitude, phase, tes, VOXEL)
    for array in (fit.field_hz, fit.phase_offset_rad, fit.residual_rad):
        assert array.dtype == np.float32 and array.shape == SHAPE
    np.testing.assert_allclose(fit.field_hz, field, atol=2e-3)
    np.testing.assert_allclose(_circular_error(fit.phase_offset_rad, offset), 0, atol=1e-4)
    assert fit.residual_rad.max() < 1e-4


@pytest.mark.parametrize("tes", [UNIFORM_TES, NONUNIFORM_TES], ids=["uniform", "nonuniform"])
def test_noisy_field_reaches_the_weighted_fit_bound(tes):
    """Noise only outside the head; inside, SNR 50 at TE=0 decaying with T2* = 15 ms.

    The magnitude-weighted fit attains the Cramer-Rao bound; an unweighted fit would be
    30-40 % above it with this decay, so the 10 % margin checks the weights.
    """
    noise_sd = 0.02
    field, offset, head, centre = _phantom()
    magnitude, phase = _signals(field, offset, head, tes, noise_sd)
    fit = fit_total_field(magnitude, phase, tes, VOXEL)
    error = fit.field_hz[centre] - field[centre]
    rms = np.sqrt(np.mean(error ** 2))
    bound = _field_sd_bound_hz(tes, noise_sd)
    assert rms < 0.5
    assert rms < 1.1 * bound, (rms, bound)
    assert abs(error.mean()) < 0.05  # no bias
    # no spatial (1/dTE = 200 Hz) or temporal (tens of Hz) unwrapping error anywhere in the
    # head, up to its noise-facing edge: the unweighted Laplacian unwrapping left ~40 there
    assert np.abs(fit.field_hz[head] - field[head]).max() < 10.0
    assert np.sqrt(np.mean(_circular_error(fit.phase_offset_rad, offset)[centre] ** 2)) < 0.05
    # the residual reflects the phase noise: about its sd noise_sd / (sqrt(2) |S|) ~ 0.01-0.05 rad
    assert 0.005 < np.median(fit.residual_rad[centre]) < 0.05


@pytest.mark.parametrize("factor", [1e-25, 1e25])
def test_magnitude_scale_does_not_matter(factor):
    """Stored intensities are arbitrary: |S|^2 of 1e-25 or 1e25 would under/overflow float32 unscaled."""
    field, offset, head, _ = _phantom()
    magnitude, phase = _signals(field, offset, head, UNIFORM_TES, noise_sd=0.02)
    reference = fit_total_field(magnitude, phase, UNIFORM_TES, VOXEL)
    scaled = fit_total_field(magnitude * np.float32(factor), phase, UNIFORM_TES, VOXEL)
    # compared in the head: in the noise outside, float32 rounding of the scaled weights can
    # tip a voxel whose estimate lies half a turn from its phase to the other wrap
    np.testing.assert_allclose(scaled.field_hz[head], reference.field_hz[head], atol=1e-3)
    np.testing.assert_allclose(scaled.residual_rad[head], reference.residual_rad[head], atol=1e-5)


def test_residual_flags_a_corrupted_echo():
    """A phase error delta on one echo leaves the weighted least-squares residual of that echo."""
    field, offset, _, _ = _phantom()
    magnitude, phase = _signals(field, offset, np.ones(SHAPE, bool), UNIFORM_TES, noise_sd=0.0)
    delta, echo = 0.8, 2
    block = (slice(20, 24), slice(20, 24), slice(10, 12))
    phase[block + (echo,)] += delta
    fit = fit_total_field(magnitude, phase, UNIFORM_TES, VOXEL)

    tes = np.asarray(UNIFORM_TES)
    weight = np.exp(-2 * tes / T2STAR_S)
    design = np.stack([np.ones_like(tes), tes], axis=1)
    root = np.sqrt(weight)
    kick = np.zeros_like(tes)
    kick[echo] = delta
    coefficients = np.linalg.lstsq(design * root[:, None], kick * root, rcond=None)[0]
    misfit = kick - design @ coefficients
    expected = np.sqrt((weight * misfit ** 2).sum() / weight.sum())

    np.testing.assert_allclose(fit.residual_rad[block], expected, rtol=1e-3)
    np.testing.assert_allclose(fit.field_hz[block] - field[block], coefficients[1] / (2 * np.pi), rtol=1e-3)
    np.testing.assert_allclose(_circular_error(fit.phase_offset_rad[block], offset[block]), coefficients[0],
                               rtol=1e-3)
    untouched = np.ones(SHAPE, bool)
    untouched[block] = False
    assert fit.residual_rad[untouched].max() < 1e-4


def test_single_echo_keeps_the_offset_in_the_field():
    field, offset, _, _ = _phantom()
    small_offset = (offset - offset.mean()) * 0.3  # no 2*pi ambiguity in the global constant
    te = 0.012
    magnitude, phase = _signals(field, small_offset, np.ones(SHAPE, bool), [te], noise_sd=0.0)
    assert np.ptp(2 * np.pi * field * te) > 6 * np.pi
    fit = fit_total_field(magnitude, phase, [te], VOXEL)
    np.testing.assert_allclose(fit.field_hz, field + small_offset / (2 * np.pi * te), atol=2e-3)
    assert not fit.phase_offset_rad.any() and not fit.residual_rad.any()


def test_matches_the_signal_model_of_qsm_forward():
    """The peer simulator's sign and units: phase = 2*pi * field_ppm * B0 * 42.58 * TE + offset."""
    qsm_forward = pytest.importorskip("qsm_forward")
    field, offset, _, _ = _phantom()
    b0_tesla = 3.0
    field_ppm = field / (b0_tesla * 42.58)  # qsm-forward's gyromagnetic ratio, MHz/T
    echoes = [qsm_forward.generate_signal(field_ppm, B0=b0_tesla, TE=te, phase_offset=offset, R2star=1 / T2STAR_S)
              for te in UNIFORM_TES]
    signal = np.stack(echoes, axis=-1)
    fit = fit_total_field(np.abs(signal), np.angle(signal), UNIFORM_TES, VOXEL)
    np.testing.assert_allclose(fit.field_hz, field, atol=2e-3)
    np.testing.assert_allclose(_circular_error(fit.phase_offset_rad, offset), 0, atol=1e-4)


def _inputs(n_echoes=3):
    rng = np.random.default_rng(1)
    shape = (6, 6, 6, n_echoes)
    return rng.uniform(0.5, 1.0, shape), rng.uniform(-np.pi, np.pi, shape)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, p, t: (m[..., :2], p, t), "does not match"),
        (lambda m, p, t: (m[..., 0], p[..., 0], t[:1]), "4D"),
        (lambda m, p, t: (m, p, t[:2]), "3 echoes in the images but 2 echo times"),
        (lambda m, p, t: (m, p, [0.01, 0.005, 0.02]), "strictly increasing"),
        (lambda m, p, t: (m, p, [0.0, 0.005, 0.01]), "positive"),
        (lambda m, p, t: (m, np.where(p > 3, np.nan, p), t), "phase has .* NaN"),
        (lambda m, p, t: (np.where(m > 0.9, np.inf, m), p, t), "magnitude has .* NaN or infinite"),
        (lambda m, p, t: (-m, p, t), "negative"),
        (lambda m, p, t: (0 * m, p, t), "zero everywhere"),
    ],
)
def test_bad_inputs_raise(change, message):
    magnitude, phase = _inputs()
    with pytest.raises(ValueError, match=message):
        fit_total_field(*change(magnitude, phase, [0.005, 0.01, 0.015]), VOXEL)


def test_bad_voxel_size_raises():
    magnitude, phase = _inputs()
    with pytest.raises(ValueError, match="voxel_size_mm"):
        fit_total_field(magnitude, phase, [0.005, 0.01, 0.015], (1.0, -1.0, 1.0))
