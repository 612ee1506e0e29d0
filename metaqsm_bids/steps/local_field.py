"""The pipeline's local-field step, shared by the CLI's interface and the benchmarks: reliability map,
background removal on the reliable voxels, and the local field completed over the QSM mask.

* the reliability map (:func:`reliability_map`, its own step:
  :func:`~metaqsm_bids.qsm.field.reliability.reliable_voxels`) says where the total field is trusted; background
  removal fits only there;
* the QSM mask is the brain mask less the voids reaching its surface
  (:func:`~metaqsm_bids.qsm.field.reliability.qsm_region`): lesions, whatever their field, stay;
* a method that takes a noise weight (its spec's ``magnitude`` input: TFI, the default, and PDF) runs on the whole QSM
  mask with weight 0 on unreliable voxels: its background sources are outside the brain, never in a lesion (a
  source PDF may place in a lesion takes the lesion's own field for background); the others (the SMV methods
  RESHARP and V-SHARP, and LBV) need the field in every voxel they filter, so they run on the reliable voxels
  and their mask's inner holes join the QSM mask;
* the local field of the QSM mask's voxels that background removal did not fit is completed from
  the rest (:func:`~metaqsm_bids.qsm.background.completion.complete_local_field`).
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..qsm.background.completion import ALPHA as COMPLETION_ALPHA, complete_local_field
from ..qsm.background.registry import BACKGROUND_REMOVALS
from ..qsm.field.reliability import MIN_SIGNAL_FRACTION, qsm_region, reliable_voxels, residual_threshold_rad
from ..qsm.spec import lookup


@dataclass
class LocalField:
    """Result of :func:`estimate_local_field`: the local field (units of the total field) on ``qsm_mask``
    (zero outside), the reliability map, the residual threshold used (rad, None without a residual), the
    background removal's result (:class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval`, before
    completion), the completion's info and what the step's sidecar records (``provenance``, less the unit)."""

    local_field: np.ndarray
    qsm_mask: np.ndarray
    reliable: np.ndarray
    max_residual_rad: float
    background_removal: object
    completion: dict
    provenance: dict


@dataclass
class Reliability:
    """Result of :func:`reliability_map`: the brain mask's voxels whose total field is trusted, the region the QSM
    mask may cover (:func:`~metaqsm_bids.qsm.field.reliability.qsm_region`), the residual threshold used (rad, None
    without a residual) and what the background removal's sidecar records of them."""

    reliable: np.ndarray
    qsm_region: np.ndarray
    max_residual_rad: float
    provenance: dict


def reliability_map(brain_mask, magnitude_rss, residual_rad=None):
    """:class:`Reliability` of the total field in ``brain_mask``: enough signal in ``magnitude_rss`` (the RSS
    magnitude over echoes) and, when ``residual_rad`` (the echo fit's residual, rad) is given, a residual under the
    brain's threshold (:mod:`metaqsm_bids.qsm.field.reliability`)."""
    brain = np.asarray(brain_mask, bool)
    rss = np.asarray(magnitude_rss, np.float32)
    threshold = residual_threshold_rad(brain, residual_rad) if residual_rad is not None else None
    reliable = reliable_voxels(brain, rss, residual_rad, max_residual_rad=threshold)
    excluded = int(np.count_nonzero(brain & ~reliable))
    provenance = {
        "MinSignalFraction": MIN_SIGNAL_FRACTION,
        **({"MaxResidualRad": round(threshold, 6)} if threshold is not None else {}),  # else no residual test
        "UnreliableVoxelsExcluded": excluded,
        "UnreliableFractionOfBrain": round(excluded / int(brain.sum()), 6),
    }
    return Reliability(reliable, qsm_region(brain, rss), threshold, provenance)


def remove_background_field(method, total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), magnitude=None,
                            parameters=None, b0_tesla=None):
    """Background removal ``method`` alone on ``mask`` (no reliability map, no completion), given the inputs its
    spec takes: ``b0_dir``, ``magnitude`` as its noise weight, ``b0_tesla``. ``parameters``: its settings (a dict;
    its spec's defaults for what it lacks). Returns its
    :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval`."""
    spec = lookup(BACKGROUND_REMOVALS, method, "background field removal")
    available = {"b0_dir": b0_dir, "magnitude": magnitude, "b0_tesla": b0_tesla}
    return spec.function(total_field, mask, voxel_size_mm, **vars(spec.settings(parameters)),
                         **spec.keyword_inputs(available))


def estimate_local_field(method, total_field, brain_mask, magnitude_rss, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0),
                         residual_rad=None, parameters=None, reliability=None, b0_tesla=None):
    """Local field on the QSM mask from the total field (any unit) by background removal ``method``.

    ``magnitude_rss``: the RSS magnitude over echoes (the reliability test; the noise weight of the methods that
    take one); ``residual_rad``: the echo fit's residual (rad), or None for no residual test; ``parameters``: the
    method's settings (a dict; its spec's defaults for what it lacks); ``reliability``: the
    :func:`reliability_map` of these (computed here when None); ``b0_tesla``: B0 (T), for the methods whose spec
    takes it (TFI). See the module text.
    """
    spec = lookup(BACKGROUND_REMOVALS, method, "background field removal")
    settings = spec.settings(parameters)
    rss = np.asarray(magnitude_rss, np.float32)
    if reliability is None:
        reliability = reliability_map(brain_mask, rss, residual_rad)
    reliable, region = reliability.reliable, reliability.qsm_region
    if "magnitude" in spec.inputs:
        result = remove_background_field(method, total_field, region, voxel_size_mm, b0_dir,
                                         magnitude=np.where(reliable, rss, 0), parameters=parameters,
                                         b0_tesla=b0_tesla)
        qsm_mask, fitted = result.mask, result.mask & reliable
    else:
        result = remove_background_field(method, total_field, reliable, voxel_size_mm, b0_dir, parameters=parameters,
                                         b0_tesla=b0_tesla)
        qsm_mask, fitted = ndi.binary_fill_holes(result.mask) & region, result.mask
    local, completion = complete_local_field(result.local_field, qsm_mask, fitted, voxel_size_mm, b0_dir)
    provenance = {
        **spec.sidecar(settings),
        **(result.parameters or {}),
        "Iterations": int(result.iterations),
        "RelativeResidual": float(result.relative_residual),
        **reliability.provenance,
        "UnreliableVoxels": (
            "left out of the background removal's fit; those in the QSM mask (CompletedVoxels) get the field "
            "of the susceptibility fitted to the reliable voxels' local field (weighted least squares, "
            "gradient penalty {:g}; metaqsm_bids.qsm.background.completion) and are inverted with the "
            "rest".format(COMPLETION_ALPHA)),
        "CompletedVoxels": completion["CompletedVoxels"],
        "CompletionIterations": completion["Iterations"],
    }
    return LocalField(np.asarray(local, np.float32), qsm_mask, reliable, reliability.max_residual_rad, result,
                      completion, provenance)
