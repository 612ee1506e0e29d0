"""The reliability map flags planted unreliable voxels (no signal, a phase off the echo-time line); the QSM
mask keeps them unless they are a void reaching the mask's surface, and their local field is completed."""
import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.interfaces.qsm import BackgroundRemoval
from metaqsm_bids.qsm.field.echofit import fit_total_field
from metaqsm_bids.qsm.field.reliability import (MIN_RESIDUAL_THRESHOLD_RAD, MIN_SIGNAL_FRACTION,
                                                RESIDUAL_NOISE_MULTIPLE, qsm_region, reliable_voxels,
                                                residual_threshold_rad)


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


def test_residual_threshold_follows_the_noise():
    """At high SNR the floor applies; with noisier data the threshold is a multiple of the median residual, so
    noise alone excludes few voxels while a voxel far off the line is still excluded."""
    rng = np.random.default_rng(0)
    mask = np.ones((20, 20, 20), bool)
    for noise_rad in (0.02, 0.1):
        residual = noise_rad * np.abs(rng.standard_normal(mask.shape)) / 0.674  # median ~ noise_rad
        residual[5, 5, 5] = 10 * noise_rad + 0.2
        threshold = residual_threshold_rad(mask, residual)
        expected = max(MIN_RESIDUAL_THRESHOLD_RAD, RESIDUAL_NOISE_MULTIPLE * noise_rad)
        assert threshold == pytest.approx(expected, rel=0.05)
        reliable = reliable_voxels(mask, np.ones(mask.shape), residual)
        assert not reliable[5, 5, 5]
        assert np.count_nonzero(~reliable) / mask.size < 0.01


def test_reliability_checks_shapes():
    with pytest.raises(ValueError, match="does not match"):
        reliable_voxels(np.ones((4, 4, 4), bool), np.ones((4, 4, 5)))


def test_background_removal_writes_the_map_it_used(tmp_path, monkeypatch):
    """The interface computes the map once, runs on it and writes it with its counts (no second thresholding)."""
    monkeypatch.chdir(tmp_path)
    shape = (24, 24, 16)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    brain = g[0] ** 2 + g[1] ** 2 + (2 * g[2]) ** 2 < 10 ** 2
    rss = np.where(brain, 1.0, 0.0).astype(np.float32)
    residual = np.full(shape, 0.05, np.float32)
    dark, jumpy = (12, 12, 8), (9, 14, 8)
    rss[dark] = 0.01
    residual[jumpy] = 1.2
    files = {}
    for name, data in {"field": 2.0 * g[0], "brain": brain, "rss": rss, "residual": residual}.items():
        files[name] = str(tmp_path / f"{name}.nii")
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), files[name])
    result = BackgroundRemoval(field_file=files["field"], mask_file=files["brain"], magnitude_file=files["rss"],
                               residual_file=files["residual"], field_strength_t=3.0, method="pdf").run()
    written = np.asarray(nib.load(result.outputs.reliable_mask_file).dataobj)
    assert written.dtype == np.uint8
    np.testing.assert_array_equal(written > 0, reliable_voxels(brain, rss, residual))
    assert not written[dark] and not written[jumpy] and np.count_nonzero(brain & (written == 0)) == 2
    qsm = np.asarray(nib.load(result.outputs.mask_file).dataobj) > 0
    np.testing.assert_array_equal(qsm, brain)  # both are enclosed: they stay, their local field completed
    local = np.asarray(nib.load(result.outputs.local_field_file).dataobj)
    assert np.all(local[~qsm] == 0) and local[dark] != 0 and local[jumpy] != 0
    provenance = result.outputs.provenance
    assert provenance["CompletedVoxels"] == 2
    assert provenance["UnreliableVoxelsExcluded"] == 2
    assert provenance["UnreliableFractionOfBrain"] == pytest.approx(2 / brain.sum(), abs=1e-6)
    assert (provenance["MinSignalFraction"], provenance["MaxResidualRad"]) == (MIN_SIGNAL_FRACTION, 0.2)  # 4 x 0.05


def test_qsm_region_keeps_enclosed_voids_and_drops_those_at_the_surface():
    """A void enclosed by signal (a calcification, a microbleed) stays; one reaching the mask's surface (bone
    or sinus air that hole filling took in) leaves; a low-signal voxel is a void, a dim one (> 0.15 x median) not."""
    shape = (30, 30, 20)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = g[0] ** 2 + g[1] ** 2 + (1.5 * g[2]) ** 2 < 12 ** 2
    rss = np.where(mask, 1.0, 0.0).astype(np.float32)
    calcification = (np.abs(g[0] - 2) <= 1) & (np.abs(g[1]) <= 1) & (np.abs(g[2]) <= 1)
    sinus = mask & (g[0] < -9) & (np.abs(g[1]) <= 2) & (np.abs(g[2]) <= 2)  # reaches the surface
    dim = (np.abs(g[0] + 3) <= 1) & (np.abs(g[1] - 5) <= 1) & (np.abs(g[2]) <= 1)
    rss[calcification | sinus] = 0.05
    rss[dim] = 0.3
    region = qsm_region(mask, rss)
    assert region[calcification].all() and region[dim].all()
    assert not region[sinus].any()
    assert np.count_nonzero(mask & ~region) == np.count_nonzero(sinus)
