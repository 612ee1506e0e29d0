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

Solved by lagged diffusivity, as MEDI (:mod:`~metaqsm_bids.qsm.inversion.medi`): each of ``steps`` fixes
the TV term's weights ``M_G / sqrt(|M_G G y|^2 + beta)`` at the current ``y`` and runs CG on the quadratic from it,
:data:`FIRST_CG_ITERATIONS` iterations for the first (from zero: PDF's fit with the tissue's map beside it), then
:data:`CG_ITERATIONS` each. The defaults (``alpha``, ``P``, the iteration counts) were measured on the stage
benchmark's heads (BENCHMARKS.md, "Background removal: total field inversion").
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
#: CG iterations of the first lagged-diffusivity step and of each later one (module text).
FIRST_CG_ITERATIONS = 60
CG_ITERATIONS = 30
#: The smoothing of the L1 norm (ppm^2/mm^2): MEDI's 1e-6 rad^2/mm^2 at 3 T and 5 ms (4 rad per ppm).
BETA = 6e-8


@dataclass(frozen=True)
class TFIParameters:
    """TFI's settings a user may change."""

    alpha: float = parameter(1e-3, "TFI's total-variation weight (field and susceptibility in ppm, gradient per mm)",
                             words="TV weight", check="positive")
    steps: int = parameter(6, "TFI's lagged-diffusivity steps (each fixes the TV term's weights and runs CG)",
                           words="lagged-diffusivity steps", check="positive_int")


def tfi(total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), magnitude=None, b0_tesla=None,
        alpha=TFIParameters.alpha, steps=TFIParameters.steps, preconditioner=PRECONDITIONER,
        edge_percentage=EDGE_PERCENTAGE, pad_voxels=None, polynomial_order=2):
    """TFI background field removal: Hz in, Hz out (``b0_tesla`` converts them to ppm, the unit of ``alpha``).

    ``magnitude`` (required, 3D): the noise weight (normalised to mean 1 in the mask; 0 leaves a voxel out of the
    fit) and the edge prior; ``b0_dir``: unit B0 vector in voxel axes; ``alpha`` (> 0): the TV weight;
    ``steps`` (>= 1): lagged-diffusivity steps; ``preconditioner``: ``P`` outside the mask;
    ``edge_percentage``: MEDI's (0: no edges, plain TV); ``pad_voxels`` and ``polynomial_order``: as PDF's
    (:func:`~metaqsm_bids.qsm.background.pdf.pdf`). Returns a
    :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval` on ``mask`` whose ``iterations`` are the CG
    iterations of all steps and ``relative_residual`` that of the last step's normal equations at the result.
    """
    field, mask = check_field_and_mask(total_field, mask)
    magnitude = check_magnitude(magnitude, mask, "TFI")
    voxel = voxel_size_array(voxel_size_mm)
    if b0_tesla is None or not b0_tesla > 0:
        raise ValueError(f"TFI needs b0_tesla > 0 (its alpha is defined on the field in ppm), got {b0_tesla!r}")
    if not (alpha > 0 and preconditioner > 0) or int(steps) != steps or steps < 1:
        raise ValueError(f"TFI needs alpha > 0, preconditioner > 0 and steps >= 1, got {alpha!r}, {preconditioner!r}, "
                         f"{steps!r}")

    box = padded_box(mask, voxel, pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0_dir, half=True)
    inside = box.embed(mask, bool)
    scale = np.where(inside, 1, preconditioner).astype(np.float32)
    weight = np.where(mask, magnitude / magnitude[mask].mean(dtype=np.float64), 0)
    polynomial = WeightedPolynomial(inside, box.embed(weight)[inside], voxel, polynomial_order)
    # M_G: no edge of the magnitude, both voxels of the difference in the mask; the TV term lives in the mask's
    # bounding box (``crop``), where its arrays are a third to a half of the padded box's
    crop, crop_mask = box.inner, inside[box.inner]
    smooth = edge_mask(magnitude[box.crop], crop_mask, voxel, edge_percentage)
    for axis in range(3):
        smooth[axis] &= crop_mask & np.roll(crop_mask, -1, axis=axis)
    smooth = smooth.astype(np.float32)

    field_box = box.embed(np.where(mask, physics.field_hz_to_ppm(field, b0_tesla), 0))
    rhs = scale * dipole_convolve(polynomial.weigh(field_box), kernel)
    y = np.zeros(box.shape, np.float32)
    tv_weight, work = np.empty_like(smooth), np.empty_like(smooth)
    adjoint = np.empty(crop_mask.shape, np.float32)
    total_cg = 0
    for step in range(int(steps)):
        gradient(y[crop], voxel, out=tv_weight)
        tv_weight *= smooth
        np.square(tv_weight, out=tv_weight)
        tv_weight += np.float32(BETA)
        np.sqrt(tv_weight, out=tv_weight)
        np.divide(smooth, tv_weight, out=tv_weight)
        tv_weight *= np.float32(alpha)

        def normal_operator(x):
            out = dipole_convolve(polynomial.weigh(dipole_convolve(scale * x, kernel)), kernel)
            out *= scale
            tv = gradient(x[crop], voxel, out=work)
            tv *= tv_weight
            out[crop] += gradient_adjoint(tv, voxel, out=adjoint)
            return out

        # CG from the current y: solve for the update
        update, cg_iterations, _ = conjugate_gradient(
            normal_operator, rhs - normal_operator(y), 0.0, FIRST_CG_ITERATIONS if step == 0 else CG_ITERATIONS)
        y += update
        total_cg += cg_iterations
        log.info("TFI step %d: %d CG iterations, update ratio %.3g", step + 1, cg_iterations,
                 float(np.linalg.norm(update) / max(np.linalg.norm(y), 1e-30)))
    # the last step's normal equations at the solution (the same quantity as PDF's relative residual)
    rhs_norm = float(np.linalg.norm(rhs))
    residual = float(np.linalg.norm(rhs - normal_operator(y))) / rhs_norm if rhs_norm else 0.0

    sources = np.where(inside, 0, scale * y).astype(np.float32)
    local = np.zeros(box.shape, np.float32)
    local[inside] = polynomial.remove((field_box - dipole_convolve(sources, kernel))[inside])
    local_hz = physics.field_ppm_to_hz(box.extract(local), b0_tesla).astype(np.float32)
    return BackgroundRemoval(local_hz, mask, total_cg, residual,
                             {"Preconditioner": preconditioner, "FirstCGIterations": FIRST_CG_ITERATIONS,
                              "CGIterations": CG_ITERATIONS, "EdgePercentage": edge_percentage,
                              "PadVoxels": [int(s.start) for s in box.inner], "Weighting": "magnitude",
                              "PolynomialOrder": polynomial_order})


SPEC = MethodSpec(
    name="tfi", function=tfi, display_name="TFI",
    description="total field inversion (TFI): the sources outside the brain fitted jointly with the susceptibility "
                "inside it, the local field the total field less the sources' field",
    citations={"liu2017tfi": "Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI) "
                             "method for quantitative susceptibility mapping. Magn Reson Med. 2017;78(1):303-315.",
               **PDF_SPEC.citations},
    parameters=TFIParameters, inputs=("b0_dir", "magnitude", "b0_tesla"))
