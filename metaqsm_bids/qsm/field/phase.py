"""Scaling of stored phase images to radians: one known convention, one scale for all echoes of a run.

BIDS phase images carry ``Units`` "rad" or "arbitrary" in their sidecars. Vendors and
converters store one full turn of phase in a fixed range: radians, degrees, Siemens
-4096..4095 (dcm2niix) or 0..4095, milliradians -3142..3142 (Philips, GE), 12- or 16-bit
signed/unsigned integers (:data:`CONVENTIONS`). The range of the values is not the turn:
an echo that does not wrap yet, or a zeroed background, spans less than the whole range,
so the scale is taken from the known convention that the values of *all* echoes of the run
fill, and the same scale is used for every echo. A range that fits no convention is refused.
"""
from dataclasses import dataclass

import numpy as np

#: Slack (rad) on the [-pi, pi] check: float32 rounding and converters that store pi + eps.
RAD_TOLERANCE = 1e-3

_PI32 = np.float32(np.pi)


def _wrap_float32(phase_rad):
    """Wrap float64 radians to float32 in [-pi, pi) (as float32 numbers: pi itself maps to -pi)."""
    wrapped = np.mod(phase_rad + np.pi, 2 * np.pi) - np.pi
    out = wrapped.astype(np.float32)
    # values just below pi round up to float32(pi) in the cast
    out[out >= _PI32] = -_PI32
    return out


def _shift_into_range(phase_rad):
    """Float32 radians within one turn of [-pi, pi) moved into it by one turn; in-range values are unchanged."""
    out = np.array(phase_rad, dtype=np.float32)
    out[out >= _PI32] -= 2 * _PI32
    out[out < -_PI32] += 2 * _PI32
    return out


def _in_radian_range(low, high):
    """True when [low, high] lies in [-pi, pi] or [0, 2*pi], up to RAD_TOLERANCE."""
    return (low >= -np.pi - RAD_TOLERANCE and high <= np.pi + RAD_TOLERANCE) or (
        low >= -RAD_TOLERANCE and high <= 2 * np.pi + RAD_TOLERANCE
    )


@dataclass(frozen=True)
class PhaseConvention:
    """Stored values in [low, high] (up to ``slack``) hold one turn of phase per ``turn`` units."""

    name: str
    low: float
    high: float
    turn: float
    slack: float

    def contains(self, low, high):
        return low >= self.low - self.slack and high <= self.high + self.slack

    def fill(self, low, high):
        """Fraction of the convention's range that [low, high] spans."""
        return (high - low) / (self.high - self.low)


#: Known ways of storing one turn of phase, smallest turn first (the first one the data fill is taken).
CONVENTIONS = (
    PhaseConvention("radians [-pi, pi]", -np.pi, np.pi, 2 * np.pi, RAD_TOLERANCE),
    PhaseConvention("radians [0, 2pi]", 0.0, 2 * np.pi, 2 * np.pi, RAD_TOLERANCE),
    PhaseConvention("degrees [-180, 180]", -180.0, 180.0, 360.0, 1e-3),
    PhaseConvention("degrees [0, 360]", 0.0, 360.0, 360.0, 1e-3),
    PhaseConvention("12-bit signed [-2048, 2047]", -2048.0, 2048.0, 4096.0, 0.5),
    PhaseConvention("12-bit unsigned [0, 4095] (Siemens raw)", 0.0, 4096.0, 4096.0, 0.5),
    PhaseConvention("milliradians [-3142, 3142] (Philips, GE)", -1000 * np.pi, 1000 * np.pi, 2000 * np.pi, 1.0),
    PhaseConvention("Siemens [-4096, 4095] (dcm2niix)", -4096.0, 4096.0, 8192.0, 0.5),
    PhaseConvention("16-bit signed [-32768, 32767]", -32768.0, 32768.0, 65536.0, 0.5),
    PhaseConvention("16-bit unsigned [0, 65535]", 0.0, 65536.0, 65536.0, 0.5),
)

#: The values of all echoes must span at least this fraction of a convention's range for it to be taken:
#: multi-echo phase wraps (coil phase alone covers the turn), so it fills its storage range.
MIN_FILL = 0.8


def find_convention(low, high):
    """The first of :data:`CONVENTIONS` that contains [low, high] and that it fills (:data:`MIN_FILL`), or None."""
    for convention in CONVENTIONS:
        if convention.contains(low, high) and convention.fill(low, high) >= MIN_FILL:
            return convention
    return None


def _check_values(values, name):
    prefix = f"{name}: " if name else ""
    if values.size == 0:
        raise ValueError(f"{prefix}phase image is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{prefix}phase image has {int((~np.isfinite(values)).sum())} NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ValueError(f"{prefix}phase image is constant ({low}): it carries no phase information")
    return low, high


def echoes_to_rad(echoes, units=None, names=None):
    """Every echo's phase (a list of arrays) in float32 radians in [-pi, pi), with one scale for all.

    ``units`` is the sidecars' ``Units``:

    * ``"rad"``: the values must lie in [-pi, pi] (or [0, 2*pi], the same phases after
      wrapping), with a slack of ``RAD_TOLERANCE``; they are only wrapped.
    * ``"arbitrary"`` or ``None``: the run's range (over all echoes) selects the first of
      :data:`CONVENTIONS` that contains it and that it fills to :data:`MIN_FILL`; every echo is
      scaled by that convention's ``2*pi / turn`` and wrapped (a global phase constant is
      irrelevant to QSM). With ``None``, data that fit radians are taken as radians.

    ``names`` (one per echo, e.g. the files) prefix the error messages. Returns
    ``(phases, info)``; ``info`` holds ``PhaseConvention``, ``RadiansPerUnit`` and ``StoredRange``.
    Raises ValueError for NaN/infinite values, constant or empty images, unknown units, "rad"
    data outside the radian ranges and a range that fits no known convention.
    """
    if units not in (None, "rad", "arbitrary"):
        raise ValueError(f"phase units must be 'rad', 'arbitrary' or None, got {units!r}")
    echoes = [np.asarray(e) for e in echoes]
    names = list(names) if names is not None else [None] * len(echoes)
    ranges = [_check_values(e, n) for e, n in zip(echoes, names)]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    where = names[max(range(len(echoes)), key=lambda n: max(abs(ranges[n][0]), abs(ranges[n][1])))]
    prefix = f"{where}: " if where else ""
    if units == "rad" or (units is None and _in_radian_range(low, high)):
        if not _in_radian_range(low, high):
            raise ValueError(
                f"{prefix}phase units are 'rad' but the values range over [{low:g}, {high:g}], "
                "outside [-pi, pi] and [0, 2*pi]; if they are vendor integers set the units to 'arbitrary'"
            )
        convention = CONVENTIONS[0] if low >= -np.pi - RAD_TOLERANCE and high <= np.pi + RAD_TOLERANCE \
            else CONVENTIONS[1]
    else:
        convention = find_convention(low, high)
        if convention is None:
            known = "; ".join(c.name for c in CONVENTIONS)
            raise ValueError(
                f"{prefix}the phase of this run ranges over [{low:g}, {high:g}] (all echoes), which fills no known "
                f"phase convention ({known}; at least {100 * MIN_FILL:.0f}% of the range): the scale to radians "
                "cannot be told. Store radians with Units 'rad'")
    info = {"PhaseConvention": convention.name, "RadiansPerUnit": float(2 * np.pi / convention.turn),
            "StoredRange": [low, high]}
    if convention.turn == 2 * np.pi:
        return [_shift_into_range(e) for e in echoes], info
    return [_wrap_float32(e.astype(np.float64) * (2 * np.pi / convention.turn)) for e in echoes], info


def phase_to_rad(phase, units=None):
    """One phase image (any shape) in float32 radians in [-pi, pi); see :func:`echoes_to_rad`."""
    return echoes_to_rad([phase], units)[0][0]
