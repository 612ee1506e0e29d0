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
"""
import numpy as np
import scipy.fft as sfft

from ..core.dipole import dipole_kernel
from ..core.grid import PaddedBox
from .common import check_inputs

#: The networks' default lambda (metaqsm, mesaqsm; ``--network-data-consistency``). On the stage benchmark's
#: qsm-forward heads with metaqsm-v3 (BENCHMARKS.md, "The network's map pulled onto the field, by default"):
#: 1.2-5.3 NRMSE points better from the true local field at all four protocols, 0.1 worse to 4.3 better from
#: the pipeline's own local field on the heads with lesions, 0-0.8 worse on those without, and the large
#: haemorrhage's value from 1.08-1.17 to 1.03-1.08 of its truth.
DEFAULT_LAMBDA = 0.1


def data_consistency(chi_net_ppm, local_field_ppm, mask, voxel_size_mm, b0_dir, lambda_, pad_voxels=None):
    """The susceptibility (ppm) nearest ``chi_net_ppm`` whose field fits ``local_field_ppm`` (see the module text).

    ``lambda_`` (> 0, dimensionless) weighs the distance to ``chi_net_ppm``: large keeps it,
    small trusts the field wherever the dipole kernel is not small. The FFT box is the mask's
    bounding box padded by ``pad_voxels`` per side (default a quarter of it, as TKD). Returns
    chi (float32, 0 outside the mask); not demeaned: its mean is ``chi_net_ppm``'s.
    """
    if not (np.isfinite(lambda_) and lambda_ > 0):
        raise ValueError(f"data-consistency lambda must be positive and finite, got {lambda_!r}")
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    chi_net = np.asarray(chi_net_ppm, dtype=np.float32)
    if chi_net.shape != mask.shape:
        raise ValueError(f"network susceptibility shape {chi_net.shape} does not match the local field's {mask.shape}")
    if not np.all(np.isfinite(chi_net[mask])):
        raise ValueError("network susceptibility has NaN or infinite values inside the mask")
    box = PaddedBox(mask, pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0, half=True)
    weight = np.float32(lambda_)
    spectrum = sfft.rfftn(box.embed(field))
    spectrum *= kernel
    spectrum += weight * sfft.rfftn(box.embed(np.where(mask, chi_net, np.float32(0))))
    spectrum /= kernel ** 2 + weight
    chi = box.extract(sfft.irfftn(spectrum, s=box.shape).astype(np.float32, copy=False))
    chi[~mask] = 0.0
    return chi
