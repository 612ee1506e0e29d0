"""The pipeline's first step, shared by the CLI's interface and the in-process pipeline: every echo as magnitude
and phase in rad under one known convention, stacked echo last."""
from dataclasses import dataclass

import numpy as np

from ..qsm.field.phase import echoes_to_rad
from ..qsm.field.phase_sign import apply_phase_sign


@dataclass
class Echoes:
    """Result of :func:`scale_phase` and :func:`complex_to_polar`: the magnitude and the phase (rad), float32,
    echo last (i, j, k, echo), and what the step's sidecar records."""

    magnitude: np.ndarray
    phase_rad: np.ndarray
    provenance: dict


def _sign_record(phase_sign, phase_sign_provenance):
    return {"PhaseSignFactor": phase_sign, **(phase_sign_provenance or {})}


def scale_phase(magnitudes, phases, phase_units=None, phase_sign=1, phase_sign_provenance=None, names=None,
                phase_names=None):
    """:class:`Echoes` of one 3D magnitude and one 3D stored phase per echo.

    The phase is scaled to rad with one convention for all echoes (:func:`~metaqsm_bids.qsm.field.phase.echoes_to_rad`:
    ``phase_units`` is the sidecars' ``Units``, None to infer it from the range), then multiplied by ``phase_sign``
    (+1: as stored; :mod:`metaqsm_bids.qsm.field.phase_sign`), whose reasons ``phase_sign_provenance`` records.
    ``names``, ``phase_names``: one per echo, for error messages. A negative magnitude is a ValueError.
    """
    if len(phases) != len(magnitudes):
        first = phase_names[0] if phase_names else "phase"
        raise ValueError(f"{first}: {len(phases)} phase volumes but {len(magnitudes)} magnitude volumes")
    magnitudes = [np.asarray(m, np.float32) for m in magnitudes]
    rad, info = echoes_to_rad(phases, phase_units, phase_names)
    for name, magnitude in zip(names or [None] * len(magnitudes), magnitudes):
        if magnitude.min() < 0:
            raise ValueError(f"{name + ': ' if name else ''}magnitude has negative values (min "
                             f"{float(magnitude.min()):g}); is this a real part? name it part-real")
    provenance = {"Method": "one known phase convention for all echoes (metaqsm_bids.qsm.field.phase.echoes_to_rad)",
                  "Input": "part-mag, part-phase", "PhaseUnits": phase_units or "inferred from range", **info}
    return _stack(magnitudes, rad, phase_sign, {**provenance, **_sign_record(phase_sign, phase_sign_provenance)})


def complex_to_polar(reals, imags, phase_sign=1, phase_sign_provenance=None):
    """:class:`Echoes` of one 3D real and one 3D imaginary part per echo: ``|S|`` and ``angle(S)`` in [-pi, pi),
    multiplied by ``phase_sign`` as in :func:`scale_phase`."""
    magnitudes = [np.hypot(np.asarray(re, np.float32), np.asarray(im, np.float32)) for re, im in zip(reals, imags)]
    phases = [np.arctan2(np.asarray(im, np.float64), np.asarray(re, np.float64)) for re, im in zip(reals, imags)]
    phases = [np.where(p >= np.pi, -np.pi, p).astype(np.float32) for p in phases]
    provenance = {"Method": "magnitude and phase of real + i imaginary", "Input": "part-real, part-imag"}
    return _stack(magnitudes, phases, phase_sign, {**provenance, **_sign_record(phase_sign, phase_sign_provenance)})


def _stack(magnitudes, phases, phase_sign, provenance):
    phases = [apply_phase_sign(p, phase_sign) for p in phases]
    return Echoes(np.stack(magnitudes, -1).astype(np.float32, copy=False),
                  np.stack(phases, -1).astype(np.float32, copy=False), provenance)
