"""What every dipole inversion shares: the check of its inputs and the convention of its output."""
import numpy as np


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
    voxel = np.asarray(voxel_size_mm, dtype=float)
    if voxel.shape != (3,) or not np.all(voxel > 0):
        raise ValueError(f"voxel_size_mm must be 3 positive lengths, got {voxel_size_mm!r}")
    b0 = np.asarray(b0_dir, dtype=float)
    if b0.shape != (3,) or not np.all(np.isfinite(b0)) or not np.linalg.norm(b0) > 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    field = np.where(mask, field.astype(np.float32, copy=False), np.float32(0))
    return field, mask, tuple(voxel), b0 / np.linalg.norm(b0)


def zero_mean_in_mask(chi, mask):
    """``chi`` (changed in place and returned) with mean 0 in ``mask`` and 0 outside it: the analytic
    inversions' output (chi is only known up to a constant, and only inside the mask)."""
    chi[mask] -= chi[mask].mean(dtype=np.float64)
    chi[~mask] = 0.0
    return chi
