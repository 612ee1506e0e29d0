"""The pipeline's total-field step, shared by the CLI's interface, the benchmarks and the in-process pipeline: the
odd/even echo correction of bipolar readouts as asked, then the multi-echo field fit (unwrapping + weighted fit,
phase offset at TE = 0 removed), and the RSS magnitude the later steps take."""
from dataclasses import dataclass

import numpy as np

from ..qsm.field.bipolar import DEFAULT_BIPOLAR, correct_bipolar
from ..qsm.field.echofit import fit_total_field
from .brain_mask import magnitude_rss


@dataclass
class FieldMaps:
    """Result of :func:`estimate_total_field` (float32 maps): the total field (Hz), the RSS magnitude over echoes,
    the echo fit's RMS phase residual (rad) and what the step's sidecar records."""

    field_hz: np.ndarray
    magnitude_rss: np.ndarray
    residual_rad: np.ndarray
    provenance: dict


def estimate_total_field(magnitude, phase_rad, echo_times_s, voxel_size_mm, bipolar=DEFAULT_BIPOLAR):
    """:class:`FieldMaps` of the 4D ``magnitude`` and wrapped ``phase_rad`` (echo last) at ``echo_times_s`` (s).

    ``bipolar``: ``auto``, ``on`` or ``off``, the correction of :func:`~metaqsm_bids.qsm.field.bipolar.correct_bipolar`;
    the fit is :func:`~metaqsm_bids.qsm.field.echofit.fit_total_field`. A single echo's offset stays in its field
    (the run's Warnings say so).
    """
    magnitude = np.asarray(magnitude, np.float32)
    phase = np.asarray(phase_rad, np.float32)
    tes = list(echo_times_s)
    phase, record = correct_bipolar(magnitude, phase, tes, voxel_size_mm, bipolar)
    fit = fit_total_field(magnitude, phase, tes, voxel_size_mm)
    provenance = {
        "Method": "Laplacian unwrapping of the echo-difference field + magnitude-weighted linear fit over echoes"
        if magnitude.shape[-1] > 1 else "Laplacian unwrapping of a single echo, divided by 2*pi*TE",
        "EchoTime": tes,
        "BipolarCorrection": record,
        "Units": "Hz",
    }
    return FieldMaps(np.asarray(fit.field_hz, np.float32), magnitude_rss(magnitude),
                     np.asarray(fit.residual_rad, np.float32), provenance)
