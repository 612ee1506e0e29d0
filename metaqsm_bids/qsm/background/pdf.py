"""Background field removal by projection onto dipole fields, PDF (Liu T et al. 2011, NMR Biomed 24:1129).

The background field is modelled as the field of dipoles outside the mask:

    chi_b = argmin ||W (f - D * (M' chi_b))||^2 over the mask,   M' = outside the mask,

solved by conjugate gradient on the normal equations ``M' D W^2 D M' chi_b = M' D W^2 f``
(``D`` is real and symmetric); the local field is ``f - D * chi_b`` in the mask. Since
the dipole fields of outside sources are not all the harmonic fields, PDF keeps a local
field's part that an outside dipole cannot make, e.g. near the mask's edge, where
SMV methods must erode. ``W`` is the noise weight: the signal magnitude (the field's noise
s.d. is ~ 1 / magnitude), or uniform. The padding follows the MEDI toolbox's ``PDF.m`` (the
mask's bounding box padded to hold the outside dipoles, 20 voxels per side) on the finest axis,
and the same length in mm on the others: 20 voxels of 3 mm slices reach 60 mm beyond the brain,
where sources make a field in it smooth enough for nearer ones to make as well; with 6 slices
instead of 20 the local field is the same (relative error and TKD's NRMSE within 0.003 and 0.07
points on the stage benchmark's heads) in a third fewer voxels (BENCHMARKS.md, "PDF's padding in
mm"). The toolbox's 30 CG iterations stop short on a head (relative residual ~3e-3): run to 1e-3
(60-100 iterations on the stage benchmark's heads) TKD's NRMSE is 1-2.6 points lower at every
protocol, and within a point of that when run on to 4e-4 (BENCHMARKS.md). So
CG runs to ``tol`` = 1e-3 here; ``max_iter`` = 500 is a cap (a small 1.8 mm slab needed 290).

With ``source_scale_mm`` set, CG is right-preconditioned by a prior on the sources' size: it solves for ``y``
with ``chi_b = S y``, ``S = sqrt(1 + d / source_scale_mm)`` and ``d`` the distance (mm) to the mask. The far sources
make the smooth part of the background, whose components have the smallest eigenvalues of the normal operator and
converge last; lifting them, CG reaches its tolerance in 10-33 % fewer iterations on the stage benchmark's heads, at
the same or lower TKD NRMSE (BENCHMARKS.md). It is not the default: on the CLI tests' 64 mm heads, most of whose brain
lies near the mask's edge, the map's correlation with the truth drops by 0.02-0.03. Both forms solve the same normal
equations (their solutions differ only by sources whose field in the mask is zero); stopped at the tolerance, the
two local fields differ by a few % of the local field's norm. (A Jacobi preconditioner, which damps the far
sources, converges far more slowly.)

The background also holds a polynomial ``P c`` of degree ``polynomial_order`` in mm (the
shim's fit, and the phase's unknown constant, which no dipole outside the mask can make):
it is projected out of the weighted residual (variable projection), so CG solves

    M' D W Q W D M' chi_b = M' D W Q W f,   Q = I - B (B^T B)^-1 B^T,  B = W P,

and the local field is ``f - D * chi_b - P c`` with ``c`` the weighted fit of what remains.
A shim fitted as a polynomial in voxel indices (qsm-forward's is) is not harmonic in mm where
voxels are anisotropic (``2z^2 - x^2 - y^2`` in indices has a Laplacian of ``4/dz^2 - 4/dx^2``):
outside dipoles cannot make it and, without ``P``, PDF leaves it in the local field.
"""
import logging

import numpy as np
from scipy import ndimage as ndi

from ..core.dipole import dipole_convolve, dipole_kernel
from ..core.grid import PaddedBox, unit_b0, voxel_size_array
from ..core.solvers import conjugate_gradient
from ..spec import MethodSpec
from .common import BackgroundRemoval, check_field_and_mask

log = logging.getLogger(__name__)

#: PDF's padding per side, in voxels of the finest axis (module text).
PAD_FINEST_VOXELS = 20
#: The length (mm) of PDF's source preconditioner as measured (module text; 2-5 mm measured alike): an option.
SOURCE_SCALE_MM = 5.0


def pdf(total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), magnitude=None, tol=1e-3, max_iter=500,
        pad_voxels=None, polynomial_order=2, source_scale_mm=None):
    """PDF background field removal; units preserved (Hz in, Hz out).

    ``b0_dir``: unit B0 vector in voxel axes. ``magnitude`` (optional, 3D): noise weight,
    normalised to mean 1 in the mask; uniform if None. CG stops once the relative
    residual of the normal equations is below ``tol`` or after ``max_iter`` iterations.
    ``pad_voxels`` (per side, int or 3 ints) is the room for the background dipoles around
    the mask's bounding box (default: :func:`default_padding`). Values of ``total_field`` outside ``mask`` are
    ignored.
    ``polynomial_order`` (0, 1 or 2): the degree of the polynomial in the background model
    (0: the constant alone). ``source_scale_mm``: the preconditioner's length (mm, module text); None
    (default): plain CG.

    Returns a :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval` whose ``mask`` is ``mask``
    (PDF needs no erosion) and whose ``relative_residual`` is CG's.
    """
    field, mask = check_field_and_mask(total_field, mask)
    voxel = voxel_size_array(voxel_size_mm)
    b0 = unit_b0(b0_dir)
    if magnitude is None:
        weight = mask.astype(np.float32)
    else:
        magnitude = np.asarray(magnitude)
        if magnitude.shape != mask.shape:
            raise ValueError(f"magnitude shape {magnitude.shape} does not match mask shape {mask.shape}")
        if not np.all(np.isfinite(magnitude[mask])) or np.any(magnitude[mask] < 0) or not magnitude[mask].any():
            raise ValueError("magnitude must be finite, non-negative and not all zero inside the mask")
        weight = np.where(mask, magnitude / magnitude[mask].mean(dtype=np.float64), 0).astype(np.float32)

    if polynomial_order not in (0, 1, 2):
        raise ValueError(f"polynomial_order must be 0, 1 or 2, got {polynomial_order!r}")

    box = padded_box(mask, voxel, pad_voxels)
    shape = box.shape
    kernel = dipole_kernel(shape, voxel, b0, half=True)
    inside = box.embed(mask, bool)
    sources_scale = (~inside).astype(np.float32)  # M' S: zero in the mask; the padding is outside too
    if source_scale_mm is not None:
        if not source_scale_mm > 0:
            raise ValueError(f"source_scale_mm must be positive or None, got {source_scale_mm!r}")
        sources_scale *= np.sqrt(1 + distance_to_mask_mm(inside, voxel) / source_scale_mm).astype(np.float32)
    polynomial = WeightedPolynomial(inside, box.embed(weight)[inside], voxel, polynomial_order)

    def normal_operator(y):
        out = dipole_convolve(polynomial.weigh(dipole_convolve(sources_scale * y, kernel)), kernel)
        out *= sources_scale
        return out

    field_box = box.embed(np.where(mask, field, 0))
    rhs = dipole_convolve(polynomial.weigh(field_box), kernel) * sources_scale
    y, iterations, residual = conjugate_gradient(normal_operator, rhs, tol, max_iter)
    local = np.zeros(shape, np.float32)
    local[inside] = polynomial.remove((field_box - dipole_convolve(sources_scale * y, kernel))[inside])
    log.info("PDF: %d CG iterations, relative residual %.3g", iterations, residual)
    return BackgroundRemoval(box.extract(local), mask, iterations, residual,
                             {"Tolerance": tol, "MaxIterations": max_iter,
                              "PadVoxels": [int(s.start) for s in box.inner],
                              "Weighting": "uniform" if magnitude is None else "magnitude",
                              "PolynomialOrder": polynomial_order,
                              **({"SourceScaleMm": source_scale_mm} if source_scale_mm is not None else {})})


class WeightedPolynomial:
    """The polynomial of PDF's background model on the voxels ``inside`` a box, with noise weights ``w`` (one per such
    voxel, float32): :meth:`weigh` applies ``W Q W`` and :meth:`remove` takes the polynomial's weighted fit out of a
    remainder (module text; TFI, :mod:`.tfi`, shares them)."""

    def __init__(self, inside, w, voxel_size_mm, order):
        self.inside, self.w = inside, w
        self.basis = polynomial_basis(np.argwhere(inside) * voxel_size_mm, order)
        # an orthonormal basis of B = W P's span from its Gram matrix (a Householder QR of the tall B took ~1 s), less
        # the directions a degenerate mask (a single slice) does not span; kept as float32 rows: Q's two products per
        # iteration are memory-bound (BENCHMARKS.md, "PDF's iteration")
        b = w[:, None] * self.basis
        values, vectors = np.linalg.eigh(b.T @ b)
        spanned = values > values.max() * 1e-10
        self._values, self._vectors = values[spanned], vectors[:, spanned]
        self._rows = ((self._vectors / np.sqrt(self._values)).T @ b.T).astype(np.float32)
        self._weighted = np.zeros(inside.shape, np.float32)  # weigh's buffer: zero outside, each call overwrites inside

    def weigh(self, x):
        """``W Q W x`` for a box array, zero outside ``inside`` (in a buffer the next call overwrites)."""
        values = x[self.inside]
        values *= self.w
        values -= (self._rows @ values) @ self._rows  # Q: the part no polynomial makes
        values *= self.w
        self._weighted[self.inside] = values
        return self._weighted

    def remove(self, remainder):
        """``remainder`` (the values inside) less the polynomial's weighted fit ``P c``, ``c = (B^T B)^+ B^T W
        remainder``, in float64."""
        remainder = np.asarray(remainder, np.float64)
        c = self._vectors @ ((self._vectors.T @ (self.basis.T @ (self.w * self.w * remainder))) / self._values)
        return remainder - self.basis @ c


def padded_box(mask, voxel_size_mm, pad_voxels=None):
    """PDF's FFT box: ``mask``'s bounding box padded by ``pad_voxels`` per side (an int or 3; default
    :func:`default_padding`), room for the background sources."""
    if pad_voxels is None:
        pad_voxels = default_padding(voxel_size_mm)
    return PaddedBox(mask, np.broadcast_to(np.asarray(pad_voxels, int), (3,)))


def default_padding(voxel_size_mm):
    """PDF's padding per side (voxels): :data:`PAD_FINEST_VOXELS` voxels of the finest axis, the same length (mm,
    rounded up) on the others (module text)."""
    voxel = np.asarray(voxel_size_mm, float)
    return [int(np.ceil(PAD_FINEST_VOXELS * voxel.min() / v - 1e-6)) for v in voxel]


def distance_to_mask_mm(mask, voxel_size_mm, block_mm=4.0):
    """Distance (mm) of every voxel to ``mask``, on blocks of about ``block_mm`` (a block holding a mask voxel is at
    0): the preconditioner needs it roughly, and the exact transform of PDF's padded box costs as much as several
    CG iterations."""
    factors = np.maximum(1, np.round(block_mm / np.asarray(voxel_size_mm, float))).astype(int)
    pad = [(-n) % f for n, f in zip(mask.shape, factors)]
    padded = np.pad(mask, [(0, p) for p in pad])
    blocks = padded.reshape([x for n, f in zip(padded.shape, factors) for x in (n // f, f)]).any(axis=(1, 3, 5))
    distance = ndi.distance_transform_edt(~blocks, sampling=factors * np.asarray(voxel_size_mm, float))
    for axis, f in enumerate(factors):
        distance = distance.repeat(f, axis)
    return distance[tuple(slice(n) for n in mask.shape)]


def polynomial_basis(points_mm, order):
    """Monomials of degree <= ``order`` (0-2) at ``points_mm`` (n x 3), centred and scaled to the points' spread."""
    x = (points_mm - points_mm.mean(axis=0)) / points_mm.std(axis=0).clip(min=1e-6)
    columns = [np.ones(len(x))]
    if order >= 1:
        columns += [x[:, i] for i in range(3)]
    if order >= 2:
        columns += [x[:, i] * x[:, j] for i in range(3) for j in range(i, 3)]
    return np.stack(columns, axis=1)


SPEC = MethodSpec(
    name="pdf", function=pdf, display_name="PDF", description="projection onto dipole fields (PDF)",
    citations={"liu2011pdf": "Liu T, Khalidov I, de Rochefort L, Spincemaille P, Liu J, Tsiouris AJ, Wang Y. A novel "
                             "background field removal method for MRI using projection onto dipole fields (PDF). "
                             "NMR Biomed. 2011;24(9):1129-1136."},
    inputs=("b0_dir", "magnitude"))
