"""An analytic head phantom in world mm, and a multi-echo GRE simulation from it.

The anatomy is a list of ellipsoids and capsules (cylinders with round ends) in an
RAS frame centred on the brain, painted in order (later shapes cover earlier ones).
Each voxel receives the fraction of it covered by a shape, estimated from the
shape's first-order signed distance d at the voxel centre and the voxel's width w
along the surface normal: clip(1/2 - d/w, 0, 1). That is exact for a plane parallel to
a voxel face; for a tilted plane it conserves the volume across the edge, and a single
voxel's fraction is off by at most 0.13 (plane at 45 degrees) or 0.18 (normal along the
voxel's diagonal). It gives partial-volume edges at any voxel size and obliquity, not
jagged ones, for one evaluation per voxel near a surface instead of 8-27 per voxel.

Susceptibility is in ppm relative to CSF, with literature values (Deistung 2013,
Langkammer 2012, QSM challenge 2.0 phantom; Marques 2021): air is +9.4 ppm
(air +0.36 ppm minus water -9.05 ppm), so tissue is -9.4 ppm relative to air, and
the head, the skull and the air cavities (sphenoid/ethmoid sinus under the frontal
lobes, mastoid air cells) produce the background field. Labels follow the QSM
challenge 2.0 segmentation, so ``qsm_ci.qsm_eval.challenge_metrics`` can score a
reconstruction against :attr:`HeadPhantom.chi_ppm` with :attr:`HeadPhantom.seg`.
"""
from dataclasses import dataclass, replace

import numpy as np

from ..qsm.core import dipole, physics

#: Susceptibility of air relative to CSF (ppm): +0.36 - (-9.05).
AIR_CHI_PPM = 9.4

#: R2* values below are at this field strength; :func:`simulate_megre` scales them linearly with B0.
R2STAR_REFERENCE_TESLA = 3.0


@dataclass(frozen=True)
class Tissue:
    """Properties of one tissue class: seg label, chi (ppm vs CSF), M0 (a.u.), R2* (Hz at 3 T)."""

    label: int
    chi_ppm: float
    m0: float
    r2star_hz: float


#: Tissue classes; labels are the QSM challenge 2.0 ones (12 is unused there).
TISSUES = {
    "air": Tissue(0, AIR_CHI_PPM, 0.0, 0.0),
    "caudate": Tissue(1, 0.06, 0.80, 25.0),
    "globus_pallidus": Tissue(2, 0.18, 0.72, 40.0),
    "putamen": Tissue(3, 0.08, 0.80, 28.0),
    "red_nucleus": Tissue(4, 0.13, 0.72, 35.0),
    "dentate": Tissue(5, 0.12, 0.72, 35.0),
    "substantia_nigra": Tissue(6, 0.15, 0.70, 40.0),
    "thalamus": Tissue(7, 0.03, 0.76, 22.0),
    "white_matter": Tissue(8, -0.03, 0.72, 22.0),
    "grey_matter": Tissue(9, 0.02, 0.85, 18.0),
    "csf": Tissue(10, 0.0, 1.00, 3.0),
    "blood": Tissue(11, 0.40, 0.85, 45.0),
    # cortical bone is about -2 ppm from water (Buch 2015); its signal decays in a few ms
    "bone": Tissue(13, -2.0, 0.05, 300.0),
    "sinus_air": Tissue(14, AIR_CHI_PPM, 0.0, 0.0),
    # scalp, muscle, face and neck; fat is not separated (no chemical shift is simulated)
    "soft_tissue": Tissue(15, 0.0, 0.90, 25.0),
    "calcification": Tissue(16, -0.30, 0.30, 120.0),
    # acute haemorrhage (deoxyhaemoglobin): strongly paramagnetic, fast decay
    "haemorrhage": Tissue(17, 0.80, 0.85, 90.0),
}

#: Label -> name (for dseg tables).
LABEL_NAMES = {t.label: name for name, t in TISSUES.items() if name != "air"}


def _rotation_xyz(angles_deg):
    """Rotation matrix Rz @ Ry @ Rx for angles (deg) about the x, y and z axes."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _folding(x, y, z):
    """Gyral folding pattern in [-1, 1]: three plane waves of 24 mm wavelength (x, y, z in mm)."""
    k = 2 * np.pi / 24.0
    return ((np.sin(k * (0.80 * x + 0.60 * z) + 0.3)
             + np.sin(k * (0.60 * y - 0.80 * z) + 1.7)
             + np.sin(k * (0.48 * x + 0.64 * y + 0.60 * z) + 4.1)) / 3.0).astype(np.float32)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid of ``tissue``; ``angles_deg`` rotate its axes; ``folds_mm`` corrugates its surface.

    ``in_brain``: True adds the shape to the brain mask, False removes it, None leaves the mask as is.
    ``chi_ppm``: this shape's susceptibility instead of its tissue's (a lesion of its own strength).
    """

    tissue: str
    centre: tuple
    semi_axes: tuple
    angles_deg: tuple = (0.0, 0.0, 0.0)
    in_brain: bool | None = None
    folds_mm: float = 0.0
    chi_ppm: float | None = None

    def extent(self, direction):
        """(min, max) of ``direction . x`` over the shape (mm), for a unit vector."""
        along = _rotation_xyz(self.angles_deg).T @ direction
        half = np.sqrt(np.sum((np.asarray(self.semi_axes) * along) ** 2)) + self.folds_mm
        centre = float(np.dot(self.centre, direction))
        return centre - half, centre + half

    def fraction(self, grid, index):
        """Covered fraction (float32) of the voxels at the broadcastable ``index`` arrays of ``grid``."""
        q = _rotation_xyz(self.angles_deg)
        semi = np.asarray(self.semi_axes, float)
        # normalised local coordinates u = Q^T (x - c) / semi are affine in the voxel index
        offset = q.T @ (grid.origin - np.asarray(self.centre, float)) / semi
        slope = (q.T @ grid.step) / semi[:, None]
        r2 = 0.0
        for b in range(3):
            # 1D + 2D + 3D in float32: a single full-size pass per term
            u = (np.float32(offset[b]) + np.float32(slope[b, 0]) * index[0]) + np.float32(slope[b, 1]) * index[1]
            u = u + np.float32(slope[b, 2]) * index[2]
            r2 = r2 + u * u
        frac = (r2 <= 1.0).astype(np.float32)
        # only voxels near the surface are partial; |r - 1| < band covers every one of them
        band = (0.5 * grid.voxel.sum() + self.folds_mm) / semi.min() + 1e-3
        near = np.nonzero((r2 > max(1.0 - band, 0.0) ** 2) & (r2 < (1.0 + band) ** 2))
        if near[0].size == 0:
            return frac
        idx = np.stack([index[a].ravel()[near[a]] for a in range(3)])  # (3, n) voxel indices
        semi32 = semi.astype(np.float32)[:, None]
        u = offset.astype(np.float32)[:, None] + slope.astype(np.float32) @ idx
        r = np.sqrt((u * u).sum(0))
        w = u / semi32  # r times the gradient of r, in local axes
        w_norm = np.maximum(np.sqrt((w * w).sum(0)), 1e-12)
        distance = (r - 1.0) * r / w_norm  # first-order signed distance (mm), positive outside
        if self.folds_mm:
            x = grid.origin.astype(np.float32)[:, None] + grid.step.astype(np.float32) @ idx
            distance -= self.folds_mm * _folding(*x)
        normal = (grid.rotation.T @ q).astype(np.float32) @ (w / w_norm)  # along the voxel axes
        width = np.abs(normal).T @ grid.voxel.astype(np.float32)
        frac[near] = np.clip(0.5 - distance / np.maximum(width, 1e-12), 0.0, 1.0)
        return frac


@dataclass(frozen=True)
class Capsule:
    """A cylinder of ``radius`` (mm) around the segment ``start``-``end`` with hemispherical ends.

    ``in_brain`` as for :class:`Ellipsoid`.
    """

    tissue: str
    start: tuple
    end: tuple
    radius: float
    in_brain: bool | None = None

    def extent(self, direction):
        """(min, max) of ``direction . x`` over the shape (mm), for a unit vector."""
        ends = [float(np.dot(self.start, direction)), float(np.dot(self.end, direction))]
        return min(ends) - self.radius, max(ends) + self.radius

    def fraction(self, grid, index):
        """Covered fraction (float32) of the voxels at the broadcastable ``index`` arrays of ``grid``."""
        start = np.asarray(self.start, float)
        axis = np.asarray(self.end, float) - start
        origin = (grid.origin - start).astype(np.float32)
        step = grid.step.astype(np.float32)
        rel = [((origin[b] + step[b, 0] * index[0]) + step[b, 1] * index[1]) + step[b, 2] * index[2]
               for b in range(3)]
        along = axis.astype(np.float32) / np.float32(max(axis @ axis, 1e-12))
        t = np.clip(rel[0] * along[0] + rel[1] * along[1] + rel[2] * along[2], 0.0, 1.0)
        diff = [rel[b] - t * np.float32(axis[b]) for b in range(3)]
        dist = np.sqrt(diff[0] ** 2 + diff[1] ** 2 + diff[2] ** 2)
        rot = grid.rotation.astype(np.float32)
        width = sum(np.abs(diff[0] * rot[0, a] + diff[1] * rot[1, a] + diff[2] * rot[2, a]) * np.float32(grid.voxel[a])
                    for a in range(3)) / np.maximum(dist, 1e-9)
        return np.clip(0.5 - (dist - np.float32(self.radius)) / np.maximum(width, 1e-9), 0.0, 1.0)


def _both_sides(shape):
    """``shape`` (given in the right hemisphere, x > 0) and its mirror image in the left one."""
    if isinstance(shape, Capsule):
        mirror = replace(shape, start=(-shape.start[0], *shape.start[1:]), end=(-shape.end[0], *shape.end[1:]))
    else:
        ax, ay, az = shape.angles_deg
        mirror = replace(shape, centre=(-shape.centre[0], *shape.centre[1:]), angles_deg=(ax, -ay, -az))
    return [shape, mirror]


def _sagittal_sinus():
    """Superior sagittal sinus: a chain of capsules along the midline just under the vault."""
    ys = np.linspace(62.0, -80.0, 9)
    zs = 10.0 + 60.0 * np.sqrt(1.0 - (ys / 86.0) ** 2) - 2.0
    return [Capsule("blood", (0.0, y0, z0), (0.0, y1, z1), 3.5)
            for y0, z0, y1, z1 in zip(ys[:-1], zs[:-1], ys[1:], zs[1:])]


# Coordinates: RAS mm, origin near the centre of the cerebrum (MNI + (0, 17, -7)).
_CEREBRUM = ((0.0, 0.0, 10.0), (68.0, 86.0, 60.0))
_CEREBELLUM = ((0.0, -50.0, -42.0), (50.0, 30.0, 22.0))

#: Soft-tissue shapes: the outer surface of the head (used for the field grid and fitting the FOV).
HEAD_SHAPES = [
    Ellipsoid("soft_tissue", _CEREBRUM[0], tuple(a + 15 for a in _CEREBRUM[1])),
    Ellipsoid("soft_tissue", _CEREBELLUM[0], tuple(a + 15 for a in _CEREBELLUM[1])),
    Ellipsoid("soft_tissue", (0.0, 12.0, -55.0), (66.0, 88.0, 55.0)),  # face, skull base, jaw
    Capsule("soft_tissue", (0.0, -15.0, -70.0), (0.0, -15.0, -100.0), 52.0),  # neck
]

#: Every shape, in painting order.
SHAPES = HEAD_SHAPES + [
    # skull vault (bone 7 mm under 5 mm of scalp), then the intracranial space filled with CSF
    Ellipsoid("bone", _CEREBRUM[0], tuple(a + 10 for a in _CEREBRUM[1])),
    Ellipsoid("bone", _CEREBELLUM[0], tuple(a + 11 for a in _CEREBELLUM[1])),
    Ellipsoid("csf", _CEREBRUM[0], tuple(a + 3 for a in _CEREBRUM[1])),
    Ellipsoid("csf", _CEREBELLUM[0], tuple(a + 4 for a in _CEREBELLUM[1])),
    # cerebrum: cortex 4 mm thick on average, folded by +-3 mm, around white matter
    Ellipsoid("grey_matter", *_CEREBRUM, in_brain=True),
    Ellipsoid("white_matter", _CEREBRUM[0], tuple(a - 5 for a in _CEREBRUM[1]), folds_mm=3.0),
    # the cerebellum under the occipital lobes, behind a CSF layer (the tentorium), then the brainstem
    Ellipsoid("csf", _CEREBELLUM[0], tuple(a + 1.5 for a in _CEREBELLUM[1])),
    Ellipsoid("grey_matter", *_CEREBELLUM, in_brain=True),
    Ellipsoid("white_matter", (0.0, -47.0, -40.0), (28.0, 14.0, 10.0)),
    Capsule("white_matter", (0.0, -16.0, -8.0), (0.0, -28.0, -72.0), 11.0, in_brain=True),
    # interhemispheric fissure above the corpus callosum
    Ellipsoid("csf", (0.0, -5.0, 52.0), (1.2, 78.0, 30.0)),
    # deep grey nuclei
    *_both_sides(Ellipsoid("caudate", (15.0, 31.0, 1.0), (5.0, 9.0, 8.0))),
    *_both_sides(Ellipsoid("caudate", (17.0, 14.0, 12.0), (3.5, 12.0, 5.0), angles_deg=(-20.0, 0.0, 0.0))),
    *_both_sides(Ellipsoid("putamen", (25.0, 19.0, -6.0), (5.5, 15.0, 9.0), angles_deg=(0.0, 0.0, 8.0))),
    *_both_sides(Ellipsoid("globus_pallidus", (19.0, 13.0, -8.0), (4.0, 8.0, 5.5), angles_deg=(0.0, 0.0, 8.0))),
    *_both_sides(Ellipsoid("thalamus", (11.0, -2.0, 1.0), (8.0, 14.0, 8.0), angles_deg=(0.0, 0.0, -10.0))),
    *_both_sides(Ellipsoid("substantia_nigra", (11.0, 1.0, -19.0), (3.5, 9.0, 3.0), angles_deg=(0.0, 0.0, -30.0))),
    *_both_sides(Ellipsoid("red_nucleus", (5.0, -3.0, -16.0), (3.5, 4.0, 4.5))),
    *_both_sides(Ellipsoid("dentate", (15.0, -40.0, -42.0), (6.0, 9.0, 6.0), angles_deg=(0.0, 0.0, 20.0))),
    # ventricles
    *_both_sides(Ellipsoid("csf", (11.0, 8.0, 13.0), (5.5, 27.0, 6.5), angles_deg=(-8.0, 0.0, 0.0))),
    Ellipsoid("csf", (0.0, 1.0, -1.0), (1.5, 11.0, 7.0)),  # third ventricle
    Ellipsoid("csf", (0.0, -30.0, -38.0), (6.0, 4.0, 6.0)),  # fourth ventricle
    # veins: internal cerebral, thalamostriate and medullary veins, straight and sagittal sinuses
    *_both_sides(Capsule("blood", (2.5, 20.0, 8.0), (2.5, -12.0, 12.0), 1.5)),
    *_both_sides(Capsule("blood", (2.5, -12.0, 12.0), (1.5, -30.0, 9.0), 1.5)),
    *_both_sides(Capsule("blood", (14.0, 12.0, 12.0), (6.0, -4.0, 12.0), 1.2)),
    *_both_sides(Capsule("blood", (32.0, 15.0, 32.0), (42.0, -30.0, 36.0), 1.2)),
    Capsule("blood", (0.0, -30.0, 9.0), (0.0, -48.0, 4.0), 2.5),  # vein of Galen
    Capsule("blood", (0.0, -48.0, 4.0), (0.0, -76.0, -10.0), 2.5),  # straight sinus
    *_sagittal_sinus(),
    Ellipsoid("calcification", (30.0, -22.0, 26.0), (3.0, 3.0, 3.0)),
    # skull base: orbital roof and temporal bones, which hold the air cavities
    Ellipsoid("bone", (0.0, 48.0, -62.0), (50.0, 40.0, 34.0), in_brain=False),
    *_both_sides(Ellipsoid("bone", (56.0, -20.0, -46.0), (18.0, 22.0, 16.0), in_brain=False)),
    Ellipsoid("sinus_air", (0.0, 40.0, -48.0), (15.0, 22.0, 13.0), in_brain=False),
    *_both_sides(Ellipsoid("sinus_air", (57.0, -22.0, -47.0), (8.0, 10.0, 8.0), in_brain=False)),
]

#: Lesions painted over the head by ``sample_head(..., lesions=True)``: an acute haemorrhage of 16 x 22 x 18 mm
#: in the left basal ganglia and a dense calcification of 8 mm in the left frontal white matter, the strong
#: sources a reliability mask must not cut out of the map.
LESION_SHAPES = [
    Ellipsoid("haemorrhage", (-25.0, 17.0, -4.0), (8.0, 11.0, 9.0)),
    Ellipsoid("calcification", (-24.0, 40.0, 22.0), (4.0, 4.0, 4.0), chi_ppm=-0.5),
]


@dataclass
class HeadPhantom:
    """The phantom sampled on a voxel grid (arrays in voxel space, float32 unless noted).

    chi_ppm: susceptibility relative to CSF (air +9.4); m0: signal at TE = 0 (a.u., air 0);
    r2star_hz: R2* at 3 T; seg: uint8 labels (QSM challenge 2.0, and 17 haemorrhage); brain_mask: bool;
    affine: 4x4 voxel-to-world (mm); scale: world mm per phantom mm (the head's size factor);
    shapes: what was painted (:data:`SHAPES`, and :data:`LESION_SHAPES` with lesions).
    """

    chi_ppm: np.ndarray
    m0: np.ndarray
    r2star_hz: np.ndarray
    seg: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    scale: float
    shapes: tuple = tuple(SHAPES)


class _Grid:
    """A voxel grid expressed in phantom mm: x = origin + step @ index."""

    def __init__(self, shape, affine, scale):
        self.shape = tuple(int(n) for n in shape)
        self.step = np.asarray(affine, float)[:3, :3] / scale
        self.origin = np.asarray(affine, float)[:3, 3] / scale
        self.voxel = np.sqrt((self.step ** 2).sum(0))
        self.rotation = self.step / self.voxel

    def index_range(self, shape):
        """Continuous index interval covered by ``shape`` along each voxel axis."""
        out = []
        for a in range(3):
            axis = self.rotation[:, a]
            lo, hi = shape.extent(axis)
            base = float(axis @ self.origin)
            out.append(((lo - base) / self.voxel[a], (hi - base) / self.voxel[a]))
        return out

    def box(self, shape):
        """Slices of the grid holding ``shape`` (one voxel of margin for the partial-volume ramp)."""
        return tuple(slice(int(np.clip(np.floor(lo) - 1, 0, n)), int(np.clip(np.ceil(hi) + 2, 0, n)))
                     for (lo, hi), n in zip(self.index_range(shape), self.shape))


def grid_affine(shape, voxel_size_mm, rotation=np.eye(3)):
    """Voxel-to-world affine ``[rotation @ diag(voxel_size), t]`` whose grid centre is world 0."""
    rot = np.asarray(rotation, float)
    if rot.shape != (3, 3) or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-6):
        raise ValueError(f"rotation must be an orthonormal 3x3 matrix, got {rot.tolist()}")
    vox = np.asarray(voxel_size_mm, float)
    if vox.shape != (3,) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm}")
    affine = np.eye(4)
    affine[:3, :3] = rot * vox
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return affine


def fit_scale(shape, voxel_size_mm, rotation=np.eye(3), margin=0.95):
    """Largest head size factor <= 1 whose head fits ``margin`` of the in-plane (i, j) field of view."""
    grid = _Grid(shape, grid_affine(shape, voxel_size_mm, rotation), 1.0)
    scale = 1.0
    for a in range(2):
        lo = min(s.extent(grid.rotation[:, a])[0] for s in HEAD_SHAPES)
        hi = max(s.extent(grid.rotation[:, a])[1] for s in HEAD_SHAPES)
        scale = min(scale, margin * shape[a] * voxel_size_mm[a] / (hi - lo))
    return scale


def _paint(grid, keep=None, shapes=SHAPES):
    """Paint ``shapes`` on ``grid``; chi on the whole grid, the other maps on ``keep`` (slices).

    Returns chi, m0, r2star, seg, brain fraction (the last four over ``keep``).
    """
    keep = keep or tuple(slice(0, n) for n in grid.shape)
    kshape = tuple(s.stop - s.start for s in keep)
    chi = np.full(grid.shape, AIR_CHI_PPM, np.float32)
    m0 = np.zeros(kshape, np.float32)
    r2star = np.zeros(kshape, np.float32)
    seg = np.zeros(kshape, np.uint8)
    brain = np.zeros(kshape, np.float32)
    for shape in shapes:
        box = grid.box(shape)
        if any(s.stop <= s.start for s in box):
            continue
        index = [np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)])
                 for a, s in enumerate(box)]
        frac = shape.fraction(grid, index)
        tissue = TISSUES[shape.tissue]
        own_chi = getattr(shape, "chi_ppm", None)
        chi[box] += frac * ((tissue.chi_ppm if own_chi is None else own_chi) - chi[box])
        inner = tuple(slice(max(b.start, k.start), min(b.stop, k.stop)) for b, k in zip(box, keep))
        if any(s.stop <= s.start for s in inner):
            continue
        f = frac[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box))]
        dst = tuple(slice(i.start - k.start, i.stop - k.start) for i, k in zip(inner, keep))
        m0[dst] += f * (tissue.m0 - m0[dst])
        r2star[dst] += f * (tissue.r2star_hz - r2star[dst])
        seg[dst][f >= 0.5] = tissue.label
        if shape.in_brain is True:
            brain[dst] += f * (1.0 - brain[dst])
        elif shape.in_brain is False:
            brain[dst] *= 1.0 - f
    return chi, m0, r2star, seg, brain


def sample_head(shape, voxel_size_mm, rotation=np.eye(3), scale=None, lesions=False):
    """Sample the phantom on a grid of ``shape`` voxels of ``voxel_size_mm`` (mm), centred on world 0.

    ``lesions``: also paint :data:`LESION_SHAPES`.
    ``rotation`` (3x3, orthonormal) orients the voxel axes in the world (RAS) frame, e.g. an oblique
    slab. ``scale`` multiplies the head's size; None shrinks it (never enlarges) to fit the in-plane
    field of view (see :func:`fit_scale`); the slice axis may cut it, as a slab acquisition does.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive integers, got {shape}")
    affine = grid_affine(shape, voxel_size_mm, rotation)
    scale = fit_scale(shape, voxel_size_mm, rotation) if scale is None else float(scale)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    shapes = tuple(SHAPES + (LESION_SHAPES if lesions else []))
    chi, m0, r2star, seg, brain = _paint(_Grid(shape, affine, scale), shapes=shapes)
    return HeadPhantom(chi, m0, r2star, seg, brain >= 0.5, affine, scale, shapes)


def harmonic_basis(x, y, z):
    """Yield the 9 solid harmonics of order 0-2 (what 2nd-order shim coils make) at world points (mm)."""
    x, y, z = x / 100.0, y / 100.0, z / 100.0  # unit 10 cm keeps the least squares well conditioned
    yield np.ones_like(x)
    yield from (x, y, z, x * y, y * z, x * z, x * x - y * y, 2 * z * z - x * x - y * y)


@dataclass
class SimulationTruth:
    """What :func:`simulate_megre` simulated, on the phantom grid (float32).

    field_hz: total field after the shim, the mean over each voxel's sub-voxels; phase_offset_rad: phase at TE = 0.
    """

    field_hz: np.ndarray
    phase_offset_rad: np.ndarray


def _block_mean(array, oversample):
    """Mean over ``oversample``^3 blocks."""
    if oversample == 1:
        return array
    o = oversample
    total = sum(array[i::o, j::o, k::o] for i in range(o) for j in range(o) for k in range(o))
    return total / np.float32(o ** 3)


def _fine_field_ppm(phantom, oversample, shim):
    """Total field (ppm) on the ``oversample``-times finer grid (all three axes), plus that grid's maps.

    The susceptibility is painted on a grid that extends the field of view to hold the whole head,
    with air as zero (chi - AIR_CHI_PPM) so that the FFT zero padding is air too.
    """
    shape = phantom.chi_ppm.shape
    fine_shape = tuple(n * oversample for n in shape)
    # sub-voxel d of voxel i sits at index i + (d + 1/2) / oversample - 1/2 of the phantom's grid
    affine = phantom.affine.copy()
    affine[:3, :3] = phantom.affine[:3, :3] / oversample
    affine[:3, 3] += phantom.affine[:3, :3] @ np.full(3, 0.5 / oversample - 0.5)
    vox = physics.voxel_size_mm(affine)
    fov = _Grid(fine_shape, affine, phantom.scale)
    lo, hi, pad = [], [], []
    for a in range(3):
        ranges = [fov.index_range(s)[a] for s in HEAD_SHAPES]
        head_lo, head_hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        lo.append(min(0, int(np.floor(head_lo)) - 1))
        hi.append(max(fine_shape[a], int(np.ceil(head_hi)) + 2))
        # an FFT period of 1.5 head lengths leaves the field of the periodic copies of the head
        # smooth over it (0.2 Hz rms in the brain at 3 T after the shim fit, which removes most of it)
        pad.append(max(0, int(np.ceil((1.5 * (head_hi - head_lo) - (hi[-1] - lo[-1])) / 2))))
    ext_affine = affine.copy()
    ext_affine[:3, 3] += affine[:3, :3] @ np.array(lo, float)
    grid = _Grid(np.subtract(hi, lo), ext_affine, phantom.scale)
    keep = tuple(slice(-lo[a], -lo[a] + fine_shape[a]) for a in range(3))
    chi, m0, r2star, _, brain = _paint(grid, keep, phantom.shapes)
    chi -= AIR_CHI_PPM
    field = dipole.forward_field_ppm(chi, vox, physics.b0_direction_voxel(affine), pad_voxels=pad)
    field = np.ascontiguousarray(field[keep])  # frees the extended grid
    del chi
    ijk = [np.arange(n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)]) for a, n in
           enumerate(fine_shape)]
    world = [(np.float32(affine[b, 3]) + np.float32(affine[b, 0]) * ijk[0] + np.float32(affine[b, 1]) * ijk[1])
             + np.float32(affine[b, 2]) * ijk[2] for b in range(3)]
    if shim:
        inside = brain >= 0.5
        if not inside.any():
            raise ValueError("the brain is outside the field of view: cannot shim on it")
        # least squares on a subsample of the brain is plenty for 9 smooth terms
        sub = np.zeros_like(inside)
        sub[::2, ::2, ::2] = True
        sel = inside & sub if (inside & sub).sum() >= 50 else inside
        basis = harmonic_basis(*(w[sel] for w in world))
        coef = np.linalg.lstsq(np.stack(list(basis), 1).astype(np.float64), field[sel].astype(np.float64),
                               rcond=None)[0]
        for c, term in zip(coef, harmonic_basis(*world)):
            field -= np.float32(c) * term
    return field, m0, r2star, world


def simulate_megre(phantom, echo_times_s, b0_tesla, peak_snr, rng, oversample=2, shim=True,
                   return_truth=False):
    """Simulate a multi-echo GRE acquisition of ``phantom``: 4D magnitude (a.u.) and phase (rad), echo last.

    The field (ppm) is ``dipole.forward_field_ppm`` of the whole head, B0 along world z (so
    ``physics.b0_direction_voxel(affine)`` in voxel axes), minus a 2nd-order shim fitted over the
    brain; the signal of each sub-voxel is ``m0 exp(-TE R2*) exp(i (phi0 + 2 pi f TE))``, R2*
    scaled linearly from 3 T to ``b0_tesla``, ``phi0`` a smooth random phase offset of a few rad.
    Against the inverse crime, all this is computed on a grid ``oversample`` times finer along
    every axis and the complex signal averaged back. Refining all three axes matters for oblique
    B0: the sampled dipole kernel is discontinuous at the Nyquist faces when B0 is off-axis, and
    the field of a sharp 9.4 ppm air/tissue edge then rings in a way no real (voxel-averaged)
    field does; RESHARP cannot remove that ringing (measured: TKD correlation 0.75 at 25 deg
    with a 1x grid vs 0.85 with a 2x grid averaged down, 0.86 straight). Complex Gaussian noise has a standard deviation of
    (max |signal| at the first echo) / ``peak_snr`` per channel (None: no noise); air gets noise only.
    ``return_truth`` also returns a :class:`SimulationTruth`.
    """
    tes = np.atleast_1d(np.asarray(echo_times_s, float))
    if tes.ndim != 1 or tes.size == 0 or np.any(tes <= 0) or np.any(~np.isfinite(tes)):
        raise ValueError(f"echo_times_s must be positive finite times in s, got {echo_times_s}")
    if not b0_tesla > 0:
        raise ValueError(f"b0_tesla must be > 0, got {b0_tesla}")
    if peak_snr is not None and not peak_snr > 0:
        raise ValueError(f"peak_snr must be > 0 or None, got {peak_snr}")
    if int(oversample) != oversample or oversample < 1:
        raise ValueError(f"oversample must be a positive integer, got {oversample}")
    oversample = int(oversample)
    field_ppm, m0, r2star, world = _fine_field_ppm(phantom, oversample, shim)
    field_hz = physics.field_ppm_to_hz(field_ppm, b0_tesla)
    del field_ppm
    r2star *= b0_tesla / R2STAR_REFERENCE_TESLA
    # phase at TE = 0 (coil and receiver phase): a random smooth 2nd-order polynomial
    c = rng.normal(0.0, [1.2, 1.2, 1.2, 0.6, 0.6, 0.6]).astype(np.float32)
    xs, ys, zs = (w / np.float32(100.0) for w in world)
    offset = (np.float32(rng.uniform(-np.pi, np.pi)) + c[0] * xs + c[1] * ys + c[2] * zs
              + c[3] * xs * ys + c[4] * ys * zs + c[5] * xs * zs)
    del world, xs, ys, zs
    shape = phantom.chi_ppm.shape
    signal = np.empty(shape + (tes.size,), np.complex64)
    for n, te in enumerate(tes):
        amplitude = m0 * np.exp(np.float32(-te) * r2star)
        angle = offset + np.float32(2 * np.pi * te) * field_hz
        signal[..., n].real = _block_mean(amplitude * np.cos(angle), oversample)
        signal[..., n].imag = _block_mean(amplitude * np.sin(angle), oversample)
    if peak_snr is not None:
        sigma = np.float32(np.abs(signal[..., 0]).max() / peak_snr)
        signal.real += sigma * rng.standard_normal(signal.shape, np.float32)
        signal.imag += sigma * rng.standard_normal(signal.shape, np.float32)
    magnitude, phase = np.abs(signal), np.angle(signal)
    if not return_truth:
        return magnitude, phase
    truth = SimulationTruth(_block_mean(field_hz, oversample).astype(np.float32),
                            _block_mean(offset, oversample).astype(np.float32))
    return magnitude, phase, truth
