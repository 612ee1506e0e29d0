"""The pipeline's last step, shared by the CLI's interface and the in-process pipeline: the Chimap less its mean
over the reference region (:mod:`metaqsm_bids.qsm.reference`)."""
from ..qsm.mask.brain import CSF_R2STAR_HZ_AT_3T
from ..qsm.reference import CSF_MIN_DEPTH_FRACTION, CSF_MIN_PIECE_FRACTION, DEFAULT_REFERENCE, reference_chi


def reference_susceptibility(chi_ppm, qsm_mask, b0_tesla, region=DEFAULT_REFERENCE, r2star_hz=None,
                             voxel_size_mm=None):
    """``(chi, reference_mask, provenance)``: ``chi_ppm`` (float32) less its mean over ``region`` in ``qsm_mask``
    (:func:`~metaqsm_bids.qsm.reference.reference_chi`: ``brain``, the QSM mask; ``csf``, the ventricular CSF found
    from ``r2star_hz`` (1/s), whose threshold scales with ``b0_tesla``; ``none``), the region (bool; None for
    ``none``) and what the Chimap's sidecar records of it."""
    chi, reference, mean = reference_chi(chi_ppm, qsm_mask, region, r2star_hz=r2star_hz, voxel_size_mm=voxel_size_mm,
                                         b0_tesla=b0_tesla)
    method = {
        "brain": "mean over the QSM mask (the whole brain)",
        "csf": "mean over the ventricular CSF: R2* at most {:g} 1/s deeper than {:g} of the QSM mask's largest "
               "depth, connected pieces of at least {:g} of the largest (metaqsm_bids.qsm.reference."
               "ventricular_csf)".format(CSF_R2STAR_HZ_AT_3T * b0_tesla / 3.0, CSF_MIN_DEPTH_FRACTION,
                                         CSF_MIN_PIECE_FRACTION),
        "none": "none: the inversion's output (mean 0 in the QSM mask, as every inversion sets it)",
    }[region]
    provenance = {"Region": region, "Method": method}
    if region != "none":
        provenance.update(MeanBeforeReferencingPpm=mean, Voxels=int(reference.sum()))
    return chi, reference, provenance
