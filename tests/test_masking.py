"""Brain masking of synthetic heads (bright brain, dark skull, bright scalp, Rician noise) and of
the package's head phantom with its face and neck in the field of view.

Voxels are anisotropic and every structure is drawn in mm.
"""
import numpy as np
import pytest
from scipy import ndimage

from metaqsm_bids.qsm.mask.brain import brain_mask
from metaqsm_bids.sim.phantom import TISSUES, sample_head, simulate_megre

VOXEL_MM = (0.9, 0.9, 2.2)
SHAPE = (104, 112, 44)
BRAIN_SEMI_AXES_MM = np.array([30.0, 36.0, 28.0])


def synthetic_head(seed=0, noise_sigma=0.05):
    """Magnitude (Rician noise, sigma ``noise_sigma``) and the true brain, scalp and dark-structure masks.

    Brain 0.75-1.0, a dark nucleus (0.1) fully inside it, a dark vein (0.1) running
    from the centre out through the top of the brain (open in 3D, enclosed in each
    (i, j) slice), skull 0.04 (6 mm), scalp 1.2 (4 mm), and a bright 5 mm thick
    bridge (a vessel or nerve) through the skull joining brain and scalp.
    """
    centre = (np.array(SHAPE) - 1) / 2 * np.array(VOXEL_MM)
    x, y, z = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(SHAPE, VOXEL_MM, centre)], indexing="ij")

    def ellipsoid(semi_axes, offset=(0.0, 0.0, 0.0)):
        return ((x - offset[0]) / semi_axes[0]) ** 2 + ((y - offset[1]) / semi_axes[1]) ** 2 + (
            (z - offset[2]) / semi_axes[2]
        ) ** 2 <= 1

    brain = ellipsoid(BRAIN_SEMI_AXES_MM)
    skull = ellipsoid(BRAIN_SEMI_AXES_MM + 6) & ~brain
    scalp = ellipsoid(BRAIN_SEMI_AXES_MM + 10) & ~ellipsoid(BRAIN_SEMI_AXES_MM + 6)
    nucleus = ellipsoid((5.0, 5.0, 5.0), offset=(10.0, -8.0, -6.0))
    vein = (x ** 2 + y ** 2 <= 2.0 ** 2) & (z > 0) & brain
    bridge = (x ** 2 + z ** 2 <= 2.5 ** 2) & (y > 0) & skull

    image = np.zeros(SHAPE, np.float32)
    image[brain] = 0.9
    image[ellipsoid(0.6 * BRAIN_SEMI_AXES_MM)] = 0.75  # white matter
    image[nucleus | vein] = 0.1
    image[skull] = 0.04
    image[scalp] = 1.2
    image[bridge] = 0.9
    rng = np.random.default_rng(seed)
    noise = noise_sigma * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE))
    magnitude = np.abs(image + noise).astype(np.float32)
    return magnitude, brain, scalp, nucleus, vein


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_synthetic_head_mask_matches_brain_and_drops_scalp():
    """Measured Dice 0.998 with no scalp voxel; tolerance Dice > 0.95 (brief: > 0.9)."""
    magnitude, brain, scalp, nucleus, vein = synthetic_head()
    mask = brain_mask(magnitude, VOXEL_MM)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert dice(mask, brain) > 0.95
    assert not np.any(mask & scalp)
    # the enclosed nucleus is filled in 3D; the vein, open at the top, slice by slice
    assert np.all(mask[nucleus])
    assert np.all(mask[vein & (np.abs(np.indices(SHAPE)[2] - SHAPE[2] // 2) < 10)])


def test_erosion_is_what_cuts_the_scalp_bridge():
    """With a 1 mm erosion (and no neck cut) the 5 mm bridge survives and the scalp joins the brain component."""
    magnitude, _, scalp, _, _ = synthetic_head()
    assert np.count_nonzero(brain_mask(magnitude, VOXEL_MM, erosion_mm=1.0, neck_fraction=0.0) & scalp) > 1000


def test_neck_cut_drops_a_scalp_the_erosion_left():
    """The scalp that a 1 mm erosion leaves reaches the outside of the head, so the neck cut drops it.

    Measured: Dice 0.991, no scalp voxel; tolerance Dice > 0.95.
    """
    magnitude, brain, scalp, _, _ = synthetic_head()
    mask = brain_mask(magnitude, VOXEL_MM, erosion_mm=1.0)
    assert dice(mask, brain) > 0.95
    assert not np.any(mask & scalp)


@pytest.mark.parametrize("voxel_mm", [(1.0, 1.0, 3.0), (3.0, 1.0, 1.0)], ids=["thin-k", "thin-i"])
def test_radii_are_in_mm(voxel_mm):
    """A 40 x 40 x 12 mm block, 12 mm along the 3 mm axis (4 voxels), survives the 4 mm erosion.

    Eroding by 4 voxels instead of 4 mm would empty it. The erosion and dilation
    round its edges, so Dice is below 1: measured 0.94, tolerance 0.9.
    """
    extent_mm = np.array([40.0, 40.0, 40.0])
    thin_axis = int(np.argmax(voxel_mm))
    extent_mm[thin_axis] = 12.0
    shape = tuple(int(n) for n in np.round((extent_mm + 24.0) / voxel_mm))
    block = np.zeros(shape, bool)
    start = np.round(12.0 / np.array(voxel_mm)).astype(int)
    stop = start + np.round(extent_mm / voxel_mm).astype(int)
    block[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = True
    mask = brain_mask(block.astype(np.float32), voxel_mm)
    assert dice(mask, block) > 0.9


@pytest.mark.parametrize(
    "magnitude, message",
    [
        (np.zeros((16, 16, 16)), "constant"),
        (np.full((16, 16, 16), np.nan), "NaN"),
        (np.ones((16, 16, 16, 2)), "3D"),
    ],
    ids=["constant", "nan", "4d"],
)
def test_invalid_input_raises(magnitude, message):
    with pytest.raises(ValueError, match=message):
        brain_mask(magnitude, (1.0, 1.0, 1.0))


def test_no_brain_sized_object_raises():
    """A bright 2 mm sheet is above threshold but thinner than the 2 x 4 mm erosion."""
    magnitude = np.zeros((32, 32, 32), np.float32)
    magnitude[:, :, 15:17] = 1.0
    with pytest.raises(ValueError, match="empty"):
        brain_mask(magnitude, (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def phantom_head():
    """The head phantom at 2 x 2 x 4 mm, the neck and face in the field of view, and its RSS magnitude."""
    phantom = sample_head((96, 96, 40), (2.0, 2.0, 4.0))
    magnitude, _ = simulate_megre(phantom, (0.004, 0.008, 0.012, 0.016), 3.0, 100.0, np.random.default_rng(0),
                                  oversample=1)
    return phantom, np.sqrt((magnitude ** 2).sum(axis=-1))


def test_phantom_head_mask_drops_neck_and_face(phantom_head):
    """The brainstem joins brain and neck (22 mm wide, past the 4 mm scalp cut); the neck cut removes them.

    Measured: Dice 0.947 and no soft-tissue voxel (the extra-cerebral CSF, bright, makes the rest);
    tolerance Dice >= 0.9 (brief) and under 1 % soft tissue. The nuclei QSM is read in stay inside.
    """
    phantom, rss = phantom_head
    mask = brain_mask(rss, (2.0, 2.0, 4.0))
    soft = phantom.seg == TISSUES["soft_tissue"].label
    nuclei = np.isin(phantom.seg, [TISSUES[n].label for n in ("red_nucleus", "substantia_nigra", "dentate")])
    assert dice(mask, phantom.brain_mask) >= 0.9
    assert np.count_nonzero(mask & soft) < 0.01 * np.count_nonzero(mask)
    assert nuclei.any() and np.all(mask[nuclei])


def test_neck_cut_is_what_drops_the_neck(phantom_head):
    """Without the neck cut (radius 0) the neck and face stay: measured 14 % of the mask, tolerance > 5 %."""
    phantom, rss = phantom_head
    mask = brain_mask(rss, (2.0, 2.0, 4.0), neck_fraction=0.0)
    soft = phantom.seg == TISSUES["soft_tissue"].label
    assert np.count_nonzero(mask & soft) > 0.05 * np.count_nonzero(mask)


def test_skull_stripped_input_keeps_its_brainstem(phantom_head):
    """Magnitude only in the brain (as qsm-forward simulates): no skull, so no neck cut.

    The slices under the cerebellum hold only the brainstem; the neck cut would drop it (measured:
    10 % kept when forced) while the mask keeps 90 %; tolerance 80 %. Dice measured 0.998, tolerance 0.97.
    """
    phantom, rss = phantom_head
    rng = np.random.default_rng(1)
    sigma = rss.max() / 100
    noise = sigma * (rng.standard_normal(rss.shape) + 1j * rng.standard_normal(rss.shape))
    mask = brain_mask(np.abs(rss * phantom.brain_mask + noise), (2.0, 2.0, 4.0))
    assert dice(mask, phantom.brain_mask) > 0.97
    per_slice = phantom.brain_mask.sum(axis=(0, 1))
    brainstem = phantom.brain_mask & ((per_slice > 0) & (per_slice < 100))[None, None, :]
    assert brainstem.any() and np.count_nonzero(mask & brainstem) > 0.8 * np.count_nonzero(brainstem)


NECK_VOXEL_MM = (1.6, 1.6, 3.0)
NECK_SHAPE = (110, 120, 64)


def head_with_neck_and_cerebellum(seed=0):
    """Magnitude, brain, cerebellum, the z coordinate (mm) and the distance (mm) outside the brain.

    Cerebrum (semi-axes 60, 72, 48 mm) over a cerebellum (45, 28, 22 mm) behind a 6 mm dark gap
    (a tentorium with its sinuses), joined by a 6 mm radius peduncle; skull 6 mm, scalp 5 mm; a
    brainstem (9 mm radius) runs through the skull base into a 45 mm radius neck, which rises
    against the skull under the cerebellum.
    """
    centre = (np.array(NECK_SHAPE) - 1) / 2 * np.array(NECK_VOXEL_MM)
    x, y, z = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(NECK_SHAPE, NECK_VOXEL_MM, centre)],
                          indexing="ij")

    def ellipsoid(c, semi_axes):
        return sum(((u - c0) / s) ** 2 for u, c0, s in zip((x, y, z), c, semi_axes)) <= 1

    def capsule(start, end, radius):
        start, axis = np.array(start, float), np.subtract(end, start).astype(float)
        t = np.clip(((x - start[0]) * axis[0] + (y - start[1]) * axis[1] + (z - start[2]) * axis[2]) / (axis @ axis),
                    0.0, 1.0)
        return (x - start[0] - t * axis[0]) ** 2 + (y - start[1] - t * axis[1]) ** 2 + (
            z - start[2] - t * axis[2]) ** 2 <= radius ** 2

    cerebellum = ellipsoid((0, -40, -38), (45, 28, 22))
    brain = ellipsoid((0, 0, 30), (60, 72, 48)) | cerebellum | capsule((0, -35, -5), (0, -35, -25), 6.0)
    outside = ndimage.distance_transform_edt(~brain, sampling=NECK_VOXEL_MM)
    image = np.zeros(NECK_SHAPE, np.float32)
    image[(outside <= 11) | ((x ** 2 + (y + 10) ** 2 <= 45 ** 2) & (z < -30))] = 1.2  # scalp, neck
    image[(outside > 0) & (outside <= 6)] = 0.04  # skull, and the gap between cerebrum and cerebellum
    image[brain | capsule((0, -10, 0), (0, -15, -100), 9.0)] = 1.0  # brain, brainstem
    rng = np.random.default_rng(seed)
    noise = 0.05 * (rng.standard_normal(NECK_SHAPE) + 1j * rng.standard_normal(NECK_SHAPE))
    return np.abs(image + noise).astype(np.float32), brain, cerebellum, z, outside


def test_cerebellum_cut_off_by_the_neck_cut_is_kept():
    """The neck cut separates the cerebellum from the cerebrum; enclosed by skull and scalp, it stays.

    Measured: Dice 0.999, 99.3 % of the cerebellum (its partial-volume rim goes), nothing below the
    skull; tolerances 0.97, 98 %, and no voxel more than 10 mm below the scalp.
    """
    magnitude, brain, cerebellum, z, outside = head_with_neck_and_cerebellum()
    mask = brain_mask(magnitude, NECK_VOXEL_MM)
    assert dice(mask, brain) > 0.97
    assert np.count_nonzero(mask & cerebellum) > 0.98 * np.count_nonzero(cerebellum)
    assert not np.any(mask & (z < z[outside <= 11].min() - 10.0))


def test_decay_fit_recovers_known_s0_and_r2star():
    from metaqsm_bids.qsm.mask.brain import decay_fit

    tes = np.array([5e-3, 10e-3, 15e-3, 20e-3])
    rates = np.array([3.0, 18.0, 40.0]).reshape(3, 1, 1, 1)
    s0 = np.array([0.8, 0.5, 1.2]).reshape(3, 1, 1, 1)
    magnitude = s0 * np.exp(-rates * tes) * np.ones((3, 2, 2, 4))
    magnitude[:, 1] = 0  # no signal: 0 for both
    fitted_s0, fitted_r2star = decay_fit(magnitude, tes)
    assert np.allclose(fitted_r2star[:, 0, 0], [3.0, 18.0, 40.0], rtol=1e-3)
    assert np.allclose(fitted_s0[:, 0, 0], [0.8, 0.5, 1.2], rtol=1e-4)
    assert not fitted_s0[:, 1].any() and not fitted_r2star[:, 1].any()


def test_extracerebral_csf_is_removed_and_ventricles_kept():
    from metaqsm_bids.qsm.mask.brain import remove_extracerebral_csf

    n = 64
    g = np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij")
    r = np.sqrt(sum(x ** 2 for x in g))
    brain = r < 22
    rim = (r >= 22) & (r < 25)  # 3 mm of CSF outside the brain, as bright as tissue
    ventricle = np.sqrt((g[0] - 4) ** 2 + g[1] ** 2 + g[2] ** 2) < 5
    rate = np.where(ventricle | rim, 3.0, 18.0)
    tes = np.array([5e-3, 12e-3, 19e-3, 26e-3])
    magnitude = np.where((brain | rim)[..., None], np.exp(-rate[..., None] * tes), 0).astype(np.float32)
    mask = brain | rim
    cleaned, removed = remove_extracerebral_csf(mask, magnitude, tes, (1.0, 1.0, 1.0))
    assert removed
    assert cleaned[ventricle].all()  # CSF enclosed by brain stays
    assert not cleaned[rim].any()
    assert cleaned[brain].mean() > 0.999


def test_partial_volume_csf_rim_is_removed_by_its_s0():
    """Thick-slice rim voxels, part CSF part brain: tissue-like R2*, but T1-saturated CSF lowers their S0."""
    from metaqsm_bids.qsm.mask.brain import remove_extracerebral_csf

    n = 64
    g = np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij")
    r = np.sqrt(sum(x ** 2 for x in g))
    brain = r < 22
    rim = (r >= 22) & (r < 24)
    nucleus = r < 4  # dark S0 deep inside: tissue, kept
    s0 = np.where(rim, 0.6, np.where(nucleus, 0.5, 1.0))  # rim: 0.6 of the brain's S0
    tes = np.array([5e-3, 12e-3, 19e-3, 26e-3])
    magnitude = np.where((brain | rim)[..., None], s0[..., None] * np.exp(-16.0 * tes), 0).astype(np.float32)
    cleaned, removed = remove_extracerebral_csf(brain | rim, magnitude, tes, (1.0, 1.0, 1.0))
    assert removed
    assert not cleaned[rim].any()
    assert cleaned[brain].all()
    # above 0.8 of the brain's S0 the rim is tissue
    magnitude[rim] *= 0.85 / 0.6
    cleaned, _ = remove_extracerebral_csf(brain | rim, magnitude, tes, (1.0, 1.0, 1.0))
    assert cleaned[rim].all()


def test_mask_does_not_depend_on_storage_orientation():
    """The same head stored axially, flipped and sagittally gets the same mask (per-slice steps run axially)."""
    from metaqsm_bids.qsm.core.physics import axial_axis
    from metaqsm_bids.sim.phantom import sample_head

    head = sample_head((48, 56, 40), (3.0, 3.0, 3.0))
    magnitude = head.m0
    axial = brain_mask(magnitude, (3.0, 3.0, 3.0))
    flipped = brain_mask(magnitude[::-1, :, ::-1], (3.0, 3.0, 3.0))
    assert np.array_equal(flipped[::-1, :, ::-1], axial)
    # sagittal storage: slices along the old i axis, the old k (superior) axis first
    sagittal_affine = np.array([[0, 0, 3.0, 0], [0, 3.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    assert axial_axis(sagittal_affine) == 0 and axial_axis(np.diag([3.0, 3.0, 3.0, 1])) == 2
    stored = np.transpose(magnitude, (2, 1, 0))
    sagittal = brain_mask(stored, (3.0, 3.0, 3.0), axial_axis=axial_axis(sagittal_affine))
    assert np.array_equal(np.transpose(sagittal, (2, 1, 0)), axial)


def test_user_brain_mask_reshapes_names_its_file_and_refuses_an_empty_one():
    from metaqsm_bids.steps.brain_mask import user_brain_mask
    stored = np.zeros((4, 5, 6, 1), np.uint8)  # a mask stored with a trailing axis, as some tools write it
    stored[1:3, 2:4, 3, 0] = 2
    mask, provenance = user_brain_mask(stored, (4, 5, 6), "mask.nii.gz")
    assert mask.shape == (4, 5, 6) and mask.dtype == bool and mask.sum() == 4
    assert provenance == {"Method": "user-provided", "File": "mask.nii.gz", "Voxels": 4}
    assert user_brain_mask(stored, (4, 5, 6))[1] == {"Method": "user-provided", "Voxels": 4}
    with pytest.raises(ValueError, match=r"^mask\.nii\.gz: the brain mask is empty$"):
        user_brain_mask(np.zeros((4, 5, 6)), (4, 5, 6), "mask.nii.gz")
    with pytest.raises(ValueError, match=r"^the brain mask is empty$"):
        user_brain_mask(np.zeros((4, 5, 6)), (4, 5, 6))
