"""The local field where the measured one is not trusted, predicted from where it is: lesions stay in the map.

The strongest sources, the ones clinical QSM is read for, are where the field measurement fails:
a haemorrhage's or a calcification's signal decays within the first echoes, so its phase is noise
off the echo-time line, and the reliability map (:mod:`metaqsm_bids.qsm.field.reliability`) drops
it. Left out of the map, the lesion is a hole; inverted with its measured field, it is noise and
streaks (TKD NRMSE 123 % against 62 % on the stage benchmark's 0.76x0.76x3 head with lesions,
BENCHMARKS.md). Its field OUTSIDE, in the reliable tissue around it, is measured well, and that
field determines the source (its dipole moment, and its shape as far as a smooth fit can tell).

So the susceptibility of the whole mask is fitted to the reliable voxels' local field alone,

    chi = argmin ||R (D M chi - f)||^2 + alpha ||G M chi||^2,

with ``R`` the reliable voxels, ``M`` the mask, ``D`` the dipole convolution and ``G`` forward
differences per voxel (a gentle smoothness prior: it picks, among the sources the outside field
allows, the smoothest). Conjugate gradient solves the normal equations on the mask's box padded by
:data:`PAD_VOXELS`. The local field of each unreliable voxel is then ``D M chi`` there, and every
inversion runs on the completed field as on a measured one. This is the weighted data fidelity of
MEDI and iLSQR (weight 0 where the field is not trusted) used once, to fill the field, instead of
inside each method; QSMxT's two-pass combination (Stewart et al. 2022) solves the same problem by
inverting twice.
"""
import logging

import numpy as np
import scipy.fft as sfft

from ..core.dipole import dipole_convolve, dipole_kernel
from ..core.grid import PaddedBox
from ..core.solvers import conjugate_gradient, gradient_power

log = logging.getLogger(__name__)

#: Gradient penalty (per voxel, dimensionless): the best whole-brain and lesion scores of 0.001-0.1 on the
#: 0.76x0.76x3 head with lesions (BENCHMARKS.md).
ALPHA = 0.01
#: CG stops at this relative residual (30 iterations there) or after MAX_ITER.
TOL, MAX_ITER = 1e-3, 100
#: Padding of the mask's box (voxels per side) for the dipole convolution.
PAD_VOXELS = 12
_UNIT = (1.0, 1.0, 1.0)


def complete_local_field(local_field, mask, reliable, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), alpha=ALPHA, tol=TOL,
                         max_iter=MAX_ITER):
    """``local_field`` (any unit) with its values in ``mask & ~reliable`` replaced by the field of the
    susceptibility fitted to its values in ``mask & reliable`` (see the module text).

    Returns ``(field, info)``: the completed field (float32, zero outside ``mask``) and a dict with
    ``CompletedVoxels``, ``Iterations``, ``RelativeResidual`` (CG's). Nothing is solved when every
    voxel of the mask is reliable.
    """
    field = np.asarray(local_field, np.float32)
    mask = np.asarray(mask, bool)
    if field.shape != mask.shape or np.shape(reliable) != mask.shape:
        raise ValueError(f"field {field.shape}, mask {mask.shape} and reliable {np.shape(reliable)} must share a shape")
    fitted = mask & np.asarray(reliable, bool)
    missing = mask & ~fitted
    info = {"CompletedVoxels": int(missing.sum()), "Iterations": 0, "RelativeResidual": 0.0}
    if not missing.any():
        return np.where(mask, field, np.float32(0)), info
    if not fitted.any():
        raise ValueError("no reliable voxel in the mask: the local field cannot be completed")

    box = PaddedBox(mask, PAD_VOXELS)
    shape = box.shape
    kernel = dipole_kernel(shape, voxel_size_mm, b0_dir, half=True).astype(np.float32)
    inside, weight = box.embed(mask, bool), box.embed(fitted)

    # G^T G is diagonal in k-space (x is 0 on the box's border, so the circular differences are the plain ones):
    # added to the spectrum the operator transforms anyway, it costs no FFT
    smoothing = np.float32(alpha) * gradient_power(shape, _UNIT)

    def normal_operator(x):
        spectrum = sfft.rfftn(x * inside)
        fitted_field = sfft.irfftn(spectrum * kernel, s=shape, overwrite_x=True)
        fitted_field *= weight
        out_spectrum = sfft.rfftn(fitted_field)
        out_spectrum *= kernel
        spectrum *= smoothing
        out_spectrum += spectrum
        out = sfft.irfftn(out_spectrum, s=shape, overwrite_x=True)
        out *= inside
        return out

    rhs = dipole_convolve(weight * box.embed(np.where(fitted, field, 0)), kernel) * inside
    chi, iterations, residual = conjugate_gradient(normal_operator, rhs, tol, max_iter)
    predicted = box.extract(dipole_convolve(chi * inside, kernel))
    log.info("local field completed in %d voxels: %d CG iterations, relative residual %.3g", missing.sum(),
             iterations, residual)
    info.update(Iterations=int(iterations), RelativeResidual=float(residual))
    return np.where(fitted, field, np.where(missing, predicted, np.float32(0))).astype(np.float32), info
