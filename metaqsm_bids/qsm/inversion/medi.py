"""MEDI: morphology enabled dipole inversion (Liu J et al. 2012, NeuroImage 59:2560; Liu T et al. 2011, MRM 66:777).

    chi = argmin ||M_G grad(chi)||_1 + lambda ||w (exp(i D*chi) - exp(i phi))||_2^2

``phi`` is the local field as a phase (rad), ``w`` the noise weight (signal magnitude,
mean 1 in the mask, as the field's noise s.d. is ~ 1 / magnitude), ``M_G`` the edge
mask: 0 for the gradient components where the magnitude image has an edge (left
unpenalised, so the map may have edges there), 1 elsewhere. The exponential data
term (Liu T et al. 2013, MRM 69:467) is what the MEDI toolbox's ``MEDI_L1`` minimises;
the L1 norm is smoothed as ``sqrt(|.|^2 + beta)`` and the cost minimised by
Gauss-Newton steps (lagged diffusivity), each solved by conjugate gradient.
"""
import logging
from dataclasses import dataclass

import numpy as np

from ..core.dipole import dipole_convolve, dipole_kernel
from ..core.grid import PaddedBox
from ..core.physics import GAMMA_HZ_PER_T
from ..core.solvers import conjugate_gradient, gradient, gradient_adjoint
from ..spec import MethodSpec, parameter
from .common import check_inputs, zero_mean_in_mask

log = logging.getLogger(__name__)


#: MEDI's default edge percentage (:func:`edge_mask`), the MEDI toolbox's.
EDGE_PERCENTAGE = 0.9


def edge_mask(magnitude, mask, voxel_size_mm, edge_percentage=EDGE_PERCENTAGE):
    """MEDI's binary gradient weight ``M_G`` (bool, ``(3, *shape)``): False on edges, True elsewhere.

    The components of the magnitude gradient (of ``magnitude * mask``, per mm) larger
    than a threshold are edges; the threshold makes the number of edge components
    ``edge_percentage`` times the number of mask voxels (fewer when too few components
    are non-zero, as in a noise-free image). That is the MEDI toolbox's
    ``gradient_mask`` convention (its default 0.9, "the percentage of voxels considered
    to be edges"): with three components per voxel, 0.9 marks 30 % of the gradient
    components as edges. The toolbox reaches the threshold by 5 % steps; here it is exact.
    ``edge_percentage`` 0: no edges (every component True): MEDI's prior becomes plain total variation,
    which owes nothing to the magnitude (what its edges are worth on a head, BENCHMARKS.md).
    """
    if edge_percentage == 0:
        return np.ones((3, *np.shape(mask)), dtype=bool)
    grad = np.abs(gradient(np.where(mask, magnitude, 0).astype(np.float32), voxel_size_mm))
    n_edges = int(round(edge_percentage * np.count_nonzero(mask)))
    if not 0 < n_edges < grad.size:
        raise ValueError(f"edge_percentage {edge_percentage!r} leaves no edge or no smooth gradient component")
    # the (size - n_edges)-th smallest component, sought among the non-zero ones only (most of a padded box is 0)
    nonzero = grad[grad > 0]
    rank = nonzero.size - n_edges
    threshold = np.partition(nonzero, rank)[rank] if rank >= 0 else 0.0
    return grad <= threshold


@dataclass(frozen=True)
class MEDIParameters:
    """MEDI's settings a user may change."""

    lambda_: float = parameter(1000.0, "MEDI regularisation weight (dimensionless; MEDI toolbox convention, see "
                                       "metaqsm_bids.qsm.inversion.medi)", words="lambda", check="positive")


def medi(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), magnitude=None, delta_te_s=None,
         b0_tesla=None, lambda_=MEDIParameters.lambda_, edge_percentage=EDGE_PERCENTAGE, max_iter=10, tol=0.1,
         cg_max_iter=100, cg_tol=0.01, beta=1e-6, pad_voxels=None, dtype=np.float32, info=None):
    """MEDI dipole inversion (MEDI toolbox ``MEDI_L1`` defaults); ppm in, ppm out.

    ``magnitude`` (3D, same shape; e.g. the root-sum-of-squares over echoes) gives the
    edge mask (:func:`edge_mask`, ``edge_percentage``) and the noise weight ``w``
    (magnitude in the mask divided by its mean there). Both are required.

    Lambda's scale: as in the toolbox, the unknown and the data are phases in rad
    accumulated over ``delta_te_s`` (the echo spacing of the field fit; the echo time
    for one echo) at ``b0_tesla``: ``phi = 2 pi delta_te gamma B0 f_ppm 1e-6``, the
    gradient is per mm and ``w`` has mean 1, and the cost is
    ``||M_G grad x||_1 + lambda ||w (exp(i D*x) - exp(i phi))||^2`` with ``x`` in rad.
    The L1 term scales linearly with ``x`` and the data term quadratically, so the
    same ``lambda`` regularises less when ``delta_te * B0`` grows: in ppm units the
    weight is ``lambda * 2 pi delta_te gamma B0 1e-6`` (about 4000 for lambda 1000 at
    3 T and 5 ms). Hence ``delta_te_s`` and ``b0_tesla`` are required, and
    ``lambda_ = 1000`` (Liu J et al. 2012; the toolbox default) means what it means
    there. ``beta`` (rad^2/mm^2, toolbox 1e-6) smooths the L1 norm.

    Iterations: Gauss-Newton until the update's norm is below ``tol`` (0.1) times the
    solution's, at most ``max_iter`` (10); each step by conjugate gradient to a
    relative residual of ``cg_tol`` (0.01), at most ``cg_max_iter`` (100) iterations:
    the toolbox's values. The FFT box is the mask's bounding box padded by
    ``pad_voxels`` per side, by default none (nor does the toolbox pad): the map is
    free outside the mask, where it absorbs the periodic wrap (on the 0.76x0.76x3 mm
    benchmark head, padding by 1/8 of the box per side changed NRMSE by < 1 % of itself
    and doubled the run time). ``dtype``: the working precision (float32, or float64
    to check float32's round-off).

    Returns chi (float32, ppm, 0 outside the mask, mean 0 inside). ``info``, when
    given, receives ``Iterations`` (Gauss-Newton steps), ``CGIterations`` (per step),
    ``UpdateRatio`` (per step), ``DataResidual`` (``||w (exp(i D*x) - exp(i phi))|| /
    ||w||`` before each step and after the last) and ``Lambda``.
    """
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    magnitude = check_magnitude(magnitude, mask)
    if delta_te_s is None or b0_tesla is None:
        raise ValueError("MEDI needs delta_te_s (echo spacing, s) and b0_tesla: its lambda is defined on the phase "
                         "in rad accumulated over delta_te_s at b0_tesla")
    if not (delta_te_s > 0 and b0_tesla > 0 and lambda_ > 0):
        raise ValueError(f"MEDI needs positive delta_te_s, b0_tesla and lambda_, got {delta_te_s!r}, "
                         f"{b0_tesla!r}, {lambda_!r}")

    dtype = np.dtype(dtype).type
    rad_per_ppm = 2 * np.pi * delta_te_s * GAMMA_HZ_PER_T * b0_tesla * 1e-6
    box = PaddedBox(mask, (0, 0, 0) if pad_voxels is None else pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0, half=True).astype(dtype)
    phase = box.embed(field.astype(dtype) * rad_per_ppm, dtype)
    weight = box.embed(np.where(mask, magnitude / magnitude[mask].mean(dtype=np.float64), 0), dtype)
    smooth = edge_mask(box.embed(magnitude), box.embed(mask) > 0, voxel, edge_percentage).astype(dtype)
    x, history = _gauss_newton(phase, weight, smooth, kernel, voxel, dtype(2.0 * lambda_), dtype(beta), max_iter, tol,
                               cg_tol, cg_max_iter)

    chi = box.extract((x / rad_per_ppm).astype(np.float32))
    zero_mean_in_mask(chi, mask)
    if info is not None:
        info.update(**history, Lambda=float(lambda_))
    return chi


def check_magnitude(magnitude, mask, method="MEDI"):
    """``magnitude`` as an array, checked: given, of the mask's shape, finite, non-negative, not all 0 in the mask."""
    if magnitude is None:
        raise ValueError(f"{method} needs the magnitude image (keyword `magnitude`) for its edge mask and noise "
                         "weighting")
    magnitude = np.asarray(magnitude)
    if magnitude.shape != mask.shape:
        raise ValueError(f"magnitude shape {magnitude.shape} does not match the local field shape {mask.shape}")
    if not np.all(np.isfinite(magnitude[mask])) or np.any(magnitude[mask] < 0):
        raise ValueError("magnitude has NaN, infinite or negative values inside the mask")
    if not magnitude[mask].mean() > 0:
        raise ValueError("magnitude is zero everywhere in the mask")
    return magnitude


def _gauss_newton(phase, weight, smooth, kernel, voxel, lam2, beta, max_iter, tol, cg_tol, cg_max_iter):
    """Minimise ``||smooth grad x||_1 + lam2 / 2 ||weight (exp(i D*x) - exp(i phase))||^2`` from x = 0 (rad).

    All arrays on the FFT box, in the working precision (``kernel``: the half spectrum of D); see :func:`medi`
    for the stopping rule. Returns x and the history (``Iterations``, ``CGIterations``, ``UpdateRatio``,
    ``DataResidual``).
    """
    dtype, shape = phase.dtype.type, phase.shape
    weight2 = weight ** 2
    weight_norm = float(np.linalg.norm(weight))

    def data_residual(dx_phase):
        return float(np.linalg.norm(weight * np.abs(np.exp(1j * (dx_phase - phase)) - 1))) / weight_norm

    x = np.zeros(shape, dtype)
    dipole_x = np.zeros(shape, dtype)
    residuals, cg_counts, ratios = [data_residual(dipole_x)], [], []
    for iteration in range(1, max_iter + 1):
        # lagged diffusivity: |g| ~ g^2 / sqrt(g_prev^2 + beta), a quadratic the CG solves
        tv_weight = smooth / np.sqrt((smooth * gradient(x, voxel)) ** 2 + beta)

        def normal_operator(dx):
            grad = gradient(dx, voxel)
            grad *= tv_weight
            out = gradient_adjoint(grad, voxel)
            data = dipole_convolve(dx, kernel)
            data *= weight2
            data = dipole_convolve(data, kernel)
            data *= lam2
            out += data
            return out

        # gradient of the cost at x: the data term's is D^T (w^2 sin(D*x - phi)) (|exp| = 1)
        rhs = gradient_adjoint(tv_weight * gradient(x, voxel), voxel)
        rhs += lam2 * dipole_convolve(weight2 * np.sin(dipole_x - phase), kernel)
        dx, cg_iterations, cg_residual = conjugate_gradient(normal_operator, -rhs, cg_tol, cg_max_iter)
        x += dx
        dipole_x = dipole_convolve(x, kernel)
        x_norm = float(np.linalg.norm(x))
        ratio = float(np.linalg.norm(dx)) / x_norm if x_norm else 0.0  # x = 0: a zero field, solved
        residuals.append(data_residual(dipole_x))
        cg_counts.append(cg_iterations)
        ratios.append(ratio)
        log.info("MEDI Gauss-Newton %d: %d CG iterations (relative residual %.2g), update ratio %.3g, "
                 "data residual %.4g", iteration, cg_iterations, cg_residual, ratio, residuals[-1])
        if ratio < tol:
            break
    return x, {"Iterations": len(cg_counts), "CGIterations": cg_counts, "UpdateRatio": ratios,
               "DataResidual": residuals}

SPEC = MethodSpec(
    name="medi", function=medi, display_name="MEDI", description="morphology enabled dipole inversion (MEDI)",
    citations={"liu2011": "Liu T, Liu J, de Rochefort L, Spincemaille P, Khalidov I, Ledoux JR, Wang Y. Morphology "
                          "enabled dipole inversion (MEDI) from a single-angle acquisition: comparison with COSMOS in "
                          "human brain imaging. Magn Reson Med. 2011;66(3):777-783.",
               "liu2012": "Liu J, Liu T, de Rochefort L, Ledoux J, Khalidov I, Chen W, Tsiouris AJ, Wisnieff C, "
                          "Spincemaille P, Prince MR, Wang Y. Morphology enabled dipole inversion for quantitative "
                          "susceptibility mapping using structural consistency between the magnitude image and the "
                          "susceptibility map. NeuroImage. 2012;59(3):2560-2568."},
    parameters=MEDIParameters, inputs=("magnitude", "delta_te_s", "b0_tesla"))
