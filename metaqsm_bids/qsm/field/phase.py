"""Scaling of stored phase images to radians.

BIDS phase images carry ``Units`` "rad" or "arbitrary" in their sidecars. Vendors
store phase as integers spanning one full turn (Siemens -4096..4095 or 0..4095,
others 0..4095 or 0..4094); converters may also write degrees. Whatever the range,
one full turn of phase spans the whole stored range, so the observed range fixes
the scale.
"""
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


def phase_to_rad(phase, units=None):
    """Phase image (any shape) converted to float32 radians in [-pi, pi).

    ``units`` is the sidecar's ``Units``:

    * ``"rad"``: the values must already lie in [-pi, pi] (or [0, 2*pi], the same
      phases after wrapping), with a slack of ``RAD_TOLERANCE``; they are only wrapped.
    * ``"arbitrary"``: the observed range is one full turn. Integer-valued data
      take ``max - min + 1`` steps per turn, so Siemens -4096..4095 becomes
      ``x * pi / 4096``; other data (e.g. degrees) take ``max - min``. The value
      ``x`` maps to ``x * 2*pi / steps``, wrapped: a global phase constant is
      irrelevant to QSM, and unlike ``x - min`` it does not change between echoes
      whose observed minima differ.
    * ``None``: radians when the values fit the radian ranges above, else as
      ``"arbitrary"``. Data in arbitrary units that happen to fit (e.g. -1..1)
      cannot be told apart from radians: give the units when known.

    Raises ValueError for NaN/infinite values, constant images, unknown units and
    "rad" data outside the radian ranges.
    """
    if units not in (None, "rad", "arbitrary"):
        raise ValueError(f"phase units must be 'rad', 'arbitrary' or None, got {units!r}")
    values = np.asarray(phase)
    if values.size == 0:
        raise ValueError("phase image is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"phase image has {int((~np.isfinite(values)).sum())} NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ValueError(f"phase image is constant ({low}): it carries no phase information")

    if units == "rad" or (units is None and _in_radian_range(low, high)):
        if not _in_radian_range(low, high):
            raise ValueError(
                f"phase units are 'rad' but the values range over [{low:g}, {high:g}], "
                "outside [-pi, pi] and [0, 2*pi]; if they are vendor integers set the units to 'arbitrary'"
            )
        return _shift_into_range(values)

    integer_valued = np.issubdtype(values.dtype, np.integer) or bool(np.all(values == np.round(values)))
    steps = high - low + 1 if integer_valued else high - low
    return _wrap_float32(values.astype(np.float64) * (2 * np.pi / steps))
