"""Closed-form k-space data consistency: pull a susceptibility estimate (a network's) onto the measured field.

    chi = argmin ||D * chi - f||^2 + lambda ||chi - chi_net||^2
        = IFFT( (D FFT(f) + lambda FFT(chi_net)) / (D^2 + lambda) )

(``D`` is real, so ``conj(D) = D``.) Where ``D^2 >> lambda`` the field decides, which removes a
network's errors there (its scale bias, say); near the magic-angle cone, where the field carries
no information, ``chi_net`` is kept, and at ``k = 0`` (``D = 0``) so is its mean. chi and the field
are both in ppm and D has no unit, so ``lambda`` is dimensionless: the field's weight at a
frequency is ``D^2 / (D^2 + lambda)``. Both terms are diagonal in k-space: one FFT per input and
one back, on the same padded box as TKD and L2 (the field counts as 0 outside the mask there,
as in those inversions).

With ``edge_mm`` the field's term is weighted, ``||W (D * chi - f)||^2`` with ``W = min(1, depth / edge_mm)``
inside the mask (depth: the distance to the mask's edge in mm, the field of view's edge included) and 0
outside: the field counts only where it was measured, and less within ``edge_mm`` of the edge, where
background removal leaves most of its error (BENCHMARKS.md, "Where PDF's error is": half of PDF's squared
error lies in the outer 3 mm). No longer diagonal in k-space, it is taken :data:`EDGE_STEPS` majorize-minimize
steps from ``chi_net``: as ``W^2 <= 1``, ``||W (D chi - f)||^2 <= ||D chi - g_k||^2 + const`` with equality at
``chi_k``, for ``g_k = W^2 f + (1 - W^2) D chi_k`` (the field where it is trusted, the current map's own field where
it is not), and each step is the closed form above with ``g_k`` for ``f``: two FFT pairs for the first step, one
more per step; the objective decreases at every step and its minimiser is the steps' fixed point.
"""
import numpy as np
import scipy.fft as sfft

from ..core.dipole import dipole_kernel
from ..core.grid import PaddedBox
from ..core.smv import depth_mm
from .common import check_inputs

#: The networks' default lambda (metaqsm, mesaqsm; ``--network-data-consistency``). On the stage benchmark's
#: qsm-forward heads with metaqsm-v3 (BENCHMARKS.md, "The network's map pulled onto the field, by default"):
#: 1.2-5.3 NRMSE points better from the true local field at all four protocols, 0.1 worse to 4.3 better from
#: the pipeline's own local field on the heads with lesions, 0-0.8 worse on those without, and the large
#: haemorrhage's value from 1.08-1.17 to 1.03-1.08 of its truth.
DEFAULT_LAMBDA = 0.1
#: The networks' default edge distance (mm; ``--network-data-consistency-edge-mm``). 4 mm with metaqsm-v5 on the
#: realistic-magnitude heads at all four protocols (BENCHMARKS.md, "The data-consistency step with the field
#: weighted down at the edge"): 0.6-1.5 NRMSE points better than the closed form from the pipeline's own local
#: field (0.2-0.7 on the heads with lesions), 0.1-0.5 worse from the true local field, no lesion core moved by more
#: than 0.01 of its truth. 6 mm with metaqsm-v9 (BENCHMARKS.md, "metaqsm-v9"): 0.3-0.5 better than 4 mm from the
#: pipeline's field (0.2-0.3 with lesions; XSIM at 1 mm above MEDI's), 0.2-0.5 worse from the true local field, no
#: lesion core moved (to 0.01 of its truth).
DEFAULT_EDGE_MM = 6.0
#: Majorize-minimize steps of the edge-weighted form. One: from the pipeline's local field (PDF) on the
#: realistic-magnitude heads it scores as the weighted objective's minimiser (by conjugate gradient: 4-7 FFT pairs
#: more) to 0.02 NRMSE points, 0.1-0.4 behind it from the true local field, for one FFT pair more than the closed
#: form (BENCHMARKS.md, "The data-consistency step with the field weighted down at the edge").
EDGE_STEPS = 1


def data_consistency(chi_net_ppm, local_field_ppm, mask, voxel_size_mm, b0_dir, lambda_, pad_voxels=None,
                     edge_mm=None):
    """The susceptibility (ppm) nearest ``chi_net_ppm`` whose field fits ``local_field_ppm`` (see the module text).

    ``lambda_`` (> 0, dimensionless) weighs the distance to ``chi_net_ppm``: large keeps it,
    small trusts the field wherever the dipole kernel is not small. ``edge_mm`` (> 0, mm; None: the
    closed form) weighs the field down within that distance of the mask's edge (module text). The FFT box is
    the mask's bounding box padded by ``pad_voxels`` per side (default a quarter of it, as TKD). Returns
    chi (float32, 0 outside the mask); not demeaned: its mean is ``chi_net_ppm``'s.
    """
    if not (np.isfinite(lambda_) and lambda_ > 0):
        raise ValueError(f"data-consistency lambda must be positive and finite, got {lambda_!r}")
    if edge_mm is not None and not (np.isfinite(edge_mm) and edge_mm > 0):
        raise ValueError(f"data-consistency edge distance must be positive and finite (mm), got {edge_mm!r}")
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    chi_net = np.asarray(chi_net_ppm, dtype=np.float32)
    if chi_net.shape != mask.shape:
        raise ValueError(f"network susceptibility shape {chi_net.shape} does not match the local field's {mask.shape}")
    if not np.all(np.isfinite(chi_net[mask])):
        raise ValueError("network susceptibility has NaN or infinite values inside the mask")
    box = PaddedBox(mask, pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0, half=True)
    field_box = box.embed(field)
    prior = sfft.rfftn(box.embed(np.where(mask, chi_net, np.float32(0))))
    if edge_mm is None:
        spectrum = _closed_form(sfft.rfftn(field_box), prior, kernel, np.float32(lambda_))
    else:
        weight = edge_weight(mask, voxel, edge_mm)
        spectrum = edge_weighted_steps(field_box, prior, box.embed(weight * weight), kernel, np.float32(lambda_),
                                       prior, EDGE_STEPS)
    chi = box.extract(sfft.irfftn(spectrum, s=box.shape).astype(np.float32, copy=False))
    chi[~mask] = 0.0
    return chi


def edge_weight(mask, voxel_size_mm, edge_mm):
    """``W = min(1, depth / edge_mm)`` in ``mask`` (depth: mm to its edge, the field of view's included), 0 outside
    (float32; module text)."""
    return np.minimum(np.float32(1), (depth_mm(mask, voxel_size_mm, edge_mm) / edge_mm).astype(np.float32))


def _closed_form(field_spectrum, prior, kernel, lambda_):
    """The closed form's half spectrum, ``(D F + lambda X) / (D^2 + lambda)``, in ``field_spectrum``'s memory."""
    field_spectrum *= kernel
    field_spectrum += lambda_ * prior
    field_spectrum /= kernel ** 2 + lambda_
    return field_spectrum


def edge_weighted_steps(field, prior, weight2, kernel, lambda_, start, steps):
    """``steps`` majorize-minimize steps (module text) of ``||sqrt(weight2) (D chi - field)||^2 + lambda ||chi -
    chi_net||^2`` on the box from the map whose half spectrum is ``start``; ``prior`` is chi_net's half spectrum,
    ``kernel`` D's, ``field`` and ``weight2`` real arrays of the box. Returns the last map's half spectrum."""
    spectrum = start
    for _ in range(steps):
        own_field = sfft.irfftn(kernel * spectrum, s=field.shape, overwrite_x=True)
        target = field * weight2
        target += (1 - weight2) * own_field
        spectrum = _closed_form(sfft.rfftn(target), prior, kernel, lambda_)
    return spectrum
