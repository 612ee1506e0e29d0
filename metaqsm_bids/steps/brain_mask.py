"""The pipeline's brain-mask step, shared by the CLI's interface, the benchmarks and the in-process pipeline: a
mask of the root-sum-of-squares magnitude over echoes, less the CSF between brain and skull when the decay tells it
(two echoes or more)."""
import numpy as np

from ..qsm.mask.brain import (CSF_R2STAR_HZ_AT_3T, CSF_S0_FRACTION, CSF_S0_RIM_MM, brain_mask,
                              remove_extracerebral_csf)


def magnitude_rss(magnitude):
    """The root-sum-of-squares (float32) of a 4D magnitude over its echoes (last axis): the image the brain mask
    is computed from, the reliability test's and the noise weight of the methods that take one."""
    magnitude = np.asarray(magnitude, np.float32)
    return np.sqrt((magnitude ** 2).sum(-1))


def user_brain_mask(mask, shape, source=None):
    """``(mask, provenance)`` of a user's brain mask: ``mask`` (any numeric array) reshaped to the run's 3D
    ``shape``, brain where > 0; ``source`` (its file, if any) is named in the provenance and in the ValueError an
    empty mask raises."""
    mask = np.asarray(mask).reshape(shape) > 0
    if not mask.any():
        raise ValueError(f"{source}: the brain mask is empty" if source else "the brain mask is empty")
    return mask, {"Method": "user-provided", **({"File": source} if source else {}), "Voxels": int(mask.sum())}


def compute_brain_mask(magnitude, voxel_size_mm, echo_times_s, b0_tesla, axial_axis=2):
    """``(mask, provenance)``: the brain mask (bool) of the 4D ``magnitude`` (echo last) and what its sidecar records.

    :func:`~metaqsm_bids.qsm.mask.brain.brain_mask` of :func:`magnitude_rss` (``axial_axis``: the array axis
    nearest world z, :func:`metaqsm_bids.qsm.core.physics.axial_axis`), then with two ``echo_times_s`` (s) or more
    :func:`~metaqsm_bids.qsm.mask.brain.remove_extracerebral_csf` (its R2* threshold scales with ``b0_tesla``).
    An empty mask is a ValueError.
    """
    magnitude = np.asarray(magnitude, np.float32)
    mask = brain_mask(magnitude_rss(magnitude), voxel_size_mm, axial_axis=axial_axis)
    provenance = {"Method": "magnitude threshold + morphology (metaqsm_bids.qsm.mask.brain.brain_mask)",
                  "Input": "root-sum-of-squares magnitude over echoes"}
    removed = False
    if len(echo_times_s or ()) > 1:
        mask, removed = remove_extracerebral_csf(mask, magnitude, echo_times_s, voxel_size_mm, b0_tesla=b0_tesla)
    provenance["ExtracerebralCSF"] = (
        "removed: voxels with R2* below {:g} s^-1 outside the brain closed by 3 mm, and voxels "
        "within {:g} mm of its surface with S0 below {:g} x the deep brain's "
        "(metaqsm_bids.qsm.mask.brain.remove_extracerebral_csf)".format(
            CSF_R2STAR_HZ_AT_3T * b0_tesla / 3.0, CSF_S0_RIM_MM, CSF_S0_FRACTION) if removed
        else "kept (one echo, or the decay could not tell CSF from tissue)")
    if not mask.any():
        raise ValueError("the brain mask is empty")
    provenance["Voxels"] = int(mask.sum())
    return mask, provenance
