"""The unit dipole kernel in k-space and the forward model field = D * chi.

The kernel is ``D(k) = 1/3 - (k . b0)^2 / |k|^2`` (Salomir 2003; Marques & Bowtell
2005) with ``k`` in cycles/mm along the voxel axes, so anisotropic voxels and an
oblique B0 (``b0_dir`` in voxel axes) are both exact. ``D(0)`` is set to 0: the mean
field inside a finite FOV is not determined by the susceptibility (it depends on the
shim and the reference), so every module here treats it as unknown.
"""
import numpy as np
import scipy.fft as sfft

from .physics import field_ppm_to_hz


def kspace_grid(shape, voxel_size_mm):
    """Spatial frequencies (cycles/mm) along each voxel axis, broadcastable, FFT order."""
    return [
        sfft.fftfreq(n, d=float(d)).astype(np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        for ax, (n, d) in enumerate(zip(shape, voxel_size_mm))
    ]


def dipole_kernel(shape, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), half=False):
    """Unit dipole kernel (float32, FFT order, no fftshift) for an array of ``shape``.

    ``half=True`` returns only the ``rfftn`` half spectrum (last axis ``n//2 + 1``),
    half the memory and time of the full kernel.
    """
    b0 = np.asarray(b0_dir, float)
    b0 = (b0 / np.linalg.norm(b0)).astype(np.float32)  # float32: numpy 2 would promote the grid to float64
    ki, kj, kk = kspace_grid(shape, voxel_size_mm)
    if half:
        kk = kk[..., : shape[2] // 2 + 1]
    # On an even axis the Nyquist bin stands for both +-1/(2d). The cross terms of
    # (k.b0)^2 are odd in it, so they are averaged away there (k_sym has that bin
    # zeroed): this keeps D(k) = D(-k), without which an oblique B0 gives a
    # non-real field whose irfftn depends on the axis order.
    k_sym = [
        k * (np.arange(k.size).reshape(k.shape) != n // 2) if n % 2 == 0 else k
        for k, n in zip((ki, kj, kk), shape)
    ]
    k_dot_b_sq = sum(k * b for k, b in zip(k_sym, b0)) ** 2
    k_dot_b_sq += sum((k ** 2 - ks ** 2) * b ** 2 for k, ks, b in zip((ki, kj, kk), k_sym, b0))
    k2 = ki ** 2 + kj ** 2 + kk ** 2
    k2[0, 0, 0] = 1.0  # avoid 0/0; the DC term is set below
    kernel = (np.float32(1.0 / 3.0) - k_dot_b_sq / k2).astype(np.float32, copy=False)
    kernel[0, 0, 0] = 0.0
    return kernel


def padded_shape(shape, pad_voxels):
    """Shape grown by ``pad_voxels`` on each side then rounded up to a fast FFT length."""
    return tuple(sfft.next_fast_len(int(n) + 2 * int(p), real=True) for n, p in zip(shape, pad_voxels))


def dipole_convolve(x, kernel_half):
    """``x`` (a box array) circularly convolved with the dipole kernel given as its ``rfftn`` half spectrum
    (:func:`dipole_kernel` with ``half``): one FFT pair, the product transformed back in place."""
    spectrum = sfft.rfftn(x)
    spectrum *= kernel_half
    return sfft.irfftn(spectrum, s=x.shape, overwrite_x=True)


def forward_field_ppm(chi_ppm, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), pad_voxels=None):
    """Field perturbation (ppm of B0) produced by a susceptibility map (ppm).

    ``pad_voxels`` zero-pads each axis on both sides before the FFT so that the
    periodic convolution does not fold the field of sources at one edge onto the
    other; by default each axis is padded by half its length, which is what the
    dipole's 1/r^3 decay needs for a source filling the FOV.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    if pad_voxels is None:
        pad_voxels = [n // 2 for n in chi.shape]
    fshape = padded_shape(chi.shape, pad_voxels)
    spectrum = sfft.rfftn(chi, s=fshape)
    spectrum *= dipole_kernel(fshape, voxel_size_mm, b0_dir, half=True)
    field = sfft.irfftn(spectrum, s=fshape)
    return np.ascontiguousarray(field[: chi.shape[0], : chi.shape[1], : chi.shape[2]], dtype=np.float32)


def forward_field_hz(chi_ppm, voxel_size_mm, b0_tesla, b0_dir=(0.0, 0.0, 1.0), **kwargs):
    """Field perturbation in Hz for a scanner of ``b0_tesla``; see :func:`forward_field_ppm`."""
    return field_ppm_to_hz(forward_field_ppm(chi_ppm, voxel_size_mm, b0_dir, **kwargs), b0_tesla)
