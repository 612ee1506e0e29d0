"""Shared iterative-solver pieces: finite differences and their k-space power, conjugate gradient and the inner
product of real fields held as rfftn half spectra (MEDI, iLSQR, RESHARP, PDF, L2, TV-ADMM, the field's completion)."""
import numpy as np

from .dipole import kspace_grid


def _planes(axis, first, second):
    """Index tuples of the slices ``first`` and ``second`` along ``axis``."""
    return (tuple(first if a == axis else slice(None) for a in range(3)),
            tuple(second if a == axis else slice(None) for a in range(3)))


def gradient(x, voxel_size_mm, circular=False, out=None):
    """Forward differences (per mm) along each axis, stacked as ``(3, *x.shape)``; on the last plane 0, or with
    ``circular`` the difference to the first plane (the gradient an FFT diagonalises). ``out`` (optional, that
    shape and ``x``'s dtype) receives them: solvers that iterate reuse one buffer instead of allocating."""
    if out is None:
        out = np.empty((3, *x.shape), dtype=x.dtype)
    for axis, d in enumerate(voxel_size_mm):
        hi, lo = _planes(axis, slice(1, None), slice(None, -1))
        first, last = _planes(axis, slice(0, 1), slice(-1, None))
        np.subtract(x[hi], x[lo], out=out[axis][lo])
        if circular:
            np.subtract(x[first], x[last], out=out[axis][last])
        else:
            out[axis][last] = 0
        out[axis] *= x.dtype.type(1.0 / d)
    return out


def gradient_adjoint(g, voxel_size_mm, circular=False, out=None):
    """Adjoint of :func:`gradient` with the same ``circular`` (minus the backward-difference divergence), same shape
    as one component; ``out`` (optional) receives it, as in :func:`gradient`."""
    if out is None:
        out = np.empty(g.shape[1:], dtype=g.dtype)
    out.fill(0)
    scaled = np.empty_like(out)
    for axis, d in enumerate(voxel_size_mm):
        hi, lo = _planes(axis, slice(1, None), slice(None, -1))
        np.multiply(g[axis], g.dtype.type(1.0 / d), out=scaled)
        out[lo] -= scaled[lo]
        out[hi] += scaled[lo]
        if circular:
            first, last = _planes(axis, slice(0, 1), slice(-1, None))
            out[last] -= scaled[last]
            out[first] += scaled[last]
    return out


def gradient_power(shape, voxel_size_mm, half=True):
    """``|G(k)|^2`` (1/mm^2, float32, FFT order) of the forward-difference gradient in mm (:func:`gradient` with
    ``circular``: ``G^T G`` is this product in k-space).

    ``half=True`` returns the ``rfftn`` half spectrum (last axis ``shape[2] // 2 + 1``).
    """
    grid = kspace_grid(shape, voxel_size_mm)
    if half:
        grid[2] = grid[2][..., : shape[2] // 2 + 1]
    return sum((2.0 * np.sin(np.pi * k * d) / d) ** 2 for k, d in zip(grid, voxel_size_mm)).astype(np.float32)


def conjugate_gradient(apply_a, b, tol, max_iter):
    """Solve ``A x = b`` (A symmetric positive semi-definite) by conjugate gradient from 0.

    Stops once ``||b - A x|| <= tol ||b||`` (the recursive residual) or after ``max_iter``
    iterations. Returns ``(x, iterations, relative residual)``.
    """
    def dot(x, y):
        return float(np.vdot(x, y).real)
    x = np.zeros_like(b)
    residual = b.copy()
    b_norm = np.sqrt(dot(b, b))
    if b_norm == 0:
        return x, 0, 0.0
    direction = residual.copy()
    rr = dot(residual, residual)
    iterations = 0
    while iterations < max_iter and np.sqrt(rr) > tol * b_norm:
        a_dir = apply_a(direction)
        alpha = rr / dot(direction, a_dir)
        x += alpha * direction
        residual -= alpha * a_dir
        rr_next = dot(residual, residual)
        direction *= rr_next / rr
        direction += residual
        rr = rr_next
        iterations += 1
    return x, iterations, float(np.sqrt(rr) / b_norm)


def _half_spectrum_dot(x, y, last_axis_even):
    """Real-space inner product of two real fields (times their size), from their rfftn half spectra.

    Every plane of the half spectrum along the last axis stands for itself and its
    conjugate, except k=0 and, for an even length, k=n/2, which count once.
    """
    total = 2.0 * np.vdot(x, y) - np.vdot(x[..., 0], y[..., 0])
    if last_axis_even:
        total -= np.vdot(x[..., -1], y[..., -1])
    return float(total.real)
