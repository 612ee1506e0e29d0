"""The susceptibility reference: the region whose mean chi is set to 0 (QSM measures chi up to a constant).

The dipole kernel is 0 at k = 0, so the field says nothing about the mean susceptibility: every inversion
returns chi with mean 0 in the QSM mask (:mod:`metaqsm_bids.qsm.inversion.registry`), i.e. referenced to the
whole brain. :func:`reference_chi` makes that choice explicit and records it:

* ``brain`` (:data:`DEFAULT_REFERENCE`): the mean over the QSM mask (the brain less the voids that reach its
  surface). The 2024 consensus (QSM Consensus Organization Committee, "Recommended implementation of
  quantitative susceptibility mapping for clinical research in the brain", MRM 91:1834) recommends measuring
  susceptibility relative to a specified reference and including the whole brain as a common reference region;
  it needs no segmentation and is what the inversions give, so the Chimap's values stay as they were (the
  mean subtracted is float32 rounding, about 1e-9 ppm).
* ``csf``: the mean over the ventricular CSF, found by :func:`ventricular_csf` from the R2* map. CSF is a
  common zero (it is nearly free water), but its measured chi depends on the region drawn and on the
  orientation-dependent white matter around the ventricles; needs two echoes or more.
* ``none``: the inversion's output unchanged (its mean in the QSM mask is 0 by construction).

The mean over the region is taken before subtracting and returned in ppm; chi stays 0 outside the QSM mask.
"""
import numpy as np
from scipy import ndimage as ndi

from .core.smv import depth_mm
from .mask.brain import CSF_R2STAR_HZ_AT_3T

#: ``--reference`` choices.
REFERENCE_CHOICES = ("brain", "csf", "none")
#: The reference used unless asked otherwise (see the module's docstring).
DEFAULT_REFERENCE = "brain"
#: Ventricles are looked for deeper than this fraction of the QSM mask's largest depth (distance to its
#: surface): the lateral ventricles lie in the brain's central third, the sulcal and cisternal CSF outside it.
CSF_MIN_DEPTH_FRACTION = 0.3
#: Connected pieces of low-R2* voxels smaller than this fraction of the largest are dropped (noise, vessels'
#: edges); the lateral ventricles need not touch at a coarse resolution, so more than one piece may stay.
CSF_MIN_PIECE_FRACTION = 0.1
#: Fewest voxels a ventricular CSF region may have: fewer give a mean dominated by noise.
CSF_MIN_VOXELS = 20


def ventricular_csf(r2star_hz, qsm_mask, voxel_size_mm, b0_tesla=3.0):
    """The ventricular CSF in ``qsm_mask``: voxels with R2* (1/s) at most :data:`CSF_R2STAR_HZ_AT_3T` (x B0/3 T;
    CSF is 2-5 s^-1, tissue 15 and up; a long T2* is the same test, T2* = 1/R2*) deeper than
    :data:`CSF_MIN_DEPTH_FRACTION` of the mask's largest depth, in their connected pieces (6-connectivity) of at
    least :data:`CSF_MIN_PIECE_FRACTION` of the largest. Partial-volume voxels at the ventricles' edges decay
    faster than the threshold and are left out.

    Raises ValueError with what to do when fewer than :data:`CSF_MIN_VOXELS` voxels are found."""
    mask = np.asarray(qsm_mask, bool)
    r2star = np.asarray(r2star_hz, dtype=np.float32)
    if r2star.shape != mask.shape:
        raise ValueError(f"R2* map {r2star.shape} and QSM mask {mask.shape} differ in shape")
    depth = depth_mm(mask, voxel_size_mm)
    threshold = CSF_R2STAR_HZ_AT_3T * b0_tesla / 3.0
    candidates = mask & (depth > CSF_MIN_DEPTH_FRACTION * depth.max()) & (r2star <= threshold)
    labels, n = ndi.label(candidates)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= CSF_MIN_PIECE_FRACTION * sizes.max()) + 1
        candidates = np.isin(labels, keep)
    found = int(candidates.sum())
    if found < CSF_MIN_VOXELS:
        raise ValueError(f"no ventricular CSF found for --reference csf: {found} voxels deep in the QSM mask have "
                         f"R2* <= {threshold:g} 1/s (need {CSF_MIN_VOXELS}); check the R2starmap (CSF should be "
                         "its darkest part) or use --reference brain")
    return candidates


def reference_chi(chi_ppm, qsm_mask, region="brain", r2star_hz=None, voxel_size_mm=None, b0_tesla=3.0):
    """``(chi, reference_mask, mean_ppm)``: ``chi_ppm`` less its mean over the ``region``
    (:data:`REFERENCE_CHOICES`) inside ``qsm_mask``, the region (bool; None for ``none``) and that mean (ppm,
    before subtracting; None for ``none``). ``csf`` needs ``r2star_hz`` and ``voxel_size_mm``."""
    if region not in REFERENCE_CHOICES:
        raise ValueError(f"unknown reference {region!r}; choose from {', '.join(REFERENCE_CHOICES)}")
    chi = np.array(chi_ppm, dtype=np.float32)
    mask = np.asarray(qsm_mask, bool)
    if region == "none":
        return chi, None, None
    if region == "csf":
        if r2star_hz is None or voxel_size_mm is None:
            raise ValueError("--reference csf needs the R2* map, which needs two echoes or more; use "
                             "--reference brain")
        reference = ventricular_csf(r2star_hz, mask, voxel_size_mm, b0_tesla)
    else:
        reference = mask
    if not reference.any():
        raise ValueError("the QSM mask is empty: no reference region")
    mean = float(chi[reference].mean(dtype=np.float64))
    chi[mask] -= np.float32(mean)
    return chi, reference, mean
