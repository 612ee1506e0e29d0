"""Which voxels of a mask have a field worth trusting: signal, and a phase that follows the echo-time line.

A magnitude mask can hold voxels with no signal of their own: skull base, sinus air or bone that
brain encloses in a slice, and that hole filling took in. Their phase is noise, and their field,
often off by hundreds of Hz, is not a local field: kept in the mask, background removal takes the
strong sources next to them for brain (PDF's local field error went from 0.47 to 1.7 on a
qsm-forward head for 0.6 % of such voxels). Next to the skull and sinuses at thick slices, the
field varies within a voxel and the phase of the voxel's summed signal no longer follows one
line in TE (through-slice dephasing): its field is off by 5-400 Hz. So:

* signal: the root-sum-of-squares magnitude over echoes at least ``min_signal_fraction`` of its
  median in the mask (brain tissue, CSF, nuclei and veins are well above; bone and air far below);
* echo fit: the magnitude-weighted RMS residual of the phase about the fitted line at most
  :func:`residual_threshold_rad` (0 with one or two echoes, so no test then).

What fails either is left out of background removal's fit. It stays in the QSM mask, its local
field completed from the reliable field around it (:mod:`metaqsm_bids.qsm.background.completion`):
haemorrhages, calcifications, microbleeds and veins fail these tests, and they are what clinical QSM
is read for. Only voids that reach the brain mask's surface leave the QSM mask (:func:`qsm_region`).
"""
import numpy as np
from scipy import ndimage as ndi

#: Defaults, from the stage benchmark (BENCHMARKS.md): tissue is > 0.5 of the median, bone < 0.05.
MIN_SIGNAL_FRACTION = 0.15
#: The residual threshold's floor (rad) and its multiple of the mask's median residual (the noise):
#: at peak SNR 100 the median is 0.02 rad and the floor applies; with noisier data the multiple
#: keeps the test from excluding tissue for its noise alone.
MIN_RESIDUAL_THRESHOLD_RAD = 0.1
RESIDUAL_NOISE_MULTIPLE = 4.0


def residual_threshold_rad(mask, residual_rad):
    """The echo-fit residual (rad) above which a voxel of ``mask`` is unreliable."""
    median = float(np.median(np.asarray(residual_rad)[np.asarray(mask, bool)]))
    return max(MIN_RESIDUAL_THRESHOLD_RAD, RESIDUAL_NOISE_MULTIPLE * median)


def signal_voxels(mask, magnitude_rss, min_signal_fraction=MIN_SIGNAL_FRACTION):
    """The voxels of ``mask`` whose RSS magnitude is at least ``min_signal_fraction`` of its median in the mask."""
    mask = np.asarray(mask, bool)
    rss = np.asarray(magnitude_rss, np.float32)
    if rss.shape != mask.shape:
        raise ValueError(f"magnitude shape {rss.shape} does not match mask shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty")
    return mask & (rss >= min_signal_fraction * float(np.median(rss[mask])))


def qsm_region(mask, magnitude_rss, min_signal_fraction=MIN_SIGNAL_FRACTION):
    """The voxels of ``mask`` that get a susceptibility value: all but the voids that reach its surface.

    A void (no signal, :func:`signal_voxels`) connected to the mask's outer layer is bone or air
    that the mask's hole filling took in (skull base, sinuses); a void enclosed by signal is a
    lesion whose signal decays within the first echoes (calcification, microbleed, clot) and stays.
    """
    mask = np.asarray(mask, bool)
    void = mask & ~signal_voxels(mask, magnitude_rss, min_signal_fraction)
    labels, _ = ndi.label(void)
    surface = mask & ~ndi.binary_erosion(mask)
    outer = np.setdiff1d(np.unique(labels[surface & void]), [0])
    return mask & ~np.isin(labels, outer)


def reliable_voxels(mask, magnitude_rss, residual_rad=None, min_signal_fraction=MIN_SIGNAL_FRACTION,
                    max_residual_rad=None):
    """Boolean map: the voxels of ``mask`` whose field is reliable (see the module text).

    ``max_residual_rad`` defaults to :func:`residual_threshold_rad`; without ``residual_rad`` only the
    signal test applies."""
    reliable = signal_voxels(mask, magnitude_rss, min_signal_fraction)
    if residual_rad is not None:
        if max_residual_rad is None:
            max_residual_rad = residual_threshold_rad(mask, residual_rad)
        reliable &= np.asarray(residual_rad) <= max_residual_rad
    return reliable
