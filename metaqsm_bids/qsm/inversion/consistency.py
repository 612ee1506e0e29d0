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
error lies in the outer 3 mm). No longer diagonal in k-space, it is solved by conjugate gradient on the half
spectrum, from ``chi_net``, with ``(D^2 + lambda)^(-1/2)`` on both sides (the closed form's inverse: exact for a
weight of 1 everywhere): one FFT pair per iteration.
"""
import numpy as np
import scipy.fft as sfft

from ..core.dipole import dipole_kernel
from ..core.grid import PaddedBox
from ..core.smv import depth_mm
from ..core.solvers import _half_spectrum_dot, conjugate_gradient
from .common import check_inputs

#: The networks' default lambda (metaqsm, mesaqsm; ``--network-data-consistency``). On the stage benchmark's
#: qsm-forward heads with metaqsm-v3 (BENCHMARKS.md, "The network's map pulled onto the field, by default"):
#: 1.2-5.3 NRMSE points better from the true local field at all four protocols, 0.1 worse to 4.3 better from
#: the pipeline's own local field on the heads with lesions, 0-0.8 worse on those without, and the large
#: haemorrhage's value from 1.08-1.17 to 1.03-1.08 of its truth.
DEFAULT_LAMBDA = 0.1
#: The networks' default edge distance (mm; ``--network-data-consistency-edge-mm``). With metaqsm-v5 on the
#: realistic-magnitude heads (BENCHMARKS.md, "The data-consistency step with the field weighted down at the
#: edge"): 0.2-0.7 NRMSE points better from the pipeline's own local field, 0.1-0.3 worse from the true local
#: field, no lesion core moved by more than 0.01 of its truth.
DEFAULT_EDGE_MM = 4.0
#: The weighted step's conjugate gradient: relative residual and iteration cap (it stops at the tolerance in
#: 4 iterations on the 1mm-oblique head, 6-7 on the test's small box).
EDGE_TOL = 1e-3
EDGE_MAX_ITER = 30


def data_consistency(chi_net_ppm, local_field_ppm, mask, voxel_size_mm, b0_dir, lambda_, pad_voxels=None,
                     edge_mm=None, info=None):
    """The susceptibility (ppm) nearest ``chi_net_ppm`` whose field fits ``local_field_ppm`` (see the module text).

    ``lambda_`` (> 0, dimensionless) weighs the distance to ``chi_net_ppm``: large keeps it,
    small trusts the field wherever the dipole kernel is not small. ``edge_mm`` (> 0, mm; None: the
    closed form) weighs the field down within that distance of the mask's edge (module text). The FFT box is
    the mask's bounding box padded by ``pad_voxels`` per side (default a quarter of it, as TKD). Returns
    chi (float32, 0 outside the mask); not demeaned: its mean is ``chi_net_ppm``'s. ``info``, when given and
    ``edge_mm`` set, receives the conjugate gradient's ``Iterations`` and ``RelativeResidual``.
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
    if edge_mm is not None:
        weight = np.minimum(np.float32(1), (depth_mm(mask, voxel) / edge_mm).astype(np.float32))
        chi = box.extract(_weighted_solution(box.embed(field), box.embed(np.where(mask, chi_net, np.float32(0))),
                                             box.embed(weight * weight), kernel, np.float32(lambda_), info))
        chi[~mask] = 0.0
        return chi
    weight = np.float32(lambda_)
    spectrum = sfft.rfftn(box.embed(field))
    spectrum *= kernel
    spectrum += weight * sfft.rfftn(box.embed(np.where(mask, chi_net, np.float32(0))))
    spectrum /= kernel ** 2 + weight
    chi = box.extract(sfft.irfftn(spectrum, s=box.shape).astype(np.float32, copy=False))
    chi[~mask] = 0.0
    return chi


def _weighted_solution(field, chi_net, weight2, kernel, lambda_, info):
    """``argmin ||sqrt(weight2) (D * chi - field)||^2 + lambda ||chi - chi_net||^2`` on the box (float32 arrays;
    ``kernel`` the half spectrum of D), by conjugate gradient on ``z`` with ``FFT(chi) = P z``,
    ``P = (D^2 + lambda)^(-1/2)``."""
    shape = field.shape
    scale = (1.0 / np.sqrt(kernel ** 2 + lambda_)).astype(np.float32)
    even = shape[-1] % 2 == 0

    def dot(x, y):
        return _half_spectrum_dot(x, y, even)

    def apply(z):
        applied = kernel * sfft.rfftn(weight2 * sfft.irfftn(kernel * scale * z, s=shape))
        applied += lambda_ * scale * z
        applied *= scale
        return applied

    prior = sfft.rfftn(chi_net)
    rhs = scale * (kernel * sfft.rfftn(weight2 * field) + lambda_ * prior)
    z, iterations, residual = conjugate_gradient(apply, rhs, EDGE_TOL, EDGE_MAX_ITER, x0=prior / scale, dot=dot)
    if info is not None:
        info.update(Iterations=iterations, RelativeResidual=residual)
    return sfft.irfftn(scale * z, s=shape).astype(np.float32, copy=False)
