"""Susceptibility-weighted imaging (SWI) and its minimum-intensity projection (mIP).

**SWI** (Haacke et al. 2004, MRM 52:612) multiplies a magnitude image by a phase mask raised to a power,
so that veins (deoxyhaemoglobin) and iron, whose phase is shifted, get darker than their magnitude alone
makes them:

* **Phase.** Haacke high-pass filters the phase to remove the background field (the filter size sets which
  structures stay). metaqsm has the background-free field already: the **local field** (Hz) of background
  field removal (``--bfr``, TFI by default), so **no filter** is applied and no filter size is chosen here. It
  is turned into the phase of one echo time, ``phi = -2 pi f TE`` (rad): SWI's convention, a right-handed
  system in which paramagnetic tissue (veins; ``f > 0`` in metaqsm's field, see
  :mod:`metaqsm_bids.qsm.field.phase_sign`) has **negative** phase. The vendor's stored sign was resolved
  before the field fit (``--phase-sign``), so this holds for every scanner.
* **Echo time.** The echo nearest :data:`SWI_TARGET_TE_S` (20 ms: Haacke's choice at 3 T, where veins have
  the contrast of about a radian without wrapping); its TE is recorded. The field is unwrapped, so a
  ``|phi|`` beyond pi is not wrapped back: it saturates the mask (below).
* **Mask.** The negative-phase mask ``m = 1 + phi / pi`` for ``-pi < phi < 0``, 0 for ``phi <= -pi``, 1 for
  ``phi >= 0`` (``phase_sign="negative"``, the default). ``"positive"`` mirrors it (``m = 1 - phi / pi``
  for ``0 < phi < pi``): it darkens diamagnetic tissue (calcifications) instead. The mask is raised to the power
  :data:`SWI_MASK_POWER` (4: Haacke's, the best contrast-to-noise of veins at 1.5-3 T).
* **Magnitude.** The root-sum-of-squares magnitude over echoes (the pipeline's combined magnitude, the
  SNR-weighted combination CLEAR-SWI (Eckstein et al. 2021, NeuroImage 237:118175) uses too), so a vein at
  phase ``phi`` is darker than its magnitude by the factor ``(1 + phi / pi) ** power``.

Outside the QSM mask the local field is 0: the SWI there is the magnitude.

**mIP** (minimum-intensity projection): each slice takes, voxel by voxel, the minimum of the SWI over a slab
centred on it along the slice axis (axis 2 of the voxel grid, as stored), so veins show as continuous dark
lines. The slab holds the odd number of slices nearest to the thickness asked for (:data:`MIP_SLAB_MM`; ties
round up), and is cut short at the first and last slices. The result is on the input's grid.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Echo time (s) whose phase the mask is made of: the echo nearest to it is used.
SWI_TARGET_TE_S = 0.020
#: Power of the phase mask (Haacke et al. 2004).
SWI_MASK_POWER = 4
#: Sign of the SWI phase (``-2 pi f TE``) that the mask darkens: ``negative`` (paramagnetic: veins, iron;
#: standard SWI) or ``positive`` (diamagnetic: calcifications).
SWI_PHASE_SIGNS = ("negative", "positive")
#: The sign darkened unless asked otherwise: standard SWI.
DEFAULT_SWI_PHASE_SIGN = "negative"
#: Thickness (mm) of the mIP's slab: the thin end of the 8-16 mm used clinically (thicker slabs merge
#: neighbouring veins).
MIP_SLAB_MM = 8.0
#: Axis of the voxel grid the mIP runs along.
MIP_AXIS = 2

REFERENCE = ("Haacke EM et al. Susceptibility weighted imaging (SWI). Magn Reson Med 2004;52:612-618")


@dataclass
class SWIResult:
    """SWI and its mIP (arbitrary units, the magnitude's), and the sidecar-ready parameters of each."""

    swi: np.ndarray
    mip: np.ndarray
    swi_parameters: dict
    mip_parameters: dict


def swi_echo_time(echo_times_s, target_s=SWI_TARGET_TE_S):
    """The echo time (s) of ``echo_times_s`` nearest to ``target_s`` (the earlier one on a tie)."""
    tes = np.asarray(echo_times_s, dtype=float)
    if tes.size == 0:
        raise ValueError("no echo times")
    return float(tes[np.argmin(np.round(np.abs(tes - target_s), 9))])  # rounded: a tie is a tie in float


def phase_mask(phase_rad, power=SWI_MASK_POWER, phase_sign=DEFAULT_SWI_PHASE_SIGN):
    """Haacke's phase mask of ``phase_rad`` (rad, SWI convention ``-2 pi f TE``) raised to ``power``:
    ``(1 + phi / pi) ** power`` where ``-pi < phi < 0`` (``phase_sign="negative"``; ``"positive"`` mirrors it),
    0 beyond pi, 1 on the other side. float32, in [0, 1]."""
    if phase_sign not in SWI_PHASE_SIGNS:
        raise ValueError(f"SWI phase sign must be one of {', '.join(SWI_PHASE_SIGNS)}, got {phase_sign!r}")
    if not (power >= 1 and float(power).is_integer()):
        raise ValueError(f"the phase mask's power must be a whole number >= 1, got {power!r}")
    phi = np.asarray(phase_rad, dtype=np.float32)
    signed = phi if phase_sign == "negative" else -phi
    mask = np.clip(1 + signed / np.float32(np.pi), 0, 1)  # 1 for signed >= 0, 0 for signed <= -pi
    return (mask ** int(power)).astype(np.float32)


def mip_slices(voxel_size_mm, slab_mm=MIP_SLAB_MM, axis=MIP_AXIS):
    """The number of slices of a ``slab_mm`` slab along ``axis``: the odd number nearest to ``slab_mm`` over
    the slice thickness (ties round up), at least 1."""
    if not slab_mm > 0:
        raise ValueError(f"the mIP slab must be thicker than 0 mm, got {slab_mm!r}")
    ratio = slab_mm / float(voxel_size_mm[axis])
    return 2 * int(np.floor(ratio / 2 + 1e-9)) + 1  # the odd number nearest to ratio, ties up


def minimum_intensity_projection(image, voxel_size_mm, slab_mm=MIP_SLAB_MM, axis=MIP_AXIS):
    """Sliding minimum of the 3D ``image`` over a slab of :func:`mip_slices` slices centred on each slice
    along ``axis`` (shortened at the volume's ends); same shape and dtype as ``image``."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"the mIP needs a 3D image, got shape {image.shape}")
    # 'nearest' repeats the end slice, which is already in the window: the same as cutting the window short
    return ndi.minimum_filter1d(image, size=mip_slices(voxel_size_mm, slab_mm, axis), axis=axis, mode="nearest")


def swi(magnitude, local_field_hz, echo_times_s, voxel_size_mm, power=SWI_MASK_POWER,
        phase_sign=DEFAULT_SWI_PHASE_SIGN, slab_mm=MIP_SLAB_MM):
    """SWI of the combined ``magnitude`` (3D) with the phase mask of ``local_field_hz`` (3D, Hz) at the echo
    nearest :data:`SWI_TARGET_TE_S`, and its mIP over ``slab_mm`` (see the module's docstring)."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    field = np.asarray(local_field_hz, dtype=np.float32)
    if magnitude.shape != field.shape or magnitude.ndim != 3:
        raise ValueError(f"SWI needs a 3D magnitude and local field of one shape, got {magnitude.shape} and "
                         f"{field.shape}")
    te = swi_echo_time(echo_times_s)
    phase = np.float32(-2 * np.pi * te) * field  # rad, SWI's convention: paramagnetic negative
    weighted = magnitude * phase_mask(phase, power, phase_sign)
    n = mip_slices(voxel_size_mm, slab_mm)
    swi_parameters = {
        "Reference": REFERENCE,
        "Magnitude": "root-sum-of-squares over echoes",
        "Phase": "local field (background removed, no further high-pass filter) x -2 pi TE",
        "HighPassFilter": "none (the local field is background-free)",
        "EchoTimeUsed": te,
        "PhaseMaskSign": phase_sign,
        "PhaseMaskPower": int(power),
    }
    mip_parameters = {
        "Projection": "minimum intensity over a sliding slab centred on each slice",
        "SlabAxis": MIP_AXIS,
        "SlabSlices": n,
        "SlabThicknessMm": round(n * float(voxel_size_mm[MIP_AXIS]), 6),
    }
    return SWIResult(weighted, minimum_intensity_projection(weighted, voxel_size_mm, slab_mm), swi_parameters,
                     mip_parameters)
