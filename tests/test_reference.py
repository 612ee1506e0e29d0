"""The susceptibility reference: whole brain, ventricular CSF found from R2*, or none."""
import numpy as np
import pytest

from metaqsm_bids.qsm.reference import CSF_MIN_VOXELS, DEFAULT_REFERENCE, reference_chi, ventricular_csf

VOXEL = (1.0, 1.0, 1.0)


def _head(shape=(64, 64, 64)):
    """A ball brain (radius 28 voxels, R2* 20 1/s, chi 0.02 ppm) with a central ventricle (an ellipsoid,
    R2* 3 1/s, chi 0.05 ppm) and a CSF layer at its surface (R2* 3 1/s, chi -0.01 ppm)."""
    i, j, k = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    radius = np.sqrt(i ** 2 + j ** 2 + k ** 2)
    brain = radius <= 28
    ventricle = (i / 4.0) ** 2 + (j / 10.0) ** 2 + (k / 6.0) ** 2 <= 1
    rim = brain & (radius > 25)
    r2star = np.where(brain, 20.0, 0).astype(np.float32)
    chi = np.where(brain, 0.02, 0).astype(np.float32)
    r2star[ventricle | rim] = 3.0
    chi[ventricle], chi[rim] = 0.05, -0.01
    return brain, ventricle, rim, r2star, chi


def test_brain_is_the_default_and_sets_the_mask_mean_to_zero():
    brain, _, _, _, chi = _head()
    assert DEFAULT_REFERENCE == "brain"
    referenced, region, mean = reference_chi(chi, brain)
    assert region is brain and np.isclose(mean, chi[brain].mean(dtype=np.float64))
    assert abs(referenced[brain].mean(dtype=np.float64)) < 1e-7 and np.all(referenced[~brain] == 0)


def test_none_leaves_chi_as_it_is():
    brain, _, _, _, chi = _head()
    referenced, region, mean = reference_chi(chi, brain, "none")
    assert np.array_equal(referenced, chi) and region is None and mean is None


def test_csf_finds_the_ventricle_and_not_the_surface_csf():
    brain, ventricle, rim, r2star, chi = _head()
    found = ventricular_csf(r2star, brain, VOXEL)
    assert not (found & rim).any()
    assert (found & ventricle).sum() > 0.9 * ventricle.sum() and found.sum() == (found & ventricle).sum()
    referenced, region, mean = reference_chi(chi, brain, "csf", r2star_hz=r2star, voxel_size_mm=VOXEL)
    assert np.isclose(mean, 0.05) and np.array_equal(region, found)
    assert np.allclose(referenced[ventricle], 0, atol=1e-7) and np.allclose(referenced[brain & ~ventricle & ~rim],
                                                                           -0.03, atol=1e-7)
    assert np.all(referenced[~brain] == 0)


def test_csf_threshold_scales_with_b0():
    brain, ventricle, _, r2star, _ = _head()
    r2star[ventricle] = 12.0  # above 8 1/s at 3 T, below 8 x 7/3 at 7 T
    with pytest.raises(ValueError, match="use --reference brain"):
        ventricular_csf(r2star, brain, VOXEL, b0_tesla=3.0)
    assert ventricular_csf(r2star, brain, VOXEL, b0_tesla=7.0).sum() >= CSF_MIN_VOXELS


def test_csf_needs_the_r2star_map():
    brain, _, _, _, chi = _head()
    with pytest.raises(ValueError, match="two echoes or more"):
        reference_chi(chi, brain, "csf")
    with pytest.raises(ValueError, match="brain, csf, none"):
        reference_chi(chi, brain, "ventricles")
