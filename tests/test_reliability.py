"""The reliability map flags planted unreliable voxels: no signal, and a phase off the echo-time line."""
import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.interfaces.qsm import BackgroundRemoval
from metaqsm_bids.qsm.field.echofit import fit_total_field
from metaqsm_bids.qsm.field.reliability import MAX_RESIDUAL_RAD, MIN_SIGNAL_FRACTION, reliable_voxels


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
                               residual_file=files["residual"], method="resharp", radius_mm=3.0).run()
    written = np.asarray(nib.load(result.outputs.reliable_mask_file).dataobj)
    assert written.dtype == np.uint8
    np.testing.assert_array_equal(written > 0, reliable_voxels(brain, rss, residual))
    assert not written[dark] and not written[jumpy] and np.count_nonzero(brain & (written == 0)) == 2
    qsm = np.asarray(nib.load(result.outputs.mask_file).dataobj) > 0
    assert not (qsm & (written == 0)).any()  # the QSM mask lies in the map
    provenance = result.outputs.provenance
    assert provenance["UnreliableVoxelsExcluded"] == 2
    assert provenance["UnreliableFractionOfBrain"] == pytest.approx(2 / brain.sum(), abs=1e-6)
    assert (provenance["MinSignalFraction"], provenance["MaxResidualRad"]) == (MIN_SIGNAL_FRACTION, MAX_RESIDUAL_RAD)
