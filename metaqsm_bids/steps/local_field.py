"""The pipeline's local-field step, shared by the CLI's interface and the benchmarks: reliability map,
background removal on the reliable voxels, and the local field completed over the QSM mask.

* the reliability map (:func:`~metaqsm_bids.qsm.field.reliability.reliable_voxels`) says where the
  total field is trusted; background removal fits only there;
* the QSM mask is the brain mask less the voids reaching its surface
  (:func:`~metaqsm_bids.qsm.field.reliability.qsm_region`): lesions, whatever their field, stay;
* PDF (the default) runs on the whole QSM mask with weight 0 on unreliable voxels: its background
  sources are outside the brain, never in a lesion (a source PDF may place in a lesion takes the
  lesion's own field for background); the SMV methods (RESHARP, V-SHARP, LBV) need the field in
  every voxel they filter, so they run on the reliable voxels and their mask's inner holes join
  the QSM mask;
* the local field of the QSM mask's voxels that background removal did not fit is completed from
  the rest (:func:`~metaqsm_bids.qsm.background.completion.complete_local_field`).
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..qsm.background.completion import complete_local_field
from ..qsm.background.registry import remove_background
from ..qsm.field.reliability import qsm_region, reliable_voxels, residual_threshold_rad


@dataclass
class LocalField:
    """Result of :func:`estimate_local_field`: the local field (units of the total field) on ``qsm_mask``
    (zero outside), the reliability map, the residual threshold used (rad, None without a residual), the
    background removal's result (:class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval`, before
    completion) and the completion's info."""

    local_field: np.ndarray
    qsm_mask: np.ndarray
    reliable: np.ndarray
    max_residual_rad: float
    background_removal: object
    completion: dict


def estimate_local_field(method, total_field, brain_mask, magnitude_rss, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0),
                         residual_rad=None, radius_mm=None):
    """Local field on the QSM mask from the total field (any unit) by background removal ``method``.

    ``magnitude_rss``: the RSS magnitude over echoes (the reliability test; PDF's weight);
    ``residual_rad``: the echo fit's residual (rad), or None for no residual test; ``radius_mm``:
    RESHARP's kernel radius (None: its default; the other methods have none). See the module text.
    """
    params = {"radius_mm": radius_mm} if method == "resharp" and radius_mm is not None else {}
    brain = np.asarray(brain_mask, bool)
    rss = np.asarray(magnitude_rss, np.float32)
    threshold = residual_threshold_rad(brain, residual_rad) if residual_rad is not None else None
    reliable = reliable_voxels(brain, rss, residual_rad, max_residual_rad=threshold)
    region = qsm_region(brain, rss)
    if method == "pdf":
        result = remove_background(method, total_field, region, voxel_size_mm, b0_dir,
                                   magnitude=np.where(reliable, rss, 0))
        qsm_mask, fitted = result.mask, result.mask & reliable
    else:
        result = remove_background(method, total_field, reliable, voxel_size_mm, b0_dir, **params)
        qsm_mask, fitted = ndi.binary_fill_holes(result.mask) & region, result.mask
    local, completion = complete_local_field(result.local_field, qsm_mask, fitted, voxel_size_mm, b0_dir)
    return LocalField(local, qsm_mask, reliable, threshold, result, completion)
