"""What every background field removal shares: its result type and its input check."""
from dataclasses import dataclass

import numpy as np

from ..core.smv import _check_mask


@dataclass
class BackgroundRemoval:
    """Result of a background field removal.

    ``local_field`` is in the units of the input total field and is zero outside
    ``mask`` (the eroded mask, the only region where it is defined); its mean is
    arbitrary, like that of any field recovered from phase. ``iterations`` and
    ``relative_residual`` (``||b - A f|| / ||b||`` of the normal equations) describe
    the conjugate-gradient solve, whose settings are in ``parameters``.
    """

    local_field: np.ndarray
    mask: np.ndarray
    iterations: int
    relative_residual: float
    parameters: dict  # the solver settings used: Tikhonov, Tolerance, MaxIterations


def check_field_and_mask(total_field, mask):
    """The field as an array and the mask as bool, checked: same shape, mask not empty, finite in the mask."""
    field = np.asarray(total_field)
    mask = _check_mask(mask)
    if field.shape != mask.shape:
        raise ValueError(f"total field shape {field.shape} does not match mask shape {mask.shape}")
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("total field has NaN or infinite values inside the mask")
    return field, mask
