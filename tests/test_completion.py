"""The local field of unreliable voxels, completed from the reliable field around them (known answers)."""
import numpy as np
import pytest

from metaqsm_bids.qsm.background.completion import complete_local_field
from metaqsm_bids.qsm.core.dipole import forward_field_ppm
from metaqsm_bids.qsm.inversion.tkd import tkd

VOXEL = (1.0, 1.0, 2.0)


def _head(seed=0):
    """An ellipsoidal brain with smooth tissue contrast, a 0.8 ppm haemorrhage and a -0.5 ppm calcification."""
    shape = (48, 48, 24)
    g = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, VOXEL)], indexing="ij")
    mask = (g[0] / 21) ** 2 + (g[1] / 21) ** 2 + (g[2] / 20) ** 2 < 1
    rng = np.random.default_rng(seed)
    chi = 0.02 * np.sin(g[0] / 4) * np.cos(g[1] / 5) + 0.005 * rng.standard_normal(shape)
    bleed = (g[0] - 6) ** 2 + (g[1] + 4) ** 2 + g[2] ** 2 <= 4.5 ** 2
    calc = (g[0] + 8) ** 2 + (g[1] - 6) ** 2 + (g[2] - 2) ** 2 <= 3 ** 2
    chi[bleed], chi[calc] = 0.8, -0.5
    chi = np.where(mask, chi, 0).astype(np.float32)
    return chi, mask, bleed, calc


def test_completed_lesions_are_inverted_as_if_their_field_were_measured():
    """With the lesions' field replaced by phase noise and marked unreliable, TKD of the completed field gives the
    lesion means of TKD of the true field within 12 % and, around them, a map 4x closer to it than TKD of the
    raw field (whose noise spreads as streaks); reliable voxels keep their values exactly."""
    chi, mask, bleed, calc = _head()
    field = forward_field_ppm(chi, VOXEL)
    broken = field.copy()
    unreliable = (bleed | calc) & mask
    broken[unreliable] = np.random.default_rng(1).normal(0, 0.2, unreliable.sum())
    completed, info = complete_local_field(broken, mask, mask & ~unreliable, VOXEL)
    assert info["CompletedVoxels"] == unreliable.sum() and 0 < info["Iterations"] <= 100
    assert np.array_equal(completed[mask & ~unreliable], broken[mask & ~unreliable]) and np.all(completed[~mask] == 0)
    reference, raw, fixed = (tkd(f, mask, VOXEL) for f in (field, broken, completed))
    for lesion in (bleed, calc):
        assert fixed[lesion].mean() == pytest.approx(reference[lesion].mean(), rel=0.12)
    around = mask & ~unreliable

    def error(x):
        return np.linalg.norm((x - reference)[around]) / np.linalg.norm(reference[around])

    assert error(fixed) < 0.5 and error(raw) > 4 * error(fixed)


def test_nothing_to_complete_and_bad_inputs():
    chi, mask, _, _ = _head()
    field = forward_field_ppm(chi, VOXEL)
    out, info = complete_local_field(field, mask, mask, VOXEL)
    assert info == {"CompletedVoxels": 0, "Iterations": 0, "RelativeResidual": 0.0}
    assert np.array_equal(out, np.where(mask, field, 0))
    with pytest.raises(ValueError, match="no reliable voxel"):
        complete_local_field(field, mask, np.zeros_like(mask), VOXEL)
    with pytest.raises(ValueError, match="share a shape"):
        complete_local_field(field, mask, mask[:, :, :4], VOXEL)
