"""On-the-fly synthetic training data: brain-like susceptibility crops and their local fields.

The base is the MNI152 2009a symmetric template shipped with nilearn (GM and WM
probability maps at 1 mm; nilearn does not ship the CSF map, so CSF is the filled
brain hull minus GM and WM). Each sample follows the Meta-QSM recipe:

* a random voxel size and (for ``voxel+b0``) a B0 direction within 30 deg of the k axis;
* a crop of the template, randomly rotated and elastically distorted, sampled on a grid
  ``supersample`` times finer than the sample grid;
* random tissue values (WM, GM, CSF), deep grey nuclei as ellipsoids at their MNI
  positions, thin veins, and random ellipsoids/spheres/cuboids/cylinders standing for
  bleeds and calcifications;
* optionally (``hard_edges``) one tissue per fine voxel, as a label map gives, instead of the
  template's soft partial volumes, and (``texture_ppm``) a smooth random texture of the tissue's
  susceptibility: head phantoms and real tissue have both, and on crops with texture metaqsm-v3
  (trained without) lost its lead over TKD (BENCHMARKS.md, "Texture");
* a magnitude image from the same anatomy: random tissue intensities, darker iron-rich
  nuclei and veins, shapes with their own intensity (or none: not every susceptibility
  edge shows in the magnitude) and magnitude-only shapes, a smooth receive bias and
  noise; what MEDI's edge prior and a magnitude-input network learn from;
* the local field by the forward dipole model on the fine grid, then block-averaged
  to the sample grid (so the inverse problem is not solved with the kernel that made
  the data -- no inverse crime), plus Gaussian noise;
* a random harmonic polynomial (degree <= 2) added to the field but not to the label:
  what background removal leaves behind (SHARP-type methods remove harmonic fields
  only up to their boundary errors), so the network learns not to turn it into
  susceptibility.

nilearn is a train/test dependency only; nothing at runtime imports this module.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..qsm.core.dipole import forward_field_ppm
from ..qsm.core.smv import distance_mm

#: Range (ppm) of the random shapes' (bleeds', calcifications') susceptibility unless asked otherwise: metaqsm-v3's.
LESION_PPM = (-0.3, 0.6)
#: Range of each semi-axis (mm) of the random shapes (metaqsm-v3's crops: up to 16 mm across).
LESION_RADIUS_MM = (0.75, 8.0)
#: Voxel-size sampling box (mm): the paper's (0.5-1.0, 0.5-1.0, 2.0-4.0) widened to near-isotropic 0.6-1.2 mm.
VOXEL_RANGE_MM = ((0.5, 1.2), (0.5, 1.2), (0.6, 4.0))
#: Largest angle (deg) between B0 and the k axis for the voxel+b0 variant.
MAX_B0_TILT_DEG = 30.0

# Deep grey nuclei: MNI centre (mm, x>0 side; mirrored to x<0), semi-axes (mm), susceptibility range (ppm).
NUCLEI = (
    ("caudate", (13, 12, 10), (4, 10, 7), (0.04, 0.10)),
    ("putamen", (25, 2, 0), (5, 13, 8), (0.03, 0.09)),
    ("globus_pallidus", (19, -3, -2), (3, 7, 4), (0.10, 0.20)),
    ("thalamus", (11, -18, 7), (6, 11, 7), (0.01, 0.06)),
    ("red_nucleus", (5, -20, -10), (3, 3, 3), (0.08, 0.17)),
    ("substantia_nigra", (11, -18, -12), (3, 8, 3), (0.10, 0.20)),
    ("dentate", (15, -57, -36), (6, 7, 5), (0.08, 0.18)),
)


@dataclass
class Sample:
    """One training example on the sample grid (float32 arrays, zero outside ``mask``)."""

    field_ppm: np.ndarray
    chi_ppm: np.ndarray
    mask: np.ndarray
    voxel_size_mm: tuple
    b0_dir: tuple
    magnitude: np.ndarray  # arbitrary units, mean about 1 in the mask


def _nilearn_data_dir():
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def mni_base():
    """Template tissue maps as a (1, 4, I, J, K) float32 tensor [GM, WM, CSF, brain] with MNI mm of voxel 0.

    Computed once per process (about 2 s) and cached.
    """
    import nibabel as nib
    data = _nilearn_data_dir()
    maps = []
    for tissue in ("gm", "wm"):
        img = nib.load(data / f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz")
        maps.append(np.asarray(img.dataobj, dtype=np.float32) / 255.0)
    gm, wm = maps
    affine = img.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError("expected the 1 mm axis-aligned MNI152 2009a template")
    # brain hull: closed and filled GM+WM, so ventricles and sulci become CSF
    hull = ndimage.binary_closing(gm + wm > 0.5, iterations=3)
    hull = ndimage.binary_fill_holes(hull)
    brain = ndimage.gaussian_filter(hull.astype(np.float32), 0.7)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    base = torch.from_numpy(np.stack([gm, wm, csf, brain])[None])
    inside = np.argwhere(hull)
    return base, affine[:3, 3].astype(np.float32), inside.astype(np.float32) + affine[:3, 3]


def random_voxel_size(rng):
    """Voxel size (mm) drawn from :data:`VOXEL_RANGE_MM`; half the time square in-plane."""
    di = rng.uniform(*VOXEL_RANGE_MM[0])
    dj = di if rng.random() < 0.5 else rng.uniform(*VOXEL_RANGE_MM[1])
    return (float(di), float(dj), float(rng.uniform(*VOXEL_RANGE_MM[2])))


def random_b0_dir(rng, max_tilt_deg=MAX_B0_TILT_DEG):
    """Unit vector uniformly distributed on the cap within ``max_tilt_deg`` of +k."""
    cos_t = rng.uniform(np.cos(np.radians(max_tilt_deg)), 1.0)
    phi = rng.uniform(0, 2 * np.pi)
    sin_t = np.sqrt(1 - cos_t ** 2)
    return (float(sin_t * np.cos(phi)), float(sin_t * np.sin(phi)), float(cos_t))


def _rotation(rng, max_deg):
    """Random rotation matrix: small rotations about the three axes."""
    a, b, c = np.radians(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _random_orthonormal(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _block_mean(x, factor):
    """Mean over non-overlapping blocks of ``factor`` voxels per axis (the acquisition's voxel average)."""
    i, j, k = (n // f for n, f in zip(x.shape, factor))
    return x.reshape(i, factor[0], j, factor[1], k, factor[2]).mean(axis=(1, 3, 5))


def _paint_shapes(chi, mask, axes, rng, n_shapes, value_range, magnitude, visible=0.8, radius_mm=LESION_RADIUS_MM):
    """Overwrite ``chi`` (torch, fine grid) inside random ellipsoids, spheres, cuboids and cylinders.

    With probability ``visible`` a shape also sets its own ``magnitude`` intensity (0.1-1.3), else
    it leaves the magnitude as it was. ``chi=None`` paints magnitude-only shapes (``visible`` 1). Each
    semi-axis is drawn from ``radius_mm``.
    """
    where = torch.nonzero(mask)
    if len(where) == 0:
        return
    for _ in range(n_shapes):
        centre_idx = where[rng.integers(len(where))]
        centre = torch.stack([ax[i] for ax, i in zip(axes, centre_idx)])
        kind = rng.choice(["ellipsoid", "sphere", "cuboid", "cylinder"])
        radii = rng.uniform(*radius_mm, 3)
        if kind == "sphere":
            radii[:] = radii[0]
        reach = float(np.linalg.norm(radii))
        sl = []
        for ax, c in zip(axes, centre):
            step = float(ax[1] - ax[0])
            lo = max(int((float(c) - reach - float(ax[0])) / step), 0)
            hi = min(int((float(c) + reach - float(ax[0])) / step) + 2, len(ax))
            sl.append(slice(lo, hi))
        rot = torch.from_numpy(_random_orthonormal(rng).astype(np.float32))
        d = [ax[s] - c for ax, s, c in zip(axes, sl, centre)]
        # coordinates in the shape's frame: u_m = sum_a rot[a, m] * d_a
        u = [d[0].view(-1, 1, 1) * rot[0, m] + d[1].view(1, -1, 1) * rot[1, m] + d[2].view(1, 1, -1) * rot[2, m]
             for m in range(3)]
        r = [float(x) for x in radii]
        if kind in ("ellipsoid", "sphere"):
            inside = (u[0] / r[0]) ** 2 + (u[1] / r[1]) ** 2 + (u[2] / r[2]) ** 2 <= 1
        elif kind == "cuboid":
            inside = (u[0].abs() <= r[0]) & (u[1].abs() <= r[1]) & (u[2].abs() <= r[2])
        else:
            inside = ((u[0] / r[0]) ** 2 + (u[1] / r[0]) ** 2 <= 1) & (u[2].abs() <= r[2])
        if chi is not None:
            chi[sl[0], sl[1], sl[2]][inside] = float(rng.uniform(*value_range))
        if chi is None or rng.random() < visible:
            magnitude[sl[0], sl[1], sl[2]][inside] = float(rng.uniform(0.1, 1.3))


def _paint_veins(chi, axes, rng, n_veins, value_range, magnitude):
    """Thin straight vessels (radius 0.4-1.5 mm) through random points of the crop, darker
    (x 0.2-0.8) in the ``magnitude`` (deoxygenated blood's short T2*)."""
    extent = [float(ax[-1]) for ax in axes]
    for _ in range(n_veins):
        point = torch.tensor([rng.uniform(-e, e) * 0.8 for e in extent], dtype=torch.float32)
        direction = torch.from_numpy(_random_orthonormal(rng)[:, 0].astype(np.float32))
        radius = rng.uniform(0.4, 1.5)
        d = [ax - p for ax, p in zip(axes, point)]
        along = d[0].view(-1, 1, 1) * direction[0] + d[1].view(1, -1, 1) * direction[1] \
            + d[2].view(1, 1, -1) * direction[2]
        dist2 = (d[0] ** 2).view(-1, 1, 1) + (d[1] ** 2).view(1, -1, 1) + (d[2] ** 2).view(1, 1, -1) - along ** 2
        inside = dist2 <= radius ** 2
        chi[inside] = float(rng.uniform(*value_range))
        magnitude[inside] *= float(rng.uniform(0.2, 0.8))


def _harmonic_background(shape, voxel_size_mm, mask, rng):
    """A random harmonic polynomial of degree <= 2 (x, y, z, x^2 - y^2, 2z^2 - x^2 - y^2, xy, xz, yz; mm)
    with unit RMS inside ``mask``."""
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, voxel_size_mm)],
                          indexing="ij", sparse=True)
    terms = (x, y, z, x * x - y * y, 2 * z * z - x * x - y * y, x * y, x * z, y * z)
    out = np.zeros(shape, dtype=np.float64)
    for term, c in zip(terms, rng.normal(size=len(terms))):
        t = np.broadcast_to(term, shape)
        out += c * t / max(float(np.sqrt(np.mean(t[mask] ** 2))), 1e-12)
    out -= out[mask].mean()
    return out / max(float(np.sqrt(np.mean(out[mask] ** 2))), 1e-12)


def _receive_bias(fine_shape, rng):
    """A smooth multiplicative receive-field bias, within about +-25 %."""
    coarse = torch.from_numpy(rng.normal(0, 0.12, (1, 1, 3, 3, 3)).astype(np.float32))
    return torch.exp(F.interpolate(coarse, size=fine_shape, mode="trilinear", align_corners=True)[0, 0])


def _texture_ppm(fine_shape, fine_voxel_mm, rng, std_ppm, sigma_mm):
    """A smooth Gaussian random field (ppm) of standard deviation ``std_ppm`` and correlation width
    ``sigma_mm`` (Gaussian sigma): tissue's own susceptibility texture (iron, myelin, vessels below
    the voxel size), which no tissue map shows."""
    noise = rng.standard_normal(fine_shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, [sigma_mm / d for d in fine_voxel_mm], mode="wrap")
    return torch.from_numpy(smooth * np.float32(std_ppm / max(float(smooth.std()), 1e-12)))


#: Depth (mm) of the shell of sources just outside the mask for ``edge_background``.
EDGE_SHELL_MM = (2.0, 8.0)


def _edge_sources(mask_fine, fine_voxel_mm, rng):
    """Random susceptibility (arbitrary scale) in a shell of :data:`EDGE_SHELL_MM` just outside ``mask_fine``:
    a random level plus a smooth texture, whose field inside the mask is harmonic and strongest near its edge,
    like what background removal leaves there (PDF's error is the harmonic field of the mask's surroundings,
    most of it within a few mm of the edge; BENCHMARKS.md, "Where PDF's error is")."""
    outside = distance_mm(~mask_fine, fine_voxel_mm, cap_mm=EDGE_SHELL_MM[1])  # exact up to the widest shell
    shell = (outside > 0) & (outside <= rng.uniform(*EDGE_SHELL_MM))
    texture = _texture_ppm(mask_fine.shape, fine_voxel_mm, rng, 1.0, rng.uniform(1.5, 4.0)).numpy()
    return np.where(shell, texture + np.float32(rng.uniform(-1.0, 1.0)), np.float32(0)).astype(np.float32)


def make_sample(rng, shape=(64, 64, 32), voxel_size_mm=None, b0_dir=None, conditioning="voxel+b0",
                supersample=2, noise_ppm=(0.0, 0.004), max_shapes=6, max_veins=4, background=(0.0, 0.5),
                magnitude_snr=(20.0, 200.0), hard_edges=False, texture_ppm=None, edge_background=None,
                lesion_ppm=LESION_PPM, lesion_radius_mm=LESION_RADIUS_MM):
    """One synthetic (local field, susceptibility, mask) crop of ``shape`` voxels.

    ``voxel_size_mm``/``b0_dir`` default to random draws (B0 stays +k for ``conditioning='voxel'``);
    ``noise_ppm`` is the range of the field noise standard deviation (ppm); ``background`` the range
    of the harmonic background's RMS relative to the local field's (inside the mask);
    ``edge_background`` (optional) the range of the RMS, relative to the local field's, of the field of random
    sources in a shell just outside the mask (:func:`_edge_sources`), also added to the field but not to the label;
    ``magnitude_snr`` the range of the magnitude's mean over its noise s.d.; ``lesion_ppm`` the range of the
    random shapes' (bleeds', calcifications') susceptibility and ``lesion_radius_mm`` that of their semi-axes
    (mm). Fields are demeaned inside the mask (the mean local field is not determined by the susceptibility).
    Deterministic for a given ``rng`` state.
    """
    shape = tuple(int(n) for n in shape)
    voxel = tuple(float(v) for v in (voxel_size_mm if voxel_size_mm is not None else random_voxel_size(rng)))
    if b0_dir is None:
        b0_dir = random_b0_dir(rng) if conditioning == "voxel+b0" else (0.0, 0.0, 1.0)
    b0 = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    s = int(supersample)
    fine_shape = tuple(n * s for n in shape)
    fine_voxel = tuple(v / s for v in voxel)

    base, origin_mm, inside_mm = mni_base()
    axes, mni = _crop_frame(rng, fine_shape, fine_voxel, inside_mm)
    gm, wm, csf, brain = _tissue_maps(base, origin_mm, mni, hard_edges)
    chi, magnitude = _tissue_contrast(rng, gm, wm, csf, mni)
    if texture_ppm is not None:
        chi += (gm + wm) * _texture_ppm(fine_shape, fine_voxel, rng, rng.uniform(*texture_ppm), rng.uniform(1.0, 3.0))
    mask_fine = brain > 0.5
    _paint_veins(chi, axes, rng, int(rng.integers(0, max_veins + 1)), (0.3, 0.5), magnitude)
    _paint_shapes(chi, mask_fine, axes, rng, int(rng.integers(0, max_shapes + 1)), lesion_ppm, magnitude,
                  radius_mm=lesion_radius_mm)
    _paint_shapes(None, mask_fine, axes, rng, int(rng.integers(0, 3)), None, magnitude)
    chi = (chi * mask_fine).numpy()
    magnitude = (magnitude * _receive_bias(fine_shape, rng)).numpy()

    pad = [n // 4 for n in fine_shape]
    field = forward_field_ppm(chi, fine_voxel, b0, pad_voxels=pad)
    if edge_background is not None:
        edge_sources = _edge_sources(mask_fine.numpy(), fine_voxel, rng)
        edge_field = forward_field_ppm(edge_sources, fine_voxel, b0, pad_voxels=pad)
    factor = (s, s, s)
    mask = _block_mean(mask_fine.numpy().astype(np.float32), factor) > 0.5
    chi_s = _block_mean(chi, factor)
    field_s = _block_mean(field, factor) + rng.normal(0, rng.uniform(*noise_ppm), shape)
    mag_s = _noisy_magnitude(rng, _block_mean(magnitude, factor), mask, magnitude_snr)
    if mask.any():
        edge = _block_mean(edge_field, factor) if edge_background is not None else None
        _add_backgrounds(rng, field_s, mask, voxel, background, edge, edge_background)
    return Sample(field_ppm=(field_s * mask).astype(np.float32), chi_ppm=(chi_s * mask).astype(np.float32),
                  mask=mask, voxel_size_mm=voxel, b0_dir=tuple(float(x) for x in b0),
                  magnitude=(mag_s * mask).astype(np.float32))


def _crop_frame(rng, fine_shape, fine_voxel, inside_mm):
    """The crop's fine-grid axes (mm, centred on the crop) and the MNI mm of every fine voxel (three tensors):
    the crop is centred on a random brain point (one of ``inside_mm``), rotated and elastically distorted."""
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * d for n, d in zip(fine_shape, fine_voxel)]
    centre = inside_mm[rng.integers(len(inside_mm))] + rng.normal(0, 3, 3)
    rot = torch.from_numpy(_rotation(rng, 15.0).astype(np.float32))
    amplitude = rng.uniform(0.0, 4.0)
    coarse = torch.from_numpy(rng.normal(0, amplitude, (1, 3, 4, 4, 4)).astype(np.float32))
    disp = F.interpolate(coarse, size=fine_shape, mode="trilinear", align_corners=True)[0]
    mni = []
    for m in range(3):
        mni.append(axes[0].view(-1, 1, 1) * rot[m, 0] + axes[1].view(1, -1, 1) * rot[m, 1]
                   + axes[2].view(1, 1, -1) * rot[m, 2] + disp[m] + float(centre[m]))
    return axes, mni


def _tissue_maps(base, origin_mm, mni, hard_edges):
    """The template's GM, WM, CSF and brain maps (:func:`mni_base`, voxel 0 at ``origin_mm``) sampled at ``mni``;
    with ``hard_edges`` each voxel one tissue, as a label map gives (the template's soft partial volumes off)."""
    size = base.shape[2:]
    norm = [2 * (g - float(origin_mm[m])) / (size[m] - 1) - 1 for m, g in enumerate(mni)]
    sampled = F.grid_sample(base, torch.stack(norm[::-1], dim=-1)[None], mode="bilinear",
                            padding_mode="zeros", align_corners=True)[0]
    gm, wm, csf, brain = sampled
    if hard_edges:
        tissue = torch.argmax(torch.stack([csf, wm, gm]), dim=0)
        csf, wm, gm = [(tissue == t).float() * (brain > 0.5) for t in range(3)]
    return gm, wm, csf, brain


def _tissue_contrast(rng, gm, wm, csf, mni):
    """Susceptibility and magnitude (tensors) from the tissue maps: random tissue values, the deep grey
    :data:`NUCLEI` at their MNI positions (``mni``: the MNI mm of each voxel), a random global susceptibility gain."""
    chi = gm * rng.uniform(0.0, 0.05) + wm * rng.uniform(-0.06, -0.01) + csf * rng.uniform(-0.01, 0.01)
    magnitude = gm * rng.uniform(0.7, 1.1) + wm * rng.uniform(0.5, 1.0) + csf * rng.uniform(0.2, 1.2)
    lo = [float(g.min()) for g in mni]
    hi = [float(g.max()) for g in mni]
    for _, c, radii, value_range in NUCLEI:
        for side in (1, -1):
            cen = (side * c[0], c[1], c[2])
            if any(cen[m] + radii[m] < lo[m] or cen[m] - radii[m] > hi[m] for m in range(3)):
                continue
            q = sum(((mni[m] - cen[m]) / radii[m]) ** 2 for m in range(3))
            chi[q <= 1] = float(rng.uniform(*value_range))
            magnitude[q <= 1] *= float(rng.uniform(0.5, 1.0))  # iron shortens T2*
    chi *= float(rng.uniform(0.6, 1.6))
    return chi, magnitude


def _noisy_magnitude(rng, magnitude, mask, snr_range):
    """``magnitude`` plus Gaussian noise at a random SNR (mean in ``mask`` over noise s.d.) from ``snr_range``,
    its absolute value, scaled to a mean of about 1 in ``mask``."""
    level = float(magnitude[mask].mean()) if mask.any() else 1.0
    return np.abs(magnitude + rng.normal(0, level / rng.uniform(*snr_range), magnitude.shape)) / max(level, 1e-6)


def _add_backgrounds(rng, field, mask, voxel, background, edge, edge_background):
    """Demean ``field`` in ``mask`` (non-empty) and add to it, in place, a harmonic background and (``edge``
    not None) the field ``edge`` of the edge sources, at random RMS (ranges ``background`` and
    ``edge_background``) relative to the field's."""
    field -= field[mask].mean()
    rms = float(np.sqrt(np.mean(field[mask] ** 2)))
    field += rng.uniform(*background) * rms * _harmonic_background(mask.shape, voxel, mask, rng)
    if edge is not None:
        edge -= edge[mask].mean()
        edge_rms = float(np.sqrt(np.mean(edge[mask] ** 2)))
        if edge_rms > 0:
            field += rng.uniform(*edge_background) * rms / edge_rms * edge


def augment(sample, flips=(), negate=False):
    """``sample`` stored with its axes ``flips`` reversed and, with ``negate``, susceptibility and field negated.

    Both keep the physics, so one made sample serves several training steps: reversing axis
    ``a`` reverses the field of the reversed susceptibility when B0's component ``a`` changes sign
    (the dipole kernel depends on ``k . B0`` only up to its sign), and the field is linear in the
    susceptibility. The magnitude is reversed with the rest, never negated.
    """
    axes = tuple(sorted(set(int(a) for a in flips)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"flips must be spatial axes 0-2, got {flips!r}")
    sign = np.float32(-1 if negate else 1)

    def flip(a):
        return np.ascontiguousarray(np.flip(a, axes)) if axes else a

    b0 = tuple(-b if i in axes else b for i, b in enumerate(sample.b0_dir))
    return Sample(field_ppm=flip(sample.field_ppm) * sign, chi_ppm=flip(sample.chi_ppm) * sign,
                  mask=flip(sample.mask), voxel_size_mm=sample.voxel_size_mm, b0_dir=b0,
                  magnitude=flip(sample.magnitude))
