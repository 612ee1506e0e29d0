"""Physical constants, unit conversions and the geometry of B0 relative to the voxel grid."""
import numpy as np

#: Proton gyromagnetic ratio over 2*pi, in Hz/T.
GAMMA_HZ_PER_T = 42.57747892e6


def field_hz_to_ppm(field_hz, b0_tesla):
    """Convert a frequency offset (Hz) to parts per million of the Larmor frequency."""
    return field_hz / (GAMMA_HZ_PER_T * b0_tesla) * 1e6


def field_ppm_to_hz(field_ppm, b0_tesla):
    """Convert a field in ppm of B0 to a frequency offset in Hz."""
    return field_ppm * 1e-6 * GAMMA_HZ_PER_T * b0_tesla


def voxel_size_mm(affine):
    """Voxel edge lengths (mm) of each array axis, from a 4x4 voxel-to-world affine."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def b0_direction_voxel(affine, b0_world=(0.0, 0.0, 1.0)):
    """Unit B0 vector expressed along the voxel axes ``(i, j, k)``.

    NIfTI world coordinates from scanner data are the scanner's RAS frame, in which
    B0 points along +z. For an oblique acquisition the voxel axes are rotated
    relative to that frame, so the dipole kernel must use ``R.T @ b0_world`` where
    ``R`` is the affine's rotation (its columns divided by the voxel sizes). A
    reflection (negative determinant) is handled by the same formula.
    """
    rotation = np.asarray(affine, float)[:3, :3] / voxel_size_mm(affine)
    b0 = rotation.T @ np.asarray(b0_world, float)
    return b0 / np.linalg.norm(b0)


def axial_axis(affine):
    """The array axis (0, 1 or 2) most nearly along world z (inferior-superior) of a voxel-to-world affine."""
    rotation = np.asarray(affine, float)[:3, :3] / voxel_size_mm(affine)
    return int(np.argmax(np.abs(rotation[2])))
