"""The reliability map flags planted unreliable voxels: no signal, and a phase off the echo-time line."""
import numpy as np
import pytest

from metaqsm_bids.qsm.field.echofit import fit_total_field
from metaqsm_bids.qsm.field.reliability import reliable_voxels


def test_reliability_flags_planted_errors():
    rng = np.random.default_rng(3)
    shape, tes = (24, 24, 16), np.array([4e-3, 9e-3, 14e-3, 19e-3])
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = g[0] ** 2 + g[1] ** 2 + (2 * g[2]) ** 2 < 10 ** 2
    field_hz = 3.0 * g[0] + 0.5 * g[1] ** 2
    magnitude = np.where(mask, 1.0, 0.0)[..., None] * np.exp(-20 * tes)
    dark = (12, 12, 8)
    magnitude[dark] = 0.01 * magnitude[dark]  # bone or air that hole filling took into the mask
    phase = 0.3 + 2 * np.pi * field_hz[..., None] * tes
    jumpy = (9, 14, 8)
    phase[jumpy + (2,)] += 1.5  # one echo off its line by 1.5 rad (a temporal wrap error, dephasing)
    magnitude = magnitude + 0.001 * rng.standard_normal(magnitude.shape) * mask[..., None]
    wrapped = np.angle(np.exp(1j * phase)).astype(np.float32)
    fit = fit_total_field(np.abs(magnitude).astype(np.float32), wrapped, tes, (1.0, 1.0, 1.0))
    rss = np.sqrt((magnitude ** 2).sum(-1))
    reliable = reliable_voxels(mask, rss, fit.residual_rad)
    assert not reliable[dark] and not reliable[jumpy]
    assert np.count_nonzero(mask & ~reliable) == 2  # nothing else
    assert not (reliable & ~mask).any()
    # without the residual only the signal test applies
    assert reliable_voxels(mask, rss)[jumpy]


def test_reliability_checks_shapes():
    with pytest.raises(ValueError, match="does not match"):
        reliable_voxels(np.ones((4, 4, 4), bool), np.ones((4, 4, 5)))
