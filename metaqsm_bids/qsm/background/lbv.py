"""Background field removal by the Laplacian boundary value method, LBV (Zhou D et al. 2014, NMR Biomed 27:312).

The background field ``b`` is harmonic inside the mask: ``lap(b) = 0``, and equals the total
field on the mask's boundary, where the local field is taken to be zero. That Dirichlet
problem has one solution; the local field is ``f - b`` inside. LBV keeps every voxel but the
boundary layer (no erosion by a kernel radius), at the price of the local field's own boundary
values, which it sets to zero.

Here the 7-point Laplacian in mm (exact on anisotropic voxels) is solved by conjugate gradient
on the interior voxels, preconditioned by the Dirichlet Laplacian of the mask's bounding box
(inverted by a type-I DST), which leaves a few tens of iterations where plain CG needs hundreds.
``peel`` further boundary layers are dropped from the result, as the toolbox's ``peel`` option:
the voxels next to the boundary carry its error the most.
"""
import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi

from ..core.grid import voxel_size_array
from ..spec import MethodSpec
from .common import BackgroundRemoval, check_field_and_mask

_SIX = ndi.generate_binary_structure(3, 1)


def _box_solver(shape, voxel):
    """Solver of ``-lap(u) = r`` on a box with u = 0 one voxel beyond its faces (DST-I), float32."""
    eigen = np.zeros(shape)
    for axis, (n, d) in enumerate(zip(shape, voxel)):
        axis_shape = [1, 1, 1]
        axis_shape[axis] = n
        eigen = eigen + ((2 - 2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1))) / d ** 2).reshape(axis_shape)
    inverse = (1.0 / eigen).astype(np.float32)

    def solve(rhs):
        return sfft.idstn(sfft.dstn(rhs, type=1) * inverse, type=1).astype(np.float32, copy=False)

    return solve


def _neg_laplacian(u, voxel):
    """``-lap(u)`` by the 7-point stencil in 1/mm^2, zero beyond the array."""
    out = np.zeros_like(u)
    for axis, d in enumerate(voxel):
        w = np.float32(1.0 / d ** 2)
        out += 2 * w * u
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(lo)] -= w * u[tuple(hi)]
        out[tuple(hi)] -= w * u[tuple(lo)]
    return out


def lbv(total_field, mask, voxel_size_mm, tol=1e-4, max_iter=500, peel=1):
    """LBV background field removal; units preserved (Hz in, Hz out).

    ``tol``: relative residual at which CG stops; ``max_iter``: its limit. ``peel``: boundary layers
    (voxels, 6-connected) dropped from the returned mask after the solve. It takes no B0
    direction (harmonic fields do not depend on B0). Returns a
    :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval` whose ``mask`` is the interior (the mask
    eroded by 1 + ``peel`` voxels).
    """
    field, mask = check_field_and_mask(total_field, mask)
    voxel = voxel_size_array(voxel_size_mm)
    if peel < 0:
        raise ValueError(f"peel must be >= 0 voxels, got {peel!r}")
    found = ndi.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found, mask.shape))
    m = mask[box]
    interior = ndi.binary_erosion(m, _SIX, border_value=0)
    if not interior.any():
        raise ValueError("mask has no interior voxel (every voxel lies on its boundary): nothing for LBV to solve")
    f = np.where(m, field[box], 0).astype(np.float32)
    boundary = np.where(m & ~interior, f, 0).astype(np.float32)
    inside = interior.astype(np.float32)
    solve = _box_solver(m.shape, voxel)

    def operator(u):  # -lap restricted to the interior unknowns
        return _neg_laplacian(u * inside, voxel) * inside

    rhs = -_neg_laplacian(boundary, voxel) * inside  # boundary values moved to the right-hand side
    b = np.zeros_like(f)
    residual = rhs.copy()
    z = solve(residual) * inside
    direction = z.copy()
    rz = float(np.vdot(residual, z))
    rhs_norm = float(np.linalg.norm(rhs)) or 1.0
    iterations = 0
    while iterations < max_iter and np.linalg.norm(residual) > tol * rhs_norm:
        a_dir = operator(direction)
        step = rz / float(np.vdot(direction, a_dir))
        b += np.float32(step) * direction
        residual -= np.float32(step) * a_dir
        z = solve(residual) * inside
        rz_next = float(np.vdot(residual, z))
        direction = z + np.float32(rz_next / rz) * direction
        rz = rz_next
        iterations += 1
    relative_residual = float(np.linalg.norm(rhs - operator(b)) / rhs_norm)
    keep = ndi.binary_erosion(interior, _SIX, iterations=peel, border_value=0) if peel else interior
    if not keep.any():
        raise ValueError(f"mask is empty after peeling {peel} boundary layers; use a smaller peel")
    local = np.zeros(mask.shape, np.float32)
    local[box] = np.where(keep, f - b, 0)
    out_mask = np.zeros(mask.shape, bool)
    out_mask[box] = keep
    return BackgroundRemoval(local, out_mask, iterations, relative_residual,
                             {"Tolerance": tol, "MaxIterations": max_iter, "Peel": peel})


SPEC = MethodSpec(
    name="lbv", function=lbv, display_name="LBV", description="the Laplacian boundary value method (LBV)",
    citations={"zhou2014": "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the "
                           "Laplacian boundary value problem. NMR Biomed. 2014;27(3):312-319."})
