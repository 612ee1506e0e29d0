"""Which voxels of a mask have a field worth trusting: signal, and a phase that follows the echo-time line.

A magnitude mask can hold voxels with no signal of their own: skull base, sinus air or bone that
brain encloses in a slice, and that hole filling took in. Their phase is noise, and their field,
often off by hundreds of Hz, is not a local field: kept in the mask, background removal takes the
strong sources next to them for brain (PDF's local field error went from 0.47 to 1.7 on a
qsm-forward head for 0.6 % of such voxels). So:

* signal: the root-sum-of-squares magnitude over echoes at least ``min_signal_fraction`` of its
  median in the mask (brain tissue, CSF, nuclei and veins are well above; bone and air far below);
* echo fit: the magnitude-weighted RMS residual of the phase about the fitted line at most
  ``max_residual_rad`` (a temporal unwrapping error or dephasing; 0 with one or two echoes).

What fails either is excluded from background removal and from the QSM mask; PDF then models it
as background (it is where the background sources are).
"""
import numpy as np

#: Defaults, from the stage benchmark (BENCHMARKS.md): tissue is > 0.5 of the median, bone < 0.05.
MIN_SIGNAL_FRACTION = 0.15
MAX_RESIDUAL_RAD = 0.5


def reliable_voxels(mask, magnitude_rss, residual_rad=None, min_signal_fraction=MIN_SIGNAL_FRACTION,
                    max_residual_rad=MAX_RESIDUAL_RAD):
    """Boolean map: the voxels of ``mask`` whose field is reliable (see the module text)."""
    mask = np.asarray(mask, bool)
    rss = np.asarray(magnitude_rss, np.float32)
    if rss.shape != mask.shape:
        raise ValueError(f"magnitude shape {rss.shape} does not match mask shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty")
    reliable = mask & (rss >= min_signal_fraction * float(np.median(rss[mask])))
    if residual_rad is not None:
        reliable &= np.asarray(residual_rad) <= max_residual_rad
    return reliable
