"""Brain mask from a GRE magnitude image (scipy.ndimage only).

The brain is the bright region around the centre of the head once two kinds of bridge
are cut by openings (erosion, then dilation back within the bright region): thin
bridges to the scalp through the skull (vessels, nerves, dura), by a few mm, and the
brainstem down through the foramen magnum into the neck, by a fraction of the head's
size; what the second opening cut off is kept when skull and scalp enclose it. All
radii are in mm, so anisotropic voxels are handled exactly through Euclidean
distance maps.
"""
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from ..core.grid import voxel_size_array
from ..core.smv import distance_mm
from ..field.relaxometry import weighted_loglinear_fit

#: Steps at the scale of the head run on a grid of voxels about this size (mm) or the largest voxel edge.
_COARSE_MM = 2.0

#: Closing radius (mm) of the head's outline: bridges gaps of up to twice this in a scalp that
#: thresholding broke (thin, tangent to the slices, or dark where the coil's sensitivity fades).
_HEAD_CLOSING_MM = 8.0


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


def _nearest_voxel(mask, point, voxel):
    """Index (tuple) of the True voxel of ``mask`` nearest ``point`` (voxel indices), in mm."""
    index = np.nonzero(mask)
    distance2 = sum(((i - p) * v) ** 2 for i, p, v in zip(index, point, voxel))
    nearest = int(np.argmin(distance2))
    return tuple(i[nearest] for i in index)


def _component_nearest(mask, point, voxel):
    """The connected component of ``mask`` holding the voxel nearest ``point`` (voxel indices, mm metric)."""
    labels, _ = ndi.label(mask)
    return labels == labels[_nearest_voxel(mask, point, voxel)]


def _box(mask, margin):
    """Bounding box (slices) of ``mask`` grown by ``margin`` voxels per axis, within the array."""
    found = ndi.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(f.start - m, 0), min(f.stop + m, n)) for f, m, n in zip(found, margin, mask.shape))


def _fill_slices(mask):
    """Fill the holes of each ``(i, j)`` slice of ``mask`` (in place) and return it."""
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndi.binary_fill_holes(mask[:, :, k])
    return mask


def brain_mask(magnitude, voxel_size_mm, smoothing_mm=1.0, erosion_mm=4.0, neck_fraction=0.3, axial_axis=2):
    """Boolean brain mask from a 3D magnitude image whose axis ``axial_axis`` runs inferior-superior.

    The per-slice steps below (hole filling, the head's outline) work in axial slices, whatever the
    storage order: pass the array axis nearest world z (:func:`metaqsm_bids.qsm.core.physics.axial_axis`),
    so that the same head stored axially, sagittally or flipped gets the same mask. See
    :func:`_axial_brain_mask` for the steps.
    """
    image = np.asarray(magnitude)
    if image.ndim != 3:
        raise ValueError(f"magnitude must be a 3D volume, got shape {image.shape}")
    if axial_axis not in (0, 1, 2):
        raise ValueError(f"axial_axis must be 0, 1 or 2, got {axial_axis!r}")
    voxel = np.asarray(voxel_size_mm, dtype=float)
    order = [a for a in range(3) if a != axial_axis] + [axial_axis]
    if voxel.shape == (3,):
        voxel = voxel[order]
    mask = _axial_brain_mask(np.transpose(image, order), voxel, smoothing_mm, erosion_mm, neck_fraction)
    return np.transpose(mask, np.argsort(order))


def _axial_brain_mask(magnitude, voxel_size_mm, smoothing_mm, erosion_mm, neck_fraction):
    """Boolean brain mask from a 3D magnitude image.

    ``magnitude`` is one 3D volume (the root-sum-of-squares over echoes, or the first
    echo); ``voxel_size_mm`` its voxel edges. Steps:

    1. Gaussian smoothing (sigma ``smoothing_mm``) and Otsu threshold of the smoothed
       intensities (clipped at their 99.9th percentile so that a few hot voxels do not
       stretch the histogram): the bright region, brain and CSF, scalp, face and neck.
    2. The head, on a grid of about ``max(largest voxel edge, 2 mm)``: the bright region
       closed by 8 mm (which bridges gaps that thresholding leaves in a thin scalp) with
       the holes of each ``(i, j)`` slice filled (skull, sinuses). Its centre is its
       deepest point and its radius that depth, the array's edge counting as outside.
       A neck in the field of view is thinner than the cranium, so the centre lies in
       the brain, which the centre of gravity of a head with its neck does not.
    3. Scalp cut: erosion by ``erosion_mm`` (bridges thinner than twice that break),
       the component nearest the centre, dilation back by ``erosion_mm`` within the
       bright region.
    4. Neck cut, on the coarse grid: the same opening with a radius of
       ``neck_fraction`` times the head's radius, i.e. 18-22 mm for an adult head
       (inscribed radius 60-75 mm), which breaks the brainstem at the foramen magnum
       (about 35 mm wide with its CSF) but leaves a core in the cerebrum (over 100 mm
       across); it is capped at half the depth of the step-3 region so that a thin
       slab keeps a core. The eroded region splits into cores, and each voxel of the
       opening goes to its nearest core. Kept: the central core's part and what lies
       within ``erosion_mm`` of it (the brainstem just below the cut, cortex that the
       wide balls rounded off), and every other piece, thick (another core's part:
       a cerebellum behind a dark tentorium) or thin (not in the opening: temporal
       poles), that stays over ``erosion_mm`` (and one coarse voxel) from the outside
       of the head, as all brain does under skull and scalp; the neck and face reach
       the skin and are dropped. Where the central part itself lies at the outside
       over half its surface, the image is skull-stripped (or simulated with no tissue
       outside the brain): there is no neck to cut, and this step is skipped.
    5. The component nearest the centre, hole filling in 3D (dark structures enclosed
       by brain, such as iron-rich nuclei) and in each ``(i, j)`` slice (dark veins
       that open onto the surface in 3D).

    The extra-cerebral CSF is as bright as tissue and stays in the mask. Raises
    ValueError when no brain is found.
    """
    image, voxel = _checked_input(magnitude, voxel_size_mm)
    foreground = _bright_region(image, voxel, smoothing_mm)
    # work on the foreground's bounding box padded by one background voxel,
    # so that voxels beyond the array edge count as background
    box = ndi.find_objects(foreground.astype(np.uint8))[0]
    region = np.pad(foreground[box], 1)
    depth = distance_mm(region, voxel)
    head = _head(region, voxel, erosion_mm)
    centre = np.array(head.centre) * head.stride
    brain = _scalp_cut(region, depth, centre, voxel, erosion_mm)
    _neck_cut(brain, depth, head, erosion_mm, neck_fraction)
    brain = _component_nearest(brain, centre, voxel)
    # the box keeps one background voxel around the brain for the filling
    inner = _box(brain, (1, 1, 1))
    brain[inner] = _fill_slices(ndi.binary_fill_holes(brain[inner]))

    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = brain[1:-1, 1:-1, 1:-1]
    return mask


def _checked_input(magnitude, voxel_size_mm):
    """``magnitude`` as a float32 array and ``voxel_size_mm`` as a float array, or ValueError where either is unusable."""
    image = np.asarray(magnitude, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"magnitude must be a 3D volume, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("magnitude has NaN or infinite values")
    voxel = voxel_size_array(voxel_size_mm)
    return image, voxel


def _bright_region(image, voxel, smoothing_mm):
    """Step 1 of :func:`_axial_brain_mask`: the smoothed image above its Otsu threshold."""
    smooth = ndi.gaussian_filter(image, sigma=smoothing_mm / voxel)
    values = np.minimum(smooth, np.percentile(smooth, 99.9))
    if values.max() <= values.min():
        raise ValueError("magnitude is constant (below its 99.9th percentile): no brain to mask")
    return smooth > _otsu_threshold(values)


class _Head(NamedTuple):
    """Step 2 of :func:`_axial_brain_mask`: the head on the coarse grid ``region[::stride]``."""

    stride: np.ndarray  #: coarse grid step (voxels) per axis
    voxel: np.ndarray  #: the coarse grid's voxel edges (mm)
    centre: tuple  #: the head's deepest point (coarse voxel index)
    radius: float  #: its depth (mm)
    outside: np.ndarray  #: coarse voxels near the background of their slice outside the head


def _head(region, voxel, erosion_mm):
    """Step 2 of :func:`_axial_brain_mask` on ``region`` (the bright region, padded by background)."""
    stride = np.maximum(1, np.floor(max(voxel.max(), _COARSE_MM) / voxel)).astype(int)
    coarse = tuple(slice(None, None, s) for s in stride)
    coarse_voxel = voxel * stride
    # the head: a closing bridges the gaps that thresholding and sampling leave in a thin scalp,
    # then the skull and sinuses are filled in each slice; on a grid padded with background so
    # that the array's edge counts as outside
    pad = np.ceil(_HEAD_CLOSING_MM / coarse_voxel).astype(int) + 1
    crop = tuple(slice(p, -p) for p in pad)
    padded = np.pad(region[coarse], [(p, p) for p in pad])
    grown = distance_mm(~padded, coarse_voxel, _HEAD_CLOSING_MM) <= _HEAD_CLOSING_MM
    head = _fill_slices(distance_mm(grown, coarse_voxel, _HEAD_CLOSING_MM) > _HEAD_CLOSING_MM)
    head_depth = distance_mm(head, coarse_voxel)[crop]
    # near the background of each slice outside the head (slices beyond the field of view excluded):
    # within erosion_mm, as the opening's balls may stop short of the skin, and one voxel at least
    near_mm = max(erosion_mm, coarse_voxel.max())
    outside = distance_mm(head | ~head.any(axis=(0, 1)), coarse_voxel, near_mm) <= near_mm
    centre = np.unravel_index(np.argmax(head_depth), head_depth.shape)
    return _Head(stride, coarse_voxel, centre, head_depth[centre], outside[crop])


def _scalp_cut(region, depth, centre, voxel, erosion_mm):
    """Step 3 of :func:`_axial_brain_mask`: the opening of ``region`` by ``erosion_mm`` nearest ``centre``."""
    core = depth > erosion_mm
    if not core.any():
        raise ValueError(
            f"brain mask is empty: nothing above the Otsu threshold is thicker than 2 x {erosion_mm} mm"
        )
    core = _component_nearest(core, centre, voxel)
    # the dilation back reaches erosion_mm beyond the core: distances on that box only
    near = _box(core, np.ceil(erosion_mm / voxel).astype(int) + 1)
    brain = np.zeros_like(region)
    brain[near] = (distance_mm(~core[near], voxel, erosion_mm) <= erosion_mm) & region[near]
    return brain


def _neck_cut(brain, depth, head, erosion_mm, neck_fraction):
    """Step 4 of :func:`_axial_brain_mask`, on ``brain`` in place; ``depth`` is the bright region's."""
    coarse = tuple(slice(None, None, s) for s in head.stride)
    brain_coarse = brain[coarse]
    depth_coarse = np.where(brain_coarse, depth[coarse], 0.0)
    radius = min(neck_fraction * head.radius, 0.5 * depth_coarse.max())
    cores, _ = ndi.label(depth_coarse > radius)
    # the opening split among the cores: each voxel goes to its nearest core, whose balls can touch
    to_core, nearest = ndi.distance_transform_edt(cores == 0, sampling=head.voxel, return_indices=True)
    owner = np.where((to_core <= radius) & brain_coarse, cores[tuple(nearest)], 0)
    central = owner == owner[_nearest_voxel(cores > 0, head.centre, head.voxel)]
    surface = central & ~ndi.binary_erosion(central)
    # in a skull-stripped image the brain's surface is the head's: no skull, so no neck to cut
    if np.count_nonzero(surface & head.outside) < 0.5 * np.count_nonzero(surface):
        keep = distance_mm(~central, head.voxel, erosion_mm) <= erosion_mm
        thin, _ = ndi.label(brain_coarse & (owner == 0) & ~keep)
        for pieces in (np.where(keep, 0, owner), thin):
            keep |= (pieces > 0) & ~np.isin(pieces, pieces[head.outside])
        brain &= keep[np.ix_(*(np.arange(n) // s for n, s in zip(brain.shape, head.stride)))]


def decay_fit(magnitude, echo_times_s):
    """Mono-exponential fit ``|S(TE)| = S0 exp(-R2* TE)`` per voxel of multi-echo magnitudes (i, j, k, echo).

    Returns ``(s0, r2star_hz)``: S0 extrapolated to TE = 0 (the magnitude's units) and R2* (1/s,
    clipped at 0). Log-linear fit weighted by |S|^2, which makes it the fit of the signal, not of
    its logarithm (whose noise grows as 1/|S|). Voxels without signal get 0 for both.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    tes = np.asarray(echo_times_s, dtype=np.float64)
    if magnitude.ndim != 4 or magnitude.shape[3] != tes.size or tes.size < 2:
        raise ValueError(f"need 4D magnitudes with one echo time each (at least 2), got {magnitude.shape} "
                         f"and {tes.size} echo times")
    slope, log_mean, fitted = weighted_loglinear_fit(magnitude, tes)
    mean_te = np.float32(tes.mean())
    s0 = np.where(fitted, np.exp(np.minimum(log_mean - slope * mean_te, 80)), 0)
    return s0.astype(np.float32), np.maximum(-slope, 0).astype(np.float32)


#: R2* (1/s at 3 T, scaled linearly with B0) below which a voxel counts as CSF: CSF is 2-5 s^-1,
#: grey matter 15-20, white matter 20-25, deep grey nuclei and veins more.
CSF_R2STAR_HZ_AT_3T = 8.0
#: Fraction of the deep brain's S0 below which a voxel of the mask's outer :data:`CSF_S0_RIM_MM` counts as CSF.
#: In a spoiled GRE (TR of tens of ms) CSF's long T1 (about 4 s at 3 T, tissue 1-1.5 s) saturates it:
#: at TE = 0 it is darker than tissue (about 0.6x at 15 deg, TR 30 ms), whereas at later echoes its slow
#: decay makes it as bright. Rim voxels that are part CSF, part brain (thick slices) sit in between:
#: their R2* is tissue-like, their S0 is not.
CSF_S0_FRACTION = 0.8
#: Depth (mm) from the mask's surface within which the S0 test applies; deeper, dark S0 is tissue (nuclei).
CSF_S0_RIM_MM = 3.0
#: Voxels deeper than this (mm) in the mask give the brain's reference S0 (their median).
_S0_REFERENCE_DEPTH_MM = 8.0


def remove_extracerebral_csf(mask, magnitude, echo_times_s, voxel_size_mm, b0_tesla=3.0, sulcus_mm=3.0):
    """``mask`` without the CSF between brain and skull, told from tissue by its decay (R2*) and its S0.

    A magnitude mask holds that rim (CSF is as bright as tissue), and its phase, next to the
    skull's and the sinuses' strong fields, is the least reliable of the mask. Tissue is the
    mask's voxels with R2* above :data:`CSF_R2STAR_HZ_AT_3T` (x B0/3 T); the brain is tissue
    closed by ``sulcus_mm`` (so sulci and the CSF between gyri stay in, as in a brain hull) with
    its enclosed holes (ventricles, cisterns) filled, within ``mask``. Then the voxels within
    :data:`CSF_S0_RIM_MM` of that brain's surface whose S0 is below :data:`CSF_S0_FRACTION` of
    the deep brain's median are dropped too (partial-volume CSF, see there). Needs two echoes or
    more; returns ``mask`` unchanged (and ``False``) when the decay cannot tell, e.g. if the result
    would keep under half of it.
    """
    mask = np.asarray(mask, bool)
    voxel = np.asarray(voxel_size_mm, dtype=float)
    s0, r2star = decay_fit(magnitude, echo_times_s)
    tissue = mask & (r2star > CSF_R2STAR_HZ_AT_3T * b0_tesla / 3.0)
    if not tissue.any():
        return mask, False
    # closing by a ball in mm: dilation then erosion through distance maps, on the mask's box
    reach = np.ceil(sulcus_mm / voxel).astype(int) + 1
    box = _box(mask, reach)
    region = np.pad(tissue[box], [(r, r) for r in reach])
    grown = distance_mm(~region, voxel, sulcus_mm) <= sulcus_mm
    closed = distance_mm(grown, voxel, sulcus_mm) > sulcus_mm
    closed = ndi.binary_fill_holes(closed)[tuple(slice(r, -r) for r in reach)]
    closed &= mask[box]
    # the box's margin outside the mask is background, so distances and holes are the whole array's
    depth = distance_mm(closed, voxel, max(_S0_REFERENCE_DEPTH_MM, CSF_S0_RIM_MM))
    deep = depth > _S0_REFERENCE_DEPTH_MM
    if deep.any():
        s0_box = s0[box]
        closed &= ~((depth <= CSF_S0_RIM_MM) & (s0_box < CSF_S0_FRACTION * np.median(s0_box[deep])))
        closed = ndi.binary_fill_holes(closed)
    brain = np.zeros_like(mask)
    brain[box] = closed
    labels, n = ndi.label(brain)
    if n > 1:
        brain = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    if brain.sum() < 0.5 * mask.sum():
        return mask, False
    return brain, True
