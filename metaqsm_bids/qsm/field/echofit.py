"""Total field map from multi-echo GRE phase: spatial unwrap of the echo spacing, temporal unwrap, weighted fit.

The phase of echo ``n`` is ``phi_n = a + omega * TE_n`` (rad), with ``a`` the phase
offset at TE = 0 (coil and transmit phase) and ``omega = 2*pi*field_hz``. Steps:

1. the field wrapped to one echo spacing ``dTE``: the angle of the sum over the
   consecutive echo pairs spaced by ``dTE`` (the first spacing) of
   ``conj(S_n) S_{n+1}``, with ``S = magnitude * exp(i*phase)``; the offset cancels
   and ``dTE * omega`` changes slowly in space, so it is easy to unwrap;
2. spatial Laplacian unwrapping of it, weighted by the magnitude of that sum, snapped
   to the measured wraps: ``omega_init``;
3. offset ``phi0 = angle(sum_n |S_n| S_n exp(-i*omega_init*TE_n))``;
4. temporal unwrapping of each echo to within pi of ``phi0 + omega_init*TE_n``;
5. least-squares line through the unwrapped phases weighted by ``|S_n|^2``
   (the phase noise variance is ``sigma^2 / |S|^2``), in closed form per voxel.

Echo spacings need not be uniform: step 1 uses only the pairs with the first one.
"""
from dataclasses import dataclass

import numpy as np

from ..core.grid import voxel_size_array
from .unwrap import laplacian_unwrap, snap_to_wraps, wrap_phase

#: Relative tolerance for an echo spacing to count as equal to the first one (TEs in sidecars are rounded).
SPACING_TOLERANCE = 0.01


@dataclass
class TotalField:
    """Result of :func:`fit_total_field` (3D float32 arrays).

    ``field_hz``: the total field (Hz), defined up to a global multiple of
    ``1 / dTE`` (``1 / TE`` for one echo), chosen so that its mean over the volume
    lies within about ``1 / (2 dTE)`` of 0 (the mean of a field from phase is
    arbitrary anyway). ``phase_offset_rad``: the phase at TE = 0, wrapped to [-pi, pi].
    ``residual_rad``: the magnitude-weighted RMS deviation (rad) of the unwrapped
    echo phases from the fitted line; it is 0 with one or two echoes (no degrees of
    freedom) and large where the fit failed (noise, a temporal wrap error).
    """

    field_hz: np.ndarray
    phase_offset_rad: np.ndarray
    residual_rad: np.ndarray


def _validate(magnitude, phase_rad, echo_times_s, voxel_size_mm):
    """Check the inputs; return echo-first float32 magnitude (max 1) and phase, TEs and voxel size."""
    magnitude = np.asarray(magnitude)
    phase = np.asarray(phase_rad)
    if magnitude.ndim != 4 or phase.ndim != 4:
        raise ValueError(
            f"magnitude and phase must be 4D (i, j, k, echo), got shapes {magnitude.shape} and {phase.shape}"
        )
    if magnitude.shape != phase.shape:
        raise ValueError(f"magnitude shape {magnitude.shape} does not match phase shape {phase.shape}")
    tes = np.asarray(echo_times_s, dtype=float)
    if tes.ndim != 1 or tes.size != phase.shape[3]:
        raise ValueError(f"{phase.shape[3]} echoes in the images but {tes.size} echo times given: {tes.tolist()}")
    if not np.all(np.isfinite(tes)) or not np.all(tes > 0) or not np.all(np.diff(tes) > 0):
        raise ValueError(f"echo times must be positive and strictly increasing (s), got {tes.tolist()}")
    voxel = voxel_size_array(voxel_size_mm)
    # echo first and contiguous: every step below works on whole echoes
    magnitude = np.ascontiguousarray(np.moveaxis(magnitude, 3, 0), dtype=np.float32)
    phase = np.ascontiguousarray(np.moveaxis(phase, 3, 0), dtype=np.float32)
    for name, data in (("magnitude", magnitude), ("phase", phase)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ValueError(f"{name} has {bad} NaN or infinite values")
    if magnitude.min() < 0:
        raise ValueError(f"magnitude has negative values (min {float(magnitude.min()):g}); pass |S|, not a real part")
    peak = float(magnitude.max())
    if peak == 0:
        raise ValueError("magnitude is zero everywhere")
    # scale-free weights: no float32 overflow or underflow whatever the stored intensity range
    return magnitude * np.float32(1.0 / peak), phase, tes, voxel


def _unwrapped_spacing_phase(magnitude, phase, tes, voxel):
    """``dTE * omega`` (rad) spatially unwrapped, from the echo pairs spaced by the first spacing ``dTE``."""
    spacing = tes[1] - tes[0]
    real = np.zeros(phase.shape[1:], dtype=np.float32)
    imag = np.zeros(phase.shape[1:], dtype=np.float32)
    for n in range(len(tes) - 1):
        if abs(tes[n + 1] - tes[n] - spacing) > SPACING_TOLERANCE * spacing:
            continue
        step = phase[n + 1] - phase[n]
        weight = magnitude[n] * magnitude[n + 1]
        real += weight * np.cos(step)
        imag += weight * np.sin(step)
    wrapped = np.arctan2(imag, real)
    # the coherent sum's magnitude is large where the echoes agree: the unwrapping weight
    reliability = np.hypot(real, imag)
    return snap_to_wraps(laplacian_unwrap(wrapped, voxel, weight=reliability), wrapped), spacing


def fit_total_field(magnitude, phase_rad, echo_times_s, voxel_size_mm):
    """Total field (Hz) and phase offset at TE = 0 (rad) from 4D magnitude and phase (i, j, k, echo).

    ``phase_rad`` is wrapped phase in rad, ``echo_times_s`` the echo times (s),
    ``voxel_size_mm`` the voxel edge lengths (mm) used by the spatial unwrapping.
    With a single echo the offset cannot be separated from the field: the field is
    the Laplacian-unwrapped phase divided by ``2*pi*TE`` (so it contains the offset
    divided by that) and ``phase_offset_rad`` is 0. Raises ValueError on shape
    mismatch, echo count different from the echo times, echo times not positive
    and increasing, NaN or infinite values, negative or all-zero magnitude, and
    voxel sizes that are not 3 positive lengths.
    """
    magnitude, phase, tes, voxel = _validate(magnitude, phase_rad, echo_times_s, voxel_size_mm)
    shape = phase.shape[1:]
    if len(tes) == 1:
        unwrapped = snap_to_wraps(laplacian_unwrap(phase[0], voxel, weight=magnitude[0]), phase[0])
        field = unwrapped / np.float32(2 * np.pi * tes[0])
        return TotalField(field, np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    spacing_phase, spacing = _unwrapped_spacing_phase(magnitude, phase, tes, voxel)
    omega_init = spacing_phase / np.float32(spacing)
    te32 = tes.astype(np.float32)

    real = np.zeros(shape, dtype=np.float32)
    imag = np.zeros(shape, dtype=np.float32)
    for n in range(len(tes)):
        demodulated = phase[n] - omega_init * te32[n]
        power = magnitude[n] ** 2
        real += power * np.cos(demodulated)
        imag += power * np.sin(demodulated)
    phi0 = np.arctan2(imag, real)

    # Weighted line fit of the temporal unwrapping residuals r_n against TE
    # centred on the mean TE (keeps the float32 normal equations well conditioned);
    # the line through phi0 + omega_init*TE is added back afterwards. The weights
    # (magnitude scaled to a maximum of 1, squared) get a floor so that voxels with
    # no signal in any echo get an unweighted fit instead of 0/0.
    centre = float(tes.mean())
    tau = (tes - centre).astype(np.float32)
    floor = np.float32(1e-8)
    sums = {key: np.zeros(shape, dtype=np.float32) for key in ("w", "wt", "wtt", "wr", "wtr")}
    residuals = []
    for n in range(len(tes)):
        residual = wrap_phase(phase[n] - phi0 - omega_init * te32[n])
        weight = magnitude[n] ** 2 + floor
        sums["w"] += weight
        sums["wt"] += weight * tau[n]
        sums["wtt"] += weight * tau[n] ** 2
        sums["wr"] += weight * residual
        sums["wtr"] += weight * tau[n] * residual
        residuals.append(residual)
    determinant = sums["w"] * sums["wtt"] - sums["wt"] ** 2
    slope = (sums["w"] * sums["wtr"] - sums["wt"] * sums["wr"]) / determinant
    intercept_at_centre = (sums["wtt"] * sums["wr"] - sums["wt"] * sums["wtr"]) / determinant

    misfit = np.zeros(shape, dtype=np.float32)
    for n, residual in enumerate(residuals):
        weight = magnitude[n] ** 2 + floor
        misfit += weight * (residual - intercept_at_centre - slope * tau[n]) ** 2
    residual_rad = np.sqrt(misfit / sums["w"])

    omega = omega_init + slope
    offset = wrap_phase(phi0 + intercept_at_centre - slope * np.float32(centre))
    return TotalField((omega / np.float32(2 * np.pi)).astype(np.float32), offset.astype(np.float32), residual_rad)
