"""Spherical mean value (SMV) kernels and erosion by an SMV sphere drawn in mm
(RESHARP, V-SHARP, iLSQR's fast QSM)."""
import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from .grid import PaddedBox, voxel_size_array


def _sphere_half_extent(voxel_size_mm, radius_mm):
    """Validate the geometry; return voxel sizes (mm) and the voxels the sphere reaches along each axis."""
    voxel = voxel_size_array(voxel_size_mm)
    if not radius_mm > 0:
        raise ValueError(f"SMV radius must be positive, got {radius_mm!r} mm")
    # the tolerance keeps voxels lying exactly on the sphere (e.g. 6 mm = 8 x 0.75 mm)
    half = np.floor(radius_mm / voxel * (1 + 1e-9)).astype(int)
    if not np.any(half > 0):
        raise ValueError(
            f"SMV radius {radius_mm} mm is smaller than every voxel edge {tuple(voxel)} mm: "
            "the sphere holds a single voxel"
        )
    return voxel, half


def _smv_ball(shape, voxel_size_mm, radius_mm):
    """SMV sphere as a float array of ``shape`` centred on voxel 0 (FFT order), summing to 1."""
    voxel, half = _sphere_half_extent(voxel_size_mm, radius_mm)
    if np.any(2 * half + 1 > np.asarray(shape)):
        raise ValueError(f"SMV sphere of {radius_mm} mm does not fit in an array of shape {tuple(shape)}")
    offsets = [np.arange(-h, h + 1) for h in half]
    di, dj, dk = np.meshgrid(*offsets, indexing="ij", sparse=True)
    ball = (di * voxel[0]) ** 2 + (dj * voxel[1]) ** 2 + (dk * voxel[2]) ** 2 <= radius_mm ** 2 * (1 + 1e-9)
    image = np.zeros(shape, dtype=np.float64)
    # negative offsets wrap to the end of each axis
    image[np.ix_(*[o % n for o, n in zip(offsets, shape)])] = ball / ball.sum()
    return image, int(ball.sum())


def smv_kernel(shape, voxel_size_mm, radius_mm, rfft=False):
    """Spherical mean value kernel in k-space (float32, FFT order, real, DC = 1).

    The sphere is drawn in mm, so it is an ellipsoid in voxels when the voxels are
    anisotropic; it holds every voxel whose centre is within ``radius_mm`` of the
    centre and sums to 1. With ``rfft=True`` only the half spectrum matching
    :func:`scipy.fft.rfftn` is returned (last axis ``shape[2] // 2 + 1``).
    """
    image, _ = _smv_ball(shape, voxel_size_mm, radius_mm)
    spectrum = sfft.rfftn(image) if rfft else sfft.fftn(image)
    # the ball is symmetric under i -> -i on each axis, so its spectrum is real
    return np.ascontiguousarray(spectrum.real, dtype=np.float32)


def _check_mask(mask):
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    return mask


def _erode_in_box(mask, voxel_size_mm, radius_mm):
    """Erode ``mask`` by the SMV sphere; return the padded box, its SMV half spectrum and the eroded box."""
    _, half = _sphere_half_extent(voxel_size_mm, radius_mm)
    box = PaddedBox(mask, half)
    ball, n_ball = _smv_ball(box.shape, voxel_size_mm, radius_mm)
    smv_half = sfft.rfftn(ball).real
    # float64 here: the sphere mean drops by 1/n_ball when a single voxel is missing,
    # which float32 round-off could blur for spheres of tens of thousands of voxels
    mean = sfft.irfftn(sfft.rfftn(box.embed(mask, np.float64)) * smv_half, s=box.shape)
    eroded = mean > 1.0 - 0.5 / n_ball
    if not eroded.any():
        raise ValueError(
            f"mask is empty after erosion by the {radius_mm} mm SMV sphere "
            f"(voxel size {tuple(float(v) for v in voxel_size_mm)} mm); use a smaller radius"
        )
    return box, smv_half.astype(np.float32), eroded


def erode_mask(mask, voxel_size_mm, radius_mm):
    """Voxels of ``mask`` whose whole sphere of ``radius_mm`` (drawn in mm) lies in the mask.

    Voxels outside the array count as outside the mask. Returns a bool array.
    """
    mask = _check_mask(mask)
    box, _, eroded = _erode_in_box(mask, voxel_size_mm, radius_mm)
    return box.extract(eroded)


def distance_mm(mask, voxel_size_mm, cap_mm=None):
    """Euclidean distance (mm, float64) from each True voxel of ``mask`` to the nearest False voxel of the array
    (0 on False voxels), as ``scipy.ndimage.distance_transform_edt(mask, sampling=voxel_size_mm)``.

    With ``cap_mm`` it is exact up to ``cap_mm`` and above ``cap_mm`` beyond (inf where no False voxel lies within
    ``cap_mm`` along every axis), so every test against a distance <= ``cap_mm`` comes out as with the exact one;
    it takes 4-7x less time than scipy's at a few mm (scipy computes the whole feature transform): the squared
    distance separates into one minimum per axis, min over offsets |o| <= cap / voxel edge of the squared distance
    so far at i + o plus (o voxel)^2, and a nearest False voxel within ``cap_mm`` is within those offsets along
    each axis.
    """
    mask = np.asarray(mask, bool)
    voxel = np.asarray(voxel_size_mm, dtype=float)
    if cap_mm is None:
        return ndi.distance_transform_edt(mask, sampling=voxel)
    squared = np.where(mask, np.inf, 0.0)
    shifted = np.empty_like(squared)
    for axis, step in enumerate(voxel):
        # the tolerance keeps offsets lying exactly at the cap (e.g. 3 mm = 4 x 0.75 mm)
        reach = int(np.floor(cap_mm / step * (1 + 1e-9)))
        if reach == 0:
            continue
        before = np.moveaxis(squared.copy(), axis, 0)
        after, scratch = np.moveaxis(squared, axis, 0), np.moveaxis(shifted, axis, 0)
        for offset in range(1, reach + 1):
            cost = (offset * step) ** 2
            np.add(before[:-offset], cost, out=scratch[:-offset])
            np.minimum(after[offset:], scratch[:-offset], out=after[offset:])
            np.add(before[offset:], cost, out=scratch[offset:])
            np.minimum(after[:-offset], scratch[offset:], out=after[:-offset])
    return np.sqrt(squared, out=squared)


def depth_mm(mask, voxel_size_mm, cap_mm=None):
    """Distance (mm) of each voxel of ``mask`` to the nearest voxel outside it (0 outside); voxels beyond the
    array count as outside, so a mask cut by the field of view has its edge there too. ``cap_mm``: exact up to
    there only (:func:`distance_mm`)."""
    mask = np.asarray(mask, bool)
    depth = np.zeros(mask.shape)
    found = ndi.find_objects(mask.astype(np.uint8))
    if found:  # on the mask's bounding box, padded by one voxel of outside
        depth[found[0]] = distance_mm(np.pad(mask[found[0]], 1), voxel_size_mm, cap_mm)[1:-1, 1:-1, 1:-1]
    return depth
