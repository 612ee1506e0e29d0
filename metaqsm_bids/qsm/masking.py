"""Brain mask from a GRE magnitude image (scipy.ndimage only).

The brain is the largest bright region once thin bright bridges to the scalp
(through skull, dura, vessels and nerves) are cut by an erosion; all radii are in
mm, so anisotropic voxels are handled exactly through Euclidean distance maps.
"""
import numpy as np
from scipy import ndimage as ndi


def _otsu_threshold(values, bins=256):
    """Otsu's threshold: the histogram split maximising the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts, dtype=float)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # the split lies after bin i: values above edges[i + 1] form the high class
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _largest_component(mask):
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def brain_mask(magnitude, voxel_size_mm, smoothing_mm=1.0, erosion_mm=4.0):
    """Boolean brain mask from a 3D magnitude image.

    ``magnitude`` is one 3D volume (the root-sum-of-squares over echoes, or the
    first echo); ``voxel_size_mm`` its voxel edges. Steps: Gaussian smoothing
    (sigma ``smoothing_mm``), Otsu threshold of the smoothed intensities (clipped at
    their 99.9th percentile so that a few hot voxels do not stretch the histogram),
    erosion by ``erosion_mm`` to cut bridges to the scalp (thinner than twice that),
    largest connected component, dilation back by ``erosion_mm`` within the
    thresholded region, then hole filling in 3D (dark structures enclosed by brain,
    such as iron-rich nuclei) and in each ``(i, j)`` slice (dark veins that open
    onto the surface in 3D). Raises ValueError when no brain is found.
    """
    image = np.asarray(magnitude, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"magnitude must be a 3D volume, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("magnitude has NaN or infinite values")
    voxel = np.asarray(voxel_size_mm, dtype=float)
    if voxel.shape != (3,) or not np.all(voxel > 0):
        raise ValueError(f"voxel_size_mm must be 3 positive lengths, got {voxel_size_mm!r}")

    smooth = ndi.gaussian_filter(image, sigma=smoothing_mm / voxel)
    values = np.minimum(smooth, np.percentile(smooth, 99.9))
    if values.max() <= values.min():
        raise ValueError("magnitude is constant (below its 99.9th percentile): no brain to mask")
    foreground = smooth > _otsu_threshold(values)

    # distances on the foreground's bounding box padded by one background voxel,
    # so that voxels beyond the array edge count as background
    box = ndi.find_objects(foreground.astype(np.uint8))[0]
    region = np.pad(foreground[box], 1)
    core = ndi.distance_transform_edt(region, sampling=voxel) > erosion_mm
    if not core.any():
        raise ValueError(
            f"brain mask is empty: nothing above the Otsu threshold is thicker than 2 x {erosion_mm} mm"
        )
    core = _largest_component(core)
    brain = (ndi.distance_transform_edt(~core, sampling=voxel) <= erosion_mm) & region
    brain = _largest_component(brain)
    brain = ndi.binary_fill_holes(brain)
    for k in range(brain.shape[2]):
        brain[:, :, k] = ndi.binary_fill_holes(brain[:, :, k])

    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = brain[1:-1, 1:-1, 1:-1]
    return mask
