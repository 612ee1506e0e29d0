"""Bipolar readouts: the odd/even echo phase error (offset + linear gradient) is estimated and removed."""
import numpy as np
import pytest

from metaqsm_bids.qsm.core import physics
from metaqsm_bids.qsm.background.registry import remove_background
from metaqsm_bids.qsm.field.bipolar import (BIPOLAR_THRESHOLD_RAD, BipolarError, correct_bipolar,
                                      estimate_bipolar_error)
from metaqsm_bids.qsm.field.echofit import fit_total_field
from metaqsm_bids.qsm.inversion.tkd import tkd
from metaqsm_bids.sim import phantom as ph

TES = (0.004, 0.008, 0.012, 0.016)
#: The planted error of the issue: 0.4 rad on the even echoes plus 0.01 rad/mm along the readout (i).
PLANTED = BipolarError(0.4, (0.01, 0.0, 0.0), 0.0)


@pytest.fixture(scope="module")
def demo():
    phantom = ph.sample_head((64, 64, 32), (1.0, 1.0, 2.0))
    magnitude, phase = ph.simulate_megre(phantom, TES, 3.0, 100.0, np.random.default_rng(5))
    return phantom, magnitude, phase


def _plant(phase, error, voxel):
    planted = np.array(phase)
    e = error.map(phase.shape[:3], voxel)
    planted[..., 1::2] = np.angle(np.exp(1j * (planted[..., 1::2] + e[..., None])))
    return planted


def _chi(phantom, magnitude, phase):
    voxel = physics.voxel_size_mm(phantom.affine)
    b0 = physics.b0_direction_voxel(phantom.affine)
    field = fit_total_field(magnitude, phase, TES, voxel).field_hz
    local = remove_background("resharp", field, phantom.brain_mask, voxel, b0_dir=b0)
    ppm = physics.field_hz_to_ppm(local.local_field, 3.0)
    return tkd(ppm, local.mask, voxel, b0), local.mask


def test_estimate_recovers_the_planted_offset_and_gradient(demo):
    phantom, magnitude, phase = demo
    voxel = physics.voxel_size_mm(phantom.affine)
    error = BipolarError(-0.7, (0.012, -0.004, 0.02), 0.0)
    estimate = estimate_bipolar_error(magnitude, _plant(phase, error, voxel), TES, voxel)
    assert estimate.offset_rad == pytest.approx(error.offset_rad, abs=2e-3)
    np.testing.assert_allclose(estimate.gradient_rad_per_mm, error.gradient_rad_per_mm, atol=2e-4)
    clean = estimate_bipolar_error(magnitude, phase, TES, voxel)  # a monopolar acquisition: nothing to remove
    assert clean.max_abs_rad < BIPOLAR_THRESHOLD_RAD / 4


def test_planted_bipolar_error_is_removed_from_chi(demo):
    """The issue's 0.4 rad + 0.01 rad/mm: chi within 0.005 ppm of the clean run everywhere in the mask."""
    phantom, magnitude, phase = demo
    voxel = physics.voxel_size_mm(phantom.affine)
    planted = _plant(phase, PLANTED, voxel)
    chi_clean, mask = _chi(phantom, magnitude, phase)
    chi_planted, _ = _chi(phantom, magnitude, planted)
    corrected, record = correct_bipolar(magnitude, planted, TES, voxel, "auto")
    assert record["Applied"] and record["MaxAbsRad"] > 0.4
    chi_corrected, _ = _chi(phantom, magnitude, corrected)
    uncorrected_error = np.abs(chi_planted - chi_clean)[mask].max()
    corrected_error = np.abs(chi_corrected - chi_clean)[mask].max()
    print(f"max |chi - clean| in the mask: uncorrected {uncorrected_error:.4f} ppm, corrected {corrected_error:.5f} ppm")
    assert uncorrected_error > 0.01
    assert corrected_error < 0.005


def test_auto_leaves_monopolar_data_and_unequal_spacing_alone(demo):
    phantom, magnitude, phase = demo
    voxel = physics.voxel_size_mm(phantom.affine)
    same, record = correct_bipolar(magnitude, phase, TES, voxel, "auto")
    assert same is phase and not record["Applied"]
    _, record = correct_bipolar(magnitude[..., :3], phase[..., :3], (0.004, 0.008, 0.014), voxel, "auto")
    assert not record["Applied"] and "not estimable" in record["Reason"]
    with pytest.raises(ValueError, match="equally spaced"):
        correct_bipolar(magnitude[..., :2], phase[..., :2], TES[:2], voxel, "on")
    same, record = correct_bipolar(magnitude, phase, TES, voxel, "off")
    assert same is phase and record == {"Mode": "off", "Applied": False}
