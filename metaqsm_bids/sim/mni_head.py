"""A realistic head phantom from a real anatomy: the MNI152 2009a tissue maps that nilearn ships.

For benchmarks and tests against a peer's simulator (qsm-forward), where the analytic
phantom of :mod:`metaqsm_bids.sim.phantom` is too kind: its brain is an ellipsoid and its
background sources are a few smooth shapes. Here the brain is the template's (GM and WM
probability maps at 1 mm, folded cortex, ventricles, cerebellum and brainstem), and around
it, at depths measured from a smoothed brain hull:

* a CSF rim of ~2.5 mm between brain and skull (bright in GRE: the rim a threshold mask keeps);
* a skull of 6 mm (cortical bone, -2 ppm, dark) under 5 mm of scalp, and a neck below;
* air cavities carved out of the skull base: sphenoid and ethmoid sinuses under the frontal
  lobes, a frontal sinus, mastoid air cells beside the temporal lobes (+9.4 ppm);
* air around the head (+9.4 ppm: air +0.36 minus water -9.05): qsm-forward pads its field
  grid with the corner value, so the head sits in infinite air;
* inside the brain: deep grey nuclei at their MNI positions, internal cerebral veins, random
  medullary and cortical veins, a superior sagittal sinus in the CSF rim, a calcification,
  and a smooth texture of +-0.01 ppm;
* with ``lesions=True`` (:data:`LESIONS`): haemorrhages, calcifications and microbleeds of clinical
  sizes and susceptibilities, for checking that strong sources stay in the map with their values.

By default chi, M0 and R2* share one label map and M0 carries chi's own texture, so that every edge
of chi is an edge of the magnitude: an oracle for magnitude priors (MEDI's edge mask, magnitude-input
networks) that no real scan gives. ``realistic_magnitude=True`` makes the magnitude behave as in vivo:

* the proton density of the deep grey nuclei is WM's x :data:`NUCLEUS_M0_OVER_WM` (3 % above, in
  the WM they are embedded in) and that of veins the local mean of the WM, GM and CSF around them
  (Gaussian of :data:`VEIN_FILL_MM`): in a real GRE these structures show through R2* at later
  echoes, hardly at all through proton density;
* M0 has a texture of its own (:data:`M0_TEXTURE_STD` std, smoothed over :data:`M0_TEXTURE_MM`,
  from its own random stream) and none of chi's: tissue water and iron are not one field;
* M0 is multiplied by a receive-coil bias (:data:`BIAS_RANGE` over the head): a random polynomial of
  degree 2 in the head's coordinates, as smooth as an array coil's sensitivity without prescan
  normalisation, which scales every magnitude edge by where it lies;
* chi of each deep grey nucleus varies linearly by +-:data:`NUCLEUS_IRON_GRADIENT` of its value along
  a random direction (the iron gradients of real nuclei, e.g. rising towards the posterior putamen),
  while its M0 and R2* stay flat (label-based): structure of chi that the magnitude does not show
  (in vivo R2* follows iron in part; flat R2* is the harder case for magnitude priors).

R2* stays label-based in both modes (its contrast is real physics) and never carries chi's texture;
R1 too: the T1 weighting of qsm-forward's TR 50 ms and 15 degrees (nuclei 4-8 % below WM, net of
their 3 % more M0 1-5 %) is real contrast. The three random fields come
from streams of their own (:class:`numpy.random.SeedSequence` children of ``seed``), so that the
labels and chi's texture are those of the default head.

Tissue values (chi, M0, R2*) are those of :data:`metaqsm_bids.sim.phantom.TISSUES`; labels are
qsm-ci's (1-6 deep grey, 7 thalamus, 8 WM, 9 GM, 10 CSF, 11 blood, 13 bone, 14 air, 15 soft
tissue, 16 calcification; lesions add 17 haemorrhage and 18 microbleed). The brain mask is the brain hull (brain tissue and the CSF inside
it), not the rim. nilearn is a test/benchmark/training dependency: nothing at runtime imports
this module.
"""
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nilearn.datasets
import numpy as np
from scipy import ndimage as ndi

from .phantom import AIR_CHI_PPM, TISSUES

#: Longitudinal relaxation rates (1/s at 3 T) by label; qsm-forward's signal needs them everywhere
#: (its default R1 is the brain mask, which would silence every voxel outside the brain).
R1_HZ = {1: 0.9, 2: 1.0, 3: 0.9, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.9, 8: 1.1, 9: 0.7, 10: 0.25, 11: 0.6,
         13: 1.5, 14: 0.0, 15: 1.0, 16: 1.0, 17: 0.8, 18: 0.8}

#: Depth (mm) of each shell outside the smoothed brain hull: CSF rim, bone, soft tissue.
RIM_MM, SKULL_MM, SCALP_MM = 2.5, 6.0, 5.0

# realistic_magnitude=True (module docstring)
#: Proton density of the deep grey nuclei over WM's.
NUCLEUS_M0_OVER_WM = 1.03
#: Width (mm, Gaussian sigma) of the neighbourhood whose WM, GM and CSF give a vein its M0.
VEIN_FILL_MM = 2.0
#: M0's own texture: relative std inside the brain and smoothing (mm, Gaussian sigma; chi's is 2 mm).
M0_TEXTURE_STD, M0_TEXTURE_MM = 0.02, 4.0
#: The receive bias's least and greatest gain over the head.
BIAS_RANGE = (0.7, 1.3)
#: Iron gradient of a nucleus: chi's relative change from its centre to its edge along the gradient.
NUCLEUS_IRON_GRADIENT = 0.3

#: Another anatomy (``warp_seed``): per-axis scaling range and RMS of the smooth displacement (mm).
WARP_SCALE, WARP_MM = (0.9, 1.1), 4.0

# Deep grey nuclei: label, MNI centre (mm, x > 0; mirrored), semi-axes (mm).
_NUCLEI = (
    (1, (13, 12, 10), (4, 10, 7)),  # caudate
    (3, (25, 2, 0), (5, 13, 8)),  # putamen
    (2, (19, -3, -2), (3, 7, 4)),  # globus pallidus (after the putamen: it lies medial to it)
    (7, (11, -18, 7), (6, 11, 7)),  # thalamus
    (4, (5, -20, -10), (3, 3, 3)),  # red nucleus
    (6, (11, -18, -14), (3, 8, 3)),  # substantia nigra
    (5, (15, -57, -36), (6, 7, 5)),  # dentate
)
# Air cavities: MNI centre, semi-axes (mm); only the part outside brain and rim becomes air.
_SINUSES = (
    ((0, 8, -44), (12, 12, 10)),  # sphenoid
    ((0, 40, -32), (12, 16, 10)),  # ethmoid cells between the orbits
    ((0, 66, 2), (14, 6, 10)),  # frontal
    ((48, -30, -44), (9, 11, 9)),  # mastoid air cells
    ((-48, -30, -44), (9, 11, 9)),
)
_CALCIFICATION = ((28, -20, 28), 2.5)  # MNI centre, radius (mm)

@dataclass(frozen=True)
class Lesion:
    """A lesion of the ``lesions=True`` head: an ellipsoid at an MNI centre (mm) with its own chi (ppm),
    M0 (a.u.) and R2* (1/s at 3 T). ``label``: 16 calcification, 17 haemorrhage, 18 microbleed."""

    name: str
    label: int
    centre_mm: tuple
    semi_axes_mm: tuple
    chi_ppm: float
    m0: float
    r2star_hz: float


#: Lesions of the benchmark heads (never of training data): an acute haemorrhage in the basal ganglia
#: (16 x 22 x 18 mm, 0.8 ppm, R2* 90 1/s: the case a reliability mask cut out) and lobar ones of 3-10 mm
#: at 0.4-1.2 ppm; calcifications of -0.2 to -1 ppm (short T2*, little proton density: nearly no
#: signal); microbleeds of 1-3 mm (haemosiderin, ~1 ppm, signal voids).
LESIONS = (
    Lesion("haemorrhage-basal-ganglia", 17, (-24, 4, 2), (8, 11, 9), 0.8, 0.85, 90.0),
    Lesion("haemorrhage-frontal-6mm", 17, (24, 34, 24), (3, 3, 3), 1.2, 0.85, 90.0),
    Lesion("haemorrhage-parietal-10mm", 17, (-30, -50, 30), (5, 5, 5), 0.4, 0.85, 70.0),
    Lesion("haemorrhage-3mm", 17, (36, -10, 40), (1.5, 1.5, 1.5), 0.6, 0.85, 80.0),
    Lesion("calcification-strong", 16, (-20, 26, 22), (3, 3, 3), -1.0, 0.3, 120.0),
    Lesion("calcification-weak", 16, (22, -62, 18), (4, 4, 4), -0.2, 0.3, 120.0),
    Lesion("microbleed-3mm", 18, (32, -40, 26), (1.5, 1.5, 1.5), 1.0, 0.5, 150.0),
    Lesion("microbleed-2mm", 18, (-36, 10, 36), (1.0, 1.0, 1.0), 1.0, 0.5, 150.0),
    Lesion("microbleed-1mm", 18, (-10, 44, 30), (0.5, 0.5, 0.5), 1.0, 0.5, 150.0),
)
_INTERNAL_VEINS = (((2.5, 10, 12), (2.5, -30, 14), 1.5), ((-2.5, 10, 12), (-2.5, -30, 14), 1.5),
                   ((0, -30, 12), (0, -50, 4), 2.5))  # internal cerebral veins, vein of Galen


@dataclass
class MNIHead:
    """The phantom on a voxel grid: float32 maps, uint8 ``seg``, bool ``brain_mask``, axis-aligned
    ``affine`` with no translation (qsm-forward's resize drops it), uint8 ``lesion`` (n inside
    ``LESIONS[n - 1]``, 0 elsewhere and without lesions)."""

    chi_ppm: np.ndarray
    m0: np.ndarray
    r1_hz: np.ndarray
    r2star_hz: np.ndarray
    seg: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    lesion: np.ndarray

    def save(self, folder):
        """Write the maps as NIfTI files (qsm-forward's TissueParams wants paths); return them by name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, data in (("chi", self.chi_ppm), ("M0", self.m0), ("R1", self.r1_hz), ("R2star", self.r2star_hz),
                           ("seg", self.seg), ("mask", self.brain_mask.astype(np.uint8)), ("lesion", self.lesion)):
            paths[name] = str(folder / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(data), self.affine), paths[name])
        return paths


def _ellipsoid(grid_mm, centre, semi_axes):
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid_mm, centre, semi_axes)) <= 1.0


def _tube(grid_mm, start, end, radius):
    """Voxels within ``radius`` of the segment start-end (mm)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    length2 = float(axis @ axis)
    d = [g - s for g, s in zip(grid_mm, start)]
    t = np.clip(sum(di * a for di, a in zip(d, axis)) / length2, 0.0, 1.0)
    return sum((di - t * a) ** 2 for di, a in zip(d, axis)) <= radius ** 2


def _labels_1mm(seed, lesions=False):
    """qsm-ci labels, a texture (ppm) and the lesion index (0: none, n: ``LESIONS[n - 1]``) on the 1 mm
    template grid padded for the head; and its origin (mm)."""
    folder = Path(nilearn.datasets.__file__).parent / "data"
    maps = [nib.load(folder / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz") for t in ("gm", "wm")]
    gm, wm = (np.asarray(m.dataobj, np.float32) / 255.0 for m in maps)
    pad = int(np.ceil(RIM_MM + SKULL_MM + SCALP_MM)) + 4
    gm, wm = np.pad(gm, pad), np.pad(wm, pad)
    origin = maps[0].affine[:3, 3] - pad
    grid = np.meshgrid(*[origin[a] + np.arange(n, dtype=np.float32) for a, n in enumerate(gm.shape)],
                       indexing="ij", sparse=True)

    hull = ndi.binary_fill_holes(ndi.binary_closing(gm + wm > 0.5, iterations=3))
    csf = np.clip(ndi.gaussian_filter(hull.astype(np.float32), 0.7) - gm - wm, 0, 1)
    seg = np.zeros(gm.shape, np.uint8)
    tissue = np.argmax(np.stack([csf, wm, gm]), axis=0)
    seg[hull] = np.array([10, 8, 9], np.uint8)[tissue[hull]]
    for label, centre, semi in _NUCLEI:
        for side in (1, -1):
            seg[hull & _ellipsoid(grid, (side * centre[0], *centre[1:]), semi)] = label

    # the intracranial space: the hull closed over the basal cisterns and smoothed, so that the
    # skull does not follow the sulci; what it holds beyond the brain is CSF, then the shells
    closed = ndi.binary_fill_holes(ndi.binary_closing(hull, structure=ndi.generate_binary_structure(3, 1),
                                                      iterations=6))
    smooth = (ndi.gaussian_filter(closed.astype(np.float32), 3.0) > 0.5) | closed | hull
    depth = ndi.distance_transform_edt(~smooth)
    rim = ~hull & (depth <= RIM_MM)
    seg[rim] = 10
    seg[(depth > RIM_MM) & (depth <= RIM_MM + SKULL_MM)] = 13
    seg[(depth > RIM_MM + SKULL_MM) & (depth <= RIM_MM + SKULL_MM + SCALP_MM)] = 15
    # the neck: soft tissue under the cerebellum down to the edge of the field of view
    neck = ((grid[0] / 45) ** 2 + ((grid[1] + 25) / 50) ** 2 <= 1) & (grid[2] < -50)
    seg[neck & (seg == 0)] = 15
    near_brain = ndi.binary_dilation(hull | rim, iterations=1)
    for centre, semi in _SINUSES:
        seg[_ellipsoid(grid, centre, semi) & ~near_brain & (seg > 0)] = 14

    rng = np.random.default_rng(seed)
    for start, end, radius in _INTERNAL_VEINS:
        seg[hull & _tube(grid, start, end, radius)] = 11
    # medullary and cortical veins: short straight segments through random brain points
    brain_points = np.argwhere(hull & np.isin(seg, (8, 9)))
    for _ in range(14):
        start = origin + brain_points[rng.integers(len(brain_points))]
        end = start + rng.normal(0, 1, 3) / 3 * rng.uniform(15, 30)
        seg[hull & _tube(grid, start, end, rng.uniform(0.7, 1.2))] = 11
    # superior sagittal sinus: in the midline rim over the vault
    for y in np.arange(-90.0, 60.0, 3.0):
        column = hull[int(round(-origin[0])), int(round(y - origin[1])), :]
        if column.any():
            top = origin[2] + np.flatnonzero(column)[-1]
            seg[_tube(grid, (0, y, top + 2.5), (0, y + 3.0, top + 2.5), 3.0) & ~hull] = 11
    centre, radius = _CALCIFICATION
    seg[hull & _ellipsoid(grid, centre, (radius,) * 3)] = 16

    texture = ndi.gaussian_filter(rng.normal(0, 1, gm.shape).astype(np.float32), 2.0)
    texture *= 0.01 / texture[hull].std()
    lesion = np.zeros(gm.shape, np.uint8)
    # each lesion sampled at 8 points per 1 mm voxel, so that a 1 mm microbleed is not lost between grid points
    offsets = [(dx, dy, dz) for dx in (-.25, .25) for dy in (-.25, .25) for dz in (-.25, .25)]
    for index, les in enumerate(LESIONS if lesions else (), start=1):
        inside = np.mean([_ellipsoid([g + o for g, o in zip(grid, off)], les.centre_mm, les.semi_axes_mm)
                          for off in offsets], axis=0) >= 0.5
        inside &= hull
        seg[inside] = les.label
        lesion[inside] = index
    return seg, hull, texture, lesion, origin


def _warped(maps, warp_seed):
    """``maps`` (1 mm arrays of one shape: labels, masks, texture) resampled through one smooth random
    deformation: a per-axis scaling within :data:`WARP_SCALE` about the centre and a displacement of
    :data:`WARP_MM` RMS varying over ~40 mm. Labels and masks by nearest neighbour, floats linearly."""
    rng = np.random.default_rng([warp_seed, 104729])
    shape = maps[0].shape
    scale = rng.uniform(*WARP_SCALE, 3)
    coarse = rng.normal(0, 1, (3, *[max(n // 40, 2) + 2 for n in shape]))
    coords = []
    for axis, n in enumerate(shape):
        disp = ndi.zoom(coarse[axis], [m / c for m, c in zip(shape, coarse.shape[1:])], order=3)[:shape[0], :shape[1], :shape[2]]
        disp *= WARP_MM / disp.std()
        index = np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        coords.append((index - n / 2) / scale[axis] + n / 2 + disp)
    return [ndi.map_coordinates(m, coords, order=1 if m.dtype.kind == "f" else 0, mode="constant", cval=0).astype(m.dtype)
            for m in maps]


def _bias_field(coords_mm, seg1, origin, rng):
    """A receive bias at ``coords_mm`` (mm, broadcastable arrays): a random polynomial of degree 2 in the
    head's box scaled to [-1, 1], mapped onto :data:`BIAS_RANGE` over the head (taken on a 4 mm subgrid of
    the 1 mm construction, so that every voxel size gets the same field)."""
    head = ndi.find_objects((seg1 > 0).astype(np.uint8))[0]
    lo = origin + np.array([s.start for s in head])
    hi = origin + np.array([s.stop - 1 for s in head])
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    powers = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if 0 < i + j + k <= 2]
    coefficients = rng.normal(0, 1, len(powers))

    def polynomial(points_mm):
        u = [((p - c) / h).astype(np.float32) for p, c, h in zip(points_mm, centre, half)]
        return sum(float(c) * u[0] ** i * u[1] ** j * u[2] ** k for c, (i, j, k) in zip(coefficients, powers))

    sample = origin + np.argwhere(seg1[::4, ::4, ::4] > 0) * 4
    p_sample = polynomial(sample.T)
    low, high = BIAS_RANGE
    return (low + (high - low) * (polynomial(coords_mm) - p_sample.min()) / np.ptp(p_sample)).astype(np.float32)


def _iron_gradients(seg, coords_mm, rng):
    """Chi's relative change (a factor around 1) inside each deep grey nucleus: linear along a random
    direction, +-:data:`NUCLEUS_IRON_GRADIENT` at the ellipsoid's extremes along it; 1 elsewhere."""
    factor = np.ones(seg.shape, np.float32)
    for label, centre, semi in _NUCLEI:
        for side in (1, -1):
            centre_mm = (side * centre[0], *centre[1:])
            direction = rng.normal(0, 1, 3)
            direction /= np.linalg.norm(direction)
            half_width = np.sqrt(np.sum((np.asarray(semi) * direction) ** 2))  # the ellipsoid's along it
            inside = (seg == label) & _ellipsoid(coords_mm, centre_mm, semi)
            along = sum(d * (np.broadcast_to(c, seg.shape)[inside] - m)
                        for d, c, m in zip(direction, coords_mm, centre_mm)) / half_width
            factor[inside] = 1 + NUCLEUS_IRON_GRADIENT * np.clip(along, -1, 1)
    return factor


def mni_head(voxel_size_mm, seed=0, margin_mm=4.0, lesions=False, realistic_magnitude=False, warp_seed=None):
    """The phantom sampled on an axis-aligned grid of ``voxel_size_mm`` around the head (+``margin_mm`` of air).

    Labels and masks are taken from the 1 mm construction by nearest neighbour, the texture
    linearly; maps follow from the labels (and each lesion's own values, with ``lesions``).
    ``realistic_magnitude``: a magnitude that is no oracle for chi (module docstring); False gives the
    head of before it existed, bit for bit. ``warp_seed``: another anatomy, the whole 1 mm construction
    (brain, nuclei, veins, skull, lesions) deformed smoothly (:func:`_warped`), for checking a network on a
    brain its MNI152-made training crops do not come from. Deterministic for a given ``seed``.
    """
    seg1, hull1, texture1, lesion1, origin = _labels_1mm(seed, lesions)
    if warp_seed is not None:
        seg1, hull1, texture1, lesion1 = _warped([seg1, hull1, texture1, lesion1], warp_seed)
    head = ndi.find_objects((seg1 > 0).astype(np.uint8))[0]
    voxel = np.asarray(voxel_size_mm, float)
    lo = np.array([s.start for s in head]) - margin_mm
    extent = np.array([s.stop - s.start for s in head]) + 2 * margin_mm
    shape = tuple(int(n) for n in np.ceil(extent / voxel))
    sparse = np.meshgrid(*[lo[a] + (np.arange(n) + 0.5) * voxel[a] - 0.5 for a, n in enumerate(shape)],
                         indexing="ij", sparse=True)
    coords = [np.broadcast_to(c, shape) for c in sparse]
    seg = ndi.map_coordinates(seg1, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    brain = ndi.map_coordinates(hull1.astype(np.uint8), coords, order=0, mode="constant", cval=0) > 0
    texture = ndi.map_coordinates(texture1, coords, order=1, mode="constant", cval=0).astype(np.float32)
    lesion = ndi.map_coordinates(lesion1, coords, order=0, mode="constant", cval=0).astype(np.uint8)

    def by_label(values):
        table = np.zeros(256, np.float32)
        for label, value in values.items():
            table[label] = value
        return table[seg]

    tissues = {t.label: t for t in TISSUES.values() if t.label}
    chi = by_label({lab: t.chi_ppm for lab, t in tissues.items()})
    chi[seg == 0] = AIR_CHI_PPM
    if realistic_magnitude:
        texture_rng, bias_rng, iron_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        coords_mm = [(c + o).astype(np.float32) for c, o in zip(sparse, origin)]  # sparse: broadcast
        chi *= _iron_gradients(seg, coords_mm, iron_rng)
    chi += np.where(brain & np.isin(seg, (1, 2, 3, 4, 5, 6, 7, 8, 9)), texture, 0)
    m0 = by_label({lab: t.m0 for lab, t in tissues.items()})
    if realistic_magnitude:
        m0[np.isin(seg, (1, 2, 3, 4, 5, 6, 7))] = NUCLEUS_M0_OVER_WM * tissues[8].m0
        around = np.isin(seg, (8, 9, 10)).astype(np.float32)
        sigma = VEIN_FILL_MM / voxel
        weight = ndi.gaussian_filter(around, sigma)
        local = ndi.gaussian_filter(m0 * around, sigma) / np.maximum(weight, 1e-6)
        vein = (seg == 11) & (weight > 1e-3)  # a vein with no tissue within reach keeps blood's
        m0[vein] = local[vein]
    else:
        m0 *= np.where(seg > 0, 1 + 2 * texture, 1)  # +-2 % of signal texture
    r2star = by_label({lab: t.r2star_hz for lab, t in tissues.items()})
    r1 = by_label(R1_HZ)
    for index, les in enumerate(LESIONS if lesions else (), start=1):
        inside = lesion == index
        chi[inside], m0[inside], r2star[inside] = les.chi_ppm, les.m0, les.r2star_hz
    if realistic_magnitude:  # after the lesions: texture and coil bias are on every tissue
        noise = ndi.gaussian_filter(texture_rng.normal(0, 1, seg1.shape).astype(np.float32), M0_TEXTURE_MM)
        noise *= M0_TEXTURE_STD / noise[hull1].std()
        m0_texture = ndi.map_coordinates(noise, coords, order=1, mode="constant", cval=0).astype(np.float32)
        m0 *= (1 + m0_texture) * _bias_field(coords_mm, seg1, origin, bias_rng)
    affine = np.diag([*voxel, 1.0])
    return MNIHead(chi, m0.astype(np.float32), r1, r2star, seg, brain, affine, lesion)
