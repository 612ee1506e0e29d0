"""The pipeline's R2*/T2* step (two echoes or more), shared by the CLI's interface and the in-process pipeline:
the decay of the multi-echo magnitude fitted in the brain mask."""
import numpy as np

from ..qsm.field.relaxometry import DEFAULT_METHOD, estimate_r2star


def r2star_maps(magnitude, echo_times_s, brain_mask, method=DEFAULT_METHOD):
    """``(r2star_hz, t2star_s, provenance)``: R2* (1/s) and T2* (s), float32 and 0 outside ``brain_mask``, of the
    4D ``magnitude`` (echo last) by :func:`~metaqsm_bids.qsm.field.relaxometry.estimate_r2star` (``method``: the
    fit of three or more echoes), and what their sidecars record."""
    mask = np.asarray(brain_mask, bool)
    result = estimate_r2star(np.asarray(magnitude, np.float32), echo_times_s, mask=mask, method=method)
    inside = result.r2star_hz[mask]
    provenance = {
        "Method": result.method,
        **result.parameters,
        "Input": "magnitude of every echo, in the brain mask",
        "MedianR2starInMaskHz": round(float(np.median(inside)), 3) if inside.size else None,
    }
    return np.asarray(result.r2star_hz, np.float32), np.asarray(result.t2star_s, np.float32), provenance
