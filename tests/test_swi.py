"""SWI and its minimum-intensity projection: known answers (a vein darkened by the predicted factor, the mIP
of known arrays)."""
import numpy as np
import pytest

from metaqsm_bids.qsm.field.swi import (MIP_SLAB_MM, SWI_MASK_POWER, SWI_TARGET_TE_S, minimum_intensity_projection,
                                        mip_slices, phase_mask, swi, swi_echo_time)

VOXEL = (1.0, 1.0, 2.0)
TES = (0.005, 0.010, 0.015, 0.020, 0.025)


def _vein(field_hz, shape=(24, 24, 16)):
    """Uniform magnitude 100 with a vein (a cylinder along axis 2, radius 3 voxels) of local field ``field_hz``."""
    i, j = np.indices(shape[:2])
    vein = np.broadcast_to((((i - 12) ** 2 + (j - 12) ** 2) <= 9)[..., None], shape)
    return np.full(shape, 100.0, np.float32), np.where(vein, np.float32(field_hz), 0).astype(np.float32), vein


def test_a_paramagnetic_vein_gets_darker_by_the_predicted_factor():
    magnitude, field, vein = _vein(5.0)  # Hz, positive: paramagnetic in metaqsm's field
    result = swi(magnitude, field, TES, VOXEL)
    # phi = -2 pi 5 Hz 20 ms = -0.2 pi: the mask is (1 - 0.2) ** 4
    assert result.swi_parameters["EchoTimeUsed"] == 0.020
    assert np.allclose(result.swi[vein], 100 * 0.8 ** SWI_MASK_POWER, rtol=1e-5)
    assert np.array_equal(result.swi[~vein], magnitude[~vein])  # no phase, no change
    assert result.swi_parameters["PhaseMaskPower"] == 4 and result.swi_parameters["PhaseMaskSign"] == "negative"


def test_the_positive_mask_darkens_diamagnetic_tissue_instead():
    magnitude, field, vein = _vein(5.0)
    assert np.array_equal(swi(magnitude, field, TES, VOXEL, phase_sign="positive").swi, magnitude)
    magnitude, field, calcification = _vein(-5.0)
    result = swi(magnitude, field, TES, VOXEL, phase_sign="positive", power=2)
    assert np.allclose(result.swi[calcification], 100 * 0.8 ** 2, rtol=1e-5)
    assert np.array_equal(swi(magnitude, field, TES, VOXEL).swi, magnitude)  # the default leaves it


def test_phase_beyond_pi_saturates_the_mask():
    assert np.allclose(phase_mask(np.array([-4.0, -np.pi, -np.pi / 2, 0.0, 2.0])), [0, 0, 0.5 ** 4, 1, 1])


def test_the_echo_nearest_20_ms():
    assert SWI_TARGET_TE_S == 0.020
    assert swi_echo_time((0.005, 0.015, 0.027)) == 0.015
    assert swi_echo_time((0.010, 0.030)) == 0.010  # a tie: the earlier echo
    assert swi_echo_time((0.004,)) == 0.004


@pytest.mark.parametrize("voxel_mm, slab_mm, slices", [(2.0, 8.0, 5), (1.0, 8.0, 9), (3.0, 8.0, 3), (1.5, 8.0, 5),
                                                       (2.0, 6.0, 3), (2.0, 1.0, 1), (1.9, 3.8, 3)])
def test_slab_slices(voxel_mm, slab_mm, slices):
    assert mip_slices((1.0, 1.0, voxel_mm), slab_mm) == slices


def test_mip_of_known_arrays():
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (2, 3, 10))  # value k in slice k
    mip = minimum_intensity_projection(ramp, VOXEL, slab_mm=6.0)  # 3 slices: k-1, k, k+1
    assert mip.shape == ramp.shape and mip.dtype == ramp.dtype
    assert np.array_equal(mip[0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    dark = np.ones((4, 4, 12), np.float32)
    dark[1, 2, 5] = 0.25  # one dark voxel spreads over the slab centred on each slice: slices 3-7 of 5
    mip = minimum_intensity_projection(dark, VOXEL, slab_mm=MIP_SLAB_MM)
    assert np.array_equal(np.flatnonzero(mip[1, 2] == 0.25), [3, 4, 5, 6, 7])
    assert (mip == 0.25).sum() == 5 and np.all(mip[mip != 0.25] == 1)
    assert np.array_equal(minimum_intensity_projection(dark, VOXEL, slab_mm=1.0), dark)  # one slice: itself


def test_the_sidecar_says_the_slab_used():
    magnitude, field, _ = _vein(5.0)
    params = swi(magnitude, field, TES, VOXEL).mip_parameters
    assert params["SlabSlices"] == 5 and params["SlabThicknessMm"] == 10.0 and params["SlabAxis"] == 2


@pytest.mark.parametrize("kwargs, message", [({"phase_sign": "up"}, "negative, positive"),
                                             ({"power": 0}, "whole number >= 1"), ({"slab_mm": 0}, "thicker than 0")])
def test_bad_parameters_say_what_is_allowed(kwargs, message):
    magnitude, field, _ = _vein(5.0)
    with pytest.raises(ValueError, match=message):
        swi(magnitude, field, TES, VOXEL, **kwargs)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="3D magnitude and local field of one shape"):
        swi(np.ones((4, 4, 4)), np.ones((4, 4, 5)), TES, VOXEL)
