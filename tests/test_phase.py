"""phase_to_rad: vendor integer ranges, degrees and radians mapped to [-pi, pi)."""
import numpy as np
import pytest

from metaqsm_bids.qsm.field.phase import phase_to_rad

PI32 = np.float32(np.pi)


def _in_range(rad):
    return rad.dtype == np.float32 and rad.min() >= -PI32 and rad.max() < PI32


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
@pytest.mark.parametrize("units", ["arbitrary", None])
def test_siemens_range_maps_to_x_pi_over_4096(dtype, units):
    raw = np.arange(-4096, 4096).astype(dtype).reshape(16, 16, 32)
    rad = phase_to_rad(raw, units)
    assert rad.shape == raw.shape and _in_range(rad)
    # exact up to the float32 rounding of x * pi / 4096 itself
    np.testing.assert_array_equal(rad, (raw.astype(np.float64) * np.pi / 4096).astype(np.float32))


@pytest.mark.parametrize("high, steps", [(4095, 4096), (4094, 4096)])
def test_unsigned_ranges_span_one_turn(high, steps):
    raw = np.arange(0, high + 1, dtype=np.uint16)
    rad = phase_to_rad(raw, "arbitrary")
    assert _in_range(rad)
    expected = np.angle(np.exp(2j * np.pi * raw / steps))
    # angle() returns +pi where the mapping wraps to -pi
    np.testing.assert_allclose(np.exp(1j * rad), np.exp(1j * expected), atol=1e-6)
    # one integer step is 2*pi/steps everywhere, so the range is exactly one turn
    np.testing.assert_allclose(np.angle(np.exp(1j * np.diff(rad.astype(np.float64)))), 2 * np.pi / steps, atol=1e-6)
    assert rad[0] == 0.0
    np.testing.assert_allclose(np.exp(1j * rad[-1]), np.exp(2j * np.pi * high / steps), atol=1e-6)


def test_degrees_are_scaled_by_their_observed_range():
    degrees = np.linspace(-180.0, 180.0, 1001)  # not integer-valued: 360 degrees per turn
    rad = phase_to_rad(degrees, "arbitrary")
    assert _in_range(rad)
    np.testing.assert_allclose(rad[1:-1], np.deg2rad(degrees[1:-1]), atol=1e-6)
    assert rad[0] == -PI32 and rad[-1] == -PI32  # +-180 degrees are the same phase, -pi


@pytest.mark.parametrize("units", ["rad", None])
def test_radians_are_only_wrapped(units):
    values = np.array([-np.pi, -1.0, 0.0, 0.5, 3.0, np.pi, np.pi + 5e-4], dtype=np.float32)
    rad = phase_to_rad(values, units)
    assert _in_range(rad)
    np.testing.assert_array_equal(rad[1:5], values[1:5])
    assert rad[0] == -PI32 and rad[5] == -PI32
    np.testing.assert_allclose(rad[6], -np.pi + 5e-4, atol=1e-6)


def test_radians_from_zero_to_two_pi_are_wrapped():
    values = np.array([0.0, 1.0, np.pi, 4.0, 2 * np.pi - 0.25])
    rad = phase_to_rad(values, "rad")
    np.testing.assert_allclose(rad, [0.0, 1.0, -np.pi, 4.0 - 2 * np.pi, -0.25], atol=1e-6)


def test_radian_data_labelled_arbitrary_keeps_its_scale():
    values = np.linspace(-np.pi, np.pi, 2001)
    rad = phase_to_rad(values, "arbitrary")
    np.testing.assert_allclose(rad[:-1], values[:-1], atol=1e-6)


def test_rad_units_with_vendor_integers_name_the_range():
    with pytest.raises(ValueError, match=r"\[-4096, 4095\]"):
        phase_to_rad(np.arange(-4096, 4096, dtype=np.int16), "rad")


@pytest.mark.parametrize(
    "values, units, message",
    [
        (np.full((4, 4, 4), 7.0), None, "constant"),
        (np.zeros(5), "rad", "constant"),
        (np.array([0.0, np.nan, 1.0]), None, "NaN"),
        (np.array([0.0, np.inf, 1.0]), "arbitrary", "NaN or infinite"),
        (np.array([0.0, 1.0]), "degrees", "units"),
        (np.array([]), None, "empty"),
    ],
)
def test_bad_inputs_raise(values, units, message):
    with pytest.raises(ValueError, match=message):
        phase_to_rad(values, units)
