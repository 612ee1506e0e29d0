"""Background field removal by total field inversion, TFI (Liu Z et al. 2017, MRM 78:303): the sources outside the
mask and the susceptibility inside it fitted to the total field together,

    y = argmin 1/2 ||Q W (f - D * (P y))||^2 + alpha ||M_G G y||_1,    chi = P y,

on PDF's padded box, with PDF's noise weight ``W`` and polynomial projection ``Q`` (:mod:`.pdf`; ``f`` the total
field in ppm, 0 outside the mask). ``P`` is TFI's binary preconditioner: 1 in the mask, :data:`PRECONDITIONER`
outside it, where the sources (air, bone) are far stronger than the tissue's, so that CG reaches them in as few
iterations as the tissue. ``G`` is the forward-difference gradient in mm; ``M_G`` keeps its components whose two
voxels are in the mask and that are not on an edge of the magnitude (MEDI's edge mask,
:func:`~metaqsm_bids.qsm.inversion.medi.edge_mask`): only the susceptibility inside the mask is regularised, the
sources outside are free as in PDF. The local field is ``f - D * (chi outside the mask) - P c``: the total field less
the sources' field and the polynomial.

Why: PDF fits the background with the outside sources alone, and so takes for background every part of the local
field that outside sources can also make (a harmonic field in the mask, largest at its edge: BENCHMARKS.md, "a
harmonic clean-up after PDF"); here the susceptibility inside competes for that part under a total-variation prior.
In this app TFI serves as a background removal: the local field goes to the chosen inversion (the map TFI fits
inside is not kept).

Solved by lagged diffusivity, as MEDI (:mod:`~metaqsm_bids.qsm.inversion.medi`): each step fixes the TV term's
weights ``M_G / sqrt(|M_G G y|^2 + beta)`` at the current ``y`` and runs CG on the quadratic from it,
:data:`FIRST_CG_ITERATIONS` iterations for the first (from zero: PDF's fit with the tissue's map beside it), then
:data:`CG_ITERATIONS` each. The first ``coarse_steps`` run on a grid twice as coarse along the axes of at most
:data:`COARSE_BELOW_MM` (block means of the field, weighted by the magnitude; an 8th of the voxels at 1 mm): the
far sources and the tissue's smooth part are found there at a fraction of the cost; their fit, interpolated onto the
acquisition grid, starts its ``steps``. Where no axis is that fine, all steps run on the acquisition grid.

The defaults (``alpha``, ``P``, the steps and iteration counts) were measured on the stage benchmark's heads
(BENCHMARKS.md, "Background removal: total field inversion"). The voxels left out of the fit (weight 0: unreliable)
are completed afterwards like every method's (:mod:`.completion`): the field of the susceptibility TFI fits inside
measured worse there on the lesion heads' strong lesions (BENCHMARKS.md, "TFI on a coarse grid first").
"""
import logging
from dataclasses import dataclass

import numpy as np

from ..core import physics
from ..core.dipole import dipole_convolve, dipole_kernel
from ..core.grid import voxel_size_array
from ..core.solvers import conjugate_gradient, gradient, gradient_adjoint
from ..inversion.medi import EDGE_PERCENTAGE, check_magnitude, edge_mask
from ..spec import MethodSpec, parameter
from .common import BackgroundRemoval, check_field_and_mask
from .pdf import SPEC as PDF_SPEC
from .pdf import WeightedPolynomial, padded_box

log = logging.getLogger(__name__)

#: ``P`` outside the mask (module text): TFI's value for the brain (Liu Z et al. 2017); 10 and 100 measured worse.
PRECONDITIONER = 30.0
#: CG iterations of the first lagged-diffusivity step (from zero) and of each later one (module text).
FIRST_CG_ITERATIONS = 60
CG_ITERATIONS = 30
#: The smoothing of the L1 norm (ppm^2/mm^2): MEDI's 1e-6 rad^2/mm^2 at 3 T and 5 ms (4 rad per ppm).
BETA = 6e-8
#: Axes with voxels at most this long (mm) are halved in resolution for the coarse steps (module text): the
#: stage benchmark's in-plane 0.5-0.76 mm and isotropic 1 mm; not 1.5-3 mm slices.
COARSE_BELOW_MM = 1.25


@dataclass(frozen=True)
class TFIParameters:
    """TFI's settings a user may change."""

    alpha: float = parameter(1e-3, "TFI's total-variation weight (field and susceptibility in ppm, gradient per mm)",
                             words="TV weight", check="positive")
    steps: int = parameter(3, "TFI's lagged-diffusivity steps on the acquisition grid (each fixes the TV term's "
                              "weights and runs CG)", words="lagged-diffusivity steps", check="positive_int")
    coarse_steps: int = parameter(6, "TFI's lagged-diffusivity steps first on a grid twice as coarse along the axes "
                                     f"of at most {COARSE_BELOW_MM:g} mm",
                                  words="coarse-grid steps before them", check="count_or_off")


def coarse_factors(voxel_size_mm):
    """The coarse grid's block size along each axis: 2 where the voxel is at most :data:`COARSE_BELOW_MM`, else 1."""
    return tuple(2 if v <= COARSE_BELOW_MM else 1 for v in voxel_size_mm)


class _Problem:
    """TFI's quadratic pieces on one grid: the box, the kernel, ``P``, ``Q W``, the TV term's mask and the data."""

    def __init__(self, field_ppm, mask, weight, magnitude, voxel, b0_dir, alpha, preconditioner, edge_percentage,
                 pad_voxels, polynomial_order):
        self.voxel, self.alpha = voxel, alpha
        self.box = box = padded_box(mask, voxel, pad_voxels)
        self.kernel = dipole_kernel(box.shape, voxel, b0_dir, half=True)
        self.inside = inside = box.embed(mask, bool)
        self.scale = np.where(inside, 1, preconditioner).astype(np.float32)
        self.polynomial = WeightedPolynomial(inside, box.embed(weight)[inside], voxel, polynomial_order)
        # M_G: no edge of the magnitude, both voxels of the difference in the mask; the TV term lives in the mask's
        # bounding box (``crop``), where its arrays are a third to a half of the padded box's
        self.crop, crop_mask = box.inner, inside[box.inner]
        smooth = edge_mask(magnitude[box.crop], crop_mask, voxel, edge_percentage)
        for axis in range(3):
            smooth[axis] &= crop_mask & np.roll(crop_mask, -1, axis=axis)
        self.smooth = smooth.astype(np.float32)
        self.field = box.embed(field_ppm)
        self.rhs = self.scale * dipole_convolve(self.polynomial.weigh(self.field), self.kernel)
        self._tv_weight, self._work = np.empty_like(self.smooth), np.empty_like(self.smooth)
        self._adjoint = np.empty(crop_mask.shape, np.float32)

    def normal_operator(self, x):
        """``P D Q W D P x + alpha G^T M_G (weights) G x`` with the TV weights of the current step."""
        out = dipole_convolve(self.polynomial.weigh(dipole_convolve(self.scale * x, self.kernel)), self.kernel)
        out *= self.scale
        tv = gradient(x[self.crop], self.voxel, out=self._work)
        tv *= self._tv_weight
        out[self.crop] += gradient_adjoint(tv, self.voxel, out=self._adjoint)
        return out

    def solve(self, y, steps):
        """``steps`` lagged-diffusivity steps from ``y`` (a box array, changed in place; the first step from zero
        runs :data:`FIRST_CG_ITERATIONS`); returns the CG iterations run."""
        total = 0
        weight = self._tv_weight
        for _ in range(steps):
            gradient(y[self.crop], self.voxel, out=weight)
            weight *= self.smooth
            np.square(weight, out=weight)
            weight += np.float32(BETA)
            np.sqrt(weight, out=weight)
            np.divide(self.smooth, weight, out=weight)
            weight *= np.float32(self.alpha)
            iterations = FIRST_CG_ITERATIONS if not y.any() else CG_ITERATIONS
            update, done, _ = conjugate_gradient(self.normal_operator, self.rhs - self.normal_operator(y), 0.0,
                                                 iterations)
            y += update
            total += done
            log.info("TFI step on %s: %d CG iterations, update ratio %.3g", "x".join(map(str, y.shape)), done,
                     float(np.linalg.norm(update) / max(np.linalg.norm(y), 1e-30)))
        return total

    def relative_residual(self, y):
        """The last step's normal equations at ``y`` (the same quantity as PDF's relative residual)."""
        rhs_norm = float(np.linalg.norm(self.rhs))
        return float(np.linalg.norm(self.rhs - self.normal_operator(y))) / rhs_norm if rhs_norm else 0.0

    def local_field(self, y):
        """The field less the sources' and the polynomial (ppm) on the mask's bounding box."""
        sources = np.where(self.inside, 0, self.scale * y).astype(np.float32)
        local = np.zeros(self.box.shape, np.float32)
        local[self.inside] = self.polynomial.remove(
            (self.field - dipole_convolve(sources, self.kernel))[self.inside])
        return self.box.extract(local)


def _block_means(field_ppm, mask, weight, magnitude, factors):
    """The coarse grid's field (weighted by ``weight``), mask (over half the block in it), weight and magnitude
    (means over the block's mask voxels); the volume is padded with zeros to whole blocks."""
    factors = np.asarray(factors)
    shape = -(-np.asarray(mask.shape) // factors) * factors

    def means(volume):
        padded = np.zeros(shape, np.float64)
        padded[tuple(slice(0, n) for n in mask.shape)] = volume
        return padded.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1],
                              shape[2] // factors[2], factors[2]).mean(axis=(1, 3, 5))

    inside = means(mask)
    weight_sum = means(np.where(mask, weight, 0))
    coarse_mask = inside > 0.5
    weighted = weight_sum > 0
    field = np.where(coarse_mask & weighted, means(weight * field_ppm) / np.where(weighted, weight_sum, 1), 0)
    per_voxel = np.where(inside > 0, inside, 1)
    coarse_weight = np.where(coarse_mask, weight_sum / per_voxel, 0)
    coarse_magnitude = np.where(coarse_mask, means(np.where(mask, magnitude, 0)) / per_voxel, 0)
    return (field.astype(np.float32), coarse_mask, coarse_weight.astype(np.float32),
            coarse_magnitude.astype(np.float32))


def _interpolate(coarse, coarse_y, fine, factors):
    """``coarse_y`` (on ``coarse``'s box) linearly interpolated onto ``fine``'s box (voxel centres), the inside from
    the coarse grid's inside voxels alone and the outside from its outside ones (normalised: a source is no tissue
    value, nor the reverse); 0 beyond the coarse box. Linear, not replicated: a replicated value has no gradient within
    its block, where the next step's TV weights would then freeze it."""
    axes = []
    for axis in range(3):
        origin = fine.box.crop[axis].start - fine.box.inner[axis].start  # the box's first voxel on the volume
        coarse_origin = coarse.box.crop[axis].start - coarse.box.inner[axis].start
        at = (origin + np.arange(fine.box.shape[axis]) + 0.5) / factors[axis] - 0.5 - coarse_origin
        low = np.floor(at).astype(int)
        high_weight = (at - low).astype(np.float32)
        parts = []
        for index, weight in ((low, 1 - high_weight), (low + 1, high_weight)):
            valid = (index >= 0) & (index < coarse.box.shape[axis])
            parts.append((np.clip(index, 0, coarse.box.shape[axis] - 1), np.where(valid, weight, 0)))
        axes.append(parts)

    def resample(volume):
        for axis, parts in enumerate(axes):
            shape = [1, 1, 1]
            shape[axis] = -1
            volume = sum(np.take(volume, index, axis=axis) * weight.reshape(shape) for index, weight in parts)
        return volume

    y = np.zeros(fine.box.shape, np.float32)
    for region, fine_region in ((coarse.inside, fine.inside), (~coarse.inside, ~fine.inside)):
        share = resample(region.astype(np.float32))
        values = resample(np.where(region, coarse_y, 0))
        use = fine_region & (share > 1e-3)
        y[use] = values[use] / share[use]
    return y


def tfi(total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), magnitude=None, b0_tesla=None,
        alpha=TFIParameters.alpha, steps=TFIParameters.steps, coarse_steps=TFIParameters.coarse_steps,
        preconditioner=PRECONDITIONER, edge_percentage=EDGE_PERCENTAGE, pad_voxels=None, polynomial_order=2):
    """TFI background field removal: Hz in, Hz out (``b0_tesla`` converts them to ppm, the unit of ``alpha``).

    ``magnitude`` (required, 3D): the noise weight (normalised to mean 1 in the mask; 0 leaves a voxel out of the
    fit) and the edge prior; ``b0_dir``: unit B0 vector in voxel axes; ``alpha`` (> 0): the TV weight;
    ``steps`` (>= 1): lagged-diffusivity steps on the acquisition grid, after ``coarse_steps`` (None or 0: none) on
    the coarse grid (module text); ``preconditioner``: ``P`` outside the mask; ``edge_percentage``: MEDI's (0: no
    edges, plain TV); ``pad_voxels`` and ``polynomial_order``: as PDF's (:func:`~metaqsm_bids.qsm.background.pdf.pdf`;
    the coarse grid's padding is as long in mm). Returns a
    :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval` on ``mask`` whose ``iterations`` are the CG
    iterations of all steps (coarse ones included) and ``relative_residual`` that of the last step's normal
    equations at the result.
    """
    field, mask = check_field_and_mask(total_field, mask)
    magnitude = check_magnitude(magnitude, mask, "TFI")
    voxel = voxel_size_array(voxel_size_mm)
    if b0_tesla is None or not b0_tesla > 0:
        raise ValueError(f"TFI needs b0_tesla > 0 (its alpha is defined on the field in ppm), got {b0_tesla!r}")
    coarse_steps = coarse_steps or 0
    if not (alpha > 0 and preconditioner > 0) or int(steps) != steps or steps < 1 or int(coarse_steps) != coarse_steps \
            or coarse_steps < 0:
        raise ValueError(f"TFI needs alpha > 0, preconditioner > 0, steps >= 1 and coarse_steps >= 0, got {alpha!r}, "
                         f"{preconditioner!r}, {steps!r}, {coarse_steps!r}")

    field_ppm = np.where(mask, physics.field_hz_to_ppm(field, b0_tesla), 0).astype(np.float32)
    weight = np.where(mask, magnitude / magnitude[mask].mean(dtype=np.float64), 0).astype(np.float32)
    settings = (b0_dir, alpha, preconditioner, edge_percentage)
    fine = _Problem(field_ppm, mask, weight, magnitude, voxel, *settings, pad_voxels, polynomial_order)
    y = np.zeros(fine.box.shape, np.float32)
    factors = coarse_factors(voxel)
    total_cg = 0
    coarse_inputs = _block_means(field_ppm, mask, weight, magnitude, factors) if coarse_steps and max(factors) > 1 \
        else None
    if coarse_inputs is not None and coarse_inputs[1].any():  # [1]: the coarse mask
        coarse_pad = None if pad_voxels is None else -(-np.broadcast_to(pad_voxels, (3,)) // np.asarray(factors))
        coarse = _Problem(*coarse_inputs, voxel * factors, *settings, coarse_pad, polynomial_order)
        coarse_y = np.zeros(coarse.box.shape, np.float32)
        total_cg += coarse.solve(coarse_y, int(coarse_steps))
        y = _interpolate(coarse, coarse_y, fine, factors)
        del coarse, coarse_y
    else:  # no axis fine enough (or a mask thinner than a block): every step on the acquisition grid
        factors, steps = (1, 1, 1), steps + coarse_steps
    total_cg += fine.solve(y, int(steps))
    local_hz = physics.field_ppm_to_hz(fine.local_field(y), b0_tesla).astype(np.float32)
    return BackgroundRemoval(local_hz, mask, total_cg, fine.relative_residual(y),
                             {"Preconditioner": preconditioner, "FirstCGIterations": FIRST_CG_ITERATIONS,
                              "CGIterations": CG_ITERATIONS, "CoarseFactors": list(factors),
                              "EdgePercentage": edge_percentage, "PadVoxels": [int(s.start) for s in fine.box.inner],
                              "Weighting": "magnitude", "PolynomialOrder": polynomial_order})


SPEC = MethodSpec(
    name="tfi", function=tfi, display_name="TFI",
    description="total field inversion (TFI): the sources outside the brain fitted jointly with the susceptibility "
                "inside it, the local field the total field less the sources' field",
    citations={"liu2017tfi": "Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI) "
                             "method for quantitative susceptibility mapping. Magn Reson Med. 2017;78(1):303-315.",
               **PDF_SPEC.citations},
    parameters=TFIParameters, inputs=("b0_dir", "magnitude", "b0_tesla"))
