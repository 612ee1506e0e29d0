"""Cropping a volume to its mask and padding it for FFTs: every FFT-based step works in such a box."""
import numpy as np

from .dipole import padded_shape


def voxel_size_array(voxel_size_mm):
    """``voxel_size_mm`` as a float64 array of 3 edge lengths (mm); ValueError unless they are 3 positive finite
    numbers. Every step that takes a voxel size checks it here."""
    voxel = np.asarray(voxel_size_mm, dtype=np.float64)
    if voxel.shape != (3,) or not np.all(np.isfinite(voxel) & (voxel > 0)):
        raise ValueError(f"voxel_size_mm must be 3 positive lengths, got {voxel_size_mm!r}")
    return voxel


def unit_b0(b0_dir):
    """``b0_dir`` (B0's direction in voxel axes) as a float64 unit 3-vector; ValueError unless it is a finite non-zero
    3-vector."""
    b0 = np.asarray(b0_dir, dtype=np.float64)
    if b0.shape != (3,) or not np.all(np.isfinite(b0)) or not np.linalg.norm(b0) > 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    return b0 / np.linalg.norm(b0)


class PaddedBox:
    """The mask's bounding box, zero-padded by ``pad_voxels`` on each side, on a fast FFT grid
    (or, with ``multiple``, on the next multiple of it: a U-Net's pooling grid).

    ``pad_voxels`` (an int, or one per axis) defaults to a quarter of the box along each axis.
    Working in the box instead of the whole field of view is exact for operators
    that only see the masked data, and much smaller.
    """

    def __init__(self, mask, pad_voxels=None, multiple=None):
        nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        self.crop = tuple(slice(int(nz[0]), int(nz[-1]) + 1) for nz in nonzero)
        cropped = [s.stop - s.start for s in self.crop]
        if pad_voxels is None:
            pad_voxels = [n // 4 for n in cropped]
        elif np.ndim(pad_voxels) == 0:
            pad_voxels = [int(pad_voxels)] * 3
        if multiple is None:
            self.shape = padded_shape(cropped, pad_voxels)
        else:
            self.shape = tuple(-(-(n + 2 * int(p)) // multiple) * multiple for n, p in zip(cropped, pad_voxels))
        self.inner = tuple(slice(int(p), int(p) + n) for p, n in zip(pad_voxels, cropped))
        self.full_shape = mask.shape

    def embed(self, array, dtype=np.float32):
        """Copy the bounding box of ``array`` into a zero array of the padded shape."""
        out = np.zeros(self.shape, dtype=dtype)
        out[self.inner] = array[self.crop]
        return out

    def extract(self, padded):
        """Place the box of ``padded`` back into a zero array of the original shape."""
        out = np.zeros(self.full_shape, dtype=padded.dtype)
        out[self.crop] = padded[self.inner]
        return out
