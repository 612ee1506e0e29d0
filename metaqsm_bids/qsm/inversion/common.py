"""What every dipole inversion shares: the check of its inputs and the convention of its output."""
import numpy as np

from ..core.grid import unit_b0, voxel_size_array


def check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir):
    """Validate an inversion's inputs.

    Returns the field as float32 set to 0 outside the mask (it is only known
    inside), the mask as bool, the voxel sizes (mm) and the unit B0 vector.
    """
    field = np.asarray(local_field_ppm)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"local field must be a 3D array, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} does not match local field shape {field.shape}")
    mask = mask != 0
    if not mask.any():
        raise ValueError("mask is empty: no voxel to invert")
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("local field has NaN or infinite values inside the mask")
    voxel = voxel_size_array(voxel_size_mm)
    field = np.where(mask, field.astype(np.float32, copy=False), np.float32(0))
    return field, mask, tuple(voxel), unit_b0(b0_dir)


def zero_mean_in_mask(chi, mask):
    """``chi`` (changed in place and returned) with mean 0 in ``mask`` and 0 outside it: the analytic
    inversions' output (chi is only known up to a constant, and only inside the mask)."""
    chi[mask] -= chi[mask].mean(dtype=np.float64)
    chi[~mask] = 0.0
    return chi
